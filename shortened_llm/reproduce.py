"""Run every notebook with papermill: the main job behind ``make reproduce``.

Notebooks share one ``run_dir`` so each reuses what the previous ones saved (scores,
pruned models, retrained models). Executed copies go to ``run_dir/notebooks/``, figures
to ``run_dir/figures/`` and then to ``figures/`` for the README. Before the first notebook,
``run_dir/protocol.json`` says how the preset's protocol compares with the official one
(``protocol.py``); ``paper`` on the offline pack's stand-in data is refused there unless allowed.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from unittest import mock

__all__ = ["NOTEBOOKS_DIR", "notebook_paths", "run_notebook", "run_notebooks"]

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = REPO / "notebooks"


def notebook_paths(folder: Path = NOTEBOOKS_DIR, only: list[str] | None = None) -> list[Path]:
    paths = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.name.startswith(o) for o in only)]
        if not paths:
            raise ValueError(f"no notebook in {folder} matches {only}")
    return paths


def _ipc_kernel_manager():
    """A kernel manager whose kernel talks over Unix sockets, not TCP ports.

    jupyter_client picks a TCP port by binding and releasing it; a second kernel starting at
    that moment (the other pytest worker, a JupyterLab the browser tests run) can take it, and
    the first kernel dies at birth. Socket files in Jupyter's runtime dir cannot collide.
    """
    import uuid

    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.paths import jupyter_runtime_dir

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            os.makedirs(jupyter_runtime_dir(), exist_ok=True)
            kwargs.setdefault("transport", "ipc")
            kwargs.setdefault("ip", os.path.join(jupyter_runtime_dir(), f"papermill-{uuid.uuid4().hex[:12]}-ipc"))
            super().__init__(**kwargs)

    return IPCKernelManager


# Progress bars in a recorded notebook are widgets saved at their first frame: the executed
# copy (and the course site built from it) would show "Loading weights: 0%" beside every model
# load and save. Nobody watches a papermill kernel, so transformers' and the hub's bars are
# switched off there; interactive use keeps them. (The package's own sweeps take ``progress``.)
QUIET_PROGRESS = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def run_notebook(path: Path, out_dir: Path, parameters: dict, kernel_name: str | None = None) -> Path:
    """Execute one notebook into ``out_dir``; raise papermill's error (with the cell) on failure."""
    import papermill as pm

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / path.name
    with mock.patch.dict(os.environ, QUIET_PROGRESS):  # the kernel inherits it; restored after
        pm.execute_notebook(
            str(path), str(out), parameters=parameters, cwd=str(path.parent),
            kernel_name=kernel_name or "python3", progress_bar=False, log_output=False,
            kernel_manager_class=_ipc_kernel_manager(),
        )
    return out


def run_notebooks(preset: str = "smoke", model: str = "smollm2-135m", run_dir: str | os.PathLike | None = None,
                  only: list[str] | None = None, figures_dir: str | os.PathLike | None = "figures",
                  folder: Path = NOTEBOOKS_DIR, allow_substitute_data: bool = False) -> list[Path]:
    """Every notebook (or those ``only`` names) at ``preset`` into ``run_dir``; the executed copies.

    ``allow_substitute_data`` lets a paper-protocol preset run on the offline pack's stand-ins (it
    sets ``$SHORTENED_LLM_ALLOW_SUBSTITUTE`` for the kernels, which see the preset by name only).
    """
    from .data import ALLOW_SUBSTITUTE_ENV
    from .protocol import model_config, write_protocol

    run_dir = Path(run_dir or REPO / "runs" / preset).resolve()
    allow = {ALLOW_SUBSTITUTE_ENV: "1"} if allow_substitute_data else {}
    with mock.patch.dict(os.environ, allow):
        write_protocol(run_dir, preset, model_config(model))  # refuses paper on stand-in data before hours of work
        return _run_all(preset, model, run_dir, only, figures_dir, folder)


def _run_all(preset: str, model: str, run_dir: Path, only, figures_dir, folder: Path) -> list[Path]:
    executed = []
    for path in notebook_paths(folder, only):
        t0 = time.perf_counter()
        print(f"[reproduce] {path.name} (preset={preset}) ...", flush=True)
        executed.append(run_notebook(path, run_dir / "notebooks", {"model": model, "preset": preset, "run_dir": str(run_dir)}))
        print(f"[reproduce] {path.name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    if figures_dir is not None and (run_dir / "figures").is_dir():
        target = Path(figures_dir)
        target = target if target.is_absolute() else REPO / target
        target.mkdir(parents=True, exist_ok=True)
        for fig in (run_dir / "figures").glob("*.png"):
            shutil.copy2(fig, target / fig.name)
    return executed
