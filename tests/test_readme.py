"""The README stays true: it documents every config key and CLI command, and CI runs its test command."""

import dataclasses
import re
from pathlib import Path

import pytest

from dsl_fed.cli import build_parser
from dsl_fed.config import Config

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def config_keys():
    for section in dataclasses.fields(Config):
        for key in dataclasses.fields(section.default_factory):
            yield section.name, key.name


@pytest.mark.parametrize("section, key", list(config_keys()), ids=lambda v: v)
def test_every_config_key_is_in_the_reference_table(section, key):
    rows = [line for line in README.splitlines() if line.startswith(f"| `{section}.")]
    assert any(re.search(rf"\b{key}\b", row.split("|")[1]) for row in rows), f"{section}.{key} missing from README"


def test_every_cli_command_is_documented():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert f"dsl_fed {name}" in README, name


def test_ci_runs_the_readme_test_command():
    assert "make test " in README
    assert (REPO / ".ci/run").read_text().strip().splitlines()[-1] == "make test"
    assert re.search(r"^test: install\n\t\$\(PYTHON\) -m pytest$", (REPO / "Makefile").read_text(), re.M)
