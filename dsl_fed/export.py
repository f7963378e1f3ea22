"""TFLite export: one file a phone can feed raw microphone samples, plus the manifest that says how.

The paper exported the preprocessing and the classifier as two TFLite files and left quantisation for future
work. Here the `SpectrogramImage` layer is inside the exported graph (raw float32 waveform chunk in, class
probabilities out) and four precisions are offered:

- ``none``: float32 everywhere;
- ``float16``: float16 weights, float32 compute (half the file; see `float_constants_to_fp16`);
- ``dynamic``: int8 weights, activations quantised on the fly, in the classifier (the front end keeps float
  weights, see `restore_float_scope`);
- ``int8``: full-integer classifier calibrated on training chunks. The spectrogram front end computes in
  float32: its dB scale spans 16 orders of magnitude of power, which no single int8 scale can hold (fully
  quantised, the images degenerate), and it is a small share of the compute; its constants are stored as
  float16 (`float_constants_to_fp16`). Model input and output stay float32.

Only TFLite builtin ops are allowed (no Flex / Select-TF ops), so the file runs on the stock LiteRT runtime.
Every export writes ``manifest.json`` beside the model (class names, sample rate, window and hop, precision,
sha256, config hash): `dsl_fed predict`, the federated server and the tests all rely on it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dsl_fed.config import Config
from dsl_fed.errors import DslFedError
from dsl_fed.io import atomic_write, check_output_file
from dsl_fed.litert import TFLiteRunner, flex_operators
from dsl_fed.precision import QUANTIZATIONS

__all__ = [
    "QUANTIZATIONS",
    "INPUT_KINDS",
    "MANIFEST_NAME",
    "ExportManifest",
    "PARITY_THRESHOLDS",
    "ParityCheck",
    "export_tflite",
    "verify_tflite",
    "check_parity",
    "synthetic_chunks",
    "manifest_path",
    "read_export_manifest",
    "sha256_file",
    "split_model",
    "convert_keras",
    "float_constants_to_fp16",
    "restore_float_scope",
]

INPUT_KINDS: tuple[str, ...] = ("audio", "image")
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
CALIBRATION_EXAMPLES = 200  # int8 calibration: enough for stable activation ranges, quick on 2 cores

# How close each precision must stay to the Keras model: (minimum top-1 agreement, maximum |p_tflite - p_keras|
# of any class probability). float32 differs only by kernel rounding; float16 weights move probabilities by
# about 1e-3; the 8-bit precisions usually by a few hundredths to a tenth (quickstart model 0.02; the ResNet50 of
# benchmarks/results/inference_accuracy.md in int8: 0.14 on test chunks), but a small network can move one chunk
# far more (the tests' tiny CNN in int8: 0.43 on 1 of 141 chunks), which is what --max-prob-diff is for.
PARITY_THRESHOLDS: dict[str, tuple[float, float]] = {
    "none": (0.99, 1e-3),
    "float16": (0.98, 0.02),
    "dynamic": (0.90, 0.15),
    "int8": (0.90, 0.15),
}


@dataclass(frozen=True)
class ParityCheck:
    """Inputs and limits for the Keras-vs-TFLite check `export_tflite` runs before writing anything.

    Attributes:
        samples: Waveform chunks ``(N, samples)`` or a `ChunkSet` (see `verify_tflite`).
        source: What the samples are, for messages and the manifest (e.g. ``"devel chunks"``).
        min_agreement: Minimum top-1 agreement; None = the precision's `PARITY_THRESHOLDS` entry.
        max_prob_diff: Maximum absolute probability difference; None = the precision's entry.
    """

    samples: Any
    source: str
    min_agreement: float | None = None
    max_prob_diff: float | None = None


# ------------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ExportManifest:
    """What a device needs to know to use an exported model (written as ``manifest.json``).

    Attributes:
        model_file: File name of the model this manifest describes (same folder).
        classes: Class names in output index order.
        input: ``"audio"`` (raw waveform chunk) or ``"image"`` (normalised spectrogram image).
        input_shape: Shape of one input example without the batch axis (the batch is always 1).
        sample_rate: Rate in Hz the audio must be resampled to.
        window_seconds: Chunk length fed to the model.
        hop_seconds: Step between chunks (one prediction per hop when streaming).
        quantization: One of `QUANTIZATIONS`.
        sha256: Hex digest of the model file.
        config_hash: `Config.hash()` of the training configuration.
        image_size: Side of the spectrogram image.
        preprocess: ImageNet normalisation mode inside the spectrogram layer.
        dsl_fed_version: Version that wrote the file.
        extra: Free-form additions from the caller (e.g. the federated server's round, phase and metrics).
        format_version: Manifest schema version.
    """

    model_file: str
    classes: tuple[str, ...]
    input: str
    input_shape: tuple[int, ...]
    sample_rate: int
    window_seconds: float
    hop_seconds: float
    quantization: str
    sha256: str
    config_hash: str
    image_size: int
    preprocess: str
    dsl_fed_version: str
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = MANIFEST_VERSION

    @property
    def window_samples(self) -> int:
        return int(round(self.window_seconds * self.sample_rate))

    @property
    def hop_samples(self) -> int:
        return int(round(self.hop_seconds * self.sample_rate))

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["classes"] = list(self.classes)
        data["input_shape"] = list(self.input_shape)
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str | Path = "manifest") -> "ExportManifest":
        """Parse and check a manifest; every problem names `source` and the key."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DslFedError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise DslFedError(f"{source}: expected a JSON object")
        if data.get("kind") == "trainable":  # dsl_fed.trainable_export's manifest: another file kind altogether
            raise DslFedError(f"{source}: describes a trainable model (signatures embed, train, infer, parameters, "
                              "restore), not an inference export; export one with `dsl_fed export` without --trainable")
        known = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise DslFedError(f"{source}: missing key(s) {', '.join(missing)}")
        unknown = sorted(set(data) - known)
        if unknown:
            raise DslFedError(f"{source}: unknown key(s) {', '.join(unknown)}")
        try:
            if data.get("format_version", MANIFEST_VERSION) > MANIFEST_VERSION:
                raise DslFedError(f"{source}: format_version {data['format_version']} is newer than this dsl_fed understands")
            data["classes"] = tuple(str(c) for c in data["classes"])
            data["input_shape"] = tuple(int(d) for d in data["input_shape"])
            manifest = cls(**data)
            checks = [
                (manifest.input in INPUT_KINDS, "input", f"must be one of {', '.join(INPUT_KINDS)}"),
                (manifest.quantization in QUANTIZATIONS, "quantization", f"must be one of {', '.join(QUANTIZATIONS)}"),
                (len(manifest.classes) >= 1, "classes", "must list at least one class"),
                (manifest.sample_rate > 0, "sample_rate", "must be > 0"),
                (manifest.window_seconds > 0 and manifest.hop_seconds > 0, "window_seconds", "window and hop must be > 0"),
            ]
        except (TypeError, ValueError) as exc:  # e.g. "classes": 3 or "sample_rate": "x"
            raise DslFedError(f"{source}: a value has the wrong type ({exc})") from None
        for ok, key, message in checks:
            if not ok:
                raise DslFedError(f"{source}: {key} {message}")
        return manifest


def manifest_path(model_path: str | Path) -> Path:
    """The manifest of `model_path`: ``manifest.json`` in the same folder (one exported model per folder)."""
    return Path(model_path).parent / MANIFEST_NAME


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_export_manifest(model_path: str | Path, check_sha256: bool = True) -> ExportManifest:
    """Read the manifest beside `model_path` and check it describes that very file.

    Raises:
        DslFedError: no manifest, invalid manifest, manifest of another model file, or a sha256 mismatch.
    """
    model_path = Path(model_path)
    path = manifest_path(model_path)
    if not path.is_file():
        raise DslFedError(
            f"{model_path}: no {MANIFEST_NAME} beside the model (it holds the class names and sample rate); "
            f"export with `dsl_fed export` and copy the .tflite together with its {MANIFEST_NAME}"
        )
    manifest = ExportManifest.from_json(path.read_text(), source=path)
    if manifest.model_file != model_path.name:
        raise DslFedError(f"{path}: describes {manifest.model_file}, not {model_path.name}; keep one exported model per folder")
    if check_sha256 and model_path.is_file() and sha256_file(model_path) != manifest.sha256:
        raise DslFedError(f"{model_path}: sha256 differs from {path}; the model was changed after export, re-export it")
    return manifest


def check_export_target(path: Path, reading: Sequence[Path] = ()) -> None:
    """Refuse an export onto anything but an earlier export of the same file name (the ``.tflite`` and the
    ``manifest.json`` beside it), or onto a file in `reading` (the command's inputs).

    Raises:
        DslFedError: a name not ending in ``.tflite``, a folder holding another model's manifest, or a file
            there that `dsl_fed export` did not write.
    """
    if path.suffix != ".tflite":
        raise DslFedError(f"{path}: exported model file name must end in .tflite")
    existing = manifest_path(path)
    described = _described_file(existing)
    if described not in (None, path.name):
        raise DslFedError(f"{existing}: already describes {described}; export {path.name} into its own folder")
    check_output_file(existing, reading, lambda p: _described_file(p) == path.name, "export manifest")
    check_output_file(path, reading, lambda p: _described_file(manifest_path(p)) == p.name, "exported model")


def _described_file(manifest: Path) -> str | None:
    """``model_file`` of an export manifest, or None (no file, or not an export manifest)."""
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("model_file"), str) and "sha256" in data
    return data["model_file"] if ok else None


