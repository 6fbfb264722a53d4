"""The study report's figures: each function draws one from what the study wrote (a ``results.Study``)
and returns the figure with its caption, or raises ``results.Missing`` naming what it lacks.
Matplotlib's object API only (no pyplot state), colour-blind-safe colours, one colour per arm.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from . import metrics
from .results import Missing, Study
from .subgroups import NOT_RECORDED, OVERALL, SCORED

# Okabe & Ito's colour-blind-safe palette, yellow last (it is faint on white).
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
LINESTYLES = ("-", "--", "-.", ":")  # after eight arms the colours repeat with another line style
DPI = 110
METRIC_LABELS = {"val_auroc": "validation AUROC", "val_accuracy_youden": "validation accuracy (Youden threshold)",
                 "val_f1_youden": "validation F1 (Youden threshold)", "val_loss": "validation loss (BCE, nats)"}


def color(s: Study, arm: str) -> str:
    return OKABE_ITO[s.arms.index(arm) % len(OKABE_ITO)] if arm in s.arms else "#777777"


def linestyle(s: Study, arm: str) -> str:
    i = s.arms.index(arm) if arm in s.arms else 0
    return LINESTYLES[i // len(OKABE_ITO) % len(LINESTYLES)]


def sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


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
            ax.plot(tr["epoch"], tr[s.metric], color=color(s, arm), lw=2.6 if best else 0.9,
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
        for m in s.spec.budget.milestones:
            ax.axvline(m, color="0.75", ls=":", lw=1, zorder=1)
        ax.set_title(f"{arm} ({n} trial{'s' * (n != 1)})", fontsize=10, color=color(s, arm), fontweight="bold")
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
        bars = ax.bar(x, [getattr(row, c) for c in cols], width, color=color(s, row.arm), label=row.arm,
                      edgecolor="white")
        if len(s.budget) * len(cols) <= 40:
            ax.bar_label(bars, fontsize=7.5, padding=1)
    ax.axhline(s.spec.budget.samples_per_arm, color="0.4", ls="--", lw=1, label="configurations per arm")
    ax.set_xticks(range(len(cols)), [f"{e}{' (full)' if e == s.spec.budget.max_epochs else ''}" for e in epochs])
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
                    color=color(s, r.arm), capsize=6, lw=2, zorder=3)
        if s.final is not None and not s.final.empty:
            seeds = s.final[s.final["arm"] == r.arm]["auroc"].to_numpy()
            ax.scatter(i + 0.2 + np.linspace(-0.06, 0.06, len(seeds)), seeds, s=22, color=color(s, r.arm),
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


def seed_averaged(predictions: pd.DataFrame, arm: str) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Labels, seed-averaged probabilities, mean validation-chosen threshold, seed count: the same
    pooled model that DeLong's and McNemar's tests in the evaluation compare."""
    p = predictions[predictions["arm"] == arm]
    wide = p.pivot_table(index="item", columns="seed", values="probability").dropna()
    labels = p.drop_duplicates("item").set_index("item")["label"].reindex(wide.index).to_numpy()
    return labels, wide.mean(axis=1).to_numpy(), float(p.groupby("seed")["threshold"].first().mean()), wide.shape[1]


def roc_curves(s: Study, predictions: pd.DataFrame | None = None, where: str = "test"):
    """ROC of each arm on a scored set (default: the internal test split's predictions.csv)."""
    if predictions is None:
        s.need("predictions.csv")
        predictions = s.predictions
    arms = [a for a in s.arms if a in set(predictions["arm"])]
    fig, axes = new_figure(5.6, 5.2)
    ax = axes[0, 0]
    seeds = set()
    for arm in arms:
        y, p, thr, n = seed_averaged(predictions, arm)
        seeds.add(n)
        fpr, tpr, _ = metrics.roc_curve(y, p)
        c = metrics.confusion(y, p, thr)
        ax.plot(fpr, tpr, color=color(s, arm), ls=linestyle(s, arm), lw=1.8,
                label=f"{arm} (AUROC {metrics.auroc(y, p):.3f})")
        ax.plot(1 - c["specificity"], c["sensitivity"], "o", ms=8, color=color(s, arm), mec="black", zorder=4,
                clip_on=False)
    ax.plot([0, 1], [0, 1], color="0.6", ls=":", lw=1)
    handles, _ = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], marker="o", ls="", mfc="0.7", mec="black", label="validation-chosen threshold"))
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), aspect="equal", xlabel="false-positive rate (1 − specificity)",
           ylabel="true-positive rate (sensitivity)")
    ax.grid(alpha=0.25)
    return fig, (f"ROC on {where} of each arm's best configuration, on its probabilities averaged over the "
                 f"{'/'.join(map(str, sorted(seeds)))} final seeds; the AUROC in the legend is that of the averaged "
                 f"probabilities, so it can differ from the mean of per-seed AUROCs in the tables. The dot is the "
                 f"operating point at the mean of the seeds' validation-chosen thresholds.")


