"""benchmarks/on_device.py measures real things: the tiny preset's trainable file, timings and round processes.

The benchmark's own measuring function on the tiny model (one local epoch, 3 timed calls), then its report.
"""

import math
from pathlib import Path

import pytest
import benchmark_module

REPO = Path(__file__).resolve().parents[1]
bench = benchmark_module.load("on_device")


@pytest.mark.slow
def test_the_tiny_presets_budget_is_measured_from_real_files_and_processes(demo_manifest, tmp_path):
    cfg = bench.preset_config("tiny", demo_manifest, ["federated.local_epochs=1"])
    result = bench.measure_preset("tiny", cfg, tmp_path / "tiny", threads=1, repeats=3, batches=(8, 32))

    path = Path(result["tflite"])
    assert path == tmp_path / "tiny" / "tflite_trainable" / "model.tflite"
    assert result["tflite_bytes"] == path.stat().st_size > 0
    assert (result["image_size"], result["classes"], result["threads"], result["repeats"]) == (64, 3, 1, 3)
    assert result["embed_ms"] > 0 and sorted(result["train_ms"]) == [8, 32]
    assert all(ms > 0 for ms in result["train_ms"].values())
    litert, keras = result["rounds"]["LiteRT"], result["rounds"]["Keras"]
    for process in (litert, keras):
        assert process["peak_rss_bytes"] > 0 and process["seconds"] > 0 and math.isfinite(process["train_loss"])
    assert litert["num_examples"] == keras["num_examples"] > 0  # the same clips
    assert litert["frameworks"] == [] and {"tensorflow", "keras"} <= set(keras["frameworks"])
    assert keras["peak_rss_bytes"] > litert["peak_rss_bytes"]  # TensorFlow alone outweighs LiteRT

    imports = bench.import_rss()
    assert set(imports) == {"LiteRT", "Keras"} and all(peak > 0 for peak in imports.values())
    run = {"command": "python benchmarks/on_device.py --presets tiny", "threads": 1, "repeats": 3, "load_start": 0.5,
           "load_end": 0.7, "minutes": 0.3, "imports": imports}
    lines = bench.render([result], run).splitlines()
    assert lines[0].startswith("# On-device budget")
    assert "medians of 3 calls" in lines[2] and "1 thread(s)" in lines[2] and "load average 0.50 at start" in lines[2]
    row = next(line for line in lines if line.startswith("| tiny | tiny |"))
    assert f"| {result['tflite_bytes'] / 1e6:.2f} MB |" in row and "64×64 px" in row
    assert f"| {result['train_ms'][32]:.2f} |" in row
    rounds = [line for line in lines if line.startswith("| tiny | LiteRT |") or line.startswith("| tiny | Keras |")]
    assert len(rounds) == 2 and "none of tensorflow" in rounds[0] and "tensorflow" in rounds[1].split("|")[4]


def test_the_readme_quotes_the_results_file_exactly():
    results = (REPO / "benchmarks" / "results" / "on_device.md").read_text().splitlines()
    readme = (REPO / "README.md").read_text().splitlines()
    quoted = 0
    for preset in bench.PRESETS:
        costs = next(line.split("|")[1:-1] for line in results if line.startswith(f"| {preset} | "))
        rss = {cells[2].strip(): cells[5].strip() for cells in (line.split("|") for line in results)
               if len(cells) > 5 and cells[1].strip() == preset and cells[2].strip() in ("LiteRT", "Keras")}
        figures = [cell.strip() for cell in costs[6:]] + [rss["LiteRT"], rss["Keras"]]
        row = next(line for line in readme if line.lower().startswith(f"| {preset} ("))
        assert [cell.strip() for cell in row.split("|")[2:-1]] == figures, preset
        quoted += 1
    assert quoted == len(bench.PRESETS)
