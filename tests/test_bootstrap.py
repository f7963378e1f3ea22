"""Clip-level and two-stage (speaker, then clip) bootstrap intervals on cases whose answer is known."""

import time

import numpy as np
import pytest

from dsl_fed.bootstrap import (
    _two_stage_counts,
    _uars,
    bootstrap_ci,
    ci_fields,
    ci_text,
    confusion_table,
    outcome_table,
    speaker_bootstrap_ci,
)
from dsl_fed.errors import DslFedError
from dsl_fed.metrics import clip_metrics, confusion, confusion_metrics, uar


def _opposite_speakers(clips_each: int = 300):
    """Speaker a is always right, speaker b always wrong; 3 balanced classes each."""
    y_true = np.tile([0, 1, 2], 2 * clips_each // 3)
    speakers = np.repeat(["a", "b"], clips_each)
    y_pred = np.where(speakers == "a", y_true, (y_true + 1) % 3)
    return y_true, y_pred, speakers


def _naive_two_stage(y_true, y_pred, speakers, n, rng):
    """The definition, one resample at a time: draw speakers, then each drawn speaker's clips."""
    names = sorted(set(speakers))
    clips = {s: np.flatnonzero(speakers == s) for s in names}
    scores = []
    for _ in range(n):
        picked = np.concatenate([rng.choice(clips[s], clips[s].size) for s in rng.choice(names, len(names))])
        scores.append(uar(y_true[picked], y_pred[picked]))
    return np.array(scores)


def test_opposite_speakers_clip_ci_is_narrow_and_speaker_ci_spans_everything():
    y_true, y_pred, speakers = _opposite_speakers()
    assert uar(y_true, y_pred) == pytest.approx(0.5)
    low, high = bootstrap_ci(y_true, y_pred, seed=0)
    assert low < 0.5 < high and high - low < 0.1  # 600 "independent" clips: a few points either side
    # A quarter of the resamples draw speaker a twice (UAR 1), a quarter b twice (UAR 0).
    assert speaker_bootstrap_ci(y_true, y_pred, speakers, seed=0) == (0.0, 1.0)


def test_one_speaker_or_one_clip_per_speaker_gives_exactly_the_clip_interval():
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 3, 200)
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 3, 200))
    clip = bootstrap_ci(y_true, y_pred, seed=5)
    assert speaker_bootstrap_ci(y_true, y_pred, ["only"] * 200, seed=5) == clip
    assert speaker_bootstrap_ci(y_true, y_pred, np.arange(200), seed=5) == clip  # no speaker column
    one = ci_fields(outcome_table(y_true, y_pred, ["only"] * 200), seed=5)
    own = ci_fields(outcome_table(y_true, y_pred, np.arange(200)), seed=5)
    assert one["ci"] == one["ci_clips"] == own["ci"] == list(clip)
    assert one["ci_level"] == own["ci_level"] == "speakers = clips" and (one["ci_groups"], own["ci_groups"]) == (1, 200)
    assert "one speaker only" in one["ci_note"] and "each clip is its own speaker" in own["ci_note"]


@pytest.mark.parametrize("scale", [1, 4])  # speakers below and above `SMALL` clips (two ways of drawing)
def test_two_stage_resamples_follow_the_definition(scale):
    """Mean and spread of the resampled UAR match a clip-by-clip implementation of the two stages."""
    rng = np.random.default_rng(2)
    sizes = [scale * s for s in (3, 7, 20, 20, 40, 9)]  # uneven speakers, one always right
    speakers = np.repeat(np.arange(len(sizes)), sizes)
    y_true = rng.integers(0, 3, speakers.size)
    skill = np.array([0.9, 0.3, 0.6, 1.0, 0.5, 0.2])[speakers]
    y_pred = np.where(rng.random(speakers.size) < skill, y_true, (y_true + 1) % 3)
    n = 4000
    fast = np.concatenate([_uars(c) for c in _two_stage_counts(outcome_table(y_true, y_pred, speakers), n,
                                                               np.random.default_rng(0))])
    slow = _naive_two_stage(y_true, y_pred, speakers, n, np.random.default_rng(1))
    se = slow.std() / np.sqrt(n)
    assert abs(fast.mean() - slow.mean()) < 4 * se * np.sqrt(2)
    assert fast.std() == pytest.approx(slow.std(), rel=0.06)
    assert fast.std() > 0.1  # speakers from 0.2 to 1.0: far wider than clip resampling of 99 clips gives


