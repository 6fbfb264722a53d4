"""Binary classification metrics and the statistics of a fair comparison.

Conventions: ``y`` holds 0/1 labels (1 = PNEUMONIA), ``p`` scores or probabilities, and an
image is called positive when ``p >= threshold``. AUROC is the Mann-Whitney statistic (ties
count 1/2). AUROC, Youden J and DeLong are undefined when ``y`` holds a single class: they raise
MetricError instead of returning a number that could be ranked.

Uncertainty is the patient bootstrap, computed as arrays: ``resample_counts`` draws every
resample at once as a (resamples x images) count matrix, ``resampled`` gives every reported
metric on every resample from it, ``percentile_ci`` and ``paired_difference`` read intervals and
paired tests off those arrays. Any new statistic (a subgroup's, an operating point's) can take
the same matrix: the same patients, the same draws.
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
    """Ranks 1..n, ties sharing their mean rank (as scipy.stats.rankdata, whose import costs 0.4 s)."""
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return ranks


def roc_counts(y, p, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC's points in weighted counts: true and false positives (arrays of shape (rows of
    ``counts``, distinct scores + 1)) at each threshold, from +inf (nothing called positive) down
    through every distinct score. Row r of ``counts`` says how often each image counts (a bootstrap
    resample; ``np.ones((1, n))``: the sample itself). One sort of the scores serves every row; each
    class's counts are summed cumulatively once, then read at the end of each run of equal scores."""
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    ends = np.flatnonzero(np.r_[ps[1:] != ps[:-1], True])  # the last image of each run of equal scores
    out = []
    for cls in (1, 0):
        cumulative = np.zeros((len(counts), int((ys == cls).sum()) + 1))
        np.cumsum(counts[:, order[ys == cls]], axis=1, out=cumulative[:, 1:])
        out.append(cumulative[:, np.r_[0, np.cumsum(ys == cls)[ends]]])
    return out[0], out[1], np.r_[np.inf, ps[ends]]


def _auroc_from_counts(tps: np.ndarray, fps: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC of each row (ties count 1/2), NaN where a row holds a single class: the
    trapezoids under the ROC's steps, summed in whole counts (exact) before the one division."""
    twice_area = ((fps[:, 1:] - fps[:, :-1]) * (tps[:, 1:] + tps[:, :-1])).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return twice_area / (2 * tps[:, -1] * fps[:, -1])


def auroc(y, p) -> float:
    """Probability that a random positive scores above a random negative (ties count 1/2)."""
    y, p = _arrays(y, p)
    _need_both_classes(y, "AUROC")
    return float(_auroc_from_counts(*roc_counts(y, p, np.ones((1, len(y))))[:2])[0])


def rates(tp, fp, tn, fn) -> dict[str, np.ndarray]:
    """Accuracy, sensitivity, specificity, precision and F1 from confusion counts (numbers or arrays
    of them); a rate with an empty denominator is NaN."""
    tp, fp, tn, fn = (np.asarray(c, dtype=float) for c in (tp, fp, tn, fn))
    with np.errstate(invalid="ignore"):
        return {"accuracy": (tp + tn) / (tp + fp + tn + fn), "sensitivity": tp / (tp + fn),
                "specificity": tn / (tn + fp), "precision": tp / (tp + fp), "f1": 2 * tp / (2 * tp + fp + fn)}


def confusion(y, p, threshold: float = 0.5) -> dict[str, float]:
    """Counts and rates at ``threshold``; a rate with an empty denominator is NaN."""
    y, p = _arrays(y, p)
    pred = p >= threshold
    tp, fp = int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum())
    tn, fn = int((~pred & (y == 0)).sum()), int((~pred & (y == 1)).sum())
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, **{k: float(v) for k, v in rates(tp, fp, tn, fn).items()}}


def youden_threshold(y, p) -> float:
    """The score threshold maximising sensitivity + specificity - 1 (ties: the higher one)."""
    y, p = _arrays(y, p)
    n_pos, n_neg = _need_both_classes(y, "Youden's J")
    tps, fps, thresholds = roc_counts(y, p, np.ones((1, len(y))))
    return float(thresholds[1 + int(np.argmax(tps[0, 1:] / n_pos - fps[0, 1:] / n_neg))])


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
    tps, fps, thresholds = roc_counts(y, p, np.ones((1, len(y))))
    return fps[0] / n_neg, tps[0] / n_pos, thresholds


CALIBRATION_BINS = 10


def calibration_bin(p: np.ndarray, bins: int = CALIBRATION_BINS) -> np.ndarray:
    """Each probability's bin of equal width: [0, 0.1), [0.1, 0.2), ..., [0.9, 1]."""
    return np.clip(np.digitize(p, np.linspace(0, 1, bins + 1)[1:-1], right=False), 0, bins - 1)


def calibration(y, p, bins: int = CALIBRATION_BINS) -> tuple[float, list[dict]]:
    """Expected calibration error over equal-width bins, and the per-bin reliability table."""
    y, p = _arrays(y, p)
    which = calibration_bin(p, bins)
    count = np.bincount(which, minlength=bins)
    sum_p, sum_y = np.bincount(which, p, bins), np.bincount(which, y, bins)
    edges = np.linspace(0, 1, bins + 1)
    table = [{"bin_low": edges[b], "bin_high": edges[b + 1], "count": int(count[b]),
              "mean_probability": float(sum_p[b] / count[b]), "fraction_positive": float(sum_y[b] / count[b])}
             for b in range(bins) if count[b]]
    return float(np.abs(sum_p - sum_y).sum() / len(y)), table


