"""Running a study: paired ASHA search per arm, then multi-seed final training, on Ray Tune.

Phases, each reading what the previous one wrote to the study directory (study_layout.py):
  1. data      spec.yaml, split.csv, data_report.json (with each external set's audit), configs.csv
  2. search    Tune experiment ``search``: every arm x the same sampled configurations, one
               training run per trial (engine ``tune``, the default: the training loop inside
               the Tune trial; engine ``train``: a Ray Train run, DDP over its workers), stopped
               by per-arm ASHA; trials.csv, budget.csv
  3. final     Tune experiment ``final``: each arm's best configuration retrained with every
               final seed for the same epochs; each run scores the held-out test split and
               every external set at its last epoch (so scoring overlaps the runs still training)
  4. evaluate  final.csv, summary.csv, comparison.csv, predictions.csv, best.json (evaluation.py)
Killing the driver loses nothing: ``resume`` restores both Tune experiments, skips finished
trials and continues unfinished ones from their newest checkpoint (each run's own, written every
epoch whichever engine ran it).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np
import pandas as pd
import ray
from ray import tune

from . import console, data, evaluation, external, models, runtime, spec as specs, storage, subgroups, tracking, training
from .config import TrainConfig
from .errors import CxrError
from .scheduler import PerArmASHA
from .study_layout import (FINAL, SEARCH, asha_state_file, asha_stops, diverged, history_file, plan_key,
                           read_spec, trial_id_of, trial_name)


class StudyError(CxrError, RuntimeError):
    """A study cannot start or continue; the message says why and what to run."""


# ----------------------------------------------------------------------------- trials

def run_trial(config: dict, data_ref: list, plans: dict, settings: dict) -> None:
    """Tune function trainable: one run of the training loop, whose per-epoch reports reach Tune
    (and ASHA). Engine ``tune`` runs the loop right here, in the trial's process (reused from trial
    to trial); engine ``train`` launches a Ray Train run (DDP over its workers) and forwards its reports."""
    cfg = TrainConfig.from_dict(plans[plan_key(config)]["train"])
    trial_id = tune.get_context().get_trial_id()
    if settings["engine"] == "tune":
        training.run_in_trial(cfg, data_ref[0], storage.join(settings["runs"], trial_id))
        return
    from ray.tune.integration.ray_train import TuneReportCallback
    training.fit(cfg, data_ref[0], name=trial_id, storage_path=settings["runs"], workers=settings["workers"],
                 use_gpu=settings["gpus"] > 0, cpus_per_worker=settings["cpus"], gpus_per_worker=settings["gpus"],
                 max_failures=settings["max_failures"], custom_resources=settings["custom"],
                 callbacks=[TuneReportCallback()])


def trial_resources(spec: specs.Spec) -> dict:
    """What Tune reserves for one trial. Engine tune: the loop's real CPUs/GPUs (Tune then counts
    them). Engine train: the trial only waits on its Train run, so a memory-only bundle keeps it
    from holding a CPU that the Train workers need (Tune does not count those; see
    max_concurrent_trials)."""
    r = spec.resources
    if spec.engine == "train":
        return {"memory": 64 * 1024**2}
    return {"cpu": r.cpus_per_worker, "gpu": r.gpus_per_worker, **r.worker_resources}


def phase_tuner(spec: specs.Spec, sdir: str, phase: str, plans: dict, data_ref) -> tune.Tuner:
    """The Tune experiment of one phase; restored (not restarted) when it already exists."""
    r = spec.resources
    settings = {"engine": spec.engine, "runs": storage.join(sdir, "runs"), "workers": r.workers_per_trial,
                "cpus": r.cpus_per_worker, "gpus": r.gpus_per_worker, "max_failures": r.max_failures,
                "custom": r.worker_resources}
    trainable = tune.with_resources(tune.with_parameters(run_trial, data_ref=[data_ref], plans=plans,
                                                         settings=settings), trial_resources(spec))
    path = storage.join(sdir, phase)
    if tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    scheduler = None
    if phase == SEARCH:
        b = spec.budget
        scheduler = PerArmASHA(metric=spec.selection.metric, mode=spec.selection.mode, max_t=b.max_epochs,
                               grace_period=b.grace_period, reduction_factor=b.reduction_factor,
                               state_path=asha_state_file(sdir))
        # config_id outermost: arms advance through the configurations side by side
        space = {"config_id": tune.grid_search(sorted({p["config_id"] for p in plans.values()})),
                 "arm": tune.grid_search(spec.arm_names), "seed": spec.seed}
    else:
        space = {"seed": tune.grid_search(spec.final.seeds), "arm": tune.grid_search(spec.arm_names)}
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=r.max_concurrent_trials,
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_name,
                                    reuse_actors=spec.engine == "tune"),
        run_config=tune.RunConfig(name=phase, storage_path=sdir,
                                  failure_config=tune.FailureConfig(max_failures=r.max_failures),
                                  callbacks=[console.StudyProgress(spec, phase, plans),
                                             *tracking.tune_callbacks(sdir, phase, plans)], verbose=0),
    )


def search_plans(spec: specs.Spec, configs: list[dict]) -> dict[str, dict]:
    """Every arm on every sampled configuration with the same seed: the paired design."""
    plans = {}
    for cid, sample in enumerate(configs):
        for arm in spec.arm_names:
            cfg = specs.trial_config(spec, arm, sample, seed=spec.seed)
            plans[plan_key({"arm": arm, "config_id": cid, "seed": spec.seed})] = {
                "arm": arm, "config_id": cid, "seed": spec.seed, "params": sample, "train": dataclasses.asdict(cfg)}
    return plans


def final_plans(spec: specs.Spec, best: dict[str, dict]) -> dict[str, dict]:
    """Each arm's best configuration with every final seed, trained for the same epochs."""
    plans = {}
    for seed in spec.final.seeds:
        for arm in spec.arm_names:
            b = best[arm]
            cfg = specs.trial_config(spec, arm, b["params"], seed=seed, evaluate_test=True,
                                     epochs=spec.final_epochs_for(arm))
            plans[plan_key({"arm": arm, "seed": seed})] = {
                "arm": arm, "config_id": b["config_id"], "seed": seed, "params": b["params"],
                "train": dataclasses.asdict(cfg)}
    return plans


