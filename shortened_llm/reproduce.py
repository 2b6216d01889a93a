"""Run every notebook with papermill: the main job behind ``make reproduce``.

Notebooks share one ``run_dir`` so each reuses what the previous ones saved (scores,
pruned models, retrained models). Executed copies go to ``run_dir/notebooks/``, figures
to ``run_dir/figures/`` and then to ``figures/`` for the README. Before the first notebook,
``run_dir/protocol.json`` says how the preset's protocol compares with the official one
(``protocol.py``); ``paper`` on the offline pack's stand-in data is refused there unless allowed.

With ``jobs > 1`` notebooks run side by side, each as soon as the notebooks whose artifacts it
reuses have finished (``NEEDS``), and each kernel gets its share of the cores
(``OMP_NUM_THREADS``): on two cores two one-thread kernels beat one two-thread kernel, whose
threads spend much of their time waiting on each other (``benchmarks/bench_jobs.py``: a whole smoke run
1.28x faster side by side on an AMD EPYC, with 0.82x the CPU time). A notebook nothing can run beside (``01``,
whose scores all the others reuse: ``runs_alone``) gets every core. Every kernel evaluates through
the run dir's evaluation cache (``eval_cache``), so no notebook measures a model another one measured. A notebook starts only after the ones it
reuses, so it finds their artifacts and computes nothing twice: the results are those of the
sequential run.

A run cut short (kill -9, a crash, a closed laptop) is resumed by running it again: a notebook
whose executed copy is complete for the same source and parameters (``finished``) is not run
again (``force=True``, CLI ``--force``, runs every one). An executed copy appears at its path only
once every cell ran (papermill writes it cell by cell into a temp beside it); a failed run's copy
goes to ``<name>.failed.ipynb``, so what sits at ``<name>.ipynb`` is always a whole, successful run.
The side-by-side runners die with the scheduler (Linux), and each kernel with its runner.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from unittest import mock

__all__ = ["NOTEBOOKS_DIR", "NEEDS", "MEASURED_SECONDS", "chain_seconds", "estimated_seconds", "finished", "notebook_paths",
           "run_notebook", "run_notebooks", "schedule", "start_order", "time_left", "where_time_went"]

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = REPO / "notebooks"


# what each kind of evaluation-cache entry is, in the run's closing line
WORK_KINDS = {"training": "training", "zero_shot": "zero-shot (lm-eval)", "ppl": "PPL",
              "scores": "block scores", "gguf_ppl": "PPL in llama.cpp"}


# The notebooks whose artifacts in run_dir each one reuses (scores, pruned and retrained models):
# 02 and 03 read 01's scores; 04 starts from the pruned model 02/03 saved (and picks its criterion
# by whether it exists); 05 reuses 04's LoRA run; 06 evaluates what 04 and 05 trained, and its claims
# table reads 07's latency CSVs; 07-10 start from the pruned models (10 sets Sheared-LLaMA against
# them). One run after another follows
# the same order (07 before 06), so side by side and in turn give the same tables. Every notebook
# still computes what is missing when run alone.
NEEDS: dict[str, tuple[str, ...]] = {
    "01": (), "02": ("01",), "03": ("01",), "04": ("02", "03"), "05": ("04",), "06": ("04", "05", "07"),
    "07": ("02", "03"), "08": ("02", "03"), "09": ("02", "03"), "10": ("02", "03"),
}


def notebook_paths(folder: Path = NOTEBOOKS_DIR, only: list[str] | None = None) -> list[Path]:
    paths = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.name.startswith(o) for o in only)]
        if not paths:
            raise ValueError(f"no notebook in {folder} matches {only}")
    return paths


def _ipc_kernel_manager():
    """A kernel manager whose kernel talks over Unix sockets, not TCP ports, to a client that
    cannot miss a shell reply.

    jupyter_client picks a TCP port by binding and releasing it; a second kernel starting at
    that moment (the other pytest worker, a JupyterLab the browser tests run) can take it, and
    the first kernel dies at birth. Socket files in Jupyter's runtime dir cannot collide.
    The client is ``kernel_client.WakefulKernelClient``: with nbclient's own, a cell that
    prints into an ``Output`` widget can leave the run waiting forever (see that module).
    """
    import uuid

    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.paths import jupyter_runtime_dir

    from .kernel_client import CLIENT_CLASS

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            os.makedirs(jupyter_runtime_dir(), exist_ok=True)
            kwargs.setdefault("client_class", CLIENT_CLASS)
            kwargs.setdefault("transport", "ipc")
            kwargs.setdefault("ip", os.path.join(jupyter_runtime_dir(), f"papermill-{uuid.uuid4().hex[:12]}-ipc"))
            super().__init__(**kwargs)

    return IPCKernelManager


# Progress bars in a recorded notebook are widgets saved at their first frame: the executed
# copy (and the course site built from it) would show "Loading weights: 0%" beside every model
# load and save. Nobody watches a papermill kernel, so transformers' and the hub's bars are
# switched off there; interactive use keeps them. (The package's own sweeps take ``progress``.)
QUIET_PROGRESS = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}


RECORD = "shortened_llm"  # the executed copy's metadata key: what it was run from (``finished`` reads it)


def _source_record(path: Path, parameters: dict) -> dict:
    return {"source_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "parameters": parameters}


def _read_record(out: Path) -> dict:
    import nbformat

    try:
        record = nbformat.read(out, as_version=4).metadata.get(RECORD)
    except (OSError, ValueError):  # missing, or not a notebook
        return {}
    return dict(record) if isinstance(record, dict) else {}


def finished(path: Path, out: Path, parameters: dict) -> bool:
    """True when ``out`` is a complete executed copy of notebook ``path`` (unchanged since) run with ``parameters``.

    ``run_notebook`` stamps the record on a copy only after its last cell ran; a copy from another
    version of the notebook, other parameters, or from before the record existed is run again.
    """
    record = _read_record(out)  # its "seconds" (how long it took) is not part of what must match
    return bool(record) and {k: record.get(k) for k in ("source_sha256", "parameters")} == _source_record(path, parameters)


# What each notebook took in `make reproduce` on a fresh clone of 3ebc2fb (AMD EPYC with AVX512-BF16, no AMX,
# 2 cores, --jobs 2, dtype auto = bf16, training under bf16 autocast; 2026-12-07, README "How long"). They are the
# first run's estimate only: once a run dir holds executed copies, their own recorded times replace them. Other
# CPUs differ (with AMX, bf16 runs about twice as fast again; llama.cpp, built without AMX, slower). That run
# planned its order on e72bee9's times (09 at 1717 s, before its smoke grid dropped the zero-shot average) and
# took 41.1 min; replayed on its own times, that order ends at 41.1 min and the order these plan at 38.5.
MEASURED_SECONDS = {
    "smoke": {"01": 245, "02": 73, "03": 63, "04": 153, "05": 550, "06": 455, "07": 236, "08": 372, "09": 1347,
              "10": 834},
}


def estimated_seconds(path: Path, run_dir: Path, preset: str) -> float | None:
    """How long notebook ``path`` should take: what its executed copy in ``run_dir`` took last time
    (any version of it), else ``MEASURED_SECONDS`` for ``preset``; None when neither knows."""
    seconds = _read_record(Path(run_dir) / "notebooks" / path.name).get("seconds")
    if isinstance(seconds, (int, float)) and seconds >= 0:
        return float(seconds)
    return MEASURED_SECONDS.get(preset, {}).get(_number(path))


def time_left(estimates: dict[str, float | None], done: set[str], running: dict[str, float], jobs: int,
              needs: dict = None) -> float | None:
    """Seconds until every notebook is done if each takes its estimate: ``schedule``'s own plan played
    forward (the same needs, the same start order, ``jobs`` at a time), from now. ``estimates`` and
    ``needs`` are keyed by notebook number; ``running`` = number -> seconds it has run so far (one
    over its estimate is taken to end now). None when a notebook still to finish has no estimate.
    """
    needs = NEEDS if needs is None else needs
    left = {n: s for n, s in estimates.items() if n not in done}
    if any(s is None for s in left.values()):
        return None
    order = start_order({n: float(s) for n, s in estimates.items() if s is not None}, needs, jobs)
    ends = {n: max(0.0, left[n] - ran) for n, ran in running.items() if n in left}  # number -> when it ends
    return _play(left, ends, set(done), set(estimates), needs, jobs, order)[0]


def run_notebook(path: Path, out_dir: Path, parameters: dict, kernel_name: str | None = None) -> Path:
    """Execute one notebook into ``out_dir``; raise papermill's error (with the cell) on failure.

    Papermill saves the copy after every cell: it writes a temp beside ``out_dir/<name>``, renamed
    in once the last cell ran and the run's record (``finished``) is stamped on it, so a kill leaves
    the previous copy or none, never a part. A failed run's copy (the error in its cell) is kept
    as ``<name>.failed.ipynb``.
    """
    import nbformat
    import papermill as pm

    from .artifacts import atomic_file, fault_point

    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / path.name
    with atomic_file(out) as tmp, mock.patch.dict(os.environ, QUIET_PROGRESS):  # the kernel inherits it
        failed = out.with_name(f"{path.stem}.failed.ipynb")
        try:
            with warnings.catch_warnings():  # the temp's name ends in .tmp, not .ipynb: papermill says so
                warnings.filterwarnings("ignore", message="The specified file .* does not end in")
                pm.execute_notebook(
                    str(path), str(tmp), parameters=parameters, cwd=str(path.parent),
                    kernel_name=kernel_name or "python3", progress_bar=False, log_output=False,
                    kernel_manager_class=_ipc_kernel_manager(),
                )
        except BaseException:
            if tmp.exists():
                os.replace(tmp, failed)
            raise
        nb = nbformat.read(tmp, as_version=4)
        nb.metadata[RECORD] = {**_source_record(path, parameters), "seconds": round(time.perf_counter() - t0, 1)}
        if "papermill" in nb.metadata:  # its paths relative to the copy: no machine's path travels in it
            nb.metadata.papermill["input_path"] = _relative(path, out_dir)
            nb.metadata.papermill["output_path"] = out.name
        nbformat.write(nb, tmp)
        fault_point("executed")  # a test hook (artifacts.FAULT_ENV): killed with the copy whole in its temp
        failed.unlink(missing_ok=True)  # this run succeeded: an older failure's copy is stale
    return out


def run_notebooks(preset: str = "smoke", model: str = "smollm2-135m", run_dir: str | os.PathLike | None = None,
                  only: list[str] | None = None, figures_dir: str | os.PathLike | None = "figures",
                  folder: Path = NOTEBOOKS_DIR, allow_substitute_data: bool = False, jobs: int = 1,
                  force: bool = False) -> list[Path]:
    """Every notebook (or those ``only`` names) at ``preset`` into ``run_dir``; the executed copies.

    A notebook already ``finished`` in ``run_dir`` (an earlier run, perhaps killed later) is not run
    again unless ``force``.

    ``jobs``: notebooks run side by side (each after those it reuses, see ``NEEDS``), the cores
    split between them; 1 runs them in order in this process.

    ``allow_substitute_data`` lets a paper-protocol preset run on the offline pack's stand-ins (it
    sets ``$SHORTENED_LLM_ALLOW_SUBSTITUTE`` for the kernels, which see the preset by name only).
    """
    from . import eval_cache
    from .data import ALLOW_SUBSTITUTE_ENV
    from .protocol import model_config, write_protocol

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs={jobs!r} must be a whole number >= 1 (notebooks run side by side)")
    run_dir = Path(run_dir or REPO / "runs" / preset).resolve()
    allow = {ALLOW_SUBSTITUTE_ENV: "1"} if allow_substitute_data else {}
    # every kernel of the run shares one evaluation cache (a number one notebook measured, another reads)
    cache = {} if os.environ.get(eval_cache.ENV_VAR) else {eval_cache.ENV_VAR: str(run_dir / eval_cache.CACHE_DIR)}
    with mock.patch.dict(os.environ, {**allow, **cache}):
        write_protocol(run_dir, preset, model_config(model))  # refuses paper on stand-in data before hours of work
        return _run_all(preset, model, run_dir, only, figures_dir, folder, jobs, force)


def _number(path: Path) -> str:
    return path.name[:2]


def chain_seconds(estimates: dict[str, float], needs: dict = NEEDS) -> dict[str, float]:
    """Per notebook number, the estimated seconds from its start to the end of the longest chain of
    notebooks that wait on it (itself included): how much of the run still hangs on starting it."""
    chain: dict[str, float] = {}

    def length(n: str) -> float:
        if n not in chain:
            after = [m for m in estimates if n in needs.get(m, ())]
            chain[n] = estimates[n] + max((length(m) for m in after), default=0.0)
        return chain[n]

    return {n: length(n) for n in estimates}


def _play(left: dict[str, float], ends: dict[str, float], over: set[str], runs: set[str], needs: dict, jobs: int,
          order, search: bool = False, budget: int = 20_000) -> tuple[float, list[str]]:
    """What ``schedule`` does, played on estimates: (seconds until all is done, the notebooks in the order they start).

    ``left``: number -> seconds, of the notebooks not done; ``ends``: those running -> when they end
    (seconds from now); ``over``: the done ones; a need outside ``runs`` is taken as there. Whenever a
    runner is free, the ready notebook first in ``order`` (a sort key on numbers) starts.

    ``search``: try every choice of which ready notebook starts (depth first, ``order``'s choice first,
    so the first plan found is the one ``order`` makes), cut a branch when even a perfect split of the
    work left or its longest chain cannot end before the best plan so far, and stop after ``budget``
    steps with the best one found. Only plans that never leave a runner idle while a notebook is ready
    are tried: one of them is what ``schedule`` then runs.
    """
    pending = frozenset(n for n in left if n not in ends)
    chain = chain_seconds({n: left[n] for n in pending}, needs)
    best: list = [math.inf, []]
    steps = 0

    def go(now: float, ends: dict, pending: frozenset, over: frozenset, started: tuple):
        nonlocal steps
        steps += 1
        if not pending and not ends:
            if now < best[0]:
                best[:] = [now, list(started)]
            return
        if search and best[0] < math.inf:
            work = sum(left[n] for n in pending) + sum(e - now for e in ends.values())
            longest = max([chain[n] for n in pending] + [e - now for e in ends.values()])
            if steps > budget or now + max(work / jobs, longest) >= best[0]:
                return
        ready = sorted((n for n in pending if all(m in over or m not in runs for m in needs.get(n, ()))), key=order)
        if ready and len(ends) < jobs:
            for n in ready if search else ready[:1]:
                go(now, {**ends, n: now + left[n]}, pending - {n}, over, started + (n,))
            return
        if not ends:
            raise RuntimeError(f"notebooks {sorted(pending)} wait on each other: check NEEDS")
        first = min(ends, key=ends.get)
        go(ends[first], {n: e for n, e in ends.items() if n != first}, pending, over | {first}, started)

    go(0.0, dict(ends), pending, frozenset(over), ())
    return best[0], best[1]


def start_order(estimates: dict[str, float], needs: dict = NEEDS, jobs: int = 1, search: bool = True):
    """``schedule``'s rule for which ready notebook starts first, as a sort key on its number.

    The plan that ends first on ``estimates`` (number -> seconds) with ``jobs`` runners, found by
    ``_play``'s search: a notebook's key is its place in that plan. The search starts from the rule it
    replaced, the longest chain of work hanging on a notebook first (``chain_seconds``; ``search=False``
    gives that rule alone), and keeps another plan only where it ends sooner. On the measured smoke
    times that rule started 09 right after 02 and 03 but left 04 -> 05 -> 06 for the end, 06 alone on
    one core; the plan found starts 04 earlier (``benchmarks/bench_schedule.py``).
    """
    chain = chain_seconds(estimates, needs)
    longest_first = lambda n: (-chain.get(n, 0.0), n)  # noqa: E731
    if not search:
        return longest_first
    _, plan = _play(dict(estimates), {}, set(), set(estimates), needs, jobs, longest_first, search=True)
    place = {n: i for i, n in enumerate(plan)}
    return lambda n: (place.get(n, len(place)), n)


def schedule(paths: list[Path], jobs: int, run_one, needs: dict = NEEDS,
             estimates: dict[str, float | None] | None = None) -> list:
    """Run ``run_one(path)`` for every path, at most ``jobs`` at a time, each after the ones it ``needs``
    (among ``paths``; a need that is not being run is taken as there). Results in the order of ``paths``.
    The first failure stops new starts; the running ones finish, then it is raised.

    Which ready notebook starts first: with an estimate for every one (``estimates``, number ->
    seconds), the next in the plan that ends first on them (``start_order``), so no long notebook
    starts last and runs alone on one core; else the lowest-numbered. The order changes nothing in
    the results: each notebook still starts after everything it reuses.
    """
    numbers = {_number(p) for p in paths}
    known = estimates is not None and all(estimates.get(n) is not None for n in numbers)
    order = start_order({n: float(estimates[n]) for n in numbers}, needs, jobs) if known else (lambda n: n)
    pending, running, done, results, failure = list(paths), {}, set(), {}, None
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while running or (pending and failure is None):
            ready = [p for p in pending if all(n in done or n not in numbers for n in needs.get(_number(p), ()))]
            ready.sort(key=lambda p: order(_number(p)))
            for path in ready[: jobs - len(running)] if failure is None else []:
                pending.remove(path)
                running[pool.submit(run_one, path)] = path
            if not running:
                raise RuntimeError(f"notebooks {[p.name for p in pending]} wait on each other: check NEEDS")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                path = running.pop(future)
                try:
                    results[path] = future.result()
                    done.add(_number(path))
                except BaseException as err:  # noqa: BLE001  (re-raised below, after the others finish)
                    failure = failure or err
    if failure is not None:
        raise failure
    return [results[p] for p in paths]


def runs_alone(paths: list[Path], needs: dict = NEEDS) -> set[str]:
    """The notebooks that no other of ``paths`` can run beside: each other one either comes before it
    (it needs that one, perhaps through others) or after it (that one needs it). ``01``, whose scores
    every notebook reuses, is one; such a notebook gets every core instead of its share."""
    numbers = [_number(p) for p in paths]

    def before(n: str) -> set[str]:
        seen, todo = set(), list(needs.get(n, ()))
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(needs.get(m, ()))
        return seen

    ancestors = {n: before(n) for n in numbers}
    return {n for n in numbers if all(m == n or m in ancestors[n] or n in ancestors[m] for m in numbers)}


def _run_in_child(path: Path, out_dir: Path, parameters: dict, threads: int) -> Path:
    """``run_notebook`` in a child process whose kernel gets ``threads`` torch threads (the environment
    is the child's own, so kernels started side by side never see each other's settings).

    The child dies with this process (``_die_with_parent``): a scheduler killed -9 leaves no runner
    behind to finish a notebook that the rerun is running too."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    code = ("import json, sys; from pathlib import Path; from shortened_llm import reproduce; "
            "reproduce._die_with_parent(int(sys.argv[4])); "
            "reproduce.run_notebook(Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]))")
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(out_dir), json.dumps(parameters), str(os.getpid())],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{path.name} failed (exit {proc.returncode}); its last lines:\n{tail}")
    return out_dir / path.name


