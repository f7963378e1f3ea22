"""`dsl_fed deploy split`: a corpus cut into one folder per node, each holding only its own speakers' audio.

Node k gets the speakers that simulation node k trains and evaluates on (`dsl_fed.data.nodes.assign_speakers`),
copied into ``OUTDIR/node_<k>/audio/`` with its own ``manifest.csv`` (``filename,label,speaker,partition``,
paths relative to it). That folder is what a SuperNode's ``data-path`` names. The whole split is written into
a hidden folder of a unique name and renamed into place, and an existing non-empty OUTDIR is never touched.
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

from dsl_fed.data.manifest import Clip, read_manifest
from dsl_fed.data.nodes import NODE_MANIFEST, assign_speakers
from dsl_fed.errors import DslFedError
from dsl_fed.io import publish_folder


def node_folder(outdir: Path, k: int) -> Path:
    return Path(outdir) / f"node_{k}"


def split_corpus(manifest_path: str | Path, outdir: str | Path, nodes: int, seed: int = 0) -> list[Path]:
    """Write one folder per node; returns their paths (``OUTDIR/node_0`` ...).

    Raises:
        DslFedError: an unreadable manifest, more nodes than training speakers, or a non-empty `outdir`.
    """
    if nodes < 1:
        raise DslFedError(f"--nodes must be >= 1, got {nodes}")
    manifest = read_manifest(manifest_path, seed=seed)
    groups = assign_speakers(manifest, nodes, seed)
    outdir = Path(outdir).absolute()
    if outdir.exists() and (not outdir.is_dir() or any(outdir.iterdir())):
        raise DslFedError(f"{outdir}: exists and is not empty; choose a new folder (nothing was written)")
    root = (manifest.source if manifest.source.is_dir() else manifest.source.parent).resolve()

    def write(staging: Path) -> None:
        for k, speakers in enumerate(groups):
            _write_node(node_folder(staging, k), [c for c in manifest.clips if c.speaker in speakers[c.partition]], root)

    publish_folder(outdir, write)
    return [node_folder(outdir, k) for k in range(len(groups))]


def _write_node(folder: Path, clips: list[Clip], root: Path) -> None:
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["filename", "label", "speaker", "partition"])
    for clip in clips:
        source = clip.path.resolve()
        relative = source.relative_to(root) if source.is_relative_to(root) else Path(f"{clip.clip_id}_{source.name}")
        target = folder / "audio" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        writer.writerow([target.relative_to(folder).as_posix(), clip.label, clip.speaker, clip.partition])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / NODE_MANIFEST).write_text(rows.getvalue())
