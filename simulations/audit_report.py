"""The privacy audit's numbers, table and figure, computed from its recorded federations (`simulations.privacy_audit`).

Everything a sentence of the report states is computed here from the cells, so a re-run with other settings
cannot leave a stale claim behind.
"""

from __future__ import annotations

import argparse
import datetime
import os

import numpy as np

from dsl_fed.federated.dp import secret_rng
from dsl_fed.privacy import epsilon as dp_epsilon
from simulations import attribute_probe as probe
from simulations import membership as mia
from simulations.audit_corpus import pitch_group, voice_sex

FPRS = (0.01, 0.10)
BOOT = 1000
NOISE_DRAWS = 5  # independent noise draws per noised view: one draw's accuracy swings by a few clients


def membership_rows(plan: dict, cells: dict) -> list[dict]:
    """One row per setting: the loss-threshold attack on the target and its variants (module docstring of
    `simulations.privacy_audit`)."""
    clips = plan["clips"]
    speakers = np.array([c.speaker for c in clips])
    trained = np.array([c.index < plan["train_clips"] for c in clips])
    roles = plan["roles"]
    rows = []
    for k, noise in enumerate(plan["settings"]):
        target, shadow = cells[("target", noise)], cells[("shadow", noise)]
        scores = {}
        for variant, mask in (("trained", trained), ("fresh", ~trained)):
            scores[variant, "target"] = mia.speaker_scores(np.asarray(target["loglik"])[mask], speakers[mask])
            scores[variant, "shadow"] = mia.speaker_scores(np.asarray(shadow["loglik"])[mask], speakers[mask])
        ins, outs = mia.split(scores["trained", "target"], roles["target-in"], roles["target-out"])
        shadow_ins, shadow_outs = mia.split(scores["trained", "shadow"], roles["shadow-in"], roles["shadow-out"])
        eps = target["epsilon"]
        mu = mia.gaussian_mu(noise, target["rounds"]) if noise is not None else None
        seed = plan["seed"] * 100 + k
        row = {
            "noise": noise, "epsilon": eps, "delta": plan["delta"], "mu": mu, "uar": target["uar"], "shadow_uar": shadow["uar"],
            "members": len(ins), "nonmembers": len(outs), "gap": float(ins.mean() - outs.mean()),
            "auc": mia.auc(ins, outs), "auc_ci": mia.bootstrap(ins, outs, mia.auc, BOOT, seed),
            "auc_bound": mia.auc_bound(lambda f: mia.dp_tpr_bound(f, eps, plan["delta"])),
            "auc_gdp_bound": mia.auc_bound(lambda f: mia.gdp_tpr_bound(f, mu)),
            "roc": mia.roc(ins, outs),
        }
        for fpr in FPRS:
            row[f"tpr@{fpr}"] = mia.tpr_at_fpr(ins, outs, fpr)
            row[f"tpr@{fpr}_ci"] = mia.bootstrap(ins, outs, lambda a, b, f=fpr: mia.tpr_at_fpr(a, b, f), BOOT, seed)
            row[f"bound@{fpr}"] = mia.dp_tpr_bound(fpr, eps, plan["delta"])
            row[f"gdp@{fpr}"] = mia.gdp_tpr_bound(fpr, mu)
            row[f"calibrated@{fpr}"] = mia.rates(ins, outs, mia.calibrated_threshold(shadow_outs, fpr))
        row["shadow_auc"] = mia.auc(shadow_ins, shadow_outs)
        row["shadow_auc_ci"] = mia.bootstrap(shadow_ins, shadow_outs, mia.auc, BOOT, seed)
        fresh_in, fresh_out = mia.split(scores["fresh", "target"], roles["target-in"], roles["target-out"])
        row["fresh_auc"] = mia.auc(fresh_in, fresh_out)
        row["fresh_auc_ci"] = mia.bootstrap(fresh_in, fresh_out, mia.auc, BOOT, seed)
        # per-speaker difficulty: minus the score of the other federation's model, which saw neither group
        ref = {s: scores["trained", "target"][s] - scores["trained", "shadow"][s] for s in roles["target-in"] + roles["target-out"]}
        ref_in, ref_out = mia.split(ref, roles["target-in"], roles["target-out"])
        row["ref_auc"] = mia.auc(ref_in, ref_out)
        row["ref_auc_ci"] = mia.bootstrap(ref_in, ref_out, mia.auc, BOOT, seed)
        row["ref_tpr@0.1"] = mia.tpr_at_fpr(ref_in, ref_out, 0.1)
        rows.append(row)
    return rows