# ----------------------------------------------------------------------------- results

def collect_trials(result_grid, sdir: str, phase: str, plans: dict) -> pd.DataFrame:
    """One row per (trial, epoch): identity, hyperparameters, metrics, checkpoint (relative).

    The per-epoch history is each run's own ``metrics.csv``, written before each epoch was reported
    (see training.py): Tune restarts a trial whose actor died with fresh result files, the run's
    history does not. Tune contributes the trial's status and its wall time (``time_total_s``).
    """
    rows = []
    for result in result_grid:
        t = plans[plan_key(result.config)]
        trial_id = trial_id_of(os.path.basename(result.path))
        identity = {"phase": phase, "trial_id": trial_id, "arm": t["arm"], "config_id": t["config_id"],
                    "seed": t["seed"], "status": "error" if result.error else "ok",
                    **{f"hp_{k}": v for k, v in t["params"].items()}}
        history_uri = history_file(sdir, trial_id)
        if not storage.exists(history_uri):
            rows.append(identity)
            continue
        history = storage.read_csv(history_uri)
        history["checkpoint"] = [_relative(c, sdir) if isinstance(c, str) else "" for c in history["checkpoint"]]
        tune_df = result.metrics_dataframe
        if tune_df is not None and {"epoch", "time_total_s"} <= set(tune_df.columns):
            times = tune_df.dropna(subset=["epoch"]).drop_duplicates("epoch", keep="last")
            history = history.merge(times[["epoch", "time_total_s"]], on="epoch", how="left")
        rows += [identity | m for m in history.to_dict("records")]
    return pd.DataFrame(rows)


