"""How much of the perplexity that 20 % pruning loses does LoRA win back at a budget?

Notebook 06's claim "LoRA recovers" needs a share (``lessons.claims.LORA_RECOVERY_SHARE``: 25 %)
of the WikiText-2 PPL lost; this sweeps ``lora_lr`` at the preset's steps on the ``ppl`` model
of a run dir (``make reproduce`` writes ``runs/smoke/pruned/ppl-0.20``) and prints one row per
rate, the machine beside it. ``--jobs 2`` runs two rates at a time, one thread each.
``results/dtype/lora_budget_smoke_smollm2-135m.csv`` holds the rows measured so far.

    python benchmarks/bench_lora_budget.py --run-dir runs/smoke --lrs 1e-3 3e-3 6e-3 1e-2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def one_rate(run_dir: str, model: str, preset: str, lr: float, steps: int | None, work: str) -> dict:
    """Train LoRA at ``lr`` on the run's ppl-0.20 model; the PPL before and after and the share recovered."""
    from shortened_llm import load_model, perplexity
    from shortened_llm.lessons.claims import recovered_share
    from shortened_llm.presets import get_preset
    from shortened_llm.retrain import pruned_model, retrain_or_load

    P = get_preset(preset, lora_lr=lr, lora_steps=steps)
    ppl = lambda m, tok: perplexity(m, tok, "wikitext2", P.eval_seq_len, max_segments=P.eval_segments, progress=False)
    dense, tok = load_model(model)
    ppl_dense = ppl(dense, tok)
    del dense
    pruned, tok = pruned_model(model, Path(run_dir), ratio=0.2, preset=P, criterion="ppl")
    before = ppl(pruned, tok)
    start = time.perf_counter()
    tuned, tok, log, _ = retrain_or_load("lora", pruned, tok, Path(work) / f"lora-lr{lr:g}", preset=P, progress=False)
    seconds = time.perf_counter() - start
    val = log.dropna(subset=["eval_loss"]).eval_loss.tolist()
    after = ppl(tuned, tok)
    return {"lora_steps": P.lora_steps, "lora_lr": lr, "train_s": round(seconds, 1), "dense_ppl": round(ppl_dense, 2),
            "pruned_ppl": round(before, 2), "wikitext2_ppl": round(after, 2),
            "share_of_lost_ppl_recovered": round(recovered_share(before, after, ppl_dense), 3),
            "alpaca_val_loss_before": round(val[0], 3), "alpaca_val_loss_after": round(val[-1], 3)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="runs/smoke")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 6e-3, 1e-2])
    ap.add_argument("--steps", type=int, default=None, help="LoRA steps (default: the preset's lora_steps)")
    ap.add_argument("--jobs", type=int, default=2, help="rates trained at a time, one thread each")
    ap.add_argument("--one", type=float, default=None, help=argparse.SUPPRESS)  # a child: one rate, JSON out
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one_rate(args.run_dir, args.model, args.preset, args.one, args.steps, args.work)))
        return
    from shortened_llm.llamacpp_guard import cpu_model
    from shortened_llm.precision import choose_dtype

    work = tempfile.mkdtemp(prefix="lora_budget_")

    def child(lr: float) -> dict:  # a process per rate: each gets its own thread and its own torch state
        cmd = [sys.executable, __file__, "--one", str(lr), "--work", work, "--run-dir", args.run_dir,
               "--model", args.model, "--preset", args.preset] + (["--steps", str(args.steps)] if args.steps else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return json.loads(out.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(child, args.lrs))
    choice = choose_dtype(preset=args.preset, announce=False)
    print(f"# {cpu_model()}, 1 thread per run, {args.jobs} at a time; {choice.reason}; preset {args.preset}")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
