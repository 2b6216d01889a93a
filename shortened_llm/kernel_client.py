"""A Jupyter kernel client that cannot miss a shell reply: what papermill and Voila run notebooks with.

nbclient (under papermill and Voila) waits for a cell's ``execute_reply`` on the shell socket
while, in another task, its stand-in for an ``Output`` widget sends ``comm_msg`` updates on
that same socket (nbclient#312, open since 2024). A send can consume the socket's
edge-triggered wake-up: the reply then sits in the socket, readable, while the waiting poll
never hears of it. Client and kernel both wait forever, idle. Cells that print into an
``Output`` widget hit it about once every 10-20 here; notebook 02's explorer draws its first
view into one, and so notebook 02 hung in CI until the test's 900 s limit, and Voila's page
once stopped at its ``explorer_widget`` cell.

The fix waits in slices: each ``get_msg`` polls for at most ``POLL_SLICE_S`` and then polls
again, and a fresh poll looks at the socket's state itself, so a stranded reply is read within
one slice. A caller's own timeout is kept whole: it still gets ``queue.Empty`` at its deadline.
"""
from __future__ import annotations

import time
from queue import Empty

from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.channels import AsyncZMQSocketChannel
from traitlets import Type

POLL_SLICE_S = 1.0  # the longest a stranded reply waits; a wake-up that is not lost answers at once

# The dotted name Jupyter's config takes (``--AsyncKernelManager.client_class=...``).
CLIENT_CLASS = "shortened_llm.kernel_client.WakefulKernelClient"


class WakefulShellChannel(AsyncZMQSocketChannel):
    """The shell channel, polled in slices of ``POLL_SLICE_S`` so a lost wake-up costs one slice."""

    async def get_msg(self, timeout: float | None = None) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = POLL_SLICE_S if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await super().get_msg(timeout=min(POLL_SLICE_S, left))
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise


class WakefulKernelClient(AsyncKernelClient):
    """``AsyncKernelClient`` with ``WakefulShellChannel``: the other channels only receive, so keep theirs."""

    shell_channel_class = Type(WakefulShellChannel)