def _relative(path: str, sdir: str) -> str:
    root = sdir.split("://", 1)[-1].rstrip("/")
    path = path.split("://", 1)[-1]
    return path[len(root) + 1:] if path.startswith(root + "/") else path


def trial_summary(trials: pd.DataFrame, spec: specs.Spec, stops: dict) -> pd.DataFrame:
    """One row per trial, every trial of the phase included: last epoch, best and last metric,
    outcome (completed, stopped by ASHA, diverged, unfinished, error), times."""
    metric, sign = spec.selection.metric, spec.selection.sign
    rows = []
    for tid, g in trials.groupby("trial_id", sort=False):
        first = g.iloc[0]
        g = g.dropna(subset=["epoch"]).sort_values("epoch") if "epoch" in g else g.iloc[:0]
        identity = {"trial_id": tid, "arm": first["arm"], "config_id": first["config_id"], "seed": first["seed"],
                    **{c: first[c] for c in g.columns if c.startswith("hp_")}}
        if not len(g):  # failed (or never started) before recording its first epoch
            rows.append(identity | {"epochs": 0, "outcome": "error" if first["status"] == "error" else "unfinished",
                                    "in_loop_s": 0.0})
            continue
        last = g.iloc[-1]
        epochs_needed = spec.epochs_for(last["arm"]) if last["phase"] == SEARCH else spec.final_epochs_for(last["arm"])
        if tid in stops:
            outcome = f"stopped by ASHA at epoch {int(stops[tid]['epoch'])}"
        elif diverged(last):
            outcome = f"diverged at epoch {int(last['epoch'])}"
        elif last["epoch"] >= epochs_needed:
            outcome = "completed"
        else:
            outcome = "unfinished" if last["status"] == "ok" else "error"
        rows.append(identity | {
            "epochs": int(last["epoch"]), "outcome": outcome,
            f"last_{metric}": last[metric], f"best_{metric}": (g[metric] * sign).max() * sign,
            "in_loop_s": g["epoch_time_s"].sum(), "wall_s": last.get("time_total_s", np.nan),
            "engine": last.get("engine", ""), "checkpoint": last["checkpoint"],
        })
    df = pd.DataFrame(rows)
    if len(df):
        df["overhead_s"] = df["wall_s"] - df["in_loop_s"]
        df = df.sort_values(f"last_{metric}", ascending=sign < 0, kind="stable", na_position="last")
    return df


def budget_table(summary: pd.DataFrame, spec: specs.Spec) -> pd.DataFrame:
    """What each arm consumed: trials, epochs, trials reaching each rung, compute seconds."""
    r, b = spec.resources, spec.budget
    accel = "gpu" if r.gpus_per_worker > 0 else "cpu"
    per_worker = r.gpus_per_worker if accel == "gpu" else r.cpus_per_worker
    milestones = b.milestones + [b.max_epochs]
    rows = []
    for arm in spec.arm_names:
        s = summary[summary["arm"] == arm]
        row = {"arm": arm, "trials": len(s), "epochs": int(s["epochs"].sum()),
               "stopped_early": int(s["outcome"].str.startswith("stopped").sum()),
               "completed": int((s["outcome"] == "completed").sum()),
               "diverged": int(s["outcome"].str.startswith("diverged").sum()),
               **{f"reached_epoch_{m}": int((s["epochs"] >= m).sum()) for m in sorted(set(milestones))},
               f"{accel}_seconds": float(s["in_loop_s"].sum() * r.workers_per_trial * per_worker),
               "wall_seconds": float(s["wall_s"].sum())}
        rows.append(row)
    return pd.DataFrame(rows)


