"""SpectrogramImage against librosa + numpy, its orientation, serialisation, tf.data, LiteRT parity and edge cases."""

from __future__ import annotations

import keras
import librosa
import matplotlib
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dsl_fed.config import COLORMAPS, MAX_TOP_DB, SpectrogramConfig
from dsl_fed.errors import DslFedError
from dsl_fed.spectrogram import (
    SpectrogramImage,
    colormap_lut,
    mel_filterbank,
    normalise_image,
    spectrogram_layer,
)

SR = 16000
N = 3 * SR  # one 3 s chunk

# How far two correct computations of the same image may differ (stated in the README). Measured on these
# inputs: <= 0.007 grey levels between float32 on ulp-perturbed input and float64 (at the 80 dB floor).
GREY_TOL = 0.1  # grey levels of the 0-255 min-max image
RGB_TOL = GREY_TOL * 2.7  # viridis moves by at most 2.68 colour levels per grey level
NORM_TOL = RGB_TOL / (255 * 0.224)  # "torch" normalisation divides by 255 * std (smallest std 0.224)


def chirp_noise(seed: int = 0, n: int = N, sr: int = SR) -> np.ndarray:
    """A real-looking test signal: a 100 Hz -> 7 kHz chirp plus white noise 20 dB down."""
    rng = np.random.default_rng(seed)
    chirp = librosa.chirp(fmin=100, fmax=7000, sr=sr, length=n)
    return (0.5 * chirp + 0.05 * rng.standard_normal(n)).astype(np.float32)


def tone(hz: float, n: int = N, sr: int = SR) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * hz * np.arange(n) / sr)).astype(np.float32)


