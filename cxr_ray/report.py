"""The study report: one self-contained HTML page, its Markdown twin, and every figure and table.

The report reads only what the study wrote (through ``storage``, so a study on s3:// reads like a
local one) and never needs Ray, so it can be re-run at any time: over a finished study, a running
one, or one that was killed. What a missing file would have shown becomes a sentence naming the
file and the stage that writes it, so a partial report says what it lacks instead of crashing.

Sections, in reading order: the verdict, the fairness audit (is the comparison fair, as run?),
the tables, the figures, and how to reproduce it. The content is built once as a list of blocks
and rendered twice (HTML with figures inlined as data URIs, so it opens from disk with no server;
Markdown linking the PNG files next to it).
"""
from __future__ import annotations

import base64
import html
import importlib.metadata
import math
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import (evaluation, failures, figures, metrics, model_card, operating, spec as specs, storage,
               subgroups)
from .figures import METRIC_LABELS
from .results import Missing, Study

METRIC_NAMES = {"auroc": "AUROC", "f1": "F1", "ece": "ECE"}
PACKAGES = ("cxr-ray", "ray", "torch", "timm", "numpy", "pandas", "matplotlib")
ENGINES_IN_WORDS = {"tune": "the training loop inside each Tune trial", "train": "one Ray Train run per trial"}


# ----------------------------------------------------------------------------- the document

@dataclass
class Block:
    """One piece of a section. kind: text, warn (red box), note (grey: something is missing),
    code, table (``df`` saved as ``name``.csv) or figure (``png`` saved as ``name``.png)."""
    kind: str
    text: str = ""
    name: str = ""
    df: pd.DataFrame | None = None
    png: bytes = b""


def guarded(title: str, build) -> list[Block]:
    """The blocks ``build`` returns, or a sentence saying why they are not there. Anything unexpected
    in a half-written directory becomes a red note rather than taking the whole report down."""
    try:
        return build()
    except Missing as e:
        return [Block("note", f"{title}: not shown, because {e}.")]
    except Exception as e:  # noqa: BLE001 - reported in the page itself
        return [Block("warn", f"{title} could not be shown ({type(e).__name__}: {e}).")]


