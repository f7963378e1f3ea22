"""report.md: both intervals, labelled, and the reason when they coincide."""

import numpy as np

from dsl_fed.metrics import clip_metrics
from dsl_fed.report import render_report


def test_report_lists_the_speaker_interval_first_and_says_when_it_is_the_clip_one():
    y_true = np.tile([0, 1], 40)
    speakers = np.repeat(["a", "b"], 40)
    y_pred = np.where(speakers == "a", y_true, 1 - y_true)  # a always right, b always wrong
    probs = np.eye(2)[y_pred]
    two = clip_metrics(y_true, probs, speakers, ["x", "y"], n_boot=400)
    own = clip_metrics(y_true, probs, np.arange(80).astype(str), ["x", "y"], n_boot=400)  # no speaker column
    report = render_report("r", {"devel": two, "test": own}, {})
    lo, hi = two["ci_clips"]
    assert "| partition | clips | UAR | 95 % CI (speakers) | 95 % CI (clips) | accuracy |" in report
    assert f"| devel | 80 | 0.500 | [0.000, 1.000] | [{lo:.3f}, {hi:.3f}] | 0.500 |" in report
    assert hi - lo < 0.3  # the clip-level interval pretends 80 independent clips
    assert f"| test | 80 | 0.500 | [{lo:.3f}, {hi:.3f}] (80 speakers = clips) | [{lo:.3f}, {hi:.3f}] | 0.500 |" in report
    assert "- test: every speaker has one clip (without a speaker column each clip is its own speaker)" in report
    assert "(speakers): two-stage, resampling speakers with replacement" in report


def test_report_of_metrics_written_before_speaker_intervals_labels_them_clip_level():
    old = {"uar": 0.7, "ci": [0.6, 0.8], "accuracy": 0.7, "num_clips": 10, "classes": ["x"], "confusion": [[7]],
           "per_speaker": {}}
    assert "| devel | 10 | 0.700 | [0.600, 0.800] (clips) | [0.600, 0.800] | 0.700 |" in render_report("r", {"devel": old}, {})
