"""Shared fixtures. TensorFlow is kept to the 2 cores CI has, and quiet."""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")


def tiny_settings(manifest, runs_dir, name: str) -> dict:
    """The raw settings behind `tiny_config` (shared with session fixtures, which cannot use it)."""
    return {
        "data": {"manifest": str(manifest), "chunk_seconds": 1.0, "hop_seconds": 0.25},
        "spectrogram": {"image_size": 32, "n_mels": 32},
        "model": {"backbone": "tiny", "weights": None, "units": 32, "dropout": 0.1},
        "training": {
            "optimizer": "adam",
            "learning_rate": 0.003,
            "phase2_lr_factor": 1.0,
            "batch_size": 16,
            "phase1_epochs": 1,
            "phase2_epochs": 15,
            "unfrozen_layers": 6,
        },
        "federated": {"phase1_rounds": 1, "phase2_rounds": 1, "min_train_nodes": 2, "min_available_nodes": 2},
        "output": {"directory": str(runs_dir), "name": name},
    }


@pytest.fixture
def tiny_config(demo_manifest, tmp_path):
    """A `Config` that trains the `tiny` backbone on the demo corpus in seconds (1 s chunks, 32x32 images).

    Phase 1 (1 epoch) barely moves: the tiny CNN's random frozen features are weak. Phase 2 unfreezes 6 of its
    7 layers (all its weights) at the full learning rate; on `demo_manifest` (329 train chunks with the 0.25 s
    hop) 15 epochs of batch 16 reach devel UAR 0.83-0.94 and test UAR ~0.94 over seeds 0-3, in ~6 s on 2 cores.
    Adam instead of the paper's AdaDelta: Keras' AdaDelta at lr 0.003 would need hundreds of epochs.
    Runs go to ``tmp_path/runs/tiny``. Override with ``cfg.replace(**{"training.phase2_epochs": "3"})``.
    """
    from dsl_fed.config import from_dict

    return from_dict(tiny_settings(demo_manifest, tmp_path / "runs", "tiny"))


@pytest.fixture(scope="session")
def demo_manifest(tmp_path_factory):
    """A small demo corpus shared by the whole session; returns the manifest path.

    8 speakers (4 train / 2 devel / 2 test), 3 classes (falling, flat, rising), 3 clips of 2-4 s per class
    per speaker = 72 clips, 16 kHz wav. Generated in about a second. Treat it as read-only.
    """
    from dsl_fed.data.demo import make_demo_corpus

    return make_demo_corpus(tmp_path_factory.mktemp("demo_corpus"), speakers=8, clips=3, seed=0, progress=False)


@pytest.fixture(scope="session")
def deployed_tiny(demo_manifest, tmp_path_factory):
    """A trained tiny model in a run folder plus its float32 TFLite export, shared by the deployment tests.

    Same settings as `tiny_config` (which is function-scoped, so it cannot feed a session fixture): phase 1
    for 1 epoch, phase 2 for 15 epochs (~5 s). Returns a namespace with ``cfg, classes, model, run_dir,
    model_path, config_path, train, test`` (chunk sets) and ``tflite`` (fp32 export with manifest.json).
    """
    from types import SimpleNamespace

    from dsl_fed.config import from_dict
    from dsl_fed.data.manifest import read_manifest
    from dsl_fed.data.pipeline import load_chunks
    from dsl_fed.export import export_tflite
    from dsl_fed.io import atomic_write
    from dsl_fed.models import build_model
    from dsl_fed.train import train_local

    run_dir = tmp_path_factory.mktemp("deploy_run")
    cfg = from_dict(tiny_settings(demo_manifest, run_dir.parent, run_dir.name))
    manifest = read_manifest(demo_manifest)
    train = load_chunks(manifest.partition("train"), cfg.data, manifest.classes, progress=False)
    test = load_chunks(manifest.partition("test"), cfg.data, manifest.classes, progress=False)
    model = build_model(cfg, len(manifest.classes))
    train_local(model, train, None, cfg, phase=1, verbose=0)
    train_local(model, train, None, cfg, phase=2, verbose=0)
    model_path = run_dir / "model.keras"
    model.save(model_path)
    config_path = atomic_write(run_dir / "config.yaml", cfg.to_yaml())
    tflite = export_tflite(model, run_dir / "tflite_fp32" / "model.tflite", classes=manifest.classes, cfg=cfg)
    return SimpleNamespace(cfg=cfg, classes=list(manifest.classes), manifest=manifest, model=model, run_dir=run_dir,
                           model_path=model_path, config_path=config_path, train=train, test=test, tflite=tflite)
