"""PerArmASHA with scripted results (no Tune run): the successive-halving rule, applied per arm,
and its memory surviving a new instance or an unpickled copy (what Tuner.restore hands back)."""
from __future__ import annotations

import json
import math
import pickle
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import TrialScheduler

from cxr_ray.scheduler import PerArmASHA
from cxr_ray.spec import rung_milestones

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def asha(mode: str = "max", metric: str = "val_auroc", max_t: int = 8, grace_period: int = 1,
         reduction_factor: float = 2, state_path=None) -> PerArmASHA:
    return PerArmASHA(metric=metric, mode=mode, max_t=max_t, grace_period=grace_period,
                      reduction_factor=reduction_factor, state_path=None if state_path is None else str(state_path))


def trial(trial_id: str, arm: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"arm": arm, "config_id": 0, "seed": 0})


# ----------------------------------------------------------------------------- rungs

@pytest.mark.parametrize("grace, max_t, rf, expected", [
    (1, 8, 2, [1, 2, 4]),
    (1, 3, 2, [1, 2]),
    (2, 9, 3, [2, 6]),
    (1, 1, 2, []),  # nothing to compare below the maximum
    (3, 3, 2, []),
])
def test_rung_milestones(grace, max_t, rf, expected):
    assert rung_milestones(grace, max_t, rf) == expected


def test_scheduler_uses_the_budget_milestones():
    assert asha(max_t=9, grace_period=2, reduction_factor=3).milestones == [2, 6]


# ----------------------------------------------------------------------------- the rule

def test_first_trial_continues_worse_stops_better_continues():
    s = asha()
    assert s.decide("t1", "a", 1, 0.80) == CONTINUE  # first at the rung: nothing to compare with
    assert s.decide("t2", "a", 1, 0.70) == STOP  # below the median of [0.80]
    assert s.decide("t3", "a", 1, 0.90) == CONTINUE
    # cutoff = 50th percentile of [0.80, 0.70, 0.90] = 0.80
    assert s.decide("t4", "a", 1, 0.79) == STOP
    assert s.decide("t5", "a", 1, 0.81) == CONTINUE
    # every result is recorded at its rung, stopped or not
    assert set(s.rungs["a"]["1"]) == {"t1", "t2", "t3", "t4", "t5"}
    assert set(s.stopped) == {"t2", "t4"}


def test_ties_continue():
    """Small validation splits give equal scores (several trials at AUROC 1.0): none is cut for it."""
    s = asha()
    assert [s.decide(f"t{i}", "a", 1, 1.0) for i in range(4)] == [CONTINUE] * 4
    assert not s.stopped


def test_reduction_factor_sets_the_percentile():
    """rf 4 keeps the top quarter: cutoff is the 75th percentile of the rung's records."""
    s = asha(reduction_factor=4, max_t=16)
    for i, v in enumerate([0.1, 0.2, 0.3, 0.4, 0.5]):
        s.decide(f"r{i}", "a", 1, v)
    # 75th percentile of [.1 .. .5] = 0.4: 0.35 would survive a median cut but not this one
    assert s.decide("x", "a", 1, 0.35) == STOP
    assert s.stopped["x"]["cutoff"] == pytest.approx(0.4)
    assert s.decide("y", "a", 1, 0.45) == CONTINUE


def test_each_rung_compares_only_results_at_that_rung():
    s = asha()  # rungs 1, 2, 4
    assert s.decide("t1", "a", 1, 0.70) == CONTINUE
    assert s.decide("t2", "a", 1, 0.90) == CONTINUE
    assert s.decide("t2", "a", 2, 0.91) == CONTINUE  # first at rung 2
    # t1 at epoch 2 is compared with t2's epoch-2 record (0.91), not with rung 1
    assert s.decide("t1", "a", 2, 0.85) == STOP
    assert s.stopped["t1"]["rung"] == 2
    # between rungs nothing is decided or recorded
    before = json.dumps(s.rungs, sort_keys=True)
    assert s.decide("t2", "a", 3, 0.10) == CONTINUE
    assert json.dumps(s.rungs, sort_keys=True) == before
    # a trial is judged once per rung: a second result at the same epoch does not re-record
    assert s.decide("t2", "a", 2, 0.10) == CONTINUE
    assert s.rungs["a"]["2"]["t2"] == 0.91


def test_results_before_the_grace_period_are_not_judged():
    s = asha(grace_period=2)
    assert s.decide("t1", "a", 2, 0.9) == CONTINUE
    assert s.decide("t2", "a", 1, 0.1) == CONTINUE
    assert "t2" not in s.rungs["a"]["2"] and not s.stopped


# ----------------------------------------------------------------------------- per-arm independence

A = [("a1", 0.90), ("a2", 0.95)]
B = [("b1", 0.60), ("b2", 0.62), ("b3", 0.59), ("b4", 0.65)]


def _run(arm_of) -> dict[str, str]:
    s = asha()
    decisions = {}
    for tid, value in A:
        decisions[tid] = s.decide(tid, arm_of("A"), 1, value)
    for tid, value in B:
        decisions[tid] = s.decide(tid, arm_of("B"), 1, value)
    decisions["a3"] = s.decide("a3", arm_of("A"), 1, 0.91)
    return decisions