# --------------------------------------------------------------------------------------------- export


def split_model(model: Any) -> tuple[Any, Any]:
    """Return ``(spectrogram_layer, image_classifier)`` of a `dsl_fed.models.build_model` model.

    The classifier maps normalised spectrogram images to probabilities (backbone + head); it is what
    ``input="image"`` exports.
    """
    from dsl_fed.models import CLASSIFIER_LAYER, SPECTROGRAM_LAYER

    parts = []
    for name in (SPECTROGRAM_LAYER, CLASSIFIER_LAYER):
        try:
            parts.append(model.get_layer(name))
        except ValueError:
            raise DslFedError(
                f"model {model.name!r} has no layer named {name!r}; build it with dsl_fed.models.build_model"
            ) from None
    return parts[0], parts[1]


def export_tflite(
    model: Any,
    path: str | Path,
    quantization: str = "none",
    input: str = "audio",  # noqa: A002 - named like the CLI's --input; shadowing the builtin is harmless here
    representative: Any = None,
    *,
    classes: Sequence[str],
    cfg: Config,
    extra: dict[str, Any] | None = None,
    check: ParityCheck | None = None,
) -> Path:
    """Convert a Keras model to a builtins-only TFLite file with batch 1, and write its manifest.

    Args:
        model: A `build_model` model: raw waveform chunks ``(B, samples)`` -> probabilities ``(B, C)``.
        path: Target ``.tflite`` file; ``manifest.json`` is written into the same folder.
        quantization: ``"none"``, ``"float16"``, ``"dynamic"`` or ``"int8"`` (see the module docstring).
        input: ``"audio"``: raw float32 waveform chunk in (spectrogram inside); ``"image"``: normalised
            spectrogram image in (backbone + head only).
        representative: int8 only: training chunks used for calibration, as a ``(N, samples)`` array or a
            `dsl_fed.data.pipeline.ChunkSet`; at most `CALIBRATION_EXAMPLES` of them are used.
        classes: Class names in output order (written to the manifest).
        cfg: The training configuration (sample rate, window/hop, config hash).
        extra: Additional JSON-serialisable manifest entries (e.g. ``{"round": 3, "phase": 1}``).
        check: Compare the converted model with `model` first (`verify_tflite` + `check_parity`); the result
            is recorded in the manifest as ``extra["parity"]``.

    Returns:
        `path`. Both files are written atomically; nothing is written if conversion or the check fails.

    Raises:
        DslFedError: bad argument, missing representative data for int8, a folder that already holds another
            model's manifest, a conversion that would need non-builtin ops, or a failed parity check.
    """
    path = Path(path)
    _check_choice(quantization, QUANTIZATIONS, "quantization")
    _check_choice(input, INPUT_KINDS, "input")
    check_export_target(path)
    classes = tuple(str(c) for c in classes)
    num_outputs = int(model.output_shape[-1])
    if len(classes) != num_outputs:
        raise DslFedError(f"{len(classes)} class names given for a model with {num_outputs} outputs")

    spectrogram, classifier = split_model(model)
    if input == "audio":
        target, example_shape = model, (int(model.input_shape[-1]),)
    else:
        target, example_shape = classifier, tuple(int(d) for d in classifier.input_shape[1:])
    calibration = None
    if quantization == "int8":
        calibration = _calibration_examples(representative, spectrogram, input, example_shape)
    float_scope = spectrogram.name if input == "audio" else None  # the front end never goes integer
    content = convert_keras(target, example_shape, quantization, calibration, float_scope)
    flex = flex_operators(content)
    if flex:  # the converter should have refused already; never ship a file the stock runtime cannot run
        raise DslFedError(f"{path}: conversion needs non-builtin ops {', '.join(flex)}")

    extra = dict(extra or {})
    if check is not None:
        with tempfile.TemporaryDirectory(prefix="dsl_fed_verify_") as tmp:
            candidate = Path(tmp) / path.name
            candidate.write_bytes(content)
            result = verify_tflite(model, candidate, check.samples)
        limits = check_parity(result, quantization, check.min_agreement, check.max_prob_diff, check.source)
        extra["parity"] = {**result, "source": check.source, "min_agreement": limits[0], "max_prob_diff": limits[1]}

    from dsl_fed import __version__

    atomic_write(path, content)
    manifest = ExportManifest(
        model_file=path.name,
        classes=classes,
        input=input,
        input_shape=example_shape,
        sample_rate=cfg.data.sample_rate,
        window_seconds=cfg.data.chunk_seconds,
        hop_seconds=cfg.data.hop_seconds,
        quantization=quantization,
        sha256=hashlib.sha256(content).hexdigest(),
        config_hash=cfg.hash(),
        image_size=int(spectrogram.image_size),
        preprocess=str(spectrogram.preprocess),
        dsl_fed_version=__version__,
        extra=extra,
    )
    atomic_write(manifest_path(path), manifest.to_json())
    return path


