"""Start and stop the interactive servers: JupyterLab for exploring, Voila for the demo app.

``make demo`` and the browser tests (``tests/test_browser.py``) both go through here, so
both get the same guarantees: a free localhost port (the next one when the asked port is
taken), a random token in every URL, a log file instead of a terminal full of server
chatter, and a server that is really stopped (its whole process group) when the ``with``
block ends, also when it ends with an exception.

Voila shows a notebook as a web app without code: every cell runs, only markdown and
outputs are shown, and widgets stay live. The demo serves notebooks prepared with
papermill (parameters injected, nothing executed), so they share the run directory that
``make reproduce`` filled and answer from its cache.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .kernel_client import CLIENT_CLASS

__all__ = [
    "DEMO_NOTEBOOKS",
    "Server",
    "free_port",
    "require_executable",
    "prepare_notebooks",
    "start_lab",
    "start_voila",
    "main",
]

REPO = Path(__file__).resolve().parents[1]
# The explorers the demo serves: notebook 02 (criterion x ratio -> blocks, PPL) and
# notebook 07 (depth vs width: ratio -> parameters, latency, PPL).
DEMO_NOTEBOOKS: tuple[str, ...] = ("02_", "07_")
# How to get each server program when it is missing (the error repeats it).
INSTALL_HINTS = {
    "jupyter-lab": "pip install jupyterlab  (or `make install`: it is a core dependency)",
    "voila": "pip install voila  (or `make install`: it is in the `dev` extra of pyproject.toml)",
}
LOCALHOST = "127.0.0.1"


def free_port(start: int = 8888, host: str = LOCALHOST, tries: int = 200) -> int:
    """The first port >= ``start`` that nothing listens on (a port in use: take the next one)."""
    for port in range(start, start + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}..{start + tries - 1} on {host}: pass another start= (CLI: --port)")


def require_executable(name: str) -> str:
    """Path of ``name`` in this environment's bin/ (or on PATH); a missing one says how to install it."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        hint = INSTALL_HINTS.get(name, f"pip install {name}")
        raise FileNotFoundError(f"{name!r} is not installed in {sys.prefix}: {hint}")
    return found


