"""Sheared-LLaMA's learned structured pruning on the embedded model: PPL, size against target, wall time.

    python benchmarks/bench_shear.py                         # 20 % fewer parameters, smoke's 25 mask steps, CPU
    python benchmarks/bench_shear.py --steps 80 --compare-depth

Shears SmolLM2-135M to ``--ratio`` fewer parameters (``shear.shape_for_ratio``: hidden and MLP
sizes shrink together) with ``--steps`` steps of mask learning on the pack's C4 rows, batches of
``--batch`` blocks of the smoke preset's 128 tokens (``shear_*`` fields: every flag left out is
the smoke preset's value), then cuts the model to the masks. Prints
WikiText-2 PPL (``evaluate.perplexity``, the smoke preset's segments) of the dense and the sheared
model, the parameter count against the target (the issue asks for 2 %), and the seconds of each
step. ``--compare-depth`` adds a depth-pruned model of about the same size (data-free magnitude
criterion, whole blocks) after CPT for the same number of steps and blocks per step, i.e. equal
training tokens. The model's weights are frozen while the masks learn at smoke
(``shear_weights_lr=0``, the paper trains them at 1e-4): on two CPU cores the weights' backward and
Adam would double each step. Nothing is asserted: the numbers are the result, whatever they say.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time

import torch

from shortened_llm.evaluate import perplexity
from shortened_llm.families import count_params
from shortened_llm.models import load_model
from shortened_llm.presets import get_preset
from shortened_llm.shear import shape_for_ratio, shape_params, shear_model


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratio", type=float, default=0.2, help="share of the parameters to remove")
    p.add_argument("--steps", type=int, default=None, help="default: smoke's shear_steps (25 fit 10 minutes on 2 "
                   "shared CPU cores)")
    p.add_argument("--batch", type=int, default=None, help="blocks per step (default: smoke's shear_batch)")
    p.add_argument("--mask-lr", type=float, default=None, help="paper: 1.0 over 3,200 steps")
    p.add_argument("--lambda-lr", type=float, default=None, help="paper: 1.0 over 3,200 steps; 5 left the hidden "
                   "masks 7 %% above target after 40 steps")
    p.add_argument("--weights-lr", type=float, default=None, help="paper: 1e-4")
    p.add_argument("--droprate-init", type=float, default=None, help="paper: 0.5 (a short run cannot recover from it)")
    p.add_argument("--compare-depth", action="store_true", help="also depth-prune + CPT at equal steps and tokens")
    args = p.parse_args(argv)

    preset = get_preset("smoke", shear_steps=args.steps, shear_batch=args.batch, shear_mask_lr=args.mask_lr,
                        shear_lambda_lr=args.lambda_lr, shear_weights_lr=args.weights_lr,
                        shear_droprate_init=args.droprate_init)
    args.steps, args.batch = preset.shear_steps, preset.shear_batch
    # depth + CPT sees the same tokens: the shearing batches, of the same block size
    preset = get_preset(preset, cpt_batch=args.batch, cpt_micro_batch=args.batch, cpt_block_size=preset.shear_block_size)
    print(f"CPU: {_cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads; preset smoke "
          f"(eval_segments={preset.eval_segments}, seq_len={preset.eval_seq_len}; blocks of {preset.cpt_block_size} "
          f"tokens, {args.batch} per step)", flush=True)
    model, tok = load_model(args.model, dtype="float32")
    dense = count_params(model)
    ppl = {"dense": perplexity(model, tok, "wikitext2", preset.eval_seq_len, max_segments=preset.eval_segments,
                               progress=False)}
    shape = shape_for_ratio(model.config, args.ratio)
    target_params = (1 - args.ratio) * dense
    print(f"dense: {dense:,} parameters, WikiText-2 PPL {ppl['dense']:.2f}; target shape {shape} "
          f"({shape_params(model.config, shape):,} parameters)", flush=True)

    t0 = time.perf_counter()
    try:
        result = shear_model(model, tok, shape, preset=preset, data="c4")
    except ValueError as err:  # the masks did not reach the target: that is the result
        print(f"shear failed after {time.perf_counter() - t0:.0f} s: {err}")
        return 1
    sheared = count_params(result.model)
    ppl["sheared"] = perplexity(result.model, tok, "wikitext2", preset.eval_seq_len,
                                max_segments=preset.eval_segments, progress=False)
    row = {"steps": args.steps, "tokens": args.steps * args.batch * preset.cpt_block_size,
           "params_dense": dense, "params_sheared": sheared, "params_target": round(target_params),
           "gap_vs_target": round(sheared / target_params - 1, 4), "ppl_dense": round(ppl["dense"], 2),
           "ppl_sheared": round(ppl["sheared"], 2), "train_seconds": round(result.seconds, 1),
           "seconds_per_step": round(result.seconds / args.steps, 2),
           "kept_layers": len(result.record.kept_blocks), "expected_at_end": {k: round(v, 1) for k, v in
                                                                            result.record.expected_at_end.items()},
           "first_lm_loss": round(result.log[0]["lm_loss"], 3), "last_lm_loss": round(result.log[-1]["lm_loss"], 3)}

    if args.compare_depth:
        from shortened_llm.pipeline import prune_model
        from shortened_llm.retrain import continued_pretrain

        depth, _ = load_model(args.model, dtype="float32")
        per_block = (dense - count_params(depth.model.embed_tokens)) / depth.config.num_hidden_layers
        n = round((dense - target_params) / per_block)
        depth, removed, _ = prune_model(depth, None, "magnitude", n, keep_first=preset.keep_first,
                                        keep_last=preset.keep_last)  # the paper's "+" rule for a data-free score
        row["params_depth"] = count_params(depth)
        row["ppl_depth_no_training"] = round(perplexity(depth, tok, "wikitext2", preset.eval_seq_len,
                                                        max_segments=preset.eval_segments, progress=False), 2)
        with tempfile.TemporaryDirectory() as tmp:
            cpt = continued_pretrain(depth, tok, out_dir=f"{tmp}/cpt", preset=preset, data="c4",
                                     max_steps=args.steps, progress=False)
            trained, _ = load_model(cpt.out_dir, dtype="float32")
            row["ppl_depth_cpt"] = round(perplexity(trained, tok, "wikitext2", preset.eval_seq_len,
                                                    max_segments=preset.eval_segments, progress=False), 2)
        row["depth_removed_blocks"] = removed
        row["depth_cpt_seconds"] = round(cpt.seconds, 1)
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
