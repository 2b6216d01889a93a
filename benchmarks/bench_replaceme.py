"""Recovery per second: ReplaceMe (no training) beside LoRA and KD, measured in one run.

    python benchmarks/bench_replaceme.py                          # embedded model, 20 %, PPL criterion
    python benchmarks/bench_replaceme.py --calibration 32 64 128 --methods replaceme kd replaceme+kd

One pruned model (``retrain.pruned_model``: the criterion and ratio the notebooks use), then
each recovery from it, timed end to end (ReplaceMe: calibration sampling, the teacher's
activations, the fit and the fold; training: the preset's budget), and WikiText-2 PPL of every
result on the same segments. Prints PPL, its change against plain removal, seconds, and the
share of the lost PPL recovered per minute.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from shortened_llm.evaluate import perplexity
from shortened_llm.llamacpp_guard import cpu_model
from shortened_llm.models import load_model
from shortened_llm.replaceme import DEFAULT_RIDGE, replaceme
from shortened_llm.retrain import lora_retrain, pruned_model

METHODS = ("replaceme", "lora", "kd", "replaceme+lora", "replaceme+kd")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--criterion", default="ppl")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--preset", default="smoke", help="budgets of the pruning and of LoRA / KD")
    p.add_argument("--calibration", type=int, nargs="*", default=[32, 128], help="ReplaceMe calibration samples of 128 tokens")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    p.add_argument("--ridge", type=float, default=DEFAULT_RIDGE, help="ReplaceMe ridge lambda (a share of mean diag(M^T M))")
    p.add_argument("--eval-segments", type=int, default=40)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from shortened_llm.distill import distill

    work = Path(tempfile.mkdtemp(prefix="bench-replaceme-"))
    dense, tokenizer = load_model(args.model)
    pruned, _ = pruned_model(args.model, work, args.ratio, args.preset, args.criterion)

    def ppl(model):
        return perplexity(model, tokenizer, max_segments=args.eval_segments, progress=False)

    rows = [("dense", ppl(dense), 0.0), ("plain removal", ppl(pruned), 0.0)]
    replaced, fit_seconds = {}, {}
    for n in args.calibration:
        start = time.perf_counter()
        result = replaceme(copy.deepcopy(pruned), dense, tokenizer, n_samples=n, ridge=args.ridge, progress=False)
        seconds = time.perf_counter() - start
        replaced[n], fit_seconds[n] = result.model, seconds
        rows.append((f"replaceme ({n} x 128 tokens)", ppl(result.model), seconds))
    largest = replaced[max(replaced)] if replaced else None
    for method in args.methods:
        if method == "replaceme":
            continue
        combo = method.startswith("replaceme+")
        base = largest if combo else pruned
        if base is None:
            continue
        out = work / method.replace("+", "-")
        start = time.perf_counter()
        if method.endswith("lora"):
            result = lora_retrain(copy.deepcopy(base), tokenizer, out, preset=args.preset, progress=False)
        else:
            result = distill(copy.deepcopy(base), dense, tokenizer, out_dir=out, preset=args.preset, progress=False)
        seconds = time.perf_counter() - start + (fit_seconds[max(fit_seconds)] if combo else 0.0)
        rows.append((method, ppl(result.model), seconds))  # a combination counts its ReplaceMe fit too

    dense_ppl, plain_ppl = rows[0][1], rows[1][1]
    print(f"CPU: {cpu_model()}; {torch.get_num_threads()} thread(s); {args.model}, {args.criterion} at "
          f"{args.ratio:.0%} (removed {pruned.pruning.removed_blocks}); WikiText-2 PPL on {args.eval_segments} x 128 tokens; "
          f"training at preset {args.preset!r}")
    print(f"{'method':<28} {'PPL':>8} {'vs plain':>9} {'seconds':>8} {'recovered / min':>16}")
    for name, value, seconds in rows:
        recovered = (plain_ppl - value) / (plain_ppl - dense_ppl) if name not in ("dense", "plain removal") else math.nan
        per_min = recovered / (seconds / 60) if seconds else math.nan
        print(f"{name:<28} {value:8.2f} {100 * (value / plain_ppl - 1):+8.1f}% {seconds:8.1f} {per_min:15.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
