"""Paper presets: every value names its source, and the values the paper gives are the paper's."""

import re
from pathlib import Path

import pytest
import yaml

from dsl_fed.config import SpectrogramConfig, load_config

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
PRESETS = sorted(PAPER.glob("*.yaml"))
# A source is a table or section of the paper, or a stated choice: "not in the paper (...): chosen ...".
SOURCE = re.compile(r"#\s*(paper (Table [1-4]|§\d(\.\d)?)\b|not in the paper\b[^#:]*: chosen \S)")

TABLE2 = {  # corpus: (units, dropout, initial lr, epochs phase 1, epochs phase 2, fine-tuned layers, chunk s)
    "ccs": (512, 0.25, 0.001, 40, 200, 298, 3.0),
    "css": (700, 0.4, 0.01, 20, 0, 0, None),  # '–' for phase 2 and the chunk length
    "ess": (512, 0.25, 0.001, 40, 200, 298, 3.0),
    "iemocap": (512, 0.25, 0.001, 40, 200, 128, 4.0),
}
TABLE3_BEST = {  # corpus: (cutmix, specaugment) of the row with the best test UAR (bold in Table 3)
    "ccs": (True, True), "css": (True, True), "ess": (True, True), "iemocap": (True, False),
}


def leaf_lines(path: Path) -> list[tuple[str, str]]:
    """(dotted key, text of its line) for every scalar value in the YAML file, found by YAML's own parser."""
    lines = path.read_text().splitlines()
    found = []

    def walk(node: yaml.Node, prefix: str) -> None:
        for key, value in node.value:
            name = f"{prefix}{key.value}"
            if isinstance(value, yaml.MappingNode):
                walk(value, f"{name}.")
            else:
                found.append((name, lines[value.start_mark.line]))

    walk(yaml.compose(path.read_text()), "")
    return found


def test_there_is_one_preset_per_paper_corpus():
    assert [p.stem for p in PRESETS] == sorted(TABLE2)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_value_line_names_its_source(path):
    leaves = leaf_lines(path)
    assert len(leaves) >= 30, "the preset writes the recipe out, not only a few keys"
    missing = [key for key, line in leaves if not SOURCE.search(line)]
    assert missing == [], f"{path.name}: no source comment on {missing}"


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_the_unwritten_db_floor_is_documented_as_not_from_the_paper(path):
    """The floor comes from the code default; the comment must state that default and that the paper has none."""
    assert "spectrogram.top_db" not in dict(leaf_lines(path))
    lines = path.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip().startswith("# top_db"))
    comment = " ".join(line.strip().lstrip("#").strip() for line in lines[first:first + 2])
    stated = float(re.search(r"an? (\d+(?:\.\d+)?) dB floor", comment).group(1))
    assert stated == SpectrogramConfig().top_db, f"{path.name}: update the top_db comment to the code default"
    assert "Not in the paper" in comment


@pytest.mark.parametrize("name", sorted(TABLE2))
def test_paper_values_equal_table2_and_the_text(name):
    cfg = load_config(PAPER / f"{name}.yaml")
    units, dropout, lr, epochs1, epochs2, layers, chunk = TABLE2[name]
    got = (cfg.model.units, cfg.model.dropout, cfg.training.learning_rate, cfg.training.phase1_epochs,
           cfg.training.phase2_epochs, cfg.training.unfrozen_layers)
    assert got == (units, dropout, lr, epochs1, epochs2, layers)
    if chunk is not None:
        assert cfg.data.chunk_seconds == chunk
    # §2.1: 16 kHz; Hann 32 ms, 50 % hop; 128 Mel bins; viridis; 224 x 224; DenseNet121 pre-trained on ImageNet
    assert cfg.data.sample_rate == 16000
    assert (cfg.spectrogram.window_ms, cfg.spectrogram.hop_fraction, cfg.spectrogram.n_mels) == (32.0, 0.5, 128)
    assert (cfg.spectrogram.colormap, cfg.spectrogram.image_size) == ("viridis", 224)
    assert (cfg.model.backbone, cfg.model.weights) == ("densenet121", "imagenet")
    # §3.2: AdaDelta on plain cross-entropy, batches of 32, learning rate / 10 in phase 2, fixed epochs
    assert (cfg.training.optimizer, cfg.training.class_balance, cfg.training.batch_size) == ("adadelta", "none", 32)
    assert cfg.training.phase2_learning_rate == pytest.approx(lr / 10)
    assert cfg.training.early_stopping == 0
    # §3.2: SapAugment a = 0.5, s = 10; CutMix squares 0-56 px, SpecAugment masks 0-67 px, probability 10-25 %
    aug = cfg.augment
    assert (aug.sap_a, aug.sap_s, aug.p_min, aug.p_max) == (0.5, 10.0, 0.10, 0.25)
    assert (aug.cutmix_min * 224, aug.cutmix_max * 224, round(aug.specaugment_max * 224)) == (0, 56, 67)
    # Table 3: the augmentation row whose test UAR the preset's header quotes
    assert (aug.cutmix, aug.specaugment) == TABLE3_BEST[name]
