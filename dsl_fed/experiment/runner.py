"""`run_experiment`: a grid of settings x seeds x modes, each cell a Ray task, resumable, one line per cell.

Why plain Ray tasks and not Ray Tune: the grid is fixed and every cell runs to the end (no search algorithm,
no trial scheduler, no early stopping), the cell functions already write their own run folders, and
resuming is a file per finished cell - Tune would add its trial folders, reporting API and experiment state
on top without doing anything for us. `ray.wait` gives the one-line-per-cell progress.

CPU sharing: each cell reserves ``experiment.cpus_per_cell`` CPUs of the experiment's Ray and runs in a fresh
worker process (``max_calls=1``) whose TensorFlow uses that many threads. A federated cell's Flower simulation
cannot run inside the experiment's Ray (Flower starts its own Ray instance in its SuperLink); it gets a
private Ray instance capped at the same ``cpus_per_cell`` (``init-args-num-cpus``), and its clients run
``cpus_per_cell / federated.client_cpus`` at a time within it. So the experiment's Ray decides how many
cells run at once, and no cell uses more CPUs than it reserved (the SuperLink's and ServerApp's scoring
are the only extra work, and they run while the clients wait).

Layout of ``runs/<name>/experiment/``: ``cells/<cell>/`` (the cell's run folder), ``cells/<cell>.json``
(written atomically when the cell finishes: the resume marker), ``results.csv``, ``table.md``, ``table.png``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dsl_fed.config import MAX_SEED, load_config
from dsl_fed.errors import DslFedError
from dsl_fed.experiment.cells import MODES, Cell, CellResult
from dsl_fed.federated.run_config import check_client_cpus
from dsl_fed.io import atomic_write, run_lock
from dsl_fed.ray_env import check_ray_address, ray_environment

DEFAULT_GRID = (("augment.cutmix", ("false", "true")), ("augment.specaugment", ("false", "true")))
MAX_CELLS = 1000  # grid settings x seeds x modes: each cell is a training run, and each is validated up front


@dataclass(frozen=True)
class Plan:
    """Every cell of an experiment with its validated config and folder name."""

    config_path: Path
    overrides: tuple[str, ...]
    cells: tuple[tuple[Cell, str], ...]  # (cell, cell id); cells with equal ids train the same thing
    out_dir: Path
    name: str
    cpus_per_cell: int


def parse_grid(specs: Sequence[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``["augment.cutmix=false,true", ...]`` -> ``(("augment.cutmix", ("false", "true")), ...)``; [] = default."""
    grid = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        options = tuple(v.strip() for v in values.split(","))
        if not sep or "." not in key or not all(options):
            raise DslFedError(f"--grid {spec!r}: expected SECTION.KEY=V1,V2,... (e.g. augment.cutmix=false,true)")
        if key.startswith("output.") or key == "training.seed":
            raise DslFedError(f"--grid {spec!r}: {key} is set per cell (use --seeds for seeds)")
        if key in dict(grid):
            raise DslFedError(f"--grid {spec!r}: {key} is given twice")
        grid.append((key, options))
    return tuple(grid) if grid else DEFAULT_GRID


def grid_settings(grid: Sequence[tuple[str, Sequence[str]]]) -> list[tuple[tuple[str, str], ...]]:
    """The Cartesian product of a grid as a list of settings (``((key, value), ...)`` each)."""
    size = math.prod(len(options) for _, options in grid)
    if size > MAX_CELLS:
        raise DslFedError(f"--grid: {' x '.join(str(len(o)) for _, o in grid)} = {size} settings; at most {MAX_CELLS} cells")
    return [tuple(values) for values in itertools.product(*[[(key, v) for v in options] for key, options in grid])]


