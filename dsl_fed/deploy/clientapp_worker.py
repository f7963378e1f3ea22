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

    python -m dsl_fed.deploy.clientapp_worker --runtime-api-address 127.0.0.1:PORT [--parent-pid PID]

Started beside each SuperNode by `dsl_fed.deploy.local.LoopbackFederation`, in the same watchdog marking.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

APP_FAB_ID = "dsl-fed/dsl-fed"  # publisher/name of the app `dsl_fed.federated.run_config.write_app` writes
POLL_SECONDS = 0.2  # between task requests to the SuperNode on the same host (Flower's SuperExec: 1 s)


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

    from dsl_fed.federated.client_app import app  # the app; TensorFlow only once a Keras node's message comes

    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    client = RuntimeHttpClient.from_server_address(
        server_address=args.runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker())
    print(f"ClientApp process {os.getpid()} (dsl_fed) serving {args.runtime_api_address}", flush=True)
    try:
        while True:
            task = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
            if task.HasField("task") and task.token:
                serve(app, args.runtime_api_address, task.token)
            else:
                time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:  # the SuperNode is gone (Flower's parent monitor raises SIGINT)
        return 0


def serve(app, address: str, token: str) -> None:
    """Answer the one message `token` stands for, as ``flwr-clientapp --token`` would, and return."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore import log
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    retry = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    context, reply, status, details = None, None, SubStatus.FAILED, "ClientApp task failed"
    try:
        heartbeat.start()
        message, context, run, _ = pull_task_input(client)
        if run.fab_id != APP_FAB_ID:
            details = f"this SuperNode serves only {APP_FAB_ID}, not {run.fab_id!r}"
            reply = Message(Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason=details), reply_to=message)
        else:
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # what flwr-clientapp does: log it, reply with an error
        log(40, "ClientApp raised an exception", exc_info=exc)
        details = f"{type(exc)}:<'{exc}'>"
        if "message" in locals():
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as exc:  # noqa: BLE001 - the node's next message must still be served
            log(40, "Failed to push reply message", exc_info=exc)
        finally:
            retry.max_tries = 1
            push_task_output(client=client, context=context, sub_status=status, details=details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()


if __name__ == "__main__":
    sys.exit(main())
