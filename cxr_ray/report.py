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
import functools
import html
import importlib.metadata
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from . import evaluation, metrics, models, spec as specs, storage
from .scheduler import rung_milestones

# Okabe & Ito's colour-blind-safe palette, yellow last (it is faint on white).
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
LINESTYLES = ("-", "--", "-.", ":")  # after eight arms the colours repeat with another line style
DPI = 110
METRIC_LABELS = {"val_auroc": "validation AUROC", "val_accuracy_youden": "validation accuracy (Youden threshold)",
                 "val_f1_youden": "validation F1 (Youden threshold)", "val_loss": "validation loss (BCE, nats)"}
# Which stage writes each file: a missing file is explained by the stage that has not run yet.
WRITTEN_BY = {
    "data_report.json": "data preparation", "split.csv": "data preparation", "configs.csv": "data preparation",
    "asha_state.json": "the search, at every ASHA decision", "trials.csv": "the end of the search phase",
    "trial_summary.csv": "the end of the search phase", "budget.csv": "the end of the search phase",
    "best_configs.json": "the end of the search phase", "final_trials.csv": "the end of the final training phase",
    **{name: "the final evaluation"
       for name in ("final.csv", "summary.csv", "comparison.csv", "predictions.csv", "best.json")},
    "study.json": "the end of the study",
}
METRIC_NAMES = {"auroc": "AUROC", "f1": "F1", "ece": "ECE"}
PACKAGES = ("cxr-ray", "ray", "torch", "timm", "numpy", "pandas", "matplotlib")


class Missing(Exception):
    """A block cannot be shown because its input is absent or empty; the message says which."""


# ----------------------------------------------------------------------------- reading the study