def _check_choice(value: str, options: tuple[str, ...], name: str) -> None:
    if value not in options:
        raise DslFedError(f"{name}: unknown value {value!r} (choose from {', '.join(options)})")


def _calibration_examples(representative: Any, spectrogram: Any, input_kind: str,
                          example_shape: tuple[int, ...]) -> np.ndarray:
    """Up to `CALIBRATION_EXAMPLES` inputs for int8 calibration, drawn evenly (seeded) from the chunks."""
    if representative is None:
        raise DslFedError("int8 export needs representative training chunks (representative=...) to calibrate activation ranges")
    waves = np.asarray(getattr(representative, "waveforms", representative), dtype=np.float32)
    if waves.ndim != 2 or len(waves) == 0:
        raise DslFedError(f"representative chunks must be a non-empty (N, samples) array, got shape {waves.shape}")
    if len(waves) > CALIBRATION_EXAMPLES:
        waves = waves[np.sort(np.random.default_rng(0).choice(len(waves), CALIBRATION_EXAMPLES, replace=False))]
    if input_kind == "image":
        return np.concatenate([np.asarray(spectrogram(waves[i : i + 32])) for i in range(0, len(waves), 32)])
    if waves.shape[1:] != example_shape:
        raise DslFedError(f"representative chunks have {waves.shape[1]} samples; the model takes {example_shape[0]}")
    return waves


