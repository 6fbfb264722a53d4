"""What a person reads on the terminal while training runs: one line per epoch, and one line per
arm whenever one of its trials ends (trials done / stopped / running, best so far, time left).

Printed by the driver from what Tune received (``StudyProgress``, a Tune callback) or, for a
single ``cxr-ray train`` run, from the run's history file (``follow_history``). Ray's own
expected chatter stays in Ray's log files (see runtime.connect); real errors are printed here.
"""
from __future__ import annotations

import sys
import threading
import time

import numpy as np

from ray import tune

from . import operating, storage
from .study_layout import diverged, plan_key, trial_label


def epoch_line(name: str, m: dict, epochs: int | None = None, width: int = 24) -> str:
    """``resnet10t-c1-s0  epoch 2/4  loss 0.4121  val_loss 0.3810  val_auroc 0.9612  412 img/s``"""
    of = f"/{epochs}" if epochs else ""
    return (f"{name:<{width}}  epoch {m['epoch']:>2}{of}  loss {m['train_loss']:.4f}  val_loss {m['val_loss']:.4f}"
            f"  val_auroc {m['val_auroc']:.4f}  {m['images_per_s']:.0f} img/s")


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


def replayed(m: dict) -> bool:
    """A run's last recorded epoch, said again by the run after a restart (nothing was trained)."""
    return m.get("started_at_epoch", 0) >= m["epoch"]


class StudyProgress(tune.Callback):
    """The console of a study phase. ``plans`` (trial plan key -> plan) gives each trial's epochs."""

    def __init__(self, spec, phase: str, plans: dict):
        self.phase, self.plans = phase, plans
        self.metric, self.sign = spec.selection.metric, spec.selection.sign
        self.width = max(len(p["arm"]) for p in plans.values()) + len("-c00-s0")
        self.slots = spec.resources.max_concurrent_trials
        self.start = time.time()
        self.epoch_seconds: dict[str, list[float]] = {}  # arm -> seconds of each epoch heard
        self.best: dict[str, float] = {}
        self.last_epoch: dict[str, int] = {}  # plan key -> last epoch heard
        self.ended: dict[str, str] = {}  # plan key -> completed / stopped / failed

    def _name(self, trial) -> str:
        return f"{trial_label(trial.config):<{self.width}}"

    def _planned_epochs(self, trial) -> int:
        return self.plans[plan_key(trial.config)]["train"]["epochs"]

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" not in result or replayed(result):
            return
        epochs = self._planned_epochs(trial)
        print(epoch_line(self._name(trial), result, epochs, self.width), flush=True)
        self.epoch_seconds.setdefault(trial.config["arm"], []).append(result.get("epoch_time_s", 0.0))
        self.last_epoch[plan_key(trial.config)] = int(result["epoch"])
        value = result.get(self.metric)
        arm = trial.config["arm"]
        if value is not None and (arm not in self.best or self.sign * value > self.sign * self.best[arm]):
            self.best[arm] = value
        if diverged(result):
            self.ended[plan_key(trial.config)] = "diverged"
            lr = self.plans[plan_key(trial.config)]["train"]["lr"]
            print(f"{self._name(trial)}  diverged at epoch {result['epoch']} (non-finite outputs at lr {lr:g}): "
                  f"ended there, ranked last", flush=True)
        elif result.get("done") and result["epoch"] < epochs:
            self.ended[plan_key(trial.config)] = "stopped"
            print(f"{self._name(trial)}  stopped by ASHA at epoch {result['epoch']} ({self.metric} {value:.4f} "
                  f"below its arm's rung)", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended.setdefault(plan_key(trial.config), "completed")
        self._arm_line(trials, trial.config["arm"])

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended[plan_key(trial.config)] = "failed"
        where = trial.path or trial.local_path or "the Tune experiment directory"
        print(f"{self._name(trial)}  FAILED; details in {where}/error.txt", file=sys.stderr, flush=True)
        self._arm_line(trials, trial.config["arm"])

    def _arm_line(self, trials, arm: str) -> None:
        """Counts over the arm's planned trials, including those Tune has not created yet."""
        mine = [key for key, plan in self.plans.items() if plan["arm"] == arm]
        ended = [self.ended.get(key) for key in mine]
        running = sum(t.config["arm"] == arm and t.status == "RUNNING" and plan_key(t.config) not in self.ended
                      for t in trials)
        failed = "".join(f", {ended.count(k)} {k}" for k in ("diverged", "failed") if k in ended)
        best = f"; best {self.metric} {self.best[arm]:.4f}" if arm in self.best else ""
        elapsed = time.time() - self.start
        heard = [x for xs in self.epoch_seconds.values() for x in xs]
        # an upper bound: every unfinished planned trial runs all its epochs, at its arm's pace so far
        left = sum(max(0, plan["train"]["epochs"] - self.last_epoch.get(key, 0))
                   * np.mean(self.epoch_seconds.get(plan["arm"], heard))
                   for key, plan in self.plans.items() if key not in self.ended) / self.slots if heard else 0
        eta = f"; at most ~{clock(left)} left" if left else ""
        print(f"[{self.phase} {clock(elapsed)}] {arm}: {ended.count('completed')} completed, "
              f"{ended.count('stopped')} stopped early{failed}, {running} running, of {len(mine)}{best}{eta}",
              flush=True)


def budget_lines(budget) -> str:
    """The budget each arm consumed, in the columns a person compares (budget.csv has them all)."""
    seconds = next(c for c in budget.columns if c.endswith("_seconds") and c != "wall_seconds")
    lines = ["budget consumed per arm (budget.csv):"]
    for r in budget.to_dict("records"):
        lines.append(f"  {r['arm']:<24} {r['trials']} trials, {r['epochs']} epochs ({r['stopped_early']} trials "
                     f"stopped early), {r[seconds]:.0f} {seconds.split('_')[0].upper()}-s in training loops")
    return "\n".join(lines)


def follow_history(uri: str, stop: threading.Event, name: str, epochs: int) -> None:
    """Print each row a run adds to its metrics.csv until ``stop`` is set (``cxr-ray train``)."""
    printed = int(storage.read_csv(uri)["epoch"].max()) if storage.exists(uri) else 0  # a resumed run's past
    while True:
        finished = stop.wait(1.0)
        if storage.exists(uri):
            try:
                rows = storage.read_csv(uri).to_dict("records")
            except ValueError:  # being replaced this instant
                rows = []
            for m in rows:
                if m["epoch"] > printed:
                    print(epoch_line(name, m, epochs), flush=True)
                    printed = int(m["epoch"])
        if finished:
            return


def operating_lines(points, best: dict) -> str:
    """The served model's operating point and each arm's seed ensemble's (validation_points rows)."""
    lines = []
    for row in points.to_dict("records"):
        served = (row["arm"], row["seed"]) == (best["arm"], best["seed"])
        if row["seed"] == -1 or served:
            seed = "seed ensemble" if row["seed"] == -1 else f"seed {row['seed']} (served)"
            lines.append(operating.line(f"{row['arm']} {seed}", row))
    return "\n".join(lines)
