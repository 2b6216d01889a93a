"""reproduce: notebooks side by side, each after the ones whose artifacts it reuses, the cores split."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import nbformat
import pytest

from shortened_llm.reproduce import NEEDS, notebook_paths, run_notebooks, runs_alone, schedule


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
    assert {p.name[:2] for p in notebook_paths()} <= set(NEEDS)  # every notebook has its line (10 may come later)


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
    """Three real notebooks through papermill in child processes: 02 and 03 see 01's artifact and share the
    cores; 01, which nothing can run beside, has them all."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    record = ("import json, os, time\nfrom pathlib import Path\n"
              "info = {'threads': os.environ.get('OMP_NUM_THREADS'), 'saw_01': (Path(run_dir) / '01.json').exists(), "
              "'cache': os.environ.get('SHORTENED_LLM_EVAL_CACHE')}\n")
    for name in ("01_first", "02_second", "03_third"):
        _notebook(folder / f"{name}.ipynb", record + f"(Path(run_dir) / '{name[:2]}.json').write_text(json.dumps(info))")
    monkeypatch.setattr("shortened_llm.reproduce.os.cpu_count", lambda: 4)

    class Writes(list):  # each write a stream gets: a progress line split over two can interleave with another's
        def write(self, text):
            self.append(text)

        def flush(self):
            pass

    writes = Writes()
    monkeypatch.setattr("sys.stdout", writes)
    executed = run_notebooks("tiny", "smollm2-135m", tmp_path / "run", figures_dir=None, folder=folder, jobs=2)
    monkeypatch.undo()
    assert [p.name for p in executed] == ["01_first.ipynb", "02_second.ipynb", "03_third.ipynb"]
    progress = [w for w in writes if "[reproduce]" in w]
    assert len(progress) >= 6 and all(w.startswith("[reproduce]") and w.endswith("\n") and w.count("\n") == 1
                                      for w in progress), progress  # one whole line per write, from every thread
    first, second, third = (json.loads((tmp_path / "run" / f"{n}.json").read_text()) for n in ("01", "02", "03"))
    assert first["threads"] == "4"  # every other notebook waits for it
    assert second["threads"] == third["threads"] == "2"  # 4 cores, 2 jobs
    assert second["saw_01"] and third["saw_01"]  # NEEDS["02"] = NEEDS["03"] = ("01",): they started after 01
    assert first["cache"] == third["cache"] == str((tmp_path / "run" / "eval_cache").resolve())  # one cache for all
    assert (tmp_path / "run" / "protocol.json").exists()


def test_only_a_notebook_every_other_one_waits_for_or_follows_runs_alone():
    paths = [Path(f"{n}_x.ipynb") for n in NEEDS]
    assert runs_alone(paths) == {"01"}
    assert runs_alone([Path("05_x.ipynb"), Path("06_x.ipynb")]) == {"05", "06"}  # 06 needs 05: never side by side
    assert runs_alone([Path("07_x.ipynb"), Path("08_x.ipynb")]) == set()


# ---- killed, then run again ---------------------------------------------------------------------

# Each notebook writes its kernel's pid and its parent's (the process papermill runs in) as it starts,
# and logs that it ran (runs.log) at its end. Files in run_dir tell it to kill that parent
# (mid-notebook), to hold on (so it is running when its runner dies), or to await another one's start.
STEP = ("import os, time\nfrom pathlib import Path\nrun = Path(run_dir)\n"
        "(run / 'pid-{n}').write_text(f'{{os.getpid()}} {{os.getppid()}}')\n"
        "if (run / 'kill-{n}').exists():\n    os.kill(os.getppid(), 9)\n    time.sleep(60)\n"
        "while (run / 'hold-{n}').exists():\n    time.sleep(0.1)\n"
        "while (run / 'await-{n}').exists() and not (run / ('pid-' + (run / 'await-{n}').read_text())).exists():\n"
        "    time.sleep(0.1)\n"
        "with open(run / 'runs.log', 'a') as log:\n    log.write('{n}\\n')\n")
KILLED_RUN = ("import sys; from pathlib import Path; from shortened_llm.reproduce import run_notebooks; "
              "run_notebooks('tiny', 'smollm2-135m', sys.argv[1], figures_dir=None, folder=Path(sys.argv[2]), "
              "jobs=int(sys.argv[3]))")


def _two_notebooks(tmp_path, numbers):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    paths = [folder / f"{n}_step.ipynb" for n in numbers]
    for path, n in zip(paths, numbers):
        _notebook(path, STEP.format(n=n))
    return folder, paths


def _killed(run, folder, jobs, point=None):
    import os
    import subprocess
    import sys

    from shortened_llm.artifacts import FAULT_ENV

    env = {**os.environ, **({FAULT_ENV: point} if point else {})}
    child = subprocess.run([sys.executable, "-c", KILLED_RUN, str(run), str(folder), str(jobs)],
                           env=env, capture_output=True, text=True, timeout=240)
    assert child.returncode == -9, (child.stdout + child.stderr)[-2000:]


