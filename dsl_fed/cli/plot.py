"""`dsl_fed plot AUDIO`: save the spectrogram image of every chunk, i.e. what the network sees.

The images come from the model's own `SpectrogramImage` layer (``preprocess="none"``: the colour image before
ImageNet normalisation), cut into chunks exactly as training does, so the PNGs are the network's inputs.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dsl_fed.config import Config, apply_overrides, from_dict, load_config
from dsl_fed.data.audio import load_audio
from dsl_fed.data.chunking import chunk_signal
from dsl_fed.errors import DslFedError
from dsl_fed.io import atomic_write, check_output_file

BATCH = 32
PNG_KEY, PNG_MARK = "Software", "dsl_fed plot"  # text chunk that marks an image as this command's


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plot",
        help="write the spectrogram image of every chunk of an audio file as PNG",
        description="Cut AUDIO into the configured chunks and write each chunk's colour spectrogram image (before "
        "ImageNet normalisation; low frequencies at the bottom, time left to right) as DIR/<name>_chunkNNN.png.",
    )
    p.add_argument("audio", metavar="AUDIO", type=Path, help="audio file (.wav, .flac, .ogg, .mp3)")
    p.add_argument("--config", type=Path, default=None,
                   help="YAML config; its data (chunking) and spectrogram sections apply (default: built-in)")
    p.add_argument("--out", type=Path, default=Path("spectrograms"), metavar="DIR",
                   help="output folder (default: ./spectrograms)")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                   help="config overrides, e.g. spectrogram.colormap=magma")
    p.add_argument("--set", dest="legacy_overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="deprecated spelling of an override (give SECTION.KEY=VALUE directly, like every command)")
    p.set_defaults(func=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    if args.legacy_overrides:
        print("dsl_fed plot: note: --set is deprecated; write the overrides as SECTION.KEY=VALUE after AUDIO",
              file=sys.stderr)
    cfg = _config(args.config, [*args.legacy_overrides, *args.overrides], args.audio)
    waveform = load_audio(args.audio, cfg.data.sample_rate)
    paths = plot_audio(waveform, cfg, args.out, args.audio.stem, reading=(args.audio,))
    spec = cfg.spectrogram
    print(
        f"wrote {len(paths)} image(s) of {spec.image_size}x{spec.image_size} px ({spec.colormap}; "
        f"{cfg.data.chunk_seconds:g} s chunks, hop {cfg.data.hop_seconds:g} s) to {args.out}/: "
        f"{paths[0].name}{' ... ' + paths[-1].name if len(paths) > 1 else ''}"
    )
    return 0


def plot_audio(waveform: np.ndarray, cfg: Config, out_dir: Path, stem: str, reading: tuple[Path, ...] = ()) -> list[Path]:
    """Write one PNG per chunk of `waveform` and return their paths in time order.

    Every image carries a PNG text chunk naming this command, so a later plot may replace its own images but
    never a file someone else put there (checked for all chunks before the first image is written).

    Args:
        waveform: 1-D float32 signal at ``cfg.data.sample_rate``.
        cfg: Configuration; its data section sets the chunking, its spectrogram section the image.
        out_dir: Output folder (created if missing).
        stem: File name prefix; files are ``<stem>_chunkNNN.png``.
        reading: Files this command reads (never written over, under any name).
    """
    from PIL import Image, PngImagePlugin

    from dsl_fed.spectrogram import spectrogram_layer  # imports TensorFlow: only when plotting

    chunks = chunk_signal(waveform, cfg.data.chunk_samples, cfg.data.hop_samples)
    digits = max(3, len(str(len(chunks) - 1)))
    paths = [Path(out_dir) / f"{stem}_chunk{i:0{digits}d}.png" for i in range(len(chunks))]
    for path in paths:
        check_output_file(path, reading, _is_our_image, "spectrogram image")
    layer = spectrogram_layer(cfg.spectrogram, cfg.data.sample_rate, preprocess="none")
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, PNG_MARK)
    with tqdm(total=len(chunks), desc="plotting", unit="chunk", disable=len(chunks) <= BATCH, file=sys.stderr) as bar:
        for start in range(0, len(chunks), BATCH):
            images = layer(chunks[start : start + BATCH]).numpy()
            for offset, image in enumerate(np.clip(np.rint(images), 0, 255).astype(np.uint8)):
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
                atomic_write(paths[start + offset], buffer.getvalue())
            bar.update(len(images))
    return paths


def _is_our_image(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as image:
        return image.format == "PNG" and image.info.get(PNG_KEY) == PNG_MARK


def _config(path: Path | None, overrides: list[str], audio: Path) -> Config:
    if path is not None:
        return load_config(path, overrides)
    # Plotting needs no manifest, but validation requires one: the audio file stands in (never read as one).
    raw = apply_overrides({"data": {"manifest": str(audio)}}, overrides)
    try:
        return from_dict(raw)
    except DslFedError as exc:
        raise DslFedError(f"override: {exc}") from None
