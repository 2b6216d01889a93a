"""Taylor scoring memory: peak memory over the weights, by batch size and gradient checkpointing.

    python benchmarks/bench_taylor_memory.py                  # embedded model, 10 x 128 calibration
    python benchmarks/bench_taylor_memory.py --threads 1 --settings 10:0 1:0 10:1 1:1

Each setting (``batch:checkpointing``) runs in its own fresh process, so one setting's
freed pages cannot hide the next one's growth. On CPU the peak is the resident set sampled
every 10 ms, minus the level after loading the model and the calibration ids; on a GPU it is
``torch.cuda.max_memory_allocated`` minus what was allocated before scoring. Every setting
must give the same scores (gradients accumulate over batches into one ``.grad`` per weight),
so the script also prints the largest relative difference to the first setting.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

MB = 2**20


def _one(model_name: str, samples: int, seq_len: int, batch: int, checkpointing: bool, device: str) -> dict:
    import time

    import torch

    from shortened_llm import block_importance, calibration_batches, load_model
    from shortened_llm.efficiency import rss_bytes, Sampler, weights_mb
    from shortened_llm.models import get_blocks

    model, tok = load_model(model_name, device=device)
    ids = calibration_batches(tok, n_samples=samples, seq_len=seq_len, seed=1234)
    block_mb = sum(p.numel() * p.element_size() for b in get_blocks(model) for p in b.parameters()) / MB
    cuda = device != "cpu"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = rss_bytes()
    t0 = time.perf_counter()
    with Sampler(rss_bytes) as rss:
        scores = block_importance(model, ids, criterion="taylor", batch_size=batch,
                                  gradient_checkpointing=checkpointing, progress=False)
    seconds = time.perf_counter() - t0
    growth = (torch.cuda.max_memory_allocated() - base) / MB if cuda else (max(rss.values) - base_rss) / MB
    return {"batch": batch, "checkpointing": checkpointing, "weights_mb": round(weights_mb(model), 1),
            "block_weights_mb": round(block_mb, 1), "peak_growth_mb": round(growth, 1),
            "seconds": round(seconds, 1), "scores": scores.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=10, help="calibration samples (paper: 10)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sample (paper: 128)")
    parser.add_argument("--settings", nargs="+", default=["10:0", "1:0", "10:1", "1:1"],
                        help="batch:checkpointing pairs, each run in a fresh process")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the model goes there whole)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one setting, print JSON
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.one:
        batch, ckpt = (int(x) for x in args.one.split(":"))
        print(json.dumps(_one(args.model, args.samples, args.seq_len, batch, bool(ckpt), args.device)))
        return

    rows = []
    for setting in args.settings:
        cmd = [sys.executable, __file__, "--one", setting, "--model", args.model, "--samples", str(args.samples),
               "--seq-len", str(args.seq_len), "--device", args.device]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    first = rows[0]["scores"]
    print(f"model={args.model} calibration={args.samples}x{args.seq_len} device={args.device} "
          f"weights={rows[0]['weights_mb']} MB (blocks {rows[0]['block_weights_mb']} MB = one gradient per block weight)")
    print(f"{'batch':>5} {'ckpt':>5} {'peak growth MB':>15} {'x weights':>10} {'seconds':>8} {'max rel diff':>13}")
    for r in rows:
        rel = max(abs(a - b) / abs(b) for a, b in zip(r["scores"], first))
        print(f"{r['batch']:>5} {str(r['checkpointing']):>5} {r['peak_growth_mb']:>15.1f} "
              f"{r['peak_growth_mb'] / r['weights_mb']:>10.2f} {r['seconds']:>8.1f} {rel:>13.2e}")


if __name__ == "__main__":
    main()
