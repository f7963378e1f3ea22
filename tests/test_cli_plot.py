"""`dsl_fed plot`: one PNG per chunk, the colour image before normalisation, one-line errors."""

from __future__ import annotations

import numpy as np
import soundfile as sf
from PIL import Image

from dsl_fed.cli import main
from dsl_fed.config import load_config
from dsl_fed.data.audio import load_audio
from dsl_fed.data.chunking import chunk_signal, count_chunks
from dsl_fed.spectrogram import spectrogram_layer

SR = 16000


def write_tone(path, seconds: float, hz: float = 1000.0, sr: int = SR):
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), sr)
    return path


def test_plot_writes_one_png_per_chunk(tmp_path, capsys):
    audio = write_tone(tmp_path / "tone.wav", seconds=4.0)
    config = tmp_path / "c.yaml"
    config.write_text(
        "data:\n  manifest: unused.csv\n  chunk_seconds: 2.0\n  hop_seconds: 1.0\nspectrogram:\n  image_size: 48\n"
    )
    out = tmp_path / "plots"
    assert main(["plot", str(audio), "--config", str(config), "--out", str(out)]) == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == [f"tone_chunk{i:03d}.png" for i in range(count_chunks(4 * SR, 2 * SR, SR))]
    assert len(files) == 3
    assert "wrote 3 image(s) of 48x48 px" in capsys.readouterr().out
    image = np.asarray(Image.open(files[0]))
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    # The PNG is the layer's colour image before normalisation, rounded: what the network sees.
    cfg = load_config(config)
    chunks = chunk_signal(load_audio(audio), cfg.data.chunk_samples, cfg.data.hop_samples)
    expected = spectrogram_layer(cfg.spectrogram, SR, preprocess="none")(chunks[:1]).numpy()[0]
    assert np.abs(image - expected).max() <= 0.5 + 1e-3
    # The 1 kHz tone is the brightest row, in the lower half (low frequencies at the bottom).
    brightest = int(np.argmax(image[:, :, 1].astype(float).mean(axis=1)))
    assert 24 <= brightest < 48
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_plot_defaults_and_overrides(tmp_path, capsys):
    audio = write_tone(tmp_path / "short.wav", seconds=1.0)
    out = tmp_path / "p"
    # positional overrides like every other command, also after options; the old --set still works
    assert main(["plot", str(audio), "--out", str(out), "spectrogram.colormap=gray", "--set", "spectrogram.image_size=32"]) == 0
    assert "--set is deprecated" in capsys.readouterr().err
    (png,) = out.glob("*.png")  # shorter than one 3 s chunk: one zero-padded chunk
    image = np.asarray(Image.open(png))
    assert image.shape == (32, 32, 3)
    assert np.array_equal(image[..., 0], image[..., 2])  # gray map: R == G == B


def test_plot_errors_are_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing.wav"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.wav: audio file not found" in err
    audio = write_tone(tmp_path / "a.wav", seconds=0.5)
    assert main(["plot", str(audio), "spectrogram.colormap=jet", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "spectrogram.colormap" in err and "jet" in err


def test_plot_replaces_its_own_images_but_never_a_users_file(tmp_path, capsys):
    audio = write_tone(tmp_path / "tone.wav", seconds=1.0)
    out = tmp_path / "p"
    assert main(["plot", str(audio), "--out", str(out)]) == 0
    assert main(["plot", str(audio), "--out", str(out), "spectrogram.colormap=gray"]) == 0  # its own: replaced
    (png,) = out.glob("*.png")
    image = np.asarray(Image.open(png))
    assert np.array_equal(image[..., 0], image[..., 2])
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)  # now a user's picture of the same name
    before = png.read_bytes()
    capsys.readouterr()
    assert main(["plot", str(audio), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{png}: exists and is not an earlier spectrogram image" in err
    assert png.read_bytes() == before
    # The audio itself under a chunk image's name (a hard link): refused as an input of the command.
    linked = tmp_path / "q" / "tone_chunk000.png"
    linked.parent.mkdir()
    linked.hardlink_to(audio)
    assert main(["plot", str(audio), "--out", str(linked.parent)]) == 2
    assert "an input of this command" in capsys.readouterr().err
