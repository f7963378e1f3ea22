"""Which clips a federated node holds: its own folder in a deployment, a speaker shard in a simulation.

One function, `node_data`, turns a Flower node config into the node's clips, whichever keys it has:

* ``data-path`` (deployment): a manifest CSV, a folder holding ``manifest.csv`` (what ``dsl_fed deploy split``
  writes) or a folder-per-class directory on that machine. Only files under that folder are ever opened. Rows
  with partition ``train`` (or without a partition) are trained on; ``devel`` (and ``test``) rows are the
  node's share of the federated evaluation.
* ``partition-id`` + ``num-partitions`` (simulation): the configured corpus is split as `deploy split` splits
  it onto separate machines (`assign_speakers`), and the node takes share ``partition-id``.

A deployed node's id (`persistent_node_id`) is random and kept in its folder; a simulated node's is its share.

Labels are checked against the run's class list, which the server sends with every message: nodes cannot
see each other's labels, so no node could derive it alone.
"""

from __future__ import annotations

import functools
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from dsl_fed.config import DataConfig
from dsl_fed.data.manifest import PARTITIONS, Clip, Manifest, load_manifest, read_manifest
from dsl_fed.data.partition import partition_speakers
from dsl_fed.errors import DslFedError

NODE_MANIFEST = "manifest.csv"  # in a node folder, this file (not the folder layout) lists the clips
NODE_ID_FILE = ".dsl_fed_node_id"  # in a node folder: the node's random id, drawn once
NODE_ID_RANGE = 10**9  # ids are drawn below this (a seed offset: client seeds stay far below 2**32)


@dataclass(frozen=True)
class NodeData:
    """A node's clips by partition (``train``, ``devel``, ``test``), the run's classes, and where the clips came
    from (for messages)."""

    source: str
    clips: Mapping[str, tuple[Clip, ...]]
    classes: tuple[str, ...]


def node_data(node_config: Mapping[str, object], data: DataConfig, classes: Sequence[str] | None) -> NodeData:
    """The clips of the node described by `node_config`.

    Args:
        node_config: Flower's node config: ``data-path``, or ``partition-id`` and ``num-partitions``.
        data: The run's data settings (``manifest``, ``shards``, ``seed`` are used in simulation).
        classes: The run's class list; None only in simulation, where the corpus' train labels are used.

    Raises:
        DslFedError: neither key set, a missing or empty data path, a file outside it, a label outside `classes`,
            a partition id outside the federation, or a federation size that does not match the corpus.
    """
    if "data-path" in node_config:
        return _own_folder(Path(str(node_config["data-path"])).expanduser(), classes)
    if "partition-id" in node_config and "num-partitions" in node_config:
        return _simulated(data, int(node_config["partition-id"]), int(node_config["num-partitions"]), classes)
    raise DslFedError(
        "node config has neither data-path (deployment: --node-config 'data-path=\"/abs/node_data\"') nor "
        "partition-id and num-partitions (simulation)"
    )


def assign_speakers(manifest: Manifest, shards: int, seed: int = 0) -> list[dict[str, list[str]]]:
    """Speakers of each node, per partition.

    The train speakers form the nodes exactly as ``data.shards`` groups them (`partition_speakers`: 0 = one
    node per speaker, N = N groups); the devel and test speakers are dealt round-robin in sorted order, so
    with fewer held-out speakers than nodes some nodes get none.
    """
    train = partition_speakers(manifest.speakers("train"), shards, seed)
    out: list[dict[str, list[str]]] = [{"train": group} for group in train]
    for part in PARTITIONS[1:]:
        speakers = manifest.speakers(part)
        for k, node in enumerate(out):
            node[part] = speakers[k::len(out)]
    return out


def _own_folder(path: Path, classes: Sequence[str] | None) -> NodeData:
    if classes is None:
        raise DslFedError("the run gives no class list; set data.classes (or give the server a held-out manifest)")
    if not path.is_absolute():
        raise DslFedError(f"data-path {str(path)!r} must be an absolute path")
    if not path.exists():
        raise DslFedError(f"data-path {path}: does not exist")
    if path.is_dir() and not any(path.iterdir()):
        raise DslFedError(f"data-path {path}: the folder is empty")
    if path.is_dir():
        _check_links_stay_inside(path)  # before anything is read: errors must not name another folder's files
    if (path / NODE_MANIFEST).is_file():
        path = path / NODE_MANIFEST
    manifest = read_manifest(path, classes=classes)
    root = (path if path.is_dir() else path.parent).resolve()
    for clip in manifest.clips:
        if not clip.path.resolve().is_relative_to(root):
            raise DslFedError(f"data-path {path}: {clip.path} lies outside {root}; a node reads only its own folder")
    clips = {part: tuple(manifest.partition(part)) for part in PARTITIONS}
    return NodeData(source=f"data-path {path}", clips=clips, classes=tuple(classes))


