"""TFLite export: parity with Keras per precision, builtins only, the manifest, and refusals.

Uses the session's trained tiny model (`deployed_tiny` in conftest.py); each precision is exported once.
"""

import json
import shutil

import numpy as np
import pytest

from dsl_fed.errors import DslFedError
from dsl_fed.export import (
    PARITY_THRESHOLDS,
    ExportManifest,
    ParityCheck,
    check_parity,
    export_tflite,
    manifest_path,
    read_export_manifest,
    sha256_file,
    verify_tflite,
)
from dsl_fed.litert import TFLiteRunner, flex_operators, model_operators


@pytest.fixture(scope="module")
def exports(deployed_tiny, tmp_path_factory):
    """One export per precision (audio input) plus a float32 image-input export."""
    out = tmp_path_factory.mktemp("exports")
    d = deployed_tiny
    paths = {"none": d.tflite}
    for quant in ("float16", "dynamic", "int8"):
        paths[quant] = export_tflite(d.model, out / quant / "model.tflite", quant,
                                     representative=d.train if quant == "int8" else None, classes=d.classes, cfg=d.cfg)
    paths["image"] = export_tflite(d.model, out / "image" / "model.tflite", input="image", classes=d.classes, cfg=d.cfg)
    return paths


def test_fp32_raw_audio_matches_keras(deployed_tiny, exports):
    result = verify_tflite(deployed_tiny.model, exports["none"], deployed_tiny.test)
    assert result["num_samples"] == len(deployed_tiny.test) >= 40
    assert result["max_abs_diff"] <= 1e-4
    assert result["top1_agreement"] == 1.0
    runner = TFLiteRunner(exports["none"], threads=2)
    assert runner.input_shape == (deployed_tiny.cfg.data.chunk_samples,) and runner.input_dtype == np.float32


def test_fp16_matches_keras_within_one_hundredth(deployed_tiny, exports):
    result = verify_tflite(deployed_tiny.model, exports["float16"], deployed_tiny.test)
    assert result["max_abs_diff"] <= 1e-2
    assert exports["float16"].stat().st_size < 0.6 * exports["none"].stat().st_size  # weights really are halved


def test_int8_agrees_on_top1_for_95_percent_of_demo_chunks(deployed_tiny, exports):
    result = verify_tflite(deployed_tiny.model, exports["int8"], deployed_tiny.test)
    assert result["top1_agreement"] >= 0.95
    # The classifier is integer, the spectrogram front end float32 (with float16-stored constants), I/O float32.
    runner = TFLiteRunner(exports["int8"])
    assert runner.input_dtype == np.float32
    dtypes = {t["dtype"] for t in runner._interpreter.get_tensor_details()}
    assert np.int8 in dtypes and np.float16 in dtypes
    assert "QUANTIZE" in model_operators(exports["int8"])


def test_dynamic_keeps_the_front_end_float(deployed_tiny, exports):
    # Without restore_float_scope the hybrid STFT/Mel kernels put top-1 agreement near chance.
    result = verify_tflite(deployed_tiny.model, exports["dynamic"], deployed_tiny.test)
    assert result["top1_agreement"] >= 0.95
    assert result["max_abs_diff"] <= 0.05


def test_image_input_export_is_the_classifier_alone(deployed_tiny, exports):
    runner = TFLiteRunner(exports["image"])
    size = deployed_tiny.cfg.spectrogram.image_size
    assert runner.input_shape == (size, size, 3)
    result = verify_tflite(deployed_tiny.model, exports["image"], deployed_tiny.test.waveforms[:16])
    assert result["max_abs_diff"] <= 1e-4
    assert read_export_manifest(exports["image"]).input == "image"


@pytest.mark.parametrize("quant", ["none", "float16", "dynamic", "int8", "image"])
def test_only_builtin_ops_and_silence_gives_valid_probabilities(exports, quant):
    assert flex_operators(exports[quant]) == []
    assert not any(op.startswith("CUSTOM") for op in model_operators(exports[quant]))
    runner = TFLiteRunner(exports[quant])
    if quant != "image":  # a silent chunk (e.g. the zero-padded tail of a clip) must not produce NaN
        probs = runner.predict(np.zeros((1, *runner.input_shape), np.float32))
        assert np.all(np.isfinite(probs)) and probs.sum() == pytest.approx(1.0, abs=1e-2)


