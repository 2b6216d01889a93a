"""The pruning pipeline, written once: score -> choose -> remove (-> save), for every unit.

``prune_model`` is the chain the CLI (``prune``), the notebooks (``pruned_model``,
``depth_vs_width.depth_pruned``) and ``prune_unit`` all run: check that ``n`` units can go
before any scoring work, score them (``importance.block_importance``, any unit), choose the
``n`` least important (``importance.to_remove``), remove them through the unit
(``units.UNITS``) and record criterion, ratio and scores in ``model.pruning``. The "+" rule's
numbers come from the preset (``plus_rule``), nowhere else.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .artifacts import pruned_dir
from .data import calibration_batches
from .families import family_of, get_blocks
from .importance import block_importance, check_removable, criterion_options, split_criterion, to_remove
from .models import load_model, save_model
from .presets import Preset, get_preset
from .prune import num_blocks_for_ratio
from .units import get_unit

__all__ = ["plus_rule", "prune_model", "pruned_model", "prune_unit"]


def plus_rule(criterion: str, preset: str | Preset | None = None) -> dict:
    """``keep_first`` / ``keep_last`` for ``criterion``: the preset's for a "+" criterion, zeros otherwise.

    ``preset=None`` reads the ``Preset`` defaults (the official code's 4 and 2).
    """
    _, plus = split_criterion(criterion)
    if not plus:
        return {"keep_first": 0, "keep_last": 0}
    preset = Preset() if preset is None else get_preset(preset)
    return {"keep_first": preset.keep_first, "keep_last": preset.keep_last}


def prune_model(model: nn.Module, input_ids: torch.Tensor | None, criterion: str, n: int, *, unit: str = "block",
                keep_first: int = 0, keep_last: int = 0, ratio: float | None = None,
                scores: torch.Tensor | None = None, **options):
    """Remove the ``n`` least important ``unit``s of ``model`` in place: ``(model, removed, scores)``.

    ``removed`` are current positions, ``scores`` one per block (given, e.g. loaded from a CSV,
    or computed by ``criterion`` with ``options``; criteria that depend on ``n``, such as
    ``sleb``, get it). ``model.pruning`` records ``criterion``, ``ratio`` and the scores.
    """
    units = get_unit(unit)
    split_criterion(criterion)  # a bad name fails before any work
    units.check(model)
    alive = units.alive(model)
    if n >= len(alive):
        raise ValueError(f"n={n} {units.plural} to remove would leave no {unit} among the {len(alive)} live ones: "
                         f"use at most {len(alive) - 1}")
    check_removable(len(get_blocks(model)), n, keep_first, keep_last)
    if scores is None:
        scores = block_importance(model, input_ids, criterion, unit=unit,
                                  **{**criterion_options(criterion, n), **options})
    removed = to_remove(scores, n, keep_first=keep_first, keep_last=keep_last)
    units.remove(model, removed, criterion=criterion, ratio=ratio, scores=scores)
    return model, removed, scores


def prune_unit(model, input_ids, unit: str, n: int, criterion: str = "ppl", keep_first: int = 0,
               keep_last: int = 0, ratio: float | None = None, **options):
    """Compatibility name (notebook 09, its solutions): ``prune_model`` in the old argument order, ``(model, removed)``."""
    return prune_model(model, input_ids, criterion, n, unit=unit, keep_first=keep_first, keep_last=keep_last,
                       ratio=ratio, **options)[:2]


def pruned_model(model: str = "smollm2-135m", run_dir: str | os.PathLike | None = None, ratio: float = 0.2,
                 preset: str | Preset = "smoke", criterion: str = "ppl"):
    """Train-or-load: ``run_dir/pruned/<criterion>-<ratio>`` if present, else score, prune and save it there."""
    path = pruned_dir(run_dir, criterion, ratio) if run_dir is not None else None
    if path is not None and (path / "config.json").exists():
        return load_model(path)
    preset = get_preset(preset)
    dense, tokenizer = load_model(model)
    ids = calibration_batches(tokenizer, preset.calib_samples, preset.calib_seq_len, preset.seed,
                              bos_every=family_of(dense).bos_every)
    n = num_blocks_for_ratio(len(get_blocks(dense)), ratio)
    prune_model(dense, ids, criterion, n, ratio=ratio, **plus_rule(criterion, preset))
    if path is not None:
        save_model(dense, tokenizer, path, overwrite=True)
    return dense, tokenizer
