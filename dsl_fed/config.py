"""Typed, frozen configuration loaded from YAML and validated once.

Every other module receives a `Config` and trusts it: all checks live here, and every error names the
key (``section.key``) and, for a typo, the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dsl_fed.errors import DslFedError
from dsl_fed.text import check_visible, spelling_key

COLORMAPS = ("viridis", "magma", "plasma", "inferno", "cividis", "gray")
# `dsl_fed.backbones` registers exactly these (it imports Keras, so the config cannot ask it without TensorFlow)
BACKBONE_NAMES = ("densenet121", "densenet169", "densenet201", "mobilenet_v2", "mobilenet_v3_small",
                  "mobilenet_v3_large", "efficientnet_b0", "resnet50", "tiny")
MAX_SECONDS = 600.0  # longest chunk/hop: beyond this a chunk no longer fits a spectrogram image (or memory)
MAX_COUNT = 100_000  # epochs, rounds, shards: larger is a typo, not a plan
MAX_TOP_DB = 120.0  # float32 DFT rounding noise sits about 150 dB below a chunk's peak; the floor stays 30 dB above
MAX_SEED = 2**32 - 1  # NumPy's and Keras' global seeds take [0, 2^32 - 1]
MAX_FFT = 4096  # STFT window in samples: the DFT kernel grows with its square (4096: 67 MB; 16000 would be 1 GB)
MAX_STFT_VALUES = 2**24  # frames x frequency bins of one chunk (64 MB of float32); the default is 188 x 257


@dataclass(frozen=True)
class DataConfig:
    """Where the audio is and how it is cut into fixed-length chunks."""

    manifest: str = ""  # CSV manifest or a folder-per-class directory; relative paths resolve against the YAML file
    sample_rate: int = 16000
    chunk_seconds: float = 3.0
    hop_seconds: float = 1.5  # the paper does not give the chunk hop; 50 % overlap is our default
    shards: int = 0  # federated partitioning: 0 = one shard per training speaker, N = N groups of speakers
    seed: int = 0
    allow_speaker_overlap: bool = False  # a speaker in train and devel/test breaks speaker independence: opt in
    classes: tuple[str, ...] = ()  # class list of a federated run whose server sees no labels; () = from a manifest
    clip_level_privacy: bool = False  # federated.dp on a corpus without speaker ids: accept epsilon per clip, not speaker

    def _validate(self) -> None:
        _require(self.manifest != "", "data.manifest", "is required (a manifest CSV or a folder-per-class directory)")
        _require(8000 <= self.sample_rate <= 96000, "data.sample_rate", f"must be in [8000, 96000], got {self.sample_rate}")
        _require(0 < self.chunk_seconds <= MAX_SECONDS, "data.chunk_seconds",
                 f"must be in (0, {MAX_SECONDS}], got {self.chunk_seconds}")
        _require(0 < self.hop_seconds <= MAX_SECONDS, "data.hop_seconds", f"must be in (0, {MAX_SECONDS}], got {self.hop_seconds}")
        _require(0 <= self.shards <= MAX_COUNT, "data.shards", f"must be in [0, {MAX_COUNT}], got {self.shards}")
        _require(self.chunk_samples >= 1, "data.chunk_seconds", f"is shorter than one sample at {self.sample_rate} Hz")
        _require(self.hop_samples >= 1, "data.hop_seconds", f"is shorter than one sample at {self.sample_rate} Hz")
        _require(len(self.classes) != 1, "data.classes", "needs at least two classes (or none: take them from a manifest)")
        _require(len(set(self.classes)) == len(self.classes) and all(c.strip() for c in self.classes), "data.classes",
                 f"must be distinct non-empty names, got {list(self.classes)}")
        for name in self.classes:
            check_visible(name, "data.classes: class")
        spellings = [spelling_key(c) for c in self.classes]
        _require(len(set(spellings)) == len(spellings), "data.classes",
                 f"has names that differ only in case or Unicode form, got {list(self.classes)}")
        _require(0 <= self.seed <= MAX_SEED, "data.seed", f"must be in [0, {MAX_SEED}], got {self.seed}")

    @property
    def chunk_samples(self) -> int:
        return int(round(self.chunk_seconds * self.sample_rate))

    @property
    def hop_samples(self) -> int:
        return int(round(self.hop_seconds * self.sample_rate))


@dataclass(frozen=True)
class SpectrogramConfig:
    """The paper's spectrogram-image recipe; see `dsl_fed.spectrogram.SpectrogramImage`."""

    window_ms: float = 32.0
    hop_fraction: float = 0.5
    n_mels: int = 128
    fmin: float = 0.0
    fmax: float | None = None  # None = sample_rate / 2
    db_ref: float = 1.0
    db_amin: float = 1e-16
    top_db: float = 120.0  # dB floor below each chunk's peak for frames with sound; keeps float rounding noise out
    colormap: str = "viridis"
    image_size: int = 224

    def _validate(self) -> None:
        _require(1.0 <= self.window_ms <= 1000.0, "spectrogram.window_ms", f"must be in [1, 1000], got {self.window_ms}")
        _require(0 < self.hop_fraction <= 1, "spectrogram.hop_fraction", f"must be in (0, 1], got {self.hop_fraction}")
        _require(1 <= self.n_mels <= 512, "spectrogram.n_mels", f"must be in [1, 512], got {self.n_mels}")
        _require(self.fmin >= 0, "spectrogram.fmin", f"must be >= 0, got {self.fmin}")
        _require(self.fmax is None or self.fmax > self.fmin, "spectrogram.fmax", "must be greater than spectrogram.fmin")
        _require(0 < self.db_ref <= 1e6, "spectrogram.db_ref", f"must be in (0, 1e6], got {self.db_ref}")
        _require(0 < self.db_amin < 1, "spectrogram.db_amin", f"must be in (0, 1), got {self.db_amin}")
        _require(0 < self.top_db <= MAX_TOP_DB, "spectrogram.top_db",
                 f"must be in (0, {MAX_TOP_DB:g}] dB (the floor must stay far above float rounding noise), got {self.top_db}")
        _choice(self.colormap, COLORMAPS, "spectrogram.colormap")
        _require(16 <= self.image_size <= 1024, "spectrogram.image_size", f"must be in [16, 1024], got {self.image_size}")


