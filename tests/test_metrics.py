"""UAR, confusion matrix, bootstrap CI and per-speaker UAR with exact numbers."""

import warnings

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, confusion_matrix

from dsl_fed.errors import DslFedError
from dsl_fed.metrics import bootstrap_ci, clip_metrics, confusion, per_speaker_uar, speaker_spread, uar
from dsl_fed.report import spread_line

Y_TRUE = [0, 0, 0, 0, 1, 1, 2, 2]
Y_PRED = [0, 0, 0, 1, 1, 0, 2, 1]


def test_uar_exact():
    # recalls 3/4, 1/2, 1/2; accuracy would be 5/8
    assert uar(Y_TRUE, Y_PRED) == pytest.approx((0.75 + 0.5 + 0.5) / 3)
    assert uar([0, 1, 1, 1], [0, 1, 1, 1]) == 1.0
    assert uar([0, 1, 1, 1], [1, 1, 1, 1]) == 0.5  # majority-class guessing scores chance, not 0.75
    # a class that never occurs in y_true has no recall and does not count
    assert uar([0, 0, 1], [0, 2, 1]) == pytest.approx((0.5 + 1.0) / 2)


def test_confusion_exact():
    np.testing.assert_array_equal(confusion(Y_TRUE, Y_PRED, 3), [[3, 1, 0], [1, 1, 0], [0, 1, 1]])
    assert confusion([1], [1], 4).shape == (4, 4)
    with pytest.raises(DslFedError, match=r"class indices must be in \[0, 2\)"):
        confusion([0, 2], [0, 1], 2)


@pytest.mark.parametrize("seed", range(5))
def test_uar_and_confusion_match_scikit_learn(seed):
    """sklearn's balanced accuracy also averages recall over the classes in y_true only (it warns about the rest)."""
    rng = np.random.default_rng(seed)
    y_true = rng.choice([0, 1, 3], 50)  # class 2 never occurs in y_true but may be predicted
    y_pred = np.where(rng.random(50) < 0.6, y_true, rng.integers(0, 4, 50))
    with warnings.catch_warnings(action="ignore", category=UserWarning):
        assert uar(y_true, y_pred) == pytest.approx(balanced_accuracy_score(y_true, y_pred), abs=1e-12)
    np.testing.assert_array_equal(confusion(y_true, y_pred, 4), confusion_matrix(y_true, y_pred, labels=range(4)))


def test_input_errors():
    with pytest.raises(DslFedError, match="zero clips"):
        uar([], [])
    with pytest.raises(DslFedError, match="3 entries but y_pred has 2"):
        uar([0, 1, 1], [0, 1])


def _predictions(n: int, accuracy: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 3, n)
    wrong = rng.random(n) > accuracy
    y_pred = np.where(wrong, (y_true + rng.integers(1, 3, n)) % 3, y_true)
    return y_true, y_pred


def test_bootstrap_ci_contains_estimate_and_narrows_with_n():
    widths = []
    for n in (60, 600, 6000):
        y_true, y_pred = _predictions(n, 0.7)
        low, high = bootstrap_ci(y_true, y_pred, n=1000, seed=0)
        assert low <= uar(y_true, y_pred) <= high
        widths.append(high - low)
    assert widths[0] > 2 * widths[1] > 4 * widths[2]  # ~ 1/sqrt(n): factor sqrt(10) per step
    assert 0.15 < widths[0] < 0.35  # 95 % of a binomial-ish proportion at n=60: about 4 * sqrt(.7 * .3 / 60)


def test_bootstrap_ci_is_seeded():
    y_true, y_pred = _predictions(80, 0.6)
    assert bootstrap_ci(y_true, y_pred, seed=3) == bootstrap_ci(y_true, y_pred, seed=3)
    assert bootstrap_ci(y_true, y_pred, seed=3) != bootstrap_ci(y_true, y_pred, seed=4)
    assert bootstrap_ci([0, 1, 2], [0, 1, 2]) == (1.0, 1.0)


