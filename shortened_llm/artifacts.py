"""Atomic writes and the layout of one run directory.

Every artifact of a reproduction lives under one ``run_dir`` (DESIGN.md, "Artifacts flow
through one run directory"). Writes go to a temporary sibling first and are renamed into
place, so an interrupted run never leaves half a model or half a CSV behind, and a kill -9
at any point is undone by the next write to the same path (``_recover``).

A directory is replaced only when this package wrote it: ``atomic_dir`` leaves a manifest
(``MANIFEST``, the list of what it wrote) in every directory it publishes, and ``overwrite``
refuses any other directory, or one where a user has added files since.

Two writers of one artifact (two notebooks on one run dir) take ``artifact_lock`` around
their check-compute-write: the second waits, then finds the first one's artifact and reuses it.

Test hook: ``SHORTENED_LLM_FAULT=<point>:<n>`` makes the process SIGKILL itself the ``n``-th time
(1-based) it reaches ``fault_point(<point>)``: ``compute`` (scores computed, nothing written),
``write`` (an artifact fully written to its temp, not yet renamed), ``swap`` (between the two
renames of ``atomic_dir``); in training (``trainer.py``) ``checkpoint`` (one saved) and ``step``
(mid-step); in ``reproduce`` ``executed`` (a notebook's copy whole in its temp) and ``notebook``
(its copy in place, the next not started). ``tests/test_kill.py`` and ``tests/test_reproduce.py``
kill runs there and check the rerun. The variable is inherited: a child process counts its own visits.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import json
import math
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path

import torch

from .errors import CorruptFileError, DiskFullError, ForeignDirError, MismatchError

__all__ = [
    "MANIFEST",
    "FAULT_ENV",
    "artifact_lock",
    "atomic_dir",
    "atomic_file",
    "atomic_write_text",
    "check_replaceable",
    "give_default_mode",
    "scores_csv",
    "pruned_dir",
    "save_scores",
    "load_scores",
    "check_scores_fit",
    "read_cached_csv",
    "fault_point",
]

MANIFEST = ".shortened_llm.json"  # written last into each dir atomic_dir publishes: marks it as ours
# Dirs written before the manifest existed: a model dir with a pruning record or a training record.
LEGACY_MARKERS = (("config.json", "pruning.json"), ("config.json", "training.json"))
_RANDOM = "[a-z0-9_]{8}"  # the random part tempfile puts in a name: nothing a user names a file by chance


# ---- the kill -9 test hook -------------------------------------------------------------------

FAULT_ENV = "SHORTENED_LLM_FAULT"
_reached: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process here when ``$SHORTENED_LLM_FAULT`` is ``name:n`` and this is the ``n``-th visit.

    A test hook only (unset, it costs one dict lookup): it lets a test kill a real CLI run at
    an exact point of a write, which a timer from outside could not hit reproducibly.
    """
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


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


# ---- one writer per artifact ----------------------------------------------------------------

