"""benchmarks/personalization.py: its table is computed from the run, and the README quotes the results file."""

from pathlib import Path

import numpy as np
import benchmark_module

REPO = Path(__file__).resolve().parents[1]
bench = benchmark_module.load("personalization")


def test_the_table_row_is_computed_from_the_run():
    from dsl_fed.personal_eval import SpeakerResult, summarize

    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    results = [SpeakerResult(f"s{i}", 4, labels, np.zeros(8, int), labels.copy()) for i in range(3)]
    summary = summarize(results, ["a", "b", "c", "d"], n_boot=50)
    run = {"name": "demo", "description": "demo corpus", "config": "configs/quickstart.yaml",
           "classes": ["a", "b", "c", "d"], "speakers": {"train": 5, "devel": 3, "test": 2}, "batch_size": 16,
           "seed": 0, "class_balance": "class_weight", "central_epochs": (1, 15),
           "rows": [{"partition": "devel", "k": 4, "epochs": 7, "skipped": ["s9"], "summary": summary,
                     "seconds_per_speaker": 0.5, "clips": 30}]}
    text = bench.render([run], {"command": "python benchmarks/personalization.py", "minutes": 1.0,
                                "load_start": 0.1, "load_end": 0.2})
    row = next(line for line in text.splitlines() if line.startswith("| demo | devel |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[:7] == ["demo", "devel", "3 (1 left out)", "4", "0.250", "4", "7"]
    assert cells[7].startswith("0.250 ") and cells[8].startswith("1.000 ") and cells[9].startswith("+0.750 ")
    assert cells[10] == "0.250 → 1.000 (1 speaker(s))"
    assert "speakers train / devel / test 5 / 3 / 2" in text and "(1 + 15 epochs" in text


def test_the_readme_quotes_the_results_file_exactly():
    results = (REPO / "benchmarks" / "results" / "personalization.md").read_text().splitlines()
    readme = (REPO / "README.md").read_text().splitlines()
    table = [line for line in results if line.startswith("| ")]
    assert len(table) >= 4  # header, rule and at least two rows
    start = readme.index(table[0])
    assert readme[start:start + len(table)] == table
