"""`dsl_fed baseline`: the DeepSpectrum + SVM reference on the demo corpus, checked against scikit-learn."""

import json
import math

import numpy as np
import pytest
import yaml
from conftest import tiny_settings
from sklearn.metrics import balanced_accuracy_score

from dsl_fed.baseline import C_GRID, chunk_scores, fit_svm
from dsl_fed.cli import main
from dsl_fed.config import from_dict, load_config
from dsl_fed.data.manifest import read_manifest
from dsl_fed.data.pipeline import load_chunks
from dsl_fed.models import build_embedder
from dsl_fed.predict import average_by_clip

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def baseline_run(demo_manifest, tmp_path_factory):
    """One `dsl_fed baseline --fuse-dev` on the tiny preset (random tiny CNN embeddings, 32x32 images)."""
    folder = tmp_path_factory.mktemp("baseline")
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_settings(demo_manifest, folder / "runs", "tiny")))
    assert main(["baseline", str(config), "--fuse-dev", "--verbose", "0"]) == 0
    return config, folder / "runs" / "tiny-baseline"


@pytest.mark.slow  # embeds the demo corpus and fits 8 SVMs: ~20 s on 2 cores
def test_baseline_beats_chance_and_its_uar_is_sklearns_balanced_accuracy(baseline_run):
    config, run = baseline_run
    cfg = load_config(config)
    metrics = json.loads((run / "metrics.json").read_text())
    devel, test = metrics["devel"], metrics["test"]
    chance = 1 / 3
    for m in (devel, test, metrics["test_train_only"]):
        # chance UAR plus 3 standard deviations of a chance-level score on this many clips
        assert m["uar"] > chance + 3 * math.sqrt(chance * (1 - chance) / m["num_clips"])
        assert m["ci"][0] <= m["uar"] <= m["ci"][1] and set(m["per_speaker"])
    assert metrics["training"]["best_c"] in C_GRID and metrics["training"]["embedding_dim"] == 32

    # Recompute the devel predictions with the selected C and score them with scikit-learn.
    manifest = read_manifest(cfg.data.manifest)
    train, dev = (load_chunks(manifest.partition(p), cfg.data, manifest.classes, progress=False) for p in ("train", "devel"))
    embedder = build_embedder(cfg)
    features = {name: embedder.predict(chunks.waveforms, verbose=0) for name, chunks in (("train", train), ("devel", dev))}
    svm = fit_svm(features["train"], train.labels, 3, metrics["training"]["best_c"], cfg)
    _, clip_scores, clip_labels, _ = average_by_clip(chunk_scores(svm, features["devel"]), dev)
    predicted = clip_scores.argmax(axis=1)
    assert devel["uar"] == pytest.approx(balanced_accuracy_score(clip_labels, predicted), abs=1e-9)
    assert devel["confusion"] == np.bincount(clip_labels * 3 + predicted, minlength=9).reshape(3, 3).tolist()

    rows = (run / "c_search.csv").read_text().splitlines()
    assert rows[0] == "C,devel_uar,converged" and len(rows) == 1 + len(C_GRID)
    best_row = max((line.split(",") for line in rows[1:]), key=lambda r: float(r[1]))
    assert float(best_row[0]) == metrics["training"]["best_c"] and float(best_row[1]) == pytest.approx(devel["uar"])
    report = (run / "report.md").read_text()
    assert "DeepSpectrum + SVM" in report and f"| devel | {devel['num_clips']} | {devel['uar']:.3f} |" in report
    assert (run / "plots" / "confusion_test.png").read_bytes()[:8] == PNG_MAGIC
    assert (run / "svm.joblib").stat().st_size > 0 and (run / "config.yaml").is_file()
    assert not (run.parent / "tiny").exists()  # a central run of the same config keeps its own folder


def test_an_existing_baseline_run_needs_overwrite(baseline_run, capsys):
    config, run = baseline_run
    before = (run / "metrics.json").read_bytes()
    assert main(["baseline", str(config), "--verbose", "0"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and (run / "metrics.json").read_bytes() == before


def test_two_classes_get_one_score_column_per_class():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-1, 1, (20, 4)), rng.normal(1, 1, (20, 4))])
    y = np.repeat([0, 1], 20)
    cfg = from_dict({"data": {"manifest": "unused.csv"}})
    scores = chunk_scores(fit_svm(x, y, 2, 1.0, cfg), x)
    assert scores.shape == (40, 2) and (scores.argmax(axis=1) == y).mean() > 0.8


def test_bad_config_is_one_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  manifest: missing.csv\n")
    assert main(["baseline", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsl_fed baseline: error:") and "missing.csv" in err and "\n" not in err