def auroc_vs_cost(s: Study):
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
                        color=color(s, r.arm), capsize=4, label=r.arm)
            ax.annotate(r.arm, (x, r.auroc), xytext=(6, 4), textcoords="offset points", fontsize=8)
        log_x(ax, list(xs.values()))
        ax.set_xlabel(label)
        ax.grid(alpha=0.25)
        ax.margins(x=0.3)
    axes[0, 0].set_ylabel("test AUROC (mean, 95% CI)")
    if axes[0, 1].get_legend_handles_labels()[0]:
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


def hyperparameter_sensitivity(s: Study):
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
        full, best, arm_color = g["outcome"] == "completed", g["trial_id"].isin(chosen), color(s, arm)
        ax.scatter(g.loc[full, f"hp_{key}"], g.loc[full, col], s=30, color=arm_color, alpha=0.85)
        ax.scatter(g.loc[~full, f"hp_{key}"], g.loc[~full, col], s=30, facecolors="none", edgecolors=arm_color)
        ax.scatter(g.loc[best, f"hp_{key}"], g.loc[best, col], marker="*", s=200, color=arm_color,
                   edgecolors="black", zorder=4)
        log_x(ax, g[f"hp_{key}"], log=dist == "loguniform")
        ax.set_title(arm, fontsize=10, color=arm_color, fontweight="bold")
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


def reliability_diagram(s: Study, predictions: pd.DataFrame | None = None, where: str = "test"):
    """Calibration of the served model (best.json) on a scored set (default: the internal test split)."""
    s.need("best.json")
    if predictions is None:
        s.need("predictions.csv")
        predictions = s.predictions
    arm, seed = s.best["arm"], int(s.best["seed"])
    p = predictions[(predictions["arm"] == arm) & (predictions["seed"] == seed)]
    if p.empty:
        raise Missing(f"no predictions of {arm} seed {seed} on {where}")
    ece, bins = metrics.calibration(p["label"].to_numpy(), p["probability"].to_numpy())
    bins = pd.DataFrame(bins)
    fig, axes = new_figure(5.6, 6.0, 2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax, hist = axes[0, 0], axes[1, 0]
    ax.plot([0, 1], [0, 1], color="0.6", ls=":", lw=1, label="perfect calibration")
    ax.plot(bins["mean_probability"], bins["fraction_positive"], "o-", color=color(s, arm), ms=7,
            label=f"{arm}, seed {seed}")
    ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), ylabel="observed fraction with pneumonia",
           title=f"Reliability on {where}: ECE {ece:.3f}")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.25)
    hist.bar((bins["bin_low"] + bins["bin_high"]) / 2, bins["count"], width=0.09, color=color(s, arm))
    hist.set(xlabel="predicted probability of pneumonia (bin mean)", ylabel="images")
    hist.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
    return fig, (f"Reliability diagram of the served model ({arm}, seed {seed}, from best.json) on {where}, 10 "
                 f"equal-width probability bins; below, the images per bin. ECE is the image-weighted mean gap "
                 f"between predicted probability and observed frequency.")


