"""Metrics against hand-computed values and brute-force reference implementations."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cxr_ray import metrics
from cxr_ray.metrics import MetricError


# ----------------------------------------------------------------------------- AUROC

@pytest.mark.parametrize("y, p, want", [
    ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),  # 3 of 4 pairs ordered
    ([0, 1], [0.5, 0.5], 0.5),  # a tie earns half credit
    ([0, 0, 1, 1], [0.2, 0.5, 0.5, 0.9], 0.875),  # (1 + 0.5 + 2) / 4
    ([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], 1.0),
    ([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4], 0.0),
    ([1, 0, 1, 0, 1], [3, 3, 3, 3, 3], 0.5),
])
def test_auroc_hand_cases(y, p, want):
    assert metrics.auroc(y, p) == pytest.approx(want)


def test_auroc_equals_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = rng.integers(0, 10, 200) / 10  # many ties
    pos, neg = p[y == 1], p[y == 0]
    brute = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert metrics.auroc(y, p) == pytest.approx(brute, abs=1e-12)


# ----------------------------------------------------------------------------- threshold metrics

def test_confusion_at_threshold():
    y = [1, 1, 1, 0, 0, 0, 0]
    p = [0.9, 0.5, 0.2, 0.6, 0.1, 0.3, 0.49]  # p == threshold counts as positive
    c = metrics.confusion(y, p, 0.5)
    assert (c["tp"], c["fn"], c["fp"], c["tn"]) == (2, 1, 1, 3)
    assert c["sensitivity"] == pytest.approx(2 / 3)
    assert c["specificity"] == pytest.approx(3 / 4)
    assert c["precision"] == pytest.approx(2 / 3)
    assert c["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert c["accuracy"] == pytest.approx(5 / 7)
    strict = metrics.confusion(y, p, 0.55)
    assert (strict["tp"], strict["fn"]) == (1, 2)


def test_confusion_empty_denominator_is_nan():
    c = metrics.confusion([0, 0, 0], [0.1, 0.2, 0.9], 0.5)
    assert math.isnan(c["sensitivity"])
    assert c["specificity"] == pytest.approx(2 / 3)


def test_length_mismatch_raises():
    with pytest.raises(MetricError, match="3 labels but 2 scores"):
        metrics.confusion([0, 1, 1], [0.1, 0.2])


def test_youden_threshold_hand_case():
    y = [0, 0, 1, 1, 0, 1]
    p = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    # J at t=.6: 1/3, .5: 0, .4: 1/3, .3: 2/3, .2: 1/3, .1: 0
    assert metrics.youden_threshold(y, p) == pytest.approx(0.3)
    # tie between t=.4 and t=.2 (J = .5 each): the higher threshold wins
    assert metrics.youden_threshold([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.4)


def test_youden_threshold_maximises_j_with_ties():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    p = np.round(np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1), 2)

    def j(t):
        c = metrics.confusion(y, p, t)
        return c["sensitivity"] + c["specificity"] - 1

    best = max(j(t) for t in np.unique(p))
    t = metrics.youden_threshold(y, p)
    assert t in set(p)
    assert j(t) == pytest.approx(best)


def test_roc_curve_endpoints_and_area():
    y = [0, 1, 0, 1]
    p = [0.1, 0.2, 0.3, 0.4]
    fpr, tpr, thr = metrics.roc_curve(y, p)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    assert thr[0] == np.inf
    np.testing.assert_allclose(thr[1:], [0.4, 0.3, 0.2, 0.1])

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 150)
    p = rng.integers(0, 20, 150) / 20
    fpr, tpr, thr = metrics.roc_curve(y, p)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all() and (np.diff(thr) < 0).all()
    assert len(thr) == len(np.unique(p)) + 1  # one point per distinct score: ties are one step
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(metrics.auroc(y, p))


def test_calibration_ece_hand_cases():
    ece, table = metrics.calibration([0, 1, 1, 1], [0.05, 0.05, 0.95, 0.95])
    # bin [0, .1): conf .05, freq .5 -> weight .5 * .45; bin [.9, 1]: .95 vs 1 -> .5 * .05
    assert ece == pytest.approx(0.25)
    assert [row["count"] for row in table] == [2, 2]

    ece, table = metrics.calibration([1, 0, 1], [0.35, 0.5, 1.0])
    # bins are [low, high): .5 opens bin [.5, .6); 1.0 falls in the last bin [.9, 1]
    assert [row["bin_low"] for row in table] == pytest.approx([0.3, 0.5, 0.9])
    assert [row["fraction_positive"] for row in table] == [1.0, 0.0, 1.0]
    assert ece == pytest.approx((0.65 + 0.5 + 0.0) / 3)

    assert metrics.calibration([0, 1], [0.0, 1.0])[0] == pytest.approx(0.0)


def test_single_class_raises():
    for fn in (metrics.auroc, metrics.youden_threshold, metrics.roc_curve):
        with pytest.raises(MetricError, match="single class"):
            fn([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(MetricError, match="single class"):
        metrics.delong([0, 0, 0], [0.2, 0.5, 0.9], [0.1, 0.3, 0.4])


def test_summary_carries_the_report_metrics():
    y, p = [0, 0, 1, 1], [0.1, 0.6, 0.4, 0.8]
    s = metrics.summary(y, p, 0.5)
    assert s["auroc"] == pytest.approx(0.75)
    assert s["sensitivity"] == pytest.approx(0.5) and s["specificity"] == pytest.approx(0.5)
    assert set(s) == {"auroc", "accuracy", "sensitivity", "specificity", "f1", "ece"}


# ----------------------------------------------------------------------------- DeLong

def delong_brute(y, a, b):
    """DeLong et al. (1988) written out with the O(n^2) kernel psi and explicit sums."""
    y = np.asarray(y)

    def psi(x, z):
        return 1.0 if x > z else 0.5 if x == z else 0.0

    def components(s):
        xs, zs = s[y == 1], s[y == 0]
        v10 = np.array([sum(psi(x, z) for z in zs) / len(zs) for x in xs])
        v01 = np.array([sum(psi(x, z) for x in xs) / len(xs) for z in zs])
        auc = sum(psi(x, z) for x in xs for z in zs) / (len(xs) * len(zs))
        return auc, v10, v01

    (auc_a, v10a, v01a), (auc_b, v10b, v01b) = components(np.asarray(a)), components(np.asarray(b))
    m, n = len(v10a), len(v01a)

    def cov(u, v, mu, mv, k):
        return sum((ui - mu) * (vi - mv) for ui, vi in zip(u, v)) / (k - 1)

    s10 = [[cov(v10a, v10a, auc_a, auc_a, m), cov(v10a, v10b, auc_a, auc_b, m)],
           [None, cov(v10b, v10b, auc_b, auc_b, m)]]
    s01 = [[cov(v01a, v01a, auc_a, auc_a, n), cov(v01a, v01b, auc_a, auc_b, n)],
           [None, cov(v01b, v01b, auc_b, auc_b, n)]]
    var = (s10[0][0] + s10[1][1] - 2 * s10[0][1]) / m + (s01[0][0] + s01[1][1] - 2 * s01[0][1]) / n
    z = (auc_a - auc_b) / math.sqrt(var)
    return auc_a, auc_b, z, math.erfc(abs(z) / math.sqrt(2))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 70)
    y[:2] = [0, 1]
    a = np.round(rng.normal(y * 0.8, 1.0), 1)  # rounding makes ties within and across classes
    b = np.round(0.6 * a + rng.normal(y * 0.3, 0.8), 1)
    got = metrics.delong(y, a, b)
    auc_a, auc_b, z, p = delong_brute(y, a, b)
    assert got["auroc_a"] == pytest.approx(auc_a, abs=1e-12)
    assert got["auroc_b"] == pytest.approx(auc_b, abs=1e-12)
    assert got["difference"] == pytest.approx(auc_a - auc_b, abs=1e-12)
    assert got["z"] == pytest.approx(z, rel=1e-9)
    assert got["p_value"] == pytest.approx(p, rel=1e-9)


def test_delong_identical_scores_p_is_one():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    p = rng.random(50)
    out = metrics.delong(y, p, p.copy())
    assert out["difference"] == 0 and out["p_value"] == 1.0


def test_delong_detects_a_real_difference():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 400)
    good = rng.normal(y * 2.0, 1.0)
    weak = rng.normal(y * 0.3, 1.0)
    assert metrics.delong(y, good, weak)["p_value"] < 1e-6


# ----------------------------------------------------------------------------- McNemar

def test_mcnemar_exact():
    a = np.array([False] * 6 + [True] * 10 + [False] * 4)
    b = np.array([True] * 6 + [True] * 10 + [False] * 4)
    out = metrics.mcnemar(a, b)
    assert (out["only_a_correct"], out["only_b_correct"]) == (0, 6)
    assert out["p_value"] == pytest.approx(2 * 0.5 ** 6)  # 0.03125


def test_mcnemar_chi2_with_continuity_correction():
    a = np.array([True] * 30 + [False] * 10 + [True] * 50)
    b = np.array([False] * 30 + [True] * 10 + [True] * 50)
    out = metrics.mcnemar(a, b)
    assert (out["only_a_correct"], out["only_b_correct"]) == (30, 10)
    chi2 = (abs(30 - 10) - 1) ** 2 / 40  # 9.025
    assert out["p_value"] == pytest.approx(math.erfc(math.sqrt(chi2 / 2)), rel=1e-9)


def test_mcnemar_no_discordant_pairs():
    assert metrics.mcnemar([True, False], [True, False])["p_value"] == 1.0


# ----------------------------------------------------------------------------- bootstrap

def brute_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Every reported metric written out: pairwise AUROC, counted rates, ECE bin by bin."""
    pos, neg = p[y == 1], p[y == 0]
    tp, fp = int((pos >= threshold).sum()), int((neg >= threshold).sum())
    fn, tn = len(pos) - tp, len(neg) - fp
    edges, ece = np.linspace(0, 1, 11), 0.0
    for b in range(10):
        inside = (p >= edges[b]) & ((p < edges[b + 1]) if b < 9 else (p <= 1))
        if inside.any():
            ece += inside.mean() * abs(p[inside].mean() - y[inside].mean())
    return {"auroc": ((pos[:, None] > neg) + 0.5 * (pos[:, None] == neg)).mean(), "accuracy": (tp + tn) / len(y),
            "sensitivity": tp / len(pos), "specificity": tn / len(neg), "f1": 2 * tp / (2 * tp + fp + fn), "ece": ece}