def test_flex_detection_sees_select_tf_ops(tmp_path):
    """Positive control for the check above: a graph that needs Select-TF ops is reported."""
    import tensorflow as tf

    fn = tf.function(lambda x: tf.math.cumprod(x, axis=1), input_signature=[tf.TensorSpec([1, 8], tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    assert flex_operators(converter.convert()) == ["CUSTOM:FlexCumprod"]


def test_manifest_round_trip(deployed_tiny, exports):
    path = exports["int8"]
    manifest = read_export_manifest(path)
    assert manifest.classes == tuple(deployed_tiny.classes) == ("falling", "flat", "rising")
    data = deployed_tiny.cfg.data
    assert (manifest.sample_rate, manifest.window_seconds, manifest.hop_seconds) == (16000, 1.0, data.hop_seconds)
    assert (manifest.window_samples, manifest.hop_samples) == (16000, data.hop_samples)
    assert manifest.quantization == "int8" and manifest.input == "audio" and manifest.input_shape == (16000,)
    assert manifest.sha256 == sha256_file(path)
    assert manifest.config_hash == deployed_tiny.cfg.hash()
    assert (manifest.image_size, manifest.preprocess) == (32, "tf")
    assert ExportManifest.from_json(manifest.to_json()) == manifest
    assert json.loads(manifest_path(path).read_text())["classes"] == ["falling", "flat", "rising"]


def test_manifest_problems_are_named(deployed_tiny, exports, tmp_path):
    copy = tmp_path / "a" / "model.tflite"
    copy.parent.mkdir()
    shutil.copy(exports["none"], copy)
    with pytest.raises(DslFedError, match="no manifest.json beside the model"):
        read_export_manifest(copy)
    text = manifest_path(exports["none"]).read_text()
    manifest_path(copy).write_text(text.replace('"model_file": "model.tflite"', '"model_file": "other.tflite"'))
    with pytest.raises(DslFedError, match="describes other.tflite, not model.tflite"):
        read_export_manifest(copy)
    manifest_path(copy).write_text(manifest_path(exports["int8"]).read_text())
    with pytest.raises(DslFedError, match="sha256 differs"):
        read_export_manifest(copy)
    manifest_path(copy).write_text(text.replace('"quantization"', '"quantisation"'))
    with pytest.raises(DslFedError, match="missing key.*quantization"):
        read_export_manifest(copy)
    manifest_path(copy).write_text("{not json")
    with pytest.raises(DslFedError, match="not valid JSON"):
        read_export_manifest(copy)
    data = json.loads(text)
    for key, value in [("classes", 3), ("sample_rate", "x"), ("input_shape", ["a"])]:
        manifest_path(copy).write_text(json.dumps({**data, key: value}))
        with pytest.raises(DslFedError, match="manifest.json: (a value has the wrong type|sample_rate)"):
            read_export_manifest(copy)


def test_export_refusals(deployed_tiny, tmp_path):
    d = deployed_tiny
    with pytest.raises(DslFedError, match="representative"):
        export_tflite(d.model, tmp_path / "q" / "model.tflite", "int8", classes=d.classes, cfg=d.cfg)
    with pytest.raises(DslFedError, match="quantization: unknown value 'int4'"):
        export_tflite(d.model, tmp_path / "q" / "model.tflite", "int4", classes=d.classes, cfg=d.cfg)
    with pytest.raises(DslFedError, match="2 class names given for a model with 3 outputs"):
        export_tflite(d.model, tmp_path / "q" / "model.tflite", classes=d.classes[:2], cfg=d.cfg)
    with pytest.raises(DslFedError, match=r"must end in \.tflite"):
        export_tflite(d.model, tmp_path / "q" / "model.bin", classes=d.classes, cfg=d.cfg)
    assert not (tmp_path / "q").exists() or not any((tmp_path / "q").iterdir())  # nothing half-written
    # Two models in one folder would share one manifest.json: refused instead of silently overwritten.
    shutil.copytree(d.tflite.parent, tmp_path / "shared")
    with pytest.raises(DslFedError, match="already describes model.tflite; export other.tflite into its own folder"):
        export_tflite(d.model, tmp_path / "shared" / "other.tflite", classes=d.classes, cfg=d.cfg)


def test_extra_manifest_entries_are_kept(deployed_tiny, tmp_path):
    """The federated server records round and phase this way."""
    d = deployed_tiny
    path = export_tflite(d.model, tmp_path / "round_3" / "model.tflite", classes=d.classes, cfg=d.cfg,
                         extra={"round": 3, "phase": 2})
    assert read_export_manifest(path).extra == {"round": 3, "phase": 2}


def test_parity_check_refuses_a_badly_calibrated_int8_export(deployed_tiny, tmp_path):
    """Calibrated on silence, the int8 activation ranges miss real speech: the check must catch it before
    anything is written, and say by how much."""
    d = deployed_tiny
    silence = np.zeros((40, d.cfg.data.chunk_samples), np.float32)
    target = tmp_path / "bad" / "model.tflite"
    with pytest.raises(DslFedError, match=r"int8 export does not match the Keras model on \d+ test chunks: top-1 "
                                          r"agreement [\d.]+ % is [\d.]+ points below the required 90.0 %"):
        export_tflite(d.model, target, "int8", representative=silence, classes=d.classes, cfg=d.cfg,
                      check=ParityCheck(d.test, "test chunks"))
    assert not target.parent.exists()


def test_parity_check_passes_and_is_recorded_in_the_manifest(deployed_tiny, tmp_path):
    d = deployed_tiny
    path = export_tflite(d.model, tmp_path / "ok" / "model.tflite", "dynamic", classes=d.classes, cfg=d.cfg,
                         check=ParityCheck(d.test, "test chunks"))
    parity = read_export_manifest(path).extra["parity"]
    assert parity["num_samples"] == len(d.test) and parity["source"] == "test chunks"
    assert parity["top1_agreement"] >= PARITY_THRESHOLDS["dynamic"][0] == parity["min_agreement"]
    assert parity["max_abs_diff"] <= PARITY_THRESHOLDS["dynamic"][1] == parity["max_prob_diff"]


def test_check_parity_names_each_missed_limit():
    result = {"top1_agreement": 0.75, "max_abs_diff": 0.3, "num_samples": 8}
    with pytest.raises(DslFedError) as caught:
        check_parity(result, "int8", source="synthetic chunks")
    assert str(caught.value).startswith(
        "int8 export does not match the Keras model on 8 synthetic chunks: top-1 agreement 75.0 % is 15.0 points "
        "below the required 90.0 %; max |p_tflite - p_keras| = 0.3 exceeds the allowed 0.15 by 0.15")
    assert check_parity(result, "int8", min_agreement=0.75, max_prob_diff=0.3) == (0.75, 0.3)
    with pytest.raises(DslFedError, match="max .p_tflite - p_keras. = nan"):
        check_parity({**result, "max_abs_diff": float("nan")}, "int8", 0.0, 1.0)


def test_readme_states_the_parity_limits_the_code_applies():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    names = {"none": "none (float32)", "float16": "float16", "dynamic": "dynamic", "int8": "int8"}
    for quant, (agreement, diff) in PARITY_THRESHOLDS.items():
        assert f"| {names[quant]} | {agreement:.2f} | {diff:g} |" in readme, quant


def test_a_converter_failure_is_its_first_error_line():
    from dsl_fed.export import conversion_error

    mlir = "<unknown>:0: note: see current operation\nloc(fused[\"Foo:\"]): error: 'tf.Foo' op is neither a custom op " \
           "nor a flex op\n<unknown>:0: error: failed while converting: 'main'\n"
    assert str(conversion_error("TFLite", ValueError(mlir))) == \
        "TFLite conversion failed: loc(fused[\"Foo:\"]): error: 'tf.Foo' op is neither a custom op nor a flex op"
    assert str(conversion_error("trainable TFLite", RuntimeError())) == "trainable TFLite conversion failed: RuntimeError"
