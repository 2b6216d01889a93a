"""Worked solutions: one ``solutions/NN_*.ipynb`` per notebook with exercises, each runs at preset tiny.

Like the notebooks, every solution takes ``model``, ``preset`` and ``run_dir`` as papermill
parameters, is committed without outputs, and must run without an error cell. A notebook
whose ``## Exercises`` has no worked solution fails here, and so does a solution that
answers fewer exercises than its notebook asks.
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from conftest import in_lesson_chain
from shortened_llm.reproduce import notebook_paths, run_notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SOLUTIONS = ROOT / "solutions"
SOLUTION_PATHS = notebook_paths(SOLUTIONS) if SOLUTIONS.is_dir() else []
EXERCISE_HEADING = re.compile(r"^#{2,3}\s*Exercise\s+(\d+)", re.M)


def _markdown(path: Path) -> list[str]:
    return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown"]


def _exercise_count(notebook: Path) -> int:
    """Top-level numbered items in the notebook's ``## Exercises`` section (0 when it has none)."""
    cells = _markdown(notebook)
    for i, text in enumerate(cells):
        if re.search(r"^##\s+Exercises\b", text, re.M):
            section = text.split("## Exercises", 1)[1]
            section = re.split(r"^##\s", section, maxsplit=1, flags=re.M)[0]
            if not re.search(r"^\d+\.\s", section, re.M) and i + 1 < len(cells):
                section = cells[i + 1]  # the list may sit in the next markdown cell
            return len(re.findall(r"^\d+\.\s", section, re.M))
    return 0


def test_every_notebook_with_exercises_has_a_solution():
    missing = [nb.name for nb in notebook_paths(NOTEBOOKS) if _exercise_count(nb) and not (SOLUTIONS / nb.name).exists()]
    assert not missing, f"no worked solution in solutions/ for: {missing}"


@pytest.mark.parametrize("path", SOLUTION_PATHS, ids=lambda p: p.stem)
def test_solution_answers_every_exercise_and_is_clean(path):
    nb = nbformat.read(path, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, f"{path.name}: needs exactly one cell tagged 'parameters', found {len(params)}"
    assert {"model", "preset", "run_dir"} <= set(re.findall(r"^(\w+)\s*=", params[0].source, re.M)), params[0].source
    with_outputs = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not with_outputs, f"{path.name}: commit it without outputs (cells {with_outputs})"
    source = NOTEBOOKS / path.name
    assert source.exists(), f"{path.name} solves no notebook: notebooks/{path.name} does not exist"
    answered = {int(n) for text in _markdown(path) for n in EXERCISE_HEADING.findall(text)}
    asked = _exercise_count(source)
    assert asked and answered >= set(range(1, asked + 1)), \
        f"{path.name}: notebook asks exercises 1..{asked}, the solution answers {sorted(answered)}"


# Solutions whose exercises train or quantise several models: 100-350 s each at preset tiny on
# one core, beyond the suite's budget; `make test-all` runs them (measured 2026-11-30).
HEAVY = {"04_lora_retraining", "05_continued_pretraining", "08_export_gguf", "09_beyond_the_paper", "10_sheared_vs_depth"}
# Each runs after its chain's notebooks (test_notebooks.py, collected first), in their run dir, as a
# learner opens a solution after its lesson; alone (this file only) it computes everything itself.
RUNS = [in_lesson_chain(p, *([pytest.mark.heavy] if p.stem in HEAVY else [])) for p in SOLUTION_PATHS]


@pytest.mark.notebook
@pytest.mark.parametrize("path", RUNS)
def test_solution_runs_at_preset_tiny(path, tmp_path, lesson_run_dir):
    out = run_notebook(path, tmp_path / "executed", {"preset": "tiny", "run_dir": str(lesson_run_dir(path))})
    errors = [o for c in nbformat.read(out, as_version=4).cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"
