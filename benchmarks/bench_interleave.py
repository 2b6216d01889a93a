"""A generation sweep with each model's calls in a row vs one call per model in turn, beside a busy neighbour (issue 20).

    python benchmarks/bench_interleave.py                    # 2 pairs, neighbour busy 20 s / idle 20 s
    python benchmarks/bench_interleave.py --pairs 3 --busy 10 --idle 10

Why: in ``make reproduce`` notebook 07 times dense, depth- and width-pruned models on one core
while another notebook works on the other, in spells (training, then evaluation, then waiting).
With a model's five calls in a row (``repeats=5``, the official order), a spell can fall on one
model's calls alone: a fresh-clone run measured dense's batch-1 calls at 2.84-2.93 s, slower
than its batch 4, and depth 1.67x faster than dense (the ideal is 30 / 24 blocks = 1.25x). The
CPU presets now give every call a round of its own (``timing_interleave``: ``rounds=5,
repeats=1``), which spreads each model's calls over the whole sweep.

Here a neighbour process on the other core alternates ``--busy`` seconds of work (bf16 matrix
products and 256 MiB copies) with ``--idle`` seconds of sleep, and the embedded model's sweep at
batch 1 and 4 (the smoke protocol otherwise) runs in both orders, alternating which goes first.
Per sweep it prints the batch-1 speed-ups over dense (median of the five calls) against the
ideal, and depth's lead over width; per order, how far those move from sweep to sweep.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

import torch

from shortened_llm.efficiency import generation_protocol, speedup_table, sweep_generation
from shortened_llm.lessons.depth_vs_width import pruned_trio
from shortened_llm.llamacpp_guard import cpu_model
from shortened_llm.models import num_blocks
from shortened_llm.presets import get_preset

NEIGHBOUR = """
import time, torch
torch.set_num_threads(1)
a, w = torch.randn(256, 1024, dtype=torch.bfloat16), torch.randn(1024, 1024, dtype=torch.bfloat16)
src, dst = torch.ones(64 * 2**20), torch.empty(64 * 2**20)
while True:
    end = time.perf_counter() + {busy}
    while time.perf_counter() < end:
        a @ w
        dst.copy_(src)
    time.sleep({idle})
"""


def sweep(models, preset, interleave: bool):
    """One sweep in the order ``generation_protocol`` gives a preset with or without ``timing_interleave``."""
    table = sweep_generation(models, progress=False, **generation_protocol(get_preset(preset, timing_interleave=interleave)))
    b1 = speedup_table(table).query("batch_size == 1").set_index("model")
    return b1.speedup_median["depth"], b1.speedup_median["width"], b1.latency_s["dense"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--run-dir", default=None, help="a run dir whose block scores the depth-pruned model reuses")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--busy", type=float, default=20.0, help="seconds the neighbour works in each spell")
    p.add_argument("--idle", type=float, default=20.0, help="seconds the neighbour sleeps between spells")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    preset = get_preset("smoke", batch_sizes=(1, 4))
    models, _, source = pruned_trio(args.model, preset.ratio, args.run_dir)
    ideal = num_blocks(models["dense"]) / num_blocks(models["depth"])
    print(f"{args.model} (depth: {source}), 1 thread, {cpu_model()}; batch 1 and 4, {preset.new_tokens[0]} new "
          f"tokens, {preset.repeats} calls a point; neighbour busy {args.busy:g} s / idle {args.idle:g} s; "
          f"ideal depth speed-up {ideal:.3f}x")
    neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR.format(busy=args.busy, idle=args.idle)])
    results = {"in a row": [], "interleaved": []}
    try:
        for pair in range(args.pairs):
            orders = ("in a row", "interleaved") if pair % 2 == 0 else ("interleaved", "in a row")
            for order in orders:
                depth, width, dense_s = sweep(models, preset, interleave=order == "interleaved")
                results[order].append((depth, width))
                print(f"pair {pair + 1}, {order:>11}: batch 1, dense {dense_s * 1000:.0f} ms; depth {depth:.3f}x "
                      f"({depth / ideal:.0%} of ideal), width {width:.3f}x, depth / width {depth / width:.3f}", flush=True)
    finally:
        neighbour.kill()
    for order, rows in results.items():
        depth = [d for d, _ in rows]
        lead = [d / w for d, w in rows]
        print(f"{order:>11}: depth speed-up {min(depth):.3f}-{max(depth):.3f}x (median {statistics.median(depth):.3f}, "
              f"ideal {ideal:.3f}); depth / width {min(lead):.3f}-{max(lead):.3f}")


if __name__ == "__main__":
    main()
