"""Phase 1 on cached backbone embeddings: the same head as the full model, and a cache never trusted blindly.

Equivalence: the head model is made of the full model's own head layers (same variables, same dropout seed
generator), fed the same batches in the same order with the same optimizer and class weights. The only possible
difference is the float rounding of the backbone's output computed at another batch shape; with the tiny backbone
the head weights come out bit for bit equal, and the test allows 1e-6 absolute (far below one step's change).
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pytest
from flower_helpers import run_config, task_identity, write_config  # noqa: F401 (task_identity: autouse fixture)

from dsl_fed import embedding_cache
from dsl_fed.bottleneck import bottleneck_applies, embed, head_model
from dsl_fed.embedding_cache import MAGIC, EmbeddingCache, front_end_key
from dsl_fed.models import build_model, get_weights_by_name, load_model
from dsl_fed.train import _note_once, train_local

TOLERANCE = 1e-6  # absolute, on every head weight (observed: 0.0)


@pytest.fixture(scope="module")
def corpus(demo_manifest):
    from conftest import tiny_settings

    from dsl_fed.config import from_dict
    from dsl_fed.data.manifest import read_manifest
    from dsl_fed.data.pipeline import load_chunks

    settings = tiny_settings(demo_manifest, "unused", "cache")
    settings["model"]["dropout"] = 0.5  # dropout active: its masks must match too
    settings["training"]["phase1_epochs"] = 3
    cfg = from_dict(settings)
    manifest = read_manifest(demo_manifest)
    train = load_chunks(manifest.partition("train"), cfg.data, manifest.classes, progress=False)
    devel = load_chunks(manifest.partition("devel"), cfg.data, manifest.classes, progress=False)
    return cfg, len(manifest.classes), train, devel


def _phase1(cfg, classes, train, devel, cache, run_dir=None):
    model = build_model(cfg, classes)
    start = time.perf_counter()
    result = train_local(model, train, devel, cfg, phase=1, verbose=0, cache=cache, run_dir=run_dir)
    return model, result, time.perf_counter() - start


def test_cached_phase1_trains_the_same_head_as_the_full_model(corpus, tmp_path, capsys):
    cfg, classes, train, devel = corpus
    plain_cfg = cfg.replace(**{"training.embedding_cache": "false"})
    initial = get_weights_by_name(build_model(cfg, classes))
    plain, plain_result, plain_seconds = _phase1(plain_cfg, classes, train, devel, None)
    cache = EmbeddingCache(tmp_path / "cache")
    cached, cached_result, first_seconds = _phase1(cfg, classes, train, devel, cache, run_dir=tmp_path / "run")
    assert (cache.misses, cache.hits) == (2, 0)  # train and devel embedded once
    again, _, again_seconds = _phase1(cfg, classes, train, devel, cache)
    assert (cache.misses, cache.hits) == (2, 2)  # ... and read back

    want = get_weights_by_name(plain)
    head = {"hidden": ("kernel", "bias"), "arelu": ("alpha", "beta"), "predictions": ("kernel", "bias")}
    assert set(want) == {f"{layer}/{w}" for layer, ws in head.items() for w in ws}
    assert max(np.abs(want[n] - initial[n]).max() for n in want) > 1e-3  # training moved the head
    for model in (cached, again):
        got = get_weights_by_name(model)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=TOLERANCE, err_msg=name)
    np.testing.assert_allclose(cached_result.history["loss"], plain_result.history["loss"], rtol=1e-6)
    assert cached_result.val_metrics == pytest.approx(plain_result.val_metrics, abs=1e-6)
    assert cached_result.best_epoch == plain_result.best_epoch
    # the checkpoint holds the full model (waveform in), not the head it trained
    best = load_model(tmp_path / "run" / "checkpoints" / "best.keras")
    assert best.input_shape == cached.input_shape
    with capsys.disabled():
        print(f"\nphase 1 (tiny, {cfg.training.phase1_epochs} epochs + devel each epoch): full model "
              f"{plain_seconds:.2f} s, embeddings computed {first_seconds:.2f} s, "
              f"read from the cache {again_seconds:.2f} s")


def test_a_changed_backbone_weight_or_spectrogram_setting_invalidates_the_cache(corpus, tmp_path):
    cfg, classes, train, _ = corpus
    cache = EmbeddingCache(tmp_path)
    model = build_model(cfg, classes)
    first = embed(model, train, 16, cache).waveforms
    assert (cache.misses, cache.hits) == (1, 0)
    assert np.array_equal(embed(model, train, 16, cache).waveforms, first) and cache.hits == 1

    kernel = model.backbone.weights[0]
    changed = kernel.numpy().copy()
    changed.flat[0] += 0.5
    key = front_end_key(model)
    kernel.assign(changed)
    assert front_end_key(model) != key
    second = embed(model, train, 16, cache).waveforms
    assert cache.misses == 2 and not np.array_equal(second, first)  # computed anew, not the stale entry

    other = build_model(cfg.replace(**{"spectrogram.fmin": "100"}), classes)
    third = embed(other, train, 16, cache).waveforms
    assert cache.misses == 3 and not np.array_equal(third, first)
    assert embedding_cache.folder_size(tmp_path)[1] == 3


def test_a_damaged_or_foreign_entry_is_detected_and_rebuilt(tmp_path):
    notes: list[str] = []
    cache = EmbeddingCache(tmp_path, note=notes.append)
    waves = np.arange(40, dtype=np.float32).reshape(4, 10)
    vectors = np.arange(12, dtype=np.float32).reshape(4, 3)
    calls = []

    def compute():
        calls.append(1)
        return vectors

    assert np.array_equal(cache.get("front", waves, compute), vectors)
    (entry,) = tmp_path.glob("*.emb")
    data = entry.read_bytes()

    entry.write_bytes(data[:-5])  # truncated
    assert np.array_equal(cache.get("front", waves, compute), vectors) and len(calls) == 2
    assert "truncated (43 of 48 payload bytes); rebuilding it" in notes[-2]
    assert entry.read_bytes() == data  # rebuilt whole

    damaged = bytearray(data)
    damaged[-1] ^= 0xFF
    entry.write_bytes(bytes(damaged))
    assert np.array_equal(cache.get("front", waves, compute), vectors) and len(calls) == 3
    assert "checksum mismatch" in notes[-2]

    payload = vectors.tobytes()
    header = {"key": "0" * 64, "shape": [4, 3], "dtype": "float32", "sha256": hashlib.sha256(payload).hexdigest()}
    entry.write_bytes(MAGIC + json.dumps(header).encode() + b"\n" + payload)  # another key's (valid) entry
    assert np.array_equal(cache.get("front", waves, compute), vectors) and len(calls) == 4
    assert "holds another key" in notes[-2]

    entry.write_bytes(b"not ours")
    cache.get("front", waves, compute)
    assert len(calls) == 5 and "not a dsl_fed embedding file" in notes[-2]
    assert np.array_equal(cache.get("front", waves, compute), vectors) and len(calls) == 5  # now a hit


def test_the_cache_is_bounded_reported_survives_a_failed_write_and_clears(tmp_path, capsys):
    from dsl_fed.cli import main

    notes: list[str] = []
    entry_bytes = 48 + 200  # payload + magic and header, roughly
    cache = EmbeddingCache(tmp_path / "c", max_bytes=3 * entry_bytes, note=notes.append)
    vectors = np.ones((4, 3), np.float32)
    for i in range(6):
        cache.get("front", np.full((4, 10), i, np.float32), lambda: vectors)
        time.sleep(0.01)  # distinct modification times
    size, count = embedding_cache.folder_size(tmp_path / "c")
    assert count < 6 and size <= 3 * entry_bytes
    assert "least recently used removed" in notes[-1] and f"{count} entries" in notes[-1]

    blocked = EmbeddingCache(tmp_path / "file", note=notes.append)
    (tmp_path / "file").write_text("a user's file")
    assert np.array_equal(blocked.get("front", np.zeros((4, 10), np.float32), lambda: vectors), vectors)
    assert "cannot write" in notes[-1] and (tmp_path / "file").read_text() == "a user's file"

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.wav").write_text("x")
    assert main(["cache", "clear", str(tmp_path / "mine")]) == 2  # not a cache: refused, untouched
    assert (tmp_path / "mine" / "data.wav").exists()
    assert main(["cache", "info", str(tmp_path / "c")]) == 0
    assert f"{count} entries" in capsys.readouterr().out
    assert main(["cache", "clear", str(tmp_path / "c")]) == 0
    assert not (tmp_path / "c").exists()


def test_with_cutmix_in_phase_1_the_cache_is_not_used(corpus, tmp_path, capsys):
    cfg, classes, train, _ = corpus
    cutmix = cfg.replace(**{"augment.cutmix": "true", "training.phase1_epochs": "1"})
    model = build_model(cutmix, classes)
    why = "augmentation (CutMix/SpecAugment) changes the images in phase 1"
    assert bottleneck_applies(model, cutmix, 1) == (False, why)
    assert bottleneck_applies(model, cfg, 1) == (True, "")
    assert not bottleneck_applies(model, cfg, 2)[0]
    _note_once.cache_clear()
    cache = EmbeddingCache(tmp_path / "cache")
    before = model.augmentation_steps
    train_local(model, train, None, cutmix, phase=1, verbose=0, cache=cache)
    assert (cache.misses, cache.hits) == (0, 0) and not (tmp_path / "cache").exists()
    assert model.augmentation_steps > before  # the full model's augmented steps ran
    assert "phase 1 runs without the embedding cache: augmentation" in capsys.readouterr().err


def test_a_node_keeps_its_cache_where_its_data_are(corpus, tmp_path):
    from flwr.app import Context, RecordDict

    from dsl_fed.federated.keras_client import NODE_CACHE_FOLDER, node_cache

    cfg = corpus[0]

    def folder(node_config):
        context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
        return node_cache(cfg, context).folder

    (tmp_path / "site").mkdir()
    assert folder({"data-path": str(tmp_path / "site")}) == tmp_path / "site" / NODE_CACHE_FOLDER
    assert folder({"data-path": str(tmp_path / "site" / "manifest.csv")}) == tmp_path / "site" / NODE_CACHE_FOLDER
    assert folder({"data-path": str(tmp_path / "site"), "cache-path": str(tmp_path / "c")}) == tmp_path / "c"
    assert folder({"partition-id": 0, "num-partitions": 2}) == embedding_cache.run_folder(cfg)
    off = cfg.replace(**{"training.embedding_cache": "false"})
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    assert node_cache(off, context) is None
    assert head_model(build_model(cfg, 3)).name == "head"


def test_two_writers_of_one_entry_leave_one_complete_entry(tmp_path):
    """A second process writes the same entry while the first is still computing it: both get it, the file is whole."""
    waves = np.ones((4, 10), np.float32)
    vectors = np.arange(12, dtype=np.float32).reshape(4, 3)
    first, second = EmbeddingCache(tmp_path), EmbeddingCache(tmp_path)

    def slow():
        assert np.array_equal(second.get("front", waves, lambda: vectors), vectors)  # finishes first
        return vectors

    assert np.array_equal(first.get("front", waves, slow), vectors)
    (entry,) = tmp_path.glob("*.emb")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    assert np.array_equal(EmbeddingCache(tmp_path).get("front", waves, lambda: 1 / 0), vectors)  # a valid hit


def test_processes_writing_one_entry_side_by_side_never_expose_a_partial_file(tmp_path):
    """Two processes rewrite the same 2 MB entry over and over; every read in between finds it whole (or absent)."""
    import subprocess
    import sys

    writer = (
        "import sys, numpy as np\n"
        "from dsl_fed.embedding_cache import EmbeddingCache\n"
        "cache = EmbeddingCache(sys.argv[1], note=lambda line: None)\n"
        "vectors = np.arange(2000 * 256, dtype=np.float32).reshape(2000, 256)\n"
        "for _ in range(40):\n"
        "    cache._store(cache.folder / (sys.argv[2] + '.emb'), sys.argv[2], vectors)\n"
    )
    key = "k" * 64
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(tmp_path), key]) for _ in range(2)]
    reads = 0
    try:
        while any(p.poll() is None for p in procs):
            path = tmp_path / f"{key}.emb"
            if path.exists():
                found, problem = embedding_cache.read_entry(path, key, 2000)
                assert found is not None, problem
                reads += 1
    finally:
        for p in procs:
            p.wait(timeout=60)
    assert [p.returncode for p in procs] == [0, 0] and reads > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_a_simulated_client_replies_the_same_with_the_cache_and_reads_it_in_later_rounds(demo_manifest, tmp_path):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from dsl_fed.federated import model_cache
    from dsl_fed.federated.keras_client import train
    from dsl_fed.federated.run_config import config_from_run_config

    def replies(cache: bool) -> tuple[list[dict], object]:
        rc = run_config(write_config(tmp_path / str(cache), demo_manifest, model={"dropout": 0.5},
                                     training={"embedding_cache": cache, "batch_size": 8}))
        cfg = config_from_run_config(rc)
        model_cache.clear()
        full = {v.path: v.numpy() for v in build_model(cfg, 3).weights}
        context = Context(run_id=1, node_id=100, node_config={"partition-id": 0, "num-partitions": 3},
                          state=RecordDict(), run_config=dict(rc))
        out, current = [], dict(full)
        for server_round in (1, 2):
            arrays = current if server_round == 1 else {n: current[n] for n in out[-1] if "/" in n}
            config = {"server-round": server_round, "phase": 1, "full-model": server_round == 1}
            msg = Message(RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                                      "config": ConfigRecord(config)}), dst_node_id=100, message_type="train")
            reply = train(msg, context)
            assert not reply.has_error()
            update = {k: a.numpy() for k, a in reply.content["arrays"].items()}
            current.update(update)
            out.append({**update, "train-uar": reply.content["metrics"]["train-uar"]})
            if cache:
                entries = sorted(embedding_cache.run_folder(cfg).glob("*.emb"))
                assert len(entries) == 1  # the node's train chunks, embedded in round 1 and read in round 2
        model_cache.clear()
        return out, cfg

    cached, cfg = replies(True)
    plain, _ = replies(False)
    assert not (tmp_path / "False" / "runs" / ".fed.embeddings").exists()  # cache off: nothing written
    for got, want in zip(cached, plain, strict=True):
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=TOLERANCE, err_msg=name)
    assert not np.allclose(cached[0]["predictions/kernel"], cached[1]["predictions/kernel"])  # round 2 trained on
