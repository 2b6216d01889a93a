"""A table of named variants that the modules implementing them fill: recovery and pruning methods.

Such a table sits below its entries' modules (they import it to register), so it cannot import
them at the top; a lookup imports the modules it names as providers first, so a name resolves
whichever module the caller happened to import. What differs between tables (what an entry holds,
what else ``register`` checks) stays with each table; what is the same is here.
"""
from __future__ import annotations

import importlib

from .errors import unknown_name

__all__ = ["Registry"]


class Registry:
    """``entries`` (a dict the owning module exports) filled by ``register``, with providers loaded on lookup.

    ``kind`` names an entry in errors ("recovery method"); ``providers`` are module names under
    ``package``, in listing order; an entry's ``name`` is its key and its ``run`` tells its module;
    ``check(entry)`` raises for an entry the table refuses.
    """

    def __init__(self, kind: str, entries: dict, package: str, providers: tuple[str, ...], check=None):
        self.kind, self.entries, self.package, self.providers, self.check = kind, entries, package, providers, check

    def register(self, entry):
        """Add ``entry``; a second entry under the same name is refused, not shadowed, then ``check``
        (the table's own rule) may refuse it."""
        if entry.name in self.entries and self.entries[entry.name] != entry:
            raise ValueError(f"{self.kind} {entry.name!r} is registered already: pick another name")
        if self.check is not None:
            self.check(entry)
        self.entries[entry.name] = entry
        return entry

    def load_providers(self) -> None:
        """Import every provider module (a no-op once they are loaded): each registers its entries."""
        for module in self.providers:
            importlib.import_module(f"{self.package}.{module}")

    def get(self, name: str):
        """The registered entry ``name``; an unknown one gets the package's one "did you mean" error."""
        self.load_providers()
        if name not in self.entries:
            raise unknown_name(self.kind, name, tuple(e.name for e in self.listed()))
        return self.entries[name]

    def position(self, entry) -> int:
        """Where ``entry``'s module comes in ``providers`` (after them all when it is none of them)."""
        run = getattr(entry, "run", None)
        module = run.__module__.rsplit(".", 1)[-1] if run is not None else None
        return self.providers.index(module) if module in self.providers else len(self.providers)

    def listed(self) -> list:
        """Every entry, grouped by provider (entries of no provider, e.g. composites, last), each
        module's in its own order."""
        self.load_providers()
        return sorted(self.entries.values(), key=self.position)  # stable: keeps registration order
