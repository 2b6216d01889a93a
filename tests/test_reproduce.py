"""reproduce: notebooks side by side, each after the ones whose artifacts it reuses, the cores split."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import nbformat
import pytest

from shortened_llm.reproduce import NEEDS, notebook_paths, run_notebooks, schedule


def test_schedule_waits_for_needs_and_never_runs_more_than_jobs():
    paths = [Path(f"{n}_x.ipynb") for n in ("01", "02", "03", "04", "05")]
    needs = {"02": ("01",), "03": ("01",), "04": ("02", "03"), "05": ("04",)}
    lock, running, peak, order = threading.Lock(), set(), [0], []

    def run_one(path):
        with lock:
            running.add(path.name)
            peak[0] = max(peak[0], len(running))
            order.append(("start", path.name[:2]))
        time.sleep(0.05)
        with lock:
            running.discard(path.name)
            order.append(("end", path.name[:2]))
        return path.name

    assert schedule(paths, 2, run_one, needs) == [p.name for p in paths]  # results in the given order
    assert peak[0] == 2  # 02 and 03 side by side, never three
    at = {event: i for i, event in enumerate(order)}
    for nb, deps in needs.items():
        assert all(at[("end", d)] < at[("start", nb)] for d in deps), (nb, order)


def test_schedule_stops_new_starts_after_a_failure_and_raises_it():
    paths = [Path(f"{n}_x.ipynb") for n in ("01", "02", "03")]
    started = []

    def run_one(path):
        started.append(path.name[:2])
        if path.name.startswith("01"):
            raise RuntimeError("01 broke")
        return path

    with pytest.raises(RuntimeError, match="01 broke"):
        schedule(paths, 2, run_one, {"02": ("01",), "03": ("01",)})
    assert started == ["01"]  # 02 and 03 needed it: never started


def test_one_at_a_time_follows_the_needs_too():
    paths = [Path(f"{n}_x.ipynb") for n in ("05", "06", "07")]
    order = []
    schedule(paths, 1, lambda p: order.append(p.name[:2]), {"06": ("05", "07")})
    assert order == ["05", "07", "06"]  # 06's claims read 07's latency tables: in turn as side by side


def test_a_need_that_is_not_run_is_taken_as_there():
    # `reproduce --only 04`: its needs 02/03 are not in the run, their artifacts are expected to exist (or be computed)
    assert schedule([Path("04_x.ipynb")], 2, lambda p: p.name) == ["04_x.ipynb"]
    assert set(NEEDS) == {p.name[:2] for p in notebook_paths()}  # every notebook has its line


def test_jobs_must_be_a_whole_number():
    with pytest.raises(ValueError, match="jobs=0 must be a whole number >= 1"):
        run_notebooks(jobs=0)


def _notebook(path: Path, source: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('model = "m"\npreset = "tiny"\nrun_dir = "."', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(source)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_side_by_side_kernels_get_their_share_of_the_cores_and_wait_for_their_needs(tmp_path, monkeypatch):
    """Two real notebooks through papermill in child processes: 02 sees 01's artifact; each kernel has its thread count."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    record = ("import json, os, time\nfrom pathlib import Path\n"
              "info = {'threads': os.environ.get('OMP_NUM_THREADS'), 'saw_01': (Path(run_dir) / '01.json').exists()}\n")
    _notebook(folder / "01_first.ipynb", record + "(Path(run_dir) / '01.json').write_text(json.dumps(info))")
    _notebook(folder / "02_second.ipynb", record + "(Path(run_dir) / '02.json').write_text(json.dumps(info))")
    monkeypatch.setattr("shortened_llm.reproduce.os.cpu_count", lambda: 4)
    executed = run_notebooks("tiny", "smollm2-135m", tmp_path / "run", figures_dir=None, folder=folder, jobs=2)
    assert [p.name for p in executed] == ["01_first.ipynb", "02_second.ipynb"]
    first, second = (json.loads((tmp_path / "run" / f"{n}.json").read_text()) for n in ("01", "02"))
    assert first["threads"] == second["threads"] == "2"  # 4 cores, 2 jobs
    assert second["saw_01"]  # NEEDS["02"] = ("01",): it started after 01 finished
    assert (tmp_path / "run" / "protocol.json").exists()
