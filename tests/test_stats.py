"""Table-4 statistics: FLOP counting, the measurement subprocess, the table and `dsl_fed stats`."""

import math

import pytest

from dsl_fed.cli import main
from dsl_fed.litert import count_parameters
from dsl_fed.stats import StatsRow, _count, count_flops, cpu_vector_extensions, measure, stats_path, stats_table


def test_flops_are_counted_from_the_graph():
    import keras

    dense_in = keras.Input((10,))
    dense = keras.Model(dense_in, keras.layers.Dense(5)(dense_in))
    assert count_flops(dense, (10,)) == 2 * 10 * 5 + 5  # multiply-adds + bias
    conv_in = keras.Input((8, 8, 3))
    conv = keras.Model(conv_in, keras.layers.Conv2D(4, 3, use_bias=False)(conv_in))
    assert count_flops(conv, (8, 8, 3)) == 2 * (6 * 6 * 4) * (3 * 3 * 3)


def test_parameters_are_counted_from_the_tflite_file():
    """Weights and biases in every precision; the Reshape's int32 shape operand is not a parameter."""
    import keras
    import numpy as np

    from dsl_fed.export import convert_keras, float_constants_to_fp16

    inputs = keras.Input((12,))
    hidden = keras.layers.Flatten()(keras.layers.Reshape((3, 4))(inputs))
    model = keras.Model(inputs, keras.layers.Dense(5, bias_initializer="ones")(hidden))
    fp32 = convert_keras(model, (12,))
    int8 = convert_keras(model, (12,), "int8", np.random.default_rng(0).normal(size=(20, 12)).astype(np.float32))
    assert count_parameters(fp32) == 12 * 5 + 5
    assert count_parameters(float_constants_to_fp16(fp32, min_elements=1)) == 12 * 5 + 5
    assert count_parameters(int8) == 12 * 5 + 5  # int8 weights + int32 biases


def test_tflite_measurement_runs_in_a_fresh_process(deployed_tiny):
    m = measure("tflite", deployed_tiny.tflite, threads=1, runs=5)
    assert 0 < m["median_ms"] < 1000 and 0 < m["mean_ms"] < 1000
    # A ~1 MB model: its peak memory must not include the parent's TensorFlow (hundreds of MB).
    assert 0 < m["peak_mb"] < 100


def test_table_layout():
    rows = [
        StatsRow("Keras model", 7_563_845, 5_714_517_517, 31_065_952, 43.61, 42.4, 206.7, "tf.function"),
        StatsRow("TFLite int8", 7_563_845, None, None, math.nan, math.nan, math.nan, "skipped"),
    ]
    text = stats_table(rows, threads=2, runs=50)
    assert "Batch 1, 2 thread(s), mean/median over 50 runs" in text
    assert f"vector extensions {', '.join(cpu_vector_extensions()) or 'unknown'}." in text
    assert "| Keras model | 7.56 M | 5.71 G | 31.07 MB | 43.6 | 42.4 | 206.7 | tf.function |" in text
    assert "| TFLite int8 | 7.56 M | – | – | – | – | – | skipped |" in text


@pytest.mark.slow
def test_stats_command_writes_the_table_beside_the_model(deployed_tiny, capsys, tmp_path):
    kept = tmp_path / "exports"
    code = main(["stats", str(deployed_tiny.model_path), "--threads", "1", "--runs", "3", "--repeats", "2",
                 "--keep-exports", str(kept)])
    out, _ = capsys.readouterr()
    assert code == 0
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*.tflite")) == [
        "dynamic/model.tflite", "fp16/model.tflite", "fp32/model.tflite", "int8/model.tflite",
        "preprocessing/preprocessing.tflite"]
    target = stats_path(deployed_tiny.model_path)
    assert target.name == "model_stats.md" and target.read_text() == out.rstrip("\n") + "\n"
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    assert list(rows)[1:] == ["preprocessing (TFLite fp32)", "Keras model", "Keras model.predict", "TFLite fp32",
                              "TFLite fp16", "TFLite dynamic", "TFLite int8"]
    assert "1 thread(s)" in out and "best of 2 interleaved repeats" in out
    assert f"| {deployed_tiny.model.count_params() / 1e3:.2f} k |" in rows["Keras model"]
    # TFLite rows count what the file stores: here mostly the spectrogram's DFT and Mel tables.
    stored = f"| {_count(count_parameters(deployed_tiny.tflite))} |"
    assert stored != f"| {_count(deployed_tiny.model.count_params())} |"
    assert stored in rows["TFLite fp32"] and stored in rows["TFLite fp16"]
    assert "skipped" not in out  # int8 calibrated on the run's training audio

    def megabytes(name):
        cell = rows[name].split("|")[4].strip()
        value, unit = cell.split()
        return float(value) / (1000 if unit == "kB" else 1)

    assert megabytes("TFLite fp16") < 0.6 * megabytes("TFLite fp32")


def test_stats_rejects_bad_arguments(deployed_tiny, capsys, tmp_path):
    with pytest.raises(SystemExit) as stopped:  # argparse refuses the out-of-range number itself
        main(["stats", str(deployed_tiny.tflite), "--threads", "0"])
    assert stopped.value.code == 2 and "argument --threads: must be in [1, " in capsys.readouterr().err
    assert main(["stats", str(deployed_tiny.run_dir / "missing.keras")]) == 2
    assert "model file not found" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["stats", str(deployed_tiny.model_path), "--keep-exports", str(mine)]) == 2
    err = capsys.readouterr().err
    assert f"{mine}: the --keep-exports folder exists and is not an empty folder" in err and len(err.splitlines()) == 1
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_stats_of_one_tflite_file(deployed_tiny, capsys, tmp_path):
    code = main(["stats", str(deployed_tiny.tflite), "--runs", "3", "--threads", "1"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert out.count("| TFLite fp32 |") == 1 and "Keras model" not in out
    assert f"| TFLite fp32 | {_count(count_parameters(deployed_tiny.tflite))} |" in out
    assert stats_path(deployed_tiny.tflite).is_file()
