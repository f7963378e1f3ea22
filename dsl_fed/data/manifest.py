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
  speaker, named after its filename, so splits and federated shards treat clips as independent (a warning
  says so; ``federated.dp`` refuses such a corpus unless ``data.clip_level_privacy``);
* no partition (no ``partition`` column / no partition folders): speakers are split speaker-independently,
  60 % train / 20 % devel / 20 % test, deterministically from ``seed``, stratified by each speaker's most
  frequent label (see `split_speakers`).

Everything is checked when the manifest is read, before any audio is decoded; each problem is one
`DslFedError` naming the file and line. Errors where the protocol would break: the same audio file listed
twice (by file identity: ``a/../a/x.wav``, an absolute path, a symlink, a hard link), a byte-identical copy
of a clip in another partition (the same recording would leak into devel/test), labels or speakers that
differ only in case or hold characters that do not print (`dsl_fed.text`), and a speaker in train and in
devel/test (speaker independence) unless ``allow_speaker_overlap`` says it is intended - then
`Manifest.warnings` says so, as it counts files a folder corpus ignored (other types, FIFOs, devices), copies
within one partition and trained classes that devel or test never score.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import os
import stat
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dsl_fed.config import DataConfig
from dsl_fed.data.audio import SUPPORTED_EXTENSIONS
from dsl_fed.errors import DslFedError
from dsl_fed.text import check_visible, spelling_key

PARTITIONS: tuple[str, ...] = ("train", "devel", "test")
REQUIRED_COLUMNS: tuple[str, ...] = ("filename", "label")
OPTIONAL_COLUMNS: tuple[str, ...] = ("speaker", "partition")
# Speaker-level default split, applied as a repeating pattern over speakers (see `split_speakers`):
# every 10 speakers give 6 train / 2 devel / 2 test, and 3 speakers already give one of each.
_SPLIT_PATTERN: tuple[str, ...] = ("train", "devel", "test", "train", "train", "train", "devel", "train", "test", "train")
# What users write for a partition that has another name here (difflib alone would answer "train" for "validation").
PARTITION_SYNONYMS: dict[str, str] = {
    "validation": "devel", "valid": "devel", "val": "devel", "dev": "devel", "development": "devel",
    "training": "train", "tr": "train", "eval": "test", "evaluation": "test", "testing": "test", "tst": "test",
}
_PREFIX_BYTES = 1 << 16  # content check: files of equal size are compared by their first 64 KiB, then in full


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
    warnings: list[str] = field(default_factory=list, compare=False)  # odd but allowed; every report repeats them
    unattributed: int = field(default=0, compare=False)  # clips without a speaker: each counts as its own speaker

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


def own_speaker_warning(unattributed: int, total: int) -> str:
    """What every report says about clips without a speaker."""
    return (f"{unattributed} of {total} clips have no speaker (no speaker column, or a file directly in its label "
            "folder): each is treated as its own speaker, so speaker-independent splits, federated shards, per-speaker "
            "scores and speaker-level privacy hold only per clip for them")


def load_manifest(data: DataConfig) -> Manifest:
    """`read_manifest` with the config's data settings: how every command reads its corpus."""
    return read_manifest(data.manifest, seed=data.seed, allow_speaker_overlap=data.allow_speaker_overlap)


def read_manifest(path: str | Path, seed: int = 0, allow_speaker_overlap: bool = False,
                  classes: Sequence[str] | None = None) -> Manifest:
    """Read a manifest CSV or a folder-per-class directory and validate it completely.

    Args:
        path: CSV file or directory.
        seed: Seed of the default speaker split, used only when partitions are not given.
        allow_speaker_overlap: Accept speakers with clips in train and in devel/test (with a warning).
        classes: The run's class list, for a federated node's own data: every label must be one of them, rows
            without a partition are training rows (a node's speakers are its own, nothing is held out), and the
            train partition may lack classes or be empty (the caller decides what it needs).

    Raises:
        DslFedError: missing CSV columns, empty cells, unknown partition names, unsupported file types,
            missing audio files (named by CSV line), the same file twice, labels differing only in case, a
            speaker in train and devel/test (unless allowed), an empty train partition, fewer than two
            training classes, or a devel/test label that train never saw.
    """
    path = Path(path).absolute()
    warnings: list[str] = []
    if path.is_dir():
        rows = _rows_from_folder(path, warnings)
    elif path.is_file():
        rows = _rows_from_csv(path)
    else:
        raise DslFedError(f"{path}: manifest not found (expected a CSV file or a folder-per-class directory)")
    if not rows:
        raise DslFedError(f"{path}: manifest lists no clips")
    sizes = _check_same_files(rows)
    _check_names(rows)
    unattributed = sum(not r.named_speaker for r in rows)
    if unattributed:
        warnings.append(own_speaker_warning(unattributed, len(rows)))

    if classes is not None:
        rows = [r if r.partition else r.with_partition("train") for r in rows]
        _check_same_content(rows, sizes, warnings)
        return dataclasses.replace(_with_classes(path, rows, list(classes), warnings), unattributed=unattributed)
    if all(r.partition is None for r in rows):
        try:
            assignment = split_speakers(_speaker_labels(rows), seed)
        except DslFedError as exc:
            raise DslFedError(f"{path}: {exc}") from None
        rows = [r.with_partition(assignment[r.speaker]) for r in rows]
    _check_same_content(rows, sizes, warnings)

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

    overlap = sorted({r.speaker for r in train} & {r.speaker for r in rows if r.partition != "train"})  # one spelling each
    if overlap:
        named = f"{len(overlap)} speaker(s) ({', '.join(overlap[:5])}{', ...' if len(overlap) > 5 else ''})"
        if not allow_speaker_overlap:
            raise DslFedError(f"{path}: {named} have clips in train and in devel/test, which breaks speaker-"
                              "independent evaluation; fix the partitions or set data.allow_speaker_overlap: true")
        warnings.append(f"{named} are in train and in devel/test (data.allow_speaker_overlap): devel/test scores "
                        "are not speaker-independent")
    unscored = [f"{label!r} (no {part} clips)" for part in PARTITIONS[1:] if any(r.partition == part for r in rows)
                for label in sorted(known - {r.label for r in rows if r.partition == part})]
    if unscored:
        warnings.append(f"trained classes never scored: {', '.join(unscored)}; UAR there averages the other classes")

    clips = [Clip(i, r.path, r.label, r.speaker, r.partition) for i, r in enumerate(rows)]
    return Manifest(clips=clips, classes=classes, source=path, warnings=warnings, unattributed=unattributed)