@dataclass(frozen=True)
class ModelConfig:
    """Backbone + MLP head (Dense -> ARELU -> Dropout -> Dense softmax)."""

    backbone: str = "densenet121"
    weights: str | None = "imagenet"  # "imagenet", None (random init) or a path to a .h5/.weights.h5 file
    units: int = 512
    dropout: float = 0.25
    arelu_alpha: float = 0.90
    arelu_beta: float = 2.0

    def _validate(self) -> None:
        _choice(self.backbone, BACKBONE_NAMES, "model.backbone")  # before any run folder, not when the model is built
        _require(1 <= self.units <= 65536, "model.units", f"must be in [1, 65536], got {self.units}")
        _require(0 <= self.dropout < 1, "model.dropout", f"must be in [0, 1), got {self.dropout}")
        _require(0.01 <= self.arelu_alpha <= 0.99, "model.arelu_alpha", f"must be in [0.01, 0.99], got {self.arelu_alpha}")
        _require(-100 <= self.arelu_beta <= 100, "model.arelu_beta", f"must be in [-100, 100], got {self.arelu_beta}")


@dataclass(frozen=True)
class AugmentConfig:
    """SapAugment policy driving CutMix and SpecAugment (the paper's four settings: none/cutmix/specaugment/both)."""

    cutmix: bool = False
    specaugment: bool = False
    sap_a: float = 0.5
    sap_s: float = 10.0
    cutmix_min: float = 0.0  # patch side as a fraction of the image side: [0, 56] px of 224
    cutmix_max: float = 0.25
    specaugment_max: float = 0.3  # mask width as a fraction of the image side: [0, 67] px of 224
    p_min: float = 0.10  # execution probability range, set per sample by its loss rank
    p_max: float = 0.25

    def _validate(self) -> None:
        _require(0 < self.sap_a < 1, "augment.sap_a", f"must be in (0, 1), got {self.sap_a}")
        _require(0 < self.sap_s <= 1000, "augment.sap_s", f"must be in (0, 1000], got {self.sap_s}")
        _require(0 <= self.cutmix_min <= self.cutmix_max <= 1, "augment.cutmix_max", "need 0 <= cutmix_min <= cutmix_max <= 1")
        _require(0 <= self.specaugment_max <= 1, "augment.specaugment_max", f"must be in [0, 1], got {self.specaugment_max}")
        _require(0 <= self.p_min <= self.p_max <= 1, "augment.p_max", "need 0 <= p_min <= p_max <= 1")

    @property
    def enabled(self) -> bool:
        return self.cutmix or self.specaugment


