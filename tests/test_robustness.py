"""Robustness perturbations: exact SNR, exact label-flip share, seeded client dropout, skewed shards, and the
client really training on the perturbed copy (never the files)."""

import hashlib

import numpy as np
import pytest
from flower_helpers import task_identity  # noqa: F401 (autouse fixture)
from flwr.app import ArrayRecord, ConfigRecord

from dsl_fed.config import RobustnessConfig, from_dict
from dsl_fed.data.pipeline import ChunkSet
from dsl_fed.errors import DslFedError
from dsl_fed.robustness import add_noise, dropped_clients, flip_labels, perturb_client, skew_shard
from test_strategy import FakeGrid, strategy


def chunk_set(clips: int = 20, per_clip: int = 3, classes: int = 3) -> ChunkSet:
    rng = np.random.default_rng(0)
    n = clips * per_clip
    t = np.arange(1600) / 16000
    waves = np.stack([np.sin(2 * np.pi * rng.uniform(100, 900) * t) * rng.uniform(0.1, 1) for _ in range(n)])
    clip_ids = np.repeat(np.arange(clips), per_clip).astype(np.int32)
    return ChunkSet(waves.astype(np.float32), (clip_ids % classes).astype(np.int32), clip_ids,
                    np.array(["s"] * n))


def clips(chunks: ChunkSet) -> int:
    return int(np.unique(chunks.clip_ids).size)


@pytest.mark.parametrize("snr_db", [-5.0, 0.0, 10.0, 30.0])
def test_noise_is_added_at_the_target_snr(snr_db):
    chunks = chunk_set()
    noisy = add_noise(chunks.waveforms, snr_db, np.random.default_rng(1))
    noise = noisy.astype(np.float64) - chunks.waveforms
    measured = 10 * np.log10(np.mean(chunks.waveforms.astype(np.float64) ** 2, axis=1) / np.mean(noise ** 2, axis=1))
    assert np.all(np.abs(measured - snr_db) < 0.5)
    assert np.abs(measured - snr_db).max() < 0.01  # exact up to float32 rounding of the sum
    assert noisy.dtype == np.float32 and noisy.shape == chunks.waveforms.shape


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.95])
def test_label_flip_changes_exactly_that_share_of_clips_and_all_their_chunks(fraction):
    chunks = chunk_set(clips=20)
    flipped = flip_labels(chunks, fraction, 3, np.random.default_rng(2))
    changed_clips = np.unique(chunks.clip_ids[flipped.labels != chunks.labels])
    assert changed_clips.size == round(fraction * 20)
    for clip in changed_clips:  # a flipped clip is wrong in every chunk, with one label
        mask = chunks.clip_ids == clip
        assert np.all(flipped.labels[mask] != chunks.labels[mask]) and np.unique(flipped.labels[mask]).size == 1
    np.testing.assert_array_equal(flipped.waveforms, chunks.waveforms)
    with pytest.raises(DslFedError):
        flip_labels(chunks, 1.5, 3, np.random.default_rng(2))


def test_dropout_removes_the_configured_share_per_round_seeded():
    assert dropped_clients(10, 0.3, seed=0, server_round=1).size == 3
    np.testing.assert_array_equal(dropped_clients(10, 0.3, 0, 1), dropped_clients(10, 0.3, 0, 1))
    rounds = {tuple(dropped_clients(10, 0.3, 0, r)) for r in range(1, 8)}
    assert len(rounds) > 1  # a different subset each round
    assert dropped_clients(10, 0.0, 0, 1).size == 0 and dropped_clients(3, 0.5, 0, 1).size == 2


def test_strategy_sends_training_only_to_the_clients_that_stay():
    s = strategy(client_dropout=0.4, min_train_nodes=1)
    grid = FakeGrid(nodes=list(range(20, 30)))
    for rnd in (1, 2):
        msgs = list(s.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid))
        assert len(msgs) == 6 and s.rounds[rnd].sampled == 10 and s.rounds[rnd].dropped == 4
    kept = {m.metadata.dst_node_id for m in msgs}
    again = strategy(client_dropout=0.4, min_train_nodes=1)
    again.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
    assert {m.metadata.dst_node_id for m in again.configure_train(2, ArrayRecord(), ConfigRecord(), grid)} == kept


