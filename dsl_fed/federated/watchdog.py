"""No process outlives the command that started it, however the command ends.

A federated run spawns a process tree that does not stay a tree: the SuperLink starts SuperExec in a session of
its own, the simulation starts Ray, and Ray's daemons and actors re-parent themselves. So every process of a
run is marked instead: the command puts a unique value into ``DSL_FED_RUN`` in its children's environment,
which every descendant inherits, and "the run's processes" are exactly the processes on the machine whose
environment carries it (`marked_processes`).

Guards nest: the variable holds the marks of every guard a process runs under (an experiment's, then its
federated cell's), so ending the outer run also ends the processes of the runs inside it.

Three paths end them:

- normal end, Ctrl-C, SIGTERM: the command calls `end_marked` itself before it returns;
- SIGKILL of the command (or a crash of the interpreter): a watchdog process (``python -m
  dsl_fed.federated.watchdog MARKER [DIR ...]``, started by `guard`, unmarked, in a session of its own) waits
  on a pipe from the command; the kernel closes the pipe when the command dies, and the watchdog kills the
  marked processes at once and removes the command's temporary folders. The watchdog forks once and lets
  its first process exit, so it is nobody's child: whoever ends the command's children (Ray ends a worker's
  children with the worker) does not end it too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator

import psutil

MARKER_ENV = "DSL_FED_RUN"


def processes_with(variable: str, value: str) -> list[psutil.Process]:
    """Every live process on the machine (that we may inspect) but this one whose environment has `value` as
    ``variable`` or as one of its space-separated words."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if value in proc.environ().get(variable, "").split() and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def marked_processes(marker: str) -> list[psutil.Process]:
    """The processes of the run marked with `marker`."""
    return processes_with(MARKER_ENV, marker)


def end_processes(procs: list[psutil.Process], grace: float = 10.0) -> None:
    """SIGTERM `procs` (or SIGKILL at once when `grace` is 0), wait up to `grace` s, SIGKILL the rest."""
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate() if grace > 0 else proc.kill()
    _, alive = psutil.wait_procs(procs, timeout=max(grace, 0.5))
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


def end_marked(marker: str, grace: float = 10.0) -> None:
    """End every process of the run; repeat while some are still being spawned (Ray restarts workers)."""
    for _ in range(5):
        procs = marked_processes(marker)
        if not procs:
            return
        end_processes(procs, grace)


@contextlib.contextmanager
def guard(cleanup: tuple[os.PathLike | str, ...] = ()) -> Iterator[dict[str, str]]:
    """Mark a run and watch over it; yields the environment entries to give every child process.

    On leaving the block (normally or by an exception) the marked processes are ended here; if this process
    is killed instead, the watchdog ends them and removes the `cleanup` folders.
    """
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != MARKER_ENV}
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "dsl_fed.federated.watchdog", marker, *map(str, cleanup)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True,
    )
    watchdog.stdout.readline()  # it watches from now on (a child started earlier could outlive a quick kill)
    try:
        yield {MARKER_ENV: " ".join([*os.environ.get(MARKER_ENV, "").split(), marker])}
    finally:
        try:
            end_marked(marker)
        finally:
            watchdog.stdin.close()  # the watchdog finds nothing left, removes nothing that still exists, exits
            watchdog.stdout.read()  # end of file once the (forked) watchdog has exited
            watchdog.stdout.close()
            watchdog.wait()


@contextlib.contextmanager
def guard_children() -> Iterator[None]:
    """`guard` for programs started with this process's environment as it is (``subprocess`` from here or from
    forked workers), so they end with this process however it ends. A forked worker itself keeps its parent's
    original /proc environ, so it is not found: it must end with its parent by other means (PR_SET_PDEATHSIG)."""
    with guard() as env:
        saved = os.environ.get(MARKER_ENV)
        os.environ[MARKER_ENV] = env[MARKER_ENV]  # this process is never among its own marked processes
        try:
            yield
        finally:
            if saved is None:
                del os.environ[MARKER_ENV]
            else:
                os.environ[MARKER_ENV] = saved


def main(argv: list[str]) -> int:
    marker, *cleanup = argv
    if os.fork() > 0:  # the parent exits at once: the watchdog goes on as an orphan (see the module docstring)
        os._exit(0)
    print("watching", flush=True)
    while sys.stdin.buffer.read(4096):  # b"" once the command closed its end or died
        pass
    end_marked(marker, grace=0)
    for path in cleanup:
        shutil.rmtree(path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