def convert_keras(target: Any, example_shape: tuple[int, ...], quantization: str = "none",
                  calibration: np.ndarray | None = None, float_scope: str | None = None) -> bytes:
    """Convert a Keras model with one float32 input of shape ``(1, *example_shape)`` to TFLite bytes.

    The lower-level step of `export_tflite` (no manifest, no checks), also used for the stand-alone
    preprocessing model in `dsl_fed.stats`. Route: Keras -> SavedModel (Keras 3's supported path to the
    converter) -> builtins-only flatbuffer.

    Args:
        target: Keras model or layer graph to convert.
        example_shape: Input shape without the batch axis.
        quantization: One of `QUANTIZATIONS`.
        calibration: int8 only: calibration inputs ``(N, *example_shape)``.
        float_scope: dynamic / int8: name of a layer whose ops stay float32 (the spectrogram).
    """
    import keras
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="dsl_fed_export_") as saved_model:
        archive = keras.export.ExportArchive()
        archive.track(target)
        archive.add_endpoint(
            "serve",
            functools.partial(target.__call__, training=False),
            input_signature=[tf.TensorSpec((1, *example_shape), tf.float32)],
        )
        archive.write_out(saved_model, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        try:
            float_model = converter.convert()
            if quantization == "none":
                return float_model
            if quantization == "float16":
                return float_constants_to_fp16(float_model)
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            if quantization == "dynamic":
                dynamic = converter.convert()
                return dynamic if float_scope is None else restore_float_scope(dynamic, float_model, float_scope)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
            converter.representative_dataset = lambda: ([x[None]] for x in calibration)
            return _quantize_int8(converter, calibration, float_scope)
        except DslFedError:
            raise
        except Exception as exc:
            raise conversion_error("TFLite", exc) from None


def conversion_error(what: str, exc: Exception) -> DslFedError:
    """One line for a converter failure: it raises ConverterError/ValueError with pages of MLIR, whose first
    ``error:`` line says what went wrong."""
    lines = [ln.strip() for ln in str(exc).splitlines() if "error:" in ln] or [str(exc).strip() or type(exc).__name__]
    return DslFedError(f"{what} conversion failed: {lines[0][-300:]}")


def _quantize_int8(converter: Any, calibration: np.ndarray, deny_scope: str | None) -> bytes:
    """Calibrate, then quantise everything except the ops of the `deny_scope` layer (the spectrogram).

    Uses the public `tf.lite.experimental.QuantizationDebugger` route for selective quantisation: the
    calibrated model's tensor names carry the Keras layer scope, so the spectrogram's ops are found by name.
    """
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter deprecation notice from inside the debugger
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=lambda: ([x[None]] for x in calibration[:1])
        )
        if deny_scope is not None:
            names = _tensor_names(debugger.calibrated_model)
            scope = re.compile(rf"(^|/){re.escape(deny_scope)}(_\d+)?/")
            denied = sorted({n for n in names if scope.search(n)})
            if not denied:
                raise DslFedError(f"int8 export: found no ops of layer {deny_scope!r} to keep in float32")
            debugger.options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=denied)
        content = debugger.get_nondebug_quantized_model()
    return content if deny_scope is None else float_constants_to_fp16(content, deny_scope)


