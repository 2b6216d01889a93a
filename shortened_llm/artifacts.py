"""Atomic writes and the layout of one run directory.

Every artifact of a reproduction lives under one ``run_dir`` (DESIGN.md, "Artifacts flow
through one run directory"). Writes go to a temporary sibling first and are renamed into
place, so an interrupted run never leaves half a model or half a CSV behind, and a kill -9
at any point is undone by the next write to the same path (``_recover``).

A directory is replaced only when this package wrote it: ``atomic_dir`` leaves a manifest
(``MANIFEST``, the list of what it wrote) in every directory it publishes, and ``overwrite``
refuses any other directory, or one where a user has added files since.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import ForeignDirError

__all__ = [
    "MANIFEST",
    "atomic_dir",
    "atomic_file",
    "atomic_write_text",
    "check_replaceable",
    "give_default_mode",
    "scores_csv",
    "pruned_dir",
    "save_scores",
    "load_scores",
]

MANIFEST = ".shortened_llm.json"  # written last into each dir atomic_dir publishes: marks it as ours
# Dirs written before the manifest existed: a model dir with a pruning record or a training record.
LEGACY_MARKERS = (("config.json", "pruning.json"), ("config.json", "training.json"))
_RANDOM = "[a-z0-9_]{8}"  # the random part tempfile puts in a name: nothing a user names a file by chance


# ---- the user's file modes ------------------------------------------------------------------

def give_default_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the mode ``open``/``mkdir`` would have under the user's umask.

    ``mkstemp``/``mkdtemp`` create private entries (0600/0700) so that no one reads half a
    write; a finished artifact must be readable by whoever the user shares files with.
    """
    umask = os.umask(0)  # the only portable way to read it
    os.umask(umask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask)


# ---- leftovers of a killed writer -----------------------------------------------------------

def _lock(fd: int) -> None:
    """Hold ``fd``'s flock while this writer lives; the kernel drops it on any exit, kill -9 included."""
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _in_use(path: Path) -> bool:
    """True while a live writer holds ``path`` (its temp file or dir); False once that writer died."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _leftovers(out: Path, pattern: str) -> list[Path]:
    """Siblings of ``out`` named ``.<out.name><pattern>``: what a writer of ``out`` leaves while it works."""
    name = re.compile(rf"\.{re.escape(out.name)}(?:{pattern})")
    return sorted(p for p in out.parent.iterdir() if name.fullmatch(p.name))


def _partner(path: Path, kind: str) -> Path:
    """``.NAME.tmp-<id>`` <-> ``.NAME.old-<id>``: a writer's temp dir and its backup of the old dir."""
    return path.with_name(f"{path.name[:-13]}.{kind}-{path.name[-8:]}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _recover(out: Path) -> None:
    """Undo a killed write to ``out``: put back an old dir the swap had moved away, remove dead temps.

    A writer cut between its two renames (``_swap_in``) left ``.NAME.old-<id>`` and no ``out``:
    the old artifact comes back, as if the killed run had never started. Temps of live
    writers (their flock held) are left alone; every other temp file or dir is a dead writer's.
    """
    if not out.parent.is_dir():
        return
    for backup in _leftovers(out, rf"\.old-{_RANDOM}"):
        if _in_use(_partner(backup, "tmp")) or _why_not_ours(backup):
            continue  # its writer is mid-swap, or it is not a backup of ours
        if os.path.lexists(out):
            _remove(backup)  # the swap had finished: only its clean-up was cut
        else:
            os.rename(backup, out)
    for temp in _leftovers(out, rf"\.tmp-{_RANDOM}|\.{_RANDOM}\.tmp"):
        if not _in_use(temp):
            _remove(temp)


# ---- files ----------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_file(out_file: str | os.PathLike):
    """Yield a temp path beside ``out_file`` that replaces it only when the block succeeds.

    The block writes to the path (from this process or a child); a block that removes it
    replaces nothing. The result gets the user's umask, like any other file.
    """
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    _recover(out_file)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_file.name}.", suffix=".tmp", dir=out_file.parent)
    _lock(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():
            give_default_mode(tmp)
            os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file and ``os.replace`` (atomic on POSIX)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


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
    wrote needs ``overwrite`` (``flag`` names how the caller passes it). A write to
    ``out_dir`` that was killed is undone first, so the answer is about the last finished one.
    """
    out_dir = Path(out_dir)
    _recover(out_dir)
    if not os.path.lexists(out_dir):
        return
    why = _why_not_ours(out_dir)
    if why:
        raise ForeignDirError(out_dir, f"{why}, so it is never replaced, whatever {flag} says",
                              "give a new or empty directory as the output (or move the files named here out of it)")
    if not overwrite:
        raise FileExistsError(f"output dir {str(out_dir)!r} already exists: pass {flag} to replace it")


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``, moving an old ``out_dir`` aside first and deleting it after.

    Between the two renames neither is at ``out_dir``: an error there puts the old one back
    at once, and a kill is undone by ``_recover`` at the next write (the backup is named
    after ``tmp``, whose flock tells whether its writer still lives).
    """
    if not os.path.lexists(out_dir):
        os.rename(tmp, out_dir)
        return
    backup = _partner(tmp, "old")
    os.rename(out_dir, backup)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(backup, out_dir)
        raise
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory that becomes ``out_dir`` only if the block succeeds.

    An existing ``out_dir`` is replaced only with ``overwrite`` and only when this package
    wrote it (``check_replaceable``, checked before the block and again before the swap).
    The published dir holds ``MANIFEST`` and has the user's umask.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable(out_dir, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    fd = os.open(tmp, os.O_RDONLY)
    _lock(fd)  # a _recover running between mkdtemp and here would take tmp for a dead writer's: microseconds
    try:
        yield tmp
        (tmp / MANIFEST).write_text(json.dumps({"written_by": "shortened_llm", "entries": _entries(tmp)}, indent=1) + "\n")
        for path in (tmp, *tmp.rglob("*")):  # safetensors writes its files 0600 too
            give_default_mode(path)
        check_replaceable(out_dir, overwrite)  # the block may have run for hours: look again
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)


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
