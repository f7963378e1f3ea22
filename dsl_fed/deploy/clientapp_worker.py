"""One long-lived ClientApp process per SuperNode (``flower-supernode --isolation process``).

In its default isolation Flower 1.42's SuperNode starts a new ``flwr-clientapp`` process for every message, and
``flwr-clientapp`` serves exactly one (one task token, then it exits; Flower's pre-started warm workers exist for
Kubernetes and other task types only). Each such process imported TensorFlow and built and traced the model
again: most of a deployed round. With ``--isolation process`` the SuperNode leaves starting ClientApps to an
outside process that acquires tasks from its Runtime API; this is that process, serving every message of every
run in one interpreter, so TensorFlow is imported once (by a Keras node's first message; a LiteRT node never
imports it) and `dsl_fed.federated.model_cache` keeps the built model (a reused model answers exactly as a fresh
one; the module says how).

Per message it does what ``flwr-clientapp`` does (Flower's own `run_clientapp` helpers pull the message, context
and run, push the reply and the node state; a heartbeat runs meanwhile) but without exiting. It runs only this
package's ClientApp: a run of another app gets an error reply and its code is never loaded.

Two things a one-message ``flwr-clientapp`` may ignore, since it exits anyway, would stop a long-lived one:

- A SuperNode creates a task before it pulls the message's content from the SuperLink. When the SuperLink was
  restarted meanwhile and still delivers a message of the killed run, the pull is refused and the SuperNode drops
  the message but leaves its task pending; its content never comes, and Flower's pull waits up to 2 hours for
  it. So each task's input is pulled in a thread of its own and the main thread answers whichever message
  arrives: an abandoned task ends on its own without holding up the next run.
- When a pull fails otherwise the SuperNode ends the task, and its token is refused (401). Flower's retry then
  sends the process SIGINT (its way to stop a ``flwr-clientapp`` whose task was cancelled), and the heartbeat
  does the same when a task is gone. Here a refused token ends that task only; SIGINT still ends the process
  (the SuperNode is gone, or Ctrl-C).

    python -m dsl_fed.deploy.clientapp_worker --runtime-api-address 127.0.0.1:PORT [--parent-pid PID]

Started beside each SuperNode by `dsl_fed.deploy.local.LoopbackFederation`, in the same watchdog marking.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import queue
import sys
import threading
from dataclasses import dataclass
from typing import Any

APP_FAB_ID = "dsl-fed/dsl-fed"  # publisher/name of the app `dsl_fed.federated.run_config.write_app` writes
POLL_SECONDS = 0.2  # between task requests to the SuperNode on the same host (Flower's SuperExec: 1 s)
CONTENT_POLL_SECONDS = (0.05, 0.1)  # first and longest wait for a message's content (Flower's: 1 s and 10 s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (host:port)")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the SuperNode) is gone")
    args = parser.parse_args(argv)

    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # noqa: PLC0415 (the core imports Flower lazily)
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime import run_clientapp

    from dsl_fed.federated.client_app import app  # the app; TensorFlow only once a Keras node's message comes

    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    # The SuperNode creates a task before it has pulled the message's content from the SuperLink, so the first
    # try for the content comes too early almost every time; Flower's pull then waits 1 s, doubling up to 10 s
    # (1-3 s per message measured). Asking the SuperNode on the same host every 0.05 s, at most every 0.1 s, takes
    # the content as soon as it is there; Flower's 2 hours stay the limit (not its 500 tries, now minutes).
    run_clientapp.pull_and_inflate_object_from_tree = functools.partial(
        run_clientapp.pull_and_inflate_object_from_tree, initial_backoff=CONTENT_POLL_SECONDS[0],
        backoff_cap=CONTENT_POLL_SECONDS[1], max_tries_per_object=None)
    client = RuntimeHttpClient.from_server_address(
        server_address=args.runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker())
    print(f"ClientApp process {os.getpid()} (dsl_fed) serving {args.runtime_api_address}", flush=True)
    ready: queue.Queue[Task] = queue.Queue()
    try:
        while True:
            acquired = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
            if acquired.HasField("task") and acquired.token:
                threading.Thread(target=fetch, args=(args.runtime_api_address, acquired.token, ready),
                                 daemon=True).start()
            with contextlib.suppress(queue.Empty):
                answer(app, ready.get(timeout=POLL_SECONDS))
    except KeyboardInterrupt:  # the SuperNode is gone (Flower's parent monitor raises SIGINT), or Ctrl-C
        return 0


@dataclass
class Task:
    """One acquired task: its Runtime API client (authenticated by the task's token), heartbeat and input."""

    client: Any
    retry: Any
    heartbeat: Any
    message: Any = None
    context: Any = None
    run: Any = None


def fetch(address: str, token: str, ready: queue.Queue[Task]) -> None:
    """Pull task `token`'s message, context and run and put the task into `ready`; end it if that fails."""
    from flwr.common.constant import SubStatus
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest
    from flwr.supercore import log
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.run import RunNotRunningException
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import pull_task_input

    retry = make_simple_http_retry_invoker()
    flower_giveup = retry.should_giveup
    retry.should_giveup = lambda exc: _refused(exc) or flower_giveup(exc)  # ends this task, not the process
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry)

    def beat() -> bool:  # keeps the task's token alive; a task that is gone needs none (no SIGINT, see above)
        with contextlib.suppress(Exception, RunNotRunningException):
            client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        return True

    task = Task(client, retry, HeartbeatSender(beat))
    task.heartbeat.start()
    try:
        task.message, task.context, task.run, _ = pull_task_input(client)
    except (Exception, RunNotRunningException) as exc:  # noqa: BLE001 - the SuperNode dropped it, see the module
        log(30, "[dsl_fed] a ClientApp task's message never arrived (%s); the SuperNode dropped it",
            "task ended by the SuperNode" if _refused(exc) else f"{type(exc).__name__}: {exc}")
        finish(task, SubStatus.FAILED, "the message's content never arrived", push=not _refused(exc))
        return
    ready.put(task)


