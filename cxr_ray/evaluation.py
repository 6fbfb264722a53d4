"""Final evaluation: test metrics per arm with patient-level CIs, paired tests vs the best arm, and
the same for every external set, scored once afterwards.

Each arm's best configuration was retrained with every final seed. Each run picks its operating
point on VALIDATION (spec ``threshold``: Youden, a sensitivity or specificity target, or 0.5 after
Platt calibration; bootstrapped over validation patients, and for Youden made stable, by
operating.py), then is scored on the test split (and later on external sets) as chosen. Per
arm we report the mean over seeds, with a 95% CI from resampling *patients* (the seed-mean
recomputed on each resample), and the seed ensemble (mean probability, its own validation-chosen
operating point). Against the best arm (highest mean test AUROC) every other arm gets:
  - a paired patient bootstrap of the difference in seed-mean AUROC (primary, Holm-adjusted
    over the comparisons),
  - DeLong's test on the seed-averaged probabilities,
  - McNemar's test on the seed-averaged decisions.
On an external set the comparisons are against the arm the study chose, so the verdict can be
checked there. Every table of a set (per arm, paired tests, ensembles) reads one matrix of patient
resamples (``metrics.resample_counts``), so all of them see the same patients. Nothing here trains
or selects anything; this module needs neither Ray nor torch.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import metrics, operating, storage, subgroups
from .data import Prepared
from .errors import CxrError
from .spec import Spec

ALPHA = 0.05
# The operating points every report shows, so the user sees what the choice of policy costs.
POLICY_TABLE = (("youden", None), ("sensitivity", 0.95), ("specificity", 0.95), ("calibrated", None))


class EvaluationError(CxrError, RuntimeError):
    """Nothing to evaluate; the message says where to look."""


@dataclass
class Run:
    """One final run (or an arm's seed ensemble, seed -1): its validation-chosen operating point."""
    arm: str
    seed: int
    checkpoints: list[str]  # relative to the study directory (several for an ensemble)
    val_auroc: float
    val: np.ndarray  # validation probabilities, in split order
    test: np.ndarray  # test probabilities, in split order
    threshold: float  # on the served probability (calibrated when platt is set)
    platt: tuple[float, float] | None
    points: dict = field(default_factory=dict)  # (policy, target, prevalence) -> operating.Point on validation

    def served(self, p: np.ndarray) -> np.ndarray:
        """The probability a user is shown: calibrated if the operating point calibrates."""
        return metrics.apply_platt(p, self.platt)


def validation_sample(spec: Spec, y_val: np.ndarray, patients: np.ndarray) -> operating.Sample:
    """Validation labels and the patient resamples every run's operating point is bootstrapped over.
    Patient ids as text: the split's ids and the same ids read back from validation_predictions.csv
    sort alike, so a point chosen post hoc (serve-time policy, an external set's prevalence) is
    bootstrapped over the same resamples as the study's."""
    return operating.Sample.of(y_val, np.asarray(patients).astype(str), spec.final.bootstrap, spec.seed)


def point_of(run: Run, val: operating.Sample, policy: str, target: float | None,
             prevalence: float | None = None) -> operating.Point:
    """``run``'s operating point by ``policy`` on validation (computed once per run and prevalence:
    every set's policy table reads it)."""
    key = (policy, target, prevalence)
    if key not in run.points:
        run.points[key] = operating.choose(policy, target, val, run.val, prevalence)
    return run.points[key]


def with_point(run: Run, point: operating.Point) -> Run:
    """``run`` at ``point`` (its served threshold and calibration)."""
    run.threshold, run.platt = point.served_threshold, point.platt
    return run


def read_npy(uri: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(uri)))


