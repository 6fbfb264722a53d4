"""Operating points with their uncertainty (cxr_ray.operating): hand-made cases with known answers
(a flat J plateau, a sharp optimum, a prevalence shift checked against Bayes' rule), the vectorised
bootstrap against the plain rule on each resample, and the study's files, report, CLI and serving
choice that carry the points."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cxr_ray import metrics, operating, report, serve_model


def logit(p):
    return math.log(p / (1 - p))


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def sample(y, patients=None, n=400, seed=0) -> operating.Sample:
    y = np.asarray(y)
    return operating.Sample.of(y, np.arange(len(y)) if patients is None else patients, n, seed)


def test_a_flat_plateau_gives_a_wide_interval_and_its_middle_not_its_edge():
    """Classes separated by a wide gap: every threshold in the gap is optimal (J = 1). The plain
    rule sits on the gap's upper edge (the lowest positive); the chosen point is the gap's middle
    on the logit scale, the interval is the gap (fragile: wider than one logit), and the point
    hardly moves from one patient resample to the next."""
    neg, pos = np.linspace(0.01, 0.05, 40), np.linspace(0.6, 0.99, 60)
    y, p = np.r_[np.zeros(40), np.ones(60)].astype(int), np.r_[neg, pos]
    point = operating.choose("youden", None, sample(y), p)
    assert point.plain == pytest.approx(0.6)
    assert (point.low, point.high) == (pytest.approx(0.05), pytest.approx(0.6))
    assert point.threshold == pytest.approx(sigmoid((logit(0.05) + logit(0.6)) / 2))
    assert point.fragile and point.width == pytest.approx(logit(0.6) - logit(0.05))
    assert (point.sensitivity, point.specificity) == (1.0, 1.0)
    # stable: over patient resamples the point moves by a few hundredths of a logit, not across the plateau
    lo, hi = np.quantile(metrics.logit(point.boot), [0.025, 0.975])
    assert hi - lo < 0.2 and point.low < sigmoid(lo) and sigmoid(hi) < point.high


def test_a_sharp_optimum_gives_a_narrow_interval_around_it():
    """Overlapping classes whose J peaks at 0.5 and falls off fast on either side: the interval of
    thresholds within bootstrap noise of the best is narrow, holds the peak, and is not fragile."""
    rng = np.random.default_rng(0)
    neg, pos = rng.uniform(0.0, 0.52, 3000), rng.uniform(0.48, 1.0, 3000)
    y, p = np.r_[np.zeros(3000), np.ones(3000)].astype(int), np.r_[neg, pos]
    point = operating.choose("youden", None, sample(y), p)
    assert point.low < 0.5 < point.high
    assert point.width < 0.3 and not point.fragile
    assert abs(point.threshold - 0.5) < 0.03


def test_same_seed_same_point_and_patients_travel_together():
    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.6).astype(int)
    p = 1 / (1 + np.exp(-(2.5 * (2 * y - 1) + rng.normal(0, 1.2, 300))))
    patients = np.arange(300) // 3
    a = operating.choose("youden", None, sample(y, patients, seed=7), p)
    b = operating.choose("youden", None, sample(y, patients, seed=7), p)
    assert a.threshold == b.threshold and np.array_equal(a.boot, b.boot, equal_nan=True)
    counts = sample(y, patients).counts
    assert (counts.reshape(len(counts), -1, 3) == counts[:, ::3, None]).all()  # a patient's images are drawn together


def noise_mid(y, p, noise):
    """Youden's noise-mid point written out on a sample's images (the README's rule)."""
    t = np.unique(p)[::-1]
    j = np.array([(p[y == 1] >= x).mean() - (p[y == 0] >= x).mean() for x in t])
    good = np.flatnonzero(j >= j.max() - noise - 1e-12)
    high, low = t[good.min()], t[min(good.max() + 1, len(t) - 1)]
    return sigmoid((logit(high) + logit(low)) / 2)


@pytest.mark.parametrize("policy,target", [("youden", None), ("sensitivity", 0.9), ("specificity", 0.9),
                                           ("calibrated", None)])
def test_each_resamples_point_is_the_rule_applied_to_that_resample(policy, target):
    """The vectorised bootstrap (one ROC computation over the resample matrix) gives, on every
    resample, the point the rule gives on that resample's images written out: the plain rule
    (metrics.operating_point) for the target and calibrated policies, noise-mid for Youden (with
    the noise of the resamples' maximal J)."""
    rng = np.random.default_rng(2)
    y = (rng.random(120) < 0.5).astype(int)
    p = 1 / (1 + np.exp(-(1.5 * (2 * y - 1) + rng.normal(0, 1.0, 120))))
    s = sample(y, np.arange(120) // 2, n=30, seed=3)
    point = operating.choose(policy, target, s, p)
    drawn = [np.repeat(np.arange(120), row.astype(int)) for row in s.counts]
    noise = np.std([max((p[i][y[i] == 1] >= x).mean() - (p[i][y[i] == 0] >= x).mean() for x in p[i]) for i in drawn])
    assert point.threshold == pytest.approx(noise_mid(y, p, noise) if policy == "youden" else point.plain)
    for row, i in enumerate(drawn[:5]):
        expected = (noise_mid(y[i], p[i], noise) if policy == "youden"
                    else metrics.operating_point(policy, y[i], p[i], target)["threshold"])
        assert point.boot[row] == pytest.approx(expected, rel=1e-5)


def test_the_target_policies_keep_their_plain_point_and_report_its_bootstrap_interval():
    rng = np.random.default_rng(3)
    y = (rng.random(400) < 0.5).astype(int)
    p = 1 / (1 + np.exp(-(2 * (2 * y - 1) + rng.normal(0, 1.0, 400))))
    for policy in ("sensitivity", "specificity"):
        point = operating.choose(policy, 0.95, sample(y), p)
        assert point.threshold == point.plain == metrics.operating_point(policy, y, p, 0.95)["threshold"]
        lo, hi = np.nanquantile(point.boot, [0.025, 0.975])
        assert (point.low, point.high) == (pytest.approx(min(lo, point.threshold)), pytest.approx(max(hi, point.threshold)))


def test_a_prevalence_shift_moves_the_calibrated_point_by_bayes_rule():
    """Calibrated: 0.5 on Platt's probability is the Bayes decision at the sample's prevalence. At
    a site of prevalence pi' the posterior odds are multiplied by odds(pi') / odds(pi): the point
    on the sample's calibrated probability q moves to q = 1 / (1 + k), i.e. on the raw score to
    a * logit(p) + b = -log k. Higher prevalence: lower threshold, and the other way round."""
    rng = np.random.default_rng(4)
    y = (rng.random(600) < 0.5).astype(int)
    p = 1 / (1 + np.exp(-(1.2 * (2 * y - 1) + rng.normal(0, 1.0, 600))))
    s = sample(y, n=100)
    a, b = metrics.fit_platt(y, p)
    pi = y.mean()
    base = operating.choose("calibrated", None, s, p)
    for site in (0.1, 0.8):
        k = (site / (1 - site)) / (pi / (1 - pi))
        shifted = operating.choose("calibrated", None, s, p, site)
        q = 1 / (1 + math.exp(-(a * logit(shifted.threshold) + b)))  # the sample's calibrated probability there
        assert q == pytest.approx(1 / (1 + k), rel=1e-6)
        assert shifted.threshold == pytest.approx(sigmoid(-(b + math.log(k)) / a), rel=1e-6)
        assert (shifted.threshold < base.threshold) == (site > pi)
        # the served probability is the site's posterior: 0.5 on it is the same decision
        assert shifted.platt == (pytest.approx(a), pytest.approx(b + math.log(k)))
        assert metrics.apply_platt(shifted.threshold, shifted.platt) == pytest.approx(0.5)


@pytest.mark.parametrize("policy,target", [("youden", None), ("sensitivity", 0.9), ("specificity", 0.9)])
def test_class_conditional_policies_do_not_depend_on_prevalence(policy, target):
    rng = np.random.default_rng(5)
    y = (rng.random(300) < 0.5).astype(int)
    p = 1 / (1 + np.exp(-(1.5 * (2 * y - 1) + rng.normal(0, 1.0, 300))))
    at_sample, at_site = (operating.choose(policy, target, sample(y), p, prev) for prev in (None, 0.05))
    assert at_site.threshold == at_sample.threshold and at_site.platt is None


def test_what_a_point_costs_at_a_prevalence_by_hand():
    costs = operating.expected(0.9, 0.8, 0.1)
    assert costs["ppv"] == pytest.approx(0.09 / (0.09 + 0.18))
    assert costs["npv"] == pytest.approx(0.72 / (0.72 + 0.01))
    assert costs["accuracy"] == pytest.approx(0.81)
    with pytest.raises(metrics.MetricError, match="prevalence"):
        operating.prevalence_shift(0.5, 1.0)


# ----------------------------------------------------------------------------- the study's files

@pytest.fixture
def fake_copy(fake_study_dir, tmp_path):
    sdir = tmp_path / "fake"
    shutil.copytree(fake_study_dir, sdir)
    return sdir


def test_a_study_writes_every_runs_and_ensembles_point_with_its_interval(fake_study_dir):
    points = pd.read_csv(fake_study_dir / "validation_points.csv")
    final = pd.read_csv(fake_study_dir / "final.csv")
    ensembles = pd.read_csv(fake_study_dir / "ensembles.csv")
    assert len(points) == len(final) + len(ensembles) and (points["seed"] == -1).sum() == len(ensembles)
    merged = final.merge(points, on=["arm", "seed"], suffixes=("", "_point"))
    assert np.allclose(merged["threshold"], merged["served_threshold"])  # each run is scored at its point
    assert (points["interval_low"] <= points["threshold"]).all() and (points["threshold"] <= points["interval_high"]).all()
    val = pd.read_csv(fake_study_dir / "validation_predictions.csv")
    assert "patient" in val  # the bootstrap over validation patients can be redone post hoc
    best = json.loads((fake_study_dir / "best.json").read_text())
    served = points[(points.arm == best["arm"]) & (points.seed == best["seed"])].iloc[0]
    assert best["operating"]["interval"] == [pytest.approx(served.interval_low), pytest.approx(served.interval_high)]


def test_the_report_shows_the_intervals_and_names_a_fragile_served_point(fake_copy):
    _, sections = report.build(str(fake_copy))
    blocks = dict(sections)["Operating points"]
    table = next(b.df for b in blocks if b.kind == "table")
    assert len(table) == len(pd.read_csv(fake_copy / "validation_points.csv"))
    assert any("FRAGILE" in cell for cell in table["validation interval"])  # the densenet ensemble's 1.2 logits
    assert not any("FRAGILE OPERATING POINT" in b.text for b in dict(sections)["Verdict"])
    points = pd.read_csv(fake_copy / "validation_points.csv")
    best = json.loads((fake_copy / "best.json").read_text())
    served = (points.arm == best["arm"]) & (points.seed == best["seed"])
    points.loc[served, ["interval_low", "interval_high", "interval_logits", "fragile"]] = [0.05, 0.6, 3.3, True]
    points.to_csv(fake_copy / "validation_points.csv", index=False)
    verdict = [b.text for b in dict(report.build(str(fake_copy))[1])["Verdict"] if b.kind == "warn"]
    assert any("FRAGILE OPERATING POINT" in t and "0.050-0.600" in t for t in verdict)


def test_serving_at_a_sites_prevalence_rechooses_the_point_on_validation(fake_copy):
    for meta in fake_copy.glob("**/meta.json"):
        meta.write_text(json.dumps(json.loads(meta.read_text()) | {"study": "fake", "spec_hash": "x"}))
    plain = serve_model.choose_model(str(fake_copy))
    again = serve_model.choose_model(str(fake_copy), prevalence="0.3")  # youden: prevalence-free, same point
    assert again.threshold == pytest.approx(plain.threshold) and again.operating_point["prevalence"] == 0.3
    low, high = (serve_model.choose_model(str(fake_copy), policy="calibrated", prevalence=v) for v in ("0.1", "0.9"))
    assert low.threshold == high.threshold == 0.5 and low.platt[1] < high.platt[1]  # Bayes: b + log-odds shift
    assert high.platt[1] - low.platt[1] == pytest.approx(2 * math.log(9))
    with pytest.raises(serve_model.ServingError, match="prevalence"):
        serve_model.choose_model(str(fake_copy), prevalence="1.5")


def test_the_cli_refuses_a_prevalence_outside_zero_one(fake_study_dir):
    run = subprocess.run([sys.executable, "-m", "cxr_ray.cli", "calibrate", str(fake_study_dir), "--name", "a",
                          "--source", "synthetic", "--prevalence", "1.2"], capture_output=True, text=True)
    assert run.returncode == 2 and "prevalence" in run.stderr


def test_a_spec_names_prevalences_in_zero_one():
    from cxr_ray import spec as specs
    raw = {"name": "p", "data": {"source": "synthetic"}, "arms": ["resnet18"], "budget": {"samples_per_arm": 1,
                                                                                          "max_epochs": 1}}
    assert specs.validate(raw | {"threshold": {"policy": "calibrated", "prevalence": 0.3}}, "s.yaml").threshold.prevalence == 0.3
    with pytest.raises(specs.SpecError, match=r"s.yaml: threshold.prevalence must be in \(0, 1\)"):
        specs.validate(raw | {"threshold": {"prevalence": 1.5}}, "s.yaml")
    with pytest.raises(specs.SpecError, match=r"external\[0\].prevalence must be in \(0, 1\)"):
        specs.validate(raw | {"external": [{"name": "x", "source": "synthetic", "prevalence": 0}]}, "s.yaml")


def test_patient_ids_read_back_as_numbers_draw_the_same_resamples(fake_study_dir):
    """A post-hoc point (serve-time policy, an external set's prevalence) must be bootstrapped over
    the study's resamples even when a CSV round trip turned the ids "7", "10" into numbers."""
    from cxr_ray import evaluation, spec as specs
    spec = specs.validate_text((fake_study_dir / "spec.yaml").read_text(), str(fake_study_dir))
    y = np.array([0, 1, 0, 1, 1])
    as_text = evaluation.validation_sample(spec, y, np.array(["7", "10", "10", "9", "7"]))
    as_numbers = evaluation.validation_sample(spec, y, np.array([7, 10, 10, 9, 7]))
    assert np.array_equal(as_text.counts, as_numbers.counts)
