"""benchmarks/scale.py measures real runs: its quick plan on a fresh corpus, and the README quotes its results file."""

import dataclasses
from pathlib import Path

import pytest
import benchmark_module

REPO = Path(__file__).resolve().parents[1]
bench = benchmark_module.load("scale")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from dsl_fed.data.arousal import make_arousal_corpus

    return make_arousal_corpus(tmp_path_factory.mktemp("corpus"), speakers=12, clips=1, progress=False)


@pytest.mark.slow
def test_a_run_is_measured_from_its_process_tree_and_its_history(corpus, tmp_path):
    manifest = bench.sub_manifest(bench.read_rows(corpus), corpus, tmp_path / "n3.csv", 3, 2)
    r = bench.simulate_run("registered", manifest, 3, 2, tmp_path / "runs", "n3_k2",
                           ["federated.phase1_rounds=1", "federated.phase2_rounds=1"])
    assert 0 < r.peak_process_rss < r.peak_rss and r.processes >= 3 and r.wall > 0
    assert [int(row["phase"]) for row in r.rounds] == [1, 2]
    assert all(r.round_seconds(k) > r.flower_seconds(k) > 0 and r.round_bytes(k) > 0 for k in (1, 2))
    assert [int(row["clients_sampled"]) for row in r.rounds] == [2, 2]  # fraction_train gives K


def stand_in_runs(monkeypatch) -> list[tuple]:
    """Replace `simulate_run` (the test above) by results made from what each run is asked for; returns the list
    of (label, registered, per round, embedding_cache, data.shards, training speakers in its manifest)."""
    asked = []

    def simulate_run(label, manifest, registered, per_round, runs, name, extra):
        settings = dict(o.split("=", 1) for o in extra)
        phases = [1] * int(settings["federated.phase1_rounds"]) + [2] * int(settings["federated.phase2_rounds"])
        rows = bench.read_rows(manifest)
        asked.append((label, registered, per_round, settings.get("training.embedding_cache"),
                      settings.get("data.shards"), len({r["speaker"] for r in rows if r["partition"] == "train"})))
        cache_off = settings.get("training.embedding_cache") == "false"
        rounds = [{"phase": p, "clients_sampled": per_round, "seconds": registered + k * (1 + 9 * cache_off),
                   "server_seconds": 0.5, "bytes_up": 1000 * per_round, "bytes_down": 10} for k, p in enumerate(phases)]
        return bench.RunResult(label, registered, per_round, rounds, peak_rss=(100 + registered) * 2**20,
                               peak_process_rss=60 * 2**20, processes=4, wall=30.0)

    monkeypatch.setattr(bench, "simulate_run", simulate_run)
    return asked


def test_the_quick_plan_asks_for_every_run_and_the_report_is_computed_from_them(corpus, tmp_path, monkeypatch):
    """`measure` with stand-in runs: which runs, on which manifests, and a report and verdicts from their numbers."""
    asked = stand_in_runs(monkeypatch)
    plan = bench.QUICK
    results, info = bench.measure(plan, corpus, tmp_path, command="python benchmarks/scale.py --quick")
    assert sorted(asked, key=str) == [("cached", 2, 2, None, None, 2), ("model", 2, 2, "false", None, 2),
                                      ("registered", 3, 2, None, None, 3), ("registered", 6, 2, None, None, 6)]
    assert set(results) == {("registered", 3), ("registered", 6), ("cached", 2), ("model", True), ("model", False)}
    assert results[("model", True)] is results[("cached", 2)]  # the same configuration: not run twice
    assert info["train_speakers"] >= max(plan.registered)

    report = bench.render(plan, results, info)
    lines = report.splitlines()
    assert lines[0] == "# Scale: registered vs sampled clients"
    assert f"{len(info['rows'])} clips" in report and "classes high, low, mid (3)" in report
    assert f"load average (1/5/15 min) {bench._load(info['load_start'])} at start" in report
    assert "| 3 | 2 | 3.5 | 4.5 | 103 MiB |" in report and "| 6 | 2 | 6.5 | 7.5 | 106 MiB |" in report
    verdicts = [line for line in lines if line.startswith("- ") and ("**met**" in line or "**missed**" in line)]
    assert verdicts == [
        "- Peak RSS does not grow with registered clients (within 10 %): **met**: 103 MiB at 3 registered, "
        "106 MiB at 6 (+2.9%), 2 per round.",
        "- A cached phase-1 round of 2 sampled clients (tiny preset) <= 30 s: **met**: 3.5 s (round 2 of the same "
        "clients, scoring and publishing included).",
        "- Cached tiny (quick) phase-1 round >= 10x faster than uncached after the first round: **missed**: round 2 "
        "takes 3.0 s cached, 12.0 s without the cache (4.0x; 2 clients, Flower part of the round).",
    ]
    fig = bench.figure(plan, results)
    fig.savefig(tmp_path / "scale.png")
    assert (tmp_path / "scale.png").stat().st_size > 0


def test_model_rows_with_several_speakers_per_client_group_them_into_shards(corpus, tmp_path, monkeypatch):
    asked = stand_in_runs(monkeypatch)
    plan = dataclasses.replace(bench.QUICK, model_speakers=3)
    results, info = bench.measure(plan, corpus, tmp_path, command="python benchmarks/scale.py --quick")
    assert sorted(a for a in asked if a[0] == "model") == [("model", 2, 2, "false", "2", 6), ("model", 2, 2, "true", "2", 6)]
    assert results[("model", True)] is not results[("cached", 2)]  # another configuration: run on its own
    report = bench.render(plan, results, info)
    assert "| tiny (quick) | 2 | 2 | 9 | round 2, cached |" in report  # 3 speakers x 3 clips
    assert "rows group 3 training speakers into each client (`data.shards=2`)" in report


def test_the_readme_quotes_the_results_file_exactly():
    results = (REPO / "benchmarks" / "results" / "scale.md").read_text().splitlines()
    readme = (REPO / "README.md").read_text()
    start = next(i for i, line in enumerate(results) if line.startswith("| registered |"))
    table = results[start:results.index("", start)]
    verdicts = [line for line in results if line.startswith("- ") and ("**met**" in line or "**missed**" in line)]
    assert len(table) >= 9 and len(verdicts) == 3
    assert "\n".join(table) in readme
    assert "\n".join(verdicts) in readme
