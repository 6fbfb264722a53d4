"""Operating points that say how well they are determined, and what they cost at a site's prevalence.

A policy (metrics.POLICIES) picks a threshold on a labelled sample (validation, or a site's own).
On a near-perfect validation set Youden's J is maximal over a wide interval of thresholds and the
plain rule's point (the highest threshold of maximal J) is close to arbitrary inside it. So every
point here comes with its bootstrap over the sample's PATIENTS (one resample matrix,
``metrics.resample_counts``; every resample's point read off one ROC computation, no loop over
resamples):

  youden       the point is the middle (logit scale) of the thresholds whose J on the sample is
               within the resampling noise of the maximal J (one bootstrap SD of the resampled
               maxima); that interval is reported. Train-only evidence (README: Operating points).
  sensitivity  the most specific threshold reaching the target (a quantile of the positives' scores:
  specificity  a smooth estimate, not an argmax); the interval is its 95% bootstrap interval.
  calibrated   Platt scaling, 0.5 on the calibrated probability; interval: the 95% bootstrap
               interval of that threshold (every resample's Platt fit by vectorised Newton steps).

Prevalence: Youden's J, sensitivity and specificity are rates within each class, so those points
do not depend on prevalence. The calibrated policy's 0.5 is the Bayes decision at the sample's own
prevalence; at a site of prevalence pi' Bayes' rule multiplies the posterior odds by
odds(pi') / odds(pi), i.e. adds log of that ratio to Platt's intercept: the served probability is
the site's posterior and 0.5 on it is the site's Bayes decision. For every policy ``expected``
gives what the point costs (PPV, NPV, accuracy) at any prevalence, from its sensitivity and
specificity on the sample. No torch, no Ray.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import metrics

# A point whose interval spans more than this many logits (a factor e^1 = 2.7 in the odds of the
# threshold) is called fragile: where it lands inside the interval is not settled by validation.
FRAGILE_LOGITS = 1.0


@dataclass(frozen=True)
class Sample:
    """A labelled sample that points are chosen on, and its patient resamples (the same draws for
    every run scored on it, so the points of seeds and ensembles are bootstrapped alike)."""
    y: np.ndarray
    counts: np.ndarray  # (resamples x images), metrics.resample_counts

    @classmethod
    def of(cls, y, patients, resamples: int, seed: int) -> "Sample":
        return cls(np.asarray(y, dtype=int), metrics.resample_counts(patients, resamples, seed))

    @property
    def prevalence(self) -> float:
        return float(self.y.mean())


@dataclass(frozen=True)
class Point:
    """A policy's operating point on a sample, with its uncertainty. Thresholds are on the raw
    probability (``threshold``, ``low``, ``high``, ``plain``, ``boot``); the served threshold is 0.5
    on the calibrated probability when ``platt`` is set."""
    policy: str
    target: float | None
    threshold: float  # the chosen (stable) point
    platt: tuple[float, float] | None  # calibration of the served probability (prevalence-adjusted)
    plain: float  # the plain rule's point on the whole sample (metrics.operating_point)
    low: float  # the interval of thresholds that are optimal or within noise of it (module docstring)
    high: float
    boot: np.ndarray  # the same rule's point on every patient resample (NaN: a single-class resample)
    sensitivity: float  # on the sample, at ``threshold``
    specificity: float
    prevalence: float  # of the sample
    site_prevalence: float | None = None  # the prevalence the point was adjusted for, if any

    @property
    def served_threshold(self) -> float:
        return 0.5 if self.platt else self.threshold

    @property
    def width(self) -> float:
        """The interval's width in logits."""
        return float(metrics.logit(self.high) - metrics.logit(self.low))

    @property
    def fragile(self) -> bool:
        return self.width > FRAGILE_LOGITS

    def row(self) -> dict:
        """The point as a table row (operating points CSV)."""
        finite = self.boot[np.isfinite(self.boot)]
        lo, median, hi = (float(v) for v in np.quantile(finite, [0.025, 0.5, 0.975])) if len(finite) else [math.nan] * 3
        out = {"policy": self.policy, "target": self.target, "threshold": self.threshold,
               "served_threshold": self.served_threshold, "plain_threshold": self.plain,
               "interval_low": self.low, "interval_high": self.high, "interval_logits": self.width,
               "fragile": self.fragile, "boot_low": lo, "boot_median": median, "boot_high": hi,
               "val_sensitivity": self.sensitivity, "val_specificity": self.specificity,
               "val_prevalence": self.prevalence, "site_prevalence": self.site_prevalence,
               "platt_a": self.platt[0] if self.platt else None, "platt_b": self.platt[1] if self.platt else None}
        for name, pi in (("val", self.prevalence), ("site", self.site_prevalence)):
            costs = expected(self.sensitivity, self.specificity, pi) if pi is not None else {}
            out |= {f"{name}_expected_{k}": costs.get(k) for k in ("ppv", "npv", "accuracy")}
        return out