def load_runs(spec: Spec, sdir: str, final_trials: pd.DataFrame, val: operating.Sample) -> dict[tuple[str, int], Run]:
    """(arm, seed) -> the run's last-epoch validation and test probabilities and its operating point."""
    out = {}
    done = final_trials.dropna(subset=["epoch"])
    for (arm, seed), g in done.groupby(["arm", "seed"]):
        last = g.sort_values("epoch").iloc[-1]
        ckpt = storage.join(sdir, last["checkpoint"])
        if not last["checkpoint"] or not storage.exists(storage.join(ckpt, "test_probabilities.npy")):
            continue  # unfinished run: reported as missing
        run = Run(arm, int(seed), [last["checkpoint"]], float(last["val_auroc"]),
                  read_npy(storage.join(ckpt, "val_probabilities.npy")),
                  read_npy(storage.join(ckpt, "test_probabilities.npy")), np.nan, None)
        t = spec.threshold
        out[(arm, int(seed))] = with_point(run, point_of(run, val, t.policy, t.target, t.prevalence))
    return out


def ensembles(spec: Spec, runs: dict[tuple[str, int], Run], val: operating.Sample,
              prevalence: float | None = None) -> dict[str, Run]:
    """Each arm's seed ensemble: the mean probability of its final runs, with its own operating
    point chosen on its averaged validation scores by the study's policy (at ``prevalence``)."""
    out = {}
    for arm in spec.arm_names:
        mine = [r for (a, _), r in sorted(runs.items()) if a == arm]
        if not mine:
            continue
        p_val = np.mean([r.val for r in mine], axis=0)
        run = Run(arm, -1, [c for r in mine for c in r.checkpoints], metrics.auroc(val.y, p_val), p_val,
                  np.mean([r.test for r in mine], axis=0), np.nan, None)
        out[arm] = with_point(run, point_of(run, val, spec.threshold.policy, spec.threshold.target, prevalence))
    return out


# ----------------------------------------------------------------------------- statistics of one set