def _with_classes(path: Path, rows: list["_Row"], classes: list[str], warnings: list[str]) -> Manifest:
    known = set(classes)
    for r in rows:
        if r.label not in known:
            raise DslFedError(f"{r.where}: label {r.label!r} is not one of the run's classes ({', '.join(classes)})")
    clips = [Clip(i, r.path, r.label, r.speaker, r.partition or "train") for i, r in enumerate(rows)]
    return Manifest(clips=clips, classes=classes, source=path, warnings=warnings)


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
    named_speaker: bool = True  # False: the speaker is the clip's own file name (no speaker given)

    def with_partition(self, partition: str) -> "_Row":
        return _Row(self.where, self.path, self.label, self.speaker, partition, self.named_speaker)


def _check_same_files(rows: list[_Row]) -> dict[int, int]:
    """One recording listed twice (any spelling, a symlink or a hard link; any partitions) would be counted twice
    or leak into test. Compared by file identity (device, inode); returns each row's file size by row index."""
    seen: dict[tuple[int, int], _Row] = {}
    sizes: dict[int, int] = {}
    for i, r in enumerate(rows):
        info = os.stat(r.path)
        first = seen.setdefault((info.st_dev, info.st_ino), r)
        if first is not r:
            raise DslFedError(f"{r.where}: {r.path.name!r} ({r.partition or 'no partition'}) is the same file as "
                              f"{first.where} ({first.partition or 'no partition'}): {os.path.realpath(r.path)}")
        sizes[i] = info.st_size
    return sizes


def _check_same_content(rows: list[_Row], sizes: dict[int, int], warnings: list[str]) -> None:
    """A byte-identical copy of a clip in another partition is the same recording in train and devel/test.

    Only files of equal size are read, first their 64 KiB prefix, and in full only when that matches too, so a
    corpus is usually settled by its sizes alone. Copies within one partition are counted in a warning.
    """
    copies: list[tuple[_Row, _Row]] = []
    for group in _equal_groups(range(len(rows)), lambda i: sizes[i]):
        for same_prefix in _equal_groups(group, lambda i: _digest(rows[i].path, _PREFIX_BYTES)):
            for same in _equal_groups(same_prefix, lambda i: _digest(rows[i].path, None)):
                first = rows[same[0]]
                for i in same[1:]:
                    if rows[i].partition != first.partition:
                        r = rows[i]
                        raise DslFedError(f"{r.where}: {r.path.name!r} ({r.partition}) is a byte-identical copy of "
                                          f"{first.where} ({first.partition}): the same recording in two partitions; "
                                          "remove one of them")
                    copies.append((first, rows[i]))
    if copies:
        first, copy = copies[0]
        warnings.append(f"{len(copies)} clip(s) are byte-identical copies of another clip of the same partition and "
                        f"count twice (e.g. {copy.where} = {first.where})")