def float_constants_to_fp16(content: bytes, scope: str | None = None, min_elements: int = 1024) -> bytes:
    """Store the large float32 constants (weights) of a TFLite model as float16, dequantised at load time.

    Each such constant becomes a FLOAT16 buffer feeding a DEQUANTIZE op, which LiteRT and XNNPACK evaluate once
    when the model is loaded, so the arithmetic stays float32 (the layout the converter's float16 mode uses).
    Two uses:

    - the ``float16`` export. The converter's own float16 mode also rounds *scalar* constants, and the dB
      floor ``db_amin = 1e-16`` of the spectrogram becomes 0 in float16: a zero-padded or silent chunk then
      gives log(0) = -inf, NaN pixels and an out-of-range colour-map index. Converting only tensors of at least
      `min_elements` elements (weights, the DFT kernel, the Mel matrix) avoids that;
    - the ``int8`` export, whose spectrogram front end stays float32: its DFT kernel and Mel matrix (1.3 MB at
      128 Mel bands) would otherwise be the largest tensors after the int8 backbone.

    The relative weight error (< 2^-11) moves the spectrogram's dB values by about 0.01 dB.

    Args:
        content: A TFLite flatbuffer.
        scope: Only constants of this Keras layer (matched like the int8 denylist); None = all.
        min_elements: Smaller constants are left in float32.
    """
    from ai_edge_litert import schema_py_generated as schema
    import flatbuffers

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(content, 0))
    pattern = re.compile(rf"(^|/){re.escape(scope)}(_\d+)?/" if scope is not None else "")
    dequantize = _opcode_index(model, schema.BuiltinOperator.DEQUANTIZE, version=3)
    changed = False
    for graph in model.subgraphs:
        boundary = set(graph.inputs) | set(graph.outputs)
        for index, tensor in enumerate(list(graph.tensors)):
            buffer = model.buffers[tensor.buffer]
            name = (tensor.name or b"").decode(errors="replace") if isinstance(tensor.name, bytes) else str(tensor.name or "")
            if (tensor.type != schema.TensorType.FLOAT32 or buffer.data is None or len(buffer.data) < 4 * min_elements
                    or index in boundary or tensor.isVariable or not pattern.search(name)):
                continue
            values = np.frombuffer(np.asarray(buffer.data, dtype=np.uint8).tobytes(), dtype="<f4")
            if not np.all(np.abs(values) <= np.finfo(np.float16).max):
                continue
            half = schema.BufferT()
            half.data = np.frombuffer(values.astype("<f2").tobytes(), dtype=np.uint8)
            model.buffers.append(half)
            source = schema.TensorT()
            source.shape, source.type = tensor.shape, schema.TensorType.FLOAT16
            source.buffer, source.name = len(model.buffers) - 1, f"{name}/fp16".encode()
            graph.tensors.append(source)
            buffer.data = None  # the float32 tensor becomes the DEQUANTIZE output
            op = schema.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = dequantize, [len(graph.tensors) - 1], [index]
            graph.operators.insert(0, op)
            changed = True
    if not changed:
        return content
    builder = flatbuffers.Builder(len(content) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def restore_float_scope(quantized: bytes, float_model: bytes, scope: str) -> bytes:
    """Undo weight quantisation inside layer `scope` of a dynamic-range model (the spectrogram front end).

    The converter's dynamic-range mode has no way to exclude ops, and its hybrid kernels quantise each
    *input row* to int8 on the fly: for the STFT that is the waveform (8-bit audio), for the Mel matrix each
    frame's power spectrum, whose bins span far more than int8's 48 dB. Exported that way, the demo model's
    top-1 agreement with Keras drops to about chance. Giving those ops their float weights back (taken by tensor
    name from the float32 conversion of the same graph) makes them ordinary float kernels again; the large ones
    are then stored as float16 (`float_constants_to_fp16`). Weights that only feed a DEQUANTIZE op are
    replaced by their float16 values.

    Raises:
        DslFedError: a quantised constant of `scope` has no float twin (the two conversions disagree).
    """
    from ai_edge_litert import schema_py_generated as schema
    import flatbuffers

    reference = schema.Model.GetRootAsModel(float_model, 0)
    ref_graph = reference.Subgraphs(0)
    pattern = re.compile(rf"(^|/){re.escape(scope)}(_\d+)?/")
    twins: dict[tuple[int, ...], list[np.ndarray]] = {}  # float constants of the scope, by shape
    for i in range(ref_graph.TensorsLength()):
        t = ref_graph.Tensors(i)
        buffer = reference.Buffers(t.Buffer())
        if (t.Type() == schema.TensorType.FLOAT32 and buffer is not None and buffer.DataLength() > 0
                and pattern.search(t.Name().decode(errors="replace"))):
            shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
            twins.setdefault(shape, []).append(buffer.DataAsNumpy().view("<f4").reshape(shape))

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(quantized, 0))
    graph = model.subgraphs[0]
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    consumers: dict[int, set[int]] = {}
    for op in graph.operators:
        for i in op.inputs if op.inputs is not None else []:
            consumers.setdefault(int(i), set()).add(codes[op.opcodeIndex])
    quantized_types = (schema.TensorType.INT8, schema.TensorType.UINT8, schema.TensorType.FLOAT16)
    changed = False
    for index, tensor in enumerate(graph.tensors):
        buffer = model.buffers[tensor.buffer]
        name = tensor.name.decode(errors="replace") if isinstance(tensor.name, bytes) else str(tensor.name or "")
        if tensor.type not in quantized_types or buffer.data is None or not pattern.search(name):
            continue
        # Tensor names are not stable between two conversions; the shape plus the (de)quantised values are.
        shape = tuple(int(d) for d in tensor.shape)
        approx = _dequantized(tensor, buffer, schema).reshape(shape)
        candidates = twins.get(shape, [])
        if not candidates:
            raise DslFedError(f"dynamic export: no float32 twin for quantised constant {name} {shape}")
        values = min(candidates, key=lambda c: float(np.max(np.abs(c - approx))))
        if consumers.get(index) == {schema.BuiltinOperator.DEQUANTIZE}:
            tensor.type, data = schema.TensorType.FLOAT16, values.astype("<f2").tobytes()
        else:
            tensor.type, data = schema.TensorType.FLOAT32, values.astype("<f4").tobytes()
        buffer.data = np.frombuffer(data, dtype=np.uint8)
        tensor.quantization = None
        changed = True
    if changed:
        builder = flatbuffers.Builder(len(quantized) + len(float_model) // 4)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        quantized = bytes(builder.Output())
    return float_constants_to_fp16(quantized, scope)


def _dequantized(tensor: Any, buffer: Any, schema: Any) -> np.ndarray:
    """Float values of a quantised constant (per-tensor or per-channel int8/uint8, or float16)."""
    raw = np.asarray(buffer.data, dtype=np.uint8).tobytes()
    if tensor.type == schema.TensorType.FLOAT16:
        return np.frombuffer(raw, dtype="<f2").astype(np.float32)
    dtype = np.int8 if tensor.type == schema.TensorType.INT8 else np.uint8
    q = np.frombuffer(raw, dtype=dtype).astype(np.float32).reshape([int(d) for d in tensor.shape])
    params = tensor.quantization
    scale = np.asarray(params.scale if params is not None and params.scale is not None else [1.0], dtype=np.float32)
    zero = np.asarray(params.zeroPoint if params is not None and params.zeroPoint is not None else [0], dtype=np.float32)
    if scale.size > 1:  # per channel along quantizedDimension
        axis = int(params.quantizedDimension)
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (q - zero) * scale


def _opcode_index(model: Any, builtin: int, version: int) -> int:
    """Index of `builtin` in the model's operator codes, appended if missing."""
    for i, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
            return i
    from ai_edge_litert import schema_py_generated as schema

    code = schema.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), version
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _tensor_names(content: bytes) -> list[str]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    return [t["name"] for t in interpreter.get_tensor_details()]


