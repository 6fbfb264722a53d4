"""Which model a server serves, and at which operating point, from a study directory's files alone
(no torch, no Ray): the best arm's best seed, a named arm's, that arm's seed ensemble, or one
checkpoint; at the threshold the study chose on validation, at a serve-time threshold policy that
the evaluation layer chooses on the same validation split (at a site's expected prevalence, where
the policy depends on it: operating.py), or at a deployment site's profile (``cxr-ray calibrate``)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import evaluation, metrics, model_card, operating, storage
from .errors import CxrError
from .study_layout import finished_study, read_spec


class ServingError(CxrError, ValueError):
    """What to serve cannot be found or combined (command line and serve_app arguments)."""


@dataclass
class ModelChoice:
    checkpoints: list[str]  # local directories with model.safetensors + meta.json (several: a seed ensemble)
    identity: dict  # study, arm, seed, checkpoint (relative), spec_hash: what clients see
    test_metrics: dict
    threshold: float | None = None  # on the served probability; None: the checkpoint's own (Youden on validation)
    platt: tuple[float, float] | None = None  # calibration of the served probability
    operating_point: dict = field(default_factory=dict)  # how the threshold was chosen (policy, target, site)
    external_metrics: dict = field(default_factory=dict)  # external set -> the same metrics, when scored
    study_dir: str | None = None  # where it came from: for the server's log, never sent to clients
    card: model_card.Served = field(default_factory=model_card.Served)  # GET /v1/model/card, or why none


def threshold_policy(text: str) -> tuple[str, float | None]:
    """``youden``, ``calibrated``, ``sensitivity:0.95`` or ``specificity:0.9`` -> (policy, target)."""
    name, _, target = text.partition(":")
    if name not in metrics.POLICIES or (name in ("sensitivity", "specificity")) != bool(target):
        raise ServingError(f"threshold policy {text!r}: use youden, calibrated, sensitivity:TARGET or "
                           "specificity:TARGET")
    try:
        return name, float(target) if target else None
    except ValueError:
        raise ServingError(f"threshold policy {text!r}: the target must be a number such as 0.95") from None


def choose_model(study_dir: str | None = None, arm: str | None = None, checkpoint: str | None = None,
                 ensemble: bool = False, site: str | None = None, policy: str | None = None,
                 prevalence: float | str | None = None) -> ModelChoice:
    """What to serve: a finished study's best model (or its named arm's best final run), that arm's
    seed ensemble, or one checkpoint; at the operating point the study chose on validation, a
    serve-time ``policy`` chosen on the same validation split (at the site's expected ``prevalence``
    when given), or a deployment ``site``'s profile."""
    prevalence = _prevalence(prevalence)
    if checkpoint:
        if ensemble or site or policy or prevalence is not None:
            raise ServingError("--ensemble, --site, --threshold-policy and --prevalence need a study directory, "
                               "not --checkpoint")
        local = storage.local_dir(storage.normalize(checkpoint))
        meta = json.loads(Path(local, "meta.json").read_text())
        return ModelChoice([local], {"study": meta.get("study"), "arm": meta.get("arm"),
                                     "seed": meta["config"]["seed"], "checkpoint": Path(checkpoint.rstrip("/")).name,
                                     "spec_hash": meta.get("spec_hash")}, {},
                           operating_point={"policy": "youden", "chosen_on": "the run's validation split"})
    if not study_dir:
        raise ServingError("give a study directory or --checkpoint")
    sdir = finished_study(study_dir)
    best = storage.read_json(storage.join(sdir, "best.json"))
    arm = arm or best["arm"]
    final = storage.read_csv(storage.join(sdir, "final.csv"))
    runs = final[final["arm"] == arm].sort_values("val_auroc", ascending=False, kind="stable")
    if not len(runs):
        raise FileNotFoundError(f"{sdir}: no final run of arm {arm!r} (arms: {', '.join(sorted(set(final.arm)))})")
    members = runs if ensemble else runs.iloc[:1]
    table = "ensembles.csv" if ensemble else "summary.csv"
    row = storage.read_csv(storage.join(sdir, table)).set_index("arm").loc[arm]
    test_metrics = {m: float(row[m]) for m in metrics.REPORTED}
    if ensemble:
        threshold, platt = float(row["threshold"]), _platt(row)
    else:
        threshold, platt = float(members.iloc[0]["threshold"]), _platt(members.iloc[0])
    point = {"policy": best["policy"]["policy"], "target": best["policy"]["target"],
             "prevalence": best.get("operating", {}).get("prevalence"), "chosen_on": "the study's validation split"}
    if policy or prevalence is not None:
        name, target = threshold_policy(policy) if policy else (point["policy"], point["target"])
        threshold, platt = _serve_time_point(sdir, arm, [int(s) for s in members["seed"]], name, target, prevalence)
        point = {"policy": name, "target": target, "chosen_on": "the study's validation split (at serve time)"}
        if prevalence is not None:
            point["prevalence"] = prevalence
    if site:
        if prevalence is not None:
            raise ServingError(f"site {site}'s profile was fitted at its own prevalence: give --prevalence to "
                               f"cxr-ray calibrate, not with --site")
        if arm != best["arm"]:
            raise ServingError(f"site profiles are fitted for the study's served arm {best['arm']}, not {arm}")
        uri = storage.join(sdir, "sites", f"{site}.json")
        if not storage.exists(uri):
            known = [n.removesuffix(".json") for n in storage.listdir(storage.join(sdir, "sites"))]
            raise FileNotFoundError(f"{sdir}: no site profile {site!r} (profiles: {', '.join(known) or 'none'}; "
                                    f"make one with cxr-ray calibrate {sdir} --name {site} ...)")
        profile = storage.read_json(uri)
        fitted = profile["ensemble" if ensemble else "model"]
        threshold, platt = fitted["threshold"], tuple(fitted["platt"]) if fitted["platt"] else None
        point = {"policy": profile["policy"], "target": profile["target"], "site": site,
                 "prevalence": profile.get("prevalence"),
                 "chosen_on": f"site {site}'s sample of {profile['images']} images"}
    external = {}
    for name in storage.listdir(storage.join(sdir, "external")):
        uri = storage.join(sdir, "external", name, "ensembles.csv" if ensemble else "summary.csv")
        if storage.exists(uri):
            ext = storage.read_csv(uri).set_index("arm")
            if arm in ext.index:
                external[name] = {m: float(ext.loc[arm, m]) for m in metrics.REPORTED}
    locals_ = [storage.local_dir(storage.join(sdir, c)) for c in members["checkpoint"]]
    meta = json.loads(Path(locals_[0], "meta.json").read_text())
    identity = {"study": meta["study"], "arm": arm, "seed": -1 if ensemble else int(members.iloc[0]["seed"]),
                "checkpoint": ",".join(members["checkpoint"]), "spec_hash": meta["spec_hash"]}
    return ModelChoice(locals_, identity, test_metrics, threshold, platt, point, external, sdir,
                       model_card.for_model(sdir, identity))


