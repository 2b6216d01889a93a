"""The llama.cpp side of a GGUF: its quantiser, and loading, scoring and running a file in llama.cpp.

``export.py`` writes the f16/f32 GGUF itself; every other type (q8_0, q4_k_m, the IQ types ...)
is made here by llama.cpp's own ``llama_model_quantize`` through the ``llama-cpp-python``
bindings (optional extra ``llamacpp``): no private quantiser.

The check (``gguf_token_nll``) feeds llama.cpp the very token ids of
``evaluate.ppl_segments`` and reads its logits, so the GGUF and the HF model are scored on
the same segments; ``tokenizer_agreement`` checks that llama.cpp's own tokenizer gives the
same ids as the HF one (what generation from a text prompt relies on).

Every call into llama.cpp goes through ``llamacpp_guard`` (a crash in native code becomes an
error here, not a dead kernel). This module sits below the writer: ``export.export_gguf``
quantises through ``quantize_gguf``, so this module imports nothing of ``export``.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import eval_cache
from .artifacts import atomic_file
from .errors import CorruptFileError, unknown_name
from .gguf_layout import IMATRIX_REQUIRED, LLAMA_CPP_TYPES, QUANT_TYPES
from .llamacpp_guard import check_gguf_runs, open_llama, quantize_in_child

__all__ = [
    "LLAMACPP_INSTALL",
    "llama_cpp_available",
    "require_llama_cpp",
    "check_quant",
    "check_imatrix_given",
    "check_out_file",
    "check_gguf_file",
    "read_gguf_header",
    "quantize_gguf",
    "load_gguf",
    "gguf_token_nll",
    "gguf_perplexity",
    "gguf_ppl_key",
    "tokenizer_agreement",
    "gguf_generate",
    "hf_generate",
]

LLAMACPP_INSTALL = 'pip install "shortened-llm[llamacpp]"  (builds llama.cpp from source: ~5 min on 2 cores)'


# ---- checks ---------------------------------------------------------------------------------

def llama_cpp_available() -> bool:
    """Whether the optional ``llama-cpp-python`` bindings import (quantisation and the check need them)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def require_llama_cpp(what: str):
    """The ``llama_cpp`` module, or an ImportError that says what needed it and how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise ImportError(f"{what} needs llama.cpp's Python bindings: {LLAMACPP_INSTALL}") from None
    return llama_cpp


def check_quant(quant: str) -> str:
    """``quant`` lower-cased, or "did you mean" over ``QUANT_TYPES``: the one spelling check of a GGUF type."""
    q = str(quant).lower()
    if q not in QUANT_TYPES:
        raise unknown_name("quant", q, QUANT_TYPES,
                           note=f" (f32/f16 need only the gguf package; the others llama.cpp: {LLAMACPP_INSTALL})")
    return q


def check_imatrix_given(quant: str, imatrix) -> None:
    """Refuse an IQ type without an importance matrix, before any file is written (export or quantise)."""
    if imatrix is None and quant in IMATRIX_REQUIRED:
        raise ValueError(f"quant={quant!r} needs an importance matrix (imatrix=PATH): the IQ types are fitted to the "
                         "mean squared activation of every input channel, and without it their few bits go to the "
                         "wrong weights. Make one from the calibration text with shortened_llm.imatrix: "
                         "save_imatrix(calibration_imatrix(model, tokenizer), 'imatrix.gguf') (or llama.cpp's "
                         "llama-imatrix), then pass imatrix='imatrix.gguf'; `shortened-llm export quant-table` "
                         "makes one itself")


def check_out_file(out_file: Path, overwrite: bool) -> None:
    """A GGUF may be written to ``out_file``: not there (or ``overwrite``), not a folder, its folder writable.

    Checked before minutes of writing or quantising, by the writer and the quantiser alike.
    """
    if out_file.exists() and not overwrite:
        raise FileExistsError(f"out_file={str(out_file)!r} already exists: pass overwrite=True (CLI: --overwrite)")
    if out_file.is_dir():
        raise IsADirectoryError(f"out_file={str(out_file)!r} is a directory: give a file name such as model-q8_0.gguf")
    parent = out_file.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"out_file={str(out_file)!r}: cannot create its folder ({err.strerror}); "
                              "choose a writable location, e.g. under your run_dir") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"out_file={str(out_file)!r}: folder {str(parent)!r} is not writable; "
                              "choose a writable location, e.g. under your run_dir")


# ---- a GGUF's own consistency --------------------------------------------------------------

# GGUF value types -> struct format (8 = string, 9 = array are read apart)
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _walk_gguf_header(buf, wanted: Callable[[str], bool] = lambda key: False) -> tuple[dict, list[int], int]:
    """Walk a GGUF's header (kv pairs, tensor infos) in ``buf`` (the file's bytes, mapped): the
    values of the keys ``wanted`` accepts, every tensor's ggml type id, and the byte where the
    tensor data ends.

    Raises ``ValueError`` / ``struct.error`` / ``KeyError`` where the header is cut or not GGUF.
    Offsets into the mapped file, and no value built that is not wanted: an unwanted array of
    numbers is stepped over whole, one of strings a length at a time. About 12 ms for the
    embedded model's 49k-token vocabulary, where building every value took 70 ms and the ``gguf``
    package's ``GGUFReader`` 6 s, so every load can afford the check and every export the read.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size, pos = len(buf), 0
    length = struct.Struct("<Q").unpack_from

    def take(n: int) -> int:  # the offset of the next n bytes, which must be there
        nonlocal pos
        if n < 0 or pos + n > size:
            raise ValueError("the header ends early")
        pos += n
        return pos - n

    def read(fmt):
        return struct.unpack_from("<" + fmt, buf, take(struct.calcsize("<" + fmt)))[0]

    def string() -> str:
        n = read("Q")
        return bytes(buf[take(n):pos]).decode("utf-8", errors="replace")

    def value(kind):
        if kind == 8:
            return string()
        if kind == 9:
            item, n = read("I"), read("Q")
            return [value(item) for _ in range(n)]
        return read(_GGUF_SCALARS[kind])

    def skip(kind) -> None:  # a value whose content is not wanted
        nonlocal pos
        if kind == 8:
            take(read("Q"))
        elif kind == 9:
            item, n = read("I"), read("Q")
            if item == 8:  # a vocabulary: tens of thousands of strings, stepped over in one tight loop
                for _ in range(n):
                    if pos + 8 > size:
                        raise ValueError("the header ends early")
                    pos += 8 + length(buf, pos)[0]
                if pos > size:
                    raise ValueError("the header ends early")
            elif item == 9:
                for _ in range(n):
                    skip(9)
            else:
                take(n * struct.calcsize("<" + _GGUF_SCALARS[item]))
        else:
            take(struct.calcsize("<" + _GGUF_SCALARS[kind]))

    if bytes(buf[:4]) != b"GGUF":
        raise ValueError("it does not start with the GGUF magic")
    take(4)
    version, n_tensors, n_kv = read("I"), read("Q"), read("Q")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not one llama.cpp reads (2, 3)")
    values, alignment = {}, 32
    for _ in range(n_kv):
        key, kind = string(), read("I")
        if key == "general.alignment":  # where the tensor data starts, wanted or not
            alignment = value(kind)
            if wanted(key):
                values[key] = alignment
        elif wanted(key):
            values[key] = value(kind)
        else:
            skip(kind)
    types, end = [], 0
    for _ in range(n_tensors):
        take(read("Q"))  # the tensor's name
        dims = [read("Q") for _ in range(read("I"))]
        kind = read("I")
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        types.append(kind)
        end = max(end, read("Q") + math.prod(dims) // block * type_size)
    start = -(-pos // alignment) * alignment
    return values, types, start + end


def _gguf_header(gguf_file: Path, wanted: Callable[[str], bool] = lambda key: False) -> tuple[dict, list[int]]:
    """``_walk_gguf_header`` of a file that must hold all of its tensor data; else ``CorruptFileError``."""
    fix = "export it again (shortened-llm export gguf --overwrite) or copy it again"
    try:
        with open(gguf_file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            values, types, end = _walk_gguf_header(buf, wanted)
    except (ValueError, KeyError, struct.error, MemoryError, OverflowError) as err:  # mmap: ValueError when empty
        raise CorruptFileError(gguf_file, f"is not a readable GGUF: {err}", fix) from None
    size = gguf_file.stat().st_size
    if size < end:
        raise CorruptFileError(gguf_file, f"is truncated: its tensors end at byte {end}, the file has {size}", fix)
    return values, types


def read_gguf_header(gguf_file: str | os.PathLike, keys: Sequence[str] | Callable[[str], bool]) -> tuple[dict, list[str]]:
    """The values of ``keys`` in a GGUF's header (those it has; ``keys`` may also be a test a key
    passes) and the names of its tensors' types (``F16``, ``Q4_K`` ...), after ``check_gguf_file``'s
    check, in one walk; fast enough to call on every export."""
    from gguf import GGMLQuantizationType

    values, types = _gguf_header(Path(gguf_file), keys if callable(keys) else frozenset(keys).__contains__)
    return values, [GGMLQuantizationType(t).name for t in types]


def check_gguf_file(gguf_file: str | os.PathLike) -> Path:
    """``gguf_file`` if its header parses and the file holds all of its tensor data; else ``CorruptFileError``.

    A copy or download cut short, or a write killed by another tool, otherwise reaches llama.cpp
    as "Failed to load model" or the ``gguf`` reader's reshape error, neither naming the cause.
    """
    gguf_file = Path(gguf_file)
    _gguf_header(gguf_file)
    return gguf_file


# ---- the quantiser --------------------------------------------------------------------------

def quantize_gguf(src_file: str | os.PathLike, out_file: str | os.PathLike, quant: str, overwrite: bool = False,
                  nthread: int | None = None, verbose: bool = False, imatrix: str | os.PathLike | None = None) -> Path:
    """llama.cpp's own quantiser (``llama_model_quantize``) from an f16/f32 GGUF to ``quant``.

    Metadata (block counts, the pruning record, the tokenizer) is copied by llama.cpp. Use it
    to make several types from one ``export_gguf(..., quant="f16")`` file without re-writing it.
    ``imatrix``: an importance matrix file (``imatrix.save_imatrix``, or llama-imatrix's GGUF),
    required for the IQ types (``IMATRIX_REQUIRED``), optional for the others; it must have been
    measured on this very model (``imatrix.check_imatrix_fits``), and its name, dataset and chunk
    count go into the output's ``quantize.imatrix.*`` keys as llama-quantize writes them.
    ``verbose=True`` shows llama.cpp's per-tensor log (e.g. K-quant fallbacks for widths that
    are not a multiple of 256, like SmolLM2's 576); otherwise only its errors.
    """
    quant = check_quant(quant)
    if quant not in LLAMA_CPP_TYPES:
        raise ValueError(f"quant={quant!r} is written by export_gguf, not quantised: use one of {', '.join(LLAMA_CPP_TYPES)}")
    check_imatrix_given(quant, imatrix)
    require_llama_cpp(f"quant={quant!r}")
    src_file, out_file = Path(src_file), Path(out_file)
    if not src_file.is_file():
        raise FileNotFoundError(f"src_file={str(src_file)!r} does not exist: write it with export_gguf(..., quant='f16')")
    check_gguf_file(src_file)
    if imatrix is not None:
        from .imatrix import check_imatrix_fits

        check_imatrix_fits(imatrix, src_file)
    check_out_file(out_file, overwrite)
    with atomic_file(out_file) as tmp:  # in a child process: a crash in llama.cpp is an error here, not a dead kernel
        quantize_in_child(src_file, tmp, LLAMA_CPP_TYPES[quant], nthread or torch.get_num_threads(), verbose=verbose,
                          imatrix=imatrix)
    return out_file


# ---- a GGUF in llama.cpp --------------------------------------------------------------------

def load_gguf(gguf_file: str | os.PathLike, n_ctx: int = 512, logits_all: bool = True, n_threads: int | None = None,
              seed: int = 0):
    """A ``llama_cpp.Llama`` on ``gguf_file`` (CPU), keeping the logits of every position for PPL.

    ``n_threads`` defaults to torch's thread count (``OMP_NUM_THREADS`` / ``torch.set_num_threads``),
    not to every core: llama.cpp's threads spin at each barrier, so on a machine where other
    processes (a second test worker, a sweep) hold cores, using all of them runs many times slower.
    It also sets ``n_threads_batch``, the threads of prompt (batch) evaluation, which is all a
    PPL pass does: llama-cpp-python would otherwise give it every core. With one other process
    busy on a 2-core machine that made scoring 3-6x slower (7.6 / 4.4 s vs 1.3 s per 128-token
    segment).

    The file is first run on a few tokens in a child process (``llamacpp_guard.check_gguf_runs``,
    once per file): where this llama.cpp build cannot run on this CPU, that raises
    ``LlamaCppCrash`` with the fix, instead of a SIGILL that kills the notebook kernel.
    """
    require_llama_cpp("loading a GGUF")
    if not Path(gguf_file).is_file():
        raise FileNotFoundError(f"gguf_file={str(gguf_file)!r} does not exist: write it with export_gguf first")
    check_gguf_file(gguf_file)  # a cut file named as such, not as a llama.cpp failure
    threads = n_threads or torch.get_num_threads()
    check_gguf_runs(gguf_file, threads)
    return open_llama(gguf_file, n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all,
                      n_threads=threads, n_threads_batch=threads, seed=seed, verbose=False)


def gguf_token_nll(llm, input_ids: torch.Tensor, progress: bool | str = False) -> torch.Tensor:
    """NLL of every predicted token under llama.cpp: ``(n, T)`` ids -> ``(n * (T - 1),)``, like ``evaluate.token_nll``.

    Each segment is evaluated from an empty context, as the HF model sees it; llama.cpp's
    logits of positions 0..T-2 score tokens 1..T-1.
    """
    n, T = input_ids.shape
    if T > llm.n_ctx():
        raise ValueError(f"segments of {T} tokens exceed the context n_ctx={llm.n_ctx()}: load_gguf(..., n_ctx>={T})")
    rows = range(n)
    if progress:
        rows = tqdm(rows, desc=progress if isinstance(progress, str) else "llama.cpp NLL", unit="seg")
    losses = []
    for i in rows:
        ids = input_ids[i]
        llm.reset()
        llm.eval(ids.tolist())
        logits = torch.from_numpy(llm.scores[: T - 1].copy())  # (T-1, V)
        losses.append(F.cross_entropy(logits.float(), ids[1:], reduction="none"))
    return torch.cat(losses)


def gguf_perplexity(llm, input_ids: torch.Tensor, progress: bool | str = False, cache=None) -> float:
    """exp(mean NLL) over ``input_ids`` (from ``evaluate.ppl_segments``): the paper's protocol in llama.cpp.

    ``cache`` (``eval_cache.resolve``: ``None`` = the active cache, if any; ``False`` = none) reads the
    number back when these bytes were scored on these token ids before (``gguf_ppl_key``). Notebook 08
    scores the f16, Q8_0 and Q4_K_M files of each model in its format table (``export.compare_formats``)
    and again in its quantisation table, which remakes them from the same f16 file under other names:
    the second reads the first's numbers.
    """
    def measure() -> float:
        return math.exp(gguf_token_nll(llm, input_ids, progress).double().mean().item())

    store = eval_cache.resolve(cache)
    return measure() if store is None else float(store.get_or_compute(gguf_ppl_key(llm, input_ids), measure))


def gguf_ppl_key(llm, input_ids: torch.Tensor) -> dict:
    """The evaluation-cache key of one llama.cpp PPL: the digest of the file's bytes (never its name),
    of the token ids, and what picks llama.cpp's kernels (its version, the build's CPU features, the
    threads, the context, the repacked "extra" buffers), since other kernels round the last digits
    differently."""
    import llama_cpp

    return {"kind": "gguf_ppl", "file": eval_cache.file_digest(llm.model_path),
            "inputs": eval_cache.tensor_digest(input_ids), "llama_cpp": llama_cpp.__version__,
            "build": llama_cpp.llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
            "threads": llm.context_params.n_threads_batch, "n_ctx": llm.n_ctx(),
            "extra_bufts": bool(llm.model_params.use_extra_bufts)}


def tokenizer_agreement(llm, tokenizer, texts: Sequence[str]) -> dict:
    """Do llama.cpp and HF tokenise ``texts`` to the same ids, and do both decode them back?

    Returns counts (``ids_equal``, ``roundtrip_equal`` out of ``texts``) and the first
    mismatch, so a wrong pre-tokenizer shows up before anyone trusts a generation.
    """
    ids_equal = roundtrip = 0
    first = None
    for text in texts:
        hf = tokenizer(text, add_special_tokens=False).input_ids
        lc = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        back = llm.detokenize(hf).decode("utf-8", errors="replace")
        ids_equal += hf == lc
        roundtrip += back == tokenizer.decode(hf)
        if first is None and (hf != lc or back != tokenizer.decode(hf)):
            k = next((j for j, (a, b) in enumerate(zip(hf, lc)) if a != b), min(len(hf), len(lc)))
            first = {"text": text[:80], "position": k, "hf": hf[k : k + 5], "llama_cpp": lc[k : k + 5]}
    return {"texts": len(texts), "ids_equal": ids_equal, "roundtrip_equal": roundtrip, "first_mismatch": first}


def gguf_generate(llm, prompt_ids: Sequence[int], max_new_tokens: int = 32) -> str:
    """Greedy continuation of the token ids ``prompt_ids`` in llama.cpp (same ids as ``hf_generate`` gets)."""
    llm.reset()
    out = llm.create_completion(list(map(int, prompt_ids)), max_tokens=max_new_tokens, temperature=0.0, top_k=1,
                                repeat_penalty=1.0, seed=0)
    return out["choices"][0]["text"]


@torch.no_grad()
def hf_generate(model, tokenizer, prompt_ids: Sequence[int], max_new_tokens: int = 32) -> str:
    """Greedy continuation in transformers, decoded without the prompt: the reference for ``gguf_generate``."""
    ids = torch.tensor([list(prompt_ids)], device=next(model.parameters()).device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
