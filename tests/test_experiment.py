"""`dsl_fed experiment`: grid parsing, like-for-like selection, the 2-cell run in both modes on a local Ray,
resume (finished cells skipped, an interrupted cell reruns alone) and the Ray path on a test-started head."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import tiny_settings
from flower_helpers import reap_marked, stop_group
from dsl_fed.errors import DslFedError
from dsl_fed.experiment import DEFAULT_GRID, Cell, best_round, parse_grid, run_experiment
from dsl_fed.experiment.cells import MODES
from dsl_fed.experiment.runner import grid_settings, plan
from dsl_fed.federated.runtime import executable, free_port
from dsl_fed.ray_env import LOOPBACK_ONLY

GRID = (("training.learning_rate", ("0.003", "0.005")),)
PHASE2_EPOCHS = 3  # central cells train 1 + 3 epochs


def test_parse_grid_defaults_to_the_papers_four_settings_and_rejects_bad_axes():
    assert parse_grid([]) == DEFAULT_GRID == (("augment.cutmix", ("false", "true")), ("augment.specaugment", ("false", "true")))
    assert parse_grid(["model.units=16,32", "training.optimizer=adam"]) == (
        ("model.units", ("16", "32")), ("training.optimizer", ("adam",)))
    for bad in ("units=16,32", "model.units", "model.units=16,", "training.seed=1,2", "output.name=a,b"):
        with pytest.raises(DslFedError, match="--grid"):
            parse_grid([bad])
    with pytest.raises(DslFedError, match="twice"):
        parse_grid(["model.units=1", "model.units=2"])


def test_bad_grid_value_fails_before_anything_is_written(tmp_path, demo_manifest):
    config = _write_config(tmp_path, demo_manifest)
    with pytest.raises(DslFedError, match="model.units"):
        run_experiment(config, grid=(("model.units", ("16", "many")),), echo=lambda line: None)
    assert not (tmp_path / "runs").exists()


def test_best_round_is_the_first_round_with_the_highest_devel_uar():
    rows = [{"round": "1", "devel_uar": "0.5"}, {"round": "2", "devel_uar": "0.8"}, {"round": "3", "devel_uar": "0.8"},
            {"round": "4", "devel_uar": "0.7"}]
    assert best_round(rows) == 2
    with pytest.raises(DslFedError):
        best_round([])


def test_cell_id_is_readable_and_changes_with_the_resolved_config(tiny_config):
    cell = Cell("central", (("augment.cutmix", "true"),), 3)
    assert cell.overrides == ["augment.cutmix=true", "training.seed=3"] and cell.label == "cutmix=true"
    cell_id = cell.cell_id(tiny_config)
    assert cell_id.startswith("central-cutmix-true-seed3-") and cell_id == cell.cell_id(tiny_config)
    assert cell.cell_id(tiny_config.replace(**{"model.units": "8"})) != cell_id
    assert cell.cell_id(tiny_config.replace(**{"output.name": "elsewhere"})) == cell_id  # output never matters
    assert cell.cell_id(tiny_config.replace(**{"federated.local_epochs": "3"})) == cell_id  # central ignores these
    assert cell.cell_id(tiny_config.replace(**{"data.shards": "2"})) == cell_id  # and how clients would be cut
    fed = Cell("federated", (("augment.cutmix", "true"),), 3)
    assert fed.cell_id(tiny_config.replace(**{"federated.local_epochs": "3"})) != fed.cell_id(tiny_config)
    assert fed.cell_id(tiny_config.replace(**{"data.shards": "2"})) != fed.cell_id(tiny_config)


def test_a_grid_over_federated_keys_shares_its_central_cells(tmp_path, demo_manifest):
    config = _write_config(tmp_path, demo_manifest)
    p = plan(config, [], grid_settings((("federated.local_epochs", ("1", "2")),)), seeds=2, modes=MODES)
    ids = [(cell.mode, cell_id) for cell, cell_id in p.cells]
    assert len(ids) == 8 and len(set(ids)) == 6  # 2 settings x 2 seeds federated, 2 seeds central
    assert p.out_dir == tmp_path / "runs" / "tiny" / "experiment"
    assert plan(config, [], [()], 1, MODES, folder="robustness").out_dir == tmp_path / "runs" / "tiny" / "robustness"
    assert {cell_id for mode, cell_id in ids if mode == "central"} == {
        cell_id for cell, cell_id in p.cells if cell.mode == "central" and cell.settings[0][1] == "1"}


def test_table_gives_the_gap_per_setting_and_over_all_settings(tmp_path):
    from dsl_fed.experiment.cells import CellResult
    from dsl_fed.experiment.table import markdown

    def done(mode, setting, seed, devel):
        cell = Cell(mode, (("augment.cutmix", setting),), seed)
        result = CellResult(mode, devel, (devel, devel), devel, (devel, devel), devel, devel, "x", 1, "t", 1.0, tmp_path)
        return cell, f"{mode}-{setting}-{seed}", result

    cells = [done("central", "false", 0, 1.0), done("central", "false", 1, 0.9), done("federated", "false", 0, 0.8),
             done("federated", "false", 1, 0.8), done("central", "true", 0, 0.6), done("federated", "true", 0, 0.7)]
    rows = {line.split(" | ")[0]: line for line in markdown("x", cells).splitlines() if line.startswith("| ")}
    assert rows["| cutmix=false"].endswith("| -15.0 points |")  # 0.80 - 0.95
    assert rows["| cutmix=true"].endswith("| +10.0 points |")
    # pooled over the 3 central and 3 federated cells: 0.767 - 0.833
    assert rows["| all settings"].startswith("| all settings | 0.833 ± 0.208 |") and rows["| all settings"].endswith(
        "| -6.7 points |")
    assert "all settings" not in markdown("x", cells[:4])  # one setting: no pooled row


def test_table_and_results_csv_label_which_interval_is_which(tmp_path):
    from dsl_fed.experiment.cells import CellResult
    from dsl_fed.experiment.table import markdown, result_rows

    central = CellResult("central", 0.7, (0.4, 0.9), 0.6, (0.3, 0.8), 0.2, 0.1, "epoch 3/4", 1, "t", 1.0, tmp_path,
                         devel_ci_level="speakers", devel_ci_clips=(0.65, 0.75), test_ci_level="speakers",
                         test_ci_clips=(0.55, 0.65))
    federated = CellResult("federated", 0.5, (0.2, 0.8), None, None, None, None, "round 2/3", 1, "t", 1.0, tmp_path,
                           devel_ci_level="nodes", devel_ci_clips=(0.45, 0.55))
    done = [(Cell("central", (), 0), "c", central), (Cell("federated", (), 0), "f", federated)]
    table = markdown("x", done)
    assert "| central | base | 0 | epoch 3/4 | 0.700 [0.400, 0.900] (speakers) | 0.600 [0.300, 0.800] (speakers) |" in table
    assert "| federated | base | 0 | round 2/3 | 0.500 [0.200, 0.800] (nodes) | - |" in table
    assert "(nodes) under federated evaluation" in table
    rows = result_rows(done)
    assert {k: rows[0][k] for k in ("devel_ci_low", "devel_ci_level", "devel_ci_clips_low", "test_ci_clips_high")} == {
        "devel_ci_low": 0.4, "devel_ci_level": "speakers", "devel_ci_clips_low": 0.65, "test_ci_clips_high": 0.65}
    assert (rows[1]["devel_ci_level"], rows[1]["test_ci_level"], rows[1]["test_ci_clips_low"]) == ("nodes", "", "")
    # A cell finished before speaker-level intervals existed held the clip-level one: it says so.
    old = {k: v for k, v in central.to_json().items() if "level" not in k and "clips" not in k}
    assert CellResult.from_json(old).devel_ci_level == "clips" and CellResult.from_json(old).devel_ci == (0.4, 0.9)
    assert CellResult.from_json(central.to_json()) == central


@pytest.fixture(scope="module")
def experiment(demo_manifest, tmp_path_factory):
    """2 settings x 1 seed x both modes (tiny preset, 1 + 1 rounds) on a local Ray: 4 cells."""
    work = tmp_path_factory.mktemp("experiment")
    config = _write_config(work, demo_manifest)
    lines: list[str] = []
    out = run_experiment(config, grid=GRID, seeds=1, echo=lines.append)
    return config, out, lines


@pytest.mark.slow
def test_two_cells_in_both_modes_write_the_table(experiment):
    _, out, lines = experiment
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("cell,mode,setting,seed,training.learning_rate,selected,devel_uar")
    table = (out / "table.md").read_text()
    for header in ("central devel", "central test", "federated devel", "federated test", "devel gap (fed - central)",
                   "worst speaker"):
        assert header in table
    assert (out / "table.png").stat().st_size > 10_000
    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == 4 and all("ETA" in line for line in progress)
    results = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    assert sorted(r["mode"] for r in results.values()) == ["central", "central", "federated", "federated"]
    for r in results.values():
        assert 0 <= r["devel_worst_speaker"] <= r["devel_uar"] <= 1 and r["test_uar"] is not None
        assert r["devel_ci"][0] <= r["devel_uar"] <= r["devel_ci"][1] and r["bytes_moved"] > 0
        if r["mode"] == "federated":
            history = (Path(r["run_dir"]) / "history.csv").read_text().splitlines()
            assert len(history) == 3 and r["selected"] in ("round 1/2", "round 2/2")
            devel = [float(row.split(",")[2]) for row in history[1:]]
            assert r["devel_uar"] == pytest.approx(max(devel))  # best devel round, not the last one
        else:
            assert r["selected"].startswith("epoch ") and r["selected"].endswith(f"/{1 + PHASE2_EPOCHS}")


@pytest.mark.slow
def test_rerun_skips_finished_cells_and_an_interrupted_cell_reruns_alone(experiment):
    config, out, _ = experiment
    markers = sorted((out / "cells").glob("*.json"))
    before = {p.name: p.stat().st_mtime_ns for p in markers}
    lines: list[str] = []
    run_experiment(config, grid=GRID, seeds=1, echo=lines.append)
    assert "4 cells (4 already finished)" in lines[0] and not [line for line in lines if line.startswith("[")]
    assert {p.name: p.stat().st_mtime_ns for p in markers} == before

    # Interrupt one central cell: its marker never got written and its run folder is half done.
    victim = next(p for p in markers if p.name.startswith("central-"))
    victim.unlink()
    (out / "cells" / victim.stem / "model.keras").unlink()
    lines = []
    run_experiment(config, grid=GRID, seeds=1, echo=lines.append)
    assert "4 cells (3 already finished)" in lines[0]
    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == 1 and progress[0].startswith("[4/4] central")
    assert victim.is_file() and (out / "cells" / victim.stem / "model.keras").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in markers if p != victim} == {
        k: v for k, v in before.items() if k != victim.name}
    assert len((out / "results.csv").read_text().splitlines()) == 5


@pytest.mark.slow
def test_cells_run_on_an_existing_ray_head_and_nothing_is_left_behind(tmp_path, demo_manifest):
    marker = f"dsl-fed-test-{uuid.uuid4().hex}"
    # the head on loopback only (Ray otherwise takes the machine's outward address and listens everywhere)
    env = {**os.environ, "DSL_FED_RAY_TEST": marker, "PYTHONPATH": os.pathsep.join(sys.path), LOOPBACK_ONLY: "0"}
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # private: other Ray users never discover this head
    port = free_port()
    head = subprocess.Popen(
        [executable("ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port",
         str(port), "--num-cpus", "2", "--temp-dir", temp_dir, "--include-dashboard", "false",
         "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
         "--disable-usage-stats", "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        config = _write_config(tmp_path, demo_manifest)
        done = subprocess.run(
            [sys.executable, "-m", "dsl_fed", "experiment", str(config), "--grid", "training.learning_rate=0.003",
             "--mode", "central", "--ray-address", f"127.0.0.1:{port}"],
            env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "[1/1] central learning_rate=0.003 seed 0" in done.stdout
        out = tmp_path / "runs" / "tiny" / "experiment"
        assert len((out / "results.csv").read_text().splitlines()) == 2
        assert (Path(temp_dir) / "ray_current_cluster").read_text().strip().endswith(f":{port}")  # our head, not /tmp/ray
    finally:
        stop_group(head)
        left = reap_marked(marker)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert left == [], f"Ray processes of this test survived the head: {left}"


def _write_config(folder: Path, manifest) -> Path:
    settings = tiny_settings(manifest, folder / "runs", "tiny")
    settings["training"]["phase2_epochs"] = PHASE2_EPOCHS  # central cells: what is checked needs no learning
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path
