"""Final evaluation: test metrics per arm with patient-level CIs, and paired tests vs the best arm.

Each arm's best configuration was retrained with every final seed; each run scored the
test split once, at the threshold it chose on validation. Per arm we report the mean over
seeds, with a 95% CI from resampling test *patients* (the seed-mean recomputed on each
resample). Against the best arm (highest mean test AUROC) every other arm gets:
  - a paired patient bootstrap of the difference in seed-mean AUROC (primary, Holm-adjusted
    over the comparisons),
  - DeLong's test on the seed-averaged probabilities,
  - McNemar's test on the seed-averaged decisions (mean probability >= mean threshold).
"""
from __future__ import annotations

import io

import numpy as np
import pandas as pd

from . import metrics, storage
from .data import Prepared
from .errors import CxrError
from .spec import Spec

ALPHA = 0.05


class EvaluationError(CxrError, RuntimeError):
    """Nothing to evaluate; the message says where to look."""


def _seed_mean(metric: str, thresholds: np.ndarray):
    def statistic(y, probs):
        values = []
        for p, t in zip(probs, thresholds):
            values.append(metrics.auroc(y, p) if metric == "auroc" else metrics.summary(y, p, t)[metric])
        return float(np.mean(values))
    return statistic


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone)."""
    order = np.argsort(p_values)
    m = len(p_values)
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def load_final_predictions(sdir: str, final_trials: pd.DataFrame) -> dict[tuple[str, int], dict]:
    """(arm, seed) -> test probabilities, threshold and checkpoint of the run's last epoch."""
    out = {}
    done = final_trials.dropna(subset=["epoch"])
    for (arm, seed), g in done.groupby(["arm", "seed"]):
        last = g.sort_values("epoch").iloc[-1]
        ckpt = storage.join(sdir, last["checkpoint"])
        uri = storage.join(ckpt, "test_probabilities.npy")
        if not last["checkpoint"] or not storage.exists(uri):
            continue  # unfinished run: reported as missing
        meta = storage.read_json(storage.join(ckpt, "meta.json"))
        out[(arm, int(seed))] = {"probs": np.load(io.BytesIO(storage.read_bytes(uri))),
                                 "threshold": float(meta["threshold"]), "checkpoint": last["checkpoint"],
                                 "val_auroc": float(last["val_auroc"])}
    return out


def evaluate(spec: Spec, sdir: str, prepared: Prepared, final_trials: pd.DataFrame) -> dict:
    rows = prepared.rows["test"]
    index = prepared.cache.index.iloc[rows]
    y, patients = index["label"].to_numpy(), index["patient"].to_numpy()
    runs = load_final_predictions(sdir, final_trials)
    n_boot, seed = spec.final.bootstrap, spec.seed

    pred_rows, per_run = [], []
    for (arm, s), run in sorted(runs.items()):
        pred_rows.append(pd.DataFrame({"arm": arm, "seed": s, "item": index["item"].to_numpy(), "patient": patients,
                                       "label": y, "probability": run["probs"], "threshold": run["threshold"]}))
        per_run.append({"arm": arm, "seed": s, "threshold": run["threshold"], "val_auroc": run["val_auroc"],
                        **metrics.summary(y, run["probs"], run["threshold"]), "checkpoint": run["checkpoint"]})
    if not per_run:
        raise EvaluationError(f"{sdir}: no final run produced test predictions; see final_trials.csv and the "
                              f"trials' error.txt under final/")
    per_run = pd.DataFrame(per_run)

    arms = [a for a in spec.arm_names if a in set(per_run["arm"])]
    stacked = {a: (np.stack([runs[(a, s)]["probs"] for s in sorted(per_run[per_run.arm == a].seed)]),
                   np.array([runs[(a, s)]["threshold"] for s in sorted(per_run[per_run.arm == a].seed)]))
               for a in arms}
    summary = []
    for a in arms:
        probs, thresholds = stacked[a]
        row = {"arm": a, "seeds": len(thresholds), "missing_seeds": len(spec.final.seeds) - len(thresholds)}
        for m in metrics.REPORTED:
            point, lo, hi = metrics.bootstrap_ci(_seed_mean(m, thresholds), [y, probs], patients, n_boot, seed)
            row |= {m: point, f"{m}_ci_low": lo, f"{m}_ci_high": hi,
                    f"{m}_seed_sd": float(per_run[per_run.arm == a][m].std(ddof=1)) if len(thresholds) > 1 else 0.0}
        summary.append(row)
    summary = pd.DataFrame(summary).sort_values("auroc", ascending=False, kind="stable")
    best_arm = summary.iloc[0]["arm"]

    comparison = []
    bp, bt = stacked[best_arm]
    for a in arms:
        if a == best_arm:
            continue
        p, t = stacked[a]
        mean_auroc = _seed_mean("auroc", t)  # AUROC ignores thresholds: one statistic for both arms
        boot = metrics.paired_bootstrap(mean_auroc, [y, p], [y, bp], patients, n_boot, seed)
        dl = metrics.delong(y, p.mean(0), bp.mean(0))
        mc = metrics.mcnemar(((p.mean(0) >= t.mean()) == y), ((bp.mean(0) >= bt.mean()) == y))
        comparison.append({"arm": a, "versus": best_arm, "delta_auroc": boot["difference"],
                           "delta_ci_low": boot["ci_low"], "delta_ci_high": boot["ci_high"],
                           "p_bootstrap": boot["p_value"], "p_delong": dl["p_value"],
                           "p_mcnemar": mc["p_value"], "only_arm_correct": mc["only_a_correct"],
                           "only_best_correct": mc["only_b_correct"]})
    comparison = pd.DataFrame(comparison, columns=["arm", "versus", "delta_auroc", "delta_ci_low", "delta_ci_high",
                                                   "p_bootstrap", "p_delong", "p_mcnemar", "only_arm_correct",
                                                   "only_best_correct"])
    if len(comparison):
        comparison["p_holm"] = holm(comparison["p_bootstrap"].tolist())
        comparison["significant"] = comparison["p_holm"] < ALPHA
        comparison["verdict"] = np.where(comparison["significant"], "worse than " + best_arm,
                                         "no significant difference")

    best_runs = per_run[per_run.arm == best_arm].sort_values("val_auroc", ascending=False, kind="stable")
    chosen = best_runs.iloc[0]  # the best arm's model to serve: chosen on validation, not test
    best = {"arm": best_arm, "seed": int(chosen["seed"]), "checkpoint": chosen["checkpoint"],
            "threshold": float(chosen["threshold"]),
            "test_metrics": {m: float(summary.iloc[0][m]) for m in metrics.REPORTED},
            "test_metrics_ci": {m: [float(summary.iloc[0][f"{m}_ci_low"]), float(summary.iloc[0][f"{m}_ci_high"])]
                                for m in metrics.REPORTED}}
    verdict = " ".join([verdict_text(summary, comparison, spec.final.bootstrap)] + caveats(spec, summary))

    storage.write_csv(storage.join(sdir, "predictions.csv"), pd.concat(pred_rows, ignore_index=True))
    storage.write_csv(storage.join(sdir, "final.csv"), per_run)
    storage.write_csv(storage.join(sdir, "summary.csv"), summary)
    storage.write_csv(storage.join(sdir, "comparison.csv"), comparison)
    storage.write_json(storage.join(sdir, "best.json"), best | {"verdict": verdict})
    return {"summary": summary, "comparison": comparison, "best": best, "verdict": verdict}


