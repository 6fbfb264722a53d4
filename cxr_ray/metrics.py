"""Binary classification metrics and the statistics of a fair comparison.

Conventions: ``y`` holds 0/1 labels (1 = PNEUMONIA), ``p`` scores or probabilities, and an
image is called positive when ``p >= threshold``. AUROC is the Mann-Whitney rank statistic
with mid-ranks for ties. AUROC, Youden J and DeLong are undefined when ``y`` holds a single
class: they raise MetricError instead of returning a number that could be ranked.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import CxrError


class MetricError(CxrError, ValueError):
    pass


def _arrays(y, p) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(y, dtype=int).ravel(), np.asarray(p, dtype=float).ravel()
    if len(y) != len(p):
        raise MetricError(f"{len(y)} labels but {len(p)} scores")
    return y, p


def _need_both_classes(y: np.ndarray, what: str) -> tuple[int, int]:
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise MetricError(f"{what} is undefined with a single class ({n_pos} positive, {n_neg} negative)")
    return n_pos, n_neg


def midranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank (as scipy.stats.rankdata; scipy.stats costs every
    training process 0.4 s of import, and AUROC runs in every epoch)."""
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return ranks


def auroc(y, p) -> float:
    """Probability that a random positive scores above a random negative (ties count 1/2)."""
    y, p = _arrays(y, p)
    n_pos, n_neg = _need_both_classes(y, "AUROC")
    ranks = midranks(p)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def confusion(y, p, threshold: float = 0.5) -> dict[str, float]:
    """Counts and rates at ``threshold``; a rate with an empty denominator is NaN."""
    y, p = _arrays(y, p)
    pred = p >= threshold
    tp = int((pred & (y == 1)).sum())
    fp = int((pred & (y == 0)).sum())
    tn = int((~pred & (y == 0)).sum())
    fn = int((~pred & (y == 1)).sum())

    def ratio(a, b):
        return a / b if b else math.nan

    precision, sensitivity = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "accuracy": ratio(tp + tn, len(y)),
        "sensitivity": sensitivity,
        "specificity": ratio(tn, tn + fp),
        "precision": precision,
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }


def youden_threshold(y, p) -> float:
    """The score threshold maximising sensitivity + specificity - 1 (ties: the higher one)."""
    y, p = _arrays(y, p)
    n_pos, n_neg = _need_both_classes(y, "Youden's J")
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    tps, fps = np.cumsum(ys), np.cumsum(1 - ys)
    last = np.r_[ps[1:] != ps[:-1], True]  # end of each run of equal scores
    j = tps[last] / n_pos - fps[last] / n_neg
    return float(ps[last][int(np.argmax(j))])


def threshold_at_sensitivity(y, p, target: float) -> float:
    """The highest threshold whose sensitivity is at least ``target`` (the most specific such point)."""
    y, p = _arrays(y, p)
    n_pos, _ = _need_both_classes(y, "a sensitivity target")
    k = max(1, math.ceil(target * n_pos - 1e-9))
    return float(np.sort(p[y == 1])[::-1][k - 1])


def threshold_at_specificity(y, p, target: float) -> float:
    """The lowest threshold whose specificity is at least ``target`` (the most sensitive such point):
    just above the score of the k-th lowest-scoring negative."""
    y, p = _arrays(y, p)
    _, n_neg = _need_both_classes(y, "a specificity target")
    k = max(1, math.ceil(target * n_neg - 1e-9))
    return float(np.nextafter(np.sort(p[y == 0])[k - 1], np.inf))


def logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def fit_platt(y, p) -> tuple[float, float]:
    """Platt scaling: (a, b) of P(y=1) = sigmoid(a * logit(p) + b), by maximum likelihood."""
    from scipy.optimize import minimize
    y, p = _arrays(y, p)
    _need_both_classes(y, "Platt scaling")
    z = logit(p)

    def nll(ab):
        s = ab[0] * z + ab[1]
        return float(np.sum(np.logaddexp(0, s) - y * s))

    a, b = minimize(nll, np.array([1.0, 0.0]), method="BFGS").x
    if not a > 0:
        raise MetricError(f"Platt scaling found no increasing calibration (slope {a:.3g}): the scores do not rank "
                          "the classes on this sample")
    return float(a), float(b)


def apply_platt(p, ab: tuple[float, float] | None) -> np.ndarray:
    """Platt-calibrated probabilities; ``ab`` None (an uncalibrated operating point) keeps them as they are."""
    p = np.asarray(p, dtype=float)
    return p if ab is None else 1 / (1 + np.exp(-(ab[0] * logit(p) + ab[1])))


POLICIES = ("youden", "sensitivity", "specificity", "calibrated")


def operating_point(policy: str, y, p, target: float | None = None) -> dict:
    """Where to call an image positive, chosen on a labelled sample (validation, or a site's own):
      youden       the threshold maximising sensitivity + specificity - 1
      sensitivity  the most specific threshold whose sensitivity is at least ``target``
      specificity  the most sensitive threshold whose specificity is at least ``target``
      calibrated   Platt scaling fitted on the sample, then 0.5 on the calibrated probability
    Returns the threshold on the raw probability and the Platt parameters (None unless calibrated);
    Platt is increasing, so "calibrated >= 0.5" is "raw >= threshold"."""
    if policy == "youden":
        return {"threshold": youden_threshold(y, p), "platt": None}
    if policy == "sensitivity":
        return {"threshold": threshold_at_sensitivity(y, p, target), "platt": None}
    if policy == "specificity":
        return {"threshold": threshold_at_specificity(y, p, target), "platt": None}
    if policy == "calibrated":
        a, b = fit_platt(y, p)
        return {"threshold": float(1 / (1 + math.exp(b / a))), "platt": (a, b)}
    raise MetricError(f"unknown threshold policy {policy!r}: choose one of {', '.join(POLICIES)}")