def expected(sensitivity: float, specificity: float, prevalence: float) -> dict[str, float]:
    """What a point of this sensitivity and specificity costs at ``prevalence`` (Bayes' rule): PPV,
    NPV and accuracy."""
    se, sp, pi = sensitivity, specificity, prevalence
    called_pos, called_neg = se * pi + (1 - sp) * (1 - pi), sp * (1 - pi) + (1 - se) * pi
    return {"ppv": se * pi / called_pos if called_pos else math.nan,
            "npv": sp * (1 - pi) / called_neg if called_neg else math.nan,
            "accuracy": se * pi + sp * (1 - pi)}


def prevalence_shift(prevalence: float, site_prevalence: float | None) -> float:
    """log(odds(site) / odds(sample)): what Bayes' rule adds to the log posterior odds at the site."""
    if site_prevalence is None:
        return 0.0
    if not 0 < site_prevalence < 1:
        raise metrics.MetricError(f"prevalence must be in (0, 1) (got {site_prevalence})")
    return math.log(site_prevalence / (1 - site_prevalence)) - math.log(prevalence / (1 - prevalence))


def choose(policy: str, target: float | None, sample: Sample, p, site_prevalence: float | None = None) -> Point:
    """``policy``'s point on ``sample`` (scores ``p``) with its bootstrap and interval; adjusted to
    ``site_prevalence`` where the policy depends on prevalence (calibrated only)."""
    y, p = sample.y, np.asarray(p, dtype=float)
    plain = metrics.operating_point(policy, y, p, target)  # raises MetricError on one class or an unknown policy
    shift = prevalence_shift(float(y.mean()), site_prevalence)
    tps, fps, thresholds = metrics.roc_counts(y, p, sample.counts)
    pos, neg = tps[:, -1:], fps[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # single-class or unfitted resamples: NaN
        if policy == "youden":
            boot, threshold, low, high = _youden(y, p, tps / pos - fps / neg, thresholds)
        else:
            if policy == "calibrated":
                a, b = _platt_resampled(y, p, sample.counts, plain["platt"])
                boot = 1 / (1 + np.exp((b + shift) / a))
                a0, b0 = plain["platt"]
                threshold = 1 / (1 + math.exp((b0 + shift) / a0))
            elif policy == "sensitivity":
                boot = _first_column(tps[:, 1:] / pos >= target - 1e-9, thresholds[1:])
                threshold = plain["threshold"]
            else:  # specificity: just above the first negative whose call breaks the target
                breaking = _first_column(1 - fps[:, 1:] / neg < target - 1e-9, np.arange(len(thresholds) - 1))
                boot = np.full(len(breaking), np.nan)
                ok = np.isfinite(breaking)
                boot[ok] = np.nextafter(thresholds[1:][breaking[ok].astype(int)], np.inf)
                threshold = plain["threshold"]
            boot[(pos[:, 0] == 0) | (neg[:, 0] == 0)] = np.nan
            low, high = (np.nanquantile(boot, [0.025, 0.975]) if np.isfinite(boot).any() else (threshold, threshold))
    platt = (plain["platt"][0], plain["platt"][1] + shift) if plain["platt"] else None
    c = metrics.confusion(y, p, threshold)
    return Point(policy, target, float(threshold), platt, float(plain["threshold"]), float(min(low, threshold)),
                 float(max(high, threshold)), boot, c["sensitivity"], c["specificity"], float(y.mean()),
                 site_prevalence)


def _first_column(hit: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per row, ``values`` at the first True column of ``hit`` (NaN where none)."""
    first = np.argmax(hit, axis=1)
    return np.where(hit.any(axis=1), values[first].astype(float), np.nan)


def _youden(y: np.ndarray, p: np.ndarray, j_boot: np.ndarray, thresholds: np.ndarray):
    """Youden's noise-mid point: the middle (logit scale) of the thresholds whose J is within the
    resampling noise (one SD of the resamples' maximal J) of the maximal J, from the score just
    below the lowest such threshold to the highest. On the whole sample (the point and its
    interval) and, with the same noise, on every resample (its bootstrap distribution)."""
    scores, j_boot = thresholds[1:], j_boot[:, 1:]
    single = ~np.isfinite(j_boot).all(axis=1)
    maxima = j_boot.max(axis=1, initial=-np.inf)
    noise = float(np.std(maxima[~single])) if (~single).any() else 0.0
    tps, fps, _ = metrics.roc_counts(y, p, np.ones((1, len(y))))
    j_all = np.vstack([tps[0, 1:] / tps[0, -1] - fps[0, 1:] / fps[0, -1], np.where(single[:, None], 0, j_boot)])
    good = j_all >= j_all.max(axis=1, keepdims=True) - noise - 1e-12
    first, last = np.argmax(good, axis=1), good.shape[1] - 1 - np.argmax(good[:, ::-1], axis=1)
    high, low = scores[first], scores[np.minimum(last + 1, len(scores) - 1)]
    middle = 1 / (1 + np.exp(-(metrics.logit(high) + metrics.logit(low)) / 2))
    boot = middle[1:].astype(float)
    boot[single] = np.nan
    return boot, float(middle[0]), float(low[0]), float(high[0])


def _platt_resampled(y: np.ndarray, p: np.ndarray, counts: np.ndarray, start: tuple[float, float],
                     steps: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Platt's (a, b) on every resample at once: Newton steps on the weighted log-likelihood, from
    the whole sample's fit, on the resamples not yet converged. A resample without a finite
    increasing fit (its classes separate: the slope runs away) is NaN."""
    z = metrics.logit(p)
    a, b = np.full(len(counts), float(start[0])), np.full(len(counts), float(start[1]))
    active = np.arange(len(counts))
    for _ in range(steps):
        w = counts[active]
        with np.errstate(over="ignore"):
            q = 1 / (1 + np.exp(-(a[active, None] * z + b[active, None])))
        r, h = w * (q - y), w * q * (1 - q)
        ga, gb = r @ z, r.sum(1)
        haa, hab, hbb = h @ (z * z), h @ z, h.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            det = haa * hbb - hab * hab
            da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        a[active], b[active] = a[active] - da, b[active] - db
        runaway = ~np.isfinite(a[active]) | (np.abs(a[active]) > 30 * abs(start[0]))  # 30x: no finite fit
        a[active[runaway]] = np.nan
        active = active[~runaway & (np.abs(da) + np.abs(db) > 1e-9)]
        if not len(active):
            break
    a[active] = np.nan  # not converged
    bad = ~(a > 0)
    a[bad], b[bad] = np.nan, np.nan
    return a, b


def fragile_caveat(row) -> list[str]:
    """The verdict's sentence on a served point (a validation_points row) whose interval is wide."""
    if not row["fragile"]:
        return []
    return [f"FRAGILE OPERATING POINT: the served model's threshold {row['threshold']:.3f} sits in an interval "
            f"{row['interval_low']:.3f}-{row['interval_high']:.3f} ({row['interval_logits']:.1f} logits) of "
            f"thresholds that validation cannot tell apart from the best; on data collected apart the trade between "
            f"sensitivity and specificity can move anywhere within it. Check the point on a sample of the site "
            f"(cxr-ray calibrate) before relying on its sensitivity or specificity."]


def line(label: str, row) -> str:
    """One console line for a point (a Point.row(), or a row of validation_points.csv): where it is,
    how well validation settles it, and what it costs at the sample's and the site's prevalence."""
    costs = []
    for name, where in (("val", "validation"), ("site", "site")):
        pi = row[f"{name}_prevalence"]
        if pi is not None and pi == pi:  # NaN: no site prevalence in a CSV row
            costs.append(f"at prevalence {pi:.2f} ({where}) PPV {row[name + '_expected_ppv']:.3f}, NPV "
                         f"{row[name + '_expected_npv']:.3f}, accuracy {row[name + '_expected_accuracy']:.3f}")
    target = row["target"]
    policy = row["policy"] + (f" {target:g}" if target is not None and target == target else "")
    return (f"operating point  {label}: {policy} threshold {row['threshold']:.3f} (interval "
            f"{row['interval_low']:.3f}-{row['interval_high']:.3f}, {row['interval_logits']:.2f} logits"
            f"{', FRAGILE' if row['fragile'] else ''}; plain rule {row['plain_threshold']:.3f}, bootstrap 95% "
            f"{row['boot_low']:.3f}-{row['boot_high']:.3f}); validation sensitivity {row['val_sensitivity']:.3f}, "
            f"specificity {row['val_specificity']:.3f}; " + "; ".join(costs))


def landing(points, name: str, final, predictions, ensembles) -> dict[tuple[str, int], str]:
    """Where each validation point (validation_points rows) lands on external set ``name``: its
    sensitivity/specificity there at the chosen point (the set's final.csv / ensembles.csv), and, for
    a single run, at the two ends of its validation interval (from the set's predictions.csv, whose
    served probabilities map back to raw ones through the run's calibration) -> one cell per run."""
    out = {}
    for row in points.to_dict("records"):
        key = (row["arm"], int(row["seed"]))
        table = ensembles if key[1] == -1 else final
        if table is None:
            continue
        hit = table[table["arm"] == key[0]]
        hit = hit if key[1] == -1 else hit[hit["seed"] == key[1]]
        if not len(hit):
            continue
        at = hit.iloc[0]
        cell = f"{at['sensitivity']:.3f} / {at['specificity']:.3f}"
        mine = None if predictions is None or key[1] == -1 else predictions[
            (predictions["arm"] == key[0]) & (predictions["seed"] == key[1])]
        if mine is not None and len(mine):
            raw = mine["probability"].to_numpy()
            if "platt_a" in at and at["platt_a"] == at["platt_a"]:  # served = calibrated: back to raw
                raw = 1 / (1 + np.exp(-(metrics.logit(raw) - at["platt_b"]) / at["platt_a"]))
            ends = [metrics.confusion(mine["label"].to_numpy(), raw, t) for t in (row["interval_low"], row["interval_high"])]
            cell += (f" (interval ends: {ends[0]['sensitivity']:.3f} / {ends[0]['specificity']:.3f} to "
                     f"{ends[1]['sensitivity']:.3f} / {ends[1]['specificity']:.3f})")
        out[key] = cell
    return out
