"""The verdict's statistics and words on hand-computed cases, and `study status` on a hand-made
study directory."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cxr_ray import evaluation, metrics, spec as specs, status
from test_metrics import reference_bootstrap


def test_holm_adjustment_by_hand():
    # sorted: 0.01 x 4 = 0.04; 0.03 x 3 = 0.09; 0.04 x 2 = 0.08 -> 0.09 (monotone); 0.20 x 1 = 0.20
    assert evaluation.holm([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
    assert evaluation.holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1, then kept monotone
    assert evaluation.holm([0.02]) == [0.02]  # one comparison: nothing to adjust


def test_arm_tables_are_seed_means_on_the_same_patient_resamples():
    """summary.csv: each arm's metric is the mean over its seeds, on the set and on every patient
    resample (CI); comparison.csv: the AUROC difference paired on the same resamples. Checked
    against the per-resample loop (identical resamples: identical intervals, p-values)."""
    spec = specs.validate({"name": "t", "seed": 3, "data": {"source": "synthetic"}, "arms": ["A", "B"],
                           "budget": {"samples_per_arm": 1, "max_epochs": 1},
                           "final": {"seeds": [0, 1], "bootstrap": 200}}, "t.yaml")
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(30), 2)
    y = (np.repeat(rng.random(30), 2) < 0.4).astype(int)
    runs, probs = {}, {}
    for arm, separation in (("A", 1.5), ("B", 0.5)):
        for seed in (0, 1):
            probs[(arm, seed)] = np.round(1 / (1 + np.exp(-(separation * (2 * y - 1) + rng.normal(0, 1, 60)))), 2)
            runs[(arm, seed)] = evaluation.Run(arm, seed, [f"runs/{arm}{seed}"], 0.8, np.zeros(0), np.zeros(0),
                                               0.45 + 0.1 * seed, None)
    counts = metrics.resample_counts(patients, 200, spec.seed)
    tables = evaluation.score(spec, y, counts, runs, probs)
    summary = tables["summary"].set_index("arm")
    loops = {k: reference_bootstrap(y, probs[k], runs[k].threshold, patients, 200, spec.seed) for k in probs}
    for arm in ("A", "B"):
        for m in metrics.REPORTED:
            seed_mean = (loops[(arm, 0)][m] + loops[(arm, 1)][m]) / 2
            lo, hi = np.quantile(seed_mean, [0.025, 0.975])
            assert (summary.loc[arm, f"{m}_ci_low"], summary.loc[arm, f"{m}_ci_high"]) == pytest.approx((lo, hi),
                                                                                                          abs=1e-12)
            on_set = [metrics.summary(y, probs[(arm, s)], runs[(arm, s)].threshold)[m] for s in (0, 1)]
            assert summary.loc[arm, m] == pytest.approx(np.mean(on_set), abs=1e-12)
    row = tables["comparison"].iloc[0]
    assert (row["arm"], row["versus"]) == ("B", "A")  # against the set's best arm
    diff = (loops[("B", 0)]["auroc"] + loops[("B", 1)]["auroc"]) / 2 - (loops[("A", 0)]["auroc"]
                                                                        + loops[("A", 1)]["auroc"]) / 2
    assert (row["delta_ci_low"], row["delta_ci_high"]) == pytest.approx(tuple(np.quantile(diff, [0.025, 0.975])),
                                                                        abs=1e-12)
    assert row["p_bootstrap"] == pytest.approx(min(1.0, 2 * min((diff <= 0).mean(), (diff >= 0).mean())))
    assert row["delta_auroc"] == pytest.approx(summary.loc["B", "auroc"] - summary.loc["A", "auroc"], abs=1e-12)


def summary_row(arm, auroc, lo, hi, seeds=3, missing=0):
    return {"arm": arm, "seeds": seeds, "missing_seeds": missing, "auroc": auroc, "auroc_ci_low": lo,
            "auroc_ci_high": hi, "accuracy": auroc - 0.1, "accuracy_ci_low": lo - 0.1, "accuracy_ci_high": hi - 0.1}


def comparison_row(arm, delta, lo, hi, p_holm, significant):
    return {"arm": arm, "versus": "A", "delta_auroc": delta, "delta_ci_low": lo, "delta_ci_high": hi,
            "p_holm": p_holm, "significant": significant}


def test_verdict_names_the_best_arm_and_tells_apart_only_what_the_test_separates():
    summary = pd.DataFrame([summary_row("A", 0.95, 0.93, 0.97), summary_row("B", 0.94, 0.91, 0.96),
                            summary_row("C", 0.85, 0.80, 0.89)])
    comparison = pd.DataFrame([comparison_row("B", -0.01, -0.03, 0.01, 0.4, False),
                               comparison_row("C", -0.10, -0.14, -0.06, 0.0, True)])
    text = evaluation.verdict_text(summary, comparison, n_bootstrap=1000)
    assert text.startswith("The best backbone in this study is A: test AUROC 0.950 (0.930-0.970) and accuracy "
                           "0.850 (0.830-0.870)")
    assert "mean of 3 final seed(s)" in text and "Holm-adjusted over 2 comparison(s), alpha 0.05" in text
    assert "cannot be told apart from B (AUROC 0.010 lower, 95% CI -0.030 to +0.010, p = 0.4)" in text
    assert "Significantly worse: C (AUROC 0.100 lower, 95% CI -0.140 to -0.060, p < 0.001)" in text  # p=0 of B=1000
    only_worse = evaluation.verdict_text(summary, comparison.assign(significant=True), 1000)
    assert "every other arm is significantly worse: B" in only_worse and "cannot be told apart" not in only_worse
    assert evaluation.verdict_text(summary.iloc[:1], comparison.iloc[:0], 1000).endswith("It is the only arm evaluated.")


def test_caveats_name_an_unmatched_study_and_missing_seeds():
    spec = specs.validate({"name": "c", "data": {"source": "synthetic"}, "arms": ["resnet18"],
                           "budget": {"samples_per_arm": 1, "max_epochs": 2}}, "c.yaml")
    summary = pd.DataFrame([summary_row("resnet18", 0.9, 0.8, 0.95, seeds=2, missing=1)])
    assert evaluation.caveats(spec, summary) == ["Missing final seeds: resnet18 ran 2 of 3; their means rest on "
                                                 "fewer runs."]
    assert evaluation.caveats(spec, summary.assign(missing_seeds=0)) == []


# ----------------------------------------------------------------------------- study status

def write_study(root, mode: str) -> str:
    """A study directory as a running search leaves it: spec, Tune's trial directories, each run's
    record, ASHA's decisions; selection on val_loss with ``mode``."""
    spec = specs.validate({"name": "st", "data": {"source": "synthetic"}, "arms": ["lcnet_050", "resnet10t"],
                           "search_space": {"lr": {"loguniform": [1e-3, 1e-2]}},
                           "budget": {"samples_per_arm": 3, "max_epochs": 3},
                           "selection": {"metric": "val_loss", "mode": mode}}, "st.yaml")
    (root / "spec.yaml").write_text(specs.dump(spec))
    histories = {  # trial id -> (arm, config, val_loss per epoch, error)
        "t_00000": ("lcnet_050", 0, [0.60, 0.50, 0.40], False),  # completed
        "t_00001": ("lcnet_050", 1, [0.70], False),  # stopped by ASHA
        "t_00002": ("lcnet_050", 2, [0.65, 0.30], False),  # running
        "t_00003": ("resnet10t", 0, [0.80], True),  # failed
        "t_00004": ("resnet10t", 1, [0.90, float("nan")], False),  # diverged at epoch 2
    }
    for tid, (arm, cid, losses, error) in histories.items():
        trial_dir = root / "search" / f"{arm}-c{cid}-s0-{tid}"
        trial_dir.mkdir(parents=True)
        (trial_dir / "params.json").write_text(json.dumps({"arm": arm, "config_id": cid, "seed": 0}))
        if error:
            (trial_dir / "error.txt").write_text("Traceback ...")
        run = root / "runs" / tid
        run.mkdir(parents=True)
        pd.DataFrame({"epoch": range(1, len(losses) + 1), "val_loss": losses,
                      "diverged": np.isnan(losses)}).to_csv(run / "metrics.csv", index=False)
    (root / "asha_state.json").write_text(json.dumps({"stopped": {"t_00001": {"arm": "lcnet_050", "epoch": 1}}}))
    return str(root)


def test_status_counts_outcomes_and_picks_the_best_the_way_the_selection_mode_says(tmp_path):
    for mode, best in (("min", "0.3000 (config 2, epoch 2)"), ("max", "0.7000 (config 1, epoch 1)")):
        root = tmp_path / mode
        root.mkdir()
        lines = status.status(write_study(root, mode)).splitlines()
        lcnet = next(ln for ln in lines if ln.strip().startswith("lcnet_050"))
        assert "1 completed, 1 stopped, 1 running" in lcnet and lcnet.rstrip().endswith(best), lcnet
        resnet = next(ln for ln in lines if ln.strip().startswith("resnet10t"))
        assert "1 diverged, 1 failed, 1 not started" in resnet, resnet  # a diverged epoch (NaN) is never the best
        assert resnet.rstrip().endswith("0.8000 (config 0, epoch 1)" if mode == "min" else "0.9000 (config 1, epoch 1)")
        assert "final: not started" in lines
        assert max(map(len, lines)) <= 100
