"""One registry of pruning methods: the ways this package makes a dense model smaller, called one way.

- ``depth`` (the paper): score whole blocks with a criterion, remove the least important
  (``pipeline.prune_model``, the "+" rule from the preset);
- ``width``: every block thinner by magnitude, KV groups and MLP channels (``width.width_prune``);
- ``shear`` (Sheared-LLaMA): learned masks over layers, KV groups, channels and hidden dims, trained
  for the preset's ``shear_steps``, then cut to the target shape (``shear.shear_model``).

A notebook that sets methods side by side (10) or a command that picks one by name reads this
table, as ``recovery.RECOVERY_METHODS`` is read for retraining. Every method is called as
``method(model, tokenizer, ratio=..., preset=..., **options)`` and returns the model, pruned in
place, with its record in ``model.pruning``. ``ratio`` means the same for all three: the paper's
share of the *blocks* to remove, i.e. width and shear remove as many parameters as depth pruning
at that ratio would (``target_params`` instead gives the count outright, e.g. a depth-pruned
model's, for width and shear).

Like ``recovery``, this module imports no method: ``pipeline`` (depth, width) and ``shear``
register theirs, and a lookup imports them by name (``PROVIDERS``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .registry import Registry

__all__ = ["PruningMethod", "PRUNING_METHODS", "PROVIDERS", "register_pruning_method", "get_pruning_method",
           "pruning_methods"]

PROVIDERS = ("pipeline", "shear")  # the paper's depth first, then width, then shear: the listing order


@dataclass(frozen=True)
class PruningMethod:
    """One pruning method: its name, the function that runs it, and what it costs.

    ``run(model, tokenizer, ratio=None, target_params=None, preset=..., **options)`` prunes in place
    and returns the model.
    """

    name: str
    description: str  # one line, for listings
    run: Callable
    needs_data: bool = False  # reads calibration or training text (depth's data-driven criteria, shear)
    trains: bool = False  # learns something by gradient descent (shear's masks): minutes, not seconds
    takes_target_params: bool = True  # False: only ``ratio`` (depth removes whole blocks)

    def __call__(self, model, tokenizer=None, *, ratio: float | None = None, target_params: int | None = None,
                 preset="smoke", **options):
        if (ratio is None) == (target_params is None):
            raise ValueError(f"pruning method {self.name!r}: give exactly one of ratio={ratio} and "
                             f"target_params={target_params}")
        if target_params is not None and not self.takes_target_params:
            raise ValueError(f"pruning method {self.name!r} removes whole blocks: give ratio=, not target_params=")
        size = {"ratio": ratio} if ratio is not None else {"target_params": target_params}
        return self.run(model, tokenizer, preset=preset, **size, **options)


PRUNING_METHODS: dict[str, PruningMethod] = {}
_REGISTRY = Registry("pruning method", PRUNING_METHODS, __package__, PROVIDERS)


def register_pruning_method(method: PruningMethod) -> PruningMethod:
    """Add ``method`` to the registry; a second method under the same name is refused, not shadowed."""
    return _REGISTRY.register(method)


def get_pruning_method(name: str) -> PruningMethod:
    """The registered method ``name``; an unknown one gets the package's one "did you mean" error."""
    return _REGISTRY.get(name)


def pruning_methods() -> tuple[str, ...]:
    """Registered names, in ``PROVIDERS`` order (each module's in its own)."""
    return tuple(m.name for m in _REGISTRY.listed())
