"""Config: YAML round trip, overrides, and one clear error per kind of mistake."""

from pathlib import Path

import pytest
import yaml

from dsl_fed.config import apply_overrides, from_dict, load_config
from dsl_fed.errors import DslFedError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, "data: {manifest: m.csv, chunk_seconds: 4.0}\ntraining: {unfrozen_layers: all}\n"))
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg
    assert again.hash() == cfg.hash()
    assert cfg.data.chunk_samples == 64000
    assert cfg.training.unfrozen_layers == "all"


def test_relative_manifest_resolves_against_yaml_folder(tmp_path):
    cfg = load_config(write(tmp_path, "data: {manifest: sub/m.csv}\n"))
    assert cfg.data.manifest == str((tmp_path / "sub/m.csv").resolve())


def test_paper_defaults():
    cfg = from_dict({"data": {"manifest": "x"}})
    assert (cfg.spectrogram.window_ms, cfg.spectrogram.hop_fraction, cfg.spectrogram.n_mels) == (32.0, 0.5, 128)
    assert (cfg.model.backbone, cfg.model.weights, cfg.training.optimizer) == ("densenet121", "imagenet", "adadelta")
    assert cfg.training.batch_size == 32
    assert cfg.training.phase2_learning_rate == pytest.approx(cfg.training.learning_rate / 10)


def test_overrides_parse_yaml_scalars(tmp_path):
    path = write(tmp_path, "data: {manifest: m.csv}\n")
    cfg = load_config(path, ["training.learning_rate=1e-2", "model.weights=None", "augment.cutmix=true",
                             "spectrogram.fmax=null", "output.name=exp1"])
    assert cfg.training.learning_rate == 0.01
    assert cfg.model.weights is None
    assert cfg.augment.cutmix is True and cfg.augment.enabled
    assert cfg.output.run_dir == Path("runs/exp1")


