"""Where a run's notebook time went, cell by cell, from the executed copies ``reproduce`` keeps (issue 20).

    python benchmarks/cell_times.py runs/smoke              # every notebook, its 3 slowest cells
    python benchmarks/cell_times.py runs/smoke --top 8 --only 09 10

``reproduce`` ends with where the run's time went by kind of work (training, zero-shot, PPL,
...; ``EvalCache.seconds_by_kind``); this splits each notebook's time by cell instead, from the
``duration`` papermill stamps on every cell it runs. Which cell of which notebook costs what is
what a budget decision needs ("09's grid or 10's CPT?"), and what a teacher needs to know before
running a lesson live. A cell is named by its first line of code. Nothing is run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def cell_seconds(notebook: Path) -> list[tuple[int, float, str]]:
    """``(index, seconds, first line)`` of every code cell papermill timed in an executed notebook."""
    cells = json.loads(notebook.read_text())["cells"]
    timed = []
    for i, cell in enumerate(cells):
        seconds = cell.get("metadata", {}).get("papermill", {}).get("duration")
        if cell["cell_type"] == "code" and seconds is not None:
            lines = [line.strip() for line in "".join(cell["source"]).splitlines() if line.strip()]
            timed.append((i, float(seconds), lines[0] if lines else ""))
    return timed


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a run dir that reproduce wrote (its notebooks/ holds the executed copies)")
    p.add_argument("--top", type=int, default=3, help="slowest cells shown per notebook")
    p.add_argument("--only", nargs="*", default=None, help="notebook numbers (01 ... 10); all by default")
    args = p.parse_args(argv)
    notebooks = sorted((args.run_dir / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    notebooks = [nb for nb in notebooks if not nb.name.endswith(".failed.ipynb")
                 and (args.only is None or nb.name[:2] in args.only)]
    if not notebooks:
        raise SystemExit(f"no executed notebooks under {args.run_dir / 'notebooks'}: run `shortened-llm reproduce` first")
    grand = 0.0
    for nb in notebooks:
        timed = cell_seconds(nb)
        total = sum(s for _, s, _ in timed)
        grand += total
        print(f"{nb.name}: {total:.0f} s in {len(timed)} cells")
        for i, seconds, line in sorted(timed, key=lambda t: -t[1])[:args.top]:
            print(f"  cell {i:>2}  {seconds:6.0f} s  {seconds / max(total, 1e-9):4.0%}  {line[:90]}")
    print(f"all: {grand / 60:.1f} min of cell time in {len(notebooks)} notebooks (kernel start-up not included)")


if __name__ == "__main__":
    main()