def probe_rows(plan: dict, cells: dict) -> list[dict]:
    """Attribute-probe accuracy per attribute and view of the update (raw, clipped, clipped + each setting's noise)."""
    cell = cells[("probe", None)]
    partitions = sorted(cell["updates"], key=int)
    updates = np.array([cell["updates"][p] for p in partitions], dtype=np.float64)
    speakers = [cell["clients"][int(p)] for p in partitions]
    seed = int(plan["corpus_seed"])
    clip_norm, rng = plan["clip_norm"], secret_rng()  # the DP noise is drawn as the mechanism draws it
    clipped = probe.clip_rows(updates, clip_norm)
    views = [("raw update", None, [updates]), (f"clipped to {clip_norm:g}", None, [clipped])]
    for noise in plan["settings"]:
        if noise is not None:
            draws = [probe.add_noise(clipped, noise * clip_norm, rng) for _ in range(NOISE_DRAWS)]
            views.append((f"clipped + noise z {noise:g}", noise, draws))
    features = cells.get(("features", None), {}).get("features")
    if features:  # the reference: what the head is trained on, per speaker
        views.append(("reference: mean backbone features (not sent)", None,
                      [np.array([features[s] for s in speakers], dtype=np.float64)]))
    attributes = {"pitch group (3 tertiles)": [pitch_group(s, seed) for s in speakers],
                  "voice sex (eSpeak m/f variants)": [voice_sex(s, seed) for s in speakers]}
    rows = []
    for attribute, labels in attributes.items():
        keep = np.array([label is not None for label in labels])
        y = np.array([label for label in labels if label is not None])
        for view, noise, xs in views:
            accs = [probe.probe_accuracy(x[keep], y, seed=plan["seed"]) for x in xs]
            acc = float(np.mean(accs))
            rows.append({"attribute": attribute, "view": view, "noise": noise, "clients": int(keep.sum()),
                         "accuracy": acc, "ci": probe.accuracy_ci(acc, int(keep.sum())), "chance": probe.chance(y),
                         "draws": (min(accs), max(accs)) if len(accs) > 1 else None,
                         "epsilon_one_round": None if noise is None else dp_epsilon(noise, 1, plan["delta"])})
    return rows


def render(args: argparse.Namespace, plan: dict, cells: dict, load: float):
    """(markdown, figure) of the whole audit."""
    rows = membership_rows(plan, cells)
    probes = probe_rows(plan, cells)
    return markdown(args, plan, cells, rows, probes, load), figure(rows, probes)


def _eps(eps: float | None) -> str:
    return "none" if eps is None else f"{eps:.3g}"


