"""The paper's spectrogram image as one Keras layer, so training, evaluation and the exported TFLite model
run literally the same preprocessing.

Pipeline of `SpectrogramImage` (every step per chunk, no batch-wide statistics, only TFLite builtin ops):

1. peak normalisation ``x / max|x|`` (a silent chunk stays zero, and so does one whose peak is a subnormal
   float, which some kernels flush to zero), as `dsl_fed.data.chunking.normalise_chunks`;
2. STFT, periodic Hann window of ``window_ms`` (512 samples at 16 kHz), ``n_fft`` = window length, hop =
   ``hop_fraction`` of the window. Framing is librosa's default ``center=True, pad_mode="constant"``: the
   chunk is zero-padded by ``n_fft // 2`` on both sides, giving ``1 + samples // hop`` frames (188 for 3 s).
   Computed as a strided convolution with the window-folded DFT basis (see `SpectrogramImage.mel_power`),
   which works for any ``n_fft`` (TFLite's RFFT2D needs a power of two) and is the fastest variant in LiteRT;
3. power ``|X|^2``;
4. Mel filterbank ``librosa.filters.mel(htk=False, norm="slaney")`` (Slaney scale and area normalisation,
   librosa's defaults), computed once in numpy when the layer is built;
5. dB ``10 log10(max(S, db_amin)) - 10 log10(max(db_amin, db_ref))`` as ``librosa.power_to_db``; frames with
   sound are floored at the chunk's own maximum minus ``top_db`` (``power_to_db(..., top_db=top_db)`` on one
   chunk), frames of digital silence (every sample exactly zero) keep ``db_amin``, as without a floor;
6. min-max of each chunk to [0, 255] (a constant chunk maps to 0, never NaN);
7. colour map: 256-entry matplotlib LUT with linear interpolation between entries;
8. bilinear resize (half-pixel centres, no antialiasing: TFLite's RESIZE_BILINEAR) to ``image_size``;
9. the backbone's ImageNet normalisation, see `normalise_image`. Because steps 7-9 are linear per pixel and the
   bilinear weights sum to one, the normalisation is folded into the LUT (same result, one pass less).

Why the floor, and why only on frames with sound: the min-max of step 6 takes its minimum from the weakest Mel
bin. For a pure tone, DC or clipped audio that bin holds float32 rounding noise of the DFT (about 150 dB below
the chunk's peak), which depends on the kernel the CPU, batch size and runtime pick: without a floor the whole
image would shift with it. The floor ``top_db`` (default 120 dB = `MAX_TOP_DB`) below the chunk's peak sets the
darkest value instead, and steps 6-9 are continuous, so the image moves by at most 0.25 grey levels (0.12
measured with ulp-perturbed input and a float64 reference in tests/test_spectrogram.py). A frame of digital silence
(leading silence, pauses, a padded last chunk) is exactly zero on every CPU, so it needs no floor and keeps the
paper's ``db_amin`` level. An 80 dB floor on every frame (as librosa's ``top_db``) drew a third of a studio
recording's pixels black, silence included, and a one-client-per-speaker federation then stayed at
chance for five rounds where the paper's image learned from round 2 (benchmarks/results/floor_regression.md). Now an image differs from the paper's no-floor one only where a frame with sound has bins more
than ``top_db`` below the chunk's peak.

Orientation is that of a plot: row 0 (top) is the highest Mel bin, time runs left to right.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from dsl_fed.config import COLORMAPS, MAX_TOP_DB, SpectrogramConfig, frame_geometry, num_frames  # noqa: F401 (API)
from dsl_fed.errors import DslFedError

PREPROCESS_MODES: tuple[str, ...] = ("torch", "tf", "caffe", "none")

# keras.applications.imagenet_utils constants (RGB order; caffe means are given in BGR order there).
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


# ------------------------------------------------------------------------------------------- constants


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """librosa's Slaney-scale, Slaney-normalised Mel filters, transposed to right-multiply a power spectrum.

    Args:
        sample_rate: Sampling rate in Hz.
        n_fft: FFT length; the filters act on its ``n_fft // 2 + 1`` bins.
        n_mels: Number of Mel bands.
        fmin: Lowest band edge in Hz.
        fmax: Highest band edge in Hz; None = ``sample_rate / 2``.

    Returns:
        float32 array ``(n_fft // 2 + 1, n_mels)`` equal to ``librosa.filters.mel(...).T``.
    """
    import librosa  # lazy: only needed to build the constant matrix

    return np.ascontiguousarray(
        librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=False,
                            norm="slaney", dtype=np.float32).T
    )


def colormap_lut(name: str) -> np.ndarray:
    """The 256-entry RGB table of a matplotlib colour map, scaled to [0, 255].

    Args:
        name: One of ``dsl_fed.config.COLORMAPS`` (viridis, magma, plasma, inferno, cividis, gray).

    Returns:
        float64 array ``(256, 3)``; row ``i`` is ``cmap(i)`` of the 256-colour version of the map.
    """
    if name not in COLORMAPS:
        raise DslFedError(f"unknown colour map {name!r} (choose from {', '.join(COLORMAPS)})")
    import matplotlib  # lazy: only needed to build the constant table

    cmap = matplotlib.colormaps[name]
    if cmap.N != 256:
        cmap = cmap.resampled(256)
    return np.asarray(cmap(np.arange(256))[:, :3], dtype=np.float64) * 255.0


def _normalisation(preprocess: str) -> tuple[list[int], np.ndarray, np.ndarray]:
    """``(channel_order, scale, offset)`` such that ``out = rgb[..., order] * scale + offset``."""
    if preprocess == "torch":  # (x / 255 - mean) / std, RGB
        std = np.array(_TORCH_STD)
        return [0, 1, 2], 1.0 / (255.0 * std), -np.array(_TORCH_MEAN) / std
    if preprocess == "tf":  # x / 127.5 - 1
        return [0, 1, 2], np.full(3, 1.0 / 127.5), np.full(3, -1.0)
    if preprocess == "caffe":  # RGB -> BGR, minus the BGR mean, no scaling
        return [2, 1, 0], np.ones(3), -np.array(_CAFFE_MEAN_BGR)
    if preprocess == "none":
        return [0, 1, 2], np.ones(3), np.zeros(3)
    raise DslFedError(f"unknown image preprocessing {preprocess!r} (choose from {', '.join(PREPROCESS_MODES)})")


def normalise_image(rgb_0_255: Any, preprocess: str) -> tf.Tensor:
    """A backbone's ImageNet input normalisation, as ``keras.applications.imagenet_utils.preprocess_input``.

    Modes (x is RGB in [0, 255], channels last):
    - ``"torch"`` (DenseNet): ``(x / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]``, RGB order;
    - ``"tf"`` (MobileNet, Inception): ``x / 127.5 - 1``;
    - ``"caffe"`` (VGG, ResNet50): channels reversed to BGR, then ``- [103.939, 116.779, 123.68]``;
    - ``"none"`` (EfficientNet and others that normalise inside the model): ``x`` unchanged.

    Args:
        rgb_0_255: ``(..., 3)`` tensor or array in [0, 255].
        preprocess: One of `PREPROCESS_MODES`.

    Returns:
        float32 tensor of the same shape.
    """
    order, scale, offset = _normalisation(preprocess)
    x = tf.cast(tf.convert_to_tensor(rgb_0_255), tf.float32)
    if preprocess == "none":
        return x
    if order != [0, 1, 2]:
        x = tf.gather(x, order, axis=-1)
    return x * tf.constant(scale, tf.float32) + tf.constant(offset, tf.float32)


# ------------------------------------------------------------------------------------------------ layer


@keras.saving.register_keras_serializable(package="dsl_fed")
class SpectrogramImage(keras.layers.Layer):
    """Raw waveform chunks ``(B, samples)`` -> colour Mel-spectrogram images ``(B, S, S, 3)``.

    See the module docstring for the steps. ``preprocess="none"`` returns the RGB image in [0, 255] (for plots
    and for backbones that normalise themselves). Intermediate stages are public methods for tests and plots:
    `mel_db` ``(B, frames, n_mels)``, `grey` ``(B, n_mels, frames)`` in [0, 255] (image orientation) and `rgb`
    (the resized colour image before normalisation).

    Args:
        sample_rate: Input sampling rate in Hz.
        window_ms: STFT window (and FFT) length in milliseconds.
        hop_fraction: Frame step as a fraction of the window.
        n_mels: Mel bands = image rows before resizing.
        fmin: Lowest Mel band edge in Hz.
        fmax: Highest Mel band edge in Hz; None = Nyquist.
        db_ref: dB reference power (0 dB).
        db_amin: Power floor before the logarithm.
        top_db: Floor the dB values of frames with sound at the chunk's maximum minus `top_db`, in
            (0, `MAX_TOP_DB`]; keeps float rounding noise out of the image (see the module docstring).
        colormap: Matplotlib colour map name, see ``dsl_fed.config.COLORMAPS``.
        image_size: Output height and width in pixels.
        preprocess: Backbone normalisation, one of `PREPROCESS_MODES`.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        window_ms: float = 32.0,
        hop_fraction: float = 0.5,
        n_mels: int = 128,
        fmin: float = 0.0,
        fmax: float | None = None,
        db_ref: float = 1.0,
        db_amin: float = 1e-16,
        top_db: float = 120.0,
        colormap: str = "viridis",
        image_size: int = 224,
        preprocess: str = "torch",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("dtype", "float32")  # the DSP runs in float32 even under a mixed-precision policy
        super().__init__(**kwargs)
        self.sample_rate = int(sample_rate)
        self.window_ms = float(window_ms)
        self.hop_fraction = float(hop_fraction)
        self.n_mels = int(n_mels)
        self.fmin = float(fmin)
        self.fmax = None if fmax is None else float(fmax)
        self.db_ref = float(db_ref)
        self.db_amin = float(db_amin)
        self.top_db = None if top_db is None else float(top_db)  # None (no floor) is rejected below
        self.colormap = str(colormap)
        self.image_size = int(image_size)
        self.preprocess = str(preprocess)
        self._check_arguments()

        self.n_fft, self.hop = frame_geometry(self.sample_rate, self.window_ms, self.hop_fraction)
        self._step = math.gcd(self.n_fft, self.hop)
        self._stft_kernel = _stft_kernel(self.n_fft, self._step)
        mel = mel_filterbank(self.sample_rate, self.n_fft, self.n_mels, self.fmin, self.fmax)
        self._mel_stacked = np.concatenate([mel, mel], axis=0)  # [Re^2 | Im^2] @ [mel; mel] = power @ mel
        self._mel_stacked_flipped = np.ascontiguousarray(self._mel_stacked[:, ::-1])  # image rows: top band first
        lut = colormap_lut(self.colormap)
        self._lut_rgb = _interpolation_table(lut)
        order, scale, offset = _normalisation(self.preprocess)
        self._lut_out = _interpolation_table(lut[:, order] * scale + offset)

    def _check_arguments(self) -> None:
        checks = [
            (self.sample_rate > 0, f"sample_rate must be > 0, got {self.sample_rate}"),
            (self.window_ms * self.sample_rate / 1000.0 >= 2, f"window_ms={self.window_ms} gives < 2 samples"),
            (0 < self.hop_fraction <= 1, f"hop_fraction must be in (0, 1], got {self.hop_fraction}"),
            (self.n_mels >= 1, f"n_mels must be >= 1, got {self.n_mels}"),
            (self.fmin >= 0, f"fmin must be >= 0, got {self.fmin}"),
            (self.fmax is None or self.fmin < self.fmax <= self.sample_rate / 2,
             "fmax must be in (fmin, sample_rate / 2]"),
            (self.db_ref > 0 and self.db_amin > 0, "db_ref and db_amin must be > 0"),
            (self.top_db is not None and 0 < self.top_db <= MAX_TOP_DB,
             f"top_db must be a number of dB in (0, {MAX_TOP_DB:g}] (a floor below the chunk's peak that float "
             f"rounding noise never reaches), got {self.top_db}"),
            (self.image_size >= 1, f"image_size must be >= 1, got {self.image_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise DslFedError(f"SpectrogramImage: {message}")

    # -------------------------------------------------------------------------------------- stages

    def mel_power(self, waveforms: Any, flipped: bool = False) -> tf.Tensor:
        """Mel power spectrogram ``(B, frames, n_mels)`` of peak-normalised chunks (librosa's layout transposed).

        The STFT is a strided 1-D convolution whose kernels are the window-folded cosine and sine DFT bases:
        framing, windowing and the DFT become one CONV_2D. In LiteRT this stage measured about 2x faster than
        framing + ``tf.signal.rfft`` (RFFT2D runs single-threaded outside XNNPACK); in TF the RFFT would be about
        2x faster, but there the backbone dominates, so the device decides. Squaring the [Re | Im] outputs and
        multiplying by the stacked ``[mel; mel]`` matrix gives ``(Re^2 + Im^2) @ mel``. ``flipped=True`` orders
        the bands highest first (image rows).
        """
        blocks, t = self._blocks(waveforms)
        return self._power(blocks, t, flipped)

    def _blocks(self, waveforms: Any) -> tuple[tf.Tensor, int]:
        """Peak-normalised, centre-padded chunks as ``(B, samples / step, step)`` blocks, and the frame count."""
        x = tf.cast(tf.convert_to_tensor(waveforms), tf.float32)
        num_samples = x.shape[-1]
        if num_samples is None:
            raise DslFedError("SpectrogramImage needs a fixed chunk length (static input shape)")
        peak = tf.reduce_max(tf.abs(x), axis=-1, keepdims=True)
        # exact x / peak; a silent chunk stays 0, and so does a subnormal one (kernels that flush them see 0)
        tiny = np.finfo(np.float32).tiny
        x = tf.where(peak >= tiny, x / tf.maximum(peak, tiny), 0.0)
        t = num_frames(num_samples, self.n_fft, self.hop)
        step = math.gcd(self.n_fft, self.hop)  # frames start on multiples of `step`: blocks of `step` samples
        used = (t - 1) * self.hop + self.n_fft
        pad = self.n_fft // 2  # librosa center=True, pad_mode="constant"
        x = tf.pad(x, [[0, 0], [pad, pad]])[:, :used]
        return tf.reshape(x, [-1, used // step, step]), t

    def _power(self, blocks: tf.Tensor, t: int, flipped: bool) -> tf.Tensor:
        parts = tf.nn.conv1d(blocks, self._stft_kernel, stride=self.hop // self._step, padding="VALID")  # (B, T, 2F)
        mel = tf.matmul(tf.reshape(tf.math.square(parts), [-1, self._stft_kernel.shape[-1]]),
                        self._mel_stacked_flipped if flipped else self._mel_stacked)
        return tf.reshape(mel, [-1, t, self.n_mels])

    def _silent(self, blocks: tf.Tensor) -> tf.Tensor:
        """``(B, frames, 1)``: True where every sample of the frame is exactly zero (exact on any CPU)."""
        ones = np.ones((self.n_fft // self._step, self._step, 1), dtype=np.float32)
        return tf.nn.conv1d(tf.abs(blocks), ones, stride=self.hop // self._step, padding="VALID") <= 0.0

    def mel_db(self, waveforms: Any, flipped: bool = False) -> tf.Tensor:
        """Mel spectrogram in dB ``(B, frames, n_mels)``; equals ``librosa.power_to_db(melspectrogram).T``."""
        return self._log_mel(waveforms, flipped=flipped, decibel=True)

    def grey(self, waveforms: Any) -> tf.Tensor:
        """Per-chunk min-max scaled dB image ``(B, n_mels, frames)`` in [0, 255]; row 0 = highest Mel band."""
        # Min-max removes dB's scale 10 / ln 10 and its reference offset: natural log is enough (2 ops less).
        log = tf.transpose(self._log_mel(waveforms, flipped=True, decibel=False), [0, 2, 1])
        low = tf.reduce_min(log, axis=[1, 2], keepdims=True)
        high = tf.reduce_max(log, axis=[1, 2], keepdims=True)
        return (log - low) * (255.0 / tf.maximum(high - low, 1e-7))  # a constant chunk gives 0, not NaN

    def colorize(self, grey: Any, normalised: bool = False) -> tf.Tensor:
        """Map values in [0, 255] through the colour LUT with linear interpolation -> ``(..., 3)``.

        With ``normalised=True`` the LUT already holds the backbone normalisation of each colour.
        """
        grey = tf.clip_by_value(tf.cast(grey, tf.float32), 0.0, 255.0)
        return self._colorize(grey, self._lut_out if normalised else self._lut_rgb)

    def rgb(self, waveforms: Any) -> tf.Tensor:
        """The colour image before normalisation ``(B, S, S, 3)`` in [0, 255] (what `dsl_fed plot` saves)."""
        return self._resize(self._colorize(self.grey(waveforms), self._lut_rgb))

    def call(self, inputs: Any) -> tf.Tensor:
        return self._resize(self._colorize(self.grey(inputs), self._lut_out))

    # ------------------------------------------------------------------------------------- helpers

    def _log_mel(self, waveforms: Any, flipped: bool, decibel: bool) -> tf.Tensor:
        """``ln(max(S, amin))``, or dB ``10 log10(max(S, amin)) - 10 log10(max(amin, ref))``; top-dB floor per chunk."""
        blocks, t = self._blocks(waveforms)
        log = tf.math.log(tf.maximum(self._power(blocks, t, flipped), self.db_amin))
        db_per_unit = 10.0 / math.log(10.0)
        if decibel:
            log = db_per_unit * log - 10.0 * math.log10(max(self.db_amin, self.db_ref))
        top = self.top_db if decibel else self.top_db / db_per_unit
        floored = tf.maximum(log, tf.reduce_max(log, axis=[1, 2], keepdims=True) - top)
        return tf.where(self._silent(blocks), log, floored)  # digital silence keeps its amin level (the paper)

    @staticmethod
    def _colorize(grey: tf.Tensor, table: tuple[np.ndarray, np.ndarray]) -> tf.Tensor:
        """LUT interpolation of values already in [0, 255]."""
        index = tf.minimum(tf.floor(grey), 254.0)  # entry 254 + fraction 1.0 reaches entry 255 exactly
        frac = tf.expand_dims(grey - index, -1)
        index = tf.cast(index, tf.int32)
        base, slope = table
        # Two (255, 3) gathers instead of one (255, 6) gather + slices: slices run outside XNNPACK in LiteRT.
        return tf.gather(base, index) + frac * tf.gather(slope, index)

    def _resize(self, image: tf.Tensor) -> tf.Tensor:
        size = (self.image_size, self.image_size)
        return tf.image.resize(image, size, method="bilinear", antialias=False)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (input_shape[0], self.image_size, self.image_size, 3)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            sample_rate=self.sample_rate,
            window_ms=self.window_ms,
            hop_fraction=self.hop_fraction,
            n_mels=self.n_mels,
            fmin=self.fmin,
            fmax=self.fmax,
            db_ref=self.db_ref,
            db_amin=self.db_amin,
            top_db=self.top_db,
            colormap=self.colormap,
            image_size=self.image_size,
            preprocess=self.preprocess,
        )
        return config


def _interpolation_table(lut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(lut[i], lut[i + 1] - lut[i])`` for i < 255, each ``(255, 3)`` float32: start and slope of segment i."""
    lut = np.asarray(lut, dtype=np.float64)
    return lut[:-1].astype(np.float32), (lut[1:] - lut[:-1]).astype(np.float32)


def _stft_kernel(n_fft: int, step: int) -> np.ndarray:
    """Conv1D kernel ``(n_fft / step, step, 2 * (n_fft // 2 + 1))``: periodic-Hann-windowed [cos | sin] DFT bases.

    Input blocks hold `step` consecutive samples, so kernel tap ``j``, channel ``c`` is sample ``j * step + c``
    of the frame. The sine sign is irrelevant because only squares are used.
    """
    n = np.arange(n_fft)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / n_fft)  # periodic Hann = scipy.signal.get_window("hann")
    phase = 2.0 * np.pi * np.outer(n, np.arange(n_fft // 2 + 1)) / n_fft
    basis = window[:, None] * np.concatenate([np.cos(phase), np.sin(phase)], axis=1)
    return basis.reshape(n_fft // step, step, -1).astype(np.float32)


def spectrogram_layer(cfg: SpectrogramConfig, sample_rate: int, preprocess: str) -> SpectrogramImage:
    """Build the model's ``"spectrogram"`` layer from the config's spectrogram section.

    Args:
        cfg: The ``spectrogram`` section of a `Config`.
        sample_rate: ``cfg.data.sample_rate``.
        preprocess: The backbone's normalisation mode (``BackboneSpec.preprocess``).
    """
    return SpectrogramImage(
        sample_rate=sample_rate,
        window_ms=cfg.window_ms,
        hop_fraction=cfg.hop_fraction,
        n_mels=cfg.n_mels,
        fmin=cfg.fmin,
        fmax=cfg.fmax,
        db_ref=cfg.db_ref,
        db_amin=cfg.db_amin,
        top_db=cfg.top_db,
        colormap=cfg.colormap,
        image_size=cfg.image_size,
        preprocess=preprocess,
        name="spectrogram",
    )
