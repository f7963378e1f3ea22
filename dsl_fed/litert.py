"""Running exported models with the LiteRT interpreter, as a phone would: tensors in, and audio files in.

Kept apart from `export.py` so that device-side code (predict, stream, stats) needs only numpy, soundfile and
`ai_edge_litert`, never TensorFlow.
"""

from __future__ import annotations

import contextlib
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsl_fed.errors import DslFedError, first_line
from dsl_fed.quiet import without_stderr_lines

__all__ = [
    "TFLiteRunner",
    "model_operators",
    "flex_operators",
    "count_parameters",
    "ChunkPrediction",
    "FilePrediction",
    "predict_file",
    "native_sample_rate",
]


class TFLiteRunner:
    """One exported model in a LiteRT interpreter, run one example at a time.

    The exported graphs have a static batch of 1 (what a streaming device feeds), so batches are looped.
    Quantised input/output tensors (int8/uint8) are (de)quantised here, so callers always see float32.

    Args:
        path: The `.tflite` file.
        threads: CPU threads for the interpreter's kernels; None lets LiteRT decide.
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        if not self.path.is_file():
            raise DslFedError(f"{self.path}: model file not found")
        if threads is not None and threads < 1:
            raise DslFedError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._interpreter = Interpreter(model_path=str(self.path), num_threads=threads)
            with without_delegate_notice():
                self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            first = first_line(exc)
            raise DslFedError(f"{self.path}: not a loadable TFLite model ({first})") from None
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise DslFedError(f"{self.path}: expected one input and one output tensor, got {len(inputs)} and {len(outputs)}")
        self._input = inputs[0]
        self._output = outputs[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, without the batch axis (e.g. ``(48000,)`` or ``(224, 224, 3)``)."""
        return tuple(int(d) for d in self._input["shape"][1:])

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(self._input["dtype"])

    @property
    def num_outputs(self) -> int:
        return int(np.prod(self._output["shape"][1:]))

    def predict_one(self, example: np.ndarray) -> np.ndarray:
        """Run one example (shape `input_shape`, or with a leading batch of 1) and return float32 outputs."""
        x = np.asarray(example, dtype=np.float32)
        if x.shape == (1, *self.input_shape):
            x = x[0]
        if x.shape != self.input_shape:
            raise DslFedError(f"{self.path}: expects one input of shape {self.input_shape}, got {x.shape}")
        self._interpreter.set_tensor(self._input["index"], _quantize(x[None], self._input))
        self._interpreter.invoke()
        return _dequantize(self._interpreter.get_tensor(self._output["index"]), self._output)[0]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Run every example of `batch` (N, *input_shape) and stack the outputs to (N, num_outputs)."""
        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim != len(self.input_shape) + 1:
            expected = ", ".join(map(str, self.input_shape))
            raise DslFedError(f"{self.path}: expects a batch of shape (N, {expected}), got {batch.shape}")
        out = np.empty((len(batch), self.num_outputs), dtype=np.float32)
        for i, example in enumerate(batch):
            out[i] = self.predict_one(example).reshape(-1)
        return out


# LiteRT's C++ code writes "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." to stderr on every model load.
DELEGATE_NOTICE = re.compile("XNNPACK delegate")


def without_delegate_notice() -> contextlib.AbstractContextManager:
    """Drop LiteRT's delegate notice from stderr; anything else written there is passed on."""
    return without_stderr_lines(DELEGATE_NOTICE)


def _quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dtype == np.float32:
        return x
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(dtype)


def _dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
    if np.dtype(detail["dtype"]) == np.float32:
        return y.copy()
    scale, zero_point = detail["quantization"]
    return ((y.astype(np.float32) - zero_point) * scale).astype(np.float32)


def model_operators(model: str | Path | bytes) -> list[str]:
    """Distinct operator names in a `.tflite` flatbuffer, sorted.

    Read from the flatbuffer's operator codes rather than from the interpreter, because the interpreter
    reports ops that XNNPACK took over as one opaque "DELEGATE" node. Builtins appear by name
    (``CONV_2D``); custom ops as ``CUSTOM:<code>`` (TensorFlow "Flex" ops are custom ops named ``Flex...``).
    """
    from ai_edge_litert import schema_py_generated as schema

    content = model if isinstance(model, (bytes, bytearray)) else Path(model).read_bytes()
    try:
        root = schema.Model.GetRootAsModel(content, 0)
        codes = [root.OperatorCodes(i) for i in range(root.OperatorCodesLength())]
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a flatbuffer"
        raise DslFedError(f"not a TFLite flatbuffer ({exc.__class__.__name__})") from None
    builtin_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    names = set()
    for code in codes:
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())  # old files only fill the deprecated field
        if builtin == schema.BuiltinOperator.CUSTOM:
            names.add(f"CUSTOM:{(code.CustomCode() or b'').decode()}")
        else:
            names.add(builtin_names.get(builtin, f"BUILTIN_{builtin}"))
    return sorted(names)


def flex_operators(model: str | Path | bytes) -> list[str]:
    """The Select-TF ("Flex") operators a model would need; empty for a builtins-only model."""
    return [name for name in model_operators(model) if name.startswith("CUSTOM:Flex")]