def _equal_groups(items, key) -> list[list[int]]:
    """Groups of two or more `items` with the same `key`, in first-seen order."""
    groups: dict[object, list[int]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return [g for g in groups.values() if len(g) > 1]


def _digest(path: Path, limit: int | None) -> bytes:
    with open(path, "rb") as f:
        if limit is not None:
            return hashlib.sha256(f.read(limit)).digest()
        return hashlib.file_digest(f, "sha256").digest()


def _check_names(rows: list[_Row]) -> None:
    """Labels and speakers print as what they are: no invisible characters, one spelling per name."""
    for kind, named in (("label", lambda r: True), ("speaker", lambda r: r.named_speaker)):
        spellings: dict[str, _Row] = {}
        for r in rows:
            if not named(r):
                continue  # a file name standing in for a speaker: the file system tells files apart
            value = getattr(r, kind)
            check_visible(value, f"{r.where}: {kind}")
            first = spellings.setdefault(spelling_key(value), r)
            if getattr(first, kind) != value:
                raise DslFedError(f"{r.where}: {kind} {value!r} differs from {getattr(first, kind)!r} ({first.where}) "
                                  f"only in case or Unicode form; write every {kind} the same way")


def _speaker_labels(rows: list[_Row]) -> dict[str, str]:
    counts: dict[str, Counter] = {}
    for r in rows:
        counts.setdefault(r.speaker, Counter())[r.label] += 1
    # most frequent label, ties broken alphabetically so the split does not depend on row order
    return {s: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for s, c in counts.items()}


def _rows_from_csv(path: Path) -> list[_Row]:
    """The CSV's rows; line breaks are the csv module's own (a U+2028 inside a file name is just a character)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return _parse_csv(path, f)
    except (OSError, UnicodeDecodeError) as exc:
        raise DslFedError(f"{path}: cannot read manifest ({exc.__class__.__name__}: {exc})") from None


def _csv_records(path: Path, reader) -> Iterator[tuple[int, list[str]]]:
    """(first line number, cells) of every record; a CSV error names its line."""
    line = 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if "field larger than field limit" in str(exc):
                raise DslFedError(f"{path} line {reader.line_num}: a value longer than {csv.field_size_limit()} "
                                  "characters (an unclosed quote?)") from None
            raise DslFedError(f"{path} line {reader.line_num}: not valid CSV ({exc})") from None
        yield line, cells
        line = reader.line_num + 1


def _parse_csv(path: Path, f) -> list[_Row]:
    records = _csv_records(path, csv.reader(f))
    header = next(records, (1, None))[1]
    if header is None:
        raise DslFedError(f"{path}: manifest CSV is empty (expected a header 'filename,label[,speaker][,partition]')")
    columns = [h.strip().lower() for h in header]
    _check_columns(path, columns)
    index = {name: columns.index(name) for name in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if name in columns}

    rows: list[_Row] = []
    missing: list[tuple[str, str]] = []
    for line_no, cells in records:
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
        if not audio.is_file():
            if audio.exists():  # a FIFO or a device: never opened
                raise DslFedError(f"{where}: {filename!r} is not a regular file (a FIFO, device or socket)")
            missing.append((where, filename))
        partition = value.get("partition")
        if partition is not None:
            partition = _check_partition(partition.lower(), where)
        rows.append(_Row(where, audio, value["label"], value.get("speaker", filename), partition,
                         named_speaker="speaker" in value))

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
    near = [PARTITION_SYNONYMS[name]] if name in PARTITION_SYNONYMS else \
        difflib.get_close_matches(name, PARTITIONS, n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise DslFedError(f"{where}: unknown partition {name!r} (choose from {', '.join(PARTITIONS)}){hint}")


def _check_extension(audio: Path, where: str) -> None:
    if audio.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise DslFedError(
            f"{where}: unsupported audio file type {audio.suffix or '(no extension)'!r} for {audio.name!r} "
            f"(supported: {', '.join(SUPPORTED_EXTENSIONS)})"
        )


def _rows_from_folder(root: Path, warnings: list[str]) -> list[_Row]:
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
    ignored: list[Path] = []
    if partitioned:
        for part_dir in subdirs:
            labels = sorted(p for p in part_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
            for label_dir in labels:
                rows.extend(_rows_from_label_dir(root, label_dir, part_dir.name.lower(), ignored))
    else:
        for label_dir in subdirs:
            rows.extend(_rows_from_label_dir(root, label_dir, None, ignored))
    if not rows:
        raise DslFedError(f"{root}: no audio files ({', '.join(SUPPORTED_EXTENSIONS)}) found in its class folders")
    if ignored:
        types = sorted({(p.suffix.lower() or "(no extension)") if _is_regular(p) else "not a regular file"
                        for p in ignored})
        warnings.append(f"{root}: ignored {len(ignored)} file(s) of other types ({', '.join(types)}; e.g. "
                        f"{ignored[0].relative_to(root)}); only {', '.join(SUPPORTED_EXTENSIONS)} are read")
    return rows


def _rows_from_label_dir(root: Path, label_dir: Path, partition: str | None, ignored: list[Path]) -> list[_Row]:
    rows = []
    for audio in sorted(label_dir.rglob("*")):
        rel = audio.relative_to(label_dir)
        if audio.is_dir() or any(part.startswith(".") for part in rel.parts):
            continue
        if audio.suffix.lower() not in SUPPORTED_EXTENSIONS or not _is_regular(audio):
            ignored.append(audio)  # FIFOs, devices, sockets and dangling links are counted, never opened
            continue
        named = len(rel.parts) > 1
        speaker = rel.parts[0] if named else str(audio.relative_to(root))
        rows.append(_Row(str(audio), audio, label_dir.name, speaker, partition, named_speaker=named))
    return rows


def _is_regular(path: Path) -> bool:
    """A regular file (through symlinks); False for FIFOs, devices, sockets and dangling links."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False