def _check_links_stay_inside(folder: Path) -> None:
    """Refuse a symbolic link under `folder` that leads out of it (e.g. ``manifest.csv`` -> another node's), naming
    only the link: what lies behind it belongs to someone else and would travel to the server in an error."""
    root = folder.resolve()
    for current, dirs, files in os.walk(folder):  # does not descend into linked folders; they are checked here
        for name in dirs + files:
            entry = Path(current) / name
            if entry.is_symlink() and not entry.resolve().is_relative_to(root):
                raise DslFedError(f"data-path {folder}: {entry.relative_to(folder)} is a symbolic link leading out of "
                                  "the folder; a node reads only its own folder")


def _simulated(data: DataConfig, partition: int, num_partitions: int, classes: Sequence[str] | None) -> NodeData:
    shards = simulated_shards(data)
    if classes is not None:
        unknown = sorted(set(shards.classes) - set(classes))
        if unknown:
            raise DslFedError(f"{data.manifest}: label {unknown[0]!r} is not one of the run's classes "
                              f"({', '.join(classes)})")
    if len(shards.clips) != num_partitions:
        raise DslFedError(
            f"the federation has {num_partitions} supernodes but {data.manifest} gives {len(shards.clips)} training "
            f"shards (data.shards={data.shards}); run with num-supernodes={len(shards.clips)}"
        )
    if not 0 <= partition < num_partitions:
        raise DslFedError(f"partition-id {partition} outside 0..{num_partitions - 1}")
    return NodeData(source=f"partition {partition} of {num_partitions} ({data.manifest})", clips=shards.clips[partition],
                    classes=tuple(classes or shards.classes))


@dataclass(frozen=True)
class SimulatedShards:
    """The corpus' classes and each simulated node's clips by partition (`assign_speakers`), in manifest order."""

    classes: tuple[str, ...]
    clips: tuple[Mapping[str, tuple[Clip, ...]], ...]


def simulated_shards(data: DataConfig) -> SimulatedShards:
    """Every simulated node's clips, worked out once per process and manifest version.

    A Ray actor answers messages of many nodes; reading, checking and splitting a corpus of thousands of speakers
    for each message would make every message cost time in proportion to the registered nodes. The clip lists
    (paths and labels, no audio) are kept; a changed manifest file (size or modification time) is read again.
    """
    path = Path(data.manifest)
    try:
        info = path.stat()
        version = (str(path.resolve()), info.st_mtime_ns, info.st_size)
    except OSError:
        version = (str(path), 0, -1)  # load_manifest names the problem
    return _shards(data, version)


@functools.lru_cache(maxsize=2)
def _shards(data: DataConfig, version: tuple[str, int, int]) -> SimulatedShards:
    manifest = load_manifest(data)
    groups = assign_speakers(manifest, data.shards, data.seed)
    node_of = {part: {speaker: k for k, group in enumerate(groups) for speaker in group[part]} for part in PARTITIONS}
    clips: list[dict[str, list[Clip]]] = [{part: [] for part in PARTITIONS} for _ in groups]
    for clip in manifest.clips:
        k = node_of[clip.partition].get(clip.speaker)
        if k is not None:
            clips[k][clip.partition].append(clip)
    return SimulatedShards(classes=tuple(manifest.classes),
                           clips=tuple(MappingProxyType({part: tuple(c) for part, c in node.items()}) for node in clips))


def persistent_node_id(data_path: str | Path) -> int:
    """A deployed node's id: drawn at random (OS entropy) the first time and kept in its folder.

    A restarted or resumed node keeps its id, so its seeds and its place in the server's fixed summation order
    stay the same; unlike a number derived from its speaker ids, the id tells nothing about whom the node holds.

    Raises:
        DslFedError: the folder cannot be written, or the file holds something other than an id.
    """
    path = Path(data_path)
    folder = path if path.is_dir() else path.parent
    id_file = folder / NODE_ID_FILE
    if not id_file.exists():
        try:  # O_EXCL: of two processes starting at once, the first one's id is kept
            fd = os.open(id_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w") as out:
                out.write(f"{secrets.randbelow(NODE_ID_RANGE)}\n")
        except FileExistsError:
            pass
        except OSError as exc:
            raise DslFedError(f"{folder}: cannot keep the node's id in {NODE_ID_FILE} ({exc.strerror or exc}); the "
                              "node folder must be writable") from None
    text = id_file.read_text().strip()
    if not text.isdigit() or int(text) >= NODE_ID_RANGE:
        raise DslFedError(f"{id_file}: not a node id written by dsl_fed (expected a number below {NODE_ID_RANGE}); "
                          "delete the file and the node draws a new one")
    return int(text)


def check_decodable(clips: Sequence[Clip], sample_rate: int) -> None:
    """Decode every clip once before a federation starts: a broken file would otherwise make its node fail every
    round, quietly taking its speakers out of training. Raises naming the first bad file and the count."""
    from dsl_fed.data.audio import load_audio

    problems = []
    for clip in clips:
        try:
            load_audio(clip.path, sample_rate)
        except DslFedError as exc:
            problems.append(str(exc))
    if problems:
        more = f" (and {len(problems) - 1} more bad file(s))" if len(problems) > 1 else ""
        raise DslFedError(f"{problems[0]}{more}; fix or remove it before a federated run")