def best_configs(summary: pd.DataFrame, spec: specs.Spec, configs: list[dict]) -> dict[str, dict]:
    """Each arm's best configuration: among trials that ran the full budget (ASHA's survivors),
    the best last-epoch selection metric; all trials of the arm if none finished. With the
    parameter count of the model it trains (the report shows accuracy against size)."""
    metric, mode = spec.selection.metric, spec.selection.mode
    best = {}
    for arm in spec.arm_names:
        s = summary[summary["arm"] == arm].dropna(subset=[f"last_{metric}"])
        if not len(s):
            raise StudyError(f"arm {arm}: no trial reported any result; see the Tune logs under search/")
        done = s[s["outcome"] == "completed"]
        pool = done if len(done) else s
        row = pool.sort_values(f"last_{metric}", ascending=mode == "min", kind="stable").iloc[0]
        cid = int(row["config_id"])
        cfg = specs.trial_config(spec, arm, configs[cid], seed=spec.seed)
        best[arm] = {"config_id": cid, "params": configs[cid], "trial_id": row["trial_id"],
                     metric: float(row[f"last_{metric}"]), "epochs": int(row["epochs"]),
                     "parameters": models.parameter_count(cfg)}
    return best


def phase_efficiency(trials: pd.DataFrame, spec: specs.Spec, start: float, end: float) -> dict:
    """How busy the phase kept its trial slots: time in training loops of the epochs that finished
    during this run of the phase, over wall time x concurrent trials (1.0: no start-up, no idle slot)."""
    slots = spec.resources.max_concurrent_trials
    mine = trials[(trials["finished_at"] >= start) & (trials["finished_at"] <= end)] if "finished_at" in trials \
        else trials.iloc[:0]
    in_loop = float(mine["epoch_time_s"].sum()) if len(mine) else 0.0
    wall = end - start
    efficiency = in_loop / (wall * slots) if wall > 0 else float("nan")
    print(f"{'search' if (trials['phase'] == SEARCH).all() else 'final'} phase: {wall:.0f} s wall, "
          f"{in_loop:.0f} s in training loops over {slots} trial slot(s): efficiency {efficiency:.2f}", flush=True)
    return {"wall_s": wall, "in_loop_s": in_loop, "slots": slots, "efficiency": efficiency}


# ----------------------------------------------------------------------------- driver

def study_dir(spec: specs.Spec, out: str | None, storage_root: str | None) -> str:
    if out and storage_root:
        raise StudyError("give either --out DIR or --storage URI, not both")
    if out:
        return storage.normalize(out)
    root = storage_root or os.environ.get("CXR_RAY_STORAGE") or "runs"
    return storage.join(storage.normalize(root), spec.name)


def prepare_data(spec: specs.Spec, sdir: str, progress: bool = True) -> data.Prepared:
    d = spec.data
    prepared = data.prepare(d.source, d.path, d.image_size, None, val_fraction=d.val_fraction,
                            test_fraction=d.test_fraction, seed=spec.seed, strict=d.strict, cache_root=d.cache,
                            use_official_test=d.use_official_test, synthetic_images=d.synthetic_images,
                            manifest=d.manifest_format, publish_to=None if d.cache else storage.join(sdir, "cache"),
                            progress=progress)
    for name in ("val", "test"):
        labels = prepared.cache.index["label"].to_numpy()[prepared.rows[name]]
        if not len(labels):
            raise data.DataError(f"the {name} split is empty: no image was left to carve it from (a manifest that "
                                 f"pre-assigns every image to other splits: assign some to {name} or leave some "
                                 "blank)")
        if len(set(labels)) < 2:
            raise data.DataError(f"the {name} split has {len(labels)} images of a single class; use more data "
                                 f"or a larger data.{name}_fraction")
    storage.write_csv(storage.join(sdir, "split.csv"), prepared.split)
    storage.write_json(storage.join(sdir, "data_report.json"), prepared.report)
    return prepared


