"""Every quantisation a GGUF release ships, in one size / quality / speed table (notebook 08, ``export quant-table``).

The public GGUF release of a shortened model is 22 files, Q2_K to Q8_0 with the IQ types among
them, and a user picks one by size. This table says what each costs in quality and gives in speed,
measured the same way for every type: from one f16 file (``export_gguf``), each type made by
llama.cpp's quantiser (``quantize_gguf``; the IQ types with the model's importance matrix, the
K-quants and legacy types both with and without it), then per type

- file size (MB) and bits per weight: 8 x file bytes / parameters, so the vocabulary and the
  metadata count too (llama.cpp's own "BPW" counts tensor bytes only);
- WikiText-2 perplexity in llama.cpp on the token ids transformers sees (``evaluate.ppl_segments``,
  ``llamacpp.gguf_perplexity``), and its ratio to the same model's f16 file;
- prompt and generation speed in llama.cpp on this CPU: a ``prompt_tokens`` prompt evaluated at
  once, then ``gen_tokens`` greedy tokens one at a time, the median of ``repeats`` runs after a
  warm-up, with the spread (max - min) / median;
- the time llama.cpp takes to quantise (the child process included).

With ``dense=`` the model the pruned one came from gets the same rows, so "prune 20 % then
Q4_K_M" and "keep every block, Q3_K_M" compare at equal size (``equal_size``). Rows go to
``out_csv`` as soon as each is measured; a rerun keeps the rows already there (same model, type,
imatrix, segments and segment length) and measures only the missing ones.
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Literal, Sequence

import pandas as pd

from .gguf_layout import IMATRIX_REQUIRED, IMATRIX_UNUSED, LLAMA_CPP_TYPES, RELEASE_TYPES
from .imatrix import IMATRIX_SAMPLES
from .llamacpp import check_quant

__all__ = ["COLUMNS", "DEFAULT_TYPES", "quant_table", "equal_size", "work_dir_for"]

# The release's 22 files and bf16; f16 is always measured first (the reference every ratio is to).
DEFAULT_TYPES: tuple[str, ...] = ("bf16", *RELEASE_TYPES)
COLUMNS = ["model", "type", "imatrix", "size_mb", "bpw", "ppl", "ppl_ratio", "prompt_tps", "prompt_spread_pct",
           "gen_tps", "gen_spread_pct", "quantize_s", "n_params", "block_count", "segments", "max_segments",
           "seq_len", "threads", "same_file_as", "cpu"]
ImatrixRows = Literal["both", "with", "without"]


def work_dir_for(out_csv: str | os.PathLike) -> Path:
    """Where the GGUF files of a table live: ``<out_csv without .csv>-gguf/`` beside it."""
    out_csv = Path(out_csv)
    return out_csv.with_name(out_csv.stem + "-gguf")


def _plan(types: Sequence[str], imatrix: ImatrixRows) -> list[tuple[str, bool]]:
    """(type, with imatrix?) rows in order, f16 first; the IQ types only with, the plain conversions only without."""
    if imatrix not in ("both", "with", "without"):
        raise ValueError(f"imatrix={imatrix!r} must be 'both', 'with' or 'without': which K-quant / legacy rows to "
                         "measure (the IQ types are always made with one, f16/bf16/q8_0 never use one)")
    rows = [("f16", False)]
    for t in dict.fromkeys(check_quant(t) for t in types):
        if t == "f32":
            raise ValueError("types: f32 is not measured; f16 is the reference row every ratio is to")
        if t == "f16":
            continue  # already the first row
        if t in IMATRIX_REQUIRED:
            rows.append((t, True))
        elif t in IMATRIX_UNUSED:
            rows.append((t, False))
        else:
            rows += [(t, False)] * (imatrix != "with") + [(t, True)] * (imatrix != "without")
    return rows


def _speed(path: Path, prompt: list[int], gen_tokens: int, repeats: int, threads: int) -> dict:
    """Prompt and generation tokens/s in llama.cpp: median of ``repeats`` after one warm-up run."""
    import numpy as np

    from .llamacpp import load_gguf

    llm = load_gguf(path, n_ctx=len(prompt) + gen_tokens, logits_all=False, n_threads=threads)
    prompt_s, gen_s = [], []
    for run in range(repeats + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for _ in range(gen_tokens):  # greedy, one token per step: what generation costs
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        t2 = time.perf_counter()
        if run:  # run 0 warms caches and thread pools
            prompt_s.append(t1 - t0)
            gen_s.append(t2 - t1)
    del llm
    prompt_tps = [len(prompt) / s for s in prompt_s]
    gen_tps = [gen_tokens / s for s in gen_s]

    def spread(v):
        return 100 * (max(v) - min(v)) / statistics.median(v)

    return {"prompt_tps": statistics.median(prompt_tps), "prompt_spread_pct": spread(prompt_tps),
            "gen_tps": statistics.median(gen_tps), "gen_spread_pct": spread(gen_tps)}


class _Model:
    """One model of the table: its f16 file, importance matrix and PPL segments, each made when first needed."""

    def __init__(self, label: str, model_dir: Path, work_dir: Path, seq_len: int, max_segments: int | None,
                 imatrix_samples: int, progress: bool):
        self.label, self.model_dir, self.work_dir = label, model_dir, work_dir
        self.seq_len, self.max_segments, self.imatrix_samples, self.progress = seq_len, max_segments, imatrix_samples, progress
        self.f16 = work_dir / f"{label}-f16.gguf"
        self.imatrix_file = work_dir / f"{label}-imatrix.gguf"
        self._hf = self._segments = None
        self.f16_seconds = None

    def hf(self):
        if self._hf is None:
            from .models import load_model

            self._hf = load_model(self.model_dir, device="cpu")
        return self._hf

    def segments(self):
        if self._segments is None:
            from .evaluate import default_bos, ppl_segments

            model, tokenizer = self.hf()
            self._segments = ppl_segments(tokenizer, "wikitext2", self.seq_len, default_bos(model), self.max_segments)
        return self._segments

    def f16_file(self) -> Path:
        if not self.f16.exists():  # train-or-load: the one float file every type starts from
            from .export import export_gguf

            t0 = time.perf_counter()
            export_gguf(self.model_dir, self.f16, "f16", progress=False)
            self.f16_seconds = time.perf_counter() - t0
        return self.f16

    def imatrix(self) -> Path:
        if not self.imatrix_file.exists():
            from .imatrix import calibration_imatrix, save_imatrix

            model, tokenizer = self.hf()
            save_imatrix(calibration_imatrix(model, tokenizer, n_samples=self.imatrix_samples,
                                             progress=f"{self.label} imatrix" if self.progress else False),
                         self.imatrix_file)
        return self.imatrix_file


def _measure(m: _Model, quant: str, with_imatrix: bool, prompt_tokens: int, gen_tokens: int, repeats: int,
             threads: int, keep_files: bool) -> dict:
    from .export import file_size_mb
    from .llamacpp import gguf_perplexity, load_gguf, quantize_gguf
    from .llamacpp_guard import cpu_model

    f16 = m.f16_file()
    if quant == "f16":
        path, seconds = f16, m.f16_seconds
    else:
        name = f"{m.label}-{quant}{'-imatrix' if with_imatrix else ''}.gguf"
        # a file only measured gets a hidden name of its own: never one of export_gguf's / compare_formats' files
        path = m.work_dir / (name if keep_files else f".{name}.measuring")
        imatrix = m.imatrix() if with_imatrix else None
        t0 = time.perf_counter()
        # overwrite: a file of this name in the table's folder is this table's, from an interrupted run or the
        # same quantisation (same f16 file and type) made before
        quantize_gguf(f16, path, quant, overwrite=True, nthread=threads, imatrix=imatrix)
        seconds = time.perf_counter() - t0
    segments = m.segments()
    try:
        llm = load_gguf(path, n_ctx=segments.shape[1], n_threads=threads)
        ppl = gguf_perplexity(llm, segments, progress=f"{m.label} {quant}" if m.progress else False)
        n_params = int(llm._model.n_params())
        meta = llm.metadata
        blocks = int(meta[f"{meta['general.architecture']}.block_count"])
        del llm
        prompt = segments.flatten()[:prompt_tokens].tolist()
        speed = _speed(path, prompt, gen_tokens, repeats, threads)
        size = file_size_mb(path)
    finally:
        if path != f16 and not keep_files:
            path.unlink(missing_ok=True)
    return {"model": m.label, "type": quant, "imatrix": with_imatrix, "size_mb": size,
            "bpw": 8e6 * size / n_params, "ppl": ppl, **speed,
            "quantize_s": None if seconds is None else round(seconds, 2), "n_params": n_params, "block_count": blocks,
            "segments": len(segments), "max_segments": "all" if m.max_segments is None else str(m.max_segments),
            "seq_len": m.seq_len, "threads": threads, "same_file_as": "", "cpu": cpu_model()}


def quant_table(model: str | os.PathLike, out_csv: str | os.PathLike | None = None, types: Sequence[str] = DEFAULT_TYPES,
                dense: str | os.PathLike | None = None, imatrix: ImatrixRows = "both", max_segments: int | None = 20,
                seq_len: int = 128, prompt_tokens: int = 128, gen_tokens: int = 32, repeats: int = 3,
                imatrix_samples: int = IMATRIX_SAMPLES, work_dir: str | os.PathLike | None = None,
                keep_files: bool = False, n_threads: int | None = None, label: str | None = None,
                dense_label: str | None = None, progress: bool = True) -> pd.DataFrame:
    """One row per model x type (x imatrix for the types that can take one); see the module docstring.

    ``model`` (and ``dense``): Hugging Face dirs or embedded names. GGUF files go to ``work_dir``
    (default ``work_dir_for(out_csv)``, or a temporary folder without ``out_csv``); each model's f16
    file and importance matrix (``<label>-imatrix.gguf``, ``imatrix_samples`` x 128 calibration
    tokens) stay there and are reused (a folder of ``compare_formats`` serves: same file names), a
    quantised file is deleted once measured unless ``keep_files`` (then ``<label>-<type>[-imatrix].gguf``).
    The f16 row's ``quantize_s`` is the time ``export_gguf`` took to write it (empty when it was there).
    Returned sorted by type, then imatrix, then model, so a dense row sits beside its pruned one.
    """
    import tempfile

    import torch

    from .artifacts import atomic_write_text, read_cached_csv
    from .models import resolve_model_path

    plan = _plan(types, imatrix)
    for name, value in (("max_segments", max_segments), ("seq_len", seq_len), ("prompt_tokens", prompt_tokens),
                        ("gen_tokens", gen_tokens), ("repeats", repeats), ("imatrix_samples", imatrix_samples)):
        if value is not None and value < (2 if name == "seq_len" else 1):
            raise ValueError(f"{name}={value} must be >= {2 if name == 'seq_len' else 1}")
    models = {}
    for path, name in ((model, label), (dense, dense_label)):
        if path is not None:
            resolved = Path(resolve_model_path(path))
            models.setdefault(name or resolved.name, resolved)
    if dense is not None and len(models) < 2:
        raise ValueError(f"model and dense both have the label {next(iter(models))!r}: pass label= / dense_label=")
    done = pd.DataFrame()
    if out_csv is not None and Path(out_csv).exists():
        # a CSV of another version or tool is refused in one line here, not as a KeyError mid-table, before any dir is made
        done = read_cached_csv(out_csv, COLUMNS, f"delete {str(out_csv)!r} (its rows are measured again) or pass "
                               "another out_csv (CLI: --out)", dtype={"same_file_as": str, "max_segments": str})
        done = done.assign(imatrix=done.imatrix.astype(str) == "True", same_file_as=done.same_file_as.fillna(""))
    tmp = None
    if work_dir is None and out_csv is None:
        tmp = tempfile.TemporaryDirectory(prefix="quant-table-")
        work_dir = tmp.name
    work_dir = Path(work_dir) if work_dir is not None else work_dir_for(out_csv)
    work_dir.mkdir(parents=True, exist_ok=True)
    threads = n_threads or torch.get_num_threads()

    seg = "all" if max_segments is None else str(max_segments)
    rows = []
    try:
        for name, model_dir in models.items():
            m = _Model(name, model_dir, work_dir, seq_len, max_segments, imatrix_samples, progress)
            made = {}  # llama_ftype constant -> (type, imatrix): aliases (q4_k = q4_k_m) make the same file
            ref = None  # the f16 file's PPL: the first row of every model
            for quant, with_imatrix in plan:
                old = _find(done, name, quant, with_imatrix, seq_len, seg)
                const = (LLAMA_CPP_TYPES.get(quant, quant), with_imatrix)
                for alias in (t for t in LLAMA_CPP_TYPES if LLAMA_CPP_TYPES[t] == const[0] and t != quant):
                    if const not in made and (hit := _find(done, name, alias, with_imatrix, seq_len, seg)):
                        made[const] = hit  # measured by an earlier run under its alias
                if old is not None:
                    row = old
                elif const in made:
                    row = {**made[const], "type": quant, "same_file_as": made[const]["type"]}
                else:
                    row = _measure(m, quant, with_imatrix, prompt_tokens, gen_tokens, repeats, threads, keep_files)
                ref = row["ppl"] if quant == "f16" else ref
                row["ppl_ratio"] = row["ppl"] / ref
                made.setdefault(const, row)
                rows.append(row)
                if old is None and out_csv is not None:  # rows of other models or budgets in the file are kept
                    done = pd.concat([done, pd.DataFrame([row])], ignore_index=True)
                    atomic_write_text(out_csv, done.reindex(columns=COLUMNS).to_csv(index=False))
    finally:
        if tmp is not None:
            tmp.cleanup()
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    order = {t: i for i, t in enumerate(dict.fromkeys(t for t, _ in plan))}
    table["_o"] = table.type.map(order)
    table["_m"] = table.model.map({n: i for i, n in enumerate(models)})
    return table.sort_values(["_o", "imatrix", "_m"]).drop(columns=["_o", "_m"]).reset_index(drop=True)


def _find(done: pd.DataFrame, model: str, quant: str, with_imatrix: bool, seq_len: int, max_segments: str) -> dict | None:
    """The row measured before with this model, type, imatrix and PPL budget, if any."""
    if not len(done):
        return None
    hit = done[(done.model.astype(str) == model) & (done.type == quant) & (done.imatrix == with_imatrix)
               & (done.seq_len.astype(int) == seq_len) & (done.max_segments == max_segments)]
    if not len(hit):
        return None
    return hit.iloc[-1].to_dict()


def equal_size(table: pd.DataFrame, pruned: str, dense: str, types: Sequence[str] = ()) -> pd.DataFrame:
    """For each pruned row, the dense row of the nearest file size: which of the two is better at that size.

    Columns: the pruned type, its size and PPL, the dense type nearest in size, its size and PPL, and
    ``winner`` (the lower PPL). ``types`` limits the pruned rows (default: all).
    """
    p = table[table.model == pruned]
    d = table[table.model == dense].reset_index(drop=True)
    if p.empty or d.empty:
        raise ValueError(f"equal_size needs rows of both models: {pruned!r} has {len(p)}, {dense!r} has {len(d)} "
                         f"(models in the table: {', '.join(map(str, table.model.unique()))})")
    rows = []
    for _, r in p.iterrows():
        if types and r.type not in types:
            continue
        near = d.iloc[(d.size_mb - r.size_mb).abs().argmin()]
        rows.append({"pruned_type": r.type + ("+imatrix" if r.imatrix else ""), "pruned_mb": r.size_mb,
                     "pruned_ppl": r.ppl, "dense_type": near.type + ("+imatrix" if near.imatrix else ""),
                     "dense_mb": near.size_mb, "dense_ppl": near.ppl,
                     "winner": "pruned" if r.ppl < near.ppl else "dense"})
    return pd.DataFrame(rows)
