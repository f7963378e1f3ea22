"""Flower ServerApp: the paper's two-phase recipe as federated rounds, one checkpoint + TFLite per round.

The server builds the same model as every client from the run config, sends the full initial weights once
per node, then only the phase's trainable slice (`dsl_fed.federated.strategy`). After each round it merges the
aggregated slice into its full model, scores it on devel (and test, if ``federated.evaluate_test``), and
publishes ``runs/<name>/round_<k>/`` (`dsl_fed.federated.checkpoint`); ``best`` points to the round with the
best devel UAR among the rounds scored on the full devel set (`best_round`), ``latest`` to the last one.
``resume`` continues from ``latest``.

The server needs no audio. With a ``server-eval-manifest`` it scores that manifest's devel (and test) clips
itself (95 % CI over speakers); otherwise the nodes score the global model on their own held-out clips and
return confusion counts, which the server sums into the exact clip-level UAR (`FederatedEvaluation`; 95 % CI
over nodes, the only clusters it can see). The class list is
``data.classes`` or the server manifest's train labels, and travels to the nodes with every message.

A run fails (the ServerApp raises, so ``dsl_fed simulate`` / ``deploy local`` exit non-zero with the reason)
when every client failed its first round, and, unless ``federated.allow_missing_clients``, when a node that
was asked to train never contributed an update.
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
import numpy as np  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import Result  # noqa: E402

from dsl_fed.availability import read_trace  # noqa: E402
from dsl_fed.bootstrap import ci_text  # noqa: E402
from dsl_fed.config import Config  # noqa: E402
from dsl_fed.data import ChunkSet, Manifest, load_chunks, read_manifest  # noqa: E402
from dsl_fed.errors import DslFedError, first_line  # noqa: E402
from dsl_fed.export import export_tflite  # noqa: E402
from dsl_fed.io import atomic_write  # noqa: E402
from dsl_fed.metrics import confusion_metrics, evaluate_chunks  # noqa: E402
from dsl_fed.models import build_model, get_weights_by_name, set_phase, set_weights_by_name  # noqa: E402
from dsl_fed.models import trainable_weight_names, weight_names  # noqa: E402
from dsl_fed.privacy import RunPrivacy, describe, privacy_unit  # noqa: E402
from dsl_fed.report import plot_rounds  # noqa: E402
from dsl_fed.federated.checkpoint import PLOT, RunDirectory, best_round, devel_support, full_devel_support  # noqa: E402
from dsl_fed.federated.prompt_grid import PromptGrid  # noqa: E402
from dsl_fed.federated.run_config import PROGRESS_MARK, config_from_run_config, resume_requested  # noqa: E402
from dsl_fed.federated.run_config import server_eval_manifest  # noqa: E402
from dsl_fed.federated.strategy import LOG, PhaseSchedule, RoundStats, SliceAggregation, make_strategy  # noqa: E402
from dsl_fed.federated.trainable_source import TrainableSource  # noqa: E402

def create_app(app_dir: Path | None = None) -> ServerApp:
    """The ServerApp; `app_dir` is the app bundle a relative ``config`` in the run config is looked up in."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        """Entry point Flower calls; every failure is logged as one marked line (the reason `dsl_fed simulate`
        and `deploy local` print last) before the run fails."""
        try:
            run_server(PromptGrid(grid), context.run_config, app_dir=app_dir)  # replies within 0.1 s, not 3 s
        except DslFedError as exc:
            LOG.error("%s error: %s", PROGRESS_MARK, exc)
            raise
        except Exception as exc:  # a bug or a damaged run folder: the terminal still learns why
            LOG.error("%s error: the ServerApp failed: %s: %s", PROGRESS_MARK, type(exc).__name__, first_line(exc))
            raise

    return app


app = create_app()


def run_server(grid: Grid, run_config: Mapping[str, Any], node_timeout: float = 120.0,
               app_dir: Path | None = None) -> Result | None:
    """Run (or resume) the whole federated training on `grid`; returns Flower's `Result` (None if nothing to do).

    `node_timeout`: seconds the run waits for ``min_available_nodes`` connected nodes, at the start and again
    before each round's sampling (then it goes on with fewer, down to ``min_train_nodes``).
    """
    cfg = config_from_run_config(run_config, app_dir)
    resume = resume_requested(run_config)
    eval_manifest = server_eval_manifest(run_config)
    held_out = (read_manifest(eval_manifest, seed=cfg.data.seed, allow_speaker_overlap=cfg.data.allow_speaker_overlap,
                              classes=cfg.data.classes or None) if eval_manifest else None)
    classes = list(cfg.data.classes) or (held_out.classes if held_out else [])
    if not classes:
        raise DslFedError("the run has no class list: set data.classes (the nodes' labels are theirs alone) or give "
                          "the server a held-out set with the run config key server-eval-manifest")
    fed = cfg.federated
    if held_out is not None:
        fed = dataclasses.replace(fed, fraction_evaluate=0.0)  # the server scores the model itself
    elif fed.fraction_evaluate == 0:
        raise DslFedError("federated.fraction_evaluate=0 and no server-eval-manifest: nothing would score the model")
    elif fed.fraction_evaluate < 1:
        LOG.warning("%s federated.fraction_evaluate=%g: each round is scored on a sample of the nodes, so only the "
                    "rounds whose sample holds the most devel clips can be best", PROGRESS_MARK, fed.fraction_evaluate)
    schedule = PhaseSchedule.from_config(fed)
    availability = read_trace(fed.availability) if fed.availability else None  # before any round: a bad row stops here
    run = RunDirectory(cfg.output.run_dir)
    for warning in held_out.warnings if held_out is not None else []:
        LOG.warning("%s warning: %s", PROGRESS_MARK, warning)

    keras.backend.clear_session()
    model = build_model(cfg, len(classes))
    offset = _resume(run, cfg, model) if resume else _start(run, cfg)
    if offset >= schedule.num_rounds:
        LOG.info("%s %s already has all %d rounds; nothing to resume", PROGRESS_MARK, run.path, schedule.num_rounds)
        return None
    nodes = _wait_for_nodes(grid, fed.min_available_nodes, node_timeout)
    privacy = RunPrivacy.of(cfg.federated, nodes, privacy_unit(cfg)) if cfg.federated.dp.enabled else None
    last_round = _last_round(privacy, schedule.num_rounds)
    if offset >= last_round:
        LOG.info("%s %s already has all %d rounds its privacy budget allows", PROGRESS_MARK, run.path, last_round)
        return None
    slices = slice_names(model, cfg)
    strategy = make_strategy(fed, get_weights_by_name(model, weight_names(model)), slices,
                             num_nodes=nodes, round_offset=offset, seed=cfg.training.seed,
                             client_dropout=cfg.robustness.client_dropout, node_wait=node_timeout,
                             trainable=TrainableSource(model, cfg, classes, slices[1]), availability=availability)
    if resume:
        strategy.load_state_arrays(run.strategy_state(offset))
    federated = None if held_out else FederatedEvaluation(len(classes))
    if federated:
        strategy.evaluate_metrics_aggr_fn = federated
    evaluate_fn = RoundPublisher(cfg, classes, model, strategy, run, privacy=privacy, held_out=held_out,
                                 federated=federated)
    LOG.info(
        "%s %s rounds %d-%d (phase 1: %d, phase 2: %d), %s, %d nodes, %s evaluation -> %s",
        PROGRESS_MARK, "resuming" if offset else "federated training:", offset + 1, schedule.num_rounds,
        schedule.phase1_rounds, schedule.phase2_rounds, cfg.federated.strategy, nodes,
        "server" if held_out else "federated", run.path,
    )
    config = {"classes": classes, "evaluate-test": fed.evaluate_test}
    result = strategy.start(
        grid=grid,
        initial_arrays=strategy.full_record(),
        num_rounds=last_round - offset,
        train_config=ConfigRecord(config),
        evaluate_config=ConfigRecord(config),
        evaluate_fn=evaluate_fn,
    )
    missing = never_contributed(strategy)
    if missing:
        text = f"{len(missing)} node(s) never contributed an update: {'; '.join(missing)}"
        if not cfg.federated.allow_missing_clients:
            raise DslFedError(f"{text} (set federated.allow_missing_clients=true to accept such a run)")
        LOG.warning("%s %s", PROGRESS_MARK, text)
    return result


class FederatedEvaluation:
    """`evaluate_metrics_aggr_fn` of the strategy: the nodes' confusion counts per partition.

    UARs of nodes must not be averaged (each node's mix of classes differs); summed counts give exactly the
    confusion matrix of all their clips together. The counts are kept per node too: the node-level bootstrap
    interval resamples them. `take` hands the last replies' counts to the round's publisher.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self._replies: list[dict[str, np.ndarray]] = []

    def __call__(self, records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
        self._replies = [node_confusions(next(iter(r.metric_records.values())), self.num_classes) for r in records]
        return MetricRecord({f"{part}-confusion": [int(c) for c in counts.reshape(-1)]
                             for part, counts in _summed(self._replies).items()})

    def take(self) -> list[dict[str, np.ndarray]]:
        """``{part: (K, K) counts}`` of each reply of the last aggregation, in reply order (then cleared)."""
        replies, self._replies = self._replies, []
        return replies


def node_confusions(record: Mapping[str, Any], num_classes: int) -> dict[str, np.ndarray]:
    """One node's ``<part>-confusion`` lists as ``{part: (K, K) counts}``.

    A malformed list (wrong length, negative or fractional counts) is left out with a warning.
    """
    out = {}
    for key, value in record.items():
        if not key.endswith("-confusion"):
            continue
        counts = np.asarray(value, dtype=np.float64).reshape(-1)
        if counts.size != num_classes ** 2 or not np.all((counts >= 0) & (counts == np.round(counts))):
            LOG.warning("%s left out a node's %s: expected %d whole counts >= 0", PROGRESS_MARK, key, num_classes ** 2)
            continue
        out[key.removesuffix("-confusion")] = counts.astype(np.int64).reshape(num_classes, num_classes)
    return out


def sum_confusions(metrics: list[Mapping[str, Any]], num_classes: int) -> dict[str, np.ndarray]:
    """Sum ``<part>-confusion`` lists over nodes into ``{part: (K, K) counts}`` (parts with no clip dropped)."""
    return _summed([node_confusions(record, num_classes) for record in metrics])


def _summed(replies: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    sums: dict[str, np.ndarray] = {}
    for reply in replies:
        for part, counts in reply.items():
            sums[part] = sums.get(part, 0) + counts
    return {part: counts for part, counts in sums.items() if counts.sum() > 0}


def never_contributed(strategy: SliceAggregation, up_to: int | None = None) -> list[str]:
    """Nodes asked to train at least once (in rounds up to `up_to`) whose update was never aggregated, with their
    last failure."""
    asked, contributed, reasons = set(), set(), {}
    for stats in (s for s in strategy.rounds.values() if up_to is None or s.round <= up_to):
        asked.update(stats.nodes)
        contributed.update(stats.contributors)
        for line in stats.failed + stats.rejected:  # "node <id>...: <reason>"
            reasons[int(line.split()[1].rstrip(":"))] = line
    return [reasons.get(node, f"node {node}: no valid reply") for node in sorted(asked - contributed)]


class RoundPublisher:
    """`evaluate_fn` of `SliceAggregation.start`: score the merged global model and publish the round's outputs.

    The strategy calls it once the round's federated evaluation is in, so `federated` already holds the nodes'
    sums; the nodes may be training the next round already.
    """

    def __init__(self, cfg: Config, classes: list[str], model: keras.Model, strategy: SliceAggregation,
                 run: RunDirectory, privacy: RunPrivacy | None = None, held_out: Manifest | None = None,
                 federated: FederatedEvaluation | None = None) -> None:
        self.cfg = cfg
        self.privacy = privacy
        self.classes = classes
        self.warnings = held_out.warnings if held_out is not None else []  # repeated in every round manifest
        self.model = model
        self.strategy = strategy
        self.run = run
        self.federated = federated
        self.sets: dict[str, ChunkSet] = {}
        if held_out is not None:
            parts = ("devel", "test") if cfg.federated.evaluate_test else ("devel",)
            self.sets = {part: load_chunks(held_out.partition(part, required=True), cfg.data, classes, progress=False)
                         for part in parts}
        self._last = time.perf_counter()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None  # the initial model: nothing trained yet, nothing to publish
        start = time.perf_counter()
        flower_seconds = start - self._last  # messages out, local training, replies in, client evaluation
        rnd = server_round + self.strategy.round_offset
        stats = self.strategy.rounds[rnd]
        state = self.strategy.state_after[rnd]  # the server's state after round rnd (the next may be under way)
        if server_round == 1 and not stats.updated and stats.failed and not stats.contributors:
            raise DslFedError(f"every client failed round {rnd}, so nothing was trained: {stats.failed[0]}")
        set_weights_by_name(self.model, {name: array.numpy() for name, array in arrays.items()})
        scores, evaluation = self._score(stats)
        best = self._select_best(rnd, scores, evaluation)
        extra = {
            "round": rnd,
            "phase": stats.phase,
            "num_rounds": self.strategy.schedule.num_rounds,
            "strategy": self.cfg.federated.strategy,
            "transfer_dtype": self.cfg.federated.transfer_dtype,
            "warnings": self.warnings,
            "evaluation": evaluation,
            **scores,
            "best_round": best,
            "clients": stats.published(dp=self.privacy is not None),
            "never_contributed": never_contributed(self.strategy, rnd),  # round rnd + 1 may be under way
            "bytes_up": stats.bytes_up,
            "bytes_down": stats.bytes_down,
            "seconds": flower_seconds,
        }
        if self.privacy is not None:
            extra["privacy"] = self.privacy.report(int(state["dp/releases"]), stats.clip_norm)
            extra["privacy"]["last_round"] = self.privacy.last_round(self.strategy.schedule.num_rounds)
        self.run.write_round(rnd, lambda folder: self._write_model(folder, extra), state)
        if best is not None and best != self.run.best_round():
            self.run.point_best(best)
        server_seconds = time.perf_counter() - start
        rows = self.run.append_history(_history_row(stats, scores, flower_seconds, server_seconds, extra.get("privacy")))
        plot_rounds(rows, self.run.path / PLOT)
        self._last = time.perf_counter()
        LOG.info("%s %s", PROGRESS_MARK,
                 progress_line(stats, scores, self.strategy.schedule.num_rounds, self._last - start + flower_seconds,
                               extra.get("privacy"), evaluation))
        return MetricRecord({f"{part}-{key}": float(value) for part, s in scores.items()
                             for key, value in (("uar", s["uar"]), ("ci-low", s["ci"][0]), ("ci-high", s["ci"][1]),
                                                ("ci-clips-low", s["ci_clips"][0]), ("ci-clips-high", s["ci_clips"][1]))})

    def _score(self, stats: RoundStats) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """Scores per partition, and how they were obtained (for the round manifest): with federated evaluation
        which nodes scored devel clips (`stats.evaluated` lists the replies in the order `federated` got them)."""
        seed = self.cfg.training.seed
        if self.federated is None:
            scores = {part: evaluate_chunks(self.model, chunks, self.classes, batch_size=self.cfg.training.batch_size,
                                            seed=seed) for part, chunks in self.sets.items()}
            return scores, {"kind": "server", "parts": list(scores)}
        replies = self.federated.take()
        nodes = stats.evaluated
        if len(nodes) != len(replies):  # the strategy records every reply it aggregates, so this means a bug
            LOG.warning("%s %d evaluation replies but %d node ids; the nodes are not named", PROGRESS_MARK,
                        len(replies), len(nodes))
            nodes = [None] * len(replies)
        scores = {}
        for part in ("devel", "test"):
            counts = [reply[part] for reply in replies if part in reply and reply[part].sum() > 0]
            if counts:
                scores[part] = confusion_metrics(np.stack(counts), self.classes, seed=seed)
        if "devel" not in scores:
            LOG.warning("%s no node returned devel scores this round (no node holds devel clips, or all failed)",
                        PROGRESS_MARK)
        devel_nodes = [node for node, reply in zip(nodes, replies) if "devel" in reply and reply["devel"].sum() > 0]
        return scores, {"kind": "federated", "nodes": len(replies), "parts": list(scores), "devel_nodes": devel_nodes}

    def _select_best(self, rnd: int, scores: Mapping[str, Mapping[str, Any]], evaluation: dict[str, Any]) -> int | None:
        """The best round once round `rnd` counts (`best_round`); notes in `evaluation` whether `rnd` is eligible."""
        row = {"round": rnd, **_selection_fields(scores)}
        rows = [r for r in self.run.read_history() if int(r["round"]) < rnd] + [row]
        if "devel" in scores:
            full = full_devel_support(rows)
            evaluation["devel_clips"] = scores["devel"]["num_clips"]
            evaluation["devel_support"] = [int(n) for n in devel_support(row).split()]
            evaluation["best_eligible"] = devel_support(row) == full
            if not evaluation["best_eligible"]:
                evaluation["best_note"] = (f"not eligible for best: scored on {scores['devel']['num_clips']} devel "
                                           f"clips, the run's full devel set has {sum(int(n) for n in full.split())}")
        else:
            evaluation["best_eligible"] = False
        return best_round(rows)

    def _write_model(self, folder: Path, extra: dict[str, Any]) -> None:
        self.model.save(folder / "model.keras")
        export_tflite(self.model, folder / "model.tflite", classes=self.classes, cfg=self.cfg, extra=extra)


def progress_line(stats: RoundStats, scores: Mapping[str, Mapping[str, Any]], num_rounds: int, seconds: float,
                  privacy: Mapping[str, Any] | None = None, evaluation: Mapping[str, Any] | None = None) -> str:
    """One human line per round (``dsl_fed simulate`` prints exactly these)."""
    parts = [f"round {stats.round}/{num_rounds} phase {stats.phase}"]
    for part, s in scores.items():
        parts.append(f"{part} UAR {s['uar']:.3f}, {ci_text(s, clips=False)}")
    if evaluation and "best_note" in evaluation:
        parts.append(evaluation["best_note"])
    clients = f"clients {stats.aggregated}/{stats.sampled}"
    if stats.online is not None:
        clients += f" of {stats.online} online"
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
        row.update({f"{part}_uar": s["uar"], f"{part}_ci_low": s["ci"][0], f"{part}_ci_high": s["ci"][1],
                    f"{part}_ci_level": s.get("ci_level", "clips"), f"{part}_ci_clips_low": s["ci_clips"][0],
                    f"{part}_ci_clips_high": s["ci_clips"][1], f"{part}_clips": s["num_clips"]})
    row.update(_selection_fields(scores))
    if stats.online is not None:  # federated.availability
        row["clients_online"] = stats.online
    row.update({
        "clients_sampled": stats.sampled,
        "clients_dropped": stats.dropped,
        "clients_aggregated": stats.aggregated,
        "clients_failed": len(stats.failed),
        "clients_rejected": len(stats.rejected),
    })
    if privacy is None:  # under DP the clients' un-noised statistics are not published
        row.update({
            "num_examples": stats.num_examples,
            "train_loss": stats.train_metrics.get("train-loss", ""),
            "train_uar": stats.train_metrics.get("train-uar", ""),
        })
    row.update({"bytes_up": stats.bytes_up, "bytes_down": stats.bytes_down})
    if privacy is None:
        row.update({"client_seconds": round(stats.client_seconds, 3),
                    "client_work_seconds": round(stats.client_work_seconds, 3)})
    row.update({"seconds": round(flower_seconds, 3), "server_seconds": round(server_seconds, 3)})
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


def _selection_fields(scores: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """What `best_round` reads from a round's ``history.csv`` row: devel UAR and devel clips per class."""
    if "devel" not in scores:
        return {}
    return {"devel_uar": scores["devel"]["uar"],
            "devel_support": " ".join(str(sum(row)) for row in scores["devel"]["confusion"])}


def _wait_for_nodes(grid: Grid, minimum: int, timeout: float, settle: float = 2.0) -> int:
    """Wait for `minimum` connected nodes, then until no new node has appeared for `settle` seconds.

    Flower computes round 1's sample before it waits for `min_available_nodes`, so without this the first
    round could start with only the nodes that happened to register first (and send them alone the model).
    """
    deadline = time.monotonic() + timeout
    seen, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        connected = len(list(grid.get_node_ids()))
        if connected != seen:
            seen, since = connected, time.monotonic()
        if connected >= minimum and time.monotonic() - since >= settle:
            return connected
        time.sleep(0.5)
    LOG.warning("%s only %d node(s) connected after %.0f s (min_available_nodes=%d); continuing", PROGRESS_MARK,
                seen, timeout, minimum)
    return seen
