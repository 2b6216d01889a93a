"""Speedups of depth and width pruning over the dense model, measured side by side in one run.

    python benchmarks/bench_generation.py                       # embedded model, CPU, smoke preset
    python benchmarks/bench_generation.py --arch llama-1-7b     # random-weight 7B shape (GPU)

Dense, 20 %-depth-pruned and width-pruned (same parameter count) models are timed
interleaved (dense, depth, width, dense, ...) for ``--rounds`` rounds, at batch 1 and the
preset's largest batch, with forced output length. Prints the minimum and median speedups
and checks the paper's claims: depth reaches >= 0.9 x the ideal blocks-before/blocks-after
at batch 1, and width is slower than depth there.
"""
from __future__ import annotations

import argparse
import sys

import pandas as pd
import torch

from shortened_llm.architectures import architecture_only_model
from shortened_llm.lessons.depth_vs_width import pruned_trio
from shortened_llm.efficiency import memory_table, speedup_table, sweep_generation
from shortened_llm.models import num_blocks
from shortened_llm.presets import get_preset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--arch", default=None, help="architecture-only shape instead (llama-1-7b, vicuna-13b, llama-3-8b)")
    p.add_argument("--dtype", default="float16", help="dtype of --arch models")
    p.add_argument("--preset", default="smoke")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--batch-sizes", type=int, nargs="*", default=None, help="default: 1 and the preset's largest")
    p.add_argument("--new-tokens", type=int, nargs="*", default=None, help="default: the preset's first output length")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="write the raw sweep CSV here")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    batch_sizes = args.batch_sizes or sorted({1, max(preset.batch_sizes)})
    new_tokens = args.new_tokens or [preset.new_tokens[0]]
    if args.arch:
        models = {m: architecture_only_model(args.arch, args.dtype, args.device, prune=None if m == "dense" else m,
                                             ratio=args.ratio) for m in ("dense", "depth", "width")}
        label = f"{args.arch} (random weights, {args.dtype})"
    else:
        models, _, source = pruned_trio(args.model, args.ratio, device=args.device or "cpu")
        label = f"{args.model} (depth: {source})"
    device = next(models["dense"].parameters()).device
    ideal = num_blocks(models["dense"]) / num_blocks(models["depth"])
    print(f"{label} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"threads={torch.get_num_threads()}, batch {batch_sizes}, {new_tokens} new tokens, "
          f"prompt {preset.prompt_len}, {args.rounds} rounds x {args.repeats or preset.repeats} repeats")
    # --out is rewritten after every run, so a sweep cut short keeps what it measured
    df = sweep_generation(models, batch_sizes, new_tokens, preset.prompt_len, warmup=1,
                          repeats=args.repeats or preset.repeats, rounds=args.rounds, csv_path=args.out,
                          tags={"shape": args.arch or args.model, "dtype": str(models["dense"].dtype).removeprefix("torch.")})
    sp = speedup_table(df)
    pd.set_option("display.width", 200)
    cols = ["model", "new_tokens", "batch_size", "params", "latency_s", "latency_min_s", "tokens_per_s",
            "speedup_min", "speedup_median", "decode_speedup_median"]
    print(sp[[c for c in cols if c in sp]].to_string(index=False, float_format="%.4g"))
    print(memory_table(df)[["model", "new_tokens", "batch_size", "weights_mb", "peak_mem_mb", "peak_growth_mb", "status"]]
          .to_string(index=False, float_format="%.1f"))

    b1 = sp[(sp.batch_size == 1) & (sp.new_tokens == new_tokens[0])].set_index("model")
    if {"depth", "width"} <= set(b1.index):
        depth_sp, width_sp = b1.loc["depth", "speedup_median"], b1.loc["width", "speedup_median"]
        print(f"{new_tokens[0]} new tokens: ideal depth speedup {ideal:.3f} (blocks {num_blocks(models['dense'])} -> {num_blocks(models['depth'])})")
        print(f"batch 1: depth {depth_sp:.3f}x (min {b1.loc['depth', 'speedup_min']:.3f}x, decode "
              f"{b1.loc['depth', 'decode_speedup_median']:.3f}x) = {depth_sp / ideal:.2f} of ideal "
              f"[goal >= 0.90: {'PASS' if depth_sp >= 0.9 * ideal else 'FAIL'}]")
        print(f"batch 1: width {width_sp:.3f}x (min {b1.loc['width', 'speedup_min']:.3f}x); width slower than depth: "
              f"{'PASS' if width_sp < depth_sp else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