def _die_with_parent(parent: int) -> None:
    """Have Linux SIGKILL this process when ``parent`` dies (``PR_SET_PDEATHSIG``; elsewhere a no-op).

    Set in the child itself, not by ``preexec_fn`` (unsafe in the scheduler's threads); a parent
    that died before it was set is seen by ``getppid`` at once.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def where_time_went(work: dict[str, float], notebook_seconds: float) -> str:
    """One line: the notebook time of a run, and how much of it went to each kind of work the
    evaluation cache recorded (``EvalCache.seconds_by_kind``), largest first, the rest (loading,
    pruning, timing sweeps, quantising, figures) last. It says what a smaller budget would save."""
    parts = [f"{WORK_KINDS.get(kind, kind)} {seconds / 60:.1f}"
             for kind, seconds in sorted(work.items(), key=lambda kv: -kv[1]) if seconds > 0]
    rest = max(0.0, notebook_seconds - sum(work.values()))
    parts.append(f"the rest {rest / 60:.1f} (loading, pruning, timing sweeps, quantising, figures)")
    return f"[reproduce] {notebook_seconds / 60:.1f} min of notebook time, in minutes: " + ", ".join(parts)


def _relative(path: Path, start: Path) -> str:
    """``path`` relative to ``start``, the absolute path where none exists (another drive on Windows).

    The run dir is passed to the notebooks relative to their folder (their working directory), and
    papermill's paths are stored relative to the copy: an executed copy, and the course site built
    from it, then shows ``../runs/smoke``, not a path of the machine that ran it."""
    try:
        return os.path.relpath(Path(path).absolute(), Path(start).absolute())
    except ValueError:
        return str(path)


def _run_all(preset: str, model: str, run_dir: Path, only, figures_dir, folder: Path, jobs: int = 1,
             force: bool = False) -> list[Path]:
    from . import eval_cache
    from .artifacts import fault_point

    paths = notebook_paths(folder, only)
    parameters = {"model": model, "preset": preset, "run_dir": _relative(run_dir, folder)}
    before = {**parameters, "run_dir": str(run_dir)}  # how copies were stamped until 2026-12-01: still finished
    cores = os.cpu_count() or 1
    alone = runs_alone(paths)
    start = time.perf_counter()
    # one progress display for the whole run: each line says what ran, for how long, and what is left
    estimates = {_number(p): estimated_seconds(p, run_dir, preset) for p in paths}
    done: set[str] = set()
    started: dict[str, float] = {}
    ran: dict[str, float] = {}  # seconds of each notebook run (not kept) in this call
    lock = threading.Lock()
    since = time.time()  # evaluation-cache entries written from now on are this run's work

    def left() -> str:
        with lock:
            now = time.perf_counter()
            seconds = time_left(estimates, done, {n: now - t for n, t in started.items()}, jobs)
        return "" if seconds is None else f"; about {seconds / 60:.0f} min left"

    def say(line: str) -> None:  # a line in one write: print's text and newline, from two threads, interleave
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    if all(v is not None for v in estimates.values()):
        total = time_left(estimates, set(), {}, jobs)
        say(f"[reproduce] {len(paths)} notebook(s) at preset {preset}, {jobs} at a time: about {total / 60:.0f} min "
            "(estimated from this run dir's last times, else from the README's measured run)")

    def run_one(path: Path) -> Path:
        t0 = time.perf_counter()
        kept = run_dir / "notebooks" / path.name
        if not force and (finished(path, kept, parameters) or finished(path, kept, before)):
            with lock:
                done.add(_number(path))
            say(f"[reproduce] {path.name}: finished in an earlier run, kept (--force runs it again)")
            return run_dir / "notebooks" / path.name
        with lock:
            started[_number(path)] = t0
        threads = cores if _number(path) in alone else max(1, cores // jobs)
        side = f", {threads} thread(s), side by side" if jobs > 1 else ""
        say(f"[reproduce] {path.name} (preset={preset}{side}) ...")
        if jobs > 1:
            out = _run_in_child(path, run_dir / "notebooks", parameters, threads)
        else:
            out = run_notebook(path, run_dir / "notebooks", parameters)
        fault_point("notebook")  # a test hook (artifacts.FAULT_ENV): killed with this notebook's copy in place
        took = time.perf_counter() - t0
        with lock:
            done.add(_number(path))
            started.pop(_number(path), None)
            ran[_number(path)] = took
        say(f"[reproduce] {path.name} done in {took:.0f} s "
            f"({time.perf_counter() - start:.0f} s since the start{left()})")
        return out

    executed = schedule(paths, jobs, run_one, estimates=estimates)
    if ran and os.environ.get(eval_cache.ENV_VAR):  # run_notebooks points every kernel at one cache
        work = eval_cache.EvalCache(os.environ[eval_cache.ENV_VAR]).seconds_by_kind(since)
        say(where_time_went(work, sum(ran.values())))
    if figures_dir is not None and (run_dir / "figures").is_dir():
        target = Path(figures_dir)
        target = target if target.is_absolute() else REPO / target
        target.mkdir(parents=True, exist_ok=True)
        for fig in (run_dir / "figures").glob("*.png"):
            shutil.copy2(fig, target / fig.name)
    return executed