def p_text(p: float, n_bootstrap: int) -> str:
    """A bootstrap p-value of 0 only says p < 1/B."""
    return f"p < {1 / n_bootstrap:.2g}" if p == 0 else f"p = {p:.2g}"


def ci_text(row, m: str) -> str:
    return f"{row[m]:.3f} ({row[f'{m}_ci_low']:.3f}-{row[f'{m}_ci_high']:.3f})"


def difference_text(r, n_bootstrap: int) -> str:
    """One comparison row in words: 'resnet18 (AUROC 0.027 lower, 95% CI ..., p = 0.03)'."""
    return (f"{r.arm} (AUROC {abs(r.delta_auroc):.3f} {'lower' if r.delta_auroc <= 0 else 'higher'}, 95% CI "
            f"{r.delta_ci_low:+.3f} to {r.delta_ci_high:+.3f}, {p_text(r.p_holm, n_bootstrap)})")


def verdict_text(summary: pd.DataFrame, comparison: pd.DataFrame | None, n_bootstrap: int) -> str:
    """The verdict paragraph (printed at the end of a study, kept in best.json, opening the report):
    the best arm with its CIs, then every other arm told apart from it or not."""
    top = summary.iloc[0]
    text = (f"The best backbone in this study is {top['arm']}: test AUROC {ci_text(top, 'auroc')} and accuracy "
            f"{ci_text(top, 'accuracy')} (95% confidence intervals in brackets, from resampling test patients), the "
            f"mean of {int(top['seeds'])} final seed(s), each run at the decision threshold it chose on validation.")
    others = [a for a in summary["arm"] if a != top["arm"]]
    if not others:
        return text + " It is the only arm evaluated."
    if comparison is None or comparison.empty:
        return text + f" No paired comparison with {', '.join(others)} is available."
    significant = comparison["significant"].astype(bool)
    same, worse = comparison[~significant], comparison[significant]
    text += (f" Against each other arm (paired patient bootstrap of the AUROC difference, Holm-adjusted over "
             f"{len(comparison)} comparison(s), alpha {ALPHA}; unadjusted 95% CIs):")
    if len(same):
        text += (" it cannot be told apart from " + "; ".join(difference_text(r, n_bootstrap) for r in same.itertuples())
                 + ". On this data these backbones are statistically indistinguishable: the ranking among them is "
                   "not evidence that one is better.")
    if len(worse):
        text += (" " + ("Significantly worse: " if len(same) else "every other arm is significantly worse: ")
                 + "; ".join(difference_text(r, n_bootstrap) for r in worse.itertuples()) + ".")
    return text


def caveats(spec: Spec, summary: pd.DataFrame) -> list[str]:
    """What limits the verdict, one sentence each (printed after it, red boxes in the report)."""
    out = []
    if spec.unmatched:
        out.append("UNMATCHED STUDY: the arms ran with different settings (see the fairness audit), so a difference "
                   "between them cannot be attributed to the backbone.")
    short = summary[summary["missing_seeds"] > 0]
    if len(short):
        out.append("Missing final seeds: " + ", ".join(f"{r.arm} ran {int(r.seeds)} of "
                                                       f"{int(r.seeds + r.missing_seeds)}" for r in short.itertuples())
                   + "; their means rest on fewer runs.")
    return out