def _serve_time_point(sdir: str, arm: str, seeds: list[int], policy: str, target: float | None,
                      prevalence: float | None) -> tuple[float, tuple | None]:
    """The served model's (mean of ``seeds``') operating point by ``policy`` at ``prevalence``, chosen
    on the study's validation split as the study chose its own (same patients, same resamples)."""
    runs, val = evaluation.load_study_runs(read_spec(sdir), sdir)
    p_val = np.mean([runs[(arm, seed)].val for seed in seeds], axis=0)
    try:
        point = operating.choose(policy, target, val, p_val, prevalence)
    except metrics.MetricError as e:
        raise ServingError(f"{sdir}: threshold policy {policy} on arm {arm}'s validation scores: {e}") from None
    return point.served_threshold, point.platt


def _prevalence(value: float | str | None) -> float | None:
    """A site's expected prevalence from the command line or serve_app's arguments (text)."""
    if value is None:
        return None
    try:
        prevalence = float(value)
    except ValueError:
        prevalence = float("nan")
    if not 0 < prevalence < 1:
        raise ServingError(f"prevalence {value!r}: give the site's expected fraction of pneumonia, in (0, 1)")
    return prevalence


def _platt(row) -> tuple[float, float] | None:
    return (float(row["platt_a"]), float(row["platt_b"])) if "platt_a" in row and pd.notna(row["platt_a"]) else None