def _ran(run):
    return (run / "runs.log").read_text().split() if (run / "runs.log").exists() else []


@pytest.mark.heavy  # 25-35 s each on a loaded 2-core CPU: a child reproduce, then the rerun, each starting kernels
@pytest.mark.parametrize("point, left", [
    ("notebook:1", ["01_step.ipynb"]),  # between the two: 01's copy in place, 02 not started
    ("executed:1", []),  # 01 ran to its end, its copy whole in the temp, not renamed in
    (None, ["01_step.ipynb"]),  # mid-02: its kernel kills the process papermill runs in
])
def test_a_killed_reproduce_resumes_with_what_finished_and_leaves_no_partial_copy(tmp_path, point, left):
    from shortened_llm.reproduce import finished

    folder, paths = _two_notebooks(tmp_path, ["01", "02"])
    run = tmp_path / "run"
    run.mkdir()
    if point is None:
        (run / "kill-02").touch()
    _killed(run, folder, 1, point)
    executed = run / "notebooks"
    params = {"model": "smollm2-135m", "preset": "tiny", "run_dir": "../run"}  # as the notebooks see it
    assert sorted(p.name for p in executed.iterdir() if not p.name.startswith(".")) == left  # no part at a path
    assert all(finished(folder / name, executed / name, params) for name in left)
    assert _ran(run) == ["01"][: len(left) or 1]  # 01 ran once before the kill in every case
    (run / "kill-02").unlink(missing_ok=True)
    run_notebooks("tiny", "smollm2-135m", run, figures_dir=None, folder=folder, jobs=1)
    assert _ran(run) == ["01"] * (2 - len(left)) + ["02"]  # a finished 01 was not run again
    assert sorted(p.name for p in executed.iterdir()) == ["01_step.ipynb", "02_step.ipynb"]  # the killed temp is gone
    assert all(finished(path, executed / path.name, params) for path in paths)
    if point is None:  # --force runs every one again
        run_notebooks("tiny", "smollm2-135m", run, figures_dir=None, folder=folder, jobs=1, force=True)
        assert _ran(run) == ["01", "02", "01", "02"]


def _alive(pid):
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


@pytest.mark.heavy  # 100-145 s on a loaded 2-core CPU: four kernels, two of them side by side
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="the runners die with the scheduler on Linux only")
def test_side_by_side_a_killed_reproduce_takes_its_runners_with_it_and_resumes(tmp_path):
    """--jobs 2: killed once 07 is in place while 08 runs in its own child; that child and its kernel die too."""
    folder, paths = _two_notebooks(tmp_path, ["07", "08"])  # both need only 02/03, not in the run: side by side
    run = tmp_path / "run"
    run.mkdir()
    (run / "hold-08").touch()
    (run / "await-07").write_text("08")  # 07 ends only once 08 runs: the kill finds 08 mid-notebook
    _killed(run, folder, 2, "notebook:1")
    kernel, runner = map(int, (run / "pid-08").read_text().split())
    deadline = time.monotonic() + 60  # the kernel polls its parent once a second
    while any(map(_alive, (kernel, runner))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(_alive, (kernel, runner)))  # 08's runner and its kernel died with the scheduler
    (run / "hold-08").unlink()
    executed = run / "notebooks"
    assert _ran(run) == ["07"] and [p.name for p in executed.iterdir() if not p.name.startswith(".")] == ["07_step.ipynb"]
    run_notebooks("tiny", "smollm2-135m", run, figures_dir=None, folder=folder, jobs=2)
    assert _ran(run) == ["07", "08"]
    assert sorted(p.name for p in executed.iterdir()) == ["07_step.ipynb", "08_step.ipynb"]


def test_a_failed_notebook_keeps_its_copy_apart_and_the_last_good_one_in_place(tmp_path):
    """What sits at <name>.ipynb is always a whole successful run; the failure's copy (its error shown) beside it."""
    import papermill

    from shortened_llm.reproduce import finished, run_notebook

    path, out_dir, params = tmp_path / "01_step.ipynb", tmp_path / "out", {"run_dir": str(tmp_path)}
    _notebook(path, "import os\nif os.path.exists(os.path.join(run_dir, 'break')):\n    raise RuntimeError('boom')")
    good = run_notebook(path, out_dir, params).read_bytes()
    (tmp_path / "break").touch()
    with pytest.raises(papermill.PapermillExecutionError, match="boom"):
        run_notebook(path, out_dir, params)
    assert sorted(p.name for p in out_dir.iterdir()) == ["01_step.failed.ipynb", "01_step.ipynb"]
    assert (out_dir / "01_step.ipynb").read_bytes() == good and finished(path, out_dir / "01_step.ipynb", params)
    assert "boom" in (out_dir / "01_step.failed.ipynb").read_text()
    assert not finished(path, out_dir / "01_step.failed.ipynb", params)
    assert not finished(path, out_dir / "01_step.ipynb", {"run_dir": "elsewhere"})  # other parameters: run again
    _notebook(path, "print('edited')")
    assert not finished(path, out_dir / "01_step.ipynb", params)  # the notebook changed since: run again


