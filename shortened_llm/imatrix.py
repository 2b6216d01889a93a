"""The importance matrix: how strongly each input channel of each linear layer is driven, for llama.cpp's quantiser.

A weight row ``w`` of a linear layer meets inputs ``x``; rounding it to ``q`` costs
``E[(w·x - q·x)^2]``, which llama.cpp's low-bit quantisers approximate by the weighted error
``sum_j I_j (w_j - q_j)^2`` with ``I_j = E[x_j^2]``, the mean squared activation of input
channel ``j`` over a calibration text (llama.cpp's ``llama-imatrix``, ``tools/imatrix``). Channels
the model leans on get the precision; the IQ types are built around it, the K-quants use it when
they have it.

This module computes it in transformers with forward hooks, from the same calibration text the
block scores use (``data.calibration_batches``), and stores it the way ``llama-imatrix`` does, so
``llama-quantize --imatrix`` reads our file and ``llamacpp.quantize_gguf(..., imatrix=)`` reads
theirs. One GGUF file (``general.type = "imatrix"``), per weight two F32 tensors:

    <name>.in_sum2   ggml shape (n_in, 1)  sum over tokens of x_j^2
    <name>.counts    ggml shape (1, 1)     tokens seen

plus ``imatrix.datasets``, ``imatrix.chunk_count`` and ``imatrix.chunk_size``, the keys
``llama-quantize`` insists on. Tensor names are the ones ``export_gguf`` writes
(``gguf_layout.gguf_tensor_name``). ``shortened_llm.*`` keys record which blocks the model had, so an
importance matrix of the dense model is refused for a pruned one (``check_imatrix_fits``): the
names and sizes of its blocks 0..n-1 would fit, the statistics would not.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .evaluate import batch_starts
from .families import hooks_removed

__all__ = ["ImportanceMatrix", "compute_imatrix", "calibration_imatrix", "save_imatrix", "load_imatrix",
           "check_imatrix_fits", "IMATRIX_SAMPLES"]

# 10 x 128 tokens are what the paper's block scores need; llama-imatrix is usually run on tens of
# thousands of tokens. 64 x 128 = 8k tokens: ~30 s for a 135M model on 2 CPU cores.
IMATRIX_SAMPLES = 64
META = "shortened_llm"  # the model the statistics came from: block_count, original_block_count, removed_blocks


@dataclass
class ImportanceMatrix:
    """Per GGUF weight name: ``sums`` ``(n_mat, n_in)`` of x^2 and ``counts`` ``(n_mat,)`` tokens (n_mat = 1 but for MoE)."""

    sums: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]
    chunk_count: int
    chunk_size: int
    datasets: list[str] = field(default_factory=list)
    # the model it was computed on: {"block_count", "original_block_count", "removed_blocks"}; {} if unknown
    model: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sums)

    def mean(self, name: str) -> torch.Tensor:
        """E[x^2] per input channel, ``(n_mat * n_in,)``: what llama-quantize hands ``llama_model_quantize``."""
        counts = self.counts[name].double().unsqueeze(1)  # (n_mat, 1)
        # a matrix that saw no token gets weights 1 (equal importance), as llama-quantize gives it
        return torch.where(counts > 0, self.sums[name].double() / counts.clamp(min=1), 1.0).flatten().float()


# ---- compute -------------------------------------------------------------------------------------

def _linear_names(model: nn.Module) -> dict[str, nn.Linear]:
    """GGUF weight name -> the ``nn.Linear`` whose weight it is, for every linear layer the GGUF holds."""
    from .gguf_layout import gguf_tensor_name

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            gguf_name = gguf_tensor_name(model.config, f"{name}.weight")
            if gguf_name:  # None: a tied LM head, which the file stores as token_embd (a lookup, no input)
                out[gguf_name] = module
    return out


def _model_record(model: nn.Module) -> dict:
    from .models import num_blocks

    n = num_blocks(model)
    record = getattr(model, "pruning", None)
    return {"block_count": n,
            "original_block_count": int(record.original_num_blocks) if record else n,
            "removed_blocks": [int(b) for b in record.removed_blocks] if record else []}


@torch.no_grad()
def compute_imatrix(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8, datasets: list[str] | None = None,
                    progress: bool | str = False) -> ImportanceMatrix:
    """Sum of x^2 per input channel and the token count, for every linear layer of ``model`` the GGUF holds.

    ``input_ids`` ``(n, T)``: each row is one chunk of ``T`` tokens (llama-imatrix's ``chunk_size``).
    Every token of every chunk counts, as in llama-imatrix (which also scores all of its chunk).
    """
    if input_ids.ndim != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids of shape {tuple(input_ids.shape)}: pass (n_chunks, chunk_size) token ids, "
                         "e.g. data.calibration_batches(tokenizer, n_samples, seq_len)")
    layers = _linear_names(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no linear layer that export_gguf writes: nothing to measure")
    device = next(model.parameters()).device
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64, device=device) for name, m in layers.items()}
    counts = dict.fromkeys(layers, 0)

    def hook(name):
        def accumulate(module, inputs):
            x = inputs[0].detach().reshape(-1, module.in_features)  # (tokens, n_in)
            sums[name] += x.double().square().sum(0)
            counts[name] += x.shape[0]
        return accumulate

    with hooks_removed([m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]):
        for i in batch_starts(len(input_ids), batch_size, progress, "imatrix"):
            model(input_ids[i : i + batch_size].to(device), use_cache=False)
    return ImportanceMatrix(
        sums={name: s.cpu().float().unsqueeze(0) for name, s in sorted(sums.items())},  # (1, n_in)
        counts={name: torch.tensor([float(c)]) for name, c in sorted(counts.items())},
        chunk_count=int(input_ids.shape[0]), chunk_size=int(input_ids.shape[1]),
        datasets=list(datasets or []), model=_model_record(model))


def calibration_imatrix(model: nn.Module, tokenizer, n_samples: int = IMATRIX_SAMPLES, seq_len: int = 128,
                        seed: int = 1234, dataset: str = "bookcorpus", batch_size: int = 8,
                        progress: bool | str = False) -> ImportanceMatrix:
    """``compute_imatrix`` on ``n_samples`` windows of ``seq_len`` tokens of the calibration set (``calibration_batches``)."""
    from .data import calibration_batches
    from .models import family_of

    ids = calibration_batches(tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed, dataset=dataset,
                              bos_every=family_of(model).bos_every)
    label = f"{dataset} (shortened_llm calibration_batches: {n_samples} x {seq_len} tokens, seed {seed})"
    return compute_imatrix(model, ids, batch_size=batch_size, datasets=[label], progress=progress)


# ---- the file ------------------------------------------------------------------------------------

def save_imatrix(imatrix: ImportanceMatrix, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``imatrix`` in llama-imatrix's GGUF format; the file appears only when complete."""
    import gguf

    from .artifacts import atomic_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"path={str(path)!r} already exists: pass overwrite=True (CLI: --overwrite)")
    if path.is_dir():
        raise IsADirectoryError(f"path={str(path)!r} is a directory: give a file name such as imatrix.gguf")
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")  # general.architecture is required by the writer, unused by readers
        writer.add_type(gguf.GGUFType.IMATRIX)
        writer.add_array(gguf.Keys.IMatrix.DATASETS, list(imatrix.datasets) or ["unknown"])
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, int(imatrix.chunk_count))
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, int(imatrix.chunk_size))
        if imatrix.model:
            writer.add_uint32(f"{META}.block_count", int(imatrix.model["block_count"]))
            writer.add_uint32(f"{META}.original_block_count", int(imatrix.model["original_block_count"]))
            writer.add_uint32(f"{META}.removed_block_count", len(imatrix.model["removed_blocks"]))
            if imatrix.model["removed_blocks"]:
                writer.add_array(f"{META}.removed_blocks", [int(b) for b in imatrix.model["removed_blocks"]])
        for name in sorted(imatrix.sums):
            sums = imatrix.sums[name].float().reshape(len(imatrix.counts[name]), -1)  # numpy (n_mat, n_in) = ggml (n_in, n_mat)
            writer.add_tensor(f"{name}.in_sum2", sums.numpy())
            writer.add_tensor(f"{name}.counts", imatrix.counts[name].float().reshape(-1, 1).numpy())  # ggml (1, n_mat)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def load_imatrix(path: str | os.PathLike) -> ImportanceMatrix:
    """Read an importance matrix in llama-imatrix's GGUF format (ours, or ``llama-imatrix -o x.gguf``'s)."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"imatrix={str(path)!r} does not exist: make one with save_imatrix(calibration_imatrix("
                                "model, tokenizer), path) or `shortened-llm export quant-table`")
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as err:
        raise ValueError(f"imatrix={str(path)!r} is not a GGUF file ({err}); the legacy .dat format of "
                         "llama-imatrix is not read here: convert it with llama-imatrix --in-file x.dat -o x.gguf") from None

    def value(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    if value("general.type") != "imatrix":
        raise ValueError(f"imatrix={str(path)!r} is a GGUF of type {value('general.type')!r}, not an importance "
                         "matrix: pass the file save_imatrix or llama-imatrix wrote, not a model")
    missing = [k for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size") if k not in reader.fields]
    if missing:
        raise ValueError(f"imatrix={str(path)!r} lacks {', '.join(missing)}: llama-quantize refuses such a file")
    tensors = {t.name: t for t in reader.tensors}
    sums, counts = {}, {}
    for name in sorted(n.removesuffix(".in_sum2") for n in tensors if n.endswith(".in_sum2")):
        if f"{name}.counts" not in tensors:
            raise ValueError(f"imatrix={str(path)!r}: {name}.in_sum2 has no {name}.counts")
        c = torch.from_numpy(tensors[f"{name}.counts"].data.copy()).float().flatten()  # (n_mat,)
        sums[name] = torch.from_numpy(tensors[f"{name}.in_sum2"].data.copy()).float().reshape(len(c), -1)
        counts[name] = c
    model = {}
    if f"{META}.block_count" in reader.fields:
        model = {"block_count": int(value(f"{META}.block_count")),
                 "original_block_count": int(value(f"{META}.original_block_count")),
                 "removed_blocks": [int(b) for b in value(f"{META}.removed_blocks", [])]}
    return ImportanceMatrix(sums=sums, counts=counts, chunk_count=int(value("imatrix.chunk_count")),
                            chunk_size=int(value("imatrix.chunk_size")),
                            datasets=[str(d) for d in value("imatrix.datasets", [])], model=model)


# ---- does it belong to this model? -------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _gguf_weights(path: str, size: int, mtime_ns: int) -> tuple[dict, dict]:
    """Input width of every 2-D ``blk.*`` / ``output`` weight of a model GGUF, and its pruning record (~3 s for 135M)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def value(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    widths = {t.name: int(t.shape[0]) for t in reader.tensors  # gguf shapes are ggml's: ne[0] = input width
              if len(t.shape) >= 2 and (t.name.startswith("blk.") or t.name == "output.weight")}
    arch = value("general.architecture")
    record = {"block_count": value(f"{arch}.block_count"),
              "original_block_count": value(f"{META}.original_block_count"),
              "removed_blocks": [int(b) for b in value(f"{META}.removed_blocks", [])]}
    return widths, record


def _listed(names, n: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_imatrix_fits(imatrix: ImportanceMatrix | str | os.PathLike, gguf_file: str | os.PathLike) -> ImportanceMatrix:
    """Raise ``ValueError`` unless ``imatrix`` was measured on the model in ``gguf_file``; return it loaded.

    Every entry must be a weight of the file with the same input width, every block weight must
    have an entry, and where both record which blocks were removed, the records must agree (an
    importance matrix of the dense model names and sizes a pruned model's blocks 0..n-1 right, but
    measured other blocks). llama.cpp itself checks only the widths of the names it finds.
    """
    source = imatrix if isinstance(imatrix, (str, os.PathLike)) else None
    imatrix = load_imatrix(imatrix) if source is not None else imatrix
    what = f"imatrix={str(source)!r}" if source is not None else "the importance matrix"
    stat = Path(gguf_file).stat()
    widths, record = _gguf_weights(str(Path(gguf_file).resolve()), stat.st_size, stat.st_mtime_ns)
    fix = "compute it on this model: calibration_imatrix(model, tokenizer) with the model this GGUF was exported from"
    extra = set(imatrix.sums) - set(widths)
    if extra:
        raise ValueError(f"{what} does not fit {Path(gguf_file).name}: it has entries for weights that model lacks "
                         f"({_listed(extra)}); it was measured on another model ({imatrix.model.get('block_count', '?')} "
                         f"blocks, this one has {record['block_count']}): {fix}")
    wrong = {n: (imatrix.sums[n].shape[-1], widths[n]) for n in imatrix.sums if imatrix.sums[n].shape[-1] != widths[n]}
    if wrong:
        n, (a, b) = sorted(wrong.items())[0]
        raise ValueError(f"{what} does not fit {Path(gguf_file).name}: {len(wrong)} weight(s) differ in width, e.g. "
                         f"{n} has {a} input channels in the importance matrix and {b} in the model: {fix}")
    missing = {n for n in widths if n.startswith("blk.")} - set(imatrix.sums)
    if missing:
        raise ValueError(f"{what} does not fit {Path(gguf_file).name}: it has no entry for {_listed(missing)} "
                         f"({len(missing)} of the model's {len(widths)} weights); it was measured on another model "
                         f"({imatrix.model.get('block_count', '?')} blocks, this one has {record['block_count']}): {fix}")
    if imatrix.model and record["original_block_count"] is not None:
        ours, theirs = imatrix.model["removed_blocks"], record["removed_blocks"]
        if ours != theirs or imatrix.model["original_block_count"] != record["original_block_count"]:
            raise ValueError(f"{what} does not fit {Path(gguf_file).name}: it was measured on a model with blocks "
                             f"{ours or 'none'} of {imatrix.model['original_block_count']} removed, this GGUF has "
                             f"blocks {theirs or 'none'} of {record['original_block_count']} removed: the block "
                             f"names match, the statistics do not. {fix}")
    return imatrix
