"""A test run that always ends, and names what failed: per-test time limits and a crash-safe xdist schedule.

A pytest plugin (tests/conftest.py imports its hooks; ``-p run_limits`` with tests/ on the path
loads it alone, as ``test_run_limits.py`` does for a run of its own).
"""
from __future__ import annotations

import pytest

# Per-test limits in seconds, by kind (the slowest of each kind takes ~1/5 of its limit on a
# 2-core CPU with two workers). A test past its limit gets its stacks dumped and its process
# ended (pytest-timeout's thread method: the only one that also ends a call stuck in C, such
# as llama.cpp or a browser that never answers); under xdist the crash-safe scheduler below
# then fails that one test and hands the rest of its group to a fresh worker.
TIME_LIMITS = {"heavy": 1500, "notebook": 900, "browser": 600}
DEFAULT_TIME_LIMIT = 300


def pytest_collection_modifyitems(config, items):
    """Give every test without its own ``@pytest.mark.timeout`` the limit of its kind."""
    for item in items:
        if item.get_closest_marker("timeout") is None:
            limit = max([TIME_LIMITS[m] for m in TIME_LIMITS if item.get_closest_marker(m)], default=DEFAULT_TIME_LIMIT)
            item.add_marker(pytest.mark.timeout(limit))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` that survives a dead worker.

    xdist's own scheduler puts the whole work unit of a crashed worker back in the queue,
    the crashed test included, so a test that kills its process (a SIGILL in llama.cpp, a
    timeout) kills every replacement worker in turn, and the run could sit idle for good
    once the other worker had shut down. Here the crashed test is reported failed (xdist
    names it: "worker 'gw0' crashed while running ...") and never re-run; the rest of its
    group goes, still in order, to the next worker that asks.
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class CrashSafeLoadGroupScheduling(LoadGroupScheduling):
        def remove_node(self, node):
            workload = self.assigned_work.pop(node)
            pending = [(scope, nodeid) for scope, unit in workload.items() for nodeid, done in unit.items() if not done]
            if not pending:
                return None
            scope, crashed = pending[0]  # tests run in the order they were sent: the first pending one was running
            workload[scope][crashed] = True
            for scope, unit in workload.items():
                if not all(unit.values()):
                    self.workqueue[scope] = unit
            for other in self.nodes:
                self._reschedule(other)
            return crashed

    return CrashSafeLoadGroupScheduling(config, log)