def test_replace_returns_validated_copy():
    cfg = from_dict({"data": {"manifest": "x"}})
    assert cfg.replace(**{"training.batch_size": "8"}).training.batch_size == 8
    with pytest.raises(DslFedError, match="training.batch_size"):
        cfg.replace(**{"training.batch_size": "0"})


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"data": {"manifest": "x", "chunk_second": 3}}, r"unknown config key data.chunk_second; did you mean data.chunk_seconds\?"),
        ({"data": {"manifest": "x"}, "trainng": {}}, r"unknown config key trainng; did you mean training\?"),
        ({"data": {"manifest": "x"}, "training": {"batch_size": "big"}}, r"training.batch_size: expected an integer, got 'big'"),
        ({"data": {"manifest": "x"}, "training": {"batch_size": 0}}, r"training.batch_size: must be in \[1, 4096\]"),
        ({"data": {"manifest": "x"}, "training": {"batch_size": 3.5}}, r"training.batch_size: expected an integer"),
        ({"data": {"manifest": "x"}, "augment": {"cutmix": "yes"}}, r"augment.cutmix: expected a boolean"),
        ({"data": {"manifest": "x"}, "training": {"unfrozen_layers": "most"}}, r"training.unfrozen_layers: expected an integer or 'all'"),
        ({"data": {"manifest": "x"}, "training": {"optimizer": "adamw"}}, r"training.optimizer: expected one of 'adadelta', 'adam', 'sgd'"),
        ({"data": {"manifest": "x"}, "spectrogram": {"colormap": "virdis"}}, r"spectrogram.colormap: .*did you mean 'viridis'\?"),
        ({"data": {"manifest": "x"}, "model": {"dropout": 1.0}}, r"model.dropout: must be in \[0, 1\)"),
        ({"data": {"manifest": "x"}, "augment": {"p_min": 0.5, "p_max": 0.2}}, r"augment.p_max: need 0 <= p_min <= p_max <= 1"),
        ({"data": {"manifest": "x"}, "federated": {"phase1_rounds": 0, "phase2_rounds": 0}}, r"federated.phase1_rounds"),
        ({"data": {"manifest": "x"}, "federated": {"strategy": "fedsgd"}}, r"federated.strategy: expected one of"),
        ({"data": {"manifest": "x"}, "model": "densenet"}, r"model: expected a mapping"),
        ({"data": {}}, r"data.manifest: is required"),
        ({"data": {"manifest": "x", "hop_seconds": 0.00001}}, r"data.hop_seconds: is shorter than one sample at 16000 Hz"),
        ({"data": {"manifest": "x"}, "spectrogram": {"fmax": 20000}}, r"spectrogram.fmax: must be at most data.sample_rate / 2 = 8000 Hz"),
        ({"data": {"manifest": "x"}, "federated": {"client_cpus": 0.5}}, r"federated.client_cpus: must be a whole number"),
        ({"data": {"manifest": "x"}, "spectrogram": {"top_db": 130}}, r"spectrogram.top_db: must be in \(0, 120\] dB"),
        ({"data": {"manifest": "x"}, "spectrogram": {"top_db": None}}, r"spectrogram.top_db: expected a number"),
        ({"data": {"manifest": "x"}, "federated": {"dp": {"clip_norm": -1}}}, r"^federated.dp.clip_norm: must be > 0, got -1.0$"),
        ({"data": {"manifest": "x"}, "federated": {"dp": {"delta": 1}}}, r"^federated.dp.delta: must be in \(0, 1\), got 1.0$"),
        ({"data": {"manifest": "x"}, "federated": {"dp": {"mode": "server"}, "strategy": "krum"}},
         r"^federated.dp.mode: 'server' works with federated.strategy fedavg, fedprox, fedadam, fedyogi, fedavgm .* not with krum$"),
        ({"data": {"manifest": "x"}, "federated": {"dp": {"target_epsilon": 3}}}, r"^federated.dp.target_epsilon: needs federated.dp.mode"),
        ({"data": {"manifest": "x"}, "federated": {"dp": {"mode": "client", "noise_multiplier": 0, "target_epsilon": 3}}},
         r"^federated.dp.target_epsilon: needs federated.dp.noise_multiplier > 0"),
        ({"data": {"manifest": "x"}, "federated": {"dp": {"mode": "local"}}}, r"^federated.dp.mode: expected one of 'none'"),
        ({"data": {"manifest": "x"}, "federated": {"dp": 3}}, r"^federated.dp: expected a mapping of keys, got int$"),
        ({"data": {"manifest": "x"}, "federated": {"trim_fraction": 0.5}}, r"^federated.trim_fraction: must be in \[0, 0.5\)"),
        # every number a user can type has bounds; combinations too
        ({"data": {"manifest": "x"}, "training": {"seed": -1}}, r"^training.seed: must be in \[0, 4294967295\], got -1$"),
        ({"data": {"manifest": "x"}, "training": {"seed": 2**32}}, r"^training.seed: must be in \[0, 4294967295\]"),
        ({"data": {"manifest": "x", "seed": -1}}, r"^data.seed: must be in \[0, 4294967295\], got -1$"),
        ({"data": {"manifest": "x"}, "federated": {"num_malicious": 10**30}}, r"^federated.num_malicious: must be in"),
        ({"data": {"manifest": "x"}, "federated": {"min_available_nodes": 10**9}}, r"^federated.min_available_nodes"),
        ({"data": {"manifest": "x"}, "training": {"unfrozen_layers": 10**30}}, r"^training.unfrozen_layers: must be in"),
        ({"data": {"manifest": "x", "chunk_seconds": 0.1}, "spectrogram": {"window_ms": 1000}},
         r"^spectrogram.window_ms: 1000 ms is 16000 samples at 16000 Hz, longer than a chunk \(data.chunk_seconds=0.1: "
         r"1600 samples\)$"),
        ({"data": {"manifest": "x", "chunk_seconds": 0.02}}, r"^spectrogram.window_ms: 32 ms is 512 samples .* longer than a chunk"),
        ({"data": {"manifest": "x", "sample_rate": 96000}, "spectrogram": {"window_ms": 100}},
         r"^spectrogram.window_ms: 100 ms is 9600 samples at 96000 Hz; at most 4096"),
        ({"data": {"manifest": "x", "chunk_seconds": 600, "hop_seconds": 600}, "spectrogram": {"hop_fraction": 0.001}},
         r"^spectrogram.hop_fraction: gives 9600001 STFT frames x 257 bins"),
        ({"data": {"manifest": "x", "classes": ["rising\u200b", "rising"]}}, r"^data.classes: class 'rising\\u200b' contains U\+200B"),
        ({"data": {"manifest": "x", "classes": ["Up", "up"]}}, r"^data.classes: has names that differ only in case"),
        ({"data": {"manifest": "x"}, "federated": {"dp": {"noise_multiplier": 1e300}}}, r"^federated.dp.noise_multiplier: must be at most"),
        ({"data": {"manifest": "x"}, "federated": {"dp": {"clip_norm": 1e30}}}, r"^federated.dp.clip_norm: must be at most 1e6"),
        ({"data": {"manifest": "x"}, "output": {"name": "run\u2028"}}, r"^output.name: 'run\\u2028' contains U\+2028 LINE SEPARATOR"),
        ({"data": {"manifest": "x"}, "federated": {"client_runtime": "tflite"}}, r"^federated.client_runtime: expected one of"),
        ({"data": {"manifest": "x"}, "federated": {"litert_clients": 1.5}}, r"^federated.litert_clients: must be in \[0, 1\], got 1.5$"),
        ({"data": {"manifest": "x"}, "federated": {"client_runtime": "litert", "litert_clients": 0.5}},
         r"^federated.litert_clients: a share of LiteRT nodes goes with client_runtime keras"),
        ({"data": {"manifest": "x"}, "federated": {"litert_clients": 0.5, "dp": {"mode": "server"}}},
         r"^federated.dp.mode: does not work with LiteRT clients yet"),
        ({"data": {"manifest": "x"}, "federated": {"client_runtime": "litert", "strategy": "fedprox"}},
         r"^federated.strategy: fedprox needs a proximal term"),
        ({"data": {"manifest": "x"}, "federated": {"litert_clients": 0.5}, "augment": {"cutmix": True}},
         r"^augment: LiteRT clients train the head on embeddings, where SapAugment cannot act"),
    ],
)
def test_validation_errors_name_the_key(raw, message):
    with pytest.raises(DslFedError, match=message):
        from_dict(raw)