class Study:
    """The files of a study directory, each read once. An absent or unreadable file reads as None
    and ``why(name)`` says why, in words the report can print."""

    def __init__(self, sdir: str):
        self.dir = sdir
        self.problems: dict[str, str] = {}  # file -> why it reads as None
        self.unreadable: list[str] = []
        spec_uri = storage.join(sdir, "spec.yaml")
        if not storage.exists(spec_uri):
            raise FileNotFoundError(f"{sdir}: not a study directory (no spec.yaml)")
        raw = specs.yaml_load(storage.read_text(spec_uri))
        if not isinstance(raw, dict):
            raise specs.SpecError(f"{spec_uri}: expected a mapping at the top level")
        # A recorded hash that differs is reported, not refused (as resume does): the file may have been
        # written by a cxr_ray whose spec defaults differ, and its report should still be readable.
        self.recorded_hash = raw.pop("spec_hash", None)
        self.spec = specs.validate(raw, spec_uri)
        self.spec_hash = self.recorded_hash or self.spec.hash
        self.metric, self.mode = self.spec.selection["metric"], self.spec.selection["mode"]
        self.arms = self.spec.arm_names
        self.data_report = self._json("data_report.json")
        self.split = self._csv("split.csv")
        self.configs = self._csv("configs.csv")
        self.asha = self._json("asha_state.json")
        self.trials = self._csv("trials.csv")
        self.trial_summary = self._csv("trial_summary.csv")
        self.budget = self._csv("budget.csv")
        self.best_configs = self._json("best_configs.json")
        self.final_trials = self._csv("final_trials.csv")
        self.final = self._csv("final.csv")
        self.summary = self._csv("summary.csv")
        self.comparison = self._csv("comparison.csv")
        self.predictions = self._csv("predictions.csv")
        self.best = self._json("best.json")
        self.study = self._json("study.json")
        if self.summary is not None and len(self.summary):
            self.summary = self.summary.sort_values("auroc", ascending=False, kind="stable")

    def _read(self, name: str, parse):
        uri = storage.join(self.dir, name)
        if not storage.exists(uri):
            self.problems[name] = f"{name} is missing (it is written by {WRITTEN_BY.get(name, 'the study')})"
            return None
        try:
            return parse(storage.read_bytes(uri))
        except (ValueError, UnicodeDecodeError) as e:  # pandas' and json's parse errors are ValueErrors
            self.problems[name] = f"{name} could not be read ({type(e).__name__}: {e})"
            self.unreadable.append(name)
            return None

    def _csv(self, name: str) -> pd.DataFrame | None:
        def parse(raw: bytes) -> pd.DataFrame:
            try:
                return pd.read_csv(io.BytesIO(raw))
            except pd.errors.EmptyDataError:  # a phase that produced no rows at all
                return pd.DataFrame()
        return self._read(name, parse)

    def _json(self, name: str):
        return self._read(name, json.loads)

    def why(self, name: str) -> str:
        return self.problems.get(name, f"{name} holds no rows yet")

    def need(self, *names: str) -> None:
        """Raise Missing naming the first of ``names`` (files, read into the attribute of the same
        stem: best.json -> self.best) that is absent or empty."""
        for name in names:
            value = getattr(self, name.split(".")[0])
            if value is None or (isinstance(value, pd.DataFrame) and value.empty):
                raise Missing(self.why(name))

    @property
    def search_results(self) -> pd.DataFrame:
        """Search-phase rows that carry an epoch and the selection metric."""
        t = self.trials
        if t is None or t.empty or "epoch" not in t or self.metric not in t:
            return pd.DataFrame(columns=["trial_id", "arm", "epoch", self.metric])
        t = t[t["phase"] == "search"] if "phase" in t else t
        return t.dropna(subset=["epoch", self.metric])

    def color(self, arm: str) -> str:
        return OKABE_ITO[self.arms.index(arm) % len(OKABE_ITO)] if arm in self.arms else "#777777"

    def linestyle(self, arm: str) -> str:
        i = self.arms.index(arm) if arm in self.arms else 0
        return LINESTYLES[i // len(OKABE_ITO) % len(LINESTYLES)]

    @functools.cached_property
    def parameters(self) -> dict[str, int | None]:
        """Parameter count per arm (its best configuration's head), built on PyTorch's meta device:
        no weights are loaded and no memory is used, so even large backbones take a fraction of a
        second. None where the model cannot be built here (e.g. a backbone this timm lacks)."""
        counts = {}
        for arm in self.arms:
            params = ((self.best_configs or {}).get(arm) or {}).get("params", {})
            try:
                cfg = specs.trial_config(self.spec, arm, params, seed=self.spec.seed)
                with torch.device("meta"):
                    net = models.build_model(cfg.backbone, head=cfg.head, hidden=cfg.hidden, dropout=cfg.dropout,
                                             image_size=cfg.image_size)
                counts[arm] = models.count_parameters(net)
            except Exception:  # noqa: BLE001 - a model this environment cannot build just has no count
                counts[arm] = None
        return counts

    @property
    def milestones(self) -> list[int]:
        b = self.spec.budget
        return rung_milestones(b["grace_period"], b["max_epochs"], b["reduction_factor"])


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


def ci(row, m: str) -> str:
    return f"{row[m]:.3f} ({row[f'{m}_ci_low']:.3f}–{row[f'{m}_ci_high']:.3f})"


def sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def names(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ----------------------------------------------------------------------------- 1. verdict

def verdict(s: Study) -> list[Block]:
    blocks = []
    source = (s.data_report or {}).get("source") or s.spec.data["source"]
    if source == "synthetic":
        blocks.append(Block("warn", "SYNTHETIC DEMO DATA, NOT MEDICAL DATA: the images of this study were drawn by "
                                    "cxr_ray.synthetic. Nothing here says anything about chest X-rays or patients."))
    blocks += [Block("warn", f"{s.why(name)}; what depends on it is left out.") for name in s.unreadable]
    if s.summary is None or s.summary.empty:
        progress = search_progress(s)
        return blocks + [Block("text", f"Final evaluation not run yet: {s.why('summary.csv')}. {progress}")]
    top = s.summary.iloc[0]
    text = (f"The best backbone in this study is {top['arm']}: test AUROC {ci(top, 'auroc')} and accuracy "
            f"{ci(top, 'accuracy')} (95% confidence intervals in brackets, from resampling test patients), the mean "
            f"of {int(top['seeds'])} final seed(s), each run at the decision threshold it chose on validation.")
    others = [a for a in s.summary["arm"] if a != top["arm"]]
    if not others:
        text += " It is the only arm evaluated."
    elif s.comparison is None:
        text += f" The paired test against {names(others)} is not available: {s.why('comparison.csv')}."
    else:
        significant = s.comparison["significant"].astype(bool)
        same, worse = s.comparison[~significant], s.comparison[significant]
        text += (f" Against each other arm (paired patient bootstrap of the AUROC difference, Holm-adjusted over "
                 f"{len(s.comparison)} comparison(s), alpha {evaluation.ALPHA}; unadjusted 95% CIs):")
        if len(same):
            text += (" it cannot be told apart from " + "; ".join(difference(s, r) for r in same.itertuples())
                     + ". On this data these backbones are statistically indistinguishable: the ranking among them "
                       "is not evidence that one is better.")
        if len(worse):
            text += (" " + ("Significantly worse: " if len(same) else "every other arm is significantly worse: ")
                     + "; ".join(difference(s, r) for r in worse.itertuples()) + ".")
    if s.best is not None and s.best.get("arm") == top["arm"]:
        text += (f" The model to serve is its seed-{s.best['seed']} run (picked on validation, not test), "
                 f"used at threshold {s.best['threshold']:.3f}.")
    blocks.append(Block("text", text))
    if s.best is None:
        blocks.append(Block("note", f"No model chosen to serve yet: {s.why('best.json')}."))
    elif s.best.get("arm") != top["arm"]:
        blocks.append(Block("warn", f"best.json names {s.best.get('arm')} as the best arm, but summary.csv ranks "
                                    f"{top['arm']} first: the two files come from different evaluations."))
    if s.spec.unmatched:
        blocks.append(Block("warn", "UNMATCHED STUDY: the arms ran with different settings (see the fairness audit), "
                                    "so a difference between them cannot be attributed to the backbone."))
    short = s.summary[s.summary["missing_seeds"] > 0]
    if len(short):
        blocks.append(Block("warn", "Missing final seeds: " + ", ".join(
            f"{r.arm} ran {int(r.seeds)} of {int(r.seeds + r.missing_seeds)}" for r in short.itertuples())
            + "; their means rest on fewer runs."))
    return blocks


def difference(s: Study, r) -> str:
    """One comparison.csv row in words: 'resnet18 (AUROC 0.027 lower, 95% CI ..., p = 0.03)'."""
    p = evaluation.p_text(r.p_holm, s.spec)
    return (f"{r.arm} (AUROC {abs(r.delta_auroc):.3f} {'lower' if r.delta_auroc <= 0 else 'higher'}, 95% CI "
            f"{r.delta_ci_low:+.3f} to {r.delta_ci_high:+.3f}, {p})")


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


# ----------------------------------------------------------------------------- 2. fairness audit

def fairness(s: Study) -> list[Block]:
    spec, b, f = s.spec, s.spec.budget, s.spec.final
    blocks = [Block("text", f"Spec hash {s.spec_hash}. "
                    + ("" if spec.unmatched else "Every arm is given the same search space, budget, data split and "
                                                 "seeds, listed here together with what each arm actually consumed."))]
    if spec.unmatched:
        blocks.append(Block("warn", "UNMATCHED SPEC (unmatched: true): the arms ran with different settings, so this "
                                    "is a replication of separate experiments, not a fair comparison of backbones. "
                                    "Per-arm settings: "
                                    + "; ".join(f"{a['name']}: {own_settings(a)}" for a in spec.arms) + "."))
    blocks += [Block("table", "Arms: backbone, weights and size.", "arms", arms_table(s)),
               Block("table", "Shared settings: the one search space, fixed settings and model options.",
                     "shared_settings", settings_table(s)),
               Block("text", f"Budget per arm (spec): {b['samples_per_arm']} configurations, each up to "
                             f"{b['max_epochs']} epochs, stopped by ASHA within its own arm (grace period "
                             f"{b['grace_period']}, reduction factor {b['reduction_factor']}, rungs at epoch(s) "
                             f"{', '.join(map(str, s.milestones)) or 'none'}); then the best configuration retrained "
                             f"for {final_epochs(s)} epochs with each final seed. Consumed epochs "
                             f"differ between arms by design: ASHA stops each arm's weaker trials early.")]
    blocks += guarded("Budget consumed per arm", lambda: [Block("table", "Budget consumed per arm (budget.csv): "
                                                                "search trials, epochs, trials reaching each rung, "
                                                                "compute seconds (trial training loops x workers x "
                                                                "CPUs or GPUs per worker) and wall seconds.",
                                                                "budget", budget_table(s))])
    blocks.append(Block("text", f"Seeds: search seed {spec.seed} (it draws the configurations once, so every arm sees "
                                f"the same values, and every search trial trains with it); final seeds "
                                f"{', '.join(map(str, f['seeds']))}."))
    blocks += guarded("Data split", lambda: split_blocks(s))
    blocks += guarded("The departure checks", lambda: [Block("warn", d) for d in departures(s)])
    return blocks


def final_epochs(s: Study) -> str:
    per_arm = {a: s.spec.final_epochs_for(a) for a in s.arms}
    if len(set(per_arm.values())) == 1:
        return str(next(iter(per_arm.values())))
    return "each arm's own (" + ", ".join(f"{a} {e}" for a, e in per_arm.items()) + ")"


def own_settings(arm: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in arm.get("settings", {}).items()) or "no own settings"


def arms_table(s: Study) -> pd.DataFrame:
    rows = []
    for a in s.spec.arms:
        n = s.parameters[a["name"]]
        rows.append({"arm": a["name"], "backbone": a["backbone"], "pretrained": a["pretrained"],
                     "parameters (millions)": n / 1e6 if n is not None else float("nan"),
                     **({"own settings": own_settings(a)} if s.spec.unmatched else {})})
    return pd.DataFrame(rows)


def settings_table(s: Study) -> pd.DataFrame:
    rows = [{"setting": k, "value": f"{next(iter(d))} {next(iter(d.values()))}", "role": "searched"}
            for k, d in s.spec.search_space.items()]
    rows += [{"setting": k, "value": v, "role": "fixed"} for k, v in s.spec.fixed.items()]
    rows += [{"setting": k, "value": v, "role": "model"} for k, v in s.spec.model.items()]
    rows += [{"setting": "image_size", "value": s.spec.data["image_size"], "role": "data"},
             {"setting": "selection metric", "value": f"{s.metric} ({s.mode})", "role": "selection"}]
    return pd.DataFrame(rows, columns=["setting", "value", "role"])


def budget_table(s: Study) -> pd.DataFrame:
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
    text = (f"Data: {dr.get('source', s.spec.data['source'])} ({dr.get('path', s.spec.data['path'])}), "
            f"{len(s.split)} images listed in split.csv, {len(sp)} of them in train/val/test"
            + ("; no patient has images in two splits." if not leaked else "."))
    blocks = [Block("table", text, "split", table)]
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
            if len(set(trials.values())) > 1 or set(trials.values()) != {spec.budget["samples_per_arm"]}:
                out.append(f"Arms ran different numbers of search trials (the spec gives each "
                           f"{spec.budget['samples_per_arm']}): "
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
        gaps = [f"{a} seed {seed}" for a in s.arms for seed in spec.final["seeds"] if (a, seed) not in ran]
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


# ----------------------------------------------------------------------------- 3. tables

def tables(s: Study) -> list[Block]:
    return (guarded("Final test metrics per arm", lambda: [Block(
                "table", "Final test metrics per arm (summary.csv): mean over final seeds, 95% CI from resampling "
                         "test patients in brackets; each run at its validation-chosen threshold.",
                "final_metrics", final_metrics_table(s))])
            + guarded("Paired comparison", lambda: comparison_blocks(s))
            + guarded("Best configuration per arm", lambda: [Block(
                "table", f"Best configuration per arm (best_configs.json): the best last-epoch {s.metric} among the "
                         f"arm's trials that ran the full budget.", "best_configs", best_configs_table(s))])
            + guarded("Search trials", lambda: [Block(
                "table", f"Every search trial (trial_summary.csv), best first by its last {s.metric}.",
                "trials", trials_table(s))]))


def final_metrics_table(s: Study) -> pd.DataFrame:
    s.need("summary.csv")
    rows = [{"arm": r["arm"], "seeds": int(r["seeds"]), "missing seeds": int(r["missing_seeds"]),
             **{METRIC_NAMES.get(m, m): ci(r, m) for m in evaluation.METRICS}, "AUROC seed SD": r["auroc_seed_sd"]}
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
                  "comparison", s.comparison[[c for c in cols if c in s.comparison]])]


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


# ----------------------------------------------------------------------------- 4. figures

def new_figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **kwargs):
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kwargs)