def test_the_plan_ends_no_later_than_the_longest_chain_rule_and_fills_the_tail():
    """The searched start order never ends later than the rule it starts from, on random times, and
    on the measured smoke times it no longer leaves 04 -> 05 -> 06 for the end (06 alone on one core)."""
    import random

    from shortened_llm.reproduce import NEEDS, _play, start_order

    def ends(estimates, jobs, search):
        order = start_order(estimates, NEEDS, jobs, search=search)
        return _play(estimates, {}, set(), set(estimates), NEEDS, jobs, order)

    rng = random.Random(0)
    for _ in range(30):
        estimates = {n: float(rng.randint(10, 2000)) for n in NEEDS}
        for jobs in (1, 2, 3):
            assert ends(estimates, jobs, True)[0] <= ends(estimates, jobs, False)[0]
        assert ends(estimates, 1, True)[0] == sum(estimates.values())  # one runner: every order does all the work
    # the smoke times of 2026-12-02 (then MEASURED_SECONDS), on which the longest-chain rule left 05 -> 06 last
    smoke = {"01": 270.0, "02": 93.0, "03": 82.0, "04": 174.0, "05": 502.0, "06": 452.0, "07": 236.0, "08": 1192.0,
             "09": 2322.0, "10": 1165.0}
    (chain_end, chain_plan), (plan_end, plan) = ends(smoke, 2, False), ends(smoke, 2, True)
    assert chain_plan[-2:] == ["05", "06"] and plan.index("05") < plan.index("10")  # 05 -> 06 no longer last
    assert plan_end < 0.95 * chain_end
    assert sorted(plan) == sorted(NEEDS) and all(plan.index(d) < plan.index(n) for n in plan for d in NEEDS[n])


# ---- the estimate: how long the run has left ---------------------------------------------------

def test_time_left_plays_the_schedule_forward():
    """The estimate is schedule's plan on the estimates: a chain runs end to end, side branches fill the
    other runner, a running notebook counts only what it has left."""
    from shortened_llm.reproduce import time_left

    needs = {"01": (), "02": ("01",), "03": ("01",), "04": ("02",)}
    estimates = {"01": 100.0, "02": 60.0, "03": 40.0, "04": 30.0}
    assert time_left(estimates, set(), {}, jobs=2, needs=needs) == 190.0  # 01, then 02 -> 04 beside 03
    assert time_left(estimates, set(), {}, jobs=1, needs=needs) == 230.0  # one runner: all the work in turn
    assert time_left(estimates, {"01"}, {"02": 20.0}, jobs=2, needs=needs) == 70.0  # 40 more of 02, then 04
    assert time_left(estimates, {"01", "02", "04"}, {"03": 50.0}, jobs=2, needs=needs) == 0.0  # over its estimate
    assert time_left({**estimates, "05": None}, {"01"}, {}, jobs=2, needs=needs) is None  # one unknown: no estimate
    assert time_left({**estimates, "05": None}, {"05"}, {}, jobs=1, needs=needs) == 230.0  # the unknown one is done
    # the division the display used before: (60 + 40 + 30) / 2 = 65 s after 01, where 02 -> 04 alone takes 90
    assert time_left(estimates, {"01"}, {}, jobs=2, needs=needs) == 90.0


def test_a_copy_records_how_long_it_took_and_the_next_run_estimates_from_it(tmp_path, monkeypatch, capsys):
    """The executed copy's record carries its seconds; a rerun's display starts with an estimate from
    them (not from MEASURED_SECONDS), and a record written before seconds existed still counts as finished."""
    from shortened_llm import reproduce

    folder = tmp_path / "notebooks"
    folder.mkdir()
    _notebook(folder / "01_one.ipynb", "import time\ntime.sleep(0.5)")
    run = tmp_path / "run"
    monkeypatch.setitem(reproduce.MEASURED_SECONDS, "tiny", {"01": 5400.0})
    run_notebooks("tiny", "smollm2-135m", run, figures_dir=None, folder=folder)
    first = capsys.readouterr().out
    assert "about 90 min (estimated" in first  # nothing recorded yet: the measured table
    out = run / "notebooks" / "01_one.ipynb"
    record = nbformat.read(out, as_version=4).metadata[reproduce.RECORD]
    assert 0.5 <= record["seconds"] < 120
    assert reproduce.estimated_seconds(folder / "01_one.ipynb", run, "tiny") == record["seconds"]
    run_notebooks("tiny", "smollm2-135m", run, figures_dir=None, folder=folder, force=True)
    second = capsys.readouterr().out
    assert "about 0 min (estimated" in second and "about 0 min left" in second
    # a run dir from before the record had seconds: still finished, estimated from the table
    nb = nbformat.read(out, as_version=4)
    del nb.metadata[reproduce.RECORD]["seconds"]
    nbformat.write(nb, out)
    params = {"model": "smollm2-135m", "preset": "tiny", "run_dir": "../run"}
    assert reproduce.finished(folder / "01_one.ipynb", out, params)
    assert reproduce.estimated_seconds(folder / "01_one.ipynb", run, "tiny") == 5400.0
    assert not reproduce.finished(folder / "01_one.ipynb", out, {**params, "preset": "smoke"})


