"""The pruning pipeline, written once: score -> choose -> remove (-> save), for every unit.

``prune_model`` is the chain the CLI (``prune``), the notebooks (``pruned_model``,
``depth_vs_width.depth_pruned``) and ``prune_unit`` all run: check that ``n`` units can go
before any scoring work, score them (``importance.block_importance``, any unit), choose the
``n`` least important (``importance.to_remove``), remove them through the unit
(``units.UNITS``) and record criterion, ratio and scores in ``model.pruning``. The "+" rule's
numbers come from the preset (``plus_rule``), nowhere else. A run dir remembers the model
its pruned dirs came from (``run.json``), so it is never reused with another one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .artifacts import artifact_lock, atomic_write_text, pruned_dir
from .data import calibration_batches
from .errors import CorruptFileError, MismatchError
from .families import family_of, get_blocks
from .importance import block_importance, check_removable, criterion_options, split_criterion, to_remove
from .models import load_model, save_model
from .presets import Preset, get_preset
from .prune import num_blocks_for_ratio
from .pruning_methods import PruningMethod, register_pruning_method
from .units import get_unit
from .width import width_prune

__all__ = ["RUN_MANIFEST", "check_run_model", "plus_rule", "prune_model", "pruned_model", "prune_unit", "depth_prune",
           "method_pruned", "METHODS"]


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


RUN_MANIFEST = "run.json"  # in a run dir: the model every pruned/ entry there was made from


def check_run_model(run_dir: str | os.PathLike, model: str) -> None:
    """Refuse ``run_dir`` when its ``run.json`` says it was made from another model than ``model``.

    Its ``pruned/`` dirs would otherwise load as the pruned ``model`` and every number after
    them would be another model's. A run dir from before ``run.json`` is taken as it is.
    """
    manifest = Path(run_dir) / RUN_MANIFEST
    if not manifest.is_file():
        return
    try:
        made_from = json.loads(manifest.read_text())["model"]
    except (ValueError, KeyError, TypeError):
        raise CorruptFileError(manifest, "is not the run manifest shortened_llm writes (JSON with a 'model')",
                               "delete it if this run dir holds only your runs of one model") from None
    if made_from != str(model):
        raise MismatchError(manifest, f"says this run dir was made from model {made_from!r}, not {str(model)!r}",
                            f"pass model={made_from!r}, or a new run_dir for {str(model)!r}")


def _write_run_model(run_dir: str | os.PathLike, model: str, pruned) -> None:
    """``run.json``: the model name and the dense shapes, written once by the first prune into ``run_dir``."""
    manifest = Path(run_dir) / RUN_MANIFEST
    if not manifest.exists():
        cfg = pruned.config
        atomic_write_text(manifest, json.dumps({"model": str(model), "model_type": cfg.model_type,
                                                "num_blocks": pruned.pruning.original_num_blocks,
                                                "hidden_size": cfg.hidden_size,
                                                "vocab_size": cfg.vocab_size}, indent=1) + "\n")


def pruned_model(model: str = "smollm2-135m", run_dir: str | os.PathLike | None = None, ratio: float = 0.2,
                 preset: str | Preset = "smoke", criterion: str = "ppl"):
    """Train-or-load: ``run_dir/pruned/<criterion>-<ratio>`` if present, else score, prune and save it there.

    A run dir made from another model is refused (``check_run_model``). Two processes asking
    for the same dir at once (notebooks side by side) prune it once: the second waits for the
    first (``artifact_lock``) and loads its result.
    """
    if run_dir is None:
        return _prune_dense(model, ratio, preset, criterion)
    check_run_model(run_dir, model)
    path = pruned_dir(run_dir, criterion, ratio)
    with artifact_lock(path):
        if (path / "config.json").exists():
            return load_model(path)
        pruned, tokenizer = _prune_dense(model, ratio, preset, criterion)
        _write_run_model(run_dir, model, pruned)
        save_model(pruned, tokenizer, path, overwrite=True)
    return pruned, tokenizer


def depth_prune(model: nn.Module, tokenizer, ratio: float, preset: str | Preset = "smoke", criterion: str = "ppl"):
    """The paper's one-shot depth pruning of a loaded model, in place: ``ratio`` of the blocks by ``criterion``,
    scored on the preset's calibration samples, with the preset's "+" rule for a "+" criterion; returns the model."""
    preset = get_preset(preset)
    ids = calibration_batches(tokenizer, preset.calib_samples, preset.calib_seq_len, preset.seed,
                              bos_every=family_of(model).bos_every)
    n = num_blocks_for_ratio(len(get_blocks(model)), ratio)
    prune_model(model, ids, criterion, n, ratio=ratio, **plus_rule(criterion, preset))
    return model


def _prune_dense(model: str, ratio: float, preset: str | Preset, criterion: str):
    dense, tokenizer = load_model(model)
    depth_prune(dense, tokenizer, ratio, preset, criterion)
    return dense, tokenizer


def _width(model: nn.Module, tokenizer=None, ratio: float | None = None, target_params: int | None = None,
           preset=None) -> nn.Module:
    """The registry's width entry: ``width_prune`` takes ``ratio`` as depth's share of block parameters already."""
    return width_prune(model, ratio=ratio, target_params=target_params)


def method_pruned(method: str, model: str, out_dir: str | os.PathLike, preset: str | Preset = "smoke",
                  **size_and_options):
    """Train-or-load for notebooks: ``out_dir`` if it holds a finished model, else ``model`` (a name or dir) loaded,
    pruned by the registered ``method`` (``ratio=`` or ``target_params=``, and the method's options) and saved
    there. Returns ``(model, tokenizer)``; a sheared dir reloads as a plain model (its ``pruning.json`` keeps
    what was kept: ``shear.ShearRecord.from_json``).

    A method that trains (``shear``: its masks learn over fp32 weights) hands back its saved dir reloaded,
    as every later call gets it: the same weights, dtype and config, so the first run measures, and keys in
    the evaluation cache, the very model a re-run loads (the fp32 model cast down kept an fp32 config, and a
    re-run measured it again)."""
    from .pruning_methods import get_pruning_method

    runner = get_pruning_method(method)  # a bad name fails before any load
    out_dir = Path(out_dir)
    with artifact_lock(out_dir):
        if (out_dir / "config.json").exists():
            return load_model(out_dir)
        dense, tokenizer = load_model(model, dtype="float32") if runner.trains else load_model(model)
        pruned = runner(dense, tokenizer, preset=preset, **size_and_options)
        save_model(pruned, tokenizer, out_dir, overwrite=True)
    return load_model(out_dir) if runner.trains else (pruned, tokenizer)


METHODS = tuple(register_pruning_method(m).name for m in (
    PruningMethod("depth", "remove whole blocks by an importance criterion (the paper; criterion=, default ppl)",
                  depth_prune, needs_data=True, takes_target_params=False),
    PruningMethod("width", "thinner blocks: KV groups and MLP channels by magnitude, as many parameters as depth",
                  _width),
))