def _ci(ci: tuple[float, float]) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def markdown(args, plan, cells, rows, probes, load) -> str:
    roles = plan["roles"]
    classes = sorted({c.label for c in plan["clips"]})
    probe_cell = cells[("probe", None)]
    norms = {fed: np.median([n for ns in cells[(fed, None)]["update_norms"].values() for n in ns])
             for fed in ("target",)}
    phase1 = np.median(probe_cell["update_norms"]["1"])
    cpu = sum(c["cpu_seconds"] for c in cells.values()) / 60
    loads = [c.get("load", load) for c in cells.values()]
    command = " ".join(["python -m simulations.privacy_audit", f"--speakers {args.speakers}", f"--members {args.members}",
                        f"--clips {args.clips}", f"--train-clips {args.train_clips}", f"--rounds {args.rounds}",
                        f"--local-epochs {args.local_epochs}", f"--epsilons {args.epsilons}",
                        f"--clip-norm {args.clip_norm:g}", *args.overrides])
    lines = [
        "# Privacy audit: membership and attribute inference",
        "",
        f"`{command}` ({datetime.date.today().isoformat()}; {os.cpu_count()} CPUs, load average {min(loads):.1f}-"
        f"{max(loads):.1f} when the federations started; {sum(k[0] != 'features' for k in cells)} federations, "
        f"{cpu:.0f} CPU-minutes in their processes, the corpus synthesis not counted).",
        "",
        f"- Corpus: arousal (eSpeak NG), {len({c.speaker for c in plan['clips']})} speakers x {len(classes)} classes "
        f"({', '.join(classes)}) x {args.clips} clips, corpus seed {args.corpus_seed}. A member trains on its first "
        f"{args.train_clips} clip(s) per class; the other {args.clips - args.train_clips} per class are fresh.",
        f"- Target federation: {len(roles['target-in'])} clients of one speaker each (members), "
        f"{len(roles['target-out'])} held-out speakers (non-members). Shadow federation: {len(roles['shadow-in'])} "
        f"members, {len(roles['shadow-out'])} non-members; all four groups disjoint.",
        f"- Training: `configs/arousal.yaml` (tiny backbone, 64 px, random init) with 1 + {args.rounds - 1} rounds, "
        f"{args.local_epochs} local epochs, all clients every round, {', '.join(plan['tuning'])}. "
        f"{len(classes)} classes: chance UAR {1 / len(classes):.3f}.",
        f"- DP: `federated.dp.mode=server`, fixed clipping norm {plan['clip_norm']:g} (median update norm without DP: "
        f"{norms['target']:.2f} over all rounds, {phase1:.2f} in phase 1), δ {plan['delta']:g}, noise multiplier z per "
        f"target ε ({args.epsilons}) after {args.rounds} releases; ε is the run's own (dp-accounting RDP).",
        "",
        "## Membership inference on the published model",
        "",
        "Attack: a speaker is called a member when the final global model's mean log-likelihood of the true labels on "
        "its trained clips (non-members: the same clip numbers) is above a threshold. AUC and TPR at a given FPR over "
        f"all thresholds (the ROC), 95 % bootstrap CI over speakers ({BOOT} resamples). Bound: the most TPR "
        "(ε, δ)-DP allows at that FPR, min(e^ε·FPR + δ, 1 − e^−ε·(1 − δ − FPR)); GDP: Φ(Φ⁻¹(FPR) + √R/z), the "
        "exact curve of R composed Gaussian releases. "
        f"With {rows[0]['nonmembers']} non-members an FPR of 1 % allows "
        f"{int(np.floor(0.01 * rows[0]['nonmembers'] + 1e-9))} false positive(s).",
        "",
        "| ε | z | devel UAR | AUC [95 % CI] | AUC bound (ε,δ) / GDP | TPR@1 % [CI] | bound (ε,δ) / GDP | "
        "TPR@10 % [CI] | bound (ε,δ) / GDP |",
        "|---|---:|---:|---|---|---|---|---|---|",
    ]
    for r in rows:
        z = "—" if r["noise"] is None else f"{r['noise']:g}"
        bounded = r["epsilon"] is not None  # without DP nothing is bounded: no column to compare with
        cells_ = [_eps(r["epsilon"]), z, f"{r['uar']:.3f}", f"{r['auc']:.3f} {_ci(r['auc_ci'])}",
                  f"{r['auc_bound']:.3f} / {r['auc_gdp_bound']:.3f}" if bounded else "—"]
        for fpr in FPRS:
            cells_ += [f"{r[f'tpr@{fpr}']:.3f} {_ci(r[f'tpr@{fpr}_ci'])}",
                       f"{r[f'bound@{fpr}']:.3f} / {r[f'gdp@{fpr}']:.3f}" if bounded else "—"]
        lines.append("| " + " | ".join(cells_) + " |")
    lines += [
        "",
        "Thresholds calibrated on the shadow federation (the attacker's own speakers, trained the same way) at a "
        "target FPR, applied to the target; and two variants of the score (AUC):",
        "",
        "| ε | shadow-calibrated at FPR 1 %: FPR, TPR | at FPR 10 %: FPR, TPR | member − non-member mean log-lik | "
        "shadow federation's own AUC [CI] | fresh clips AUC [CI] | reference-calibrated AUC [CI] | its TPR@10 % |",
        "|---|---|---|---:|---|---|---|---:|",
    ]
    for r in rows:
        cal = [f"{r[f'calibrated@{fpr}'][0]:.3f}, {r[f'calibrated@{fpr}'][1]:.3f}" for fpr in FPRS]
        lines.append(f"| {_eps(r['epsilon'])} | {cal[0]} | {cal[1]} | {r['gap']:+.3f} | "
                     f"{r['shadow_auc']:.3f} {_ci(r['shadow_auc_ci'])} | "
                     f"{r['fresh_auc']:.3f} {_ci(r['fresh_auc_ci'])} | {r['ref_auc']:.3f} {_ci(r['ref_auc_ci'])} | "
                     f"{r['ref_tpr@0.1']:.3f} |")
    lines += ["", "Shadow federation's own AUC: the same attack on the shadow model's members and non-members, a "
              "second training run of the same setting (how much the AUC varies between runs). "
              "Fresh clips: scored on clips no model trained on (membership of the speaker, not of the clip). "
              "Reference-calibrated: the target's score minus the shadow model's (which saw neither group) on the same "
              "speaker, an offline LiRA with one reference model; a full LiRA needs many shadow federations per "
              "speaker, more than this audit affords.", "", *membership_findings(rows), ""]
    lines += [
        "## Attribute inference on client updates",
        "",
        f"A phase-1-only federation of {len(probe_cell['clients'])} one-speaker clients (every corpus speaker but "
        f"the {plan['probe_devel']} it keeps as its devel set); each client's round-1 update (its head-slice delta, {len(next(iter(probe_cell['updates'].values())))} "
        "weights) is one example for a logistic regression (L2, its strength picked by an inner 3-fold CV; the "
        "updates divided by their RMS) predicting the speaker's attribute, 5-fold stratified cross-validation over "
        "clients; 95 % Clopper-Pearson CI; chance = the most common value. "
        "Raw: what the server sees without DP or in `dp.mode: server`; clipped: in `dp.mode: client`; clipped + "
        "noise N(0, (z·C)²) per weight: what one published round tells an adversary who knows every other client's "
        f"update (the noise drawn from OS entropy, as the mechanism draws it: the mean accuracy over {NOISE_DRAWS} "
        "independent draws, the CI as if of one draw, and the range of the draws; these rows change a little from "
        "one writing of the report to the next). The reference row gives the probe each speaker's mean backbone "
        "features (the frozen random backbone's output the head trains on): an attribute it cannot read there "
        "cannot be read from a head update either.",
        "",
        "| attribute | update seen | clients | accuracy [95 % CI] | chance | ε of this one round |",
        "|---|---|---:|---|---:|---:|",
    ]
    for p in probes:
        draws = "" if p["draws"] is None else f" (draws {p['draws'][0]:.3f}-{p['draws'][1]:.3f})"
        lines.append(f"| {p['attribute']} | {p['view']} | {p['clients']} | {p['accuracy']:.3f} {_ci(p['ci'])}{draws} | "
                     f"{p['chance']:.3f} | {_eps(p['epsilon_one_round'])} |")
    lines += ["", *probe_findings(probes), "", "![ROC curves and DP bounds; attribute probe](privacy_audit.png)", ""]
    return "\n".join(lines)


