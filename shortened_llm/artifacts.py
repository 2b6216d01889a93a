"""Atomic writes and the layout of one run directory.

Every artifact of a reproduction lives under one ``run_dir`` (DESIGN.md, "Artifacts flow
through one run directory"). Writes go to a temporary sibling first and are renamed into
place, so an interrupted run never leaves half a model or half a CSV behind.
"""
from __future__ import annotations

import contextlib
import csv
import os
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = [
    "atomic_dir",
    "atomic_write_text",
    "scores_csv",
    "pruned_dir",
    "save_scores",
    "load_scores",
]


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory that becomes ``out_dir`` only if the block succeeds."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output dir {str(out_dir)!r} already exists: pass overwrite=True (CLI: --overwrite) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        trash = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(trash)
        tmp.rename(out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out_dir)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file and ``os.replace`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def scores_csv(run_dir: str | os.PathLike, criterion: str) -> Path:
    """``runs/<run>/scores/<criterion>.csv``; "+" variants share their base criterion's scores."""
    return Path(run_dir) / "scores" / f"{criterion.rstrip('+')}.csv"


def pruned_dir(run_dir: str | os.PathLike, criterion: str, ratio: float) -> Path:
    """``runs/<run>/pruned/<criterion>-<ratio>/``, e.g. ``pruned/taylor+-0.20``."""
    return Path(run_dir) / "pruned" / f"{criterion}-{ratio:.2f}"


def save_scores(path: str | os.PathLike, scores: torch.Tensor) -> Path:
    """CSV with columns ``block,score`` (the CLI's ``score --out`` format)."""
    lines = ["block,score"] + [f"{i},{float(s)!r}" for i, s in enumerate(scores.tolist())]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def load_scores(path: str | os.PathLike) -> torch.Tensor:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or {"block", "score"} - set(rows[0]):
        raise ValueError(f"{str(path)!r} is not a scores CSV: expected columns block,score")
    rows.sort(key=lambda r: int(r["block"]))
    return torch.tensor([float(r["score"]) for r in rows], dtype=torch.float64)
