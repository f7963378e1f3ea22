"""Which clips a node holds: the node-config resolver, the corpus split into node folders, summed confusion counts."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from dsl_fed.config import DataConfig
from dsl_fed.data import read_manifest
from dsl_fed.data.nodes import assign_speakers, check_decodable, node_data
from dsl_fed.deploy.split import split_corpus
from dsl_fed.errors import DslFedError
from dsl_fed.metrics import confusion, confusion_metrics, uar

CLASSES = ["falling", "flat", "rising"]


@pytest.fixture(scope="module")
def split(demo_manifest, tmp_path_factory):
    return split_corpus(demo_manifest, tmp_path_factory.mktemp("split") / "nodes", nodes=2)


def test_split_gives_each_node_only_its_own_speakers_and_the_simulation_the_same_clips(split, demo_manifest):
    manifest = read_manifest(demo_manifest)
    data = DataConfig(manifest=str(demo_manifest), shards=2)
    seen: dict[str, set[str]] = {"train": set(), "devel": set(), "test": set()}
    for k, folder in enumerate(split):
        own = node_data({"data-path": str(folder)}, data, CLASSES)
        simulated = node_data({"partition-id": k, "num-partitions": 2}, data, CLASSES)
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.wav"))
        assert len(files) == sum(len(clips) for clips in own.clips.values())  # no other audio in the folder
        for part in seen:
            speakers = {c.speaker for c in own.clips[part]}
            assert speakers and not speakers & seen[part]  # each speaker on exactly one node
            seen[part] |= speakers
            assert [c.path.name for c in own.clips[part]] == [c.path.name for c in simulated.clips[part]]
            assert all(str(c.path).startswith(str(folder)) for c in own.clips[part])
    assert seen == {part: set(manifest.speakers(part)) for part in seen}
    with pytest.raises(DslFedError, match="exists and is not empty"):
        split_corpus(demo_manifest, split[0].parent, nodes=2)


def test_node_config_resolver_data_path_partition_id_or_neither(split, demo_manifest, tmp_path):
    data = DataConfig(manifest=str(demo_manifest), shards=2)
    with pytest.raises(DslFedError, match="neither data-path .* nor partition-id and num-partitions"):
        node_data({"num-partitions": 2}, data, CLASSES)
    with pytest.raises(DslFedError, match="num-supernodes=2"):
        node_data({"partition-id": 0, "num-partitions": 3}, data, CLASSES)
    with pytest.raises(DslFedError, match=r"partition-id 2 outside 0\.\.1"):
        node_data({"partition-id": 2, "num-partitions": 2}, data, CLASSES)
    assert node_data({"partition-id": 1, "num-partitions": 2}, data, None).classes == tuple(CLASSES)
    with pytest.raises(DslFedError, match=f"^data-path {tmp_path / 'nowhere'}: does not exist$"):
        node_data({"data-path": str(tmp_path / "nowhere")}, data, CLASSES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DslFedError, match="the folder is empty"):
        node_data({"data-path": str(tmp_path / "empty")}, data, CLASSES)
    with pytest.raises(DslFedError, match="no class list"):
        node_data({"data-path": str(split[0])}, data, None)
    # a manifest row pointing outside the node's folder is refused, even if the file exists
    rows = (split[0] / "manifest.csv").read_text().splitlines()
    mine = split[0] / "sub"
    mine.mkdir()
    (mine / "manifest.csv").write_text(f"filename,label\n../{rows[1].split(',')[0]},falling\n")
    with pytest.raises(DslFedError, match="lies outside"):
        node_data({"data-path": str(mine / "manifest.csv")}, data, CLASSES)


def test_a_node_folder_without_partitions_trains_on_every_row_and_checks_labels(split, tmp_path):
    with (split[1] / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    import shutil

    shutil.copytree(split[1] / "audio", tmp_path / "audio")
    (tmp_path / "manifest.csv").write_text("filename,label\n" + "".join(f"{r['filename']},{r['label']}\n" for r in rows))
    own = node_data({"data-path": str(tmp_path / "manifest.csv")}, DataConfig(manifest="unused"), CLASSES)
    assert len(own.clips["train"]) == len(rows) and not own.clips["devel"]
    with pytest.raises(DslFedError, match=r"line 2: label '\w+' is not one of the run's classes \(a, b\)"):
        node_data({"data-path": str(tmp_path)}, DataConfig(manifest="unused"), ["a", "b"])


def test_assign_speakers_deals_held_out_speakers_round_robin(demo_manifest):
    groups = assign_speakers(read_manifest(demo_manifest), 3)
    assert [len(g["train"]) for g in groups] == [2, 1, 1]
    assert [len(g["devel"]) for g in groups] == [1, 1, 0] and [len(g["test"]) for g in groups] == [1, 1, 0]


def test_summed_confusion_counts_give_the_exact_global_uar():
    """Averaging node UARs is wrong whenever nodes hold different class mixes; summing counts is exact."""
    rng = np.random.default_rng(0)
    nodes = [(rng.integers(0, 3, n), rng.integers(0, 3, n)) for n in (5, 40, 13)]
    nodes[0] = (np.array([0, 0, 0, 1, 1]), np.array([0, 0, 1, 1, 1]))  # a node without class 2
    counts = sum(confusion(t, p, 3) for t, p in nodes)
    everything = (np.concatenate([t for t, _ in nodes]), np.concatenate([p for _, p in nodes]))
    scores = confusion_metrics(counts, CLASSES, seed=3)
    assert scores["uar"] == pytest.approx(uar(*everything), abs=1e-12)
    assert scores["num_clips"] == 58 and scores["confusion"] == confusion(*everything, 3).tolist()
    from dsl_fed.metrics import bootstrap_ci

    assert scores["ci"] == list(bootstrap_ci(np.sort(everything[0] * 3 + everything[1]) // 3,
                                             np.sort(everything[0] * 3 + everything[1]) % 3, seed=3))
    assert abs(np.mean([uar(t, p) for t, p in nodes]) - scores["uar"]) > 0.01  # the wrong way differs


def test_check_decodable_names_the_broken_file_and_counts_the_rest(demo_manifest, tmp_path):
    clips = read_manifest(demo_manifest).clips[:3]
    check_decodable(clips, 16000)
    import dataclasses

    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really a wav file")
    bad = [dataclasses.replace(c, path=broken) for c in clips[:2]]
    with pytest.raises(DslFedError, match=r"broken.wav: .*\(and 1 more bad file\(s\)\); fix or remove it"):
        check_decodable(clips + bad, 16000)


def test_malformed_confusion_counts_are_left_out():
    from dsl_fed.federated.server_app import sum_confusions

    good = {"devel-confusion": [1, 0, 0, 0, 2, 1, 0, 0, 3], "num-examples": 7}
    bad = [{"devel-confusion": [1, 2, 3]}, {"devel-confusion": [-1] + [0] * 8}, {"devel-confusion": [0.5] + [0] * 8}]
    sums = sum_confusions([good, good, *bad, {"test-confusion": [0] * 9}], 3)
    assert list(sums) == ["devel"] and sums["devel"].tolist() == [[2, 0, 0], [0, 4, 2], [0, 0, 6]]


def test_a_link_out_of_the_node_folder_is_refused_without_naming_what_lies_behind_it(split, tmp_path):
    """A node's errors travel to the server: another node's file names must not be in them."""
    theirs = {p.name for p in split[1].rglob("*.wav")}
    node = tmp_path / "node"
    node.mkdir()
    (node / "manifest.csv").symlink_to(split[1] / "manifest.csv")
    with pytest.raises(DslFedError) as info:
        node_data({"data-path": str(node)}, DataConfig(manifest="unused"), CLASSES)
    assert str(info.value) == (f"data-path {node}: manifest.csv is a symbolic link leading out of the folder; "
                               "a node reads only its own folder")
    (node / "manifest.csv").unlink()
    (node / "falling").symlink_to(split[1] / "audio", target_is_directory=True)  # a folder corpus, linked
    with pytest.raises(DslFedError, match="falling is a symbolic link leading out") as info:
        node_data({"data-path": str(node)}, DataConfig(manifest="unused"), CLASSES)
    assert not any(name in str(info.value) for name in theirs)


def test_a_deployed_node_id_is_random_kept_in_its_folder_and_not_derived_from_its_speakers(split, tmp_path):
    import os
    import zlib

    from dsl_fed.data.nodes import NODE_ID_FILE, persistent_node_id

    folders = []
    for k, source in enumerate(list(split)[:2] + list(split)[:1]):  # the third holds the first one's speakers
        folder = tmp_path / f"node_{k}"
        folder.mkdir()
        (folder / "manifest.csv").write_bytes((source / "manifest.csv").read_bytes())
        folders.append(folder)
    ids = [persistent_node_id(f) for f in folders]
    assert [persistent_node_id(f / "manifest.csv") for f in folders] == ids  # a restart: the same id, file or folder
    assert len(set(ids)) == 3 and all((f / NODE_ID_FILE).is_file() for f in folders)
    with open(folders[0] / "manifest.csv", newline="") as f:
        speakers = ",".join(sorted({row["speaker"] for row in csv.DictReader(f) if row["partition"] == "train"}))
    assert ids[0] != zlib.crc32(speakers.encode()) % 100_000  # what the id used to be
    (folders[2] / NODE_ID_FILE).write_text("not a number\n")
    with pytest.raises(DslFedError, match=r"not a node id written by dsl_fed .*delete the file"):
        persistent_node_id(folders[2])
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if not os.access(locked, os.W_OK):  # root may write anyway
        with pytest.raises(DslFedError, match="the node folder must be writable"):
            persistent_node_id(locked)


def test_simulated_nodes_split_the_corpus_once_per_process_and_again_when_the_manifest_changes(demo_manifest, tmp_path,
                                                                                                monkeypatch):
    """A Ray actor answers many nodes: the corpus is read and split once, not per message (thousands of speakers)."""
    from dsl_fed.data import nodes

    manifest = tmp_path / "manifest.csv"
    rows = demo_manifest.read_text().splitlines()
    base = demo_manifest.parent
    manifest.write_text("\n".join([rows[0]] + [f"{base / r.split(',', 1)[0]},{r.split(',', 1)[1]}" for r in rows[1:]]))
    data = DataConfig(manifest=str(manifest), shards=0)
    reads = []
    monkeypatch.setattr(nodes, "load_manifest", lambda d: reads.append(d) or read_manifest(d.manifest))
    first = read_manifest(manifest)
    groups = assign_speakers(first, 0)
    for k in range(len(groups)):
        node = node_data({"partition-id": k, "num-partitions": len(groups)}, data, None)
        for part in ("train", "devel", "test"):  # what the per-message split gave: the node's speakers, manifest order
            assert node.clips[part] == tuple(c for c in first.partition(part) if c.speaker in groups[k][part])
    assert len(reads) == 1
    gone = groups[0]["train"][0]  # the first node's speaker leaves the corpus: the file is read again
    kept = [r for r in manifest.read_text().splitlines() if r.split(",")[2] != gone]
    manifest.write_text("\n".join(kept))
    changed = read_manifest(manifest)
    n = len(assign_speakers(changed, 0))
    assert n == len(groups) - 1
    assert node_data({"partition-id": 0, "num-partitions": n}, data, None).clips["train"][0].speaker \
        == changed.speakers("train")[0] != gone
    assert len(reads) == 2