def test_bad_override_syntax():
    with pytest.raises(DslFedError, match=r"expected section.key=value"):
        apply_overrides({}, ["batch_size=3"])
    with pytest.raises(DslFedError, match=r"unknown config key training.bach_size; did you mean training.batch_size\?"):
        apply_overrides({}, ["training.bach_size=3"])
    with pytest.raises(DslFedError, match=r"unknown config key federated.dp.nois_multiplier; did you mean federated.dp.noise_multiplier\?"):
        apply_overrides({}, ["federated.dp.nois_multiplier=1"])
    with pytest.raises(DslFedError, match=r"federated.strategy is a key, not a section"):
        apply_overrides({}, ["federated.strategy.x=1"])


def test_nested_overrides_set_the_dp_section():
    cfg = from_dict(apply_overrides({"data": {"manifest": "x"}, "federated": {"dp": {"delta": 1e-6}}},
                                    ["federated.dp.mode=client", "federated.dp.noise_multiplier=0.5"]))
    assert (cfg.federated.dp.mode, cfg.federated.dp.noise_multiplier, cfg.federated.dp.delta) == ("client", 0.5, 1e-6)
    assert cfg.federated.dp.enabled and not from_dict({"data": {"manifest": "x"}}).federated.dp.enabled


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(DslFedError, match=r"nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(DslFedError, match=r"c.yaml: not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(DslFedError, match=r"c.yaml: unknown config key data.manfest; did you mean data.manifest\?"):
        load_config(write(tmp_path, "data: {manfest: m.csv}\n"))


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    for section, values in yaml.safe_load(path.read_text()).items():  # every key written is the key in force
        for key, value in values.items():
            got = getattr(getattr(cfg, section), key)
            if key == "manifest":
                assert got == str((path.parent / value).resolve()), path.name
            else:
                assert got == (float(value) if isinstance(got, float) else value), f"{path.name}: {section}.{key}"
    header = path.read_text().splitlines()[0]
    assert header.startswith("#"), "each shipped config starts with a comment saying what it is for"
    assert "dsl_fed" in path.read_text().split("\n\n")[0], "the header names the command that runs it"


@pytest.mark.parametrize("share, litert", [(0.0, []), (0.5, [1, 3, 5]), (0.25, [3]), (1.0, [0, 1, 2, 3, 4, 5])])
def test_litert_nodes_are_spread_over_partition_ids(share, litert):
    cfg = from_dict({"data": {"manifest": "x"}, "federated": {"litert_clients": share}})
    assert [p for p in range(6) if cfg.federated.runtime_of(p) == "litert"] == litert
    every = from_dict({"data": {"manifest": "x"}, "federated": {"client_runtime": "litert"}})
    assert {every.federated.runtime_of(p) for p in range(6)} == {"litert"}
