"""Which clips exist, their labels, speakers and partitions: a manifest CSV or a folder-per-class directory.

Accepted inputs:

* CSV ``filename,label[,speaker][,partition]`` (header required, any column order, extra columns ignored).
  ``filename`` is relative to the CSV's folder (absolute paths work too); ``partition`` is one of
  train/devel/test.
* A folder ``DIR/<label>/*.wav`` or ``DIR/<partition>/<label>/*.wav`` (partition folders train/devel/test).
  An audio file in a sub-folder of its label folder, ``DIR/<label>/<speaker>/*.wav``, belongs to that speaker.
  Files with other extensions and hidden files are ignored.

Defaults when information is missing:

* no speaker (no ``speaker`` column, or a file directly inside its label folder): every clip is its own
  speaker, named after its filename, so splits and federated shards treat clips as independent;
* no partition (no ``partition`` column / no partition folders): speakers are split speaker-independently,
  60 % train / 20 % devel / 20 % test, deterministically from ``seed``, stratified by each speaker's most
  frequent label (see `split_speakers`).

Everything is checked when the manifest is read, before any audio is decoded; each problem is one
`DslFedError` naming the file and line.
"""

from __future__ import annotations

import csv
import difflib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dsl_fed.data.audio import SUPPORTED_EXTENSIONS
from dsl_fed.errors import DslFedError

PARTITIONS: tuple[str, ...] = ("train", "devel", "test")
REQUIRED_COLUMNS: tuple[str, ...] = ("filename", "label")
OPTIONAL_COLUMNS: tuple[str, ...] = ("speaker", "partition")
# Speaker-level default split, applied as a repeating pattern over speakers (see `split_speakers`):
# every 10 speakers give 6 train / 2 devel / 2 test, and 3 speakers already give one of each.
_SPLIT_PATTERN: tuple[str, ...] = ("train", "devel", "test", "train", "train", "train", "devel", "train", "test", "train")


@dataclass(frozen=True)
class Clip:
    """One audio file with its annotation; `clip_id` is its position in the manifest (0-based)."""

    clip_id: int
    path: Path
    label: str
    speaker: str
    partition: str


@dataclass
class Manifest:
    """All clips of a corpus plus the class list the model is trained with.

    `classes` are the sorted labels of the train partition; a label's position is its class index, and this
    list travels with the model (export manifest) so predictions can be named.
    """

    clips: list[Clip]
    classes: list[str]
    source: Path | None = field(default=None, compare=False)

    def partition(self, name: str, required: bool = False) -> list[Clip]:
        """Clips of partition `name` in manifest order.

        Args:
            name: ``train``, ``devel`` or ``test``.
            required: Raise instead of returning an empty list when the partition has no clips.
        """
        if name not in PARTITIONS:
            raise DslFedError(f"unknown partition {name!r} (choose from {', '.join(PARTITIONS)})")
        clips = [c for c in self.clips if c.partition == name]
        if required and not clips:
            raise DslFedError(f"{self.source or 'manifest'}: partition {name!r} is empty (no clip has partition={name})")
        return clips

    def speakers(self, partition: str | None = None) -> list[str]:
        """Sorted unique speakers of one partition (or of the whole corpus when `partition` is None)."""
        clips = self.clips if partition is None else self.partition(partition)
        return sorted({c.speaker for c in clips})