@dataclass(frozen=True)
class TrainingConfig:
    """Local two-phase training, used by central mode and by every Flower client."""

    optimizer: Literal["adadelta", "adam", "sgd"] = "adadelta"
    learning_rate: float = 0.001
    phase2_lr_factor: float = 0.1  # phase 2 = learning_rate * factor (the paper: / 10)
    batch_size: int = 32
    phase1_epochs: int = 40
    phase2_epochs: int = 200
    unfrozen_layers: int | Literal["all"] = 298  # top backbone layers unfrozen in phase 2 (0 = head only)
    class_balance: Literal["none", "class_weight"] = "class_weight"
    early_stopping: int = 0  # patience in epochs on devel UAR; 0 = off
    tensorboard: bool = False
    seed: int = 0
    embedding_cache: bool = True  # phase 1 on cached backbone embeddings where valid (no augmentation, no random backbone)
    embedding_cache_mb: int = 4096  # size bound of one cache folder

    def _validate(self) -> None:
        _require(0 < self.learning_rate <= 100, "training.learning_rate", f"must be in (0, 100], got {self.learning_rate}")
        _require(0 < self.phase2_lr_factor <= 1, "training.phase2_lr_factor", f"must be in (0, 1], got {self.phase2_lr_factor}")
        _require(1 <= self.batch_size <= 4096, "training.batch_size", f"must be in [1, 4096], got {self.batch_size}")
        for key in ("phase1_epochs", "phase2_epochs", "early_stopping"):
            value = getattr(self, key)
            _require(0 <= value <= MAX_COUNT, f"training.{key}", f"must be in [0, {MAX_COUNT}], got {value}")
        _require(self.unfrozen_layers == "all" or 0 <= self.unfrozen_layers <= MAX_COUNT, "training.unfrozen_layers",
                 f"must be in [0, {MAX_COUNT}] or 'all', got {self.unfrozen_layers}")
        _require(0 <= self.seed <= MAX_SEED, "training.seed", f"must be in [0, {MAX_SEED}], got {self.seed}")
        _require(1 <= self.embedding_cache_mb <= 1 << 30, "training.embedding_cache_mb",
                 f"must be in [1, {1 << 30}], got {self.embedding_cache_mb}")

    @property
    def phase2_learning_rate(self) -> float:
        return self.learning_rate * self.phase2_lr_factor


DP_MODES = ("none", "client", "server")
DP_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm")  # aggregate by a mean, which the DP noise is calibrated to


@dataclass(frozen=True)
class DpConfig:
    """Client-level (= speaker-level with one speaker per client) differential privacy of the trained slice.

    ``client``: each node clips its own update (Flower's clipping mods) and the server adds the noise;
    ``server``: the server clips the updates it receives, then adds the noise. Either way the noise is added
    to the mean of the clipped updates, before any server optimiser sees it.
    """

    mode: Literal["none", "client", "server"] = "none"
    clipping: Literal["fixed", "adaptive"] = "fixed"
    clip_norm: float = 1.0  # L2 bound of one client's slice update (adaptive: the starting value)
    noise_multiplier: float = 1.0  # noise std / clip_norm on the sum of updates; 0 = clipping only, no guarantee
    delta: float = 1e-5
    target_epsilon: float | None = None  # stop before the round that would exceed it; null = no budget

    def _validate(self) -> None:
        _require(self.clip_norm > 0, "federated.dp.clip_norm", f"must be > 0, got {self.clip_norm}")
        _require(self.noise_multiplier >= 0, "federated.dp.noise_multiplier", f"must be >= 0, got {self.noise_multiplier}")
        # beyond these the noise or the clipped update overflows float32 (a run of inf weights, not a privacy setting)
        _require(self.clip_norm <= 1e6, "federated.dp.clip_norm", f"must be at most 1e6, got {self.clip_norm}")
        _require(self.noise_multiplier <= 1e3, "federated.dp.noise_multiplier",
                 f"must be at most 1000, got {self.noise_multiplier}")
        _require(self.target_epsilon is None or self.target_epsilon <= 1e6, "federated.dp.target_epsilon",
                 f"must be at most 1e6 or null, got {self.target_epsilon}")
        _require(0 < self.delta < 1, "federated.dp.delta", f"must be in (0, 1), got {self.delta}")
        _require(self.target_epsilon is None or self.target_epsilon > 0, "federated.dp.target_epsilon",
                 f"must be > 0 or null, got {self.target_epsilon}")
        _require(self.target_epsilon is None or self.mode != "none", "federated.dp.target_epsilon",
                 "needs federated.dp.mode client or server")
        _require(self.target_epsilon is None or self.noise_multiplier > 0, "federated.dp.target_epsilon",
                 "needs federated.dp.noise_multiplier > 0 (without noise there is no epsilon)")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