def reference_bootstrap(y, p, threshold, groups, n, seed) -> dict[str, np.ndarray]:
    """The plain per-resample loop the vectorised bootstrap replaces: each resample draws whole
    patients (one generator call per resample) and expands them to their images; single-class
    resamples are skipped. metric -> its values on the resamples kept."""
    y, p, groups = np.asarray(y), np.asarray(p, dtype=float), np.asarray(groups)
    patients = np.unique(groups)
    rng = np.random.default_rng(seed)
    values = {m: [] for m in metrics.REPORTED}
    for _ in range(n):
        picked = rng.integers(0, len(patients), len(patients))
        idx = np.concatenate([np.flatnonzero(groups == patients[g]) for g in picked])
        if y[idx].min() == y[idx].max():
            continue
        for m, v in brute_metrics(y[idx], p[idx], threshold).items():
            values[m].append(v)
    return {m: np.array(v) for m, v in values.items()}


HAND_MADE = {  # (labels, scores, patient of each image, threshold)
    # patients with several images, ties within and across classes, the threshold on a tied score
    "clustered ties": ([0, 0, 1, 1, 0, 1, 1, 0, 0, 1, 1, 0], [.1, .1, .4, .4, .4, .7, .9, .2, .95, .6, .6, .3],
                       ["a", "a", "b", "b", "c", "c", "d", "e", "f", "f", "g", "h"], 0.4),
    # one positive patient in seven: many resamples hold a single class and are skipped
    "rare class": ([0, 0, 0, 1, 0, 0, 0, 0], [.2, .35, .1, .8, .5, .05, .3, .65],
                   ["p1", "p2", "p2", "p3", "p4", "p5", "p6", "p7"], 0.5),
    # one image per patient, every score its own bin
    "independent": ([1, 0, 1, 0, 1, 1, 0, 0, 1, 0], [.05, .15, .25, .35, .45, .55, .65, .75, .85, .95],
                    list(range(10)), 0.45),
}