def count_parameters(model: str | Path | bytes) -> int:
    """Number of stored values in a `.tflite` file: the elements of every constant tensor except integer
    shape, axis and index operands.

    That is weights, biases (int32 with a quantisation scale in integer models) and lookup tables, including
    the spectrogram's DFT kernel, Mel matrix and colour map, which Keras does not count as parameters. A
    float16-stored weight counts once (its float32 twin is computed at load time and has no buffer).
    """
    from ai_edge_litert import schema_py_generated as schema

    content = model if isinstance(model, (bytes, bytearray)) else Path(model).read_bytes()
    root = schema.Model.GetRootAsModel(content, 0)
    integer_operands = (schema.TensorType.INT32, schema.TensorType.INT64)
    total = 0
    for g in range(root.SubgraphsLength()):
        graph = root.Subgraphs(g)
        for i in range(graph.TensorsLength()):
            tensor = graph.Tensors(i)
            buffer = root.Buffers(tensor.Buffer())
            if buffer is None or (buffer.DataLength() == 0 and buffer.Size() == 0):
                continue  # not a constant
            quantization = tensor.Quantization()
            is_bias = quantization is not None and quantization.ScaleLength() > 0
            if tensor.Type() in integer_operands and not is_bias:
                continue
            total += int(np.prod(tensor.ShapeAsNumpy())) if tensor.ShapeLength() else 1
    return total


# ------------------------------------------------------------------------------------------ audio files


@dataclass(frozen=True)
class ChunkPrediction:
    """Class probabilities of one window of a file."""

    index: int
    start_s: float
    end_s: float
    probabilities: np.ndarray
    latency_ms: float


@dataclass(frozen=True)
class FilePrediction:
    """Everything `predict_file` found out about one audio file.

    Attributes:
        path: The audio file.
        duration_s: Its duration.
        file_rate: Its native sample rate (None if the decoder does not report one).
        chunks: One entry per window (offline chunking or stream hops).
        clip_probabilities: Mean of the chunk probabilities (the clip decision, as in evaluation).
        decision: Index of the most probable class of the clip.
    """

    path: Path
    duration_s: float
    file_rate: int | None
    chunks: list[ChunkPrediction]
    clip_probabilities: np.ndarray
    decision: int


def native_sample_rate(path: str | Path) -> int | None:
    """The file's own sample rate from its header, or None if libsndfile cannot tell (e.g. some MP3s)."""
    import soundfile as sf

    try:
        return int(sf.info(str(path)).samplerate)
    except Exception:  # noqa: BLE001 - any header problem surfaces properly in load_audio
        return None


def predict_file(
    runner: TFLiteRunner,
    path: str | Path,
    sample_rate: int,
    window: int,
    hop: int,
    stream: bool = False,
    realtime: bool = False,
    block: int | None = None,
    on_chunk: Callable[[ChunkPrediction], None] | None = None,
) -> FilePrediction:
    """Predict an audio file with an exported raw-audio model.

    Offline (default): the file is cut like training data (`chunk_signal`: hop-spaced windows, last one
    zero-padded). With `stream`, the file is replayed through `dsl_fed.stream.StreamPredictor` in blocks of
    `block` samples (default: one hop), optionally at real-time pace, giving one prediction per hop. Either
    way the file is decoded block by block (`AudioStream`): memory does not grow with the recording's length.

    Args:
        runner: The loaded model.
        path: Audio file (resampled to `sample_rate` if needed).
        sample_rate: The model's rate (from its manifest).
        window: Window length in samples (the model input).
        hop: Hop in samples.
        stream: Replay as a live stream instead of chunking.
        realtime: With `stream`, release blocks at the pace they would be recorded.
        block: With `stream`, samples per block (a microphone buffer).
        on_chunk: Called with each chunk's prediction as soon as it exists (for live output).

    Raises:
        DslFedError: the file cannot be read (see `load_audio`).
    """
    from dsl_fed.data.audio import AudioStream
    from dsl_fed.data.chunking import iter_chunks
    from dsl_fed.stream import StreamPredictor, replay

    path = Path(path)
    if runner.input_shape != (window,):
        raise DslFedError(f"{runner.path}: takes input {runner.input_shape}, not a raw-audio window of {window} samples")
    signal = AudioStream(path, sample_rate)
    chunks: list[ChunkPrediction] = []

    def emit(c: ChunkPrediction) -> None:
        chunks.append(c)
        if on_chunk is not None:
            on_chunk(c)

    if stream:
        predictor = StreamPredictor(runner.predict_one, window, hop)
        for p in replay(signal, predictor, block or hop, sample_rate, realtime=realtime):
            emit(ChunkPrediction(p.index, p.start / sample_rate, p.end / sample_rate, p.probabilities, p.latency_ms))
    else:
        for i, x in enumerate(iter_chunks(signal, window, hop)):
            t0 = time.perf_counter()
            probs = runner.predict_one(x)
            latency = (time.perf_counter() - t0) * 1000.0
            emit(ChunkPrediction(i, i * hop / sample_rate, (i * hop + window) / sample_rate, probs, latency))
    clip = np.mean([c.probabilities for c in chunks], axis=0)
    return FilePrediction(path, signal.samples / sample_rate, native_sample_rate(path), chunks, clip, int(np.argmax(clip)))