def read_manifest(path: str | Path, seed: int = 0) -> Manifest:
    """Read a manifest CSV or a folder-per-class directory and validate it completely.

    Args:
        path: CSV file or directory.
        seed: Seed of the default speaker split, used only when partitions are not given.

    Raises:
        DslFedError: missing CSV columns, empty cells, unknown partition names, unsupported file types,
            missing audio files (named by CSV line), duplicate files, an empty train partition, fewer than two
            training classes, or a devel/test label that train never saw.
    """
    path = Path(path).absolute()
    if path.is_dir():
        rows = _rows_from_folder(path)
    elif path.is_file():
        rows = _rows_from_csv(path)
    else:
        raise DslFedError(f"{path}: manifest not found (expected a CSV file or a folder-per-class directory)")
    if not rows:
        raise DslFedError(f"{path}: manifest lists no clips")

    if all(r.partition is None for r in rows):
        try:
            assignment = split_speakers(_speaker_labels(rows), seed)
        except DslFedError as exc:
            raise DslFedError(f"{path}: {exc}") from None
        rows = [r.with_partition(assignment[r.speaker]) for r in rows]

    train = [r for r in rows if r.partition == "train"]
    if not train:
        raise DslFedError(f"{path}: partition 'train' is empty; at least one clip must have partition=train")
    classes = sorted({r.label for r in train})
    if len(classes) < 2:
        raise DslFedError(f"{path}: the train partition has only one label ({classes[0]!r}); need at least two classes")
    known = set(classes)
    for r in rows:
        if r.label not in known:
            raise DslFedError(
                f"{r.where}: label {r.label!r} ({r.partition}) never occurs in the train partition "
                f"(train labels: {', '.join(classes)})"
            )

    clips = [Clip(i, r.path, r.label, r.speaker, r.partition) for i, r in enumerate(rows)]
    return Manifest(clips=clips, classes=classes, source=path)


def split_speakers(speaker_labels: dict[str, str], seed: int) -> dict[str, str]:
    """Assign whole speakers to train/devel/test (about 60/20/20), deterministically from `seed`.

    Speakers are grouped by their most frequent label, shuffled within each group, the groups are concatenated
    and the repeating pattern train, devel, test, train, train, train, devel, train, test, train is laid over
    them. So each partition gets a share of every label's speakers, and 3 speakers already fill all three
    partitions.

    Args:
        speaker_labels: Speaker -> their most frequent label (the stratum).
        seed: Seed of the shuffle.

    Returns:
        Speaker -> partition.
    """
    labels = speaker_labels
    if len(labels) < 3:
        raise DslFedError(
            f"cannot split {len(labels)} speaker(s) into train/devel/test; need at least 3 speakers "
            "(or give a partition column / partition folders)"
        )
    rng = np.random.default_rng(seed)
    ordered: list[str] = []
    for label in sorted(set(labels.values())):
        group = sorted(s for s, lab in labels.items() if lab == label)
        ordered.extend(group[i] for i in rng.permutation(len(group)))
    return {s: _SPLIT_PATTERN[i % len(_SPLIT_PATTERN)] for i, s in enumerate(ordered)}


# ----------------------------------------------------------------------------------------------- internals


@dataclass(frozen=True)
class _Row:
    where: str  # "manifest.csv line 7" or the file path, for error messages
    path: Path
    label: str
    speaker: str
    partition: str | None

    def with_partition(self, partition: str) -> "_Row":
        return _Row(self.where, self.path, self.label, self.speaker, partition)


def _speaker_labels(rows: list[_Row]) -> dict[str, str]:
    counts: dict[str, Counter] = {}
    for r in rows:
        counts.setdefault(r.speaker, Counter())[r.label] += 1
    # most frequent label, ties broken alphabetically so the split does not depend on row order
    return {s: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for s, c in counts.items()}


def _rows_from_csv(path: Path) -> list[_Row]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DslFedError(f"{path}: cannot read manifest ({exc.__class__.__name__}: {exc})") from None
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if header is None:
        raise DslFedError(f"{path}: manifest CSV is empty (expected a header 'filename,label[,speaker][,partition]')")
    columns = [h.strip().lower() for h in header]
    _check_columns(path, columns)
    index = {name: columns.index(name) for name in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if name in columns}

    rows: list[_Row] = []
    seen: dict[Path, str] = {}
    missing: list[tuple[str, str]] = []
    for line_no, cells in enumerate(reader, start=2):
        if not cells or all(not c.strip() for c in cells):
            continue  # blank line
        where = f"{path} line {line_no}"
        if len(cells) != len(columns):
            raise DslFedError(f"{where}: expected {len(columns)} comma-separated values ({','.join(columns)}), got {len(cells)}")
        value = {name: cells[i].strip() for name, i in index.items()}
        for name in index:
            if not value[name]:
                raise DslFedError(f"{where}: empty {name!r}")
        filename = value["filename"]
        audio = Path(filename) if Path(filename).is_absolute() else path.parent / filename
        _check_extension(audio, where)
        if audio in seen:
            raise DslFedError(f"{where}: file {filename!r} is already listed on {seen[audio]}")
        seen[audio] = f"line {line_no}"
        if not audio.is_file():
            missing.append((where, filename))
        partition = value.get("partition")
        if partition is not None:
            partition = _check_partition(partition.lower(), where)
        rows.append(_Row(where, audio, value["label"], value.get("speaker", filename), partition))

    if missing:
        where, filename = missing[0]
        more = f" (and {len(missing) - 1} more missing file(s))" if len(missing) > 1 else ""
        raise DslFedError(f"{where}: audio file {filename!r} not found in {path.parent}{more}")
    return rows