def plan(config_path: str | Path, overrides: Sequence[str], settings: Sequence[tuple[tuple[str, str], ...]],
         seeds: int, modes: Sequence[str], folder: str = "experiment") -> Plan:
    """Validate the config of every cell before anything runs (a bad value is one error naming the key)."""
    if not 1 <= seeds <= MAX_CELLS:
        raise DslFedError(f"--seeds must be in [1, {MAX_CELLS}], got {seeds}")
    count = len(settings) * seeds * len(modes)
    if count > MAX_CELLS:
        raise DslFedError(f"{len(settings)} setting(s) x {seeds} seed(s) x {len(modes)} mode(s) = {count} cells; "
                          f"at most {MAX_CELLS}")
    config_path = Path(config_path).resolve()
    base = load_config(config_path, overrides)
    if base.training.seed + seeds - 1 > MAX_SEED:
        raise DslFedError(f"--seeds {seeds} from training.seed={base.training.seed} reaches seed "
                          f"{base.training.seed + seeds - 1}, above {MAX_SEED}")
    out_dir = Path(base.output.directory).resolve() / base.output.name / folder
    cells = []
    for values in settings:
        for seed in range(base.training.seed, base.training.seed + seeds):
            for mode in modes:
                cell = Cell(mode, tuple(values), seed)
                cell_cfg = load_config(config_path, [*overrides, *cell.overrides])
                if mode == "federated":  # its simulation gets the cell's CPUs
                    check_client_cpus(cell_cfg, cell_cfg.experiment.cpus_per_cell)
                cells.append((cell, cell.cell_id(cell_cfg)))
    return Plan(config_path, tuple(overrides), tuple(cells), out_dir, base.output.name, base.experiment.cpus_per_cell)


def run_experiment(
    config_path: str | Path,
    overrides: Sequence[str] = (),
    grid: Sequence[tuple[str, Sequence[str]]] = DEFAULT_GRID,
    seeds: int = 1,
    modes: Sequence[str] = MODES,
    ray_address: str | None = None,
    command: str = "",
    echo: Callable[[str], None] = print,
    settings: Sequence[tuple[tuple[str, str], ...]] | None = None,
    folder: str = "experiment",
) -> Path:
    """Run (or continue) an experiment; returns ``runs/<name>/<folder>``.

    Args:
        config_path: YAML config; its ``output.name`` names the experiment.
        overrides: ``section.key=value`` applied to every cell.
        grid: ``(key, values)`` pairs; the cells are their Cartesian product x seeds x modes.
        seeds: Seeds ``training.seed``, ``training.seed + 1``, ... per setting.
        modes: ``central`` and/or ``federated``.
        ray_address: An existing Ray cluster (``host:port``); None starts a private local Ray.
        command: The command line, recorded in ``table.md``.
        echo: Receives the progress lines.
        settings: Explicit settings (``((key, value), ...)`` each) instead of the product of `grid`.
        folder: Folder under ``runs/<name>/`` for the cells and tables; another study (e.g. robustness) with the
            same ``output.name`` uses its own, so neither rewrites the other's table.

    Raises:
        DslFedError: invalid arguments (before anything runs), or cells that failed (after the others ran).
    """
    from dsl_fed.experiment.table import write_outputs

    if ray_address is not None:
        check_ray_address(ray_address)
    p = plan(config_path, overrides, grid_settings(grid) if settings is None else settings, seeds, modes, folder)
    with run_lock(p.out_dir.parent):  # one command per output.name: no two experiments write one table
        # Cells with the same id train the same thing (e.g. central cells of a grid over federated.* keys): run once.
        finished = {cell_id: _finished(p.out_dir, cell_id) for _, cell_id in p.cells}
        todo = list({cell_id: (cell, cell_id) for cell, cell_id in p.cells if finished[cell_id] is None}.values())
        echo(f"experiment {p.name}: {len(finished)} cells ({len(finished) - len(todo)} already finished), "
             f"{p.cpus_per_cell} CPU per cell -> {p.out_dir}")

        def done():
            return [(cell, cell_id, finished[cell_id]) for cell, cell_id in p.cells if finished[cell_id] is not None]

        write_outputs(p.out_dir, p.name, done(), command)
        failed: list[str] = []
        if todo:
            started = time.monotonic()
            for k, (cell, cell_id, outcome) in enumerate(_run_on_ray(p, todo, ray_address), start=1):
                elapsed = time.monotonic() - started
                eta = elapsed / k * (len(todo) - k)
                if isinstance(outcome, CellResult):
                    finished[cell_id] = outcome
                    write_outputs(p.out_dir, p.name, done(), command)
                    test = f" test {outcome.test_uar:.3f}" if outcome.test_uar is not None else ""
                    count = sum(r is not None for r in finished.values())
                    echo(f"[{count}/{len(finished)}] {cell.mode} {cell.label} seed {cell.seed}: devel "
                         f"{outcome.devel_uar:.3f}{test} ({outcome.selected}) in {outcome.seconds:.0f} s; "
                         f"ETA {_duration(eta)}")
                else:
                    failed.append(f"{cell_id}: {outcome}")
                    echo(f"[failed] {cell.mode} {cell.label} seed {cell.seed}: {outcome}; ETA {_duration(eta)}")
        if failed:
            raise DslFedError(f"{len(failed)} of {len(finished)} cells failed (rerun to retry them): {failed[0]}")
        echo(f"table: {p.out_dir / 'table.md'}")
        return p.out_dir