@dataclass(frozen=True)
class FederatedConfig:
    """Flower rounds, phase schedule, strategy and what travels over the wire."""

    phase1_rounds: int = 10
    phase2_rounds: int = 10
    local_epochs: int = 1
    # "gradient" (FedSGD): a node sends one plain SGD step of size 1 on its mean loss gradient over all its clips,
    # so the server optimiser (fedadam, fedyogi) steps on the federation's mean gradient, as central Adam does
    local_update: Literal["train", "gradient"] = "train"
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm", "fedmedian", "fedtrimmedavg", "krum",
                      "multikrum", "bulyan"] = "fedavg"
    proximal_mu: float = 0.01  # FedProx
    server_learning_rate: float = 0.01  # FedAdam / FedYogi eta
    server_beta_2: float = 0.99  # FedAdam / FedYogi second-moment decay (Flower's default)
    server_tau: float = 1e-3  # FedAdam / FedYogi tau, Adam's epsilon (Flower's default)
    server_momentum: float = 0.9  # FedAvgM (its server learning rate is 1)
    trim_fraction: float = 0.2  # FedTrimmedAvg: share of updates cut at each end, per coordinate
    num_malicious: int = 1  # Krum / MultiKrum / Bulyan: attackers to tolerate
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    transfer_dtype: Literal["float32", "float16"] = "float32"
    evaluate_test: bool = False  # also evaluate the held-out test speakers on the server every round
    client_cpus: float = 1.0  # Ray CPUs per client actor (whole number); TF threads follow this
    allow_missing_clients: bool = False  # finish with exit 0 although some client never contributed an update
    dp: DpConfig = field(default_factory=DpConfig)
    client_runtime: Literal["keras", "litert"] = "keras"  # litert: nodes train the trainable .tflite, no TensorFlow
    litert_clients: float = 0.0  # mixed federation: share of the nodes (chosen by partition id) that run LiteRT
    availability: str = ""  # CSV of the rounds each client is online (`dsl_fed.availability`); "" = always online

    def _validate(self) -> None:
        for key in ("phase1_rounds", "phase2_rounds"):
            value = getattr(self, key)
            _require(0 <= value <= MAX_COUNT, f"federated.{key}", f"must be in [0, {MAX_COUNT}], got {value}")
        _require(self.phase1_rounds + self.phase2_rounds >= 1, "federated.phase1_rounds", "phase1_rounds + phase2_rounds must be >= 1")
        _require(1 <= self.local_epochs <= MAX_COUNT, "federated.local_epochs", f"must be in [1, {MAX_COUNT}], got {self.local_epochs}")
        _require(0 <= self.proximal_mu <= 1000, "federated.proximal_mu", f"must be in [0, 1000], got {self.proximal_mu}")
        _require(0 < self.server_learning_rate <= 100, "federated.server_learning_rate", "must be in (0, 100]")
        _require(0 <= self.server_beta_2 < 1, "federated.server_beta_2", f"must be in [0, 1), got {self.server_beta_2}")
        _require(0 < self.server_tau <= 1, "federated.server_tau", f"must be in (0, 1], got {self.server_tau}")
        _require(self.local_update == "train" or self.strategy in ("fedadam", "fedyogi"), "federated.local_update",
                 f"gradient sends raw gradient steps of size 1, which need a server optimiser (strategy fedadam or "
                 f"fedyogi), not {self.strategy}")
        _require(0 < self.fraction_train <= 1, "federated.fraction_train", f"must be in (0, 1], got {self.fraction_train}")
        _require(0 <= self.fraction_evaluate <= 1, "federated.fraction_evaluate", f"must be in [0, 1], got {self.fraction_evaluate}")
        _require(1 <= self.min_train_nodes <= MAX_COUNT, "federated.min_train_nodes", f"must be in [1, {MAX_COUNT}], got {self.min_train_nodes}")
        _require(self.min_train_nodes <= self.min_available_nodes <= MAX_COUNT, "federated.min_available_nodes",
                 f"must be in [federated.min_train_nodes, {MAX_COUNT}], got {self.min_available_nodes}")
        _require(float(self.client_cpus).is_integer() and 1 <= self.client_cpus <= 64, "federated.client_cpus",
                 f"must be a whole number in [1, 64] (Flower's simulation takes whole CPUs), got {self.client_cpus}")
        _require(0 <= self.server_momentum < 1, "federated.server_momentum", f"must be in [0, 1), got {self.server_momentum}")
        _require(0 <= self.trim_fraction < 0.5, "federated.trim_fraction", f"must be in [0, 0.5), got {self.trim_fraction}")
        _require(0 <= self.num_malicious <= MAX_COUNT, "federated.num_malicious",
                 f"must be in [0, {MAX_COUNT}], got {self.num_malicious}")
        self.dp._validate()
        _require(not self.dp.enabled or self.strategy in DP_STRATEGIES, "federated.dp.mode",
                 f"{self.dp.mode!r} works with federated.strategy {', '.join(DP_STRATEGIES)} (its noise is calibrated to a "
                 f"plain mean of clipped updates), not with {self.strategy}")
        _require(0 <= self.litert_clients <= 1, "federated.litert_clients", f"must be in [0, 1], got {self.litert_clients}")
        _require(self.client_runtime == "keras" or self.litert_clients == 0, "federated.litert_clients",
                 "a share of LiteRT nodes goes with client_runtime keras (client_runtime litert runs every node on LiteRT)")
        if self.litert_share > 0:
            _require(self.local_update == "train", "federated.local_update", "gradient does not work with LiteRT "
                     "clients (their trainable .tflite takes optimiser steps, it does not return a gradient)")
            _require(not self.dp.enabled, "federated.dp.mode", "does not work with LiteRT clients yet (they reply with "
                     "the head alone in phase 2, which the clipping norm does not cover)")
            _require(self.strategy != "fedprox", "federated.strategy", "fedprox needs a proximal term in the "
                     "clients' loss, which the trainable .tflite of LiteRT clients does not have")

    @property
    def litert_share(self) -> float:
        """Share of the nodes that train with LiteRT (1 with ``client_runtime: litert``)."""
        return 1.0 if self.client_runtime == "litert" else self.litert_clients

    def runtime_of(self, partition: int) -> str:
        """``keras`` or ``litert`` for a simulated node: spread evenly over partition ids, ``floor(n * share)`` of the
        first n partitions run LiteRT (share 0.5: partitions 1, 3, 5, ...)."""
        share = self.litert_share
        return "litert" if math.floor((partition + 1) * share + 1e-9) > math.floor(partition * share + 1e-9) else "keras"


    def clients_per_round(self, num_nodes: int) -> int:
        """Nodes sampled per training round (Flower's rule: the fraction rounded down, at least min_train_nodes)."""
        return max(int(num_nodes * self.fraction_train), self.min_train_nodes)


