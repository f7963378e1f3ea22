"""Output discipline of every writing command (`dsl_fed.io`): attempts of killed commands are settled, folders
and files that are not ours are never touched, outputs never land on inputs, a new folder appears whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dsl_fed.errors import DslFedError
from dsl_fed.io import STAGING_TAG, check_output_file, publish_folder, run_lock, settle_attempts, staged_run


def _has_round(attempt: Path) -> bool:
    return (attempt / "round_1").is_dir()


def _killed_in_staged_run(run: Path, body: str) -> None:
    """Run `body` inside ``staged_run(run)`` in a child process and SIGKILL it there."""
    code = (f"import os, time\nfrom pathlib import Path\nfrom dsl_fed.io import staged_run\n"
            f"with staged_run({str(run)!r}, overwrite=True) as attempt:\n    {body}\n"
            "    print('ready', flush=True)\n    time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGKILL)
    child.wait()


def test_a_killed_attempt_with_a_finished_round_becomes_the_run_and_can_be_resumed(tmp_path):
    run = tmp_path / "runs" / "fed"
    _killed_in_staged_run(run, "(attempt / 'round_1').mkdir()")
    assert not run.exists() and len(list(run.parent.glob(".fed.partial-*"))) == 1
    settle_attempts(run, _has_round)
    assert (run / "round_1").is_dir()
    assert sorted(p.name for p in run.parent.iterdir()) == ["fed"]


def test_a_killed_attempt_without_a_finished_round_is_removed_and_the_earlier_run_stays(tmp_path):
    run = tmp_path / "runs" / "fed"
    (run / "round_1").mkdir(parents=True)
    (run / "config.yaml").write_text("earlier: run\n")
    _killed_in_staged_run(run, "(attempt / 'round_1').mkdir()")  # an --overwrite attempt: the earlier run stays
    settle_attempts(run, _has_round)
    assert sorted(p.name for p in run.parent.iterdir()) == ["fed"] and (run / "round_1").is_dir()
    _killed_in_staged_run(tmp_path / "runs" / "central", "(attempt / 'history.csv').write_text('1')")
    settle_attempts(tmp_path / "runs" / "central")  # nothing a central run could resume from
    assert sorted(p.name for p in run.parent.iterdir()) == ["fed"]


def test_a_run_killed_while_it_was_being_published_is_published_by_the_next_command(tmp_path):
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "old").write_text("earlier run")
    staging = tmp_path / "runs" / ".x.partial-abcd1234"  # finished, then killed before the renames
    (staging / "x").mkdir(parents=True)
    (staging / "x" / "new").write_text("new run")
    (staging / STAGING_TAG).write_text("complete\n")
    settle_attempts(run)
    assert [p.name for p in run.iterdir()] == ["new"]
    assert sorted(p.name for p in run.parent.iterdir()) == ["x"]


def test_folders_and_files_named_like_ours_but_not_made_by_us_are_never_touched(tmp_path):
    runs = tmp_path / "runs"
    for name in (".x.partial", ".x.partial-abcd1234", ".x.replaced"):  # no staging mark inside
        (runs / name).mkdir(parents=True)
        (runs / name / "mine.txt").write_text("user data")
    with pytest.raises(DslFedError):
        with staged_run(runs / "x"):
            raise DslFedError("failed")
    with staged_run(runs / "x") as attempt:
        (attempt / "done").write_text("1")
    settle_attempts(runs / "x", _has_round)
    for name in (".x.partial", ".x.partial-abcd1234", ".x.replaced"):
        assert (runs / name / "mine.txt").read_text() == "user data"
    (runs / ".y.lock").write_text("my notes\n")
    with pytest.raises(DslFedError, match=r"\.y\.lock: exists and is not a dsl_fed lock file"):
        with run_lock(runs / "y"):
            pass
    assert (runs / ".y.lock").read_text() == "my notes\n"


def test_an_output_never_lands_on_an_input_or_on_a_file_another_program_wrote(tmp_path):
    model = tmp_path / "model.keras"
    model.write_bytes(b"model")
    os.link(model, tmp_path / "same.json")  # the model under another name
    with pytest.raises(DslFedError, match="would overwrite .*model.keras, an input of this command"):
        check_output_file(tmp_path / "same.json", [model], ours=lambda p: True)
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(DslFedError, match="notes.json: exists and is not an earlier --json file"):
        check_output_file(tmp_path / "notes.json", [model], what="--json file")
    with pytest.raises(DslFedError, match="exists and is not a file"):
        check_output_file(tmp_path, [model])
    check_output_file(tmp_path / "notes.json", [model], ours=lambda p: p.read_text() == "{}")  # an earlier output
    check_output_file(tmp_path / "new.json", [model])
    assert model.read_bytes() == b"model"


def test_overwrite_replaces_only_a_run(tmp_path):
    """Not the corpus' audio folder (output.directory=corpus output.name=audio), nor an experiment's tables."""
    audio = tmp_path / "audio"
    audio.mkdir()
    (audio / "a.wav").write_bytes(b"RIFF")
    with pytest.raises(DslFedError, match="holds no config.yaml, so it is not a dsl_fed run"):
        with staged_run(audio, overwrite=True):
            pass
    assert [p.name for p in tmp_path.iterdir()] == ["audio"] and (audio / "a.wav").read_bytes() == b"RIFF"


def test_a_new_folder_appears_whole_and_never_over_a_folder_someone_filled_meanwhile(tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # empty: may be taken

    def write(folder: Path) -> None:
        (folder / "a").write_text("ours")

    publish_folder(out, write)
    assert (out / "a").read_text() == "ours"
    other = tmp_path / "other"

    def racing(folder: Path) -> None:  # a second command fills the target while this one writes
        other.mkdir()
        (other / "theirs").write_text("theirs")
        (folder / "a").write_text("ours")

    with pytest.raises(DslFedError, match="was filled by another command meanwhile"):
        publish_folder(other, racing)
    assert [p.name for p in other.iterdir()] == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]  # no staging folder left


@pytest.mark.parametrize("command", ["export", "make-demo-data"])
def test_a_second_command_on_the_same_output_is_refused_before_it_writes(command, tmp_path, capsys):
    from dsl_fed.cli import main

    out = tmp_path / ("fp32/model.tflite" if command == "export" else "corpus")
    args = ["export", str(tmp_path / "m.keras"), "--out", str(out)] if command == "export" else [command, str(out)]
    what = "export" if command == "export" else "corpus folder"
    with run_lock(out, what=what):
        assert main(args) == 2
    assert f"is writing this {what}; wait for it to finish" in capsys.readouterr().err
    assert not out.exists()
