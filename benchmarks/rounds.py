"""Side-by-side timing shared by the benchmarks: two ways of doing one job, in alternating order.

A shared CPU slows down in spells (the other core's job, the turbo clock), so each round runs
both ways, the first way first in even rounds and second in odd ones, and each is reported by its
best round: no way gains from its place in the order.
"""
from __future__ import annotations

import time
from typing import Callable


def alternating(labels: tuple[str, str], rounds: int, run: Callable[[str, int], None]) -> dict[str, float]:
    """Seconds of ``run(label, round)`` for each label, the best of ``rounds`` alternating rounds."""
    seconds: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(rounds):
        for label in labels if r % 2 == 0 else labels[::-1]:
            start = time.perf_counter()
            run(label, r)
            seconds[label].append(time.perf_counter() - start)
    return {label: min(s) for label, s in seconds.items()}
