"""benchmarks/local_update_screen.py: its loop learns a learnable task in every mode; the table is the runs'."""

import argparse
import types

import numpy as np
import pytest

import benchmark_module

bench = benchmark_module.load("local_update_screen")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """6 training speakers of 12 chunks, 2 + 2 held-out ones; the class is the image's brightness."""
    rng = np.random.default_rng(0)

    def part(speakers, first_clip):
        n = 12 * speakers
        y = np.repeat(np.tile(np.arange(3), n // 6), 2)  # two chunks per clip
        x = (y[:, None, None, None] - 1.0 + rng.normal(0, 0.1, (n, 64, 64, 3))).astype(np.float32)  # in [-1, 1]
        return x, y.astype(np.int32), first_clip + np.arange(n) // 2, np.repeat([f"s{first_clip}-{k}" for k in range(speakers)], 12)

    arrays = {}
    for name, speakers, first in (("train", 6, 0), ("devel", 2, 1000), ("test", 2, 2000)):
        x, y, clip, speaker = part(speakers, first)
        arrays.update({f"{name}_x": x, f"{name}_y": y, f"{name}_clip": clip, f"{name}_speaker": speaker})
    path = tmp_path_factory.mktemp("screen") / "images.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("mode, settings", [
    ("central", {"epochs": 15}),
    ("train", {"epochs": 3, "K": 0, "rounds": 10, "server": "mean"}),
    ("gradient", {"K": 6, "rounds": 60, "eta": 0.02}),
])
def test_every_mode_learns_a_task_that_can_be_learned(images, mode, settings):
    result = bench.run(images, mode, settings, seed=0)
    assert result["devel"] > 0.9 and result["test"] > 0.9


def test_the_table_reports_each_row_and_its_gap_to_central():
    runs = {("central, 1 + 15 epochs", 0): {"devel": 0.7, "test": 0.8},
            ("fedsgd, 8 of 36, fedadam 0.01, 200 rounds", 0): {"devel": 0.68, "test": 0.83}}
    manifest = types.SimpleNamespace(classes=["a", "b", "c"], speakers=lambda p: ["x"] * {"train": 36}.get(p, 12))
    report = bench.render(runs, argparse.Namespace(seeds=1), manifest, 0.0, 0.5)
    assert "36/12/12 train / devel / test speakers, 3 classes (chance 0.333)" in report
    assert "| fedsgd, 8 of 36, fedadam 0.01, 200 rounds | 0.680 | 0.830 | -2.0 points | +3.0 points |" in report
