"""ASHA with independent rungs per arm: a trial only ever competes with its own backbone.

Ray's ASHAScheduler keeps one set of rungs for all trials, so a backbone that starts fast
would set the cut-offs for a slow starter and starve it. ``PerArmASHA`` keeps one set of
rungs per arm (``config["arm"]``) and applies the asynchronous successive-halving rule
within it: at each rung (``grace_period * reduction_factor**k`` epochs), a trial continues
only if its metric is in the top ``1/reduction_factor`` of the trials of its arm recorded
at that rung so far.

Its rung records and stop decisions are saved to a JSON file after every decision, so a
resumed study keeps them (Tune does not restore scheduler state) and the report can show
where each trial stopped.
"""
from __future__ import annotations

import json

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from . import storage
from .spec import rung_milestones


class PerArmASHA(FIFOScheduler):
    def __init__(self, *, metric: str, mode: str, max_t: int, grace_period: int, reduction_factor: float,
                 time_attr: str = "epoch", state_path: str | None = None):
        super().__init__()
        self._metric, self._mode, self.time_attr = metric, mode, time_attr
        self.sign = 1.0 if mode == "max" else -1.0
        self.max_t, self.rf = max_t, reduction_factor
        self.milestones = rung_milestones(grace_period, max_t, reduction_factor)
        self.state_path = state_path
        # arm -> str(milestone) -> {trial_id: metric}; and trial_id -> {arm, epoch, rung, metric}
        self.rungs: dict[str, dict[str, dict[str, float]]] = {}
        self.stopped: dict[str, dict] = {}
        self._load()

    def __setstate__(self, state: dict) -> None:
        # Tuner.restore unpickles the scheduler as it was at the start: reload what was decided since.
        self.__dict__.update(state)
        self._load()

    def _load(self) -> None:
        if self.state_path and storage.exists(self.state_path):
            state = storage.read_json(self.state_path)
            self.rungs, self.stopped = state["rungs"], state["stopped"]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # metric and mode are ours; Tune's TuneConfig leaves them unset

    def decide(self, trial_id: str, arm: str, epoch: float, value: float) -> str:
        """The ASHA rule for one result; pure bookkeeping, unit-testable without Tune."""
        if value is None or np.isnan(value):
            return TrialScheduler.CONTINUE
        rungs = self.rungs.setdefault(arm, {str(m): {} for m in self.milestones})
        action = TrialScheduler.CONTINUE
        for milestone in reversed(self.milestones):  # the highest rung this result reaches
            recorded = rungs[str(milestone)]
            if epoch < milestone or trial_id in recorded:
                continue
            others = list(recorded.values())
            if others:
                cutoff = np.nanpercentile(others, (1 - 1 / self.rf) * 100)
                if self.sign * value < cutoff:
                    action = TrialScheduler.STOP
                    self.stopped[trial_id] = {"arm": arm, "epoch": epoch, "rung": milestone, "metric": value,
                                              "cutoff": self.sign * float(cutoff)}
            recorded[trial_id] = self.sign * value
            break
        self._save()
        return action

    def _save(self) -> None:
        if self.state_path:
            storage.write_text(self.state_path, json.dumps({"milestones": self.milestones, "rungs": self.rungs,
                                                            "stopped": self.stopped}, indent=1))

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if trial.trial_id in self.stopped:  # decided before the study was killed: the decision stands
            return TrialScheduler.STOP
        if self.time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        if result[self.time_attr] >= self.max_t:
            return TrialScheduler.STOP
        return self.decide(trial.trial_id, trial.config["arm"], result[self.time_attr], result[self._metric])

    def debug_string(self) -> str:
        parts = []
        for arm, rungs in sorted(self.rungs.items()):
            counts = ", ".join(f"epoch {m}: {len(r)}" for m, r in rungs.items())
            stops = sum(1 for s in self.stopped.values() if s["arm"] == arm)
            parts.append(f"{arm} [{counts}; stopped {stops}]")
        return "PerArmASHA: " + ("; ".join(parts) or "no results yet")