@dataclass
class Server:
    """A running JupyterLab or Voila: its base URL, token, process and log; stops on ``with`` exit."""

    name: str
    port: int
    token: str
    process: subprocess.Popen
    log_path: Path
    host: str = LOCALHOST
    _log_file: object = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str = "/") -> str:
        """``path`` on this server with the token attached (what a browser opens)."""
        sep = "&" if "?" in path else "?"
        return f"{self.base_url}{path}{sep}token={self.token}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the whole process group (server and its kernels), SIGKILL what outlives ``timeout``."""
        if self.process.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # kernels are in the same group; make sure none is left behind
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _root_flag() -> list[str]:
    """Jupyter refuses to run as root without a flag; CI and these machines run as root."""
    return ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM when the process that started it dies, even by SIGKILL,
    so a killed test run or demo never leaves a server (and its kernels) behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _wait_ready(server: Server, probe_path: str, timeout: float) -> None:
    """Poll until ``probe_path`` answers 200; fail with the log's tail if the process dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with code {server.process.returncode} before it served; "
                               f"log {server.log_path}:\n{server.log()[-3000:]}")
        if _port_open(server.host, server.port):
            try:
                with urllib.request.urlopen(server.url(probe_path), timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
        time.sleep(0.25)
    server.stop()
    raise TimeoutError(f"{server.name} did not answer on port {server.port} within {timeout:.0f} s "
                       f"(pass a larger timeout=); log {server.log_path}:\n{server.log()[-3000:]}")


# what Tornado ("Address already in use") and jupyter-server ("port 8888 is not available") say
PORT_TAKEN = re.compile(r"address already in use|port \d+ is (already in use|not available)", re.I)


def _start(name: str, cmd_for_port, port: int | None, token: str | None, log_dir: Path | None,
           probe_path: str, timeout: float, cwd: Path, env: dict | None, attempts: int = 3) -> Server:
    """Start on a free port; if another process grabbed it meanwhile, move on to the next one."""
    token = token or secrets.token_hex(16)
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix=f"{name}-log-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    start = port or 8888
    last_error: Exception | None = None
    for _ in range(attempts):
        chosen = free_port(start)
        log_path = log_dir / f"{name}-{chosen}.log"
        log_file = open(log_path, "w")
        proc = subprocess.Popen(cmd_for_port(chosen, token), cwd=str(cwd), stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}, start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        server = Server(name, chosen, token, proc, log_path, _log_file=log_file)
        try:
            _wait_ready(server, probe_path, timeout)
            return server
        except RuntimeError as err:  # lost a race for the port: try the next one
            server.stop()
            last_error = err
            if not PORT_TAKEN.search(server.log()):
                raise
            start = chosen + 1
    raise RuntimeError(f"{name} could not bind a port after {attempts} attempts: {last_error}")


# Kernels talk to their server over Unix sockets, not TCP ports: jupyter_client picks a TCP port by
# binding and releasing it, and another kernel starting at that moment (papermill, a second server)
# can take it first; the kernel then dies at birth and the page waits for it forever. Voila runs
# the notebook with nbclient, whose waits for a shell reply can miss it after an Output widget
# printed (kernel_client.py): its kernels get the client that cannot.
KERNELS_OVER_IPC = ["--KernelManager.transport=ipc", f"--AsyncKernelManager.client_class={CLIENT_CLASS}"]

# JupyterLab user settings every server starts with: no "fetch the news?" pop-up over the page
LAB_SETTINGS: dict[str, dict] = {"@jupyterlab/apputils-extension/notification": {"fetchNews": "false"}}


def _lab_settings_dir(settings: dict[str, dict]) -> str:
    """A fresh user-settings dir, so neither a person's own settings nor a previous run leak in."""
    folder = Path(tempfile.mkdtemp(prefix="lab-settings-"))
    for plugin, values in settings.items():
        package, _, name = plugin.rpartition("/")
        path = folder / package / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    return str(folder)