def test_arms_are_judged_only_against_their_own_trials():
    d = _run(lambda arm: arm)
    assert d["a1"] == d["a2"] == CONTINUE
    # b1 is worse than every A trial, yet it is the first B trial at the rung: it continues
    assert d["b1"] == CONTINUE
    assert d["b2"] == CONTINUE  # 0.62 >= median of B's [0.60]
    assert d["b3"] == STOP  # 0.59 < median of B's [0.60, 0.62] = 0.61: worse than the other B trials
    assert d["b4"] == CONTINUE  # 0.65 > median of B's [0.60, 0.62, 0.59]
    # and B's low scores do not lower A's bar: 0.91 < median of A's [0.90, 0.95] = 0.925
    assert d["a3"] == STOP


def test_a_shared_asha_would_starve_the_slow_arm():
    """The same results with one set of rungs for all (Ray's ASHAScheduler): B's first trials
    are cut because A set the bar, and A's weaker trial slips through on B's low scores."""
    shared = _run(lambda arm: "all")
    per_arm = _run(lambda arm: arm)
    assert shared["a1"] == shared["a2"] == CONTINUE
    assert shared["b1"] == shared["b2"] == shared["b3"] == STOP  # all judged against A's 0.90 / 0.95
    assert shared["a3"] == CONTINUE  # the bar fell to B's level
    assert [per_arm[t] for t, _ in B] == [CONTINUE, CONTINUE, STOP, CONTINUE]
    assert shared != per_arm


def test_on_trial_result_routes_by_config_arm():
    s = asha()
    result = lambda v: {"epoch": 1, "val_auroc": v}  # noqa: E731
    assert s.on_trial_result(None, trial("a1", "A"), result(0.90)) == CONTINUE
    assert s.on_trial_result(None, trial("a2", "A"), result(0.95)) == CONTINUE
    assert s.on_trial_result(None, trial("b1", "B"), result(0.60)) == CONTINUE
    assert s.on_trial_result(None, trial("b2", "B"), result(0.50)) == STOP
    assert set(s.rungs) == {"A", "B"}
    assert s.rungs["B"]["1"] == {"b1": 0.60, "b2": 0.50}
    assert s.stopped["b2"]["arm"] == "B"


# ----------------------------------------------------------------------------- mode, limits, missing values

def test_mode_min_stops_the_higher_loss():
    s = asha(mode="min", metric="val_loss")
    assert s.decide("t1", "a", 1, 0.50) == CONTINUE
    assert s.decide("t2", "a", 1, 0.60) == STOP  # a higher loss is worse
    assert s.decide("t3", "a", 1, 0.40) == CONTINUE
    assert s.stopped["t2"] == {"arm": "a", "epoch": 1, "rung": 1, "metric": 0.60, "cutoff": 0.50}
    assert s.on_trial_result(None, trial("t4", "a"), {"epoch": 1, "val_loss": 0.45}) == CONTINUE  # < 0.5
    assert s.on_trial_result(None, trial("t5", "a"), {"epoch": 1, "val_loss": 0.55}) == STOP


def test_max_t_ends_the_trial():
    s = asha(max_t=8)
    assert s.on_trial_result(None, trial("t1", "a"), {"epoch": 8, "val_auroc": 0.99}) == STOP
    assert s.on_trial_result(None, trial("t2", "a"), {"epoch": 9, "val_auroc": 0.99}) == STOP
    assert not s.stopped  # finished, not stopped early
    assert s.on_trial_result(None, trial("t3", "a"), {"epoch": 7, "val_auroc": 0.99}) == CONTINUE


def test_missing_metric_or_time_continues():
    s = asha()
    s.decide("t1", "a", 1, 0.9)
    assert s.on_trial_result(None, trial("t2", "a"), {"epoch": 1, "val_loss": 0.1}) == CONTINUE
    assert s.on_trial_result(None, trial("t3", "a"), {"val_auroc": 0.1}) == CONTINUE
    assert s.on_trial_result(None, trial("t4", "a"), {"training_iteration": 1, "val_auroc": 0.1}) == CONTINUE
    assert set(s.rungs["a"]["1"]) == {"t1"} and not s.stopped


def test_nan_continues_without_recording():
    s = asha()
    assert s.on_trial_result(None, trial("t1", "a"), {"epoch": 1, "val_auroc": math.nan}) == CONTINUE
    assert s.decide("t2", "a", 1, float("nan")) == CONTINUE
    assert not s.rungs.get("a", {}).get("1")
    # the first real value is still the first at the rung, and a NaN does not distort the cutoff
    assert s.decide("t3", "a", 1, 0.5) == CONTINUE
    assert s.decide("t4", "a", 1, 0.4) == STOP
    # a trial whose earlier result was NaN is judged when it reports a number
    assert s.decide("t1", "a", 1, 0.3) == STOP


