"""Every notebook runs end to end under papermill at preset ``tiny``, into a temp run_dir.

The notebooks run in two chains (``conftest.LESSON_CHAINS``), each in order in one shared run dir,
as in a real reproduction: later notebooks reuse what earlier ones saved, and each must also work
alone (its train-or-load cells compute what is missing; 08-10 do, in a chain of their own).
"""
import json
import os
import re
from pathlib import Path

import pytest

from conftest import in_lesson_chain
from shortened_llm.reproduce import NOTEBOOKS_DIR, notebook_paths, run_notebook

NOTEBOOKS = notebook_paths(NOTEBOOKS_DIR)
# Notebooks too slow at preset tiny for the suite's budget on a 2-core CPU: run by `make test-all`
HEAVY: set[str] = set()
# Under `pytest -n N --dist loadgroup` the notebooks of one chain land on the same worker, in order,
# so they share its run_dir as a real reproduction does; the other tests fill the other workers.
RUNS = [in_lesson_chain(p, *([pytest.mark.heavy] if p.stem in HEAVY else [])) for p in NOTEBOOKS]


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3, "the lessons live in notebooks/NN_*.ipynb"


@pytest.mark.notebook
@pytest.mark.parametrize("path", RUNS)
def test_notebook_runs_at_tiny(path, lesson_run_dir):
    run_dir = lesson_run_dir(path)
    out = run_notebook(path, run_dir / "notebooks", {"model": "smollm2-135m", "preset": "tiny", "run_dir": str(run_dir)})
    nb = json.loads(Path(out).read_text())
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors[0]
    assert any(run_dir.joinpath("figures").glob(f"{path.name[:2]}_*.png")), "each lesson saves at least one figure"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_clean_and_shaped_like_a_lesson(path):
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "strip outputs before committing"
    params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "exactly one cell tagged 'parameters'"
    names = {line.split("=")[0].strip() for line in "".join(params[0]["source"]).splitlines() if "=" in line}
    assert names == {"model", "preset", "run_dir"}
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    assert text.lstrip().startswith(f"# {path.name[:2]} ·"), "title '# NN · Title'"
    assert "## Summary" in text and "## Exercises" in text


@pytest.mark.parametrize("path", NOTEBOOKS + notebook_paths(Path(__file__).resolve().parents[1] / "solutions"),
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_no_lesson_branches_on_the_presets_name(path):
    """What differs between presets is a preset field (``Preset``, or notebook 09's ``grids.RecoveryGrid``)
    named for what it sets; ``if P.name == "tiny"`` in a cell would hide it from ``get_preset(..., field=...)``."""
    code = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    branches = [line.strip() for cell in code for line in cell.splitlines() if re.search(r"\b(P|cfg)\.name\s*[!=]=", line)]
    assert not branches, f"{path.name} branches on the preset's name: {branches}"


def _run_cells(tmp_path, parameters: dict, parameters_cell: str, code: str) -> list:
    """Run a two-cell notebook (a parameters cell, then ``code``) through ``run_notebook``; the outputs of ``code``."""
    import nbformat

    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"},
                                            "language_info": {"name": "python"}})
    nb.cells = [nbformat.v4.new_code_cell(parameters_cell, metadata={"tags": ["parameters"]}), nbformat.v4.new_code_cell(code)]
    path = tmp_path / "cells.ipynb"
    nbformat.write(nb, path)
    return nbformat.read(run_notebook(path, tmp_path / "out", parameters), as_version=4).cells[-1].outputs


def test_papermill_kernels_talk_over_unix_sockets(tmp_path):
    """No TCP port to race for when two pytest workers (or a JupyterLab) start kernels at once."""
    out = _run_cells(tmp_path, {"x": 2}, "x = 1", "from ipykernel.kernelapp import IPKernelApp\n"
                                                  "print(IPKernelApp.instance().transport, x)")
    assert out[0]["text"].split() == ["ipc", "2"]


def test_recorded_notebooks_hold_no_frozen_progress_bars(tmp_path, monkeypatch):
    """A bar saved mid-run reads "0%" forever on the course site: transformers' loading and saving
    bars are off in papermill kernels, and only there."""
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    outputs = _run_cells(tmp_path, {}, "", "from transformers.utils.logging import is_progress_bar_enabled, tqdm\n"
                                           "print(sum(tqdm(range(3), desc='Loading weights')), is_progress_bar_enabled())")
    assert [o.get("name") for o in outputs] == ["stdout"], outputs  # no stderr bar, no widget
    assert outputs[0]["text"].split() == ["3", "False"]
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ  # the test process itself keeps its bars


def test_notebook_07s_widgets_answer_the_button_and_the_slider(tiny_llama, monkeypatch, capsys, tmp_path):
    """The widgets notebook 07 shows (``explore.generation_widget`` and ``explore.ratio_widget``): nothing
    runs until the button is pressed or the slider moves, then each shows its table."""
    import pandas as pd

    from conftest import make_char_tokenizer
    from shortened_llm.lessons import depth_vs_width
    from shortened_llm.lessons.explore import generation_widget, ratio_widget

    tok = make_char_tokenizer()
    box = generation_widget({"dense": tiny_llama}, tok, "ab", max_new_tokens=3)
    (prompt, go), _ = box.children[0].children, box.children[1]
    assert (prompt.description, prompt.value, go.description) == ("prompt", "ab", "generate")
    assert "dense" not in capsys.readouterr().out  # nothing generated before the press
    prompt.value = "hello"
    go.click()
    shown = capsys.readouterr().out
    assert "dense" in shown and "tokens_per_s" in shown

    asked = []
    monkeypatch.setattr(depth_vs_width, "explore_ratio", lambda *a: asked.append(a) or pd.DataFrame(
        [{"method": m, "params": 1, "blocks": 2, "latency_b1_s": 0.1, "wikitext2_ppl": 9.0} for m in ("depth", "width")]))
    slider = ratio_widget("smollm2-135m", tmp_path, "tiny", ratio=0.2).children[0]
    assert (slider.description, slider.min, slider.max, slider.value, asked) == ("ratio", 0.1, 0.5, 0.2, [])
    slider.value = 0.3
    assert asked == [("smollm2-135m", 0.3, tmp_path, "tiny")] and "width" in capsys.readouterr().out