def start_lab(root_dir: str | os.PathLike = REPO / "notebooks", port: int | None = None, token: str | None = None,
              log_dir: str | os.PathLike | None = None, timeout: float = 90.0, env: dict | None = None,
              settings: dict[str, dict] | None = None, isolated: bool = True) -> Server:
    """JupyterLab serving ``root_dir`` on localhost, no browser opened.

    ``isolated`` (tests) starts from fresh user settings and workspace, so neither a person's
    own settings nor a previous run change what the page shows; ``make lab`` keeps the
    person's. ``settings`` adds user settings by plugin id, e.g. ``{"@jupyterlab/notebook-extension/tracker":
    {"windowingMode": "none"}}`` (the tests want every cell in the page, not only visible ones).
    """
    exe = require_executable("jupyter-lab")
    root = Path(root_dir).resolve()
    fresh = [f"--LabApp.workspaces_dir={tempfile.mkdtemp(prefix='lab-ws-')}",
             f"--LabApp.user_settings_dir={_lab_settings_dir({**LAB_SETTINGS, **(settings or {})})}"] if isolated else []

    def cmd(p: int, t: str) -> list[str]:
        return [exe, "--no-browser", f"--ServerApp.ip={LOCALHOST}", f"--ServerApp.port={p}",
                "--ServerApp.port_retries=0", f"--IdentityProvider.token={t}", f"--ServerApp.root_dir={root}",
                "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                *fresh, *_root_flag(), *KERNELS_OVER_IPC]

    return _start("jupyterlab", cmd, port, token, Path(log_dir) if log_dir else None, "/api/status", timeout, root, env)


def start_voila(target: str | os.PathLike, port: int | None = None, token: str | None = None,
                log_dir: str | os.PathLike | None = None, timeout: float = 60.0, env: dict | None = None) -> Server:
    """Voila serving one notebook, or a folder of them (a list page linking each app)."""
    exe = require_executable("voila")
    target = Path(target).resolve()
    if not target.exists():
        raise FileNotFoundError(f"target={str(target)!r} does not exist: pass a notebook or a folder of notebooks")
    cwd = target if target.is_dir() else target.parent

    def cmd(p: int, t: str) -> list[str]:
        return [exe, str(target), "--no-browser", f"--Voila.ip={LOCALHOST}", f"--port={p}", "--Voila.port_retries=0",
                f"--token={t}", "--show_tracebacks=True", *KERNELS_OVER_IPC]

    # a single notebook's "/" runs it: probe a static file instead, so readiness costs nothing
    probe = "/voila/static/favicon.ico" if target.is_file() else "/"
    return _start("voila", cmd, port, token, Path(log_dir) if log_dir else None, probe, timeout, cwd, env)


def prepare_notebooks(names: Sequence[str], out_dir: str | os.PathLike, parameters: dict,
                      folder: Path = REPO / "notebooks") -> list[Path]:
    """``papermill --prepare-only``: copies with ``parameters`` injected and nothing executed."""
    import papermill as pm

    from .reproduce import notebook_paths

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prepared = []
    for path in notebook_paths(folder, list(names)):
        out = out_dir / path.name
        pm.execute_notebook(str(path), str(out), parameters=parameters, prepare_only=True, progress_bar=False)
        prepared.append(out)
    return prepared


def _demo(args) -> int:
    run_dir = Path(args.run_dir).resolve()
    # at the depth of notebooks/, so relative paths in them (../results) resolve as in JupyterLab
    app_dir = REPO / "build" / "demo"
    params = {"model": args.model, "preset": args.preset, "run_dir": str(run_dir)}
    notebooks = prepare_notebooks(args.only or DEMO_NOTEBOOKS, app_dir, params)
    with start_voila(app_dir, port=args.port, log_dir=run_dir / "logs") as server:
        print(f"Voila demo ({', '.join(p.stem for p in notebooks)}; preset={args.preset}, run_dir={run_dir})")
        print(f"  open {server.url('/')}")
        print(f"  log  {server.log_path}   (Ctrl-C stops it)", flush=True)
        return _serve_until_stopped(server)


def _lab(args) -> int:
    with start_lab(args.root_dir, port=args.port, log_dir=Path(args.run_dir) / "logs", isolated=False) as server:
        print(f"JupyterLab on {args.root_dir}\n  open {server.url('/lab')}\n  log  {server.log_path}   (Ctrl-C stops it)",
              flush=True)
        return _serve_until_stopped(server)


def _serve_until_stopped(server) -> int:
    """Wait for the server to exit; Ctrl-C is the normal way to stop it (the ``with`` around shuts it down)."""
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shortened_llm.serve demo|lab``: what ``make demo`` runs."""
    parser = argparse.ArgumentParser(prog="python -m shortened_llm.serve", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="Voila app of the 02 and 07 explorers")
    demo.add_argument("--preset", default="smoke")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--run-dir", default=str(REPO / "runs" / "smoke"), help="cache shared with `make reproduce`")
    demo.add_argument("--only", nargs="*", help="notebook name prefixes (default: 02_ 07_)")
    demo.add_argument("--port", type=int, default=8866, help="first port tried; the next free one is taken")
    lab = sub.add_parser("lab", help="JupyterLab on notebooks/ with a random token")
    lab.add_argument("--root-dir", default=str(REPO / "notebooks"))
    lab.add_argument("--run-dir", default=str(REPO / "runs" / "smoke"))
    lab.add_argument("--port", type=int, default=8888)
    args = parser.parse_args(argv)
    return {"demo": _demo, "lab": _lab}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