def test_skewed_shards_keep_whole_clips():
    chunks = chunk_set(clips=20)
    small = skew_shard(chunks, 0.2, np.random.default_rng(3))
    assert np.unique(small.clip_ids).size == 4 and len(small) == 12


def test_client_trains_on_a_perturbed_copy_and_the_files_stay_untouched(demo_manifest, tmp_path):
    from dsl_fed.data.nodes import node_data
    from dsl_fed.federated.keras_client import train_chunks

    def shard(cfg, node):
        data = node_data(node, cfg.data, None)
        return train_chunks(cfg, data, int(node["partition-id"])), list(data.classes)

    files = sorted(demo_manifest.parent.rglob("*.wav"))
    before = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()
    raw = {"data": {"manifest": str(demo_manifest), "chunk_seconds": 1.0, "hop_seconds": 0.5, "shards": 2},
           "output": {"directory": str(tmp_path)}}
    node = {"partition-id": 1, "num-partitions": 2}
    clean, classes = shard(from_dict(raw), node)
    rob = {"noise_snr_db": 10.0, "label_flip": 0.5, "shard_skew": 0.5}
    noisy, _ = shard(from_dict({**raw, "robustness": rob}), node)
    assert clips(noisy) == round(0.5 * clips(clean))  # partition 1 is not the big client
    kept = np.isin(clean.clip_ids, noisy.clip_ids)
    flipped = np.unique(noisy.clip_ids[noisy.labels != clean.labels[kept]])
    assert flipped.size == round(0.5 * clips(noisy))
    assert not np.allclose(noisy.waveforms, clean.waveforms[kept])
    first, _ = shard(from_dict({**raw, "robustness": rob, "data": {**raw["data"]}}), {"partition-id": 0,
                                                                                         "num-partitions": 2})
    assert clips(first) == clips(shard(from_dict(raw), {"partition-id": 0, "num-partitions": 2})[0])
    np.testing.assert_array_equal(shard(from_dict({**raw, "robustness": rob}), node)[0].labels, noisy.labels)
    assert hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest() == before
    assert perturb_client(clean, RobustnessConfig(), len(classes), 1, 0) is clean


def test_config_rejects_out_of_range_perturbations(tmp_path):
    for key, value in (("label_flip", 1.0), ("client_dropout", -0.1), ("noise_snr_db", 200.0)):
        with pytest.raises(DslFedError, match=f"robustness.{key}"):
            from_dict({"data": {"manifest": "x.csv"}, "robustness": {key: value}})


def test_robustness_table_compares_each_level_with_the_base_run(tmp_path):
    from simulations.robustness import write

    def row(devel, key=None, level=None, seed=0):
        r = {"devel_uar": str(devel), "test_uar": str(devel - 0.1), "devel_worst_speaker_uar": str(devel - 0.2),
             "seed": str(seed), "robustness.noise_snr_db": "", "robustness.label_flip": ""}
        if key:
            r[key] = level
        return r

    rows = [row(0.9), row(0.8, seed=1), row(0.7, "robustness.noise_snr_db", "10"),
            row(0.5, "robustness.noise_snr_db", "0"), row(0.6, "robustness.label_flip", "0.4")]
    write(tmp_path, rows, {"snr": ["10", "0"], "flip": ["0.4"], "dropout": [], "skew": []})
    table = (tmp_path / "robustness.md").read_text()
    assert "| none (base) | - | 0.850 | - | 0.750 | 0.650 | 2 |" in table
    assert "| additive white noise | 0 | 0.500 | -35.0 points | 0.400 | 0.300 | 1 |" in table
    assert "| flipped training labels | 0.4 | 0.600 | -25.0 points |" in table
    assert (tmp_path / "robustness.png").stat().st_size > 5_000
