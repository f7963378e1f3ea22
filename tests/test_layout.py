"""Package layout: the core never imports Flower, and only `dsl_fed` is an installable package."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_core_modules_and_the_cli_do_not_import_flower():
    core = sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts)
        for p in (REPO / "dsl_fed").rglob("*.py")
        if "federated" not in p.parts and p.name != "__main__.py"
    )
    code = (
        "import importlib, sys\n"
        f"for name in {core!r}:\n"
        "    importlib.import_module(name.removesuffix('.__init__'))\n"
        "from dsl_fed.cli import build_parser; build_parser()\n"
        "print(sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_only_dsl_fed_is_installed_as_a_top_level_package():
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert find["include"] == ["dsl_fed*"]
    for entry in ("server/server_app.py", "clients/client_app.py"):
        text = (REPO / entry).read_text()
        assert "from dsl_fed.federated." in text and len(text.splitlines()) < 15, entry
