"""Wall time of `make reproduce` under three start orders of ``reproduce.schedule``, side by side.

    python benchmarks/bench_schedule.py                    # the measured smoke times, 2 jobs
    python benchmarks/bench_schedule.py --run-dir runs/smoke --jobs 2

Each notebook is replaced by a sleep of its measured seconds (the executed copies' records in
``--run-dir``, else ``reproduce.MEASURED_SECONDS``) divided by ``--speed``, and the real
``schedule`` runs them under the real ``NEEDS``: lowest-numbered first (no estimates), longest
chain first (the rule before 2026-12-02, ``start_order(search=False)``), and the plan that ends first
on the estimates (``start_order``, what ``schedule`` does now). It prints the three walls in the
notebooks' seconds and their ratios, and the estimate ``reproduce``'s progress display opens with
(``time_left``), which should equal the third. This is a replay of measured durations, not a new measurement: a notebook given fewer
threads or more neighbours runs at another speed, which the replay does not model.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from unittest import mock

from shortened_llm import reproduce
from shortened_llm.reproduce import (NOTEBOOKS_DIR, chain_seconds, estimated_seconds, notebook_paths, schedule,
                                     time_left)


def replay(paths, jobs: int, seconds: dict[str, float], speed: float, order: str) -> float:
    """One replay: ``order`` is "numbered" (no estimates), "chain" (the old rule) or "plan" (today's)."""
    def run_one(path):
        time.sleep(seconds[path.name[:2]] / speed)
        return path

    searched = reproduce.start_order
    rule = (lambda e, n, j: searched(e, n, j, search=False)) if order == "chain" else searched
    t0 = time.perf_counter()
    with mock.patch.object(reproduce, "start_order", rule):
        schedule(paths, jobs, run_one, estimates=None if order == "numbered" else seconds)
    return (time.perf_counter() - t0) * speed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", default="runs/smoke", help="where the executed copies (and their seconds) are")
    p.add_argument("--preset", default="smoke", help="MEASURED_SECONDS' preset for notebooks without a copy")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--speed", type=float, default=200.0, help="replay this many times faster than measured")
    args = p.parse_args(argv)
    paths = notebook_paths(NOTEBOOKS_DIR)
    seconds = {path.name[:2]: estimated_seconds(path, Path(args.run_dir), args.preset) for path in paths}
    missing = [n for n, s in seconds.items() if s is None]
    if missing:
        raise SystemExit(f"no measured seconds for notebooks {missing}: run `make reproduce` first or fill MEASURED_SECONDS")
    print("seconds per notebook:", {n: round(s) for n, s in seconds.items()})
    print("longest chain from each:", {n: round(s) for n, s in chain_seconds(seconds).items()})
    plain, chained, planned = (replay(paths, args.jobs, seconds, args.speed, o) for o in ("numbered", "chain", "plan"))
    bound = max(max(chain_seconds(seconds).values()), sum(seconds.values()) / args.jobs)
    print(f"{args.jobs} jobs: lowest-numbered first {plain / 60:.1f} min, longest chain first {chained / 60:.1f} min, "
          f"the plan that ends first {planned / 60:.1f} min ({plain / planned:.2f}x and {chained / planned:.2f}x "
          f"faster); no order beats {bound / 60:.1f} min (the longest chain, or all the work / jobs)")
    order = reproduce.start_order(seconds, reproduce.NEEDS, args.jobs)
    print("the plan's start order:", " ".join(sorted(seconds, key=order)))
    print(f"the progress display's first estimate (time_left, the plan without sleeping): "
          f"{time_left(seconds, set(), {}, args.jobs) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