def arm_panels(s: Study, arms: list[str], panel_w: float = 4.4, panel_h: float = 3.4, **kwargs):
    """One panel per arm, three to a row; spare panels hidden."""
    ncols = min(3, max(1, len(arms)))
    nrows = math.ceil(len(arms) / ncols)
    fig, axes = new_figure(panel_w * ncols, panel_h * nrows, nrows, ncols, **kwargs)
    flat = list(axes.ravel())
    for ax in flat[len(arms):]:
        ax.set_visible(False)
    return fig, dict(zip(arms, flat))


def log_x(ax, values, log: bool | None = None) -> None:
    """A log x axis when asked or when the values span more than a decade, with plain tick labels
    (0.002, 0.005) at 1-2-5 steps instead of matplotlib's 2x10^-3 minor-tick clutter."""
    values = np.asarray([v for v in values if v is not None and v > 0], dtype=float)
    if log is None:
        log = len(values) > 1 and values.max() / values.min() > 10
    if log:
        ax.set_xscale("log")
        axis = ax.xaxis
        axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())


def png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def figures(s: Study) -> list[Block]:
    drawings = [("learning_curves", "Learning curves", learning_curves),
                ("rung_survival", "ASHA rung survival", rung_survival),
                ("test_auroc", "Final test AUROC per arm", auroc_per_arm),
                ("roc", "ROC curves on test", roc_curves),
                ("cost", "Accuracy versus cost", cost),
                ("sensitivity", "Hyperparameter sensitivity", sensitivity),
                ("calibration", "Calibration of the best model", calibration)]
    blocks = []
    for name, title, draw in drawings:
        def build(draw=draw, name=name, title=title):
            fig, caption = draw(s)
            return [Block("figure", f"{title}. {caption}", name, png=png(fig))]
        blocks += guarded(title, build)
    return blocks


