"""Depth vs width at equal size: build the pair, let both generate, and explore the ratio.

What notebook 07's widgets and the generation benchmark share. The depth-pruned model
comes from the run directory when notebook 03 saved one (``pruned/ppl-<ratio>``); else
from saved PPL scores (``scores/ppl.csv``); else from the cheap, data-free ``magnitude+``
criterion. The width-pruned model is then cut to the depth-pruned model's parameter count
(``width.width_prune(target_params=...)``), so any speed difference comes from the shape.
"""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import pandas as pd
import torch

from ..artifacts import atomic_write_text, load_scores, pruned_dir, scores_csv
from ..models import count_params, load_model, num_blocks
from ..pipeline import plus_rule, prune_model
from ..presets import get_preset
from ..prune import num_blocks_for_ratio
from ..width import width_prune

__all__ = ["depth_pruned", "pruned_trio", "generate_side_by_side", "explore_ratio", "EXPLORER_CSV"]

EXPLORER_CSV = "efficiency/explorer.csv"  # under run_dir: one row per (ratio, method)


def depth_pruned(dense, tokenizer, ratio: float, run_dir: str | os.PathLike | None = None) -> tuple[object, str]:
    """``(depth-pruned model, where its blocks came from)``; ``dense`` is left untouched."""
    if run_dir is not None and (pruned_dir(run_dir, "ppl", ratio) / "config.json").exists():
        model, _ = load_model(pruned_dir(run_dir, "ppl", ratio), device=next(dense.parameters()).device)
        return model, f"loaded {pruned_dir(run_dir, 'ppl', ratio)}"
    n = num_blocks_for_ratio(num_blocks(dense), ratio)
    if run_dir is not None and scores_csv(run_dir, "ppl").exists():
        scores, criterion = load_scores(scores_csv(run_dir, "ppl"), num_blocks=num_blocks(dense)), "ppl"
    else:  # the cheap, data-free fallback
        scores, criterion = None, "magnitude+"
    model, removed, _ = prune_model(copy.deepcopy(dense), None, criterion, n, ratio=ratio, scores=scores,
                                    **plus_rule(criterion))
    return model, f"{criterion} scores, removed blocks {removed}"


def pruned_trio(model_name: str, ratio: float = 0.2, run_dir: str | os.PathLike | None = None,
                device: str | torch.device | None = "cpu"):
    """``({"dense", "depth", "width"} models, tokenizer, depth source)`` at equal depth/width size."""
    dense, tokenizer = load_model(model_name, device=device)
    depth, source = depth_pruned(dense, tokenizer, ratio, run_dir)
    width = width_prune(copy.deepcopy(dense), target_params=count_params(depth))
    return {"dense": dense, "depth": depth, "width": width}, tokenizer, source


@torch.inference_mode()
def generate_side_by_side(models: dict, tokenizer, prompt: str, max_new_tokens: int = 32) -> pd.DataFrame:
    """Greedy continuations of one prompt by every model, with wall time and tokens/s."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be > 0")
    rows = []
    for name, model in models.items():
        enc = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
        t0 = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        seconds = time.perf_counter() - t0
        new = out[0, enc.input_ids.shape[1]:]
        rows.append({"model": name, "params": count_params(model), "blocks": num_blocks(model), "seconds": seconds,
                     "tokens_per_s": len(new) / seconds, "text": tokenizer.decode(new, skip_special_tokens=True)})
    return pd.DataFrame(rows)


def explore_ratio(model_name: str, ratio: float, run_dir: str | os.PathLike, preset="smoke",
                  device: str | torch.device | None = "cpu", trio: tuple | None = None) -> pd.DataFrame:
    """Params, batch-1 latency and WikiText-2 PPL of depth and width pruning at ``ratio``.

    Results are cached in ``run_dir/efficiency/explorer.csv``, so a value seen once answers
    at once (a slider moved back and forth recomputes nothing). ``trio``: the output of
    ``pruned_trio`` for this very ratio, to skip building the models again.
    """
    from ..efficiency import measure_generation
    from ..evaluate import perplexity

    ratio = round(float(ratio), 4)
    path = Path(run_dir) / EXPLORER_CSV
    cached = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=["model", "ratio"])
    hit = cached[(cached.model == model_name) & (cached.ratio.round(4) == ratio)]
    if len(hit):
        return hit.reset_index(drop=True)
    p = get_preset(preset)
    models, tokenizer, source = trio or pruned_trio(model_name, ratio, run_dir, device)
    built_for = getattr(getattr(models["depth"], "pruning", None), "ratio", None)
    if built_for is not None and abs(built_for - ratio) > 1e-9:
        raise ValueError(f"trio was built for ratio={models['depth'].pruning.ratio}, not ratio={ratio}")
    rows = []
    for method in ("depth", "width"):
        m = models[method]
        t = measure_generation(m, 1, p.prompt_len, p.new_tokens[0], warmup=1, repeats=p.repeats, prefill=False)
        ppl = perplexity(m, tokenizer, "wikitext2", seq_len=p.eval_seq_len, max_segments=p.eval_segments,
                         batch_size=p.eval_batch_size, progress=False)
        rows.append({"model": model_name, "ratio": ratio, "method": method, "params": count_params(m),
                     "blocks": num_blocks(m), "latency_b1_s": t["latency_s"], "new_tokens": p.new_tokens[0],
                     "wikitext2_ppl": ppl, "preset": p.name, "depth_source": source})
    new = pd.DataFrame(rows)
    atomic_write_text(path, pd.concat([cached, new], ignore_index=True).to_csv(index=False))
    return new
