"""`dsl_fed train --central` on the demo corpus end to end, and `dsl_fed evaluate` on its model."""

import json
import math

import keras
import pytest

from dsl_fed.cli import main
from dsl_fed.io import read_history

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _chance_margin(num_clips: int, classes: int = 3, sds: float = 3.0) -> float:
    """Chance UAR plus `sds` standard deviations of a chance-level score on `num_clips` clips."""
    p = 1 / classes
    return p + sds * math.sqrt(p * (1 - p) / num_clips)


@pytest.mark.slow
def test_central_run_writes_the_run_folder_and_beats_chance(tiny_config, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(tiny_config.to_yaml())
    assert main(["train", "--central", str(config), "--verbose", "0"]) == 0
    run = tmp_path / "runs" / "tiny"

    metrics = json.loads((run / "metrics.json").read_text())
    devel, test = metrics["devel"], metrics["test"]
    # Chance UAR is 1/3. Devel picked the epoch, so its score is optimistically biased; test was never looked at.
    # Both must clear chance by 3 standard deviations of a chance-level score on that many clips (~0.49 for 36
    # clips); the tiny CNN reaches ~0.8-1.0 on this corpus, so the margin is wide on both sides.
    assert devel["uar"] >= max(0.6, _chance_margin(devel["num_clips"]))
    assert test["uar"] >= _chance_margin(test["num_clips"])
    assert devel["ci"][0] <= devel["uar"] <= devel["ci"][1]
    assert set(devel["per_speaker"]) and all(0 <= v <= 1 for v in devel["per_speaker"].values())
    assert metrics["training"]["phase1_epochs"] == 1 and metrics["training"]["phase2_epochs"] == 15

    rows = read_history(run / "history.csv")
    assert len(rows) == 16 and rows[0]["phase"] == 1 and rows[-1]["phase"] == 2
    assert max(r["val_uar"] for r in rows) == pytest.approx(devel["uar"])  # the best epoch was restored
    assert (run / "config.yaml").read_text() == tiny_config.to_yaml()
    report = (run / "report.md").read_text()
    assert f"| devel | {devel['num_clips']} | {devel['uar']:.3f} |" in report
    for png in ("training", "confusion_devel", "confusion_test"):
        assert (run / "plots" / f"{png}.png").read_bytes()[:8] == PNG_MAGIC
    assert (run / "checkpoints" / "best.keras").is_file()
    assert not list(run.glob("**/.*tmp*"))
    out = capsys.readouterr().out
    assert f"devel: UAR {devel['uar']:.3f}" in out

    # evaluate the saved model: same numbers as the run reported
    assert main(["evaluate", str(run / "model.keras"), "--config", str(config), "--partition", "test",
                 "--json", str(tmp_path / "eval.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"test: UAR {test['uar']:.3f}, 95 % CI (speakers) [{test['ci'][0]:.3f}, {test['ci'][1]:.3f}], "
                          f"(clips) [{test['ci_clips'][0]:.3f}, {test['ci_clips'][1]:.3f}]")
    assert json.loads((tmp_path / "eval.json").read_text())["uar"] == pytest.approx(test["uar"])


@pytest.mark.slow
def test_fuse_dev_retrains_on_train_plus_devel(tiny_config, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(tiny_config.to_yaml())
    assert main(["train", "--central", str(config), "training.phase2_epochs=4", "output.name=fused", "--fuse-dev", "--verbose", "0"]) == 0
    run = tmp_path / "runs" / "fused"
    metrics = json.loads((run / "metrics.json").read_text())
    training = metrics["training"]
    epochs = training["fused_epochs"]
    assert epochs == [training["phase1_best_epoch"], training["phase2_best_epoch"]]
    fused_rows = read_history(run / "fused" / "history.csv")
    assert len(fused_rows) == sum(epochs) and "val_uar" not in fused_rows[0]
    assert {"devel", "test", "test_train_only"} <= set(metrics)
    assert (run / "plots" / "training_fused.png").is_file()
    model = keras.saving.load_model(run / "model.keras")
    assert model.output_shape == (None, 3)


def test_cli_errors_are_one_line(tiny_config, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(tiny_config.to_yaml())
    assert main(["train", "--central", str(config), "training.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown config key training.epochs" in err

    model = tmp_path / "model.keras"
    assert main(["evaluate", str(model), "--config", str(config)]) == 2
    assert "model.keras: model file not found" in capsys.readouterr().err


def test_keras_progress_is_one_line_per_epoch_unless_stdout_is_a_terminal(monkeypatch):
    from dsl_fed.cli.train import verbosity

    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    assert verbosity(None) == 2 and verbosity(0) == 0
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert verbosity(None) == 1 and verbosity(2) == 2
