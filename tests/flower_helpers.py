"""Test helpers for the Flower apps: a config writer and an in-process Grid that runs the real ClientApp.

`InProcessGrid` delivers each message to ``dsl_fed.federated.client_app.app`` with one persistent `Context` per node,
the way Flower's simulation engine does (minus Ray), so server and client logic run end to end in seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from flwr.app import Context, Error, Message, RecordDict

from dsl_fed.federated.prompt_grid import ImmediateReplies

if TYPE_CHECKING:
    import numpy as np


@pytest.fixture(autouse=True, scope="session")
def task_identity():
    """Flower stamps messages with the sending process's run/node/task ids; outside a Flower process set them.

    Session-scoped so module-scoped fixtures that run the apps see them too.
    """
    from flwr.supercore.task_identity import TaskIdentity

    with pytest.MonkeyPatch.context() as patch:
        for attr, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
            patch.setattr(TaskIdentity, attr, value)
        yield


def processes_with(needle: str) -> list[int]:
    """PIDs of live processes whose command line contains `needle` (e.g. a test's private FLWR_HOME path)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")  # empty for zombies
        except OSError:
            continue
        if needle in text and int(cmdline.parent.name) != os.getpid():
            found.append(int(cmdline.parent.name))
    return found


def with_marker(marker: str) -> list[int]:
    """PIDs anywhere on the machine whose environment carries `marker` (ours, whatever their name)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return [pid for pid in found if pid != os.getpid()]


def reap_marked(marker: str, wait: float = 30) -> list[int]:
    """Wait up to `wait` s for every process carrying `marker` to end, SIGKILL the rest (never leak into other
    runs, even when the test failed); returns the PIDs that were still alive."""
    import contextlib
    import time

    deadline = time.monotonic() + wait
    while with_marker(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = with_marker(marker)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM a process group started with ``start_new_session=True`` (e.g. ``ray start --block``, whose
    daemons stay in it), then SIGKILL what remains."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=20)
            break
        except subprocess.TimeoutExpired:
            continue


def write_config(folder: Path, manifest: Path, **sections: dict[str, Any]) -> Path:
    """A tiny federated YAML config with per-section overrides; written to ``folder/federated.yaml``.

    The recipe of the ``tiny_config`` fixture (tiny backbone, 32x32 images, Adam 0.003), 3 shards and 2+1
    rounds. Phase 2 unfreezes only the top conv (2 layers) at the paper's lr / 10: unfreezing the whole random
    tiny backbone makes one round of local training on 1-2 speakers collapse to a single class.
    """
    raw: dict[str, dict[str, Any]] = {
        "data": {"manifest": str(manifest), "chunk_seconds": 1.0, "hop_seconds": 0.5, "shards": 3},
        "spectrogram": {"n_mels": 32, "image_size": 32},
        "model": {"backbone": "tiny", "weights": None, "units": 32, "dropout": 0.1},
        "training": {"optimizer": "adam", "learning_rate": 0.003, "phase2_lr_factor": 0.1, "batch_size": 32,
                     "unfrozen_layers": 2},
        "federated": {"phase1_rounds": 2, "phase2_rounds": 1, "local_epochs": 2, "min_train_nodes": 2,
                      "min_available_nodes": 3},
        "output": {"directory": str(folder / "runs"), "name": "fed"},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "federated.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def saved_weights(round_dir: Path) -> dict[str, "np.ndarray"]:
    """Weights of a round's ``model.keras`` by name."""
    import keras

    from dsl_fed.models import get_weights_by_name, weight_names

    model = keras.saving.load_model(round_dir / "model.keras")
    return get_weights_by_name(model, weight_names(model))


def run_config(config_path: Path, resume: bool = False, overrides: str = "", server_eval: Path | str = "") -> dict[str, Any]:
    """The Flower run config the apps would get from pyproject.toml + ``--run-config``."""
    return {"config": str(config_path), "data-manifest": "", "output-directory": "", "overrides": overrides,
            "resume": resume, "server-eval-manifest": str(server_eval)}


class InProcessGrid(ImmediateReplies):
    """The part of `flwr.serverapp.Grid` that strategies use, backed by the real ClientApp in this process.

    Args:
        run_config: Flower run config every node sees.
        num_nodes: Nodes (partition ids 0..n-1, node ids 100..).
        sabotage: Optional ``(node index, message, reply) -> reply`` hook to make a node misbehave: it gets the
            node's real reply and returns what the server receives instead.
        node_configs: One node config per node instead of the simulation's partition ids (e.g. ``data-path``).
    """

    def __init__(self, run_config: dict[str, Any], num_nodes: int,
                 sabotage: Callable[[int, Message, Message], Message] | None = None,
                 node_configs: list[dict[str, Any]] | None = None) -> None:
        from dsl_fed.federated.client_app import app

        self.app = app
        self.sabotage = sabotage
        configs = node_configs or [{"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)]
        self.contexts = {
            100 + i: Context(run_id=1, node_id=100 + i, node_config=config, state=RecordDict(),
                             run_config=dict(run_config))
            for i, config in enumerate(configs)
        }
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's Grid does when it sends
            self.sent.append(msg)
            context = self.contexts[msg.metadata.dst_node_id]
            try:
                reply = self.app(msg, context)
            except Exception as exc:  # what Flower's simulation turns a raising ClientApp into
                reply = Message(Error(code=0, reason=f"ClientAppException occurred. Message: {exc}"), reply_to=msg)
            if self.sabotage is not None:
                reply = self.sabotage(context.node_id - 100, msg, reply)
            replies.append(reply)
        return replies
