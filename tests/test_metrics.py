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

def test_patient_bootstrap_keeps_a_patients_images_together():
    groups = np.array(["p1", "p1", "p1", "p2", "p2", "p3", "p4", "p4", "p4", "p4", "p5"])
    members = {g: np.flatnonzero(groups == g) for g in np.unique(groups)}
    draws = list(metrics.patient_bootstrap(groups, n=200, seed=0))
    assert len(draws) == 200
    picked_patients = 0
    for idx in draws:
        counts = np.bincount(idx, minlength=len(groups))
        times = {g: set(counts[m]) for g, m in members.items()}
        assert all(len(t) == 1 for t in times.values())  # all of a patient's images, equally often
        assert sum(t.pop() for t in times.values()) == 5  # five patients drawn
        picked_patients += len({groups[i] for i in idx})
    assert picked_patients / len(draws) < 5  # with replacement: usually some patient repeats
    again = list(metrics.patient_bootstrap(groups, n=200, seed=0))
    assert all(np.array_equal(x, z) for x, z in zip(draws, again))


def test_bootstrap_ci_of_a_mean_matches_the_normal_interval():
    rng = np.random.default_rng(0)
    n = 400
    x = rng.normal(0, 1, n)
    point, lo, hi = metrics.bootstrap_ci(np.mean, [x], groups=np.arange(n), n=1000, seed=0)
    assert point == pytest.approx(x.mean())
    half = 1.96 * x.std() / math.sqrt(n)
    assert lo == pytest.approx(x.mean() - half, abs=0.15 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.15 * half)


def test_bootstrap_ci_is_wider_when_images_cluster_by_patient():
    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(50), 8)
    x = rng.normal(0, 1, 50)[patients] + rng.normal(0, 0.1, 400)  # 8 near-copies per patient
    _, lo_p, hi_p = metrics.bootstrap_ci(np.mean, [x], groups=patients, n=500, seed=0)
    _, lo_i, hi_i = metrics.bootstrap_ci(np.mean, [x], groups=np.arange(400), n=500, seed=0)
    assert (hi_p - lo_p) > 2 * (hi_i - lo_i)


def test_bootstrap_ci_skips_single_class_resamples():
    y = np.array([0, 0, 0, 0, 0, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.9])
    point, lo, hi = metrics.bootstrap_ci(metrics.auroc, [y, p], groups=np.arange(6), n=200, seed=0)
    assert point == 1.0 and lo == 1.0 and hi == 1.0


def test_paired_bootstrap_identical_inputs():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    p = rng.random(80)
    out = metrics.paired_bootstrap(metrics.auroc, [y, p], [y, p], groups=np.arange(80), n=200)
    assert out == {"difference": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0}


def test_paired_bootstrap_detects_a_real_difference():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    good = rng.normal(y * 2.0, 1.0)
    weak = rng.normal(y * 0.2, 1.0)
    out = metrics.paired_bootstrap(metrics.auroc, [y, good], [y, weak], groups=np.arange(200), n=300)
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
