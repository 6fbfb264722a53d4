"""What the terminal shows while a study runs, from the results Tune hands its callback."""
from __future__ import annotations

from types import SimpleNamespace

from cxr_ray import console, spec as specs, study


def trial(tid: str, arm: str, cid: int, status: str = "RUNNING"):
    return SimpleNamespace(trial_id=tid, config={"arm": arm, "config_id": cid, "seed": 0}, status=status,
                           path="/x/search/t", local_path=None)


def result(epoch: int, auroc: float, seconds: float, done: bool = False) -> dict:
    return {"epoch": epoch, "train_loss": 0.5, "val_loss": 0.4, "val_auroc": auroc, "images_per_s": 100.0,
            "epoch_time_s": seconds, "started_at_epoch": 0, "done": done}


def test_epoch_lines_stops_and_an_arm_line_with_an_upper_bound_on_time_left(capsys):
    spec = specs.validate({"name": "c", "data": {"source": "synthetic"}, "arms": ["fast", "slow"],
                           "search_space": {"lr": {"loguniform": [1e-3, 1e-2]}},
                           "budget": {"samples_per_arm": 2, "max_epochs": 4},
                           "resources": {"max_concurrent_trials": 2}}, "c.yaml")
    plans = study.search_plans(spec, specs.sample_configs(spec))
    progress = console.StudyProgress(spec, "search", plans)
    trials = [trial("a", "fast", 0), trial("b", "fast", 1), trial("c", "slow", 0)]  # slow-c1: not created yet
    progress.on_trial_result(0, trials, trials[0], result(1, 0.80, 10.0))
    progress.on_trial_result(0, trials, trials[2], result(1, 0.70, 30.0))
    progress.on_trial_result(0, trials, trials[1], result(1, 0.60, 10.0, done=True))  # ASHA stops it early
    progress.on_trial_result(0, trials, trials[1], result(1, 0.60, 10.0) | {"started_at_epoch": 1})  # a replay
    progress.on_trial_complete(0, trials, trials[1])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("fast-c0-s0") and "epoch  1/4" in lines[0] and "val_auroc 0.8000" in lines[0]
    assert lines[2].startswith("fast-c1-s0")
    assert lines[3] == "fast-c1-s0   stopped by ASHA at epoch 1 (val_auroc 0.6000 below its arm's rung)"
    assert len(lines) == 5  # the replayed epoch printed nothing
    # left, at most: fast-c0 3 epochs x 10 s, slow-c0 3 x 30 s, slow-c1 4 x 30 s; over 2 slots = 120 s
    assert lines[4].endswith("fast: 0 completed, 1 stopped early, 1 running, of 2; best val_auroc 0.8000; "
                             "at most ~2:00 left"), lines[4]


def test_clock():
    assert [console.clock(s) for s in (5, 65, 3599.6, 3725)] == ["0:05", "1:05", "1:00:00", "1:02:05"]
