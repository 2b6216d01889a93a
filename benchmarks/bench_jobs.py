"""`make reproduce` with each ``--jobs`` value, one after the other, each into a fresh run dir.

    python benchmarks/bench_jobs.py                          # smoke, --jobs 2 then 1, runs/bench_jobs<N>
    python benchmarks/bench_jobs.py --jobs 1 2 --only 06 07 08

``reproduce --jobs N`` runs N notebooks side by side, the cores split between their kernels
(``OMP_NUM_THREADS``); ``--jobs 1`` runs them one after another, each kernel on every core. Which
is faster depends on how well torch's threads scale on this CPU for this model, which no replay
(``bench_schedule.py``) can say: this runs the real thing. Each run gets a run dir of its own, so
neither reads the other's evaluations or trainings; both share what lives outside a run dir (the
venv, the tokenised corpora), warm for both after the first. It prints each run's wall, CPU time
(user + system of the run and all its kernels) and per-notebook seconds, and the walls' ratio.
A run takes about half an hour at smoke on 2 cores: start it and leave the machine alone.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from shortened_llm.cli import COUNT
from shortened_llm.llamacpp_guard import cpu_model
from shortened_llm.reproduce import _read_record

REPO = Path(__file__).resolve().parents[1]


def notebook_seconds(run_dir: Path) -> dict[str, float]:
    """Seconds of each executed copy in ``run_dir``, from the record ``reproduce`` stamps on it."""
    seconds = {}
    for nb in sorted((run_dir / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        took = _read_record(nb).get("seconds")
        if isinstance(took, (int, float)) and not nb.name.endswith(".failed.ipynb"):
            seconds[nb.name[:2]] = float(took)
    return seconds


def one_run(jobs: int, run_dir: Path, preset: str, model: str, only: list[str] | None) -> dict:
    """One ``reproduce`` in a child process: wall, the children's CPU seconds, each notebook's seconds."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "shortened_llm", "reproduce", "--preset", preset, "--model", model,
           "--jobs", str(jobs), "--run-dir", str(run_dir)] + (["--only", *only] if only else [])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"jobs": jobs, "wall_s": wall, "cpu_s": cpu, "notebooks": notebook_seconds(run_dir)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=COUNT, nargs="+", default=[2, 1], help="the --jobs values, run in this order")
    p.add_argument("--preset", default="smoke")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--only", nargs="*", default=None, help="notebook prefixes (all by default)")
    p.add_argument("--runs-dir", type=Path, default=REPO / "runs", help="run dirs go here, as bench_jobs<N>")
    args = p.parse_args(argv)
    print(f"# {cpu_model()}, {os.cpu_count()} cores, preset {args.preset}, model {args.model}")
    results = [one_run(j, args.runs_dir / f"bench_jobs{j}", args.preset, args.model, args.only) for j in args.jobs]
    print(f"{'jobs':>4} {'wall min':>9} {'CPU min':>8}  per notebook (s)")
    for r in results:
        per = " ".join(f"{n} {s:.0f}" for n, s in sorted(r["notebooks"].items()))
        print(f"{r['jobs']:>4} {r['wall_s'] / 60:>9.1f} {r['cpu_s'] / 60:>8.1f}  {per}")
    base = results[0]
    for r in results[1:]:
        print(f"--jobs {r['jobs']} over --jobs {base['jobs']}: wall {base['wall_s'] / r['wall_s']:.2f}x as fast, "
              f"CPU time {r['cpu_s'] / base['cpu_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
