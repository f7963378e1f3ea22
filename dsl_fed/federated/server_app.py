"""Flower ServerApp: the paper's two-phase recipe as federated rounds, one checkpoint + TFLite per round.

The server builds the same model as every client from the run config, sends the full initial weights once
per node, then only the phase's trainable slice (`dsl_fed.federated.strategy`). After each round it merges the
aggregated slice into its full model, scores it on the held-out devel speakers (and test, if
``federated.evaluate_test``), and publishes ``runs/<name>/round_<k>/`` (`dsl_fed.federated.checkpoint`). ``resume``
continues from ``runs/<name>/latest``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before dsl_fed imports TensorFlow
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")

import dataclasses  # noqa: E402
import time  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import keras  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import Result  # noqa: E402

from dsl_fed.config import Config  # noqa: E402
from dsl_fed.data import ChunkSet, Manifest, load_chunks, load_manifest  # noqa: E402
from dsl_fed.errors import DslFedError  # noqa: E402
from dsl_fed.export import export_tflite  # noqa: E402
from dsl_fed.io import atomic_write  # noqa: E402
from dsl_fed.metrics import evaluate_chunks  # noqa: E402
from dsl_fed.models import build_model, get_weights_by_name, set_phase, set_weights_by_name  # noqa: E402
from dsl_fed.models import trainable_weight_names, weight_names  # noqa: E402
from dsl_fed.privacy import RunPrivacy, describe  # noqa: E402
from dsl_fed.report import plot_rounds  # noqa: E402
from dsl_fed.federated.checkpoint import PLOT, RunDirectory  # noqa: E402
from dsl_fed.federated.run_config import PROGRESS_MARK, check_federation_size, config_from_run_config, count_shards, resume_requested  # noqa: E402
from dsl_fed.federated.strategy import LOG, PhaseSchedule, RoundStats, SliceAggregation, make_strategy  # noqa: E402

def create_app(app_dir: Path | None = None) -> ServerApp:
    """The ServerApp; `app_dir` is the app bundle a relative ``config`` in the run config is looked up in."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        """Entry point Flower calls; user errors are logged as one marked line before the run fails."""
        try:
            run_server(grid, context.run_config, app_dir=app_dir)
        except DslFedError as exc:
            LOG.error("%s error: %s", PROGRESS_MARK, exc)
            raise

    return app


app = create_app()


def run_server(grid: Grid, run_config: Mapping[str, Any], node_timeout: float = 120.0,
               app_dir: Path | None = None) -> Result | None:
    """Run (or resume) the whole federated training on `grid`; returns Flower's `Result` (None if nothing to do)."""
    cfg = config_from_run_config(run_config, app_dir)
    resume = resume_requested(run_config)
    manifest = load_manifest(cfg.data)
    num_shards = count_shards(cfg, manifest)
    check_federation_size(cfg, num_shards)
    schedule = PhaseSchedule.from_config(cfg.federated)
    run = RunDirectory(cfg.output.run_dir)
    for warning in manifest.warnings:
        LOG.warning("%s warning: %s", PROGRESS_MARK, warning)

    keras.backend.clear_session()
    model = build_model(cfg, len(manifest.classes))
    privacy = RunPrivacy.of(cfg.federated, num_shards) if cfg.federated.dp.enabled else None
    last_round = _last_round(privacy, schedule.num_rounds)
    offset = _resume(run, cfg, model) if resume else _start(run, cfg)
    if offset >= last_round:
        LOG.info("%s %s already has all %d rounds; nothing to resume", PROGRESS_MARK, run.path, last_round)
        return None
    fed = cfg.federated
    if fed.fraction_evaluate > 0 and not _clients_have_held_out_clips(manifest):
        LOG.info("%s no training speaker has devel/test clips: client-side evaluation is skipped", PROGRESS_MARK)
        fed = dataclasses.replace(fed, fraction_evaluate=0.0)
    strategy = make_strategy(fed, get_weights_by_name(model, weight_names(model)), slice_names(model, cfg),
                             num_nodes=num_shards, round_offset=offset, seed=cfg.training.seed,
                             client_dropout=cfg.robustness.client_dropout)
    if resume:
        strategy.load_state_arrays(run.strategy_state(offset))
    evaluate_fn = RoundPublisher(cfg, manifest, model, strategy, run, privacy)
    _wait_for_nodes(grid, num_shards, node_timeout)
    LOG.info(
        "%s %s rounds %d-%d (phase 1: %d, phase 2: %d), %s, %d shards -> %s",
        PROGRESS_MARK, "resuming" if offset else "federated training:", offset + 1, schedule.num_rounds,
        schedule.phase1_rounds, schedule.phase2_rounds, cfg.federated.strategy, num_shards, run.path,
    )
    return strategy.start(
        grid=grid,
        initial_arrays=strategy.full_record(),
        num_rounds=last_round - offset,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=evaluate_fn,
    )