@pytest.mark.parametrize("case", sorted(HAND_MADE))
def test_vectorised_bootstrap_equals_the_per_resample_loop(case):
    """Identical resamples give identical intervals: every reported metric on every resample of the
    count matrix equals the loop's, resample for resample, and so do the skipped resamples."""
    y, p, groups, threshold = (np.asarray(v) if i < 3 else v for i, v in enumerate(HAND_MADE[case]))
    counts = metrics.resample_counts(groups, n=300, seed=4)
    got = metrics.resampled(y, p, threshold, counts)
    want = reference_bootstrap(y, p, threshold, groups, n=300, seed=4)
    defined = ~np.isnan(got["auroc"])
    assert defined.sum() == len(want["auroc"]) and (case != "rare class" or not defined.all())
    for m in metrics.REPORTED:
        assert np.isnan(got[m][~defined]).all()  # a single-class resample is skipped for every metric
        np.testing.assert_allclose(got[m][defined], want[m], rtol=0, atol=1e-12, err_msg=m)
        assert metrics.percentile_ci(got[m]) == pytest.approx(tuple(np.quantile(want[m], [0.025, 0.975])),
                                                              abs=1e-12)
    assert metrics.summary(y, p, threshold) == pytest.approx(brute_metrics(y, p.astype(float), threshold), abs=1e-12)


