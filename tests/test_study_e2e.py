"""A real study on local Ray: killed mid-search with SIGKILL, resumed, finished, artifacts checked.

2 arms x 3 configurations x 3 epochs at 32 px on synthetic data, then 2 final seeds per arm.
"""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import CLI, TINY_SPEC, kill_session

pytestmark = pytest.mark.e2e

ARTIFACTS = ["spec.yaml", "split.csv", "data_report.json", "configs.csv", "trials.csv", "trial_summary.csv",
             "budget.csv", "best_configs.json", "final_trials.csv", "predictions.csv", "final.csv", "summary.csv",
             "comparison.csv", "best.json", "study.json", "asha_state.json"]


def trial_results(study: Path) -> dict[str, list[dict]]:
    """Each search trial's per-epoch history (its Train run's metrics.csv), keyed by trial id."""
    search = {p.name.rsplit("-", 1)[-1] for p in study.glob("search/*-*_*") if p.is_dir()}
    out = {}
    for f in sorted(study.glob("runs/*/metrics.csv")):
        if f.parent.name in search:
            try:
                out[f.parent.name] = pd.read_csv(f).to_dict("records")
            except (pd.errors.EmptyDataError, OSError):
                continue  # being written
    return out


def summary(rows: list[dict]) -> list[tuple]:
    return [(r["epoch"], round(r["train_loss"], 9), round(r["val_auroc"], 9), r["checkpoint"]) for r in rows]


@pytest.fixture(scope="session")
def killed_and_resumed_study(tmp_path_factory, study_env):
    root = tmp_path_factory.mktemp("study")
    spec, study = root / "tiny.yaml", root / "tiny"
    spec.write_text(TINY_SPEC)
    log = open(root / "run.log", "w")
    driver = subprocess.Popen(CLI + ["study", "run", str(spec), "--out", str(study), "--no-report"], env=study_env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Kill once a trial has finished and another is part-way through its epochs.
        deadline = time.time() + 420
        while time.time() < deadline:
            results = trial_results(study)
            epochs = [rows[-1]["epoch"] for rows in results.values() if rows]
            if any(e >= 3 for e in epochs) and any(e < 3 for e in epochs) and driver.poll() is None:
                break
            assert driver.poll() is None, (root / "run.log").read_text()[-3000:]
            time.sleep(0.3)
        else:
            pytest.fail("the study never reached the kill point:\n" + (root / "run.log").read_text()[-3000:])
        before = trial_results(study)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        kill_session(driver.pid)
    assert not (study / "study.json").exists()

    resumed = subprocess.Popen(CLI + ["study", "resume", str(study), "--no-report"], env=study_env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = resumed.wait(timeout=600)
    finally:
        kill_session(resumed.pid)
    assert rc == 0, (root / "run.log").read_text()[-5000:]
    return study, before


def test_resumed_study_writes_every_artifact(killed_and_resumed_study):
    study, _ = killed_and_resumed_study
    missing = [a for a in ARTIFACTS if not (study / a).exists()]
    assert not missing


def test_no_trial_lost_or_repeated_after_sigkill(killed_and_resumed_study):
    study, before = killed_and_resumed_study
    after = trial_results(study)
    assert set(before) <= set(after)
    assert len(after) == 6  # 2 arms x 3 configurations, none added by the resume
    stopped = json.loads((study / "asha_state.json").read_text())["stopped"]
    for name, rows in after.items():
        epochs = [r["epoch"] for r in rows]
        assert epochs == list(range(1, len(epochs) + 1)), f"{name}: epochs {epochs}"
        done_before = before.get(name, [])
        assert summary(rows[:len(done_before)]) == summary(done_before)  # nothing done was changed
        new = rows[len(done_before):]
        if done_before and (done_before[-1]["epoch"] >= 3 or name in stopped):
            assert not new, f"{name} finished or stopped before the kill but ran again"
        elif done_before and new:  # part-way at the kill: continued from its checkpoint, not from epoch 0
            assert all(r["started_at_epoch"] >= 1 for r in new), f"{name} restarted from scratch"
    trials = pd.read_csv(study / "trials.csv")
    assert not trials.duplicated(["trial_id", "epoch"]).any()


def test_asha_stops_within_arm_and_configs_are_paired(killed_and_resumed_study):
    study, _ = killed_and_resumed_study
    summary = pd.read_csv(study / "trial_summary.csv")
    assert summary["outcome"].str.startswith("stopped by ASHA").sum() >= 1
    state = json.loads((study / "asha_state.json").read_text())
    for tid, stop in state["stopped"].items():
        arm = summary.set_index("trial_id").loc[tid, "arm"]
        assert stop["arm"] == arm
        assert tid in state["rungs"][arm][str(stop["rung"])]
    hp = [c for c in summary.columns if c.startswith("hp_")]
    by_arm = {arm: g.sort_values("config_id")[hp].reset_index(drop=True) for arm, g in summary.groupby("arm")}
    first, second = by_arm.values()
    pd.testing.assert_frame_equal(first, second)  # identical sampled configurations in both arms
    budget = pd.read_csv(study / "budget.csv")
    assert set(budget["arm"]) == {"lcnet_050", "mobilenetv3_small_050"}
    assert (budget["trials"] == 3).all() and (budget["cpu_seconds"] > 0).all()
    assert budget["epochs"].sum() == summary["epochs"].sum()


def test_final_evaluation_tables(killed_and_resumed_study):
    study, _ = killed_and_resumed_study
    final = pd.read_csv(study / "final.csv")
    assert sorted(zip(final["arm"], final["seed"])) == [("lcnet_050", 0), ("lcnet_050", 1),
                                                        ("mobilenetv3_small_050", 0), ("mobilenetv3_small_050", 1)]
    summary = pd.read_csv(study / "summary.csv")
    for m in ("auroc", "accuracy", "sensitivity", "specificity", "f1", "ece"):
        assert (summary[f"{m}_ci_low"] <= summary[m]).all() and (summary[m] <= summary[f"{m}_ci_high"]).all()
    best = json.loads((study / "best.json").read_text())
    assert best["arm"] == summary.iloc[0]["arm"] and best["arm"] in best["verdict"]
    assert (study / best["checkpoint"] / "model.safetensors").exists()
    comparison = pd.read_csv(study / "comparison.csv")
    assert len(comparison) == 1 and 0 <= comparison.loc[0, "p_holm"] <= 1
    split = pd.read_csv(study / "split.csv")
    preds = pd.read_csv(study / "predictions.csv")
    assert set(preds["item"]) == set(split.loc[split["split"] == "test", "item"])


def test_status_command_reads_the_study(killed_and_resumed_study, study_env):
    study, _ = killed_and_resumed_study
    out = subprocess.run(CLI + ["study", "status", str(study)], env=study_env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "lcnet_050" in out.stdout and "final evaluation" in out.stdout
    assert "stopped" in out.stdout