def subgroup_forest(s: Study, tables: dict[str, pd.DataFrame]):
    """Forest plot of subgroup AUROC: per set (a panel each: 'test', then the external sets'
    subgroups.csv), each subgroup's seed-mean AUROC and 95% CI per arm, each arm's AUROC over the
    whole set as a dashed line of its colour; unscored subgroups are named, not drawn."""
    tables = {name: t for name, t in tables.items() if t is not None and len(t)}
    if not tables:
        raise Missing("no subgroups.csv holds rows yet")
    shown = {name: t[t["column"] != OVERALL].drop_duplicates(["column", "level"]) for name, t in tables.items()}
    rows = max(len(g) for g in shown.values())
    fig, axes = new_figure(5.2 * len(tables), 1.4 + 0.42 * rows * max(1, len(s.arms)) ** 0.5, 1, len(tables),
                           sharex=True)
    for ax, (name, t) in zip(axes[0], tables.items()):
        groups = shown[name]
        arms = [a for a in s.arms if a in set(t["arm"])]
        offsets = dict(zip(arms, np.linspace(-0.25, 0.25, len(arms)) if len(arms) > 1 else [0.0]))
        labels = []
        for i, g in enumerate(groups.itertuples()):
            size = "" if g.status == NOT_RECORDED else f" (n={int(g.n_images)})"
            labels.append(f"{g.column} {g.level}".strip() + size + ("" if g.status == SCORED else f" {g.status}"))
            scored = t[(t["column"] == g.column) & (t["level"] == g.level) & (t["status"] == SCORED)]
            for r in scored.itertuples():
                ax.errorbar(r.auroc, i + offsets[r.arm], xerr=[[r.auroc - r.auroc_lo], [r.auroc_hi - r.auroc]],
                            fmt="o", ms=5, color=color(s, r.arm), capsize=3, lw=1.5, label=r.arm)
        for r in t[t["column"] == OVERALL].itertuples():
            ax.axvline(r.auroc, color=color(s, r.arm), ls="--", lw=1)
        previous = list(groups["column"])
        for i in range(1, len(previous)):
            if previous[i] != previous[i - 1]:
                ax.axhline(i - 0.5, color="0.8", lw=0.8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylim(len(labels) - 0.5, -0.5)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("AUROC (mean over final seeds, 95% CI)")
        ax.grid(axis="x", alpha=0.25)
    handles = [Line2D([], [], marker="o", color=color(s, a), label=a) for a in s.arms]
    handles.append(Line2D([], [], color="0.4", ls="--", label="arm's AUROC on the whole set"))
    fig.legend(handles=handles, fontsize=8, loc="outside upper center", ncols=len(handles), frameon=False)
    return fig, ("AUROC of each arm in each subgroup (mean over final seeds, 95% CI from resampling the set's "
                 "patients), one panel per set; the dashed lines are each arm's AUROC on the whole set. Subgroups "
                 "with too few images or a single class, or a column the set does not record, are named but not "
                 "scored.")


# (file name, title, drawing), in the report's order
DRAWINGS = [("learning_curves", "Learning curves", learning_curves),
            ("rung_survival", "ASHA rung survival", rung_survival),
            ("test_auroc", "Final test AUROC per arm", auroc_per_arm),
            ("roc", "ROC curves on test", roc_curves),
            ("cost", "Accuracy versus cost", auroc_vs_cost),
            ("sensitivity", "Hyperparameter sensitivity", hyperparameter_sensitivity),
            ("calibration", "Calibration of the best model", reliability_diagram)]


def pareto_front(cost: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Which points no other point beats: as cheap or cheaper and at least as good, better in one."""
    return np.array([not np.any((cost <= c) & (value >= v) & ((cost < c) | (value > v))) for c, v in zip(cost, value)],
                    dtype=bool)


def cost_pareto(points: pd.DataFrame, y_label: str):
    """``cxr-ray compare``'s cost figure: each (study, arm) point's AUROC (``auroc`` with its CI) against
    search compute-seconds, parameters and inference time per image; the Pareto front of each panel
    dashed. One colour per study (``study`` column, in order)."""
    studies = list(dict.fromkeys(points["study"]))
    panels = [("search_compute_s", f"search compute ({'/'.join(sorted(set(points['compute'])))}-seconds)"),
              ("parameters_millions", "parameters (millions)"),
              ("ms_per_image", "inference (ms per image, measured here)")]
    points = points.assign(ms_per_image=1000 / points["images_per_s"])
    fig, axes = new_figure(14, 4.2, 1, 3, sharey=True)
    for ax, (column, label) in zip(axes[0], panels):
        shown = points[points[column].notna() & (points[column] > 0)]
        for r in shown.itertuples():
            c = OKABE_ITO[studies.index(r.study) % len(OKABE_ITO)]
            ax.errorbar(getattr(r, column), r.auroc, yerr=[[r.auroc - r.auroc_ci_low], [r.auroc_ci_high - r.auroc]],
                        fmt="o", ms=7, color=c, capsize=4)
            ax.annotate(f"{r.study}: {r.arm}", (getattr(r, column), r.auroc), xytext=(6, 4), textcoords="offset points",
                        fontsize=7)
        if len(shown):
            front = shown[pareto_front(shown[column].to_numpy(float), shown["auroc"].to_numpy(float))]
            front = front.sort_values(column)
            ax.plot(front[column], front["auroc"], ls="--", color="0.3", lw=1, drawstyle="steps-post", zorder=1)
            ax.scatter(front[column], front["auroc"], s=160, facecolors="none", edgecolors="0.3", zorder=1)
            log_x(ax, shown[column].tolist())
        else:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", color="0.4")
            ax.set_xticks([])
        ax.set_xlabel(label)
        ax.grid(alpha=0.25)
        ax.margins(x=0.3)
    axes[0, 0].set_ylabel(f"{y_label} (mean, 95% CI)")
    axes[0, 0].legend(handles=[Line2D([], [], marker="o", ls="", color=OKABE_ITO[i % len(OKABE_ITO)], label=s)
                               for i, s in enumerate(studies)]
                      + [Line2D([], [], ls="--", marker="o", mfc="none", ms=11, color="0.3", label="Pareto front")],
                      fontsize=8, loc="lower right")
    return fig, (f"{sentence(y_label)} of every arm of every study against what it cost: search compute-seconds "
                 f"(budget.csv), parameter count, and inference time per image. Points on the dashed Pareto front are "
                 f"beaten by no other point (none is as cheap and at least as good); an axis spanning more than a "
                 f"decade is logarithmic. Up and to the left is better.")
