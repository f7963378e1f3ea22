"""The README stays true: it documents every config key and CLI command, and CI runs its test command."""

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

from dsl_fed.cli import build_parser
from dsl_fed.config import Config

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def config_fields(cls=Config, section=""):
    """(section, field) for every config key; nested sections such as federated.dp are sections of their own."""
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory):
            yield from config_fields(f.default_factory, f"{section}.{f.name}" if section else f.name)
        else:
            yield section, f


def config_keys():
    return [(section, f.name) for section, f in config_fields()]


@pytest.mark.parametrize("section, key", list(config_keys()), ids=lambda v: v)
def test_every_config_key_is_in_the_reference_table(section, key):
    rows = [line for line in README.splitlines() if line.startswith(f"| `{section}.")]
    assert any(re.search(rf"\b{key}\b", row.split("|")[1]) for row in rows), f"{section}.{key} missing from README"


def test_reference_table_defaults_are_the_real_defaults():
    """The table's default column: ``| `section.a` / `b` | 1 / 2 | ...`` must equal the dataclasses' defaults."""
    defaults = {f"{section}.{f.name}": f.default for section, f in config_fields()}
    rows = [line.split("|") for line in README.splitlines() if re.match(r"\| `\w+(?:\.\w+)+`", line)]
    checked = 0
    for cells in rows:
        keys = re.findall(r"`(\w+(?:\.\w+)*)`", cells[1])
        section = keys[0].rsplit(".", 1)[0]
        names = [keys[0]] + [f"{section}.{key}" for key in keys[1:]]
        written = [value.strip() for value in cells[2].split(" / ")]
        assert len(written) == len(names), cells[1]
        for name, text in zip(names, written):
            default = defaults[name]
            if text in ("—", "null"):
                assert default in ("", None), name
            elif isinstance(default, bool) or default is None:
                assert text == str(default).lower(), name
            elif isinstance(default, (int, float)):
                assert float(text) == default, name
            elif isinstance(default, tuple):  # a list key, written as YAML
                assert text == f"[{', '.join(default)}]", name
            else:
                assert text == default, name
            checked += 1
    assert checked == len(defaults)


def test_every_cli_command_is_documented():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert f"dsl_fed {name}" in README, name


def test_ci_runs_the_readme_test_command():
    assert "make test " in README
    assert (REPO / ".ci/run").read_text().strip().splitlines()[-1] == "make test"
    assert re.search(r"^test: install\n\t\$\(PYTHON\) -m pytest -n \$\(PYTEST_WORKERS\) --dist worksteal$",
                     (REPO / "Makefile").read_text(), re.M)


def layout_paths():
    """Paths in the first column of the README's Layout table; a bare file name lives beside the row's first path."""
    section = README.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        names = re.findall(r"`([^`]+)`", row.split("|")[1])
        base = Path(names[0]).parent
        yield names[0]
        yield from (name if "/" in name else str(base / name) for name in names[1:])


def test_layout_table_matches_the_tree():
    listed = list(layout_paths())
    assert [p for p in listed if not (REPO / p).exists()] == []
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    folders = {path.split("/")[0] for path in tracked if "/" in path and not path.startswith(".")}
    assert folders - {p.split("/")[0] for p in listed} == set()
    packages = {f"dsl_fed/{p.name}/" for p in (REPO / "dsl_fed").iterdir() if (p / "__init__.py").is_file()}
    assert packages - set(listed) == set()


def test_the_privacy_at_scale_bullet_quotes_its_results_file():
    """Every devel UAR and epsilon of benchmarks/results/privacy_scale.md, and its verdict, as the README says."""
    results = (REPO / "benchmarks" / "results" / "privacy_scale.md").read_text()
    rows = re.findall(r"^\| (no DP|[\d.]+) \| (—|[\d.e+]+) \| ([\d.]+) \|$", results, flags=re.M)
    assert len(rows) == 4
    bullet = README[README.index("**At scale it is still not enough.**"):]
    bullet = " ".join(bullet[:bullet.index("\n- ")].split())
    baseline, *dp = rows
    assert f"{baseline[2]} without DP" in bullet
    assert f"{', '.join(uar for _, _, uar in dp[:-1])} and {dp[-1][2]} at ε {', '.join(e for _, e, _ in dp[:-1])} " \
           f"and {dp[-1][1]}" in bullet
    missed = "No noise multiplier here keeps devel UAR within 5 points" in results
    assert ("is missed" in bullet) == missed


def test_the_deployment_timing_quotes_its_results_file():
    """The README's deployment table and ratio are the ones benchmarks/results/federated.md computed."""
    section = (REPO / "benchmarks" / "results" / "federated.md").read_text().split("## Real deployment vs simulation")[1]
    ratio = re.search(r"process isolation\): ([\d.]+)x the simulation's time per round", section).group(1)
    start = README.index("The same job as a real deployment")
    text = README[start:README.index("**Robustness**", start)]
    assert f"{ratio}x the simulation's" in " ".join(text.split())
    def cells(lines, mode):
        return [c.strip() for c in next(ln for ln in lines if ln.startswith(f"| {mode}")).strip().strip("|").split("|")]

    for mode in ("simulation (Ray", "deployment, one ClientApp process per SuperNode", "deployment, a ClientApp"):
        measured, quoted = cells(section.splitlines(), mode), cells(text.splitlines(), mode)
        assert quoted[2:7] == measured[3:8], mode  # s / round, training, other client work, server, rest