class RoundPublisher:
    """`evaluate_fn` for `Strategy.start`: score the merged global model and publish the round's outputs."""

    def __init__(self, cfg: Config, manifest: Manifest, model: keras.Model, strategy: SliceAggregation,
                 run: RunDirectory, privacy: RunPrivacy | None = None) -> None:
        self.cfg = cfg
        self.privacy = privacy
        self.classes = manifest.classes
        self.warnings = manifest.warnings  # repeated in every round manifest
        self.model = model
        self.strategy = strategy
        self.run = run
        self.sets: dict[str, ChunkSet] = {"devel": load_chunks(manifest.partition("devel", required=True), cfg.data,
                                                               manifest.classes, progress=False)}
        if cfg.federated.evaluate_test:
            self.sets["test"] = load_chunks(manifest.partition("test", required=True), cfg.data, manifest.classes,
                                            progress=False)
        self._last = time.perf_counter()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None  # the initial model: nothing trained yet, nothing to publish
        start = time.perf_counter()
        flower_seconds = start - self._last  # messages out, local training, replies in, client evaluation
        rnd = server_round + self.strategy.round_offset
        stats = self.strategy.rounds[rnd]
        set_weights_by_name(self.model, {name: array.numpy() for name, array in arrays.items()})
        scores = {part: evaluate_chunks(self.model, chunks, self.classes, batch_size=self.cfg.training.batch_size,
                                        seed=self.cfg.training.seed)
                  for part, chunks in self.sets.items()}
        extra = {
            "round": rnd,
            "phase": stats.phase,
            "num_rounds": self.strategy.schedule.num_rounds,
            "strategy": self.cfg.federated.strategy,
            "transfer_dtype": self.cfg.federated.transfer_dtype,
            "warnings": self.warnings,
            **scores,
            "clients": dataclasses.asdict(stats),
            "bytes_up": stats.bytes_up,
            "bytes_down": stats.bytes_down,
            "seconds": flower_seconds,
        }
        if self.privacy is not None:
            extra["privacy"] = self.privacy.report(rnd, stats.clip_norm)
            extra["privacy"]["last_round"] = self.privacy.last_round(self.strategy.schedule.num_rounds)
        self.run.write_round(rnd, lambda folder: self._write_model(folder, extra), self.strategy.state_arrays())
        server_seconds = time.perf_counter() - start
        rows = self.run.append_history(_history_row(stats, scores, flower_seconds, server_seconds, extra.get("privacy")))
        plot_rounds(rows, self.run.path / PLOT)
        self._last = time.perf_counter()
        LOG.info("%s %s", PROGRESS_MARK,
                 progress_line(stats, scores, self.strategy.schedule.num_rounds, self._last - start + flower_seconds,
                               extra.get("privacy")))
        return MetricRecord({f"{part}-{key}": float(value) for part, s in scores.items()
                             for key, value in (("uar", s["uar"]), ("ci-low", s["ci"][0]), ("ci-high", s["ci"][1]))})

    def _write_model(self, folder: Path, extra: dict[str, Any]) -> None:
        self.model.save(folder / "model.keras")
        export_tflite(self.model, folder / "model.tflite", classes=self.classes, cfg=self.cfg, extra=extra)


def progress_line(stats: RoundStats, scores: Mapping[str, Mapping[str, Any]], num_rounds: int, seconds: float,
                  privacy: Mapping[str, Any] | None = None) -> str:
    """One human line per round (``dsl_fed simulate`` prints exactly these)."""
    parts = [f"round {stats.round}/{num_rounds} phase {stats.phase}"]
    for part, s in scores.items():
        parts.append(f"{part} UAR {s['uar']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}]")
    clients = f"clients {stats.aggregated}/{stats.sampled}"
    if stats.dropped:
        clients += f" ({stats.dropped} dropped out)"
    if stats.failed or stats.rejected:
        clients += f" ({len(stats.failed)} failed, {len(stats.rejected)} rejected)"
    if not stats.updated:
        clients += " - model unchanged"
    parts += [clients, f"up {stats.bytes_up / 1e3:.1f} kB, down {stats.bytes_down / 1e3:.1f} kB"]
    if privacy is not None:
        parts.append(f"DP {privacy['guarantee']}")
    parts.append(f"{seconds:.1f} s")
    return " | ".join(parts)