def hard_chunks() -> np.ndarray:
    """Chunks whose weakest Mel bins hold only float rounding noise (tones, DC, clipping), a click in silence,
    and two real-looking ones (chirp + noise, white noise)."""
    t = np.arange(N) / SR
    chunks = [
        tone(300.0),
        tone(1000.0),  # exactly on an FFT bin: the Hann window leaks nothing, every other bin is pure noise
        0.9 * np.sin(2 * np.pi * 4321.0 * t),
        np.full(N, 0.5),
        np.where(np.arange(N) == N // 2, 1.0, 0.0),
        np.clip(5.0 * np.sin(2 * np.pi * 200.0 * t), -1.0, 1.0),
        chirp_noise(seed=9),
        0.3 * np.random.default_rng(9).standard_normal(N),
    ]
    return np.stack(chunks).astype(np.float32)


def librosa_mel_db(x: np.ndarray, layer: SpectrogramImage) -> np.ndarray:
    """Reference (n_mels, frames) dB matrix with the layer's settings (librosa's default centred framing).

    Computes in the dtype of `x` (float64 input: float64 all the way, the Mel matrix aside).
    """
    peak = np.max(np.abs(x))
    x = x / peak if peak > 0 else x
    power = librosa.feature.melspectrogram(
        y=x, sr=layer.sample_rate, n_fft=layer.n_fft, hop_length=layer.hop, win_length=layer.n_fft,
        window="hann", center=True, pad_mode="constant", power=2.0, n_mels=layer.n_mels,
        fmin=layer.fmin, fmax=layer.fmax, htk=False, norm="slaney",
    )
    floored = librosa.power_to_db(power, ref=layer.db_ref, amin=layer.db_amin, top_db=layer.top_db)
    return np.where(silent_frames(x, layer)[None, :], librosa.power_to_db(power, ref=layer.db_ref, amin=layer.db_amin,
                                                                        top_db=None), floored)


def silent_frames(x: np.ndarray, layer: SpectrogramImage) -> np.ndarray:
    """Frames (librosa's centred framing) whose samples are all exactly zero: they keep amin, unfloored."""
    padded = np.pad(x, layer.n_fft // 2)
    count = 1 + (padded.size - layer.n_fft) // layer.hop
    return np.array([not padded[k * layer.hop:k * layer.hop + layer.n_fft].any() for k in range(count)])


def reference_grey(x: np.ndarray, layer: SpectrogramImage) -> np.ndarray:
    """The paper's min-max image (n_mels, frames) in [0, 255] from `librosa_mel_db`, row 0 = highest band."""
    db = librosa_mel_db(x, layer)[::-1]
    return (db - db.min()) / max(db.max() - db.min(), 1e-6) * 255.0


def reference_rgb(x: np.ndarray, layer: SpectrogramImage) -> np.ndarray:
    """librosa + numpy LUT interpolation + PIL bilinear resize: the pipeline written independently of TF."""
    grey = reference_grey(x, layer)
    lut = colormap_lut(layer.colormap)
    size = (layer.image_size, layer.image_size)
    channels = []
    for c in range(3):
        coloured = np.interp(grey, np.arange(256), lut[:, c]).astype(np.float32)
        channels.append(np.asarray(Image.fromarray(coloured).resize(size, Image.BILINEAR)))
    return np.stack(channels, axis=-1)


# ------------------------------------------------------------------------------- against librosa


def test_mel_filterbank_is_librosas():
    ours = mel_filterbank(SR, 512, 128, fmin=50.0, fmax=7600.0)
    ref = librosa.filters.mel(sr=SR, n_fft=512, n_mels=128, fmin=50.0, fmax=7600.0, htk=False, norm="slaney")
    assert ours.shape == (257, 128) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref.T)


@pytest.mark.parametrize(
    ("sample_rate", "top_db"),
    [(16000, 80.0), (22050, 60.0)],  # 22.05 kHz: n_fft = 706, not a power of two
)
def test_mel_db_matches_librosa(sample_rate, top_db):
    """Within 0.005 dB (README); measured <= 0.0007 dB, float32 round-off of the two DFTs."""
    layer = SpectrogramImage(sample_rate=sample_rate, top_db=top_db, image_size=32)
    for x in (chirp_noise(n=3 * sample_rate, sr=sample_rate), tone(300.0, n=3 * sample_rate, sr=sample_rate)):
        ref = librosa_mel_db(x, layer)
        ours = layer.mel_db(x[None]).numpy()[0].T
        assert ours.shape == ref.shape == (128, 1 + 3 * sample_rate // layer.hop)
        assert np.max(np.abs(ours - ref)) <= 0.005
    assert ref.min() == pytest.approx(ref.max() - top_db)  # the tone reaches the floor: the clip is tested too


@pytest.mark.parametrize(
    ("size", "top_db", "colormap"),
    [(224, 80.0, "viridis"), (256, 60.0, "magma")],  # upsampling on both axes: PIL's bilinear = TF's (no antialias)
)
def test_rgb_image_matches_librosa_numpy_reference(size, top_db, colormap):
    """The paper's look, rendered independently: within 0.02 colour levels (README); measured <= 0.003."""
    layer = SpectrogramImage(image_size=size, top_db=top_db, colormap=colormap, preprocess="none")
    for x in (chirp_noise(seed=1), tone(300.0)):
        ours = layer(x[None]).numpy()[0]
        ref = reference_rgb(x, layer)
        assert ours.shape == ref.shape == (size, size, 3)
        assert np.max(np.abs(ours - ref)) <= 0.02


@pytest.mark.parametrize(("top_db", "tolerance"), [(80.0, GREY_TOL), (120.0, 2.5 * GREY_TOL)])
def test_image_does_not_depend_on_float_rounding(top_db, tolerance):
    """What another CPU kernel would do: round differently. Two stand-ins for it, on inputs whose weakest bins are
    pure rounding noise: the input moved by +-1 ulp per sample, and the whole pipeline in float64 (librosa).

    Measured max deviation: 0.003 (80 dB) / 0.12 (120 dB, the default) grey levels. Without the floor up to 146.
    """
    layer = SpectrogramImage(image_size=32, top_db=top_db)
    x = hard_chunks()
    rng = np.random.default_rng(10)
    nudged = np.where(rng.random(x.shape) < 0.5, np.nextafter(x, np.float32(2)), np.nextafter(x, np.float32(-2)))
    grey = layer.grey(x).numpy()
    np.testing.assert_allclose(layer.grey(nudged).numpy(), grey, rtol=0, atol=tolerance)
    for i, chunk in enumerate(x):
        np.testing.assert_allclose(grey[i], reference_grey(chunk.astype(np.float64), layer), rtol=0, atol=tolerance)
    assert grey.min() == 0.0 and grey.max() == pytest.approx(255.0)


@pytest.mark.parametrize("mode", ["torch", "tf", "caffe"])
def test_normalise_image_matches_keras_preprocess_input(mode):
    rgb = np.random.default_rng(0).uniform(0, 255, (2, 5, 5, 3)).astype(np.float32)
    expected = keras.applications.imagenet_utils.preprocess_input(rgb.copy(), mode=mode)
    np.testing.assert_allclose(normalise_image(rgb, mode).numpy(), expected, atol=1e-4)


def test_normalised_output_is_normalise_image_of_rgb():
    """The normalisation folded into the LUT gives the same image as normalising the RGB image afterwards."""
    x = chirp_noise(seed=2)[None]
    for mode in ("torch", "caffe"):
        layer = SpectrogramImage(preprocess=mode, image_size=48)
        np.testing.assert_allclose(layer(x).numpy(), normalise_image(layer.rgb(x), mode).numpy(), atol=1e-4)
    assert np.array_equal(normalise_image(np.ones((1, 1, 3)), "none").numpy(), np.ones((1, 1, 3)))


# ------------------------------------------------------------------------------ orientation


def test_pure_tone_brightest_row_is_its_mel_bin():
    layer = SpectrogramImage(image_size=128, preprocess="none")  # 128 rows = 128 Mel bands, no vertical resampling
    hz = 1000.0
    expected_band = int(np.argmax(mel_filterbank(SR, 512, 128)[round(hz * 512 / SR)]))
    x = tone(hz)[None]
    grey = layer.grey(x).numpy()[0]
    assert int(np.argmax(grey.mean(axis=1))) == 127 - expected_band  # row 0 is the highest band
    green = layer(x).numpy()[0, :, :, 1]  # viridis' green channel grows monotonically with the value
    assert int(np.argmax(green.mean(axis=1))) == 127 - expected_band


def test_digital_silence_keeps_the_papers_level_and_sound_is_not_pinned_to_black():
    """Frames of exact zeros stay at amin (-160 dB) as in the paper's unfloored image, so they are the image's
    black, and the quiet parts of the sound keep their grey levels; flooring every frame at the peak - 80 dB
    (as before) made the silence the floor and pinned the weak bins of the sound to black with it."""
    x = chirp_noise(seed=4)
    x[: N // 3] = 0.0  # leading silence, as in a recording or a padded last chunk
    layer = SpectrogramImage(image_size=32)
    grey = layer.grey(x[None]).numpy()[0]
    silent = silent_frames(x, layer)
    assert silent.sum() > 50 and np.all(grey[:, silent] == 0.0)
    assert grey[:, ~silent].min() > 60.0  # the chirp's weakest bins lie far above digital silence
    unfloored = SpectrogramImage(image_size=32, top_db=MAX_TOP_DB)
    np.testing.assert_allclose(grey, reference_grey(x, unfloored), rtol=0, atol=0.02)  # = the paper's image here
    floored_everywhere = librosa.power_to_db(librosa.feature.melspectrogram(
        y=x / np.abs(x).max(), sr=SR, n_fft=512, hop_length=256, center=True, pad_mode="constant"), top_db=80.0)
    assert (floored_everywhere == floored_everywhere.min()).mean() > 0.3  # what the old rule drew as black


def test_time_runs_left_to_right():
    layer = SpectrogramImage(image_size=64, preprocess="none")
    x = tone(2000.0)
    x[N // 2 :] = 0.0
    green = layer(x[None]).numpy()[0, :, :, 1]
    columns = green.max(axis=0)  # the tone's band is bright; the silent half sits at the floor everywhere
    assert columns[:28].min() > columns[36:].max() + 100.0


def test_low_frequencies_at_the_bottom():
    layer = SpectrogramImage(image_size=64, preprocess="none")
    green = layer(tone(150.0)[None]).numpy()[0, :, :, 1]
    assert int(np.argmax(green.mean(axis=1))) >= 56


# -------------------------------------------------------------------------------- colour maps


def test_viridis_endpoints_equal_matplotlib():
    viridis = matplotlib.colormaps["viridis"]
    lut = colormap_lut("viridis")
    np.testing.assert_allclose(lut[0], np.array(viridis(0)[:3]) * 255, atol=1e-9)
    np.testing.assert_allclose(lut[255], np.array(viridis(255)[:3]) * 255, atol=1e-9)
    np.testing.assert_allclose(lut[0], [68.08602, 1.24287, 84.000825], atol=1e-3)
    layer = SpectrogramImage(image_size=16, preprocess="none")
    ends = layer.colorize(tf.constant([0.0, 255.0, 127.5])).numpy()
    np.testing.assert_allclose(ends[:2], lut[[0, 255]], atol=1e-3)
    np.testing.assert_allclose(ends[2], (lut[127] + lut[128]) / 2, atol=1e-3)  # linear interpolation


@pytest.mark.parametrize("name", COLORMAPS)
def test_every_colour_map_has_256_entries_in_range(name):
    lut = colormap_lut(name)
    assert lut.shape == (256, 3)
    assert lut.min() >= 0.0 and lut.max() <= 255.0
    assert np.abs(np.diff(lut, axis=0)).max() < 10.0  # smooth maps: neighbouring entries are close


def test_gray_goes_black_to_white():
    lut = colormap_lut("gray")
    np.testing.assert_allclose(lut[[0, 255]], [[0, 0, 0], [255, 255, 255]], atol=1e-6)


# ------------------------------------------------------------------------ keras integration


def test_config_round_trip_and_spectrogram_layer():
    cfg = SpectrogramConfig(n_mels=64, fmin=20.0, fmax=7000.0, top_db=80.0, colormap="magma", image_size=48)
    layer = spectrogram_layer(cfg, sample_rate=SR, preprocess="caffe")
    config = layer.get_config()
    assert layer.name == "spectrogram"
    for key in ("window_ms", "hop_fraction", "n_mels", "fmin", "fmax", "db_ref", "db_amin", "top_db", "colormap"):
        assert config[key] == getattr(cfg, key)
    assert config["image_size"] == cfg.image_size
    assert config["sample_rate"] == SR and config["preprocess"] == "caffe"
    clone = SpectrogramImage.from_config(config)
    assert clone.get_config() == config
    x = chirp_noise(seed=3)[None]
    np.testing.assert_array_equal(clone(x).numpy(), layer(x).numpy())


def test_saved_keras_model_round_trip(tmp_path):
    inputs = keras.Input((N,))
    model = keras.Model(inputs, SpectrogramImage(image_size=32, colormap="plasma", preprocess="tf")(inputs))
    path = tmp_path / "spec.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.layers[-1].get_config() == model.layers[-1].get_config()
    x = np.stack([chirp_noise(seed=4), tone(440.0)])
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


def test_eager_and_inside_tf_data_map_agree():
    """Batch 9 eagerly vs batches of 2 in a traced tf.data map (different kernels may be picked): NORM_TOL."""
    layer = SpectrogramImage(image_size=32)
    x = np.concatenate([hard_chunks(), np.zeros((1, N), np.float32)])
    eager = layer(x).numpy()
    mapped = np.concatenate(list(tf.data.Dataset.from_tensor_slices(x).batch(2).map(layer).as_numpy_iterator()))
    assert eager.shape == (9, 32, 32, 3)
    np.testing.assert_allclose(mapped, eager, rtol=0, atol=NORM_TOL)


def test_batch_of_one_equals_same_chunk_in_batch_of_32():
    layer = SpectrogramImage(image_size=48)
    rng = np.random.default_rng(6)
    batch = (rng.standard_normal((32, N)) * rng.uniform(0.01, 3.0, (32, 1))).astype(np.float32)
    batch[: len(hard_chunks())] = hard_chunks()
    together = layer(batch).numpy()
    for i in range(len(hard_chunks())):
        np.testing.assert_allclose(together[i], layer(batch[i : i + 1]).numpy()[0], rtol=0, atol=NORM_TOL)


def test_silent_constant_and_clipped_chunks_are_finite():
    layer = SpectrogramImage(image_size=32, preprocess="none")
    t = np.arange(N) / SR
    chunks = np.stack([
        np.zeros(N),  # silent
        np.full(N, 0.5),  # constant (DC)
        np.clip(5.0 * np.sin(2 * np.pi * 200 * t), -1.0, 1.0),  # hard-clipped
        np.where(np.arange(N) == N // 2, 1.0, 0.0),  # a single click
        np.full(N, 1e-30),  # tiny but normal: scaled like DC
        np.full(N, 1e-40),  # subnormal: silent, whether or not a kernel flushes subnormals to zero
    ]).astype(np.float32)
    images = layer(chunks).numpy()
    assert np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 255.0 + 1e-3
    silent = np.broadcast_to(colormap_lut("viridis")[0], (32, 32, 3))
    np.testing.assert_allclose(images[0], silent, atol=1e-3)
    np.testing.assert_allclose(images[5], silent, atol=1e-3)
    np.testing.assert_allclose(images[4], images[1], atol=RGB_TOL)
    assert np.isfinite(SpectrogramImage(image_size=32)(chunks).numpy()).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"colormap": "jet"}, "colour map"),
        ({"preprocess": "keras"}, "preprocessing"),
        ({"hop_fraction": 0.0}, "hop_fraction"),
        ({"fmax": 9000.0}, "fmax"),
        ({"top_db": None}, r"top_db must be a number of dB in \(0, 120\]"),
        ({"top_db": 130.0}, "top_db"),
    ],
)
def test_invalid_arguments_raise_dsl_fed_error(kwargs, message):
    with pytest.raises(DslFedError, match=message):
        SpectrogramImage(**kwargs)


# ---------------------------------------------------------------------------------- LiteRT


@pytest.mark.parametrize(("preprocess", "tolerance"), [("torch", NORM_TOL), ("none", RGB_TOL)])
def test_tflite_builtins_only_and_parity(preprocess, tolerance):
    """Full-size images, LiteRT (XNNPACK) vs TF (oneDNN): they sum in different orders, within the README's
    tolerance (0.1 grey levels, i.e. `RGB_TOL` colour levels or `NORM_TOL` normalised)."""
    from ai_edge_litert.interpreter import Interpreter

    inputs = keras.Input((N,))
    model = keras.Model(inputs, SpectrogramImage(preprocess=preprocess)(inputs))
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # conversion fails on any Flex op
    interpreter = Interpreter(model_content=converter.convert(), num_threads=2)
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert not any(name.startswith("Flex") or name == "CUSTOM" for name in ops), ops
    x = np.concatenate([hard_chunks(), np.zeros((1, N), np.float32)])
    interpreter.resize_tensor_input(0, list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    lite = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    assert lite.shape == (9, 224, 224, 3)
    assert np.isfinite(lite).all()
    assert np.max(np.abs(lite - model(x).numpy())) <= tolerance