def test_resample_counts_keep_a_patients_images_together_and_draw_what_the_loop_draws():
    groups = np.array(["p1", "p1", "p1", "p2", "p2", "p3", "p4", "p4", "p4", "p4", "p5"])
    counts = metrics.resample_counts(groups, n=200, seed=0)
    assert counts.shape == (200, len(groups))
    rng = np.random.default_rng(0)
    patients = np.unique(groups)
    for row in counts:
        picked = rng.integers(0, len(patients), len(patients))  # the loop's draw of this resample
        drawn = np.bincount(picked, minlength=len(patients))
        assert row.tolist() == [drawn[list(patients).index(g)] for g in groups]  # images travel with their patient
    assert (counts.sum(1) > 0).all() and (counts[:, 0] != 1).any()  # with replacement: patients repeat or vanish
    np.testing.assert_array_equal(metrics.resample_counts(groups, n=200, seed=0), counts)


def weighted_mean(x, counts):
    return counts @ x / counts.sum(1)


def test_bootstrap_ci_of_a_mean_matches_the_normal_interval():
    rng = np.random.default_rng(0)
    n = 400
    x = rng.normal(0, 1, n)
    lo, hi = metrics.percentile_ci(weighted_mean(x, metrics.resample_counts(np.arange(n), 1000, 0)))
    half = 1.96 * x.std() / math.sqrt(n)
    assert lo == pytest.approx(x.mean() - half, abs=0.15 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.15 * half)


def test_bootstrap_ci_is_wider_when_images_cluster_by_patient():
    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(50), 8)
    x = rng.normal(0, 1, 50)[patients] + rng.normal(0, 0.1, 400)  # 8 near-copies per patient
    lo_p, hi_p = metrics.percentile_ci(weighted_mean(x, metrics.resample_counts(patients, 500, 0)))
    lo_i, hi_i = metrics.percentile_ci(weighted_mean(x, metrics.resample_counts(np.arange(400), 500, 0)))
    assert (hi_p - lo_p) > 2 * (hi_i - lo_i)


def test_bootstrap_ci_skips_single_class_resamples():
    y = np.array([0, 0, 0, 0, 0, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.9])
    values = metrics.resampled(y, p, 0.5, metrics.resample_counts(np.arange(6), 200, 0))["auroc"]
    assert np.isnan(values).sum() > 0 and metrics.percentile_ci(values) == (1.0, 1.0)


def test_paired_difference_equals_the_per_resample_loop():
    y, p, groups, _ = (np.asarray(v) if i < 3 else v for i, v in enumerate(HAND_MADE["clustered ties"]))
    other = np.round(p[::-1] * 0.7 + 0.1, 1)
    counts = metrics.resample_counts(groups, 300, 2)
    got = metrics.paired_difference(metrics.auroc(y, p) - metrics.auroc(y, other),
                                    metrics.resampled(y, p, 0.5, counts)["auroc"]
                                    - metrics.resampled(y, other, 0.5, counts)["auroc"])
    want = (reference_bootstrap(y, p, 0.5, groups, 300, 2)["auroc"]  # the same seed: the same resamples
            - reference_bootstrap(y, other, 0.5, groups, 300, 2)["auroc"])
    assert (got["ci_low"], got["ci_high"]) == pytest.approx(tuple(np.quantile(want, [0.025, 0.975])), abs=1e-12)
    assert got["p_value"] == pytest.approx(min(1.0, 2 * min((want <= 0).mean(), (want >= 0).mean())))


