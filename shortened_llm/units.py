"""Pruning units: what one step of pruning removes (a whole block, or the attention / MLP half of one).

Every unit answers the same four questions, so scoring, choosing and removing are written once
for all of them (``importance.block_importance(..., unit=)``, ``pipeline.prune_model``):

- ``alive(model)``: the block positions whose unit is still there;
- ``skipping(model, indices)``: run the model without those units for a while (scoring);
- ``remove(model, indices, criterion=, ratio=, scores=)``: remove them for real and record it;
- ``params(model)``: the parameters one unit holds.

``block`` is backed by ``prune`` (the paper's depth pruning) and registered here; ``attn`` and
``mlp`` are backed by ``subblock``, which registers them when it is imported (the package's
``__init__`` does), as it registers its directory loader with ``models``. A new unit is a
subclass of ``Unit`` passed to ``register_unit``.
"""
from __future__ import annotations

import abc
import contextlib

from torch import nn

from .errors import unknown_name
from .families import count_params, get_blocks
from .prune import remove_blocks, skipping_blocks

__all__ = ["Unit", "BlockUnit", "UNITS", "register_unit", "get_unit"]


class Unit(abc.ABC):
    """The interface every pruning unit implements (see the module docstring)."""

    name: str = ""
    noun: str = ""  # how messages name one: "block", "attn half"
    plural: str = ""  # and several: "blocks", "attn halves"
    # Whether skipping a unit shifts the positions after it (a skipped block is gone from the
    # list; a skipped half leaves its block in place), so greedy re-scoring can map back.
    skip_shifts_positions: bool = False

    def check(self, model: nn.Module) -> None:
        """Raise unless ``model``'s family has this unit (before any work)."""

    @abc.abstractmethod
    def alive(self, model: nn.Module) -> list[int]:
        """Current block positions whose unit is still there."""

    @abc.abstractmethod
    def skipping(self, model: nn.Module, indices) -> contextlib.AbstractContextManager:
        """A context in which ``model`` runs without the units at ``indices``; all restored on exit."""

    @abc.abstractmethod
    def remove(self, model: nn.Module, indices, criterion=None, ratio=None, scores=None) -> nn.Module:
        """Remove the units at ``indices`` in place; ``model.pruning`` records it (original block indices)."""

    @abc.abstractmethod
    def params(self, model: nn.Module) -> int:
        """Parameters one unit holds (the first live one)."""

    def __repr__(self) -> str:
        return f"<unit {self.name!r}>"


class BlockUnit(Unit):
    """A whole Transformer block (paper, Section 3.2): removed blocks are gone, every survivor is alive."""

    name, noun, plural, skip_shifts_positions = "block", "block", "blocks", True

    def alive(self, model):
        return list(range(len(get_blocks(model))))

    def skipping(self, model, indices):
        return skipping_blocks(model, indices)

    def remove(self, model, indices, criterion=None, ratio=None, scores=None):
        return remove_blocks(model, indices, criterion=criterion, ratio=ratio, scores=scores)

    def params(self, model):
        return count_params(get_blocks(model)[0])


UNITS: dict[str, Unit] = {}


def register_unit(unit: Unit) -> Unit:
    """Make ``unit`` available by its name to scoring and the pipeline."""
    UNITS[unit.name] = unit
    return unit


def get_unit(name: str) -> Unit:
    """``UNITS[name]``; an unknown name gets the package's did-you-mean error."""
    if name not in UNITS:
        raise unknown_name("unit", name, sorted(UNITS))
    return UNITS[name]


register_unit(BlockUnit())