def roc_curve(y, p) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rate, true-positive rate and thresholds, from (0, 0) to (1, 1)."""
    y, p = _arrays(y, p)
    n_pos, n_neg = _need_both_classes(y, "ROC curve")
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    last = np.r_[ps[1:] != ps[:-1], True]
    tpr = np.r_[0, np.cumsum(ys)[last] / n_pos]
    fpr = np.r_[0, np.cumsum(1 - ys)[last] / n_neg]
    return fpr, tpr, np.r_[np.inf, ps[last]]


def calibration(y, p, bins: int = 10) -> tuple[float, list[dict]]:
    """Expected calibration error over equal-width bins, and the per-bin reliability table."""
    y, p = _arrays(y, p)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        m = which == b
        if not m.any():
            continue
        conf, freq = float(p[m].mean()), float(y[m].mean())
        ece += m.mean() * abs(conf - freq)
        table.append({"bin_low": edges[b], "bin_high": edges[b + 1], "count": int(m.sum()),
                      "mean_probability": conf, "fraction_positive": freq})
    return float(ece), table


REPORTED = ("auroc", "accuracy", "sensitivity", "specificity", "f1", "ece")


def summary(y, p, threshold: float) -> dict[str, float]:
    """The metrics every report line carries (``REPORTED``), at ``threshold``."""
    c = confusion(y, p, threshold)
    return {"auroc": auroc(y, p), "accuracy": c["accuracy"], "sensitivity": c["sensitivity"],
            "specificity": c["specificity"], "f1": c["f1"], "ece": calibration(y, p)[0]}


# ----------------------------------------------------------------------------- uncertainty

def patient_bootstrap(groups, n: int = 1000, seed: int = 0):
    """Yield ``n`` index arrays that resample whole patients with replacement."""
    groups = np.asarray(groups)
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = np.argsort(inverse, kind="stable")
    starts = np.r_[0, np.cumsum(np.bincount(inverse))]
    rng = np.random.default_rng(seed)
    for _ in range(n):
        picked = rng.integers(0, len(uniq), len(uniq))
        yield np.concatenate([members[starts[g]:starts[g + 1]] for g in picked])


def bootstrap_ci(statistic, arrays: list[np.ndarray], groups, n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """Point estimate and percentile CI of ``statistic(*arrays)`` under patient resampling.

    Resamples where the statistic is undefined (one class drawn) are skipped.
    """
    point = statistic(*arrays)
    values = []
    for idx in patient_bootstrap(groups, n, seed):
        try:
            values.append(statistic(*(a[..., idx] for a in arrays)))
        except MetricError:
            continue
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(point), float(lo), float(hi)


def paired_bootstrap(statistic, arrays_a: list[np.ndarray], arrays_b: list[np.ndarray], groups,
                     n: int = 1000, seed: int = 0) -> dict[str, float]:
    """Difference statistic(a) - statistic(b) on the same resampled patients: CI and p-value."""
    diff = statistic(*arrays_a) - statistic(*arrays_b)
    values = []
    for idx in patient_bootstrap(groups, n, seed):
        try:
            values.append(statistic(*(x[..., idx] for x in arrays_a)) - statistic(*(x[..., idx] for x in arrays_b)))
        except MetricError:
            continue
    values = np.asarray(values)
    p = min(1.0, 2 * min((values <= 0).mean(), (values >= 0).mean()))
    lo, hi = np.quantile(values, [0.025, 0.975])
    return {"difference": float(diff), "ci_low": float(lo), "ci_high": float(hi), "p_value": float(p)}


def delong(y, p_a, p_b) -> dict[str, float]:
    """DeLong's test for two correlated AUROCs on the same images (fast midrank form)."""
    from scipy import stats
    y, p_a = _arrays(y, p_a)
    _, p_b = _arrays(y, p_b)
    n_pos, n_neg = _need_both_classes(y, "DeLong's test")
    aucs, v10, v01 = [], [], []
    for p in (p_a, p_b):
        pos, neg = p[y == 1], p[y == 0]
        r_all = midranks(np.r_[pos, neg])
        r_pos, r_neg = midranks(pos), midranks(neg)
        aucs.append((r_all[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
        v10.append((r_all[:n_pos] - r_pos) / n_neg)  # structural components of positives
        v01.append(1 - (r_all[n_pos:] - r_neg) / n_pos)  # ... of negatives
    s10, s01 = np.cov(np.vstack(v10)), np.cov(np.vstack(v01))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / n_pos + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n_neg
    diff = aucs[0] - aucs[1]
    if var <= 0:
        z, p = (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
    else:
        z = diff / math.sqrt(var)
        p = 2 * stats.norm.sf(abs(z))
    return {"auroc_a": float(aucs[0]), "auroc_b": float(aucs[1]), "difference": float(diff), "z": float(z),
            "p_value": float(p)}


def mcnemar(correct_a, correct_b) -> dict[str, float]:
    """McNemar's test on paired correctness; exact binomial when discordant pairs < 25."""
    from scipy import stats
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    if n == 0:
        p = 1.0
    elif n < 25:
        p = stats.binomtest(only_a, n, 0.5).pvalue
    else:
        chi2 = (abs(only_a - only_b) - 1) ** 2 / n
        p = stats.chi2.sf(chi2, 1)
    return {"only_a_correct": only_a, "only_b_correct": only_b, "p_value": float(min(1.0, p))}
