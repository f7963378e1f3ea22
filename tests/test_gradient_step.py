"""FedSGD's client update: one step of size 1 on the mean gradient over all of a node's clips."""

import keras
import numpy as np
import pytest

from dsl_fed.config import from_dict
from dsl_fed.data.pipeline import make_dataset
from dsl_fed.errors import DslFedError
from dsl_fed.gradient_step import gradient_step
from dsl_fed.models import build_model, get_weights_by_name, set_phase, trainable_weight_names
from dsl_fed.train import class_weights
from test_train import _config, _tones


def _one_batch_sgd_step(model, chunks, cfg, phase):
    """The reference: Keras' own train step, plain SGD at learning rate 1, all chunks in one batch."""
    set_phase(model, phase, cfg.training.unfrozen_layers)
    plain = keras.Model(model.inputs, model.outputs)
    plain.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), loss=keras.losses.CategoricalCrossentropy(),
                  jit_compile=False)
    weights = class_weights(chunks.labels, 3) if cfg.training.class_balance == "class_weight" else None
    plain.fit(make_dataset(chunks, 3, len(chunks)), epochs=1, verbose=0, shuffle=False, class_weight=weights)
    return plain


@pytest.mark.parametrize("phase", [1, 2])
def test_step_is_the_mean_gradient_over_all_chunks_whatever_the_batch_size(phase):
    cfg = _config(training={"class_balance": "class_weight", "batch_size": 5})  # 5 does not divide 22 chunks
    chunks = _tones(n_clips=11)
    chunks = chunks.__class__(chunks.waveforms, np.where(np.arange(22) < 4, 0, chunks.labels), chunks.clip_ids,
                              chunks.speakers)  # unbalanced classes: the class weights matter
    model = build_model(cfg, 3)
    start = get_weights_by_name(model, [w.path for w in model.weights])
    loss = gradient_step(model, chunks, cfg, phase, seed=1)
    names = trainable_weight_names(model)
    reference = build_model(cfg, 3)
    _one_batch_sgd_step(reference, chunks, cfg, phase)
    ours, theirs = get_weights_by_name(model, names), get_weights_by_name(reference, names)
    assert any(not np.allclose(ours[n], start[n]) for n in names)
    for name in names:
        np.testing.assert_allclose(ours[name], theirs[name], atol=2e-5, rtol=1e-4, err_msg=name)
    frozen = [w.path for w in model.weights if w.path not in names]
    after = get_weights_by_name(model, frozen)
    assert all(np.array_equal(after[n], start[n]) for n in frozen)  # the phase's slice moved, nothing else
    assert 0.5 < loss < 3.0


def test_an_empty_node_is_a_clear_error():
    cfg = _config()
    chunks = _tones(n_clips=2)
    empty = chunks.__class__(chunks.waveforms[:0], chunks.labels[:0], chunks.clip_ids[:0], chunks.speakers[:0])
    with pytest.raises(DslFedError, match="no training chunks"):
        gradient_step(build_model(cfg, 3), empty, cfg, 1, seed=0)


def test_gradient_updates_need_a_server_optimiser_and_keras_nodes():
    base = {"data": {"manifest": "x.csv"}}
    ok = from_dict({**base, "federated": {"local_update": "gradient", "strategy": "fedadam"}})
    assert ok.federated.local_update == "gradient"
    with pytest.raises(DslFedError, match="federated.local_update.*server optimiser.*not fedavg"):
        from_dict({**base, "federated": {"local_update": "gradient"}})
    with pytest.raises(DslFedError, match="federated.local_update.*LiteRT"):
        from_dict({**base, "federated": {"local_update": "gradient", "strategy": "fedadam", "litert_clients": 0.5}})
