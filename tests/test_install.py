"""`pip install .` (not editable) into a fresh virtual environment, then `dsl_fed simulate` from a folder outside the repo.

The environment sees the site-packages of the interpreter running the tests (TensorFlow, Ray, ... are not
reinstalled), whether that is a system Python or a virtualenv: `venv --system-site-packages` would show the
*base* interpreter's, which inside a virtualenv lacks the dependencies and the build requirements. So the dev
machine's editable dsl_fed is visible too; the venv's own site-packages come first on its path, and Flower's
commands are installed into the venv as well, so every process of the run (CLI, SuperLink, SuperExec,
ServerApp, Ray workers) runs the venv's interpreter and imports the installed copy. The test checks that.
The wheel is built without build isolation (no network), with this interpreter's setuptools and wheel (the
``dev`` extra installs them).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_settings
from flower_helpers import processes_with

pytestmark = pytest.mark.slow  # venv + wheel build + a one-round Flower simulation: 1-3 min on 2 cores

REPO = Path(__file__).resolve().parents[1]
NOT_SHIPPED = ("*.egg-info", "build", "dist", "runs", "demo_data", "__pycache__", ".pytest_cache", ".flwr", ".git")


def _run(args: list, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    return proc


def make_venv_over_this_environment(venv: Path, cwd: Path, env: dict) -> Path:
    """A venv (without its own pip) that sees this interpreter's site-packages after its own; returns its python.

    A ``.pth`` file in the venv runs `site.addsitedir` on each of them, so their own ``.pth`` files (editable
    installs, ...) apply as they do here.
    """
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd, env)
    python = venv / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd, env).stdout.strip())
    outer = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    lines = [f"import site; site.addsitedir({path!r})" for path in outer if Path(path).is_dir() and Path(path) != purelib]
    (purelib / "_tested_interpreter.pth").write_text("\n".join(lines) + "\n")
    return python


def test_wheel_in_a_fresh_venv_runs_simulate_outside_the_repo(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    venv = tmp_path / "venv"
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*NOT_SHIPPED))
    # Tag the copy: `simulate` shows a round line only if the ServerApp marks it as the CLI expects, i.e. only if
    # the app process imported the installed copy too, not the checkout.
    run_config = source / "dsl_fed" / "federated" / "run_config.py"
    text = run_config.read_text()
    assert 'PROGRESS_MARK = "[dsl_fed]"' in text
    run_config.write_text(text.replace('PROGRESS_MARK = "[dsl_fed]"', 'PROGRESS_MARK = "[dsl_fed wheel]"'))
    python = make_venv_over_this_environment(venv, tmp_path, env)
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", source], tmp_path, env)
    # Flower's commands bound to the venv's interpreter (dsl_fed starts them from beside sys.executable)
    flwr = f"flwr=={importlib.metadata.version('flwr')}"
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", flwr], tmp_path, env)
    shutil.rmtree(source)  # nothing may need the source tree from here on

    work = tmp_path / "elsewhere"
    work.mkdir()
    site = _run([python, "-c", "import dsl_fed, sysconfig; print(dsl_fed.__file__); print(sysconfig.get_paths()['purelib'])"],
                work, env).stdout.split()
    assert Path(site[0]).is_relative_to(site[1]) and Path(site[1]).is_relative_to(venv)  # the wheel, not the checkout
    # the dependencies are the ones this interpreter uses (in a virtualenv: its own, not the base Python's)
    keras_there = _run([python, "-c", "import importlib.util; print(importlib.util.find_spec('keras').origin)"], work, env)
    assert keras_there.stdout.strip() == importlib.util.find_spec("keras").origin
    assert not any((Path(site[1]) / name).exists() for name in ("server", "clients", "simulations"))
    assert (venv / "bin" / "flower-superlink").read_text().splitlines()[0] == f"#!{python}"

    dsl_fed = venv / "bin" / "dsl_fed"
    _run([dsl_fed, "make-demo-data", "demo", "--speakers", "8", "--clips", "2"], work, env)
    settings = tiny_settings("demo/manifest.csv", "runs", "fed")
    settings["data"]["shards"] = 2
    settings["federated"].update(phase1_rounds=1, phase2_rounds=0, local_epochs=1)
    (work / "fed.yaml").write_text(yaml.safe_dump(settings))
    proc = _run([dsl_fed, "simulate", "fed.yaml"], work, env, timeout=900)
    assert "round 1/1 phase 1" in proc.stdout + proc.stderr
    assert (work / "runs" / "fed" / "round_1" / "model.tflite").stat().st_size > 0
    assert processes_with(str(tmp_path)) == []  # SuperLink, SuperExec, simulation and Ray workers are gone