# --------------------------------------------------------------------------------------------- verify


def verify_tflite(model: Any, path: str | Path, samples: Any, threads: int | None = None) -> dict[str, float]:
    """Compare an exported model with its Keras source on the same inputs.

    Args:
        model: The Keras model that was exported (the whole `build_model` model).
        path: The `.tflite` file.
        samples: Waveform chunks ``(N, samples)`` or a `ChunkSet`; for an ``image`` export they are turned into
            images with the model's own spectrogram layer (or pass images ``(N, S, S, 3)`` directly).
        threads: LiteRT threads.

    Returns:
        ``{"max_abs_diff": ..., "top1_agreement": ..., "num_samples": ...}``: the largest absolute difference
        of any class probability, and the fraction of inputs whose arg-max class agrees.
    """
    runner = TFLiteRunner(path, threads=threads)
    x = np.asarray(getattr(samples, "waveforms", samples), dtype=np.float32)
    if len(x) == 0:
        raise DslFedError("verify_tflite: no samples given")
    spectrogram, classifier = split_model(model)
    reference_model = model
    if len(runner.input_shape) == 3:  # an image export
        reference_model = classifier
        if x.ndim == 2:
            x = np.concatenate([np.asarray(spectrogram(x[i : i + 32])) for i in range(0, len(x), 32)])
    if x.shape[1:] != runner.input_shape:
        raise DslFedError(f"verify_tflite: samples have shape {x.shape[1:]}, {path} expects {runner.input_shape}")
    expected = np.concatenate([np.asarray(reference_model(x[i : i + 32], training=False)) for i in range(0, len(x), 32)])
    got = runner.predict(x)
    return {
        "max_abs_diff": float(np.max(np.abs(got - expected))),
        "top1_agreement": float(np.mean(np.argmax(got, axis=1) == np.argmax(expected, axis=1))),
        "num_samples": int(len(x)),
    }