def _refused(exc: BaseException) -> bool:
    """Whether the SuperNode refused the task's token (401): it ended the task."""
    import httpx

    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == httpx.codes.UNAUTHORIZED


def answer(app, task: Task) -> None:
    """Run the ClientApp on `task`'s message and push the reply and the node state, as ``flwr-clientapp`` does."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore import log
    from flwr.supercore.run import RunNotRunningException
    from flwr.supernode.runtime.run_clientapp import push_message

    reply, status, details = None, SubStatus.FAILED, "ClientApp task failed"
    try:
        if task.run.fab_id != APP_FAB_ID:
            details = f"this SuperNode serves only {APP_FAB_ID}, not {task.run.fab_id!r}"
            reply = Message(Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason=details), reply_to=task.message)
        else:
            reply = app(message=task.message, context=task.context)
            status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # what flwr-clientapp does: log it, reply with an error
        log(40, "ClientApp raised an exception", exc_info=exc)
        details = f"{type(exc)}:<'{exc}'>"
        reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=task.message)
    try:
        push_message(task.client, reply, task.context)
    except (Exception, RunNotRunningException) as exc:  # noqa: BLE001 - the node's next message must be served
        log(40, "Failed to push reply message", exc_info=exc)
    finish(task, status, details)


def finish(task: Task, status: str, details: str, push: bool = True) -> None:
    """Report the task's end (and the node state) to the SuperNode unless it ended the task itself; stop its
    heartbeat and close its client."""
    from flwr.supercore.run import RunNotRunningException
    from flwr.supernode.runtime.run_clientapp import push_task_output

    task.retry.max_tries = 1
    try:
        if push:  # (it logs HTTP errors itself)
            with contextlib.suppress(RunNotRunningException):
                push_task_output(client=task.client, context=task.context, sub_status=status, details=details)
    finally:
        if task.heartbeat.is_running:
            task.heartbeat.stop()
        task.client.close()


if __name__ == "__main__":
    sys.exit(main())
