import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dsl_fed.cli import main
from dsl_fed.data.chunking import count_chunks


def _config(tmp_path: Path, manifest: Path | str, extra: str = "") -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(f"data:\n  manifest: {manifest}\n  chunk_seconds: 1.0\n  hop_seconds: 0.5\n{extra}")
    return path


def _table(out: str, header: str) -> list[list[str]]:
    """Rows of the table whose header line starts with `header` (until the next blank line)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def test_make_demo_data(tmp_path, capsys):
    assert main(["make-demo-data", str(tmp_path / "demo"), "--speakers", "3", "--clips", "1", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    assert "wrote 9 clips (3 speakers: 1 train, 1 devel, 1 test; classes falling, flat, rising)" in out
    assert (tmp_path / "demo" / "manifest.csv").is_file()
    assert len(list((tmp_path / "demo" / "audio").rglob("*.wav"))) == 9


def test_data_stats_tables(demo_manifest, tmp_path, capsys):
    assert main(["data-stats", str(_config(tmp_path, demo_manifest)), "data.shards=2"]) == 0
    out = capsys.readouterr().out
    frames = [sf.info(p).frames for p in sorted(demo_manifest.parent.rglob("*.wav"))]
    total_chunks = sum(count_chunks(n, 16000, 8000) for n in frames)
    total_seconds = sum(frames) / 16000

    partitions = {r[0]: r[1:] for r in _table(out, "partition  speakers")}
    assert list(partitions) == ["train", "devel", "test", "total"]
    assert partitions["total"][:3] == ["8", "72", str(total_chunks)]
    assert float(partitions["total"][3]) == pytest.approx(total_seconds, abs=0.06)
    assert [partitions[p][:2] for p in ("train", "devel", "test")] == [["4", "36"], ["2", "18"], ["2", "18"]]

    classes = _table(out, "class ")
    assert len(classes) == 9 and {r[0] for r in classes} == {"falling", "flat", "rising"}
    assert sum(int(r[3]) for r in classes) == total_chunks

    speakers = _table(out, "speaker ")
    assert len(speakers) == 8 and all(r[2] == "9" for r in speakers)
    assert [r[1] for r in speakers] == ["train"] * 4 + ["devel"] * 2 + ["test"] * 2

    shards = _table(out, "shard ")
    assert [r[1] for r in shards] == ["2", "2"] and sum(int(r[2]) for r in shards) == 36
    assert "data.shards=2" in out


def test_data_stats_columns_are_aligned(demo_manifest, tmp_path, capsys):
    main(["data-stats", str(_config(tmp_path, demo_manifest))])
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("partition  speakers"))
    header, rows = lines[start], lines[start + 1 : start + 5]
    assert [r.split()[0] for r in rows] == ["train", "devel", "test", "total"]  # text left-aligned at column 0
    for column in ("speakers", "clips", "chunks", "seconds"):  # numbers right-aligned under their header
        end = header.index(column) + len(column)
        for row in rows:
            assert row[end - 1].isdigit() and row[end : end + 1] in ("", " "), (column, row)


def test_silent_clip_is_fine(tmp_path, capsys):
    for i, label in enumerate("aabb"):
        sf.write(tmp_path / f"{i}.wav", np.zeros(4000) if i == 0 else 0.1 * i * np.ones(4000), 16000)
    (tmp_path / "m.csv").write_text("filename,label,partition\n0.wav,a,train\n1.wav,a,train\n2.wav,b,train\n3.wav,b,devel\n")
    assert main(["data-stats", str(_config(tmp_path, tmp_path / "m.csv"))]) == 0


def _manifest_case(tmp_path: Path, case: str) -> Path:
    """A 4-clip corpus broken in one way; returns the manifest."""
    names = ["0.wav", "1.wav", "2.wav", "3.wav"]
    labels = ["a", "a", "b", "b"]
    parts = ["train", "train", "train", "test"]
    header = "filename,label,partition"
    for i, name in enumerate(names):
        sf.write(tmp_path / name, 0.1 * (i + 1) * np.ones(4000), 16000)  # distinct: a copy in test is an error
    if case == "missing file":
        (tmp_path / "2.wav").unlink()
    elif case == "zero-length audio":
        (tmp_path / "2.wav").write_bytes(b"")
    elif case == "corrupt audio":
        (tmp_path / "2.wav").write_bytes(b"RIFF....WAVEfmt garbage" * 10)
    elif case == "unsupported extension":
        names[2] = "2.aac"
        (tmp_path / "2.aac").write_bytes(b"x")
    elif case == "NaN samples":
        sf.write(tmp_path / "2.wav", np.array([0.1, np.nan, 0.2], np.float32), 16000, subtype="FLOAT")
    elif case == "inf samples":
        sf.write(tmp_path / "2.wav", np.array([0.1, np.inf, 0.2], np.float32), 16000, subtype="FLOAT")
    elif case == "missing columns":
        header = "file,label,partition"
    elif case == "unseen label":
        labels[3] = "c"
    elif case == "empty train partition":
        parts = ["devel", "devel", "test", "test"]
    rows = [",".join(r) for r in zip(names, labels, parts)]
    path = tmp_path / "manifest.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


BAD = [
    ("missing file", "manifest.csv line 4: audio file '2.wav' not found"),
    ("zero-length audio", "2.wav: audio file is empty (0 bytes)"),
    ("corrupt audio", "2.wav: cannot decode audio"),
    ("unsupported extension", "manifest.csv line 4: unsupported audio file type '.aac'"),
    ("NaN samples", "2.wav: audio contains 1 NaN/inf sample value(s)"),
    ("inf samples", "2.wav: audio contains 1 NaN/inf sample value(s)"),
    ("missing columns", "manifest.csv: missing required column(s) filename"),
    ("unseen label", "manifest.csv line 5: label 'c' (test) never occurs in the train partition"),
    ("empty train partition", "manifest.csv: partition 'train' is empty"),
]


@pytest.mark.parametrize("case,message", BAD, ids=[c for c, _ in BAD])
def test_bad_input_is_one_stderr_line_and_exit_2(tmp_path, capsys, case, message):
    cfg = _config(tmp_path, _manifest_case(tmp_path, case))
    assert main(["data-stats", str(cfg)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsl_fed data-stats: error: "), captured.err
    assert message in lines[0] and "Traceback" not in captured.err


@pytest.mark.parametrize(
    "args,message",
    [
        (["data.shards=9"], "data.shards=9 but there are only 3 training speakers"),
        (["data.chunk_secs=1"], "unknown config key data.chunk_secs; did you mean data.chunk_seconds?"),
    ],
)
def test_bad_config_values(tmp_path, capsys, args, message):
    cfg = _config(tmp_path, _manifest_case(tmp_path, "none"))
    assert main(["data-stats", str(cfg), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_real_process_prints_no_traceback(tmp_path):
    cfg = _config(tmp_path, _manifest_case(tmp_path, "missing file"))
    proc = subprocess.run([sys.executable, "-m", "dsl_fed", "data-stats", str(cfg)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("dsl_fed data-stats: error: ")
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    demo = subprocess.run([sys.executable, "-m", "dsl_fed", "make-demo-data", str(tmp_path / "d"), "--speakers", "2"],
                          capture_output=True, text=True, timeout=120)
    assert demo.returncode == 2
    assert demo.stderr.strip() == ("dsl_fed make-demo-data: error: argument --speakers: must be in [3, 1000], got 2 "
                                   "(see dsl_fed make-demo-data --help)")  # argparse errors are one line too


def test_format_table_alignment_and_long_tables_are_capped():
    from dsl_fed.cli.data import _cap, format_table

    rows = [[f"s{i}", "train", str(i * 10), f"{i / 3:.1f}"] for i in range(1, 5)]
    text = format_table(["speaker", "partition", "clips", "seconds"], _cap(rows, "speakers", limit=2))
    assert text.splitlines() == [
        "speaker                partition  clips  seconds",
        "s1                     train         10      0.3",
        "s2                     train         20      0.7",
        "... (2 more speakers)",
    ]