REPORTED = ("auroc", "accuracy", "sensitivity", "specificity", "f1", "ece")


def resampled(y, p, threshold: float, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Every reported metric (``REPORTED``) at ``threshold`` on every row of ``counts`` (how often
    each image counts in that row: a resample of ``resample_counts``, or ``np.ones((1, n))`` for the
    sample itself), as arrays over the rows. A row holding a single class is NaN for every metric
    (AUROC is undefined there: the resample is skipped, as a scalar metric would raise).

    Array operations throughout: AUROC from one sort of the scores (``roc_counts``), confusion
    counts as matrix products, ECE from per-bin weighted sums."""
    y, p = _arrays(y, p)
    counts = np.atleast_2d(np.asarray(counts, dtype=float))
    tps, fps, _ = roc_counts(y, p, counts)
    pos, neg = tps[:, -1], fps[:, -1]
    called = p >= threshold
    tp, fp = counts @ (called & (y == 1)).astype(float), counts @ (called & (y == 0)).astype(float)
    at_threshold = rates(tp, fp, neg - fp, pos - tp)
    gap = np.zeros((len(p), CALIBRATION_BINS))  # (p - y) of each image, in its calibration bin's column
    gap[np.arange(len(p)), calibration_bin(p)] = p - y
    out = {"auroc": _auroc_from_counts(tps, fps),
           **{m: at_threshold[m] for m in ("accuracy", "sensitivity", "specificity", "f1")},
           "ece": np.abs(counts @ gap).sum(1) / (pos + neg)}
    single = (pos == 0) | (neg == 0)
    for values in out.values():
        values[single] = np.nan
    return out


def summary(y, p, threshold: float) -> dict[str, float]:
    """The metrics every report line carries (``REPORTED``), at ``threshold``."""
    y, p = _arrays(y, p)
    _need_both_classes(y, "AUROC")
    return {m: float(v[0]) for m, v in resampled(y, p, threshold, np.ones((1, len(y)))).items()}


# ----------------------------------------------------------------------------- uncertainty

def resample_counts(groups, n: int = 1000, seed: int = 0) -> np.ndarray:
    """The patient bootstrap as one matrix: row r says how often each image is drawn in resample r
    (its patient's draws: a patient's images travel together). Shape (n, images), float.

    All ``n`` resamples come from one generator call, ``integers(0, P, (n, P))`` for P patients
    (sorted ids), which yields exactly the draws of ``n`` successive ``integers(0, P, P)`` calls: a
    loop over resamples with the same seed sees the same patients. Any statistic that is a weighted
    sum over images becomes a matrix product with it (``resampled``); reuse one matrix for every
    statistic of a set, so paired differences compare the same resamples."""
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    patients = int(inverse.max()) + 1 if len(inverse) else 0
    picks = np.random.default_rng(seed).integers(0, patients, (n, patients))
    per_patient = np.bincount((picks + patients * np.arange(n)[:, None]).ravel(), minlength=n * patients)
    return per_patient.reshape(n, patients).astype(float)[:, inverse.ravel()]


def percentile_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of a statistic's resampled values; NaN (undefined) resamples are skipped."""
    values = np.asarray(values)
    lo, hi = np.quantile(values[~np.isnan(values)], [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_difference(difference: float, resampled_differences: np.ndarray) -> dict[str, float]:
    """A difference between two statistics and its paired bootstrap: 95% CI and two-sided p-value
    from the same resamples' differences (NaN resamples skipped)."""
    values = np.asarray(resampled_differences)
    values = values[~np.isnan(values)]
    p = min(1.0, 2 * min((values <= 0).mean(), (values >= 0).mean()))
    lo, hi = percentile_ci(values)
    return {"difference": float(difference), "ci_low": lo, "ci_high": hi, "p_value": float(p)}


def delong(y, p_a, p_b) -> dict[str, float]:
    """DeLong's test for two correlated AUROCs on the same images (fast midrank form)."""
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
        p = math.erfc(abs(z) / math.sqrt(2))  # two-sided normal tail
    return {"auroc_a": float(aucs[0]), "auroc_b": float(aucs[1]), "difference": float(diff), "z": float(z),
            "p_value": float(p)}


def mcnemar(correct_a, correct_b) -> dict[str, float]:
    """McNemar's test on paired correctness; exact binomial when discordant pairs < 25.
    (Closed forms, not scipy.stats: its import costs each evaluation about a second.)"""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    if n == 0:
        p = 1.0
    elif n < 25:  # two-sided exact binomial(n, 1/2): twice the tail at the smaller count
        p = 2 * sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    else:  # chi-square with 1 degree of freedom and continuity correction: its tail is erfc(sqrt(x / 2))
        p = math.erfc(math.sqrt((abs(only_a - only_b) - 1) ** 2 / n / 2))
    return {"only_a_correct": only_a, "only_b_correct": only_b, "p_value": float(min(1.0, p))}
