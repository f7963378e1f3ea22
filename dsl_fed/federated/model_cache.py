"""One model per client process, reused for every message of a run: built and traced once, reset per message.

Building the model, compiling it and tracing its train and predict steps cost a client more than its local
training on a few chunks (tiny preset, 2 s chunks: ~1.5 s building, ~7 s in `train_local` for 6 steps, almost all
tracing). A Ray actor serves many nodes and rounds, so it keeps the model of its current run and only loads the
weights each message brings. (Flower 1.42's deployment runtime starts a new ClientApp process per message, which
builds once either way.)

A reused model must answer a message exactly as a freshly built one: a resumed run starts with fresh processes and
must reproduce an uninterrupted one bit for bit. So what a message's training depends on is set from the message
alone, never left over from an earlier one:

- every weight: the caller loads the node's full model and the received slice;
- the optimizer: `dsl_fed.train.compile_for_phase` compiles anew or resets it to a new optimizer's start;
- every random stream (`reset_random_state`): each dropout ``SeedGenerator``, in the model's fixed variable
  order, gets the state ``[h(seed, i), 0]``, and the SapAugment stream restarts at step 0 (`train_local` gives it
  the seed); shuffling is seeded by `train_local` on a new dataset per call.

`client_model` applies the same reset right after a fresh build, so fresh and reused agree by construction
(tests/test_model_reuse.py compares them bit for bit). Another config or class count builds anew after
``keras.backend.clear_session()``.
"""

from __future__ import annotations

import dataclasses
import hashlib

import keras
import numpy as np

from dsl_fed.config import Config
from dsl_fed.models import DslModel, build_model

_current: tuple[tuple[Config, int], DslModel] | None = None  # ((config, classes), model) of this process's run


def client_model(cfg: Config, num_classes: int, seed: int) -> DslModel:
    """This process's model for (`cfg`, `num_classes`), built on first use, its random state reset for `seed`.

    Its weights are whatever the last message loaded: the caller sets all of them.
    """
    global _current
    key = (cfg, int(num_classes))
    if _current is None or _current[0] != key:
        clear()
        blank = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=None))  # no weight file read
        _current = (key, build_model(blank, num_classes))
    model = _current[1]
    reset_random_state(model, seed)
    return model


def clear() -> None:
    """Forget the process's model (the next `client_model` builds a fresh one) and Keras' global state."""
    global _current
    _current = None
    keras.backend.clear_session()


def reset_random_state(model: DslModel, seed: int) -> None:
    """Put every random stream of `model` where a message with `seed` starts it (see the module docstring).

    Raises:
        RuntimeError: the model holds state that is neither a weight nor a seed generator (it would leak between
            messages; extend this reset first).
    """
    weights = {id(v) for v in model.weights}
    for index, state in enumerate(v for v in model.variables if id(v) not in weights):
        if not state.path.endswith("seed_generator_state"):
            raise RuntimeError(f"{state.path}: model state that is neither a weight nor a seed generator")
        state.assign(np.array([stream_seed(seed, index), 0], dtype=state.dtype))
    model.restart_augmentation()


def stream_seed(seed: int, index: int) -> int:
    """Seed of random stream `index` for a message with `seed`: a hash, so nearby seeds give unrelated streams."""
    digest = hashlib.blake2b(f"{int(seed)}/{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 2) + 1  # [1, 2^31 - 2]: valid as int32 and int64