def audit_external(spec: specs.Spec, sdir: str, prepared: data.Prepared) -> dict[str, tuple]:
    """Each external set decoded and audited against the study's images now (added to
    data_report.json), before any training: the final runs score them at their last epoch, and
    they are evaluated only after the final phase. name -> what ``external.audit`` returns."""
    audited = {ext.name: external.audit(spec, sdir, ext) for ext in spec.external}
    for name, (_, _, audit) in audited.items():
        print(f"external set {name}: {audit['images']} images; {audit['same_bytes']['images']} byte-identical "
              f"to the study's images (left out), {audit['shared_patient_ids']['images']} with a patient id "
              f"the study also has (scored both ways)", flush=True)
    if audited:
        storage.write_json(storage.join(sdir, "data_report.json"),
                           prepared.report | {"external": {name: a[2] for name, a in audited.items()}})
    return audited


def check_capacity(spec: specs.Spec) -> None:
    """Refuse a trial the cluster can never place, instead of waiting forever."""
    r = spec.resources
    total = ray.cluster_resources()
    need_cpu = r.workers_per_trial * r.cpus_per_worker
    need_gpu = r.workers_per_trial * r.gpus_per_worker
    autoscaling = bool(os.environ.get("RAY_ADDRESS"))  # a cluster may add nodes on demand
    if not autoscaling and (need_cpu > total.get("CPU", 0) or need_gpu > total.get("GPU", 0)):
        raise StudyError(f"one trial needs {need_cpu:g} CPU and {need_gpu:g} GPU "
                         f"(resources.workers_per_trial x cpus/gpus_per_worker) but this Ray instance has "
                         f"{total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU")
    for name, amount in r.worker_resources.items():
        if not autoscaling and r.workers_per_trial * amount > total.get(name, 0):
            raise StudyError(f"one trial needs {r.workers_per_trial * amount:g} of resource {name!r} "
                             f"(resources.worker_resources) but this Ray instance has {total.get(name, 0):g}")
    fits = int(total.get("CPU", 0) // need_cpu) if need_cpu else r.max_concurrent_trials
    if not autoscaling and r.max_concurrent_trials > fits:
        print(f"note: resources.max_concurrent_trials={r.max_concurrent_trials} but only {fits} trial(s) fit "
              f"at once on this Ray instance; the rest will queue", file=sys.stderr)


def run(spec_path: str, out: str | None = None, storage_root: str | None = None, *, data_path: str | None = None,
        report: bool = True, verbose: bool = False, mlflow: str | None = None) -> str:
    """Run a study from a spec file; returns the study directory. ``mlflow``: a tracking URI that
    replaces the spec's ``tracking.mlflow``."""
    spec = specs.load(spec_path, data_path)
    if mlflow:
        spec.tracking = specs.Tracking(mlflow, spec.tracking.experiment)
    sdir = study_dir(spec, out, storage_root)
    spec_uri = storage.join(sdir, "spec.yaml")
    if storage.exists(spec_uri):
        existing = specs.validate_text(storage.read_text(spec_uri), spec_uri)
        if existing.raw != spec.raw:
            raise StudyError(f"{sdir} already holds a study with a different spec; use `cxr-ray study resume "
                             f"{sdir}` to continue it, or choose another --out")
        print(f"{sdir} already holds this study: resuming it", flush=True)
        existing.tracking = spec.tracking  # where it is logged is no part of the study
        spec = existing
    else:
        storage.write_text(spec_uri, specs.dump(spec))
    return execute(spec, sdir, report=report, verbose=verbose)


def resume(sdir: str, *, report: bool = True, verbose: bool = False, mlflow: str | None = None) -> str:
    sdir = storage.normalize(sdir)
    spec = read_spec(sdir)
    spec.tracking = specs.Tracking(mlflow)  # None: where the study was tracked before (tracking.json), if anywhere
    return execute(spec, sdir, report=report, verbose=verbose)


def execute(spec: specs.Spec, sdir: str, *, report: bool = True, verbose: bool = False) -> str:
    start = time.time()
    print(f"study {spec.name} ({spec.hash}) -> {sdir}", flush=True)
    prepared = prepare_data(spec, sdir)
    tracker = tracking.start(spec, sdir)
    audited = audit_external(spec, sdir, prepared)
    subgroups.check_columns(spec.subgroups, {"test": prepared.split.columns,  # a typo fails now, not after training
                                             **{name: a[1].columns for name, a in audited.items()}})
    runtime.connect(verbose=verbose, log_file=None if storage.is_remote(sdir) else os.path.join(sdir, "driver.log"))
    check_capacity(spec)
    data_ref = runtime.put_data(prepared, {name: a[0].images for name, a in audited.items()})

    configs = specs.sample_configs(spec)
    storage.write_csv(storage.join(sdir, "configs.csv"), pd.DataFrame(configs).rename_axis("config_id").reset_index())

    # Phase 2: search.
    plans = search_plans(spec, configs)
    print(f"search: {len(spec.arm_names)} arms x {len(configs)} configurations = {len(plans)} trials, "
          f"up to {spec.budget.max_epochs} epochs each, {spec.resources.max_concurrent_trials} at a time "
          f"(engine {spec.engine})", flush=True)
    phases = {}
    t0 = time.time()
    results = phase_tuner(spec, sdir, SEARCH, plans, data_ref).fit()
    trials = collect_trials(results, sdir, SEARCH, plans)
    phases[SEARCH] = phase_efficiency(trials, spec, t0, time.time())
    stops = asha_stops(sdir)
    summary = trial_summary(trials, spec, stops)
    budget = budget_table(summary, spec)
    storage.write_csv(storage.join(sdir, "trials.csv"), trials)
    storage.write_csv(storage.join(sdir, "trial_summary.csv"), summary)
    storage.write_csv(storage.join(sdir, "budget.csv"), budget)
    print(console.budget_lines(budget), flush=True)
    if tracker:
        tracker.submit(tracker.log_phase, SEARCH, trials, summary)
    best = best_configs(summary, spec, configs)
    storage.write_json(storage.join(sdir, "best_configs.json"), best)

    # Phase 3: final multi-seed training on the best configuration of each arm.
    fplans = final_plans(spec, best)
    print(f"\nfinal: {len(spec.arm_names)} arms x {len(spec.final.seeds)} seeds = {len(fplans)} runs", flush=True)
    t0 = time.time()
    final_results = phase_tuner(spec, sdir, FINAL, fplans, data_ref).fit()
    final_trials = collect_trials(final_results, sdir, FINAL, fplans)
    phases[FINAL] = phase_efficiency(final_trials, spec, t0, time.time())
    storage.write_csv(storage.join(sdir, "final_trials.csv"), final_trials)
    if tracker:
        tracker.submit(tracker.log_phase, FINAL, final_trials)

    # Phase 4: evaluation on the held-out test split, then each external set, scored once.
    outcome = evaluation.evaluate(spec, sdir, prepared, final_trials)
    print("\n" + console.operating_lines(outcome["points"], outcome["best"]), flush=True)
    verdicts = [outcome["verdict"]]
    for ext in spec.external:
        done = storage.join(sdir, "external", ext.name, "verdict.json")
        verdicts.append(storage.read_json(done)["verdict"] if storage.exists(done)
                        else external.evaluate_set(spec, sdir, ext, audited=audited[ext.name])["verdict"])
    storage.write_json(storage.join(sdir, "study.json"), {
        "name": spec.name, "spec_hash": spec.hash, "finished": True, "driver_wall_s": time.time() - start,
        "engine": spec.engine, "phases": phases,
        "command": " ".join(sys.argv), "ray_resources": ray.cluster_resources(),
    })
    if spec.subgroups:
        verdicts.append(subgroups.study_sentence(sdir, outcome["best"]["arm"]))
    print("\n" + "\n".join(verdicts), flush=True)
    if report:
        from . import report as reporting
        path = reporting.write(sdir)
        print(f"report: {path}", flush=True)
    if tracker:
        tracking.end(tracker)
    return sdir