def fmt(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return "–" if math.isnan(value) else f"{value:.4g}"
    return str(value)


# ----------------------------------------------------------------------------- 1. verdict

def verdict(s: Study) -> list[Block]:
    blocks = []
    source = (s.data_report or {}).get("source") or s.spec.data.source
    if source == "synthetic":
        blocks.append(Block("warn", "SYNTHETIC DEMO DATA, NOT MEDICAL DATA: the images of this study were drawn by "
                                    "cxr_ray.synthetic. Nothing here says anything about chest X-rays or patients."))
    blocks += [Block("warn", f"{s.why(name)}; what depends on it is left out.") for name in s.unreadable]
    if s.summary is None or s.summary.empty:
        progress = search_progress(s)
        return blocks + [Block("text", f"Final evaluation not run yet: {s.why('summary.csv')}. {progress}")]
    top = s.summary.iloc[0]
    text = evaluation.verdict_text(s.summary, s.comparison, s.spec.final.bootstrap)
    if s.comparison is None and len(s.summary) > 1:
        text += f" ({s.why('comparison.csv')}.)"
    if s.best is not None and s.best.get("arm") == top["arm"]:
        text += (f" The model to serve is its seed-{s.best['seed']} run (picked on validation, not test), "
                 f"used at threshold {s.best['threshold']:.3f}.")
    for ext in s.externals.values():
        if ext.verdict:
            text += " " + ext.verdict["verdict"]
    if not s.externals:
        text += " " + no_external_set(s)
    if s.spec.subgroups and s.subgroups is not None and len(s.subgroups):
        text += " " + subgroups.verdict_sentence(subgroup_sets(s, 0), served_arm(s))
    blocks.append(Block("text", text))
    if s.best is None:
        blocks.append(Block("note", f"No model chosen to serve yet: {s.why('best.json')}."))
    elif s.best.get("arm") != top["arm"]:
        blocks.append(Block("warn", f"best.json names {s.best.get('arm')} as the best arm, but summary.csv ranks "
                                    f"{top['arm']} first: the two files come from different evaluations."))
    return blocks + [Block("warn", c) for c in evaluation.caveats(s.spec, s.summary) + served_point_caveat(s)]


def served_point_caveat(s: Study) -> list[str]:
    points, best = s.validation_points, s.best or {}
    served = None if points is None else points[(points.arm == best.get("arm")) & (points.seed == best.get("seed"))]
    return [] if served is None or not len(served) else operating.fragile_caveat(served.iloc[0])


def operating_points(s: Study) -> list[Block]:
    """Per final run and seed ensemble: the validation interval of its operating point, the chosen
    point, what it costs at the validation and the site's prevalence, and where it lands on each
    external set."""
    s.need_table(s.validation_points, "validation_points.csv")
    points, t = s.validation_points, s.spec.threshold
    youden = t.policy == "youden"
    table = pd.DataFrame({
        "arm": points["arm"], "model": np.where(points["seed"] == -1, "ensemble", "seed " + points["seed"].astype(str)),
        "threshold": points["threshold"], "validation interval": [
            f"{r.interval_low:.3f}-{r.interval_high:.3f} ({r.interval_logits:.2f} logits{', FRAGILE' if r.fragile else ''})"
            for r in points.itertuples()],
        "bootstrap 95%": [f"{r.boot_low:.3f}-{r.boot_high:.3f}" for r in points.itertuples()],
        "plain rule": points["plain_threshold"], "val sens / spec": [
            f"{r.val_sensitivity:.3f} / {r.val_specificity:.3f}" for r in points.itertuples()]})
    for name, pi in (("val", "validation"), ("site", "site")):
        if points[f"{name}_prevalence"].notna().any():
            table[f"PPV / NPV / accuracy at {pi} prevalence {points[f'{name}_prevalence'].iloc[0]:.2f}"] = [
                f"{getattr(r, name + '_expected_ppv'):.3f} / {getattr(r, name + '_expected_npv'):.3f} / "
                f"{getattr(r, name + '_expected_accuracy'):.3f}" for r in points.itertuples()]
    named = {e.name: e.prevalence for e in s.spec.external if e.prevalence is not None}
    for name, ext in s.externals.items():
        cells = operating.landing(points, name, ext.final, ext.predictions, ext.ensembles)
        table[f"{name} sens / spec"] = [cells.get((r.arm, int(r.seed)), "–") for r in points.itertuples()]
        if name in named:
            costs = [operating.expected(r.val_sensitivity, r.val_specificity, named[name]) for r in points.itertuples()]
            table[f"PPV / NPV / accuracy at {name} prevalence {named[name]:.2f}"] = [
                f"{c['ppv']:.3f} / {c['npv']:.3f} / {c['accuracy']:.3f}" for c in costs]
    interval = "J within one bootstrap SD of its maximum" if youden else "the 95% bootstrap interval of the point"
    chosen = "its middle on the logit scale" if youden else "the plain rule on all of validation"
    return [Block("text", f"Every point is chosen on validation by the study's policy "
                          f"({policy_name(t.policy, t.target)}) and bootstrapped over validation patients "
                          f"(validation_points.csv). The validation interval holds the thresholds validation cannot "
                          f"tell apart from the best ({interval}); the chosen point is {chosen}. "
                          f"An interval wider than {operating.FRAGILE_LOGITS:g} logit is FRAGILE: where the point lands "
                          f"inside it is not settled by validation. Sensitivity / specificity on each external set at "
                          f"the point (and at the interval's ends) show what that costs on data collected apart."),
            Block("table", "Operating points on validation, and where they land (validation_points.csv).",
                  "validation_points", table)]


def search_progress(s: Study) -> str:
    if s.trial_summary is None or s.trial_summary.empty:
        return (f"The search has not finished either ({s.why('trial_summary.csv')}); "
                f"`cxr-ray study status {s.dir}` shows the trials running now.")
    col, asc = f"last_{s.metric}", s.mode == "min"
    parts = []
    for arm, g in s.trial_summary.groupby("arm", sort=False):
        row = g.sort_values(col, ascending=asc, kind="stable").iloc[0]
        parts.append(f"{arm} {row[col]:.3f} (configuration {row['config_id']}, {len(g)} trials)")
    return f"Search results so far, best {METRIC_LABELS.get(s.metric, s.metric)} per arm: " + "; ".join(parts) + "."


# ----------------------------------------------------------------------------- 2. internal vs external

def internal_vs_external(s: Study) -> list[Block]:
    if not s.externals:
        return [Block("note", no_external_set(s))]
    s.need("summary.csv")
    blocks = []
    for name, ext in s.externals.items():
        blocks += guarded(f"External set {name}", lambda name=name, ext=ext: external_blocks(s, name, ext))
    return blocks


def no_external_set(s: Study) -> str:
    return ("No external set has been scored: these figures come from data collected with the training images, "
            "and may not transfer. Name one in the spec (external:) or run "
            f"`cxr-ray evaluate {s.dir} --external NAME=PATH`.")


def external_blocks(s: Study, name: str, ext) -> list[Block]:
    a = ext.audit or {}
    blocks = [Block("text", f"External set {name}: {a.get('images', '?')} images ({set_source(a)}), "
                            f"{a.get('scored_images', '?')} scored; each final run scored once at the operating "
                            f"point it chose on validation, nothing retrained.")]
    if a.get("notes"):
        blocks.append(Block("note", f"Noted when {name} was listed: " + "; ".join(a["notes"]) + "."))
    same, shared = a.get("same_bytes", {}), a.get("shared_patient_ids", {})
    blocks.append(Block("warn" if same.get("images") else "text",
                        f"Overlap with the study's images: {same.get('images', 0)} byte-identical "
                        f"({split_counts(same)}), {shared.get('images', 0)} whose patient id the study also has "
                        f"({split_counts(shared)}). {a.get('policy', '')}"))
    if ext.verdict:
        blocks.append(Block("text", ext.verdict["verdict"]))
    internal, external = s.summary.set_index("arm"), ext.summary.set_index("arm")
    rows = []
    for arm in internal.index:
        if arm not in external.index:
            continue
        i, e = internal.loc[arm], external.loc[arm]
        rows.append({"arm": arm, "test AUROC": evaluation.ci_text(i, "auroc"),
                     f"{name} AUROC": evaluation.ci_text(e, "auroc"), "AUROC gap": e["auroc"] - i["auroc"],
                     "test accuracy": evaluation.ci_text(i, "accuracy"),
                     f"{name} accuracy": evaluation.ci_text(e, "accuracy"), "accuracy gap": e["accuracy"] - i["accuracy"],
                     "sensitivity test → ext": f"{i['sensitivity']:.3f} → {e['sensitivity']:.3f}",
                     "specificity test → ext": f"{i['specificity']:.3f} → {e['specificity']:.3f}",
                     "ECE test → ext": f"{i['ece']:.3f} → {e['ece']:.3f}"})
    blocks.append(Block("table", f"Internal test vs {name}, per arm (mean over final seeds, 95% patient-bootstrap CIs; "
                                 f"external/{name}/summary.csv). Sensitivity and specificity at each run's "
                                 f"validation-chosen threshold: the shift is what the threshold costs on new data.",
                        f"external_{name}", pd.DataFrame(rows)))
    if ext.comparison is not None and len(ext.comparison):
        blocks.append(Block("table", f"Paired comparison on {name} against the arm the study chose "
                                     f"(external/{name}/comparison.csv).", f"external_{name}_comparison",
                            bootstrap_p(ext.comparison[[c for c in ("arm", "versus", "delta_auroc", "delta_ci_low",
                                                                    "delta_ci_high", "p_holm", "p_delong", "p_mcnemar",
                                                                    "verdict") if c in ext.comparison]], s)))
    if ext.ensembles is not None and len(ext.ensembles):
        blocks.append(Block("table", f"Seed ensembles on {name} (external/{name}/ensembles.csv).",
                            f"external_{name}_ensembles", ci_table(ext.ensembles, "ensembles", s)))
    if ext.operating_points is not None and s.operating_points is not None:
        both = policy_means(s.operating_points, "operating_points.csv", s).merge(
            policy_means(ext.operating_points, "operating_points", s), on=["arm", "policy"], suffixes=("", f" {name}"))
        blocks.append(Block("table", f"What each threshold policy costs, on test and on {name} (each chosen on "
                                     f"validation; mean over each arm's final seeds).", f"external_{name}_policies",
                            both))
    if ext.summary_without_shared_patient_ids is not None:
        apart = ext.summary_without_shared_patient_ids
        blocks.append(Block("table", f"{name} without the images whose patient id the study also has (the overlap "
                                     f"policy's second reading).", f"external_{name}_apart", ci_table(apart, "", s)))
    for kind, draw in (("roc", figures.roc_curves), ("calibration", figures.reliability_diagram)):
        def build(kind=kind, draw=draw):
            fig, caption = draw(s, ext.predictions, f"{name} (external)")
            return [Block("figure", caption, f"external_{name}_{kind}", png=figures.png(fig))]
        if ext.predictions is not None:
            blocks += guarded(f"{kind} on {name}", build)
    return blocks


def set_source(audit: dict) -> str:
    src = audit.get("set", {})
    if src.get("source") == "synthetic":
        return f"synthetic, seed {src.get('synthetic_seed')}, shift {src.get('synthetic_shift')}"
    return f"{src.get('source', '?')}: {src.get('path')}" + (f", split {src['split']}" if src.get("split") else "")


def split_counts(found: dict) -> str:
    counts = found.get("in_splits", {})
    return ", ".join(f"{n} in {k}" for k, n in counts.items() if n) or "none"


# ----------------------------------------------------------------------------- 2b. subgroups

def subgroup_sets(s: Study, which: int) -> dict[str, pd.DataFrame]:
    """Each scored set's subgroups.csv (``which`` 0) or subgroup_comparison.csv (1): test first."""
    found = {"test": (s.subgroups, s.subgroup_comparison),
             **{name: (e.subgroups, e.subgroup_comparison) for name, e in s.externals.items()}}
    return {name: subgroups.as_read(pair[which]) for name, pair in found.items()
            if pair[which] is not None and len(pair[which])}


def served_arm(s: Study) -> str:
    return s.best["arm"] if s.best else s.summary.iloc[0]["arm"]


def subgroup_blocks(s: Study) -> list[Block]:
    s.need("subgroups.csv")
    tables, comparisons = subgroup_sets(s, 0), subgroup_sets(s, 1)
    spec = s.spec
    blocks = [Block("text", f"Results per subgroup of {', '.join(spec.subgroups)}"
                            + (f" (age bands {', '.join(subgroups.band_labels(spec.age_bands))})"
                               if subgroups.AGE_BAND in spec.subgroups else "")
                            + f" for every arm: the mean over its final seeds, each run at its validation-chosen "
                              f"threshold, with 95% CIs from resampling the set's patients. A subgroup with fewer "
                              f"than {spec.subgroup_min} images or a single class is shown as too few, not scored. "
                              f"Each arm is compared with the set's reference arm by the paired bootstrap of "
                              f"comparison.csv, Holm-adjusted over the subgroups.")]
    for name, table in tables.items():
        where, prefix = ("the test split", "") if name == "test" else (f"{name} (external)", f"external/{name}/")
        compared = comparisons.get(name)
        blocks += [Block("text", subgroups.verdict_text(table, compared, served_arm(s), where)),
                   Block("table", f"Subgroups of {where} ({prefix}subgroups.csv).", f"subgroups_{name}",
                         subgroups.readable(table))]
        if compared is not None and (compared["status"] == subgroups.SCORED).any():
            blocks.append(Block("table", f"Does the verdict between arms hold in each subgroup of {where}? "
                                         f"({prefix}subgroup_comparison.csv)", f"subgroup_comparison_{name}",
                                bootstrap_p(subgroups.readable_comparison(compared), s)))

    def forest():
        fig, caption = figures.subgroup_forest(s, tables)
        return [Block("figure", caption, "subgroups_forest", png=figures.png(fig))]
    return blocks + guarded("Subgroup forest plot", forest)


# ----------------------------------------------------------------------------- 3. fairness audit

def fairness(s: Study) -> list[Block]:
    spec, b, f = s.spec, s.spec.budget, s.spec.final
    blocks = [Block("text", f"Spec hash {s.spec_hash}. "
                    + ("" if spec.unmatched else "Every arm is given the same search space, budget, data split and "
                                                 "seeds, listed here together with what each arm actually consumed."))]
    if spec.unmatched:
        blocks.append(Block("warn", "UNMATCHED SPEC (unmatched: true): the arms ran with different settings, so this "
                                    "is a replication of separate experiments, not a fair comparison of backbones. "
                                    "Per-arm settings: "
                                    + "; ".join(f"{a.name}: {own_settings(a)}" for a in spec.arms) + "."))
    blocks += [Block("table", "Arms: backbone, weights and size.", "arms", arms_table(s)),
               Block("table", "Shared settings: the one search space, fixed settings and model options.",
                     "shared_settings", settings_table(s)),
               Block("text", f"Budget per arm (spec): {b.samples_per_arm} configurations, each up to "
                             f"{b.max_epochs} epochs, stopped by ASHA within its own arm (grace period "
                             f"{b.grace_period}, reduction factor {b.reduction_factor}, rungs at epoch(s) "
                             f"{', '.join(map(str, b.milestones)) or 'none'}); then the best configuration retrained "
                             f"for {final_epochs(s)} epochs with each final seed. Consumed epochs "
                             f"differ between arms by design: ASHA stops each arm's weaker trials early. "
                             f"Trials ran on engine {spec.engine} ({ENGINES_IN_WORDS[spec.engine]}).")]
    blocks += guarded("Budget consumed per arm", lambda: [Block("table", "Budget consumed per arm (budget.csv): "
                                                                "search trials, epochs, trials reaching each rung, "
                                                                "compute seconds (trial training loops x workers x "
                                                                "CPUs or GPUs per worker) and wall seconds.",
                                                                "budget", consumed(s))])
    blocks.append(Block("text", f"Seeds: search seed {spec.seed} (it draws the configurations once, so every arm sees "
                                f"the same values, and every search trial trains with it); final seeds "
                                f"{', '.join(map(str, f.seeds))}."))
    blocks += guarded("Data split", lambda: split_blocks(s))
    blocks += guarded("The departure checks", lambda: [Block("warn", d) for d in departures(s)])
    return blocks


def final_epochs(s: Study) -> str:
    per_arm = {a: s.spec.final_epochs_for(a) for a in s.arms}
    if len(set(per_arm.values())) == 1:
        return str(next(iter(per_arm.values())))
    return "each arm's own (" + ", ".join(f"{a} {e}" for a, e in per_arm.items()) + ")"


def own_settings(arm: specs.Arm) -> str:
    return ", ".join(f"{k}={v}" for k, v in arm.settings.items()) or "no own settings"


def arms_table(s: Study) -> pd.DataFrame:
    rows = []
    for a in s.spec.arms:
        n = s.parameters[a.name]
        rows.append({"arm": a.name, "backbone": a.backbone, "pretrained": a.pretrained,
                     "parameters (millions)": n / 1e6 if n is not None else float("nan"),
                     **({"own settings": own_settings(a)} if s.spec.unmatched else {})})
    return pd.DataFrame(rows)


def settings_table(s: Study) -> pd.DataFrame:
    rows = [{"setting": k, "value": f"{next(iter(d))} {next(iter(d.values()))}", "role": "searched"}
            for k, d in s.spec.search_space.items()]
    rows += [{"setting": k, "value": v, "role": "fixed"} for k, v in s.spec.fixed.items()]
    rows += [{"setting": k, "value": v, "role": "model"} for k, v in s.spec.model.items()]
    rows += [{"setting": "image_size", "value": s.spec.data.image_size, "role": "data"},
             {"setting": "selection metric", "value": f"{s.metric} ({s.mode})", "role": "selection"}]
    return pd.DataFrame(rows, columns=["setting", "value", "role"])


def consumed(s: Study) -> pd.DataFrame:
    s.need("budget.csv")
    return s.budget


def split_blocks(s: Study) -> list[Block]:
    s.need("split.csv")
    sp = s.split[s.split["split"].isin(["train", "val", "test"])]
    table = (sp.groupby("split").agg(images=("item", "size"), patients=("patient", "nunique"),
                                     pneumonia_fraction=("label", "mean"))
             .reindex(["train", "val", "test"]).dropna(how="all").reset_index())
    dr = s.data_report or {}
    shared = sp.groupby("patient")["split"].nunique()
    leaked = list(shared[shared > 1].index)
    text = (f"Data: {dr.get('source', s.spec.data.source)} ({dr.get('path', s.spec.data.path)}), "
            f"{len(s.split)} images listed in split.csv, {len(sp)} of them in train/val/test"
            + ("; no patient has images in two splits." if not leaked else "."))
    blocks = [Block("table", text, "split", table)]
    if dr.get("split_level") == "image":
        blocks.append(Block("warn", "IMAGE-LEVEL SPLIT: the data carries no patient ids (a source without them, or a "
                                    "manifest read with patient: image), so every image counts as its own patient. "
                                    "Images of one patient can sit in training and in test; a model that recognises "
                                    "the patient (anatomy, devices, positioning) rather than the finding then scores "
                                    "higher on test than it would on new patients."))
    elif dr.get("images_without_patient_id"):
        blocks.append(Block("note", f"{dr['images_without_patient_id']} image(s) have no patient id and count as "
                                    "their own patient each: they are split by image, the others by patient."))
    if leaked:
        blocks.append(Block("warn", f"{len(leaked)} patient(s) have images in more than one split (e.g. "
                                    f"{', '.join(map(str, leaked[:3]))}): test images are not independent of "
                                    f"training."))
    return blocks


def departures(s: Study) -> list[str]:
    """Where the study as run differs from the fair design the spec promises."""
    out, spec = [], s.spec
    if not spec.unmatched:  # spec validation already keeps a matched spec's epoch budgets equal
        if s.budget is not None and not s.budget.empty:
            trials = dict(zip(s.budget["arm"], s.budget["trials"]))
            if len(set(trials.values())) > 1 or set(trials.values()) != {spec.budget.samples_per_arm}:
                out.append(f"Arms ran different numbers of search trials (the spec gives each "
                           f"{spec.budget.samples_per_arm}): "
                           + ", ".join(f"{a} {n}" for a, n in trials.items()) + ".")
    ts = s.trial_summary
    if ts is not None and not ts.empty:
        hp = [c for c in ts.columns if c.startswith("hp_")]
        if not spec.unmatched and hp and (ts.groupby("config_id")[hp].nunique(dropna=False) > 1).any().any():
            out.append("The same configuration id carries different hyperparameters in different arms: "
                       "the arms were not trained on the same configurations.")
        cut = ts[ts["outcome"].isin(["unfinished", "error"])]
        if len(cut):
            out.append(f"{len(cut)} search trial(s) ended without completing or being stopped by ASHA (killed or "
                       f"failed, and not continued): " + ", ".join(
                           f"{r.trial_id} ({r.arm}, {r.outcome} at epoch {r.epochs})" for r in cut.itertuples())
                       + ". Their arms used less search budget than planned.")
    if s.final is not None and not s.final.empty:
        ran = set(zip(s.final["arm"], s.final["seed"].astype(int)))
        gaps = [f"{a} seed {seed}" for a in s.arms for seed in spec.final.seeds if (a, seed) not in ran]
        if gaps:
            out.append("Missing final runs: " + ", ".join(gaps) + ".")
    if s.final_trials is not None and not s.final_trials.empty and "epoch" in s.final_trials:
        last = s.final_trials.dropna(subset=["epoch"]).groupby(["arm", "seed"])["epoch"].max()
        short = [f"{a} seed {seed} ({int(e)} of {spec.final_epochs_for(a)})" for (a, seed), e in last.items()
                 if a in s.arms and e < spec.final_epochs_for(a)]
        if short:
            out.append("Final runs that stopped before their epoch budget: " + ", ".join(short) + ".")
    if s.spec_hash != spec.hash:
        out.append(f"spec.yaml records hash {s.spec_hash}, but this cxr_ray resolves its content to {spec.hash}: "
                   f"the file was edited, or written by a cxr_ray version with other spec defaults. This report "
                   f"reads the spec as this version does.")
    if s.study is not None and s.study.get("spec_hash") not in (None, s.spec_hash):
        out.append(f"study.json records spec hash {s.study['spec_hash']} but spec.yaml records {s.spec_hash}.")
    return out


# ----------------------------------------------------------------------------- 4. tables

def tables(s: Study) -> list[Block]:
    return (guarded("Final test metrics per arm", lambda: [Block(
                "table", "Final test metrics per arm (summary.csv): mean over final seeds, 95% CI from resampling "
                         "test patients in brackets; each run at its validation-chosen threshold.",
                "final_metrics", final_metrics_table(s))])
            + guarded("Paired comparison", lambda: comparison_blocks(s))
            + guarded("Seed ensembles", lambda: [Block(
                "table", "Each arm's seed ensemble (ensembles.csv): the mean probability of its final runs, at its own "
                         "operating point chosen on validation; 95% CIs from resampling test patients.",
                "ensembles", ci_table(s.ensembles, "ensembles.csv", s))])
            + guarded("Operating points", lambda: [Block(
                "table", f"What each threshold policy costs (operating_points.csv): the point each policy picks on "
                         f"validation and the test sensitivity/specificity it gives, mean over each arm's final seeds. "
                         f"This study serves {policy_name(s.spec.threshold.policy, s.spec.threshold.target)}.",
                "operating_points", policy_means(s.operating_points, "operating_points.csv", s))])
            + guarded("Best configuration per arm", lambda: [Block(
                "table", f"Best configuration per arm (best_configs.json): the best last-epoch {s.metric} among the "
                         f"arm's trials that ran the full budget.", "best_configs", best_configs_table(s))])
            + guarded("Search trials", lambda: [Block(
                "table", f"Every search trial (trial_summary.csv), best first by its last {s.metric}.",
                "trials", trials_table(s))]))


def ci_table(table: pd.DataFrame | None, name: str, s: Study) -> pd.DataFrame:
    """A summary-shaped table (metric, metric_ci_low, metric_ci_high columns) with each CI in one cell."""
    s.need_table(table, name)
    keep = [c for c in ("arm", "seeds", "members", "threshold") if c in table]
    return pd.DataFrame([{**{c: r[c] for c in keep},
                          **{METRIC_NAMES.get(m, m): evaluation.ci_text(r, m) for m in metrics.REPORTED}}
                         for _, r in table.iterrows()])


def policy_name(policy: str, target: float | None) -> str:
    if policy in ("sensitivity", "specificity"):
        return f"{policy} at least {target:g}"
    return {"youden": "the Youden point", "calibrated": "0.5 after Platt calibration"}[policy]


def policy_means(points: pd.DataFrame | None, name: str, s: Study) -> pd.DataFrame:
    s.need_table(points, name)
    out = points.assign(policy=[policy_name(p, t if pd.notna(t) else None) for p, t in zip(points["policy"],
                                                                                           points["target"])])
    return (out.groupby(["arm", "policy"], sort=False)[["sensitivity", "specificity", "accuracy"]].mean()
            .reset_index())


def final_metrics_table(s: Study) -> pd.DataFrame:
    s.need("summary.csv")
    rows = [{"arm": r["arm"], "seeds": int(r["seeds"]), "missing seeds": int(r["missing_seeds"]),
             **{METRIC_NAMES.get(m, m): evaluation.ci_text(r, m) for m in metrics.REPORTED},
             "AUROC seed SD": r["auroc_seed_sd"]}
            for _, r in s.summary.iterrows()]
    return pd.DataFrame(rows)


def comparison_blocks(s: Study) -> list[Block]:
    s.need("summary.csv")
    if len(s.summary) < 2:
        return [Block("text", "Paired comparison: only one arm was evaluated, there is nothing to compare.")]
    s.need("comparison.csv")
    cols = ["arm", "versus", "delta_auroc", "delta_ci_low", "delta_ci_high", "p_bootstrap", "p_holm", "p_delong",
            "p_mcnemar", "only_arm_correct", "only_best_correct", "verdict"]
    return [Block("table", "Paired comparison with the best arm (comparison.csv): difference in seed-mean test AUROC "
                           "with a paired patient-bootstrap 95% CI and p-value (Holm-adjusted: p_holm, the primary "
                           "test), DeLong's test on seed-averaged probabilities, McNemar's test on decisions.",
                  "comparison", bootstrap_p(s.comparison[[c for c in cols if c in s.comparison]], s))]


def bootstrap_p(comparison: pd.DataFrame, s: Study) -> pd.DataFrame:
    """The bootstrap's p-values (raw and Holm-adjusted) as a reader should see them: 0 only says
    p < 1/B, B resamples (the verdict's words, evaluation.p_text)."""
    below = f"< {1 / s.spec.final.bootstrap:.2g}"
    return comparison.assign(**{c: [below if p == 0 else p for p in comparison[c]]
                                for c in ("p_bootstrap", "p_holm") if c in comparison})


def best_configs_table(s: Study) -> pd.DataFrame:
    s.need("best_configs.json")
    configs = s.configs.set_index("config_id") if s.configs is not None and not s.configs.empty else None
    rows = []
    for arm, b in s.best_configs.items():
        params = dict(configs.loc[b["config_id"]]) if configs is not None and b["config_id"] in configs.index \
            else b["params"]
        rows.append({"arm": arm, "config_id": b["config_id"], **params, s.metric: b.get(s.metric),
                     "epochs": b.get("epochs"), "trial_id": b.get("trial_id")})
    return pd.DataFrame(rows)


def trials_table(s: Study) -> pd.DataFrame:
    s.need("trial_summary.csv")
    t = s.trial_summary.sort_values(f"last_{s.metric}", ascending=s.mode == "min", kind="stable")
    return t[[c for c in t.columns if c not in ("checkpoint", "seed")]]


# ----------------------------------------------------------------------------- 5. figures

def figure_blocks(s: Study) -> list[Block]:
    blocks = []
    for name, title, draw in figures.DRAWINGS:
        def build(draw=draw, name=name, title=title):
            fig, caption = draw(s)
            return [Block("figure", f"{title}. {caption}", name, png=figures.png(fig))]
        blocks += guarded(title, build)
    return blocks


# ----------------------------------------------------------------------------- 6. failure cases, model card

def failure_cases(s: Study) -> list[Block]:
    sets = failures.failure_sets(s)
    failures.attach_grids(s, sets)
    arm, seed = failures.served_run(s)
    blocks = [Block("text", f"The served model's ({arm}, seed {seed}) most confident errors: up to "
                            f"{failures.PER_KIND} false positives (NORMAL images with the highest P(pneumonia)) and "
                            f"{failures.PER_KIND} false negatives (PNEUMONIA images with the lowest), each at the "
                            f"run's validation-chosen threshold, with Grad-CAM of the last feature maps over the "
                            f"image the model saw.")]
    for fs in sets:
        blocks.append(Block("table", f"Most confident errors on {fs.where} (failures_{fs.name}.csv).",
                            f"failures_{fs.name}", fs.cases))
        if fs.png:
            blocks.append(Block("figure", f"Most confident errors on {fs.where}: false positives in the top row, "
                                          f"false negatives below; score and threshold above each image.",
                                f"failures_{fs.name}", png=fs.png))
        else:
            blocks.append(Block("note", f"Thumbnails for {fs.where}: none drawn, because {fs.why_no_grid}."))
    return blocks


def card_blocks(s: Study) -> list[Block]:
    card = model_card.build(s)
    return ([Block("text", f"{card['intended_use']['use']} The full card, with training data, selection and "
                           f"subgroup results, is model_card.md (model_card.json) next to this report, and "
                           f"GET /v1/model/card on a server of this model.")]
            + [Block("text", f"Known limit: {x}") for x in card["limits"]])


# ----------------------------------------------------------------------------- 7. reproduction

def reproduction(s: Study) -> list[Block]:
    blocks = []
    if s.study is None:
        blocks.append(Block("note", f"Command and Ray resources not available yet: {s.why('study.json')}."))
    else:
        wall = s.study.get("driver_wall_s", float("nan"))
        blocks += [Block("text", f"The study ran as (driver wall time {wall:.0f} s):"),
                   Block("code", s.study.get("command", "")),
                   Block("table", "Ray cluster resources at the end of the study (study.json).", "ray_resources",
                         pd.DataFrame([{"resource": k, "amount": f"{v / 2**30:.1f} GiB" if "memory" in k else fmt(v)}
                                       for k, v in sorted(s.study.get("ray_resources", {}).items())]))]
    blocks += [Block("text", f"Spec hash {s.spec_hash} (spec.yaml). To continue this study (finished trials are "
                             f"kept, unfinished ones resume from their last checkpoint):"),
               Block("code", f"cxr-ray study resume {s.dir}"),
               Block("table", "Package versions in the environment that wrote this report.", "packages",
                     pd.DataFrame([{"package": p, "version": version(p)} for p in PACKAGES]))]
    return blocks


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ----------------------------------------------------------------------------- rendering

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:2px solid #0072B2;padding-bottom:.2em;margin-top:2em}
.warn{border:2px solid #c00;background:#fdecea;color:#900;padding:.6em .9em;margin:.8em 0;font-weight:600}
.note{color:#555;font-style:italic;border-left:3px solid #bbb;padding-left:.7em}
table{border-collapse:collapse;font-size:.86em;margin:.4em 0 1.2em}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:left;white-space:nowrap}
th{background:#eef3f8;white-space:normal;vertical-align:bottom}
.wide{overflow-x:auto}.scroll{max-height:32em;overflow:auto}p,.warn,.note{overflow-wrap:anywhere}
figure{margin:1.2em 0}img{max-width:100%;height:auto}figcaption,.caption{font-size:.9em;color:#333}
pre{background:#f4f4f4;padding:.6em;overflow-x:auto}
"""


def render_html(title: str, sections: list[tuple[str, list[Block]]]) -> str:
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for heading, blocks in sections:
        out.append(f"<h2>{html.escape(heading)}</h2>")
        for b in blocks:
            text = html.escape(b.text)
            if b.kind == "text":
                out.append(f"<p>{text}</p>")
            elif b.kind in ("warn", "note"):
                out.append(f"<div class='{b.kind}'>{text}</div>")
            elif b.kind == "code":
                out.append(f"<pre>{text}</pre>")
            elif b.kind == "table":
                shown = b.df.map(fmt).rename(columns=lambda c: str(c).replace("_", " "))  # headers may wrap
                body = shown.to_html(index=False, border=0, escape=True)
                wrap = "scroll" if len(b.df) > 25 else "wide"  # long tables scroll, wide ones never widen the page
                out.append(f"<p class='caption'>{text}</p><div class='{wrap}'>{body}</div>")
            elif b.kind == "figure":
                data = base64.b64encode(b.png).decode()
                out.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(b.name)}'>"
                           f"<figcaption>{text}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


def markdown_table(df: pd.DataFrame) -> str:
    cells = df.map(fmt).map(lambda v: v.replace("|", "\\|").replace("\n", " "))
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines)


def render_markdown(title: str, sections: list[tuple[str, list[Block]]]) -> str:
    out = [f"# {title}"]
    for heading, blocks in sections:
        out.append(f"## {heading}")
        for b in blocks:
            if b.kind == "text":
                out.append(b.text)
            elif b.kind == "warn":
                out.append(f"> **WARNING:** {b.text}")
            elif b.kind == "note":
                out.append(f"_{b.text}_")
            elif b.kind == "code":
                out.append(f"```\n{b.text}\n```")
            elif b.kind == "table":
                out.append(f"{b.text} ([{b.name}.csv]({b.name}.csv))\n\n{markdown_table(b.df)}")
            elif b.kind == "figure":
                out.append(f"![{b.name}]({b.name}.png)\n\n{b.text}")
    return "\n\n".join(out) + "\n"


# ----------------------------------------------------------------------------- entry point

def build(sdir: str) -> tuple[str, list[tuple[str, list[Block]]]]:
    """The report's title and sections for a study directory (nothing written)."""
    s = Study(sdir)
    sections = [("Verdict", verdict), ("Internal vs external", internal_vs_external), ("Fairness audit", fairness),
                ("Operating points", operating_points), ("Tables", tables), ("Figures", figure_blocks),
                ("Failure cases", failure_cases), ("Model card", card_blocks), ("Reproduction", reproduction)]
    if s.spec.subgroups:
        sections.insert(2, ("Subgroups", subgroup_blocks))
    return f"Study report: {s.spec.name}", [(title, guarded(title, lambda f=f: f(s))) for title, f in sections]


def page_files(title: str, sections: list[tuple[str, list[Block]]]) -> dict[str, bytes]:
    """A page's files by name: index.html, report.md, every figure as PNG and every table as CSV."""
    files = {"index.html": render_html(title, sections).encode(),
             "report.md": render_markdown(title, sections).encode()}
    for _, blocks in sections:
        for b in blocks:
            if b.kind == "figure":
                files[f"{b.name}.png"] = b.png
            elif b.kind == "table":
                files[f"{b.name}.csv"] = b.df.to_csv(index=False).encode()
    return files


def write(study_dir: str) -> str:
    """Write DIR/report/ (index.html, report.md, every figure as PNG and table as CSV) and return
    the path (or URI) of index.html. Locally the files are assembled in a scratch directory and
    swapped in, so a report is replaced whole and no figure of an earlier run survives; a remote
    study gets its files uploaded under DIR/report/."""
    sdir = storage.normalize(study_dir)
    files = page_files(*build(sdir))
    try:
        files |= model_card.files(Study(sdir))
    except Exception:  # noqa: BLE001 - no model chosen yet, or unreadable: the Model card section says why
        pass
    if storage.is_remote(sdir):
        for name, data in files.items():
            storage.write_bytes(storage.join(sdir, "report", name), data)
        return storage.join(sdir, "report", "index.html")
    target = os.path.join(sdir, "report")
    scratch = tempfile.mkdtemp(prefix=".report-", dir=sdir)
    try:
        for name, data in files.items():
            with open(os.path.join(scratch, name), "wb") as fh:
                fh.write(data)
        os.chmod(scratch, 0o755)  # mkdtemp makes it private; a report is for sharing
        shutil.rmtree(target, ignore_errors=True)
        os.rename(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return os.path.join(target, "index.html")
