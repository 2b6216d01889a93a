"""glibc's default allocator vs one that keeps freed memory, for the package's CPU steps (issue 20).

    python benchmarks/bench_malloc.py            # 2 pairs, each pair side by side on two cores
    python benchmarks/bench_malloc.py --pairs 3

Why look: a fresh-clone ``make reproduce`` (AMD EPYC, 2 cores, bf16) spent 467 s of its 4796 s of CPU
in the kernel and took 155 M minor page faults. glibc hands every allocation above its mmap threshold
(at most 32 MB) to a fresh ``mmap`` and returns it on free, so each training step's logits (8 x 128 x
49152 floats, 201 MB) and activations are faulted in page by page, every step. Raising the threshold
and the trim threshold (``GLIBC_TUNABLES``, read when a process starts) lets freed memory be reused.

Each pair runs two child processes at once, one thread each, as ``reproduce`` runs two notebooks:
one with the default allocator, one with ``TUNABLES``; they swap cores' worth of luck by alternating
which starts first. Each child times 4 LoRA steps and 4 forwards on 8 x 128 WikiText-2 tokens of the
embedded model in the package's precision (``bench_dtype``'s step) and reports its minor faults, system
seconds and peak RSS. Ratios are default / tunables.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296"

CHILD = """
import json, resource, sys, time, torch
sys.path.insert(0, {bench!r})
torch.set_num_threads(1)
from bench_dtype import _lora_model, _trainer_step
from shortened_llm import load_model
from shortened_llm.evaluate import ppl_segments
model, tok = load_model({model!r}, dtype="auto", device="cpu")
ids = ppl_segments(tok, "wikitext2", 128, "once", max_segments=8)
step = _trainer_step(_lora_model(model), ids)
def forward():
    with torch.no_grad():
        model(ids, use_cache=False)
step(); forward()  # warm-up: oneDNN picks its kernels
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range({steps}): step()
t1 = time.perf_counter()
for _ in range({steps}): forward()
t2, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({{"lora_step_s": (t1 - t0) / {steps}, "forward_s": (t2 - t1) / {steps},
                  "minor_faults": r1.ru_minflt - r0.ru_minflt, "sys_s": r1.ru_stime - r0.ru_stime,
                  "peak_rss_mb": r1.ru_maxrss / 1024}}))
"""


def _start(code: str, tunables: bool) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables:
        env["GLIBC_TUNABLES"] = TUNABLES
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pairs", type=int, default=2, help="side-by-side runs of the two allocators")
    parser.add_argument("--steps", type=int, default=4, help="timed LoRA steps and forwards per child")
    args = parser.parse_args()

    from bench_dtype import _cpu_model

    print(f"CPU: {_cpu_model()}; {os.cpu_count()} cores; GLIBC_TUNABLES for the second column: {TUNABLES}")
    code = CHILD.format(bench=str(Path(__file__).resolve().parent), model=args.model, steps=args.steps)
    results = {"default": [], "tunables": []}
    for pair in range(args.pairs):
        order = (False, True) if pair % 2 == 0 else (True, False)
        procs = [(t, _start(code, t)) for t in order]
        for tunables, proc in procs:
            out, _ = proc.communicate()
            if proc.returncode:
                raise SystemExit(f"child ({'tunables' if tunables else 'default'}) failed with {proc.returncode}")
            results["tunables" if tunables else "default"].append(json.loads(out.strip().splitlines()[-1]))

    print(f"\n{'median of ' + str(args.pairs) + ' pairs':<22}{'default':>12}{'tunables':>12}{'ratio':>8}")
    for key in ("lora_step_s", "forward_s", "minor_faults", "sys_s", "peak_rss_mb"):
        a, b = (statistics.median(r[key] for r in results[v]) for v in ("default", "tunables"))
        print(f"{key:<22}{a:>12.2f}{b:>12.2f}{a / b if b else float('inf'):>7.2f}x")


if __name__ == "__main__":
    main()
