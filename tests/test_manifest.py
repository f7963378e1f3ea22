import os
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dsl_fed.data import manifest as manifest_module
from dsl_fed.data.manifest import Clip, Manifest, read_manifest, split_speakers
from dsl_fed.errors import DslFedError


def _wav(path: Path, seconds: float = 0.1) -> Path:
    """A short clip whose bytes differ from every other path's (byte-identical clips in two partitions are an error)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    sf.write(path, 0.1 * rng.standard_normal(int(16000 * seconds)), 16000)
    return path


def _corpus(root: Path, rows: list[tuple[str, ...]], header: str = "filename,label,speaker,partition") -> Path:
    for row in rows:
        _wav(root / row[0])
    csv = root / "manifest.csv"
    csv.write_text(header + "\n" + "\n".join(",".join(r) for r in rows) + "\n")
    return csv


FULL = [
    ("a/1.wav", "dog", "s1", "train"),
    ("a/2.wav", "cat", "s1", "train"),
    ("b/3.wav", "dog", "s2", "devel"),
    ("b/4.wav", "cat", "s3", "test"),
    ("b/5.wav", "bird", "s4", "train"),
]


def test_full_csv(tmp_path):
    m = read_manifest(_corpus(tmp_path, FULL))
    assert m.classes == ["bird", "cat", "dog"]  # sorted train labels
    assert [c.clip_id for c in m.clips] == [0, 1, 2, 3, 4]
    assert m.clips[0] == Clip(0, tmp_path / "a/1.wav", "dog", "s1", "train")
    assert [c.clip_id for c in m.partition("train")] == [0, 1, 4]
    assert m.speakers("train") == ["s1", "s4"] and m.speakers() == ["s1", "s2", "s3", "s4"]
    assert m.source == tmp_path / "manifest.csv"


def test_columns_in_any_order_extra_columns_ignored_absolute_paths_accepted(tmp_path):
    _wav(tmp_path / "x.wav")
    absolute = _wav(tmp_path / "elsewhere" / "y.wav")
    _wav(tmp_path / "z.wav")
    csv = tmp_path / "m.csv"
    csv.write_text(
        "Partition, duration ,Label,FILENAME,speaker\n"
        f"train,1.0,up,x.wav,s1\ntrain,2.0,down,{absolute},s2\ntest,3,up,z.wav,s3\n"
    )
    m = read_manifest(csv)
    assert [c.path for c in m.clips] == [tmp_path / "x.wav", absolute, tmp_path / "z.wav"]
    assert m.classes == ["down", "up"]


def test_no_speaker_column_makes_every_clip_its_own_speaker(tmp_path):
    rows = [(f"{i}.wav", lab, part) for i, (lab, part) in enumerate([("a", "train"), ("b", "train"), ("a", "test")])]
    m = read_manifest(_corpus(tmp_path, rows, "filename,label,partition"))
    assert [c.speaker for c in m.clips] == ["0.wav", "1.wav", "2.wav"]


def _unsplit(root: Path, speakers: int = 10, per_speaker: int = 3) -> Path:
    rows = [(f"s{s}_{k}.wav", "ab"[(s + k) % 2], f"s{s}") for s in range(speakers) for k in range(per_speaker)]
    return _corpus(root, rows, "filename,label,speaker")


def test_no_partition_column_splits_speakers_deterministically(tmp_path):
    csv = _unsplit(tmp_path)
    first, again = read_manifest(csv, seed=3), read_manifest(csv, seed=3)
    assert first == again
    parts = {p: set(first.speakers(p)) for p in ("train", "devel", "test")}
    assert [len(parts[p]) for p in ("train", "devel", "test")] == [6, 2, 2]
    assert not (parts["train"] & parts["devel"] or parts["train"] & parts["test"] or parts["devel"] & parts["test"])
    for clip in first.clips:  # a speaker's clips all land in one partition
        assert clip.speaker in parts[clip.partition]
    other = {p: set(read_manifest(csv, seed=4).speakers(p)) for p in ("train", "devel", "test")}
    assert other != parts


def test_no_speaker_and_no_partition_splits_clips_stratified_by_label(tmp_path):
    rows = [(f"{lab}{k}.wav", lab) for lab in ("x", "y") for k in range(10)]
    m = read_manifest(_corpus(tmp_path, rows, "filename,label"))
    for part, share in (("train", 6), ("devel", 2), ("test", 2)):
        labels = [c.label for c in m.partition(part)]
        assert labels.count("x") == labels.count("y") == share


def test_split_speakers_needs_three():
    assert sorted(split_speakers({"a": "x", "b": "x", "c": "y"}, 0).values()) == ["devel", "test", "train"]
    with pytest.raises(DslFedError, match="need at least 3 speakers"):
        split_speakers({"a": "x", "b": "x"}, 0)


def test_too_few_speakers_to_split_names_the_manifest(tmp_path):
    csv = _corpus(tmp_path, [("1.wav", "a", "s1"), ("2.wav", "b", "s2")], "filename,label,speaker")
    with pytest.raises(DslFedError) as info:
        read_manifest(csv)
    assert str(info.value).startswith(f"{csv}: cannot split 2 speaker(s)")


def test_folder_per_class_layout(tmp_path):
    _wav(tmp_path / "dog" / "d1.wav")
    _wav(tmp_path / "dog" / "alice" / "d2.flac")
    _wav(tmp_path / "cat" / "alice" / "c1.wav")
    _wav(tmp_path / "cat" / "c2.wav")
    _wav(tmp_path / "cat" / "c3.wav")
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    _wav(tmp_path / "cat" / ".hidden" / "c4.wav")
    m = read_manifest(tmp_path)
    assert [(c.path.relative_to(tmp_path).as_posix(), c.label, c.speaker) for c in m.clips] == [
        ("cat/alice/c1.wav", "cat", "alice"),
        ("cat/c2.wav", "cat", "cat/c2.wav"),
        ("cat/c3.wav", "cat", "cat/c3.wav"),
        ("dog/alice/d2.flac", "dog", "alice"),
        ("dog/d1.wav", "dog", "dog/d1.wav"),
    ]
    assert {c.partition for c in m.clips} <= {"train", "devel", "test"}
    assert read_manifest(tmp_path) == m


def test_partitioned_folder_layout(tmp_path):
    for part, label, name in [("train", "a", "1"), ("train", "b", "2"), ("devel", "a", "3"), ("test", "b", "4")]:
        _wav(tmp_path / part / label / f"{name}.wav")
    m = read_manifest(tmp_path)
    assert [(c.partition, c.label) for c in m.clips] == [("devel", "a"), ("test", "b"), ("train", "a"), ("train", "b")]
    assert m.classes == ["a", "b"]


def test_partition_required_and_unknown_names(tmp_path):
    m = read_manifest(_corpus(tmp_path, [r for r in FULL if r[3] != "devel"]))
    assert m.partition("devel") == []
    with pytest.raises(DslFedError, match="partition 'devel' is empty") as info:
        m.partition("devel", required=True)
    assert "manifest.csv" in str(info.value)
    with pytest.raises(DslFedError, match="unknown partition 'dev'"):
        m.partition("dev")


# ----------------------------------------------------------------------------------------------- bad input


def _bad(tmp_path: Path, header: str, rows: list[tuple[str, ...]]) -> Path:
    """Write the CSV as given and a wav file for each row naming one."""
    for row in rows:
        if row[0].endswith(".wav"):
            _wav(tmp_path / row[0])
    csv = tmp_path / "manifest.csv"
    csv.write_text(header + "\n" + "\n".join(",".join(r) for r in rows) + "\n")
    return csv


@pytest.mark.parametrize(
    "header,rows,message",
    [
        ("file,label", [("1.wav", "a")], "missing required column(s) filename"),
        ("filename,speaker,partition", [("1.wav", "s", "train")], "missing required column(s) label"),
        ("filename,label,speeker", [("1.wav", "a", "s")], "unknown column 'speeker'; did you mean 'speaker'?"),
        ("filename,label,label", [("1.wav", "a", "a")], "column 'label' appears twice"),
        ("filename,label,partition", [("1.wav", "a", "train"), ("2.wav", "b", "dev")], "line 3: unknown partition 'dev'"),
        ("filename,label", [("1.wav", "a"), ("2.wav", "")], "line 3: empty 'label'"),
        ("filename,label", [("1.wav", "a"), ("2.wav", "b", "extra")], "line 3: expected 2 comma-separated values"),
        ("filename,label", [("1.wav", "a"), ("notes.txt", "b")], "line 3: unsupported audio file type '.txt'"),
        (
            "filename,label,partition",
            [("1.wav", "a", "train"), ("1.wav", "b", "test")],
            "line 3: '1.wav' (test) is the same file as",
        ),
        ("filename,label,partition", [("1.wav", "a", "test"), ("2.wav", "b", "devel")], "partition 'train' is empty"),
        ("filename,label,partition", [("1.wav", "a", "train"), ("2.wav", "a", "test")], "only one label ('a')"),
        (
            "filename,label,partition",
            [("1.wav", "a", "train"), ("2.wav", "b", "train"), ("3.wav", "a", "devel"), ("4.wav", "c", "test")],
            "line 5: label 'c' (test) never occurs in the train partition (train labels: a, b)",
        ),
        (
            "filename,label,partition",
            [("1.wav", "a", "train"), ("2.wav", "b", "train"), ("3.wav", "z", "devel")],
            "line 4: label 'z' (devel) never occurs in the train partition",
        ),
    ],
)
def test_bad_csv_rows_name_file_line_and_problem(tmp_path, header, rows, message):
    csv = _bad(tmp_path, header, rows)
    with pytest.raises(DslFedError) as info:
        read_manifest(csv)
    text = str(info.value)
    assert message in text and str(csv) in text and "\n" not in text


def test_missing_audio_files_name_the_first_row_and_count_the_rest(tmp_path):
    csv = _corpus(tmp_path, [("1.wav", "a"), ("2.wav", "b")], "filename,label")
    csv.write_text(csv.read_text() + "gone/3.wav,a\n4.wav,b\ngone/5.wav,b\n")
    with pytest.raises(DslFedError) as info:
        read_manifest(csv)
    assert str(info.value) == f"{csv} line 4: audio file 'gone/3.wav' not found in {tmp_path} (and 2 more missing file(s))"


def test_missing_manifest_and_empty_csv(tmp_path):
    with pytest.raises(DslFedError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DslFedError, match="manifest CSV is empty"):
        read_manifest(empty)
    (tmp_path / "header_only.csv").write_text("filename,label\n")
    with pytest.raises(DslFedError, match="lists no clips"):
        read_manifest(tmp_path / "header_only.csv")


def test_bad_folder_layouts(tmp_path):
    with pytest.raises(DslFedError, match="no class sub-folders"):
        read_manifest(tmp_path)
    _wav(tmp_path / "stray.wav")
    (tmp_path / "a").mkdir()
    with pytest.raises(DslFedError, match="'stray.wav' is not inside a class folder"):
        read_manifest(tmp_path)
    (tmp_path / "stray.wav").unlink()
    with pytest.raises(DslFedError, match="no audio files"):
        read_manifest(tmp_path)
    _wav(tmp_path / "train" / "a" / "1.wav")
    with pytest.raises(DslFedError, match="mixes partition folders"):
        read_manifest(tmp_path)


def test_manifest_equality_ignores_source():
    clip = Clip(0, Path("x.wav"), "a", "s", "train")
    assert Manifest([clip], ["a"], Path("one.csv")) == Manifest([clip], ["a"], Path("two.csv"))


# ------------------------------------------------------------------------------------------ leakage, names


def test_a_hard_link_is_the_same_file_and_a_byte_identical_copy_leaks(tmp_path):
    """Identity is (device, inode), not the path: a hard link has its own real path. Content is compared too."""
    csv = _corpus(tmp_path, FULL)
    os.link(tmp_path / "a/1.wav", tmp_path / "b/link.wav")
    csv.write_text(csv.read_text() + "b/link.wav,dog,s9,test\n")
    with pytest.raises(DslFedError, match=r"line 7: 'link.wav' \(test\) is the same file as .*line 2 \(train\)"):
        read_manifest(csv)
    (tmp_path / "b/link.wav").unlink()
    shutil.copy(tmp_path / "a/1.wav", tmp_path / "b/link.wav")
    with pytest.raises(DslFedError, match=r"line 7: 'link.wav' \(test\) is a byte-identical copy of .*line 2 \(train\)"):
        read_manifest(csv)


def test_copies_within_one_partition_are_counted_and_only_equal_sizes_are_read(tmp_path, monkeypatch):
    csv = _corpus(tmp_path, FULL)
    reads = []
    real = manifest_module._digest
    monkeypatch.setattr(manifest_module, "_digest", lambda path, limit: reads.append((path.name, limit)) or real(path, limit))
    assert not any("byte-identical" in w for w in read_manifest(csv).warnings)
    assert {limit for _, limit in reads} == {manifest_module._PREFIX_BYTES}  # FULL's equal sizes: prefixes differ
    _wav(tmp_path / "a/long.wav", seconds=0.2)  # the only 0.2 s file: its size alone settles it
    shutil.copy(tmp_path / "a/1.wav", tmp_path / "a/copy.wav")
    csv.write_text(csv.read_text() + "a/long.wav,cat,s1,train\na/copy.wav,dog,s1,train\n")
    reads.clear()
    warnings = read_manifest(csv).warnings
    assert warnings[0] == (f"1 clip(s) are byte-identical copies of another clip of the same partition and count "
                           f"twice (e.g. {csv} line 8 = {csv} line 2)")
    assert "long.wav" not in {name for name, _ in reads}
    assert sorted(name for name, limit in reads if limit is None) == ["1.wav", "copy.wav"]  # equal prefixes only


def test_speakers_differing_only_in_case_are_one_speaker_written_two_ways(tmp_path):
    rows = [("1.wav", "a", "SPK02", "test"), ("2.wav", "a", "spk02", "train"), ("3.wav", "b", "s3", "train")]
    with pytest.raises(DslFedError, match=r"line 3: speaker 'spk02' differs from 'SPK02' \(.*line 2\) only in case"):
        read_manifest(_corpus(tmp_path, rows))
    # file names that stand in for speakers are not compared (the file system tells them apart)
    rows = [("A.wav", "a", "train"), ("a.wav", "b", "train"), ("b.wav", "a", "test")]
    assert len(read_manifest(_corpus(tmp_path / "implicit", rows, "filename,label,partition")).clips) == 3


@pytest.mark.parametrize("column,value,shown", [("label", "rising\u200b", "U+200B ZERO WIDTH SPACE"),
                                                ("speaker", "s\u20281", "U+2028 LINE SEPARATOR"),
                                                ("label", "dog\u00ad", "U+00AD SOFT HYPHEN")])
def test_names_with_characters_that_do_not_print_are_refused_with_their_row(tmp_path, column, value, shown):
    rows = [("1.wav", "dog", "s1", "train"), ("2.wav", "cat", "s2", "train"), ("3.wav", "dog", "s3", "test")]
    rows[1] = tuple(value if name == column else v for name, v in zip(("filename", "label", "speaker", "p"), rows[1]))
    csv = _corpus(tmp_path, rows)
    csv.write_text(csv.read_text().replace(value, f'"{value}"'))  # quoted: the CSV itself stays valid
    with pytest.raises(DslFedError, match=f"line 3: {column} .* contains {re.escape(shown)}, which does not print"):
        read_manifest(csv)


def test_a_trained_class_that_devel_never_scores_is_warned_in_one_line(tmp_path):
    m = read_manifest(_corpus(tmp_path, FULL))  # bird and cat are not in devel, bird and dog not in test
    assert m.warnings == ["trained classes never scored: 'bird' (no devel clips), 'cat' (no devel clips), "
                          "'bird' (no test clips), 'dog' (no test clips); UAR there averages the other classes"]


def test_fifos_and_device_links_in_a_folder_corpus_are_counted_never_opened(tmp_path):
    for part, label, name in [("train", "a", "1"), ("train", "b", "2"), ("devel", "a", "3"), ("test", "b", "4")]:
        _wav(tmp_path / part / label / f"{name}.wav")
    os.mkfifo(tmp_path / "train" / "a" / "pipe.wav")  # opening it would block forever
    os.symlink("/dev/zero", tmp_path / "train" / "b" / "zero.wav")  # reading it would never end
    m = read_manifest(tmp_path)
    assert len(m.clips) == 4
    assert m.warnings[0] == (f"{tmp_path}: ignored 2 file(s) of other types (not a regular file; e.g. "
                             "train/a/pipe.wav); only .wav, .flac, .ogg, .mp3 are read")
    csv = _corpus(tmp_path / "csv", FULL)
    os.mkfifo(tmp_path / "csv" / "fifo.wav")
    csv.write_text(csv.read_text() + "fifo.wav,dog,s1,train\n")
    with pytest.raises(DslFedError, match="line 7: 'fifo.wav' is not a regular file"):
        read_manifest(csv)


@pytest.mark.parametrize("written,suggested", [("validation", "devel"), ("val", "devel"), ("dev", "devel"),
                                               ("training", "train"), ("eval", "test"), ("testing", "test"),
                                               ("tset", "test")])
def test_unknown_partitions_suggest_the_name_meant(tmp_path, written, suggested):
    csv = _bad(tmp_path, "filename,label,partition", [("1.wav", "a", "train"), ("2.wav", "b", written)])
    with pytest.raises(DslFedError, match=f"line 3: unknown partition '{written}'.*did you mean '{suggested}'"):
        read_manifest(csv)


def test_line_breaks_are_the_csv_modules_own(tmp_path):
    """U+2028 is a character of a file name, not a line break; a quoted newline stays inside its value."""
    rows = [("a\u2028b.wav", "dog", "s1", "train"), ("2.wav", "cat", "s2", "train"), ("3.wav", "dog", "s3", "test")]
    csv = _corpus(tmp_path, rows)
    assert read_manifest(csv).clips[0].path == tmp_path / "a\u2028b.wav"
    csv.write_text(csv.read_text() + '4.wav,"cat\nnip",s4,test\n5.wav,dog,s5,test,extra\n')
    _wav(tmp_path / "4.wav")
    with pytest.raises(DslFedError, match="line 7: expected 4 comma-separated values"):  # line 5-6 is one record
        read_manifest(csv)


def test_an_overlong_cell_is_one_line_naming_its_line(tmp_path):
    csv = _corpus(tmp_path, FULL)
    csv.write_text(csv.read_text() + f"1.wav,{'x' * 200_000},s1,train\n")
    with pytest.raises(DslFedError, match=r"line 7: a value longer than 131072 characters \(an unclosed quote\?\)"):
        read_manifest(csv)