@dataclass(frozen=True)
class RobustnessConfig:
    """Perturbations applied inside a federated simulation (`dsl_fed.robustness`), never to the files."""

    noise_snr_db: float | None = None  # white noise on every client's training chunks at this SNR; None = off
    label_flip: float = 0.0  # share of each client's training clips relabelled with a wrong class
    client_dropout: float = 0.0  # share of the sampled clients that drop out of each round
    shard_skew: float = 0.0  # every client but the first loses this share of its clips

    def _validate(self) -> None:
        if self.noise_snr_db is not None:
            _require(-30 <= self.noise_snr_db <= 100, "robustness.noise_snr_db",
                     f"must be in [-30, 100] dB or null, got {self.noise_snr_db}")
        for key in ("label_flip", "client_dropout", "shard_skew"):
            value = getattr(self, key)
            _require(0 <= value < 1, f"robustness.{key}", f"must be in [0, 1), got {value}")


@dataclass(frozen=True)
class ExperimentConfig:
    cpus_per_cell: int = 1  # Ray CPUs one `dsl_fed experiment` cell reserves; a federated cell's simulation gets these

    def _validate(self) -> None:
        _require(1 <= self.cpus_per_cell <= 256, "experiment.cpus_per_cell", f"must be in [1, 256], got {self.cpus_per_cell}")