def _history_row(stats: RoundStats, scores: Mapping[str, Mapping[str, Any]], flower_seconds: float,
                 server_seconds: float, privacy: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``seconds``: the round in Flower (send, local training, replies); ``server_seconds``: scoring + publishing."""
    row: dict[str, Any] = {"round": stats.round, "phase": stats.phase}
    for part, s in scores.items():
        row.update({f"{part}_uar": s["uar"], f"{part}_ci_low": s["ci"][0], f"{part}_ci_high": s["ci"][1]})
    row.update({
        "clients_sampled": stats.sampled,
        "clients_dropped": stats.dropped,
        "clients_aggregated": stats.aggregated,
        "clients_failed": len(stats.failed),
        "clients_rejected": len(stats.rejected),
        "num_examples": stats.num_examples,
        "train_loss": stats.train_metrics.get("train-loss", ""),
        "train_uar": stats.train_metrics.get("train-uar", ""),
        "bytes_up": stats.bytes_up,
        "bytes_down": stats.bytes_down,
        "client_seconds": round(stats.client_seconds, 3),
        "client_work_seconds": round(stats.client_work_seconds, 3),
        "seconds": round(flower_seconds, 3),
        "server_seconds": round(server_seconds, 3),
    })
    if privacy is not None:  # empty epsilon: noise multiplier 0, no guarantee
        row.update({"epsilon": "" if privacy["epsilon"] is None else privacy["epsilon"], "delta": privacy["delta"],
                    "clip_norm": privacy["clip_norm"]})
    return row


def slice_names(model: keras.Model, cfg: Config) -> dict[int, list[str]]:
    """Weight names trained in phase 1 (head) and phase 2 (head + top `unfrozen_layers` of the backbone)."""
    slices = {}
    for phase in (1, 2):
        set_phase(model, phase, cfg.training.unfrozen_layers)
        slices[phase] = trainable_weight_names(model)
    set_phase(model, 1)
    return slices


def _last_round(privacy: RunPrivacy | None, scheduled: int) -> int:
    """The scheduled rounds, or fewer when ``federated.dp.target_epsilon`` would be exceeded after more."""
    if privacy is None:
        return scheduled
    last = privacy.last_round(scheduled)
    if last == 0:
        raise DslFedError(
            f"federated.dp.target_epsilon: {privacy.dp.target_epsilon:g} is below the epsilon of a single round "
            f"({describe(privacy.epsilon(1), privacy.dp.delta)}); raise it or the noise multiplier"
        )
    if last < scheduled:
        LOG.info("%s privacy budget: %s after round %d; training stops there (%d rounds scheduled)", PROGRESS_MARK,
                 describe(privacy.epsilon(last), privacy.dp.delta), last, scheduled)
    return last


def _start(run: RunDirectory, cfg: Config) -> int:
    run.check_new()
    atomic_write(run.path / "config.yaml", cfg.to_yaml())
    return 0


def _resume(run: RunDirectory, cfg: Config, model: keras.Model) -> int:
    """Load the last complete round into `model`; returns its number (the rounds to skip)."""
    k = run.check_resume(cfg)
    model.load_weights(run.round_dir(k) / "model.keras")
    return k


def _clients_have_held_out_clips(manifest: Manifest) -> bool:
    """Whether any training speaker also has devel/test clips (what a client's `evaluate` scores)."""
    speakers = set(manifest.speakers("train"))
    return any(c.partition != "train" and c.speaker in speakers for c in manifest.clips)


def _wait_for_nodes(grid: Grid, expected: int, timeout: float) -> None:
    """Wait until every shard's node is connected, so round 1 samples (and sends the model to) all of them.

    Flower computes the sample size before it waits for `min_available_nodes`, so without this the first
    round of a simulation can start with only the nodes that happened to register already.
    """
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
    if connected > expected:
        raise DslFedError(
            f"{connected} SuperNodes are connected but the corpus gives {expected} training shards; "
            f"run the simulation with num-supernodes={expected}"
        )
    if connected < expected:
        LOG.warning("%s only %d of %d nodes connected after %.0f s; continuing", PROGRESS_MARK, connected, expected,
                    timeout)
