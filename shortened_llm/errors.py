"""The errors a user can fix: each names the file, what is wrong with it, and the fix, on one line.

They subclass ``ValueError`` (the input is bad, not the program), so the CLI reports them as
``shortened-llm: error: ...`` with exit code 2 and no traceback, and a notebook can catch
exactly the one it expects. Imports nothing from the package: every module may raise them.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Iterable

__all__ = ["ArtifactError", "CorruptFileError", "MismatchError", "ForeignDirError", "DiskFullError", "NonFiniteError", "unknown_name"]


def unknown_name(what: str, name, choices: Iterable[str], available: str | None = None, note: str = "") -> ValueError:
    """``Unknown <what> 'nam'. Did you mean 'name'? Available: a, b, c<note>``: the one error for a name not in a registry.

    ``choices`` are what the close match is looked for in; ``available`` is how they are listed
    when that should read differently (e.g. criteria "each also with '+'"). Returned, not raised,
    so the caller's ``raise`` shows in its own traceback.
    """
    choices = list(choices)
    close = difflib.get_close_matches(str(name), choices, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"Unknown {what} {name!r}.{hint} Available: {available or ', '.join(choices)}{note}")


class ArtifactError(ValueError):
    """A file or directory the package reads or replaces, and why it will not."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str):
        self.path, self.problem, self.fix = Path(path), problem, fix
        # one line whatever the cause's own message holds (JSON and safetensors errors can span lines)
        super().__init__(" ".join(f"{str(path)!r}: {problem}. Fix: {fix}".split()))


class CorruptFileError(ArtifactError):
    """Truncated or unparsable: a kill during a write by another tool, a partial copy or download."""


class MismatchError(ArtifactError):
    """Readable, but it disagrees with another file of the same artifact (pruning.json vs config.json)."""


class ForeignDirError(ArtifactError):
    """An existing directory the package did not write: ``overwrite`` never replaces it."""


class DiskFullError(ArtifactError):
    """The disk (or the quota) filled during a write: nothing was replaced, the previous artifact is intact."""


class NonFiniteError(ValueError):
    """NaN or inf in scores or losses (an fp16/bf16 overflow): never ranked, never trained on."""

    def __init__(self, problem: str, fix: str):
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem}. Fix: {fix}")
