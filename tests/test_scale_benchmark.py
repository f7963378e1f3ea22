"""benchmarks/scale.py measures real runs: its quick plan on a fresh corpus, and the README quotes its results file."""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("scale_benchmark", REPO / "benchmarks" / "scale.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["scale_benchmark"] = bench
_spec.loader.exec_module(bench)


@pytest.mark.slow
def test_the_quick_plan_runs_every_simulation_and_the_report_is_computed_from_them(tmp_path):
    plan = bench.QUICK
    results, info = bench.measure(plan, None, tmp_path, command="python benchmarks/scale.py --quick")

    expected = {("registered", n) for n in plan.registered} | {("cached", 2)} | \
        {("model", True), ("model", False)}
    assert set(results) == expected
    for key, r in results.items():
        assert 0 < r.peak_process_rss < r.peak_rss and r.processes >= 3 and r.wall > 0, key
        assert len(r.rounds) == 2 and all(r.round_seconds(k) > 0 and r.round_bytes(k) > 0 for k in (1, 2)), key
        assert [int(row["clients_sampled"]) for row in r.rounds] == [r.per_round] * 2, key  # fraction_train gives K
    assert [int(row["phase"]) for row in results[("registered", 6)].rounds] == [1, 2]
    assert [int(row["phase"]) for row in results[("model", True)].rounds] == [1, 1]
    assert [int(row["phase"]) for row in results[("cached", 2)].rounds] == [1, 1]
    assert len(info["rows"]) > 0 and info["train_speakers"] >= max(plan.registered)

    report = bench.render(plan, results, info)
    lines = report.splitlines()
    assert lines[0] == "# Scale: registered vs sampled clients"
    assert f"{len(info['rows'])} clips" in report and "classes high, low, mid (3)" in report
    assert f"load average (1/5/15 min) {bench._load(info['load_start'])} at start" in report
    for key in [("registered", 3), ("registered", 6)]:
        r = results[key]
        row = f"| {r.registered} | {r.per_round} | {r.round_seconds(1):.1f} | {r.round_seconds(2):.1f} | {bench.mib(r.peak_rss)} |"
        assert any(line.startswith(row) for line in lines), row
    verdicts = [line for line in lines if line.startswith("- ") and ("**met**" in line or "**missed**" in line)]
    assert len(verdicts) == 3
    small, large = results[("registered", 3)], results[("registered", 6)]
    assert f"{bench.mib(small.peak_rss)} at 3 registered, {bench.mib(large.peak_rss)} at 6" in verdicts[0]
    assert f"{results[('cached', 2)].round_seconds(2):.1f} s" in verdicts[1]
    fig = bench.figure(plan, results)
    fig.savefig(tmp_path / "scale.png")
    assert (tmp_path / "scale.png").stat().st_size > 0


def test_the_readme_quotes_the_results_file_exactly():
    results = (REPO / "benchmarks" / "results" / "scale.md").read_text().splitlines()
    readme = (REPO / "README.md").read_text()
    start = next(i for i, line in enumerate(results) if line.startswith("| registered |"))
    table = results[start:results.index("", start)]
    verdicts = [line for line in results if line.startswith("- ") and ("**met**" in line or "**missed**" in line)]
    assert len(table) >= 9 and len(verdicts) == 3
    assert "\n".join(table) in readme
    assert "\n".join(verdicts) in readme
