"""The paper's claims, checked on this run's models (the "claims table" of notebook 06).

Each claim of Kim et al. 2024 becomes one row: what the paper says, whether it held here,
and the numbers behind it, read from the run directory (``runs/<run>/eval/*.csv``,
``efficiency/*.csv``) and from the committed zero-shot table under ``results/``. A claim
whose runs are missing says so instead of guessing.

It also holds the one place that finds or builds the run's models
(``load_or_prune``), so the notebook and the background zero-shot job prune the same way.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

__all__ = ["load_or_prune", "run_model_dirs", "Claim", "CLAIMS", "claims_table"]


# ---- the run's models -----------------------------------------------------------------------

def load_or_prune(run_dir, criterion: str, ratio: float | None = None, model: str = "smollm2-135m",
                  preset="smoke", device=None):
    """``(model, tokenizer)`` pruned by ``criterion`` at ``ratio``: loaded from
    ``run_dir/pruned/<criterion>-<ratio>`` when there, else scored, pruned and saved there.

    Calibration follows the preset (paper and smoke: 10 samples x 128 tokens, seed 1234);
    a "+" criterion protects the preset's first/last blocks.
    """
    from .artifacts import pruned_dir
    from .data import calibration_batches
    from .importance import block_importance, blocks_to_remove, split_criterion
    from .models import family_of, load_model, num_blocks, save_model
    from .presets import get_preset
    from .prune import num_blocks_for_ratio, remove_blocks

    preset = get_preset(preset)
    ratio = preset.ratio if ratio is None else ratio
    _, plus = split_criterion(criterion)  # unknown criterion: fail before any work
    out = pruned_dir(run_dir, criterion, ratio)
    if (out / "config.json").exists():
        return load_model(out, device=device)
    net, tokenizer = load_model(model, device=device)
    calib = calibration_batches(tokenizer, n_samples=preset.calib_samples, seq_len=preset.calib_seq_len,
                                seed=preset.seed, bos_every=family_of(net).bos_every)
    scores = block_importance(net, calib, criterion)
    keep = {"keep_first": preset.keep_first, "keep_last": preset.keep_last} if plus else {}
    removed = blocks_to_remove(scores, num_blocks_for_ratio(num_blocks(net), ratio), **keep)
    remove_blocks(net, removed, criterion=criterion, ratio=ratio, scores=scores)
    try:
        save_model(net, tokenizer, out)
    except FileExistsError:  # another process saved the same pruning meanwhile: use theirs
        return load_model(out, device=device)
    return net, tokenizer


def run_model_dirs(run_dir) -> dict[str, Path]:
    """Label -> model dir for every pruned and retrained model saved under ``run_dir``."""
    run_dir = Path(run_dir)
    found = {}
    for kind in ("pruned", "retrained"):
        for d in sorted((run_dir / kind).glob("*")):
            if (d / "config.json").exists():
                found[f"{kind}/{d.name}"] = d
    return found