def test_clip_bootstrap_follows_the_definition():
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 3, 90)
    y_pred = np.where(rng.random(90) < 0.6, y_true, rng.integers(0, 3, 90))
    low, high = bootstrap_ci(y_true, y_pred, n=4000, seed=0)
    picks = np.random.default_rng(1).integers(0, 90, (4000, 90))
    ref = np.quantile([uar(y_true[i], y_pred[i]) for i in picks], [0.025, 0.975])
    assert (low, high) == pytest.approx(tuple(ref), abs=0.02)


def test_seeded_and_deterministic():
    y_true, y_pred, speakers = _opposite_speakers(30)
    y_pred = y_pred.copy()
    y_pred[::7] = 0  # not all-or-nothing, so different seeds give different intervals
    speakers = np.array([f"s{i % 6}" for i in range(y_true.size)])
    a = speaker_bootstrap_ci(y_true, y_pred, speakers, seed=3)
    assert a == speaker_bootstrap_ci(y_true, y_pred, speakers, seed=3)
    assert a != speaker_bootstrap_ci(y_true, y_pred, speakers, seed=4)
    assert bootstrap_ci([0, 1, 2], [0, 1, 2]) == (1.0, 1.0)


@pytest.mark.parametrize("speakers", [40, 500, 2000])  # 250, 20 and 5 clips per speaker
def test_1000_resamples_of_10k_clips_take_well_under_a_second(speakers):
    rng = np.random.default_rng(4)
    y_true = rng.integers(0, 4, 10_000)
    y_pred = np.where(rng.random(10_000) < 0.7, y_true, rng.integers(0, 4, 10_000))
    groups = rng.integers(0, speakers, 10_000)
    start = time.process_time()  # CPU time: other jobs on the machine do not count
    speaker_bootstrap_ci(y_true, y_pred, groups, n=1000)
    assert time.process_time() - start < 0.5


def test_node_level_interval_from_confusion_counts():
    """Federated evaluation: per-node confusion counts give the same interval as the nodes' clips with the
    node as the speaker, and the summed counts give the clip-level one."""
    rng = np.random.default_rng(5)
    nodes = [(rng.integers(0, 3, n), rng.integers(0, 3, n)) for n in (30, 12, 50)]
    nodes[1] = (nodes[1][0], nodes[1][0])  # one node always right
    y_true = np.concatenate([t for t, _ in nodes])
    y_pred = np.concatenate([p for _, p in nodes])
    owner = np.repeat([0, 1, 2], [30, 12, 50])
    per_node = np.stack([confusion(t, p, 3) for t, p in nodes])
    scores = confusion_metrics(per_node, ["x", "y", "z"], seed=2)
    assert scores["uar"] == pytest.approx(uar(y_true, y_pred), abs=1e-12) and scores["num_clips"] == 92
    assert scores["ci"] == list(speaker_bootstrap_ci(y_true, y_pred, owner, seed=2))
    assert scores["ci_clips"] == list(bootstrap_ci(y_true, y_pred, seed=2))
    assert scores["ci_level"] == "nodes" and scores["ci_groups"] == 3 and "resamples nodes" in scores["ci_note"]
    np.testing.assert_array_equal(confusion_table(per_node), outcome_table(y_true, y_pred, owner))
    summed = confusion_metrics(per_node.sum(axis=0), ["x", "y", "z"], seed=2)
    assert summed["ci"] == summed["ci_clips"] == scores["ci_clips"] and summed["ci_level"] == "clips"


def test_clip_metrics_reports_both_intervals_labelled():
    y_true, y_pred, speakers = _opposite_speakers(30)
    m = clip_metrics(y_true, np.eye(3)[y_pred], speakers, ["x", "y", "z"], n_boot=500)
    assert m["ci"] == [0.0, 1.0] and m["ci_level"] == "speakers" and m["ci_groups"] == 2
    assert m["ci_clips"][0] > 0.3 and m["ci_clips"][1] < 0.7
    assert ci_text(m) == f"95 % CI (speakers) [0.000, 1.000], (clips) [{m['ci_clips'][0]:.3f}, {m['ci_clips'][1]:.3f}]"
    assert ci_text({"uar": 0.5, "ci": [0.4, 0.6]}) == "95 % CI (clips) [0.400, 0.600]"  # written before


def test_bad_input_is_one_clear_error():
    with pytest.raises(DslFedError, match="3 labels, 3 predictions, 2 speakers"):
        speaker_bootstrap_ci([0, 1, 1], [0, 1, 0], ["a", "b"])
    with pytest.raises(DslFedError, match="n >= 1"):
        bootstrap_ci([0, 1], [0, 1], n=0)