def check_parity(result: dict[str, float], quantization: str, min_agreement: float | None = None,
                 max_prob_diff: float | None = None, source: str = "chunks") -> tuple[float, float]:
    """Raise if a `verify_tflite` result is worse than the precision's limits; return the limits applied.

    Raises:
        DslFedError: one line saying which measure missed its limit and by how much.
    """
    default_agreement, default_diff = PARITY_THRESHOLDS[quantization]
    min_agreement = default_agreement if min_agreement is None else float(min_agreement)
    max_prob_diff = default_diff if max_prob_diff is None else float(max_prob_diff)
    agreement, diff = result["top1_agreement"], result["max_abs_diff"]
    problems = []
    if not agreement >= min_agreement:
        problems.append(f"top-1 agreement {100 * agreement:.1f} % is {100 * (min_agreement - agreement):.1f} points "
                        f"below the required {100 * min_agreement:.1f} %")
    if not diff <= max_prob_diff:  # also catches NaN
        problems.append(f"max |p_tflite - p_keras| = {diff:.3g} exceeds the allowed {max_prob_diff:.3g} "
                        f"by {diff - max_prob_diff:.3g}")
    if problems:
        raise DslFedError(f"{quantization} export does not match the Keras model on {result['num_samples']} {source}: "
                          f"{'; '.join(problems)} (nothing written; limits: --min-agreement, --max-prob-diff)")
    return min_agreement, max_prob_diff


def synthetic_chunks(n: int, samples: int, sample_rate: int, seed: int = 0) -> np.ndarray:
    """`n` seeded test chunks for a parity check when no recorded audio is at hand.

    Each is a few random tones and a pitch glide over background noise at a random level (-40 to 0 dBFS), so the
    spectrogram images have structure and span the model's input range, unlike plain white noise (whose
    per-chunk normalised image is nearly flat).
    """
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / sample_rate
    duration = samples / sample_rate
    chunks = np.empty((n, samples), np.float32)
    nyquist = sample_rate / 2
    for i in range(n):
        x = rng.normal(0, 10 ** rng.uniform(-3, -1), samples)
        for f in rng.uniform(80, 0.4 * nyquist, rng.integers(1, 4)):
            x += rng.uniform(0.1, 1) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
        f0, f1 = rng.uniform(100, 0.2 * nyquist, 2)
        x += 0.5 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * duration)))
        chunks[i] = 10 ** rng.uniform(-2, 0) * x / np.max(np.abs(x))
    return chunks