def learning_curves(s: Study):
    t = s.search_results
    if t.empty:
        raise Missing(s.why("trials.csv") if s.trials is None else "trials.csv holds no epoch results yet")
    stops = (s.asha or {}).get("stopped", {})
    outcome = dict(zip(s.trial_summary["trial_id"], s.trial_summary["outcome"])) \
        if s.trial_summary is not None and not s.trial_summary.empty else {}
    chosen = {b["trial_id"] for b in (s.best_configs or {}).values()}
    fig, panels = arm_panels(s, s.arms, sharey=True)
    shown = set()  # which kinds of mark appear, for the one legend
    for arm, ax in panels.items():
        g = t[t["arm"] == arm]
        n = g["trial_id"].nunique()
        alpha = min(0.8, max(0.12, 6 / max(n, 1)))  # hundreds of trials stay a readable band
        for tid, tr in g.groupby("trial_id", sort=False):
            tr = tr.sort_values("epoch")
            best = tid in chosen
            ax.plot(tr["epoch"], tr[s.metric], color=s.color(arm), lw=2.6 if best else 0.9,
                    alpha=1 if best else alpha, zorder=3 if best else 2)
            shown |= {"chosen"} if best else {"trial"}
        st = [(v["epoch"], v["metric"]) for v in stops.values() if v.get("arm") == arm]
        if st:
            ax.scatter(*zip(*st), marker="x", s=36 if len(st) <= 20 else 16, color="black", lw=1.2, zorder=4,
                       alpha=min(1, max(0.35, 15 / len(st))))
            shown.add("stopped")
        cut = g[g["trial_id"].map(outcome).isin(["unfinished", "error"])]
        ends = cut.sort_values("epoch").groupby("trial_id").tail(1)
        if len(ends):
            ax.scatter(ends["epoch"], ends[s.metric], marker="o", s=40, facecolors="none", edgecolors="black", zorder=4)
            shown.add("unfinished")
        for m in s.milestones:
            ax.axvline(m, color="0.75", ls=":", lw=1, zorder=1)
        ax.set_title(f"{arm} ({n} trial{'s' * (n != 1)})", fontsize=10, color=s.color(arm), fontweight="bold")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.25)
        if not n:
            ax.text(0.5, 0.5, "no results yet", transform=ax.transAxes, ha="center", color="0.4")
    for ax in list(panels.values())[:: min(3, len(panels))]:
        ax.set_ylabel(METRIC_LABELS.get(s.metric, s.metric))
    marks = {"trial": Line2D([], [], color="0.35", lw=0.9, label="one search trial (colour: arm)"),
             "chosen": Line2D([], [], color="0.35", lw=2.6, label="configuration chosen for the final runs"),
             "stopped": Line2D([], [], marker="x", ls="", color="black", label="stopped by ASHA"),
             "unfinished": Line2D([], [], marker="o", ls="", mfc="none", mec="black",
                                  label="unfinished (killed / error)")}
    fig.legend(handles=[h for k, h in marks.items() if k in shown], loc="outside upper center", ncols=4, fontsize=8.5,
               frameon=False)
    note = "" if s.asha is not None else f" Stop points not marked: {s.why('asha_state.json')}."
    return fig, (f"{sentence(METRIC_LABELS.get(s.metric, s.metric))} after each epoch of every search trial, one panel "
                 f"per arm; dotted verticals are the ASHA rungs.{note}")


