"""Result headers of the privacy and poisoning grids state numbers counted from the corpus and config, not prose."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import benchmark_module
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # simulations/ is a folder of the repo, not installed
from simulations.run_setting import RunSetting, run_setting  # noqa: E402

QUICKSTART = REPO / "configs" / "quickstart.yaml"
# Deliberately not the quickstart's numbers (3 clients of 2, 3 classes, delta 1e-5, f = 1).
FAKE = RunSetting(corpus_speakers=13, client_speakers=(3, 2, 2, 2), devel_speakers=5, classes=4,
                  sampled_per_round=2, delta=1e-7, clipping="adaptive", num_malicious=2)


def _privacy_module():
    return benchmark_module.load("privacy")


def test_the_texts_say_the_counts():
    assert FAKE.clients_text() == "4 clients of 2-3 speakers"
    assert FAKE.sampling_text() == "2 of 4 sampled per round"
    assert FAKE.devel_text() == "5 held-out devel speakers, 4 classes, chance 0.250"
    one = RunSetting(7, (1,) * 7, 1, 2, 7, 1e-5, "fixed", 1)
    assert (one.clients_text(), one.sampling_text()) == ("7 clients of 1 speaker", "all sampled every round")
    assert one.devel_text() == "1 held-out devel speaker, 2 classes, chance 0.500"


@pytest.mark.parametrize("overrides, clients, sampled", [
    (["data.shards=0"], (1, 1, 1, 1), 4),
    (["data.shards=2"], (2, 2), 2),
    (["data.shards=3"], (1, 1, 2), 3),
    (["data.shards=0", "federated.fraction_train=0.5", "federated.min_train_nodes=1"], (1, 1, 1, 1), 2),
])
def test_run_setting_counts_what_a_run_of_the_config_would_use(demo_manifest, overrides, clients, sampled):
    setting = run_setting(QUICKSTART, [f"data.manifest={demo_manifest}", *overrides])
    assert (setting.corpus_speakers, setting.devel_speakers, setting.classes) == (8, 2, 3)
    assert (tuple(sorted(setting.client_speakers)), setting.sampled_per_round) == (clients, sampled)
    assert (setting.delta, setting.clipping, setting.num_malicious) == (1e-5, "fixed", 1)  # the config defaults


def test_run_setting_takes_classes_and_dp_settings_from_the_data_and_config(demo_manifest, tmp_path):
    with open(demo_manifest, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["label"] != "rising"]
    two_classes = tmp_path / "manifest.csv"
    with two_classes.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**row, "filename": str(demo_manifest.parent / row["filename"])} for row in rows)
    setting = run_setting(QUICKSTART, [f"data.manifest={two_classes}", "federated.dp.delta=1e-6",
                                       "federated.dp.clipping=adaptive", "federated.num_malicious=2"])
    assert (setting.classes, setting.chance) == (2, 0.5)
    assert (setting.delta, setting.clipping, setting.num_malicious) == (1e-6, "adaptive", 2)


def test_privacy_header_is_rendered_from_the_setting():
    module = _privacy_module()
    args = argparse.Namespace(rounds=4, noise="0.1,1", epsilons=None, clip_norm=0.5, overrides=["training.seed=3"],
                              data=Path("/x/my_corpus"), config=module.CONFIG)
    text = module.header(args, FAKE)
    assert text.startswith("`python benchmarks/privacy.py --rounds 4 --noise 0.1,1 --clip-norm 0.5 training.seed=3`")
    at_scale = module.header(argparse.Namespace(**{**vars(args), "epsilons": "1,8", "config": REPO / "configs" / "arousal.yaml"}), FAKE)
    assert at_scale.startswith("`python benchmarks/privacy.py --rounds 4 --epsilons 1,8 --clip-norm 0.5 "
                               "--config configs/arousal.yaml training.seed=3`: config `configs/arousal.yaml`")
    for part in ("config `configs/quickstart.yaml`", "13-speaker corpus `my_corpus`", "4 clients of 2-3 speakers (2 of 4 sampled per round)",
                 "client-side adaptive clipping at 0.5", "4 rounds", "epsilon at delta 1e-07",
                 "(5 held-out devel speakers, 4 classes, chance 0.250)"):
        assert part in text
    for stale in ("3 clients of 2", "3 classes", "0.333", "1e-5", "10-speaker"):
        assert stale not in text


def test_poisoning_header_is_rendered_from_the_setting():
    from simulations.poisoning import header

    args = argparse.Namespace(rounds=5, speakers=13, strategies="fedavg,krum", attacks="noise", overrides=[])
    text = header(args, FAKE, runs=4, cpu_minutes=12.4)
    for part in ("13-speaker demo corpus, 4 clients of 2-3 speakers (2 of 4 sampled per round;",
                 "2f + 3 = 7, Bulyan 4f + 3 = 11 for f = 2 attackers", "5 rounds (1 + 4)",
                 "(5 held-out devel speakers, 4 classes, chance 0.250)", "4 runs, 12 CPU-minutes"):
        assert part in text
    for stale in ("one client per training speaker", "3 classes", "0.333", "= 5,", "f = 1 "):
        assert stale not in text
