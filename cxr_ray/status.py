"""``cxr-ray study status``: where a study stands, read from its directory alone (no Ray, no torch),
so it works while the study runs, after it was killed, and on a study stored on S3.

Trials are found in Tune's experiment directories (``search/``, ``final/``: one directory per
started trial); their progress is each run's own record and ASHA's decisions (the directory's
layout is study_layout's).
"""
from __future__ import annotations

import math

from . import storage
from .study_layout import FINAL, SEARCH, asha_stops, diverged, history_file, read_spec, trial_id_of
from .evaluation import ci_text


def phase_trials(sdir: str, phase: str) -> list[dict] | None:
    """Every started trial of a phase: arm, configuration, trial id, its record so far, and
    whether Tune recorded an error for it. None when the phase has not started."""
    root = storage.join(sdir, phase)
    if not storage.exists(root):
        return None
    trials = []
    for name in storage.listdir(root):
        params = storage.join(root, name, "params.json")
        if not storage.exists(params):
            continue
        config, tid = storage.read_json(params), trial_id_of(name)
        history_uri = history_file(sdir, tid)
        history = storage.read_csv(history_uri).to_dict("records") if storage.exists(history_uri) else []
        trials.append({"arm": config["arm"], "config_id": config.get("config_id"), "trial_id": tid,
                       "history": history, "error": storage.exists(storage.join(root, name, "error.txt"))})
    return trials


def status(sdir: str) -> str:
    """Trials completed / stopped / running per arm and the best so far, then the final evaluation;
    every line fits 100 columns (the CSV files hold everything)."""
    sdir = storage.normalize(sdir)
    spec = read_spec(sdir)
    metric, sign = spec.selection.metric, spec.selection.sign
    stops = asha_stops(sdir)
    lines = [f"study {spec.name} ({spec.hash}), engine {spec.engine}", f"  {sdir}"]
    planned = {SEARCH: spec.budget.samples_per_arm, FINAL: len(spec.final.seeds)}
    for phase in (SEARCH, FINAL):
        trials = phase_trials(sdir, phase)
        if trials is None:
            lines.append(f"{phase}: not started")
            continue
        lines.append(f"{phase}: {planned[phase]} trials per arm; best {metric} so far")
        for arm in spec.arm_names:
            target = spec.epochs_for(arm) if phase == SEARCH else spec.final_epochs_for(arm)
            counts = {"completed": 0, "stopped": 0, "diverged": 0, "failed": 0, "running": 0}
            best = None
            for t in (t for t in trials if t["arm"] == arm):
                epochs = t["history"][-1]["epoch"] if t["history"] else 0
                state = ("stopped" if t["trial_id"] in stops
                         else "diverged" if t["history"] and diverged(t["history"][-1])
                         else "completed" if epochs >= target
                         else "failed" if t["error"] else "running")
                counts[state] += 1
                for row in t["history"]:
                    value = row.get(metric)
                    if value is not None and not math.isnan(value) and (best is None or sign * value > sign * best[0]):
                        best = (value, t["config_id"], row["epoch"])
            counts["not started"] = planned[phase] - sum(counts.values())
            text = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
            where = f"config {best[1]}, " if best and best[1] is not None else ""
            lines.append(f"  {arm:<22} {text:<32}" + (f" {best[0]:.4f} ({where}epoch {best[2]})" if best else ""))
    summary_uri = storage.join(sdir, "summary.csv")
    if storage.exists(summary_uri):
        lines += ["final evaluation (summary.csv: mean over seeds, 95% CI over test patients):",
                  f"  {'arm':<22} {'AUROC':<20} {'accuracy':<20} {'sens':>5}  {'spec':>5}  seeds"]
        for r in storage.read_csv(summary_uri).to_dict("records"):
            lines.append(f"  {r['arm']:<22} {ci_text(r, 'auroc'):<20} {ci_text(r, 'accuracy'):<20} "
                         f"{r['sensitivity']:5.3f}  {r['specificity']:5.3f}  {int(r['seeds'])}")
    return "\n".join(lines)