def rung_survival(s: Study):
    s.need("budget.csv")
    epochs = sorted(int(c.removeprefix("reached_epoch_")) for c in s.budget.columns if c.startswith("reached_epoch_"))
    cols = [f"reached_epoch_{e}" for e in epochs]
    fig, axes = new_figure(max(5.5, 1 + len(cols) * (0.5 + 0.35 * len(s.budget))), 3.6)
    ax = axes[0, 0]
    width = 0.8 / len(s.budget)
    for i, row in enumerate(s.budget.itertuples()):
        x = np.arange(len(cols)) - 0.4 + width * (i + 0.5)
        bars = ax.bar(x, [getattr(row, c) for c in cols], width, color=s.color(row.arm), label=row.arm,
                      edgecolor="white")
        if len(s.budget) * len(cols) <= 40:
            ax.bar_label(bars, fontsize=7.5, padding=1)
    ax.axhline(s.spec.budget["samples_per_arm"], color="0.4", ls="--", lw=1, label="configurations per arm")
    ax.set_xticks(range(len(cols)), [f"{e}{' (full)' if e == s.spec.budget['max_epochs'] else ''}" for e in epochs])
    ax.set_xlabel("epoch reached (ASHA rung)")
    ax.set_ylabel("search trials (count)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.25)
    return fig, ("Search trials of each arm that reached each rung epoch (budget.csv); each arm's trials compete only "
                 "with each other, so each arm keeps about 1/reduction-factor of its trials per rung.")


def auroc_per_arm(s: Study):
    s.need("summary.csv")
    sm = s.summary
    fig, axes = new_figure(max(5.0, 1.1 * len(sm) + 2.5), 3.8)
    ax = axes[0, 0]
    x = np.arange(len(sm))
    for i, r in enumerate(sm.itertuples()):
        ax.errorbar(i, r.auroc, yerr=[[r.auroc - r.auroc_ci_low], [r.auroc_ci_high - r.auroc]], fmt="s", ms=8,
                    color=s.color(r.arm), capsize=6, lw=2, zorder=3)
        if s.final is not None and not s.final.empty:
            seeds = s.final[s.final["arm"] == r.arm]["auroc"].to_numpy()
            ax.scatter(i + 0.2 + np.linspace(-0.06, 0.06, len(seeds)), seeds, s=22, color=s.color(r.arm),
                       edgecolors="black", linewidths=0.5, alpha=0.85, zorder=4)
    ax.axhline(0.5, color="0.5", ls=":", lw=1)
    ax.set_xticks(x, sm["arm"], rotation=20 if len(sm) > 4 else 0, ha="right" if len(sm) > 4 else "center")
    ax.set_xlim(-0.6, len(sm) - 0.4)
    ax.set_ylabel("test AUROC")
    ax.set_xlabel("arm (best first)")
    ax.grid(axis="y", alpha=0.25)
    ax.legend(handles=[Line2D([], [], marker="s", color="0.3", lw=2, label="mean over seeds, 95% CI"),
                       Line2D([], [], marker="o", ls="", mfc="0.6", mec="black", label="one final seed"),
                       Line2D([], [], color="0.5", ls=":", label="chance (0.5)")],
              fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=3, frameon=False)
    note = "" if s.final is not None else f" Seed dots not shown: {s.why('final.csv')}."
    return fig, ("Mean test AUROC over final seeds with its 95% patient-bootstrap CI (summary.csv), and each seed's "
                 f"own AUROC as a dot beside it (final.csv).{note}")


def seed_averaged(s: Study, arm: str) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Labels, seed-averaged test probabilities, mean validation-chosen threshold, seed count:
    the same pooled model that DeLong's and McNemar's tests in the evaluation compare."""
    p = s.predictions[s.predictions["arm"] == arm]
    wide = p.pivot_table(index="item", columns="seed", values="probability").dropna()
    labels = p.drop_duplicates("item").set_index("item")["label"].reindex(wide.index).to_numpy()
    return labels, wide.mean(axis=1).to_numpy(), float(p.groupby("seed")["threshold"].first().mean()), wide.shape[1]


def roc_curves(s: Study):
    s.need("predictions.csv")
    arms = [a for a in s.arms if a in set(s.predictions["arm"])]
    fig, axes = new_figure(5.6, 5.2)
    ax = axes[0, 0]
    seeds = set()
    for arm in arms:
        y, p, thr, n = seed_averaged(s, arm)
        seeds.add(n)
        fpr, tpr, _ = metrics.roc_curve(y, p)
        c = metrics.confusion(y, p, thr)
        ax.plot(fpr, tpr, color=s.color(arm), ls=s.linestyle(arm), lw=1.8,
                label=f"{arm} (AUROC {metrics.auroc(y, p):.3f})")
        ax.plot(1 - c["specificity"], c["sensitivity"], "o", ms=8, color=s.color(arm), mec="black", zorder=4,
                clip_on=False)
    ax.plot([0, 1], [0, 1], color="0.6", ls=":", lw=1)
    handles, _ = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], marker="o", ls="", mfc="0.7", mec="black", label="validation-chosen threshold"))
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), aspect="equal", xlabel="false-positive rate (1 − specificity)",
           ylabel="true-positive rate (sensitivity)")
    ax.grid(alpha=0.25)
    return fig, (f"Test ROC of each arm's best configuration, on its probabilities averaged over the "
                 f"{'/'.join(map(str, sorted(seeds)))} final seeds (predictions.csv); the AUROC in the legend is that "
                 f"of the averaged probabilities, so it can differ from the mean of per-seed AUROCs in the table. The "
                 f"dot is the operating point at the mean of the seeds' validation-chosen thresholds.")


def cost(s: Study):
    s.need("summary.csv", "budget.csv")
    accel = "gpu_seconds" if "gpu_seconds" in s.budget else "cpu_seconds"
    seconds = dict(zip(s.budget["arm"], s.budget[accel]))
    fig, axes = new_figure(10, 4.0, 1, 2, sharey=True)
    panels = [(axes[0, 0], {a: seconds.get(a) for a in s.summary["arm"]},
               f"search compute ({accel.split('_')[0].upper()}-seconds, all trials of the arm)"),
              (axes[0, 1], {a: (n / 1e6 if n else None) for a, n in s.parameters.items()},
               "parameters (millions)")]
    for ax, xs, label in panels:
        for r in s.summary.itertuples():
            x = xs.get(r.arm)
            if x is None or not x > 0:
                continue
            ax.errorbar(x, r.auroc, yerr=[[r.auroc - r.auroc_ci_low], [r.auroc_ci_high - r.auroc]], fmt="o", ms=8,
                        color=s.color(r.arm), capsize=4, label=r.arm)
            ax.annotate(r.arm, (x, r.auroc), xytext=(6, 4), textcoords="offset points", fontsize=8)
        log_x(ax, list(xs.values()))
        ax.set_xlabel(label)
        ax.grid(alpha=0.25)
        ax.margins(x=0.3)
    axes[0, 0].set_ylabel("test AUROC (mean, 95% CI)")
    axes[0, 1].legend(fontsize=8, loc="lower right")
    return fig, ("Test AUROC against what each arm cost: compute seconds consumed by its search (budget.csv) and its "
                 "parameter count (counted from the model the arm builds); an axis spanning more than a decade is "
                 "logarithmic. Up and to the left is better.")


def searched_parameter(s: Study) -> tuple[str, str] | None:
    """lr if it was searched, else the first numeric searched parameter; with its distribution."""
    numeric = {k: next(iter(d)) for k, d in s.spec.search_space.items()
               if next(iter(d)) != "choice" or all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in d["choice"])}
    if not numeric:
        return None
    key = "lr" if "lr" in numeric else next(iter(numeric))
    return key, numeric[key]


def sensitivity(s: Study):
    s.need("trial_summary.csv")
    found = searched_parameter(s)
    if found is None:
        raise Missing("this study searched no numeric hyperparameter")
    key, dist = found
    ts, col = s.trial_summary, f"last_{s.metric}"
    chosen = {b["trial_id"] for b in (s.best_configs or {}).values()}
    fig, panels = arm_panels(s, s.arms, sharey=True)
    for arm, ax in panels.items():
        g = ts[ts["arm"] == arm]
        full, best, color = g["outcome"] == "completed", g["trial_id"].isin(chosen), s.color(arm)
        ax.scatter(g.loc[full, f"hp_{key}"], g.loc[full, col], s=30, color=color, alpha=0.85)
        ax.scatter(g.loc[~full, f"hp_{key}"], g.loc[~full, col], s=30, facecolors="none", edgecolors=color)
        ax.scatter(g.loc[best, f"hp_{key}"], g.loc[best, col], marker="*", s=200, color=color, edgecolors="black",
                   zorder=4)
        log_x(ax, g[f"hp_{key}"], log=dist == "loguniform")
        ax.set_title(arm, fontsize=10, color=color, fontweight="bold")
        ax.set_xlabel(f"{key}{' (log scale)' if dist == 'loguniform' else ''}")
        ax.grid(alpha=0.25)
    for ax in list(panels.values())[:: min(3, len(panels))]:
        ax.set_ylabel(f"{METRIC_LABELS.get(s.metric, s.metric)}, last epoch")
    fig.legend(handles=[Line2D([], [], marker="o", ls="", color="0.35", label="trial that ran the full budget"),
                        Line2D([], [], marker="o", ls="", mfc="none", mec="0.35",
                               label="stopped before the full budget (value at its last epoch)"),
                        Line2D([], [], marker="*", ms=12, ls="", color="0.35", mec="black",
                               label="configuration chosen for the final runs")],
               loc="outside upper center", ncols=3, fontsize=8.5, frameon=False)
    return fig, (f"{sentence(METRIC_LABELS.get(s.metric, s.metric))} at each search trial's last epoch against its "
                 f"{key} (trial_summary.csv), one panel per arm (colour: arm).")


def calibration(s: Study):
    s.need("best.json", "predictions.csv")
    arm, seed = s.best["arm"], int(s.best["seed"])
    p = s.predictions[(s.predictions["arm"] == arm) & (s.predictions["seed"] == seed)]
    if p.empty:
        raise Missing(f"predictions.csv has no rows for {arm} seed {seed}")
    ece, bins = metrics.calibration(p["label"].to_numpy(), p["probability"].to_numpy())
    bins = pd.DataFrame(bins)
    fig, axes = new_figure(5.6, 6.0, 2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax, hist = axes[0, 0], axes[1, 0]
    ax.plot([0, 1], [0, 1], color="0.6", ls=":", lw=1, label="perfect calibration")
    ax.plot(bins["mean_probability"], bins["fraction_positive"], "o-", color=s.color(arm), ms=7,
            label=f"{arm}, seed {seed}")
    ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), ylabel="observed fraction with pneumonia",
           title=f"Reliability on test: ECE {ece:.3f}")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.25)
    hist.bar((bins["bin_low"] + bins["bin_high"]) / 2, bins["count"], width=0.09, color=s.color(arm))
    hist.set(xlabel="predicted probability of pneumonia (bin mean)", ylabel="test images")
    hist.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
    return fig, (f"Reliability diagram of the served model ({arm}, seed {seed}, from best.json) on test "
                 f"(predictions.csv), 10 equal-width probability bins; below, the images per bin. ECE is the "
                 f"image-weighted mean gap between predicted probability and observed frequency.")


# ----------------------------------------------------------------------------- 5. reproduction

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
    sections = [("Verdict", verdict), ("Fairness audit", fairness), ("Tables", tables), ("Figures", figures),
                ("Reproduction", reproduction)]
    return f"Study report: {s.spec.name}", [(title, guarded(title, lambda f=f: f(s))) for title, f in sections]


def write(study_dir: str) -> str:
    """Write DIR/report/ (index.html, report.md, every figure as PNG and table as CSV) and return
    the path (or URI) of index.html. Locally the files are assembled in a scratch directory and
    swapped in, so a report is replaced whole and no figure of an earlier run survives; a remote
    study gets its files uploaded under DIR/report/."""
    sdir = storage.normalize(study_dir)
    title, sections = build(sdir)
    files = {"index.html": render_html(title, sections).encode(),
             "report.md": render_markdown(title, sections).encode()}
    for _, blocks in sections:
        for b in blocks:
            if b.kind == "figure":
                files[f"{b.name}.png"] = b.png
            elif b.kind == "table":
                files[f"{b.name}.csv"] = b.df.to_csv(index=False).encode()
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
