"""Atomic writes and the layout of one run directory.

Every artifact of a reproduction lives under one ``run_dir`` (DESIGN.md, "Artifacts flow
through one run directory"). Writes go to a temporary sibling first and are renamed into
place, so an interrupted run never leaves half a model or half a CSV behind.

A directory is replaced only when this package wrote it: ``atomic_dir`` leaves a manifest
(``MANIFEST``, the list of what it wrote) in every directory it publishes, and ``overwrite``
refuses any other directory, or one where a user has added files since.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import ForeignDirError

__all__ = [
    "MANIFEST",
    "atomic_dir",
    "atomic_write_text",
    "check_replaceable",
    "scores_csv",
    "pruned_dir",
    "save_scores",
    "load_scores",
]

MANIFEST = ".shortened_llm.json"  # written last into each dir atomic_dir publishes: marks it as ours
# Dirs written before the manifest existed: a model dir with a pruning record or a training record.
LEGACY_MARKERS = (("config.json", "pruning.json"), ("config.json", "training.json"))


# ---- directories ----------------------------------------------------------------------------

def _entries(folder: Path) -> list[str]:
    """Every file and folder under ``folder``, relative, the manifest left out."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != MANIFEST)


def _why_not_ours(path: Path) -> str | None:
    """None when ``path`` is a directory this package wrote (or an empty one); else why it is not."""
    if path.is_symlink():
        return "is a symbolic link"
    if not path.is_dir():
        return "is a file, not a directory"
    entries = _entries(path)
    if not entries:
        return None
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            written = set(json.loads(manifest.read_text())["entries"])
        except (ValueError, KeyError, TypeError):
            return f"has an unreadable {MANIFEST}, so what shortened_llm wrote there is unknown"
        added = [e for e in entries if e not in written]
        if added:
            return f"holds {len(added)} entries shortened_llm did not write ({', '.join(added[:3])})"
        return None
    if any(all((path / m).is_file() for m in markers) for markers in LEGACY_MARKERS):
        return None  # written before the manifest: a saved model with its pruning or training record
    return (f"holds {len(entries)} entries ({', '.join(entries[:3])}) and no {MANIFEST}: "
            "shortened_llm did not write it")


def check_replaceable(out_dir: str | os.PathLike, overwrite: bool,
                      flag: str = "overwrite=True (CLI: --overwrite)") -> None:
    """Refuse ``out_dir`` before any work when a write there would have to replace it and may not.

    A directory this package did not write is refused whatever ``overwrite`` says; one it
    wrote needs ``overwrite`` (``flag`` names how the caller passes it).
    """
    out_dir = Path(out_dir)
    if not os.path.lexists(out_dir):
        return
    why = _why_not_ours(out_dir)
    if why:
        raise ForeignDirError(out_dir, f"{why}, so it is never replaced, whatever {flag} says",
                              "give a new or empty directory as the output (or move the files named here out of it)")
    if not overwrite:
        raise FileExistsError(f"output dir {str(out_dir)!r} already exists: pass {flag} to replace it")


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory that becomes ``out_dir`` only if the block succeeds.

    An existing ``out_dir`` is replaced only with ``overwrite`` and only when this package
    wrote it (``check_replaceable``, checked before the block and again before the swap).
    The published dir holds ``MANIFEST``.
    """
    out_dir = Path(out_dir)
    check_replaceable(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        (tmp / MANIFEST).write_text(json.dumps({"written_by": "shortened_llm", "entries": _entries(tmp)}, indent=1) + "\n")
        check_replaceable(out_dir, overwrite)  # the block may have run for hours: look again
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