def test_a_run_ends_with_where_its_notebook_time_went(tmp_path, capsys):
    """The closing line: the notebook time, then the work the run's notebooks recorded in the shared
    evaluation cache, largest first, and the rest; work of an earlier run in that cache is left out."""
    from shortened_llm.eval_cache import EvalCache
    from shortened_llm.reproduce import where_time_went

    assert where_time_went({"ppl": 600.0, "training": 1800.0, "scores": 0.0}, 3600.0) == (
        "[reproduce] 60.0 min of notebook time, in minutes: training 30.0, PPL 10.0, "
        "the rest 20.0 (loading, pruning, timing sweeps, quantising, figures)")
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _notebook(folder / "01_one.ipynb", "from shortened_llm.eval_cache import active\n"
                                       "active().put({'kind': 'zero_shot', 'task': 'x'}, 0.5, seconds=90.0)")
    old = EvalCache(tmp_path / "run" / "eval_cache").put({"kind": "ppl", "model": 1}, 60.5, seconds=600.0)
    old.write_text(old.read_text().replace(json.loads(old.read_text())["written"], "2020-01-01 00:00:00"))
    run_notebooks("tiny", "smollm2-135m", tmp_path / "run", figures_dir=None, folder=folder)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("[reproduce] ") and ", in minutes: zero-shot (lm-eval) 1.5, the rest 0.0" in last, last
    assert "PPL" not in last  # the earlier run's entry


def test_copies_show_the_run_dir_relative_to_the_notebooks_and_old_absolute_ones_still_count(tmp_path, capsys):
    """No machine's path in an executed copy (the course site shows them); a copy stamped with the
    absolute run dir, as before 2026-12-01, is still a finished run."""
    from shortened_llm import reproduce

    folder = tmp_path / "notebooks"
    folder.mkdir()
    _notebook(folder / "01_one.ipynb", "print(run_dir)")
    run = tmp_path / "run"
    run_notebooks("tiny", "smollm2-135m", run, figures_dir=None, folder=folder)
    out = run / "notebooks" / "01_one.ipynb"
    text = out.read_text()
    assert str(tmp_path) not in text and '"../run"' in text
    nb = nbformat.read(out, as_version=4)
    nb.metadata[reproduce.RECORD]["parameters"]["run_dir"] = str(run.resolve())  # the old stamp
    nbformat.write(nb, out)
    capsys.readouterr()
    run_notebooks("tiny", "smollm2-135m", run, figures_dir=None, folder=folder)
    assert "finished in an earlier run, kept" in capsys.readouterr().out


def test_with_estimates_the_longest_chain_starts_first_and_the_needs_still_hold():
    """After 01, 09 (long) must not wait behind the short 04 -> 05 chain and then run alone on one core."""
    from shortened_llm.reproduce import chain_seconds

    paths = [Path(f"{n}_x.ipynb") for n in ("01", "04", "05", "08", "09")]
    needs = {"04": ("01",), "05": ("04",), "08": ("01",), "09": ("01",)}
    estimates = {"01": 1.0, "04": 2.0, "05": 3.0, "08": 1.0, "09": 10.0}
    assert chain_seconds(estimates, needs) == {"01": 11.0, "04": 5.0, "05": 3.0, "08": 1.0, "09": 10.0}

    def starts(given):  # one job: the start order is the choice order
        order = []
        schedule(paths, 1, lambda p: order.append(p.name[:2]), needs, estimates=given)
        at = {n: i for i, n in enumerate(order)}
        assert all(at[d] < at[n] for n, deps in needs.items() for d in deps), order
        return order

    assert starts(estimates) == ["01", "09", "04", "05", "08"]
    assert starts(None) == ["01", "04", "05", "08", "09"]  # no estimates: the lowest-numbered ready one
    assert starts({**estimates, "08": None}) == ["01", "04", "05", "08", "09"]  # one unknown: the same