@dataclass(frozen=True)
class OutputConfig:
    directory: str = "runs"  # relative paths resolve against the current directory
    name: str = "run"

    def _validate(self) -> None:
        _require(
            self.name != "" and not self.name.startswith(".") and not any(c in self.name for c in "/\\\0"),
            "output.name", f"must be a plain folder name (no '/', not starting with '.'), got {self.name!r}",
        )
        check_visible(self.name, "output.name:")

    @property
    def run_dir(self) -> Path:
        return Path(self.directory) / self.name


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    spectrogram: SpectrogramConfig = field(default_factory=SpectrogramConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON data (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        """Short stable hash of the resolved config, recorded in manifests to tie artefacts to settings."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def replace(self, **overrides: str) -> "Config":
        """Return a validated copy with ``section.key=value``-style overrides applied."""
        return from_dict(apply_overrides(self.to_dict(), [f"{k}={v}" for k, v in overrides.items()]))


# ----------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML, apply ``section.key=value`` overrides, validate once.

    A relative ``data.manifest`` or ``federated.availability`` resolves against the YAML file's folder, so configs
    are portable.
    """
    path = Path(path)
    if not path.is_file():
        raise DslFedError(f"{path}: config file not found")
    try:
        raw = yaml.load(path.read_bytes().decode("utf-8"), Loader=_StrictLoader) or {}
    except UnicodeDecodeError as exc:
        raise DslFedError(f"{path}: not UTF-8 text (byte {exc.start}); save the config as UTF-8") from None
    except OSError as exc:
        raise DslFedError(f"{path}: cannot read config ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise DslFedError(f"{path}: not valid YAML ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise DslFedError(f"{path}: expected a mapping of sections at the top level")
    raw = apply_overrides(raw, overrides)
    for section, key in (("data", "manifest"), ("federated", "availability")):
        value = (raw.get(section) or {}).get(key) if isinstance(raw.get(section), dict) else None
        if isinstance(value, str) and value and not Path(value).is_absolute():
            raw[section][key] = str((path.parent / value).resolve())
    try:
        return from_dict(raw)
    except DslFedError as exc:
        raise DslFedError(f"{path}: {exc}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``section.key=value`` (or ``section.sub.key=value``) strings; values are parsed as YAML scalars."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise DslFedError(f"override {item!r}: expected section.key=value, e.g. training.batch_size=16")
        cls, node, prefix = Config, raw, ""
        for part in parts[:-1]:
            _check_name(part, [f.name for f in dataclasses.fields(cls)], prefix)
            cls = typing.get_type_hints(cls)[part]
            if not dataclasses.is_dataclass(cls):
                raise DslFedError(f"override {item!r}: {prefix}{part} is a key, not a section")
            node[part] = dict(node[part]) if isinstance(node.get(part), dict) else {}
            node, prefix = node[part], f"{prefix}{part}."
        _check_name(parts[-1], [f.name for f in dataclasses.fields(cls)], prefix)
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        node[parts[-1]] = parsed
    return raw


def from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a `Config` from plain data (YAML, JSON or Flower run config)."""
    sections = {}
    for section, value in raw.items():
        _check_name(section, list(_SECTIONS), "")
        sections[section] = _coerce(value, _SECTIONS[section], section)
    cfg = Config(**sections)
    for f in dataclasses.fields(cfg):
        getattr(cfg, f.name)._validate()
    nyquist = cfg.data.sample_rate / 2
    _require(cfg.spectrogram.fmin < nyquist, "spectrogram.fmin", f"must be below data.sample_rate / 2 = {nyquist:g} Hz")
    _require(cfg.spectrogram.fmax is None or cfg.spectrogram.fmax <= nyquist, "spectrogram.fmax",
             f"must be at most data.sample_rate / 2 = {nyquist:g} Hz, got {cfg.spectrogram.fmax}")
    _check_frames(cfg.data, cfg.spectrogram)
    _require(cfg.federated.litert_share == 0 or not cfg.augment.enabled, "augment",
             "LiteRT clients train the head on embeddings, where SapAugment cannot act; turn augment.cutmix and "
             "augment.specaugment off for a federation with LiteRT clients")
    return cfg


def frame_geometry(sample_rate: int, window_ms: float, hop_fraction: float) -> tuple[int, int]:
    """Return ``(n_fft, hop)`` in samples: the window length (also the FFT length) and the frame step."""
    n_fft = int(round(window_ms * sample_rate / 1000.0))
    hop = max(1, int(round(n_fft * hop_fraction)))
    return n_fft, hop


def num_frames(num_samples: int, n_fft: int, hop: int) -> int:
    """Frames of a centred (librosa ``center=True``) STFT of `num_samples` samples."""
    return 1 + (num_samples + 2 * (n_fft // 2) - n_fft) // hop


def _check_frames(data: DataConfig, spec: SpectrogramConfig) -> None:
    """Every chunk must give a spectrogram of a size that fits memory: a window longer than the chunk, a huge
    window or a tiny hop would otherwise only show as the kernel ending the process for lack of memory."""
    n_fft, hop = frame_geometry(data.sample_rate, spec.window_ms, spec.hop_fraction)
    window = f"{spec.window_ms:g} ms is {n_fft} samples at {data.sample_rate} Hz"
    _require(n_fft >= 2, "spectrogram.window_ms", f"{window}; need at least 2")
    _require(n_fft <= data.chunk_samples, "spectrogram.window_ms",
             f"{window}, longer than a chunk (data.chunk_seconds={data.chunk_seconds:g}: {data.chunk_samples} samples)")
    _require(n_fft <= MAX_FFT, "spectrogram.window_ms", f"{window}; at most {MAX_FFT} (the STFT kernel grows with its square)")
    frames = num_frames(data.chunk_samples, n_fft, hop)
    _require(frames >= 1, "spectrogram.window_ms", f"{window}: a chunk gives no STFT frame")
    values = frames * (n_fft // 2 + 1)
    _require(values <= MAX_STFT_VALUES, "spectrogram.hop_fraction",
             f"gives {frames} STFT frames x {n_fft // 2 + 1} bins = {values} values per chunk; at most {MAX_STFT_VALUES} "
             "(raise hop_fraction or shorten data.chunk_seconds)")


_SECTIONS: dict[str, type] = typing.get_type_hints(Config)


class _StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that rejects a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _build_section(cls: type, values: dict[str, Any], prefix: str):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        _check_name(key, list(hints), prefix)
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against a type hint; ints are accepted for floats, nothing else is converted."""
    if dataclasses.is_dataclass(tp):  # a (sub)section such as federated.dp
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise DslFedError(f"{key}: expected a mapping of keys, got {type(value).__name__}")
        return _build_section(tp, value, f"{key}.")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if type(None) in options and _is_null(value):  # YAML reads `None` as a string; users mean null
            return None
        for option in options:
            try:
                return _coerce(value, option, key)
            except DslFedError:
                pass
        raise DslFedError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if origin is tuple:  # a YAML list, or "a,b,c" from a command-line override
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, (list, tuple)):
            return tuple(_coerce(item.strip() if isinstance(item, str) else item, typing.get_args(tp)[0], key)
                         for item in items if not (isinstance(item, str) and not item.strip()))
        raise DslFedError(f"{key}: expected a list, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        options = typing.get_args(tp)
        if value in options and type(value) is type(options[options.index(value)]):
            return value
        raise DslFedError(f"{key}: expected one of {', '.join(map(repr, options))}, got {value!r}")
    if tp is type(None):
        if _is_null(value):
            return None
        raise DslFedError(f"{key}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 else math.inf
        elif isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise DslFedError(f"{key}: must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    raise DslFedError(f"{key}: expected {_describe(tp)}, got {value!r} ({type(value).__name__})")


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~"))


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(t) for t in typing.get_args(tp))
    if origin is Literal:
        return " or ".join(repr(v) for v in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])}s"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _check_name(name: Any, valid: list[str], prefix: str) -> None:
    if not isinstance(name, str):  # YAML 1.1 reads unquoted on/off/yes/no as booleans, 1 as an int
        raise DslFedError(f"config key {prefix}{name!r} ({type(name).__name__}) is not a name; quote it in the YAML")
    if name in valid:
        return
    near = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {prefix}{near[0]}?" if near else f"; valid keys: {', '.join(prefix + v for v in valid)}"
    raise DslFedError(f"unknown config key {prefix}{name}{hint}")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise DslFedError(f"{key}: {message}")


def _choice(value: str, options: tuple[str, ...], key: str) -> None:
    if value not in options:
        near = difflib.get_close_matches(value, options, n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise DslFedError(f"{key}: unknown value {value!r} (choose from {', '.join(options)}){hint}")
