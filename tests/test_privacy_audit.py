"""The privacy audit's attack code on cases with a known answer (no federation runs here; those are the audit's).

Membership: separable scores give AUC 1, identical distributions 0.5, the DP bounds match hand-computed values
and each other. Attribute probe: an attribute written into synthetic updates is found, and is lost under noise
as large as the DP mechanism's. The report is rendered from synthetic cells. The voice attributes the audit
uses are the ones the corpus generator synthesised.
"""

import argparse
import math

import numpy as np
import pytest

from dsl_fed.data import arousal
from dsl_fed.data.arousal import speaker_baseline
from dsl_fed.data.manifest import read_manifest
from dsl_fed.privacy import epsilon
from simulations import attribute_probe as probe
from simulations import membership as mia
from simulations.audit_corpus import AuditClip, assign_roles, pitch_group, voice_sex, write_federation_manifest
from simulations import audit_report
from simulations.privacy_audit import noise_for_epsilon

# ------------------------------------------------------------------------------------------- membership


def test_separable_members_are_found_and_identical_ones_are_not():
    rng = np.random.default_rng(0)
    members, nonmembers = rng.uniform(1, 2, 50), rng.uniform(-1, 0, 200)
    assert mia.auc(members, nonmembers) == 1.0
    assert mia.tpr_at_fpr(members, nonmembers, 0.01) == 1.0
    assert mia.bootstrap(members, nonmembers, mia.auc, n=200) == pytest.approx((1.0, 1.0))
    same_in, same_out = rng.normal(size=4000), rng.normal(size=4000)
    assert abs(mia.auc(same_in, same_out) - 0.5) < 0.02
    assert abs(mia.tpr_at_fpr(same_in, same_out, 0.10) - 0.10) < 0.02  # random guessing: TPR = FPR
    low, high = mia.bootstrap(same_in[:200], same_out[:200], mia.auc, n=300)
    assert low < 0.5 < high
    # reversed scores: the attack says "member" for the lowest scores, AUC 0
    assert mia.auc(nonmembers, members) == 0.0


def test_tpr_at_fpr_counts_false_positives_exactly():
    members = np.array([5.0, 4.0, 3.0, 1.0])  # the last ties with a non-member
    nonmembers = np.array([3.5, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0])
    assert mia.tpr_at_fpr(members, nonmembers, 0.0) == 0.5  # above 3.5: two of four members, no false positive
    assert mia.tpr_at_fpr(members, nonmembers, 0.1) == 0.75  # one false positive (3.5) admits 3.0, not the tie
    assert mia.tpr_at_fpr(members, nonmembers, 0.2) == 1.0
    assert mia.auc(members, nonmembers) == pytest.approx((10 + 10 + 9 + 8.5) / 40)  # a tie counts half


def test_threshold_calibrated_on_shadow_speakers_keeps_their_false_positive_rate():
    shadow_out = np.linspace(0.1, 1.0, 10)
    t10 = mia.calibrated_threshold(shadow_out, 0.10)
    assert mia.rates([0.0], shadow_out, t10)[0] == 0.1 and 0.9 < t10 < 1.0 + 1e-12
    t1 = mia.calibrated_threshold(shadow_out, 0.01)  # 10 non-members: 1 % admits no false positive
    assert t1 > 1.0 and mia.rates([0.0], shadow_out, t1)[0] == 0.0
    fpr, tpr = mia.rates(np.array([0.95, 2.0, 0.5]), np.array([0.99, 0.2]), t10)
    assert (fpr, tpr) == (0.5, pytest.approx(2 / 3))


def test_dp_bound_matches_hand_computed_values():
    # e^1 * 0.01 + 1e-5 = 0.0271928 (the other line, 1 - e^-1 (1 - 1e-5 - 0.01) = 0.6358, is higher)
    assert mia.dp_tpr_bound(0.01, 1.0, 1e-5) == pytest.approx(0.0271928, abs=1e-7)
    # at FPR 0.5 the second line binds: 1 - e^-1 * 0.5 = 0.8160603
    assert mia.dp_tpr_bound(0.5, 1.0, 0.0) == pytest.approx(0.8160603, abs=1e-7)
    assert mia.dp_tpr_bound(0.3, 0.0, 0.0) == pytest.approx(0.3)  # ε 0: no test beats guessing
    assert mia.dp_tpr_bound(0.01, 50.0, 1e-5) == 1.0
    assert mia.dp_tpr_bound(0.01, None, 1e-5) == 1.0  # no DP, no bound
    assert np.allclose(mia.dp_tpr_bound(np.array([0.01, 0.5]), 1.0, 0.0), [math.e * 0.01, 1 - 0.5 / math.e])
    # Gaussian DP: Φ(Φ⁻¹(0.05) + 1) = 0.2595110; its area is Φ(μ/√2) = 0.7602499 for μ = 1
    assert mia.gdp_tpr_bound(0.05, 1.0) == pytest.approx(0.2595110, abs=1e-7)
    assert mia.auc_bound(lambda f: mia.gdp_tpr_bound(f, 1.0)) == pytest.approx(0.7602499, abs=1e-4)
    assert mia.auc_bound(lambda f: mia.dp_tpr_bound(f, 0.0, 0.0)) == pytest.approx(0.5, abs=1e-6)
    assert mia.gaussian_mu(2.0, 16) == 2.0 and mia.gaussian_mu(0.0, 16) is None


def test_gaussian_curve_lies_inside_the_region_of_the_reported_epsilon():
    """The accountant's ε for R releases of multiplier z must allow at least what the exact Gaussian curve allows."""
    z, releases, delta = 5.0, 10, 1e-5
    eps = epsilon(z, releases, delta)
    assert eps == pytest.approx(2.81, abs=0.01)
    fprs = np.logspace(-4, -0.01, 50)
    gdp = mia.gdp_tpr_bound(fprs, mia.gaussian_mu(z, releases))
    assert np.all(gdp <= mia.dp_tpr_bound(fprs, eps, delta) + 1e-12)
    assert np.any(gdp < 0.8 * mia.dp_tpr_bound(fprs, eps, delta))  # and is tighter somewhere


def test_noise_multiplier_for_a_target_epsilon_is_the_smallest_that_keeps_it():
    for target in (1.0, 8.0, 100.0):
        z = noise_for_epsilon(target, 10, 1e-5)
        assert epsilon(z, 10, 1e-5) <= target < epsilon(z * 0.98, 10, 1e-5)


def test_speaker_scores_average_each_speakers_clips():
    scores = mia.speaker_scores([-1.0, -3.0, -0.5, 0.0], ["a", "a", "b", "b"])
    assert scores == {"a": -2.0, "b": -0.25}


# ----------------------------------------------------------------------------------------- attribute probe


def synthetic_updates(n: int = 90, dim: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Updates whose first 10 coordinates shift with a 3-valued attribute (by 0.6 each), the rest is noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.array(["low", "mid", "high"]), n // 3)
    shift = {"low": -1.0, "mid": 0.0, "high": 1.0}
    updates = rng.normal(0, 0.05, (n, dim))
    updates[:, :10] += np.array([shift[v] for v in labels])[:, None] * 0.6
    return updates, labels


def test_probe_finds_an_attribute_in_updates_and_loses_it_under_dp_noise():
    updates, labels = synthetic_updates()
    assert probe.chance(labels) == pytest.approx(1 / 3)
    assert probe.probe_accuracy(updates, labels) > 0.9
    clipped = probe.clip_rows(updates, 0.5)
    assert np.linalg.norm(clipped, axis=1).max() <= 0.5 + 1e-12
    assert probe.probe_accuracy(clipped, labels) > 0.9  # clipping keeps the direction: the attribute stays
    noised = probe.add_noise(clipped, 1.0 * 0.5, np.random.default_rng(1))  # z 1, C 0.5
    assert probe.probe_accuracy(noised, labels) < 0.5
    shuffled = np.random.default_rng(2).permutation(labels)
    assert probe.probe_accuracy(updates, shuffled) < 0.5


def test_clipping_scales_only_rows_above_the_norm():
    rows = np.array([[3.0, 4.0], [0.3, 0.4]])
    assert np.allclose(probe.clip_rows(rows, 1.0), [[0.6, 0.8], [0.3, 0.4]])


def test_accuracy_interval_is_clopper_pearson():
    assert probe.accuracy_ci(0.5, 10) == pytest.approx((0.1870860, 0.8129140), abs=1e-6)
    assert probe.accuracy_ci(1.0, 10)[1] == 1.0 and probe.accuracy_ci(0.0, 10)[0] == 0.0


# ------------------------------------------------------------------------------------- corpus and report


def test_voice_attributes_are_the_ones_the_generator_synthesised(monkeypatch, tmp_path):
    calls = []

    def fake_synthesise(espeak, text, voice, ssml=False):
        calls.append((voice, float(text.split('pitch="')[1].split("%")[0])))
        return np.random.default_rng(0).normal(size=8000)

    monkeypatch.setattr(arousal, "synthesise", fake_synthesise)
    monkeypatch.setattr(arousal, "write_wav", lambda path, audio: None)
    for k in (0, 7):
        calls.clear()
        arousal._write_speaker(("espeak-ng", tmp_path, f"spk{k + 1:04d}", k, 2, 3, arousal.SNR))
        baseline = speaker_baseline(k, 3)
        assert {voice for voice, _ in calls} == {baseline.voice}
        # every clip's pitch is the baseline's plus a class shift (-9 / 0 / +11 %) and jitter (+-4 %)
        assert all(baseline.pitch - 13.5 <= pitch <= baseline.pitch + 15.5 for _, pitch in calls)
    pitches = {k: speaker_baseline(k, 3).pitch for k in range(40)}
    groups = {k: pitch_group(f"spk{k + 1:04d}", 3) for k in range(40)}
    assert all((groups[k] == "low") == (p < -25 / 3) and (groups[k] == "high") == (p > 25 / 3) for k, p in pitches.items())
    sexes = {voice_sex(f"spk{k + 1:04d}", 3) for k in range(40)}
    assert {"m", "f"} <= sexes


def test_roles_are_disjoint_and_manifests_hold_only_trained_clips(tmp_path):
    speakers = [f"spk{k:04d}" for k in range(1, 21)]
    roles = assign_roles(speakers, 4, seed=0)
    assert [len(roles[r]) for r in ("target-in", "shadow-in", "target-out", "shadow-out")] == [4, 4, 6, 6]
    assert len(set().union(*roles.values())) == 20
    (tmp_path / "audio").mkdir()
    clips = []
    for s in speakers:
        for label in ("high", "low", "mid"):
            for j in range(3):
                name = f"audio/{s}_{label}_{j:02d}.wav"
                (tmp_path / name).write_bytes(f"{s}{label}{j}".encode())  # distinct contents
                clips.append(AuditClip(name, label, s, j))
    path = write_federation_manifest(tmp_path / "t.csv", tmp_path, clips, roles["target-in"], roles["target-out"], 1)
    manifest = read_manifest(path)
    assert manifest.speakers("train") == roles["target-in"] and manifest.speakers("devel") == roles["target-out"]
    assert len(manifest.clips) == 10 * 3 and all(c.path.name.endswith("_00.wav") for c in manifest.clips)


def test_report_from_synthetic_federations_finds_the_planted_leak(monkeypatch):
    """Members' clips score high under the no-DP models and like everyone else's under the DP ones."""
    monkeypatch.setattr(audit_report, "BOOT", 200)
    rng = np.random.default_rng(0)
    speakers = [f"spk{k:04d}" for k in range(1, 61)]
    roles = assign_roles(speakers, 10, seed=0)
    clips = [AuditClip(f"audio/{s}/{lab}_{j:02d}.wav", lab, s, j) for s in speakers for lab in ("high", "low", "mid")
             for j in range(2)]
    plan = {"clips": clips, "roles": roles, "settings": [None, 3.0], "train_clips": 1, "delta": 1e-5, "seed": 0,
            "corpus_seed": 0, "clip_norm": 1.0, "probe_devel": 0, "tuning": []}

    def federation(members, leak, eps):
        loglik = [rng.normal(-1.0, 0.1) + (leak if c.speaker in members else 0.0) for c in clips]
        return {"loglik": loglik, "epsilon": eps, "rounds": 4, "uar": 0.5, "cpu_seconds": 1.0, "load": 1.0,
                "update_norms": {"1": [1.0]}}

    cells = {("target", None): federation(roles["target-in"], 1.0, None),
             ("shadow", None): federation(roles["shadow-in"], 1.0, None),
             ("target", 3.0): federation(roles["target-in"], 0.0, epsilon(3.0, 4, 1e-5)),
             ("shadow", 3.0): federation(roles["shadow-in"], 0.0, epsilon(3.0, 4, 1e-5))}
    updates, _ = synthetic_updates(n=60, dim=20)
    cells[("probe", None)] = {"updates": {str(i): u.tolist() for i, u in enumerate(updates)}, "clients": speakers,
                              "update_norms": {"1": [1.0]}, "cpu_seconds": 1.0, "uar": 0.3, "load": 1.0}
    sexes = {s: voice_sex(s, 0) for s in speakers}  # the reference features carry the voice's sex, nothing else
    cells[("features", None)] = {"features": {s: [float(sexes[s] == "m") + rng.normal(0, 0.1), rng.normal()]
                                              for s in speakers}, "cpu_seconds": 1.0, "load": 1.0}
    args = argparse.Namespace(speakers=60, members=10, clips=2, train_clips=1, rounds=4, local_epochs=1,
                              epsilons="2", clip_norm=1.0, corpus_seed=0, overrides=[])
    text, fig = audit_report.render(args, plan, cells, 0.0)
    rows = [line for line in text.splitlines() if line.startswith("| none |") or line.startswith(f"| {epsilon(3.0, 4, 1e-5):.3g} |")]
    assert rows[0].split(" | ")[3].startswith("1.000")  # no DP: AUC 1 on the planted leak
    dp_auc = float(rows[1].split(" | ")[3].split()[0])
    assert abs(dp_auc - 0.5) < 0.3
    assert "Without DP the attack's AUC is 1.000" in text and "above chance (CI excludes 0.5)" in text
    assert "within the (ε, δ) bound at both FPRs" in text
    reference = next(line for line in text.splitlines() if line.startswith("| voice sex") and "backbone features" in line)
    assert float(reference.split(" | ")[3].split()[0]) > 0.9
    assert fig.axes and len(fig.axes) == 3