def test_paired_difference_identical_inputs():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    p = rng.random(80)
    values = metrics.resampled(y, p, 0.5, metrics.resample_counts(np.arange(80), 200))["auroc"]
    out = metrics.paired_difference(0.0, values - values)
    assert out == {"difference": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0}


def test_paired_difference_detects_a_real_difference():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    good = rng.normal(y * 2.0, 1.0)
    weak = rng.normal(y * 0.2, 1.0)
    counts = metrics.resample_counts(np.arange(200), 300)
    out = metrics.paired_difference(metrics.auroc(y, good) - metrics.auroc(y, weak),
                                    metrics.resampled(y, good, 0.5, counts)["auroc"]
                                    - metrics.resampled(y, weak, 0.5, counts)["auroc"])
    assert out["difference"] == pytest.approx(metrics.auroc(y, good) - metrics.auroc(y, weak))
    assert out["ci_low"] > 0 and out["p_value"] < 0.01


# ----------------------------------------------------------------------------- operating points

Y8 = np.array([0, 0, 0, 0, 1, 1, 1, 1])
P8 = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])


@pytest.mark.parametrize("policy, target, threshold, sens, spec", [
    ("sensitivity", 0.75, 0.7, 0.75, 1.0),   # 3 of 4 positives at or above 0.7; the highest such threshold
    ("sensitivity", 1.0, 0.4, 1.0, 0.75),    # every positive: down to 0.4, which lets 0.6 through
    ("specificity", 1.0, 0.6, 0.75, 1.0),    # every negative below: just above 0.6
    ("specificity", 0.75, 0.3, 1.0, 0.75),   # 3 of 4 negatives below: just above 0.3
    ("youden", None, 0.7, 0.75, 1.0),        # J = 0.75 at 0.7 (and at 0.4: ties go to the higher threshold)
])
def test_operating_points_by_hand(policy, target, threshold, sens, spec):
    point = metrics.operating_point(policy, Y8, P8, target)
    assert point["threshold"] == pytest.approx(threshold, abs=1e-12) and point["platt"] is None
    c = metrics.confusion(Y8, P8, point["threshold"])
    assert (c["sensitivity"], c["specificity"]) == (sens, spec)


def test_platt_recovers_a_known_calibration_and_its_threshold():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 0.99, 20000)
    truth = 1 / (1 + np.exp(-(2.0 * metrics.logit(p) - 1.0)))  # the scores are miscalibrated this way
    y = (rng.random(len(p)) < truth).astype(int)
    a, b = metrics.fit_platt(y, p)
    assert a == pytest.approx(2.0, abs=0.1) and b == pytest.approx(-1.0, abs=0.1)
    point = metrics.operating_point("calibrated", y, p)
    assert point["platt"] == (a, b)
    # 0.5 on the calibrated probability is the raw threshold where 2 logit(p) - 1 = 0: p = sigmoid(0.5)
    assert point["threshold"] == pytest.approx(1 / (1 + np.exp(-0.5)), abs=0.02)
    assert metrics.apply_platt([point["threshold"]], (a, b))[0] == pytest.approx(0.5, abs=1e-9)


def test_platt_refuses_scores_that_do_not_rank_the_classes():
    with pytest.raises(metrics.MetricError, match="no increasing calibration"):
        metrics.fit_platt([1, 1, 1, 0, 0, 0], [0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    with pytest.raises(metrics.MetricError, match="unknown threshold policy"):
        metrics.operating_point("f1", Y8, P8)


def test_midranks_share_the_mean_rank_of_ties():
    assert metrics.midranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]
    assert metrics.midranks(np.array([0.2, 0.2])).tolist() == [1.5, 1.5]
    assert metrics.midranks(np.array([0.9])).tolist() == [1.0]


def test_an_uncalibrated_point_serves_the_probabilities_as_they_are():
    p = [0.02, 0.5, 0.97]
    assert metrics.apply_platt(p, None).tolist() == p
    assert metrics.apply_platt(p, (2.0, 0.0)).tolist() != p  # a fitted calibration moves them