def test_per_speaker_uar_exact():
    speakers = ["b", "b", "a", "a", "a", "b", "a", "b"]
    # a: true [0, 0, 1, 2] pred [0, 1, 1, 2] -> (1/2 + 1 + 1) / 3;  b: true [0, 0, 1, 2] pred [0, 0, 0, 1] -> (1 + 0 + 0) / 3
    assert per_speaker_uar(Y_TRUE, Y_PRED, speakers) == {"a": pytest.approx(2.5 / 3), "b": pytest.approx(1 / 3)}
    assert list(per_speaker_uar(Y_TRUE, Y_PRED, speakers)) == ["a", "b"]


def test_clip_metrics_from_probabilities():
    probs = np.eye(3)[Y_PRED] * 0.6 + 0.1
    result = clip_metrics(np.array(Y_TRUE), probs, np.array(["s"] * 8), ["x", "y", "z"], n_boot=200)
    assert result["uar"] == pytest.approx(1.75 / 3) and result["accuracy"] == pytest.approx(5 / 8)
    assert result["confusion"] == [[3, 1, 0], [1, 1, 0], [0, 1, 1]]
    assert result["num_clips"] == 8 and result["classes"] == ["x", "y", "z"]
    assert result["ci"][0] <= result["uar"] <= result["ci"][1]
    assert result["per_speaker"] == {"s": pytest.approx(1.75 / 3)}


def test_speaker_spread_exact_on_hand_made_predictions():
    # 5 speakers, 2 classes, 2 clips per class each; per-speaker UAR = mean of the two class recalls
    y_true = [0, 0, 1, 1] * 5
    y_pred = [0, 0, 1, 1,  0, 1, 1, 1,  1, 1, 1, 1,  0, 0, 0, 1,  1, 1, 0, 0]
    speakers = [s for s in "abcde" for _ in range(4)]
    per_speaker = per_speaker_uar(y_true, y_pred, speakers)
    assert per_speaker == {"a": 1.0, "b": 0.75, "c": 0.5, "d": 0.75, "e": 0.0}
    spread = speaker_spread(per_speaker)
    assert spread == {"speakers": 5, "min": 0.0, "median": 0.75, "max": 1.0,
                      "std": pytest.approx(np.std([1.0, 0.75, 0.5, 0.75, 0.0])), "worst_10pct": 0.0,
                      "worst_speakers": ["e"]}
    assert spread["std"] == pytest.approx(0.3391164992)  # population std: sqrt(0.575 / 5)


def test_speaker_spread_worst_ten_percent_rounds_up_and_breaks_ties_by_name():
    per_speaker = {f"s{i:02d}": 0.5 + 0.04 * i for i in range(11)} | {"s03": 0.5, "s07": 0.2}
    spread = speaker_spread(per_speaker)  # 11 speakers -> ceil(1.1) = 2 worst
    assert spread["worst_speakers"] == ["s07", "s00"] and spread["worst_10pct"] == pytest.approx(0.35)
    assert spread["median"] == pytest.approx(0.66) and spread["max"] == pytest.approx(0.9)
    with pytest.raises(DslFedError):
        speaker_spread({})


def test_clip_metrics_and_report_carry_the_speaker_spread():
    probs = np.eye(3)[Y_PRED]
    result = clip_metrics(np.array(Y_TRUE), probs, np.array(["b", "b", "a", "a", "a", "b", "a", "b"]), ["x", "y", "z"],
                          n_boot=50)
    spread = result["speaker_spread"]
    assert spread["min"] == pytest.approx(1 / 3) and spread["max"] == pytest.approx(2.5 / 3)
    assert spread["worst_speakers"] == ["b"] and spread["std"] == pytest.approx(0.75 / 3)
    assert spread_line(spread) == ("Speaker spread (2 speakers): min 0.333, median 0.583, max 0.833, std 0.250; "
                                   "worst 10 % (b) 0.333")