def _check_columns(path: Path, columns: list[str]) -> None:
    for name in columns:
        if name in REQUIRED_COLUMNS + OPTIONAL_COLUMNS:
            continue
        # an extra column is fine (metadata), but a misspelt optional column would silently change the split
        near = difflib.get_close_matches(name, REQUIRED_COLUMNS + OPTIONAL_COLUMNS, n=1, cutoff=0.75)
        if near:
            raise DslFedError(f"{path}: unknown column {name!r}; did you mean {near[0]!r}?")
    for name in REQUIRED_COLUMNS + OPTIONAL_COLUMNS:
        if columns.count(name) > 1:
            raise DslFedError(f"{path}: column {name!r} appears twice in the header")
    absent = [name for name in REQUIRED_COLUMNS if name not in columns]
    if absent:
        raise DslFedError(
            f"{path}: missing required column(s) {', '.join(absent)} "
            f"(header is {','.join(columns) or '(empty)'}; expected filename,label[,speaker][,partition])"
        )


def _check_partition(name: str, where: str) -> str:
    if name in PARTITIONS:
        return name
    near = difflib.get_close_matches(name, PARTITIONS, n=1, cutoff=0.4)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise DslFedError(f"{where}: unknown partition {name!r} (choose from {', '.join(PARTITIONS)}){hint}")


def _check_extension(audio: Path, where: str) -> None:
    if audio.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise DslFedError(
            f"{where}: unsupported audio file type {audio.suffix or '(no extension)'!r} for {audio.name!r} "
            f"(supported: {', '.join(SUPPORTED_EXTENSIONS)})"
        )


def _rows_from_folder(root: Path) -> list[_Row]:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise DslFedError(f"{root}: folder has no class sub-folders (expected {root}/<label>/*.wav)")
    stray = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS]
    if stray:
        raise DslFedError(f"{root}: audio file {stray[0].name!r} is not inside a class folder ({root}/<label>/)")
    names = [p.name for p in subdirs]
    partitioned = [n for n in names if n.lower() in PARTITIONS]
    if partitioned and len(partitioned) != len(names):
        other = next(n for n in names if n.lower() not in PARTITIONS)
        raise DslFedError(
            f"{root}: mixes partition folders ({', '.join(partitioned)}) with the folder {other!r}; use either "
            f"{root}/<label>/ or {root}/<partition>/<label>/"
        )
    rows: list[_Row] = []
    if partitioned:
        for part_dir in subdirs:
            labels = sorted(p for p in part_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
            for label_dir in labels:
                rows.extend(_rows_from_label_dir(root, label_dir, part_dir.name.lower()))
    else:
        for label_dir in subdirs:
            rows.extend(_rows_from_label_dir(root, label_dir, None))
    if not rows:
        raise DslFedError(f"{root}: no audio files ({', '.join(SUPPORTED_EXTENSIONS)}) found in its class folders")
    return rows


def _rows_from_label_dir(root: Path, label_dir: Path, partition: str | None) -> list[_Row]:
    rows = []
    for audio in sorted(label_dir.rglob("*")):
        rel = audio.relative_to(label_dir)
        if not audio.is_file() or audio.suffix.lower() not in SUPPORTED_EXTENSIONS:
            continue
        if any(part.startswith(".") for part in rel.parts):
            continue
        speaker = rel.parts[0] if len(rel.parts) > 1 else str(audio.relative_to(root))
        rows.append(_Row(str(audio), audio, label_dir.name, speaker, partition))
    return rows
