"""No process outlives its command when runs nest (an experiment's Ray worker running a federated cell) and when
something kills a command's direct children (Ray does, with the worker)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from dsl_fed.federated.watchdog import MARKER_ENV

# A command under guard() whose child runs under a guard of its own and starts, through a shell in a session of
# its own, a daemon-like process (as the SuperLink starts SuperExec). Prints the inner command's and that PID.
_OUTER = """
import os, subprocess, sys, time
from dsl_fed.federated.watchdog import guard
with guard() as env:
    inner = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env={**os.environ, **env}, stdout=subprocess.PIPE,
                             text=True)
    print(inner.pid, inner.stdout.readline().strip(), flush=True)
    time.sleep(600)
"""
_INNER = """
import os, subprocess, time
from dsl_fed.federated.watchdog import guard
with guard() as env:
    child = subprocess.Popen(["sh", "-c", "sleep 600 & echo $!; wait"], env={**os.environ, **env},
                             start_new_session=True, stdout=subprocess.PIPE, text=True)
    print(child.stdout.readline().strip(), flush=True)  # the sleep: not a direct child, as SuperExec is not
    time.sleep(600)
"""


@pytest.fixture
def nested():
    """(outer command, inner command PID, grandchild); everything carrying the test's probe is killed after."""
    probe = uuid.uuid4().hex
    outer = subprocess.Popen([sys.executable, "-c", _OUTER, _INNER], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "DSL_FED_TEST_PROBE": probe})
    inner_pid, grandchild_pid = map(int, outer.stdout.readline().split())
    grandchild = psutil.Process(grandchild_pid)
    # `echo $!` can run before the forked shell has exec'd sleep, while its environment is briefly unreadable
    deadline = time.monotonic() + 20
    while grandchild.name() != "sleep" and time.monotonic() < deadline:
        time.sleep(0.05)
    yield outer, inner_pid, grandchild
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("DSL_FED_TEST_PROBE") == probe and proc.pid != os.getpid():
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    outer.wait()


def _gone(proc: psutil.Process, timeout: float = 20) -> bool:
    _, alive = psutil.wait_procs([proc], timeout=timeout)
    return not alive


def test_a_nested_run_carries_both_marks_and_ends_with_the_outer_command(nested):
    """The grandchild carries the outer mark too, so SIGKILL of the outer command alone ends it, even when the
    inner command is still alive and never gets to clean up."""
    outer, _, grandchild = nested
    assert len(grandchild.environ()[MARKER_ENV].split()) == 2
    outer.send_signal(signal.SIGKILL)
    outer.wait()
    assert _gone(grandchild)


def test_killing_a_command_and_its_direct_children_leaves_its_watchdog_to_clean_up(nested):
    """What Ray does to a worker that ran a federated cell: SIGKILL the worker and its direct children. The
    inner watchdog is nobody's child, survives, and ends the grandchild (the outer command stays alive)."""
    outer, inner_pid, grandchild = nested
    inner = psutil.Process(inner_pid)
    for proc in [inner, *inner.children(recursive=False)]:
        proc.kill()
    assert _gone(grandchild) and outer.poll() is None
