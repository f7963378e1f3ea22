"""Quality gate: federated training at one client per speaker must learn, on a corpus that can show it failing.

Every other test checks that the pieces compute what they should; this one checks that together they still
train a federation. It is where a change to what the model sees (preprocessing, augmentation, initialisation)
or to how clients train and are averaged shows up as lost quality. The corpus is the paralinguistic arousal
task (`dsl_fed make-speech-data --task arousal`) recorded as in a studio, so pauses are digital silence: the
condition under which a per-frame 80 dB floor kept such a federation at chance for its first rounds. The run
is the project's own ClientApp and strategy, in one process (`simulations.inprocess`).
"""

import shutil

import pytest

from dsl_fed.data.arousal import make_arousal_corpus
from simulations import inprocess

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (.ci/run installs it)")]

# Final devel UAR after 1 + 4 rounds (3 classes, chance 0.333), seed 0; measured with the current preprocessing
# and with the per-frame 80 dB floor put back (which fails the gate). See benchmarks/results/floor_regression.md.
FLOOR = 0.42


@pytest.fixture(scope="module")
def studio_corpus(tmp_path_factory):
    return make_arousal_corpus(tmp_path_factory.mktemp("studio") / "corpus", speakers=24, clips=4, seed=0,
                               progress=False, snr=(100.0, 140.0))


def test_one_client_per_speaker_learns_above_chance(studio_corpus, tmp_path):
    config = tmp_path / "gate.yaml"
    config.write_text(GATE_CONFIG.format(manifest=studio_corpus))
    result = inprocess.run(config, [], score_rounds=("devel",))
    curve = [r["devel"] for r in result.per_round]
    print(f"quality gate: devel UAR {result.devel_uar:.3f} after {result.rounds} rounds in {result.seconds:.0f} s; "
          f"by round {curve}")
    assert result.rounds == 5 and len(curve) == 5
    assert curve[-1] == pytest.approx(result.devel_uar, abs=1e-9)  # the server's round score is the final model's
    assert result.devel_uar >= FLOOR, f"one-client-per-speaker federation fell to devel UAR {result.devel_uar:.3f}"


GATE_CONFIG = """
data:
  manifest: {manifest}
  chunk_seconds: 2.0
  hop_seconds: 1.0
  shards: 0
spectrogram:
  n_mels: 64
  image_size: 64
model:
  backbone: tiny
  weights: null
  units: 64
  dropout: 0.25
training:
  optimizer: adam
  learning_rate: 0.003
  phase2_lr_factor: 1.0
  batch_size: 16
  unfrozen_layers: 6
  seed: 0
augment:
  cutmix: false
  specaugment: false
federated:
  phase1_rounds: 1
  phase2_rounds: 4
  local_epochs: 2
  min_train_nodes: 2
  min_available_nodes: 2
output:
  name: gate
"""
