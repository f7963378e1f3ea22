"""`dsl_fed deploy local --isolation`: validated by argparse, passed to `deploy_local`, documented in --help."""

from __future__ import annotations

import inspect

import pytest

from dsl_fed.cli import main


def test_isolation_reaches_deploy_local_and_its_default_is_deploy_locals(tmp_path, monkeypatch):
    import dsl_fed.deploy.local as local

    default = inspect.signature(local.deploy_local).parameters["isolation"].default
    seen = []
    monkeypatch.setattr(local, "deploy_local", lambda *a, **k: seen.append(k["isolation"]) or tmp_path)
    monkeypatch.setattr("dsl_fed.cli.federated.summary", lambda run_dir: "summary")
    assert main(["deploy", "local", str(tmp_path / "c.yaml"), "--isolation", "subprocess"]) == 0
    assert main(["deploy", "local", str(tmp_path / "c.yaml")]) == 0
    assert seen == ["subprocess", default]


def test_unknown_isolation_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["deploy", "local", str(tmp_path / "c.yaml"), "--isolation", "thread"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--isolation" in err and "'thread'" in err


def test_help_names_both_isolations(capsys):
    with pytest.raises(SystemExit):
        main(["deploy", "local", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--isolation {process,subprocess}" in text and "one long-lived ClientApp process per SuperNode" in text
