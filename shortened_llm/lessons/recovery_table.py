"""Notebook 09's recovery table: one retraining of one pruned model, trained or loaded, then evaluated.

``recover`` runs one registered recovery method (``recovery.get_recovery``) on a pruned model
dir at an equal budget and ``quick_eval``s the result; ``RECOVERY`` names the table's rows. The
methods themselves live in the core (``retrain``, ``distill``, ``replaceme``); this is how the
lesson compares them.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..artifacts import atomic_write_text
from ..errors import unknown_name
from ..families import count_params
from ..models import load_model
from ..presets import Preset, get_preset
from ..recovery import get_recovery

__all__ = ["RECOVERY", "quick_eval", "recover"]

# The rows of notebook 09's table, in its order: "none" (the pruned model as it is), then registered
# methods ("replaceme+kd": ReplaceMe's training-free map first, then KD from the replaced model).
RECOVERY = ("none", "lora", "partial", "kd", "replaceme", "replaceme+lora", "replaceme+kd")


def quick_eval(model, tokenizer, preset: Preset, cache=None, zero_shot: bool = True) -> dict:
    """WikiText-2 PPL (paper protocol) and the zero-shot average at the preset's limits
    (``zero_shot=False``: PPL alone, the average NaN; notebook 09's ``smoke`` grid).

    The same calls, at the same budgets, as notebook 06's tables (``claims.ppl_table``,
    ``zeroshot.zero_shot_table``): with the evaluation cache on (``cache``, ``eval_cache.resolve``;
    ``None`` = the active one), a model 06 measured already (the dense one, the ``ppl`` and
    ``taylor+`` pruned ones) is read back, not scored again.
    """
    from ..evaluate import perplexity
    from .. import zeroshot

    ppl = perplexity(model, tokenizer, "wikitext2", seq_len=preset.eval_seq_len, max_segments=preset.eval_segments,
                     batch_size=preset.eval_batch_size, progress=False, cache=cache)
    if not zero_shot:
        return {"wikitext2_ppl": ppl, "zero_shot_avg": float("nan")}
    tasks = preset.zero_shot_tasks or None
    table = zeroshot.zero_shot(model, tokenizer, **({"tasks": tasks} if tasks else {}), limit=preset.zero_shot_limit,
                               batch_size=preset.eval_batch_size, progress=False, cache=cache)
    return {"wikitext2_ppl": ppl, "zero_shot_avg": float(table[table.task == "average"].value.iloc[0])}


def recover(pruned, method: str, out_dir: str | os.PathLike, teacher="smollm2-135m", preset: str | Preset = "smoke",
            steps: int | None = None, zero_shot: bool = True, **overrides) -> dict:
    """Train-or-load ``method`` (one of ``RECOVERY``) on a pruned model dir, evaluate it, return one table row.

    ``replaceme`` fits ReplaceMe's linear maps (no training; its own calibration, 256 x 128
    tokens of the books set); ``replaceme+lora`` / ``replaceme+kd`` then train from the replaced
    model, and their seconds are the sum of both stages.

    Equal budget: LoRA, partial and KD take the same optimizer steps (``steps``, default
    ``preset.lora_steps``) of the same global batch and sequence length (the ``cpt_*`` budget is
    set to LoRA's ``lora_batch``/``lora_micro_batch``/``lora_cutoff``). LoRA sees Alpaca
    prompts of at most ``lora_cutoff`` tokens (the paper's recipe), the others packed C4 text.
    The row (method, seconds, peak memory, PPL, zero-shot average) is cached as ``row.json``;
    ``zero_shot=False`` leaves the average NaN (``quick_eval``), and a cached row without one
    is measured again when a later call asks for one (with the evaluation cache on, as in
    notebook 09, its training is read back, not run again).
    """
    if method not in RECOVERY:
        raise unknown_name("recovery method", method, RECOVERY, note=" (notebook 09's rows)")
    preset = get_preset(preset, **overrides)
    out_dir = Path(out_dir)
    cached = out_dir / "row.json"
    if cached.exists():
        row = json.loads(cached.read_text())
        if not zero_shot or not math.isnan(row["zero_shot_avg"]):
            return row
    steps = steps or preset.lora_steps or 1
    # one preset for every stage: LoRA reads only its lora_* fields, partial and KD the cpt_* ones set to LoRA's
    equal = get_preset(preset, cpt_batch=preset.lora_batch, cpt_micro_batch=preset.lora_micro_batch,
                       cpt_block_size=preset.lora_cutoff)
    row = {"method": method, "steps": 0, "seconds": 0.0, "peak_mb": float("nan"), "growth_mb": float("nan")}
    model_dir = out_dir / "model"
    if method == "none":
        model, tokenizer = load_model(pruned)
    else:
        runner = get_recovery(method)
        result = runner(str(pruned), out_dir=model_dir, teacher=teacher, preset=equal, max_steps=steps,
                        progress=False, overwrite=True,
                        **({"stage_dirs": {"replaceme": out_dir / "replaceme"}} if runner.chain else {}))
        model, tokenizer, memory = result.model, result.tokenizer, result.memory  # the training's, if reused
        row.update(steps=result.steps, seconds=round(result.seconds, 2), peak_mb=round(memory["peak_mb"], 1),
                   growth_mb=round(memory["growth_mb"], 1))
        info_path = model_dir / "training.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        if "teacher_weights_mb" in info:  # the student trained beside a teacher: what each weighs
            row.update(teacher_mb=info["teacher_weights_mb"], student_mb=info["student_weights_mb"],
                       trainable_params=info["trainable_params"])
    model.eval()
    row.update(quick_eval(model, tokenizer, preset, zero_shot=zero_shot), params=count_params(model))
    atomic_write_text(cached, json.dumps(row, indent=2) + "\n")
    return row