def membership_findings(rows: list[dict]) -> list[str]:
    """Sentences computed from the rows: does the attack work without DP, does every DP row stay in its bound."""
    out = []
    base = next((r for r in rows if r["noise"] is None), None)
    if base is not None:
        lo, hi = base["auc_ci"]
        verdict = ("above chance (CI excludes 0.5)" if lo > 0.5 else "not distinguishable from chance (CI includes 0.5)")
        s_lo, s_hi = base["shadow_auc_ci"]
        out.append(f"- Without DP the attack's AUC is {base['auc']:.3f} [{lo:.2f}, {hi:.2f}]: {verdict}; TPR "
                   f"{base['tpr@0.01']:.3f} at FPR 1 % and {base['tpr@0.1']:.3f} at FPR 10 %. On the shadow "
                   f"federation (same setting, other speakers) it is {base['shadow_auc']:.3f} [{s_lo:.2f}, {s_hi:.2f}].")
    for r in rows:
        if r["noise"] is None:
            continue
        over = [f"{fpr:.0%}" for fpr in FPRS if r[f"tpr@{fpr}"] > r[f"bound@{fpr}"] + 1e-12]
        gdp_over = [f"{fpr:.0%}" for fpr in FPRS if r[f"tpr@{fpr}"] > r[f"gdp@{fpr}"] + 1e-12]
        lo, hi = r["auc_ci"]
        chance = "includes" if lo <= 0.5 <= hi else "excludes"
        within = "within the (ε, δ) bound at both FPRs" if not over else f"ABOVE the (ε, δ) bound at FPR {', '.join(over)}"
        gdp = "" if not gdp_over else f"; above the GDP curve at FPR {', '.join(gdp_over)} (sampling noise of the estimate, or a bug)"
        out.append(f"- ε {_eps(r['epsilon'])} (z {r['noise']:g}): AUC {r['auc']:.3f} [{lo:.2f}, {hi:.2f}] ({chance} 0.5), "
                   f"devel UAR {r['uar']:.3f}; measured TPRs {within}{gdp}.")
    return out