def test_stopped_records_arm_epoch_rung_metric_cutoff():
    s = asha()
    s.decide("t1", "arm-x", 1, 0.8)
    s.decide("t1", "arm-x", 2, 0.82)
    s.decide("t2", "arm-x", 1, 0.81)
    # t2 reaches rung 2 with an epoch-3 result (e.g. a result at epoch 2 was lost)
    assert s.decide("t2", "arm-x", 3, 0.7) == STOP
    assert s.stopped == {"t2": {"arm": "arm-x", "epoch": 3, "rung": 2, "metric": 0.7, "cutoff": 0.82}}
    assert "arm-x [epoch 1: 2, epoch 2: 2, epoch 4: 0; stopped 1]" in s.debug_string()


# ----------------------------------------------------------------------------- persistence

def _script(s: PerArmASHA) -> None:
    assert s.decide("a1", "A", 1, 0.90) == CONTINUE
    assert s.decide("a2", "A", 1, 0.80) == STOP
    assert s.decide("b1", "B", 1, 0.60) == CONTINUE


def test_decisions_are_written_to_the_state_file(tmp_path):
    path = tmp_path / "study" / "asha_state.json"
    s = asha(state_path=path)
    assert not path.exists()
    _script(s)
    state = json.loads(path.read_text())
    assert state["milestones"] == [1, 2, 4]
    assert state["rungs"] == {"A": {"1": {"a1": 0.90, "a2": 0.80}, "2": {}, "4": {}},
                              "B": {"1": {"b1": 0.60}, "2": {}, "4": {}}}
    assert state["stopped"] == {"a2": {"arm": "A", "epoch": 1, "rung": 1, "metric": 0.80, "cutoff": 0.90}}


def test_a_new_scheduler_resumes_from_the_state_file(tmp_path):
    path = tmp_path / "asha_state.json"
    first = asha(state_path=path)
    _script(first)
    resumed = asha(state_path=path)
    assert resumed.rungs == first.rungs and resumed.stopped == first.stopped
    # it remembers A's records: a weak A trial is cut (a fresh scheduler would let it through)
    assert asha().decide("a3", "A", 1, 0.85) == CONTINUE
    assert resumed.decide("a3", "A", 1, 0.85) == STOP
    assert resumed.decide("b2", "B", 1, 0.55) == STOP
    assert set(json.loads(path.read_text())["stopped"]) == {"a2", "a3", "b2"}


def test_unpickled_scheduler_reloads_what_was_decided_since(tmp_path):
    """Tune pickles the scheduler when the experiment starts and Tuner.restore unpickles that
    copy; decisions made after the pickle (by the live instance) must not be forgotten."""
    path = tmp_path / "asha_state.json"
    live = asha(state_path=path)
    snapshot = pickle.dumps(live)  # at experiment start: no records yet
    _script(live)  # the search runs, then the driver dies
    restored = pickle.loads(snapshot)
    assert restored.rungs == live.rungs and restored.stopped == live.stopped
    assert restored.decide("a3", "A", 1, 0.85) == STOP
    assert restored.stopped["a2"]["cutoff"] == 0.90
    # and keeps writing to the same file
    assert "a3" in json.loads(path.read_text())["stopped"]


def test_unpickled_copy_sees_decisions_of_another_instance(tmp_path):
    path = tmp_path / "asha_state.json"
    s = asha(state_path=path)
    s.decide("a1", "A", 1, 0.9)
    snapshot = pickle.dumps(s)  # holds only a1
    other = asha(state_path=path)
    other.decide("a2", "A", 1, 0.8)
    other.decide("a1", "A", 2, 0.92)
    restored = pickle.loads(snapshot)
    assert restored.rungs["A"]["1"] == {"a1": 0.9, "a2": 0.8}
    assert restored.rungs["A"]["2"] == {"a1": 0.92}
    assert "a2" in restored.stopped
    assert restored.decide("a4", "A", 2, 0.91) == STOP


def test_without_a_state_path_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = asha()
    _script(s)
    assert list(tmp_path.iterdir()) == []
    assert pickle.loads(pickle.dumps(s)).rungs == s.rungs  # a pickled copy keeps its own memory


def test_a_trial_stopped_before_the_driver_died_stays_stopped(tmp_path):
    """Tune may restart a trial that ASHA stopped just before the driver was killed (its experiment
    state still said RUNNING): the resumed run says its last epoch again, and the decision stands,
    whatever the value, before another epoch is trained."""
    path = tmp_path / "asha_state.json"
    _script(asha(state_path=path))  # a2 stopped at epoch 1
    resumed = asha(state_path=path)
    assert resumed.on_trial_result(None, trial("a2", "A"), {"epoch": 1, "val_auroc": 0.80}) == STOP  # replayed
    assert resumed.on_trial_result(None, trial("a2", "A"), {"epoch": 2, "val_auroc": 0.99}) == STOP
    assert resumed.stopped["a2"]["epoch"] == 1  # the record of the decision is unchanged
    assert resumed.on_trial_result(None, trial("a1", "A"), {"epoch": 1, "val_auroc": 0.90}) == CONTINUE  # still on