@contextlib.contextmanager
def artifact_lock(path: str | os.PathLike):
    """Hold an exclusive lock on artifact ``path`` (a file or dir, there or not) for the block.

    A second process asking for the same path waits until the first one's block is over, so
    a train-or-load (check, compute, write) runs once and the waiter loads the result. The
    lock lives in ``.NAME.lock`` beside ``path``, removed on release; a lock file whose inode
    changed while waiting was removed by its last holder, so the waiter opens the new one.
    The kernel drops the flock of a killed holder: a kill -9 never leaves the path locked.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield path
    finally:
        lock.unlink(missing_ok=True)  # before the unlock: no one can open this inode afresh after it
        os.close(fd)


# ---- a full disk ------------------------------------------------------------------------------

@contextlib.contextmanager
def _disk_full_named(out: Path):
    """Turn ENOSPC/EDQUOT in the block into ``DiskFullError`` naming ``out``, the free space and the fix.

    By then the temp is being removed and ``out`` was never touched: the message says so, so a
    user does not go looking for a half-written artifact.
    """
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = shutil.disk_usage(out.parent).free / 2**20
        raise DiskFullError(out, f"the disk filled while writing it ({err.strerror}; {free:.0f} MiB free now), so "
                                 "nothing was replaced: the previous one, if any, is intact",
                            f"free space on the disk of {str(out.parent)!r} (or write elsewhere) and run again") from None


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
        with _disk_full_named(out_file):
            yield tmp
        if tmp.exists():
            give_default_mode(tmp)
            fault_point("write")
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
    fault_point("swap")
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
        with _disk_full_named(out_dir):
            yield tmp
            (tmp / MANIFEST).write_text(json.dumps({"written_by": "shortened_llm", "entries": _entries(tmp)}, indent=1) + "\n")
        for path in (tmp, *tmp.rglob("*")):  # safetensors writes its files 0600 too
            give_default_mode(path)
        check_replaceable(out_dir, overwrite)  # the block may have run for hours: look again
        fault_point("write")
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


def load_scores(path: str | os.PathLike, num_blocks: int | None = None) -> torch.Tensor:
    """The scores ``save_scores`` wrote, one per block; ``num_blocks`` (the model's) must match when given.

    A CSV cut short, with other columns, gaps in the blocks or a NaN score raises
    ``CorruptFileError``; one scoring a different number of blocks raises ``MismatchError``:
    ranking either would remove the wrong blocks without a word.
    """
    fix = "score the model again (shortened-llm score ... --out FILE) or pass the CSV made for this model"
    try:
        with open(path, newline="") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise CorruptFileError(path, "is not a text file, so not a scores CSV", fix) from None
    rows = list(csv.DictReader(text.splitlines()))
    if not rows or {"block", "score"} - set(rows[0]):
        got = ",".join(rows[0]) if rows else (text.splitlines() or ["nothing"])[0]
        raise CorruptFileError(path, f"is not a scores CSV: expected columns block,score, found {got[:80]!r}", fix)
    if not text.endswith("\n"):
        raise CorruptFileError(path, "is half-written: its last line has no line end",
                               fix + " (a CSV written by hand: end it with a newline)")
    try:
        pairs = sorted((int(r["block"]), float(r["score"])) for r in rows)
    except (TypeError, ValueError):
        bad = next(r for r in rows if not _number_row(r))
        raise CorruptFileError(path, f"is half-written or edited: row {bad} is not a block number and a score", fix) from None
    if [b for b, _ in pairs] != list(range(len(pairs))):
        raise CorruptFileError(path, f"scores blocks {[b for b, _ in pairs][:12]}, not 0..{len(pairs) - 1} once each", fix)
    bad = [b for b, s in pairs if math.isnan(s) or s == -math.inf]  # +inf marks a unit already removed
    if bad:
        raise CorruptFileError(path, f"holds NaN or -inf scores for blocks {bad}: no ranking can use them",
                               "score again with --dtype float32 (an fp16/bf16 overflow gives NaN)")
    scores = torch.tensor([s for _, s in pairs], dtype=torch.float64)
    if num_blocks is not None:
        check_scores_fit(path, scores, num_blocks)
    return scores


def check_scores_fit(path: str | os.PathLike, scores: torch.Tensor, num_blocks: int) -> None:
    """Refuse scores read from ``path`` that score another number of blocks than the model's ``num_blocks``
    (for a CSV read before the model was loaded: ``prune --scores`` reads it first, so a broken one
    fails before the load)."""
    if len(scores) != num_blocks:
        raise MismatchError(path, f"scores {len(scores)} blocks, but the model has {num_blocks}",
                            "pass the scores CSV made for this model, or score it again")


def _number_row(row: dict) -> bool:
    try:
        int(row["block"]), float(row["score"])
    except (TypeError, ValueError):
        return False
    return True


def read_cached_csv(path: str | os.PathLike, columns, fix: str, **read_csv_options):
    """A CSV of finished rows a resumable job reads back (``pandas.DataFrame``), refused with
    ``CorruptFileError`` when it cannot be parsed or lacks any of ``columns``: a cache from
    another version or another tool would otherwise fail with a ``KeyError`` deep in the job,
    or silently count as no row done."""
    import pandas as pd

    try:
        table = pd.read_csv(path, **read_csv_options)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise CorruptFileError(path, f"is not a readable CSV ({type(err).__name__})", fix) from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise CorruptFileError(path, f"lacks the column(s) {', '.join(missing)} of a finished-rows cache", fix)
    return table