def probe_findings(probes: list[dict]) -> list[str]:
    out = []
    for attribute in dict.fromkeys(p["attribute"] for p in probes):
        parts = []
        for p in (q for q in probes if q["attribute"] == attribute):
            above = "above" if p["ci"][0] > p["chance"] else "not above"
            parts.append(f"{p['view']} {p['accuracy']:.3f} ({above} chance {p['chance']:.3f})")
        out.append(f"- {attribute}: " + "; ".join(parts) + ".")
    return out


def figure(rows: list[dict], probes: list[dict]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.2), dpi=100)
    roc_lin, roc_log, bars = fig.subplots(1, 3)
    grid = np.logspace(-4, 0, 400)
    for i, r in enumerate(rows):
        colour = f"C{i}"
        label = "no DP" if r["noise"] is None else f"ε {_eps(r['epsilon'])}"
        fpr, tpr = r["roc"]
        for ax in (roc_lin, roc_log):
            ax.step(fpr, tpr, where="post", color=colour, label=f"{label} (AUC {r['auc']:.2f})")
            if r["epsilon"] is not None:
                ax.plot(grid, mia.dp_tpr_bound(grid, r["epsilon"], r["delta"]),
                        color=colour, linestyle="--", linewidth=1)
                ax.plot(grid, mia.gdp_tpr_bound(grid, r["mu"]), color=colour, linestyle=":", linewidth=1)
    for ax in (roc_lin, roc_log):
        ax.plot([1e-4, 1], [1e-4, 1], color="grey", linewidth=0.8)
        ax.set_xlabel("FPR (non-member speakers called members)")
        ax.set_ylabel("TPR (member speakers found)")
    roc_lin.set_title("speaker membership: ROC, -- (ε,δ) bound, ··· GDP", fontsize=9)
    roc_lin.set_xlim(0, 1), roc_lin.set_ylim(0, 1.01)
    roc_log.set_xscale("log"), roc_log.set_yscale("log")
    roc_log.set_xlim(1e-3, 1), roc_log.set_ylim(1e-3, 1.05)
    roc_log.set_title("same, log-log", fontsize=9)
    roc_lin.legend(fontsize=7, loc="lower right")
    attributes = list(dict.fromkeys(p["attribute"] for p in probes))
    views = list(dict.fromkeys(p["view"] for p in probes))
    width = 0.8 / len(attributes)
    for j, attribute in enumerate(attributes):
        sel = [p for p in probes if p["attribute"] == attribute]
        xs = np.arange(len(views)) + (j - (len(attributes) - 1) / 2) * width
        acc = np.array([p["accuracy"] for p in sel])
        err = np.array([[p["accuracy"] - p["ci"][0], p["ci"][1] - p["accuracy"]] for p in sel]).T
        bars.bar(xs, acc, width, yerr=err, capsize=2, color=f"C{j}", label=attribute)
        bars.hlines(sel[0]["chance"], xs[0] - width / 2, xs[-1] + width / 2, color=f"C{j}", linestyle=":", linewidth=1)
    short = [v.replace("clipped + noise ", "+ noise\n").replace("reference: mean backbone features (not sent)",
                                                                   "backbone\nfeatures (ref.)")
             .replace("raw update", "raw\nupdate").replace("clipped to ", "clipped\nto ") for v in views]
    bars.set_xticks(np.arange(len(views)), short, fontsize=7)
    bars.set_ylim(0, 1)
    bars.set_ylabel("probe accuracy (dotted: chance)")
    bars.set_title("attribute inference from round-1 updates", fontsize=9)
    bars.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig
