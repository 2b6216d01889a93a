"""Attention-only, MLP-only and block pruning at equal parameter count: speed and KV cache, side by side.

    python benchmarks/bench_subblock.py                      # embedded model, CPU, 20 %, contexts 128 and 2048
    python benchmarks/bench_subblock.py --ratio 0.35 --rounds 5

The three pruned models remove about the parameters of round(ratio x blocks) blocks, each
unit scored by the PPL criterion on the paper's calibration set (``lessons.unit_comparison.equal_param_models``).
Batch-1 generation after a short and a long prompt is timed for every model, interleaved,
``--rounds`` times; the KV cache is measured after the prompt. Prints median speedups over the
dense model and each model's KV cache relative to dense. Nothing is asserted: the numbers are the
result.
"""
from __future__ import annotations

import argparse
import sys

import pandas as pd
import torch

from shortened_llm.data import calibration_batches
from shortened_llm.models import family_of, load_model, num_blocks
from shortened_llm.presets import get_preset
from shortened_llm.prune import num_blocks_for_ratio
from shortened_llm.lessons.unit_comparison import equal_param_models, relative_to, speed_and_kv


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--contexts", type=int, nargs="*", default=[128, 2048])
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="interleaved passes over all models")
    p.add_argument("--repeats", type=int, default=2, help="timed generations per model and pass")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--out", default=None, help="write the raw measurements CSV here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    P = get_preset("paper")  # calibration: 10 x 128 tokens, seed 1234
    dense, tok = load_model(args.model)
    ids = calibration_batches(tok, P.calib_samples, P.calib_seq_len, P.seed, bos_every=family_of(dense).bos_every)
    k = num_blocks_for_ratio(num_blocks(dense), args.ratio)
    found = equal_param_models(args.model, ids, k, criterion="ppl")
    models = {"dense": dense.eval()}
    for unit in ("block", "attn", "mlp"):
        if found[unit] is None:
            print(f"{unit}: skipped ({found[f'{unit}_why']})")
        else:
            models[unit] = found[unit][0].eval()
            print(f"{unit}: removed {len(found[unit][2])} -> {sum(x.numel() for x in models[unit].parameters()):,} params")

    raw = pd.concat([speed_and_kv(models, contexts=args.contexts, new_tokens=args.new_tokens, repeats=args.repeats,
                                  progress=False).assign(round=r) for r in range(args.rounds)], ignore_index=True)
    if args.out:
        raw.to_csv(args.out, index=False)
    med = raw.groupby(["context", "model"], sort=False).agg(latency_s=("latency_s", "median"),
                                                            kv_cache_mb=("kv_cache_mb", "first")).reset_index()
    med = relative_to(med)
    print(f"\n{args.model}, {args.ratio:.0%} of blocks' parameters, batch 1, {args.new_tokens} new tokens, "
          f"median of {args.rounds} interleaved rounds x {args.repeats} runs, {torch.get_num_threads()} thread(s)")
    print(med.round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