def execute_cell(cell: Cell, cell_id: str, config_path: str, overrides: list[str], out_dir: str,
                 cpus: int) -> CellResult | str:
    """Body of one Ray task: train the cell, write its marker JSON; a user error comes back as its message."""
    for var in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        os.environ[var] = str(cpus)  # a fresh worker (max_calls=1): TensorFlow has not started yet
    from dsl_fed.experiment import cells

    try:
        cfg_overrides = [*overrides, *cell.overrides, *_output(Path(out_dir), cell_id)]
        # A cell without its marker JSON never finished: its folder holds an interrupted attempt, replace it.
        if cell.mode == "central":
            result = cells.run_central(load_config(config_path, cfg_overrides), overwrite=True)
        else:
            result = cells.run_federated(config_path, cfg_overrides, ray_cpus=cpus, overwrite=True)
    except DslFedError as exc:
        return str(exc)
    atomic_write(Path(out_dir) / "cells" / f"{cell_id}.json", json.dumps(result.to_json(), indent=2) + "\n")
    return result


def _run_on_ray(p: Plan, todo, ray_address: str | None):
    """Yield ``(cell, cell_id, CellResult | error message)`` as the Ray tasks finish.

    Every process of the local Ray (and of the cells' Flower runs, which nest their own marks inside) carries
    this experiment's watchdog mark, so none outlives it, even when it is killed.
    """
    from dsl_fed.federated.watchdog import guard

    with guard() as marker, _environment({**marker, **ray_environment(ray_address)}):
        yield from _ray_cells(p, todo, ray_address)


def _ray_cells(p: Plan, todo, ray_address: str | None):
    import ray

    handler = signal.getsignal(signal.SIGTERM)
    with warnings.catch_warnings():  # a tip about GPU variables in a future Ray, printed on every start
        warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
        ray.init(address=ray_address or "local", num_cpus=None if ray_address else os.cpu_count(),
                 include_dashboard=False, log_to_driver=False, configure_logging=False)
    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)  # Ray's own exits 1 after a native stack dump; ours cleans up
    try:
        total = int(ray.cluster_resources().get("CPU", 0))
        if p.cpus_per_cell > total:
            raise DslFedError(f"experiment.cpus_per_cell={p.cpus_per_cell} but the Ray cluster has {total} CPUs")
        task = ray.remote(num_cpus=p.cpus_per_cell, max_calls=1, max_retries=0)(execute_cell)
        pending = {task.remote(cell, cell_id, str(p.config_path), list(p.overrides), str(p.out_dir),
                               p.cpus_per_cell): (cell, cell_id) for cell, cell_id in todo}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                cell, cell_id = pending.pop(ready[0])
                try:
                    outcome = ray.get(ready[0])
                except ray.exceptions.RayError as exc:
                    outcome = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
                yield cell, cell_id, outcome
        except KeyboardInterrupt:
            # Interrupt the running cells (KeyboardInterrupt inside the task) so a federated cell stops its own
            # SuperLink and simulation before Ray's workers go away; unfinished cells rerun next time.
            for ref in pending:
                ray.cancel(ref)
            ray.wait(list(pending), num_returns=len(pending), timeout=60)
            raise
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """Set `values` in this process's environment for the block (Ray's daemons inherit it when they start)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _finished(out_dir: Path, cell_id: str) -> CellResult | None:
    """The cell's result if it finished (its marker JSON is complete), else None: it (re)runs."""
    path = out_dir / "cells" / f"{cell_id}.json"
    try:
        return CellResult.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _output(out_dir: Path, cell_id: str) -> list[str]:
    return [f"output.directory={out_dir / 'cells'}", f"output.name={cell_id}"]


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
