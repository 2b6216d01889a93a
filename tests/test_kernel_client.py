"""Notebooks whose cells print into Output widgets run to the end under papermill and Voila.

nbclient's own client can miss a cell's execute_reply after its Output-widget stand-in sent on
the shell socket (nbclient#312; ``shortened_llm/kernel_client.py``). Before the fix, 150 such cells
hung at cell 8 to 21 in each of 5 papermill runs, and Voila's page never finished in 4 of 5.
"""
import asyncio
import time
import urllib.request
from queue import Empty

import nbformat
import pytest

from shortened_llm import kernel_client, serve
from shortened_llm.kernel_client import CLIENT_CLASS, WakefulKernelClient, WakefulShellChannel
from shortened_llm.reproduce import _ipc_kernel_manager, run_notebook

WIDGET_CELL = "import ipywidgets as w\nout = w.Output()\nwith out:\n    print('cell {i}', flush=True)\nout"


def _widget_notebook(path, cells: int, parameters_cell: bool = True):
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"},
                                            "language_info": {"name": "python"}})
    nb.cells = ([nbformat.v4.new_code_cell("n = 0", metadata={"tags": ["parameters"]})] if parameters_cell else []) + [
        nbformat.v4.new_code_cell(WIDGET_CELL.format(i=i)) for i in range(cells)]
    nbformat.write(nb, path)
    return path


class _Stranded(WakefulShellChannel):
    """A shell channel whose socket holds its reply from the start but whose first ``stranded``
    polls are never woken (what a lost wake-up looks like from the waiting side)."""

    def __init__(self, stranded: int):  # no socket: the base class's get_msg is replaced below
        self.stranded, self.polls = stranded, []


def _fake_base_get_msg(monkeypatch):
    async def get_msg(self, timeout=None):
        self.polls.append(timeout)
        if len(self.polls) <= self.stranded:
            await asyncio.sleep(timeout)
            raise Empty
        return {"msg_type": "execute_reply"}

    monkeypatch.setattr(kernel_client.AsyncZMQSocketChannel, "get_msg", get_msg)
    monkeypatch.setattr(kernel_client, "POLL_SLICE_S", 0.05)


def test_a_reply_whose_wake_up_was_lost_is_read_on_the_next_slice(monkeypatch):
    _fake_base_get_msg(monkeypatch)
    channel = _Stranded(stranded=3)
    assert asyncio.run(channel.get_msg(timeout=None)) == {"msg_type": "execute_reply"}  # not a wait for ever
    assert channel.polls == [0.05] * 4  # three slices went unanswered, the fourth poll read it


def test_a_callers_timeout_still_ends_in_empty_at_its_deadline(monkeypatch):
    _fake_base_get_msg(monkeypatch)
    channel = _Stranded(stranded=10**6)
    start = time.monotonic()
    with pytest.raises(Empty):
        asyncio.run(channel.get_msg(timeout=0.12))
    assert 0.12 <= time.monotonic() - start < 1.0
    assert max(channel.polls) <= 0.05 and sum(channel.polls) == pytest.approx(0.12, abs=0.02)


def test_papermill_and_voila_kernels_get_the_wakeful_client():
    client = _ipc_kernel_manager()().client()
    assert isinstance(client, WakefulKernelClient) and client.shell_channel_class is WakefulShellChannel
    assert f"--AsyncKernelManager.client_class={CLIENT_CLASS}" in serve.KERNELS_OVER_IPC


@pytest.mark.timeout(300)
def test_sixty_cells_printing_into_output_widgets_run_to_the_end_under_papermill(tmp_path):
    out = run_notebook(_widget_notebook(tmp_path / "widgets.ipynb", 60), tmp_path / "out", {"n": 1})
    cells = nbformat.read(out, as_version=4).cells[2:]  # after the parameters and the injected parameters
    assert len(cells) == 60 and all(c.execution_count for c in cells)
    views = [o for c in cells for o in c.outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(views) == 60


@pytest.mark.timeout(300)
def test_voila_renders_a_page_of_sixty_output_widgets(tmp_path):
    serve.require_executable("voila")
    notebook = _widget_notebook(tmp_path / "widgets.ipynb", 60, parameters_cell=False)
    with serve.start_voila(notebook, log_dir=tmp_path) as server:
        html = urllib.request.urlopen(server.url("/"), timeout=240).read().decode()
    assert html.count("application/vnd.jupyter.widget-view+json") == 60, server.log()[-3000:]
