"""`dsl_fed.deploy.clientapp_worker` keeps answering after tasks that a SuperNode abandoned.

A SuperNode (Flower 1.42) creates a ClientApp task before it pulls the message's content from the SuperLink. When
the SuperLink is restarted meanwhile, it may deliver a message of the killed run: Flower then logs "Run ID ... is
not in `RUNNING` status. Ignoring message" and leaves the task behind, its content never coming; when the pull
fails otherwise, it ends the task, and the task's token is refused (401). A long-lived ClientApp process must
survive both and answer the next message. Here the real SuperNode Runtime API (Flower's FastAPI app on its
NodeState) feeds a real worker process, and Flower's own `_pull_and_store_message` makes each of these states
from a stand-in SuperLink; no SuperLink, no TensorFlow (the run is another app's, so the answer is an error reply
and no code is loaded). ~10 s.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

RUN_ID, NODE_ID, SERIES_ID = 7, 42, 3


def wait_for(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.1)
    return result


@pytest.fixture
def runtime_api():
    """Flower's SuperNode Runtime API on a free port, its NodeState knowing run RUN_ID (as after a first message)."""
    import hashlib

    import uvicorn
    from flwr.app import Context, RecordDict
    from flwr.supercore.fab import Fab
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supernode.main import create_app
    from flwr.supernode.nodestate import NodeStateFactory

    from dsl_fed.federated.runtime import free_port

    factory = NodeStateFactory(objectstore_factory=ObjectStoreFactory())
    state = factory.state()
    state.set_node_id(NODE_ID)
    run = Run.create_empty(RUN_ID)
    fab = Fab(hash_str=hashlib.sha256(b"not loaded").hexdigest(), content=b"not loaded", verifications={})
    run.fab_id, run.fab_version, run.fab_hash, run.series_id = "someone/else", "1.0.0", fab.hash_str, SERIES_ID
    run.primary_task_type = ""
    state.store_run(run)
    state.store_fab(fab)
    state.set_run_series_context(SERIES_ID, Context(run_id=RUN_ID, node_id=NODE_ID, node_config={}, state=RecordDict(),
                                                    run_config={}, series_id=SERIES_ID))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app=create_app(state_factory=factory), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "Runtime API", timeout=30)
    yield state, f"127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def deliver(state, fail_pull=None):
    """What a SuperNode does with one message from the SuperLink (Flower's `_pull_and_store_message`): create a
    ClientApp task, then pull the message's content (`fail_pull(task_id)` raises instead). Returns the message id."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supernode.start_client_internal import _pull_and_store_message

    identity = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = RUN_ID, 1, 1  # as the SuperLink's ServerApp
    try:
        message = Message(RecordDict({"config": ConfigRecord({"at": time.time()})}), dst_node_id=NODE_ID,
                          message_type="train")
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = identity
    message.metadata.__dict__["_message_id"] = message.object_id
    tree = get_object_tree(message)
    contents = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(message).items()}
    bare = message_from_proto(message_to_proto(remove_content_from_message(message)))

    def pull_object(run_id: int, object_id: str) -> bytes:
        if fail_pull is not None:
            fail_pull(state.get_tasks(run_ids=[RUN_ID], order_by="pending_at")[-1].task_id)
        return contents[object_id]

    received = _pull_and_store_message(
        state=state, object_store=state.object_store, node_config={}, receive=lambda: (bare, tree),
        get_run=None, get_fab=None, pull_object=pull_object, confirm_message_received=lambda *_: None,
        trusted_entities=None)
    assert received == (None if fail_pull else RUN_ID)
    return message.metadata.message_id


def replied(state, message_id: str) -> bool:
    return any(reply.metadata.reply_to_message_id == message_id for reply in state.get_messages_legacy(is_reply=True))


def test_worker_answers_after_a_task_whose_content_never_comes_and_one_whose_token_was_revoked(runtime_api, tmp_path):
    from flwr.common.constant import Status
    from flwr.supercore.run import RunNotRunningException

    state, address = runtime_api
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen([sys.executable, "-m", "dsl_fed.deploy.clientapp_worker", "--runtime-api-address",
                               address], stdout=log, stderr=subprocess.STDOUT)
    try:
        def killed_run(task_id: int) -> None:  # the restarted SuperLink: the message's run is not running
            raise RunNotRunningException

        deliver(state, fail_pull=killed_run)  # left behind: a task whose content never comes
        wait_for(lambda: state.get_tasks(statuses=[Status.RUNNING]), "worker taking the abandoned task")
        answered = deliver(state)
        wait_for(lambda: replied(state, answered), "answer to the message after the abandoned one")

        def lost_link(task_id: int) -> None:  # the pull fails once the worker holds the task: Flower ends it
            wait_for(lambda: state.get_tasks(task_ids=[task_id], statuses=[Status.RUNNING, Status.FINISHED]),
                     "worker taking it")  # (finished: another of the pull's threads raised first)
            raise ConnectionError("SuperLink gone")

        deliver(state, fail_pull=lost_link)
        wait_for(lambda: "[dsl_fed] a ClientApp task's message never arrived" in (tmp_path / "worker.log").read_text(),
                 "worker dropping the ended task")
        answered = deliver(state)
        wait_for(lambda: replied(state, answered), "answer to the message after the ended task")
        assert worker.poll() is None
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        log.close()