def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone)."""
    order = np.argsort(p_values)
    m = len(p_values)
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


class SetMetrics:
    """The reported metrics of runs on one set, on the set itself (``point``) and on each patient
    resample (``boot``: the same draws for every run, so differences are paired)."""

    def __init__(self, y: np.ndarray, counts: np.ndarray):
        self.y, self.counts, self.ones = y, counts, np.ones((1, len(y)))
        self.point, self.boot = {}, {}

    def add(self, key, p: np.ndarray, threshold: float) -> None:
        self.point[key] = metrics.resampled(self.y, p, threshold, self.ones)
        self.boot[key] = metrics.resampled(self.y, p, threshold, self.counts)

    def mean(self, keys: list, m: str) -> tuple[float, np.ndarray]:
        """The mean of ``m`` over ``keys`` (an arm's seeds): on the set, and on every resample."""
        return (float(np.mean([self.point[k][m] for k in keys], axis=0)[0]),
                np.mean([self.boot[k][m] for k in keys], axis=0))

    def with_ci(self, keys: list, m: str) -> dict[str, float]:
        point, values = self.mean(keys, m)
        lo, hi = metrics.percentile_ci(values)
        return {m: point, f"{m}_ci_low": lo, f"{m}_ci_high": hi}


def score(spec: Spec, y: np.ndarray, counts: np.ndarray, runs: dict[tuple[str, int], Run],
          probs: dict[tuple[str, int], np.ndarray], versus: str | None = None) -> dict[str, pd.DataFrame]:
    """The statistics of one evaluation set (labels ``y``, patient resamples ``counts``, each run's
    raw ``probs``): per run, per arm (seed mean with patient-bootstrap CIs) and paired tests of
    every arm against ``versus`` (default: the set's own best arm), each run at its
    validation-chosen point."""
    served = {k: runs[k].served(p) for k, p in sorted(probs.items())}
    stats = SetMetrics(y, counts)
    rows = []
    for (a, s), p in served.items():
        r = runs[(a, s)]
        stats.add((a, s), p, r.threshold)
        rows.append({"arm": a, "seed": s, "threshold": r.threshold, "val_auroc": r.val_auroc,
                     **{m: float(stats.point[(a, s)][m][0]) for m in metrics.REPORTED}, "checkpoint": r.checkpoints[0],
                     "platt_a": r.platt[0] if r.platt else None, "platt_b": r.platt[1] if r.platt else None})
    per_run = pd.DataFrame(rows)
    arms = [a for a in spec.arm_names if a in set(per_run["arm"])]
    seeds = {a: [k for k in served if k[0] == a] for a in arms}
    summary = []
    for a in arms:
        row = {"arm": a, "seeds": len(seeds[a]), "missing_seeds": len(spec.final.seeds) - len(seeds[a])}
        for m in metrics.REPORTED:
            row |= stats.with_ci(seeds[a], m) | {
                f"{m}_seed_sd": float(per_run[per_run.arm == a][m].std(ddof=1)) if len(seeds[a]) > 1 else 0.0}
        summary.append(row)
    summary = pd.DataFrame(summary).sort_values("auroc", ascending=False, kind="stable")
    versus = versus if versus in seeds else summary.iloc[0]["arm"]

    comparison = []
    best_point, best_values = stats.mean(seeds[versus], "auroc")
    bp, bt = np.stack([served[k] for k in seeds[versus]]), np.array([runs[k].threshold for k in seeds[versus]])
    for a in arms:
        if a == versus:
            continue
        point, values = stats.mean(seeds[a], "auroc")
        boot = metrics.paired_difference(point - best_point, values - best_values)
        p, t = np.stack([served[k] for k in seeds[a]]), np.array([runs[k].threshold for k in seeds[a]])
        dl = metrics.delong(y, p.mean(0), bp.mean(0))
        mc = metrics.mcnemar(((p.mean(0) >= t.mean()) == y), ((bp.mean(0) >= bt.mean()) == y))
        comparison.append({"arm": a, "versus": versus, "delta_auroc": boot["difference"],
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
        comparison["verdict"] = np.where(comparison["significant"],
                                         np.where(comparison["delta_auroc"] < 0, "worse than ", "better than ") + versus,
                                         "no significant difference")
    return {"per_run": per_run, "summary": summary, "comparison": comparison}


def ensemble_table(y: np.ndarray, counts: np.ndarray, ens: dict[str, Run],
                   probs: dict[str, np.ndarray]) -> pd.DataFrame:
    """Each arm's seed ensemble on one set, at its validation-chosen point, with patient-bootstrap CIs."""
    stats = SetMetrics(y, counts)
    rows = []
    for arm, run in ens.items():
        stats.add(arm, run.served(probs[arm]), run.threshold)
        rows.append({"arm": arm, "members": len(run.checkpoints), "threshold": run.threshold,
                     "platt_a": run.platt[0] if run.platt else None, "platt_b": run.platt[1] if run.platt else None,
                     **{k: v for m in metrics.REPORTED for k, v in stats.with_ci([arm], m).items()}})
    return pd.DataFrame(rows)


def policy_table(val: operating.Sample, runs: dict[tuple[str, int], Run], y: np.ndarray,
                 probs: dict[tuple[str, int], np.ndarray]) -> pd.DataFrame:
    """What each threshold policy costs on a set: per run and policy, the point chosen on validation
    (operating.choose) and the sensitivity/specificity it gives on the set (raw probabilities; Platt
    keeps their order)."""
    rows = []
    for (arm, seed), p in sorted(probs.items()):
        for policy, target in POLICY_TABLE:
            try:
                threshold = point_of(runs[(arm, seed)], val, policy, target).threshold
            except metrics.MetricError:  # e.g. no increasing calibration on this validation set
                continue
            c = metrics.confusion(y, p, threshold)
            rows.append({"arm": arm, "seed": seed, "policy": policy, "target": target, "raw_threshold": threshold,
                         "sensitivity": c["sensitivity"], "specificity": c["specificity"], "accuracy": c["accuracy"]})
    return pd.DataFrame(rows)


def write_set(spec: Spec, out: str, columns: dict[str, np.ndarray], runs: dict[tuple[str, int], Run],
              probs: dict[tuple[str, int], np.ndarray], val: operating.Sample, versus: str | None = None,
              prevalence: float | None = None) -> dict:
    """Score one set (``columns``: item, patient, label and any per-image flag, in the order of
    ``probs``) and write its six tables to ``out``: predictions, final (per run), summary, comparison,
    ensembles, operating_points. One patient-resample matrix serves every table of the set. The
    ensembles choose their point at ``prevalence`` (the set's, when it names one)."""
    y = columns["label"]
    counts = metrics.resample_counts(columns["patient"], spec.final.bootstrap, spec.seed)
    tables = score(spec, y, counts, runs, probs, versus)
    ens = ensembles(spec, runs, val, prevalence)
    ens_probs = {a: np.mean([p for k, p in sorted(probs.items()) if k[0] == a], axis=0) for a in ens}
    tables["ensembles"] = ensemble_table(y, counts, ens, ens_probs)
    tables["operating_points"] = policy_table(val, runs, y, probs)
    storage.write_csv(storage.join(out, "predictions.csv"), pd.concat([pd.DataFrame(
        {"arm": a, "seed": s, **columns, "probability": runs[(a, s)].served(p), "threshold": runs[(a, s)].threshold})
        for (a, s), p in sorted(probs.items())], ignore_index=True))
    storage.write_csv(storage.join(out, "final.csv"), tables["per_run"])
    for name in ("summary", "comparison", "ensembles", "operating_points"):
        storage.write_csv(storage.join(out, f"{name}.csv"), tables[name])
    return tables | {"ensemble_runs": ens}


# ----------------------------------------------------------------------------- the internal test split

def evaluate(spec: Spec, sdir: str, prepared: Prepared, final_trials: pd.DataFrame) -> dict:
    """Score the final runs on the held-out test split; write the evaluation files and best.json."""
    index, val_index = (prepared.cache.index.iloc[prepared.rows[s]] for s in ("test", "val"))
    y, patients, y_val = index["label"].to_numpy(), index["patient"].to_numpy(), val_index["label"].to_numpy()
    val = validation_sample(spec, y_val, val_index["patient"].to_numpy())
    runs = load_runs(spec, sdir, final_trials, val)
    if not runs:
        raise EvaluationError(f"{sdir}: no final run produced test predictions; see final_trials.csv and the "
                              f"trials' error.txt under final/")
    storage.write_csv(storage.join(sdir, "validation_predictions.csv"), pd.concat(
        [pd.DataFrame({"arm": a, "seed": s, "item": val_index["item"].to_numpy(), "label": y_val,
                       "probability": runs[(a, s)].val, "patient": val_index["patient"].to_numpy()})
         for (a, s) in sorted(runs)], ignore_index=True))
    tables = write_set(spec, sdir, {"item": index["item"].to_numpy(), "patient": patients, "label": y}, runs,
                       {k: r.test for k, r in runs.items()}, val, prevalence=spec.threshold.prevalence)
    summary, comparison, per_run = tables["summary"], tables["comparison"], tables["per_run"]
    ens = tables["ensemble_runs"]
    best_arm = summary.iloc[0]["arm"]
    chosen = runs[tuple(per_run[per_run.arm == best_arm].sort_values("val_auroc", ascending=False, kind="stable")
                        .iloc[0][["arm", "seed"]])]  # the best arm's model to serve: chosen on validation, not test
    top = summary.iloc[0]
    best = {"arm": best_arm, "seed": chosen.seed, "checkpoint": chosen.checkpoints[0], "threshold": chosen.threshold,
            "platt": chosen.platt, "policy": {"policy": spec.threshold.policy, "target": spec.threshold.target},
            "test_metrics": {m: float(top[m]) for m in metrics.REPORTED},
            "test_metrics_ci": {m: [float(top[f"{m}_ci_low"]), float(top[f"{m}_ci_high"])] for m in metrics.REPORTED},
            "ensemble": {"checkpoints": ens[best_arm].checkpoints, "threshold": ens[best_arm].threshold,
                         "platt": ens[best_arm].platt}}
    points = validation_points(spec, runs, ens, val)
    storage.write_csv(storage.join(sdir, "validation_points.csv"), points)
    served = points[(points.arm == chosen.arm) & (points.seed == chosen.seed)].iloc[0]
    best["operating"] = {"interval": [float(served["interval_low"]), float(served["interval_high"])],
                         "interval_logits": float(served["interval_logits"]), "fragile": bool(served["fragile"]),
                         "prevalence": spec.threshold.prevalence}
    verdict = " ".join([verdict_text(summary, comparison, spec.final.bootstrap)] + caveats(spec, summary)
                       + operating.fragile_caveat(served))
    storage.write_json(storage.join(sdir, "best.json"), best | {"verdict": verdict})
    subgroups.write(spec, sdir, "test", index, runs, {k: r.test for k, r in runs.items()}, comparison)
    return {"summary": summary, "comparison": comparison, "best": best, "verdict": verdict, "runs": runs,
            "val": val, "points": points}


def validation_points(spec: Spec, runs: dict[tuple[str, int], Run], ens: dict[str, Run],
                      val: operating.Sample) -> pd.DataFrame:
    """Every final run's and seed ensemble's (seed -1) operating point on validation, with its
    interval, its bootstrap over validation patients and what it costs at the validation and the
    site's prevalence (validation_points.csv)."""
    t = spec.threshold
    rows = [{"arm": r.arm, "seed": r.seed, **point_of(r, val, t.policy, t.target, t.prevalence).row()}
            for r in [*(runs[k] for k in sorted(runs)), *ens.values()]]
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- external sets

def load_study_runs(spec: Spec, sdir: str) -> tuple[dict[tuple[str, int], Run], operating.Sample]:
    """The final runs as the internal evaluation chose them (final.csv: operating points;
    validation_predictions.csv: validation probabilities and patients), for scoring new data post
    hoc. A study written before validation patients were recorded bootstraps images instead."""
    final = storage.read_csv(storage.join(sdir, "final.csv"))
    val = storage.read_csv(storage.join(sdir, "validation_predictions.csv"), dtype={"patient": str, "item": str})
    runs, v = {}, None
    for r in final.itertuples():
        v = val[(val["arm"] == r.arm) & (val["seed"] == r.seed)]
        platt = (float(r.platt_a), float(r.platt_b)) if pd.notna(r.platt_a) else None
        runs[(r.arm, int(r.seed))] = Run(r.arm, int(r.seed), [r.checkpoint], float(r.val_auroc),
                                         v["probability"].to_numpy(), np.zeros(0), float(r.threshold), platt)
    patients = v["patient" if "patient" in v else "item"].to_numpy()
    return runs, validation_sample(spec, v["label"].to_numpy(), patients)


def evaluate_external(spec: Spec, sdir: str, name: str, index: pd.DataFrame, probs: dict[tuple[str, int], np.ndarray],
                      audit: dict, prevalence: float | None = None) -> dict:
    """Score an external set once with every final run (and each arm's seed ensemble) at the points
    they chose on validation (adjusted to the set's expected ``prevalence`` where the policy depends
    on it); paired tests against the arm the study chose. ``index`` holds the
    set's items with the overlap flags of data.audit_overlap; byte-identical copies of the study's
    images are left out, shared patient ids are scored both ways. Writes external/<name>/."""
    runs, val = load_study_runs(spec, sdir)
    prevalence = spec.threshold.prevalence if prevalence is None else prevalence
    if prevalence != spec.threshold.prevalence:
        for run in runs.values():
            with_point(run, point_of(run, val, spec.threshold.policy, spec.threshold.target, prevalence))
    chosen = storage.read_json(storage.join(sdir, "best.json"))["arm"]
    keep = ~index["same_bytes"].to_numpy()
    if len(set(index["label"][keep])) < 2:
        raise EvaluationError(f"external set {name}: {int(keep.sum())} usable images of a single class; AUROC and "
                              "the comparison need both classes")
    y, patients = index["label"].to_numpy()[keep], index["patient"].to_numpy()[keep]
    mine = {k: p[keep] for k, p in probs.items() if k in runs}
    out = storage.join(sdir, "external", name)
    shared = index["shared_patient"].to_numpy()[keep]
    tables = write_set(spec, out, {"item": index["item"].to_numpy()[keep], "patient": patients, "label": y,
                                   "shared_patient": shared}, runs, mine, val, versus=chosen,
                    prevalence=prevalence)
    if shared.any() and len(set(y[~shared])) == 2:
        apart = score(spec, y[~shared], metrics.resample_counts(patients[~shared], spec.final.bootstrap, spec.seed),
                      runs, {k: p[~shared] for k, p in mine.items()}, chosen)
        storage.write_csv(storage.join(out, "summary_without_shared_patient_ids.csv"), apart["summary"])
    storage.write_json(storage.join(out, "audit.json"), audit | {"scored_images": int(keep.sum())})
    internal = {n: storage.read_csv(storage.join(sdir, f"{n}.csv")) for n in ("summary", "comparison")}
    text = external_verdict(name, internal["summary"], internal["comparison"], tables["summary"],
                            tables["comparison"], chosen, spec.final.bootstrap)
    storage.write_json(storage.join(out, "verdict.json"), {"name": name, "verdict": text})
    subgroups.write(spec, out, name, index[keep], runs, mine, tables["comparison"])
    return tables | {"verdict": text}


# ----------------------------------------------------------------------------- words

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


def external_verdict(name: str, internal: pd.DataFrame, internal_cmp: pd.DataFrame, external: pd.DataFrame,
                     external_cmp: pd.DataFrame, chosen: str, n_bootstrap: int) -> str:
    """Does the study's answer hold on an external set? The chosen arm's external metrics, whether
    the internal ranking holds, and whether the internal verdict is confirmed: the same arms
    significantly worse than the chosen one (and none significantly better)."""
    row = external.set_index("arm").loc[chosen]
    gap = row["auroc"] - internal.set_index("arm").loc[chosen, "auroc"]
    text = (f"On {name} (external, scored once after everything was chosen on validation), {chosen} reaches AUROC "
            f"{ci_text(row, 'auroc')} and accuracy {ci_text(row, 'accuracy')} (sensitivity {row['sensitivity']:.3f}, "
            f"specificity {row['specificity']:.3f}), an AUROC {abs(gap):.3f} {'lower' if gap < 0 else 'higher'} "
            f"than on the internal test split.")
    order_in, order_ex = list(internal["arm"]), list(external["arm"])
    if len(order_in) > 1:
        text += (" The internal ranking holds there." if order_in == order_ex else
                 f" The internal ranking does not hold there ({' > '.join(order_in)} internally, "
                 f"{' > '.join(order_ex)} on {name}).")
        worse_in = set(internal_cmp.loc[internal_cmp["significant"].astype(bool), "arm"])
        sig_ex = external_cmp[external_cmp["significant"].astype(bool)]
        worse_ex, better_ex = set(sig_ex.loc[sig_ex["delta_auroc"] < 0, "arm"]), set(sig_ex.loc[sig_ex["delta_auroc"] > 0, "arm"])
        if worse_in == worse_ex and not better_ex:
            text += f" The internal verdict is confirmed on {name}."
        else:
            differ = [difference_text(r, n_bootstrap) for r in external_cmp.itertuples()
                      if (r.arm in worse_in) != (r.arm in worse_ex) or r.arm in better_ex]
            text += (f" The internal verdict is not confirmed on {name}: against {chosen} there, "
                     + "; ".join(differ) + ".")
    return text
