"""Studies where people already look: MLflow (runs, metrics per epoch, the report, a registered model
version) and TensorBoard (each trial's event file, made from its record, stepped by epoch).

MLflow is optional (``pip install 'cxr-ray[mlflow]'``): nothing imports it until a study is tracked.
The study directory stays the record and everything logged is read from it (each run's
``metrics.csv``, ``trials.csv``, ``final.csv``, ``report/`` ...), so the live study and
``cxr-ray track`` after the fact log the same things through the same functions:

  parent run   the study: its spec as params and ``spec.yaml``, spec hash and data fingerprint as tags;
               at the end the budget, each arm's metrics with CIs (internal and external), the verdict,
               and the study's tables, report and external results as artifacts
  child runs   one per search trial and final run (tag ``trial_id``): its configuration, per-epoch
               metrics (step = epoch), outcome and engine; a final run also its test metrics
  model        the served model (best.json's choice), logged and registered as a new version of the
               model named after the study, with its threshold, policy and metrics as tags

``tracking.json`` in the study directory keeps, per tracking URI, the experiment and the parent
run's key and id, so a resumed study continues the same run; child runs are found by their ``trial_id``
tag and only epochs after the last one logged are sent, so nothing is logged twice. A tracker that
fails never fails the study: the console says once what is not logged, and ``cxr-ray track`` uploads
it afterwards. MLflow's own messages go to ``tracking.log``, not the console.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from ray import tune
from ray.tune.logger import TBXLoggerCallback
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.record_writer import masked_crc32c

from . import spec as specs, storage
from .errors import CxrError
from .study_layout import FINAL, SEARCH, finished_study, plan_key, trial_label

STATE = "tracking.json"  # tracking URI -> {experiment, experiment_id, run_id, key}
DEFAULT_EXPERIMENT = "cxr-ray"
# MLflow settings cxr-ray changes (a value the user set wins): no usage telemetry leaves the machine,
# no run URLs or progress bars on the console, and a server that is down costs seconds, not minutes.
MLFLOW_ENVIRONMENT = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
                      "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
NOT_EPOCH_METRICS = {"started_at_epoch", "pid", "finished_at"}  # numeric columns of metrics.csv that are no metric
STUDY_FILES = (".csv", ".json", ".yaml", ".md", ".html")  # the study directory's own files, logged as artifacts
STUDY_FOLDERS = ("report", "external", "sites")
BATCH = 1000  # MLflow's limit of metrics in one log_batch

log = logging.getLogger(__name__)


class TrackingError(CxrError, RuntimeError):
    """Tracking cannot start or an upload failed; the message says why."""


# ----------------------------------------------------------------------------- TensorBoard

class EpochTensorBoard(TBXLoggerCallback):
    """Each trial's TensorBoard event file (``STUDY/search/<trial>/events.out.tfevents.*``), made from
    its record (``runs/<trial>/metrics.csv``, see ``write_events``): it grows as the trial reports
    epochs and is completed for every trial when the phase ends, so a killed and resumed study loses
    and repeats nothing. It takes the place of Tune's own writer (being one, Tune adds no other),
    which steps by Tune's iteration count (it starts again at 1 in a resumed process) and flushes
    from a thread every 30 s (a killed driver lost its last points)."""

    def __init__(self, sdir: str):
        super().__init__()
        self.sdir = sdir

    def log_trial_start(self, trial):  # the base class would open a writer of its own
        pass

    def log_trial_end(self, trial, failed=False):
        pass

    def log_trial_result(self, iteration, trial, result):
        self._write(trial)

    def on_experiment_end(self, trials, **info):  # trials that ended in a process killed before writing
        for trial in trials:
            self._write(trial)

    def _write(self, trial) -> None:
        uri = storage.join(self.sdir, "runs", trial.trial_id, "metrics.csv")
        if storage.exists(uri):
            trial.init_local_path()
            write_events(trial.local_path, storage.read_csv(uri))


def write_events(folder: str, history: pd.DataFrame) -> None:
    """A run's per-epoch record as one TensorBoard event file: every metric of each epoch with the
    epoch as the step, at the time the epoch ended. The file is a function of the record (an epoch's
    bytes never change), so it only grows: the epochs it lacks are appended (TensorBoard follows
    appends), and a file a kill cut short is written anew."""
    start = record_times(history)[0] / 1000
    events = [Event(wall_time=start, file_version="brain.Event:2")]
    for row in history.sort_values("epoch").to_dict("records"):
        values = [Summary.Value(tag=k, simple_value=v) for k, v in _numbers(row).items() if k != "epoch"]
        events.append(Event(wall_time=row["finished_at"], step=int(row["epoch"]), summary=Summary(value=values)))
    data = b"".join(_record(e.SerializeToString()) for e in events)
    path = Path(folder, f"events.out.tfevents.{int(start)}.cxr-ray")
    held = path.read_bytes() if path.exists() else b""
    if data.startswith(held):
        with open(path, "ab") as f:
            f.write(data[len(held):])
    else:
        Path(f"{path}.tmp").write_bytes(data)
        os.replace(f"{path}.tmp", path)


def _record(data: bytes) -> bytes:
    """One TFRecord (length, its checksum, the data, its checksum): how event files frame events."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def tune_callbacks(sdir: str, phase: str, plans: dict) -> list:
    """The callbacks a study phase adds to its Tune experiment: TensorBoard files, live MLflow runs."""
    return [EpochTensorBoard(sdir), TrialRuns(phase, plans)]


# ----------------------------------------------------------------------------- MLflow, live

_active: "Tracker | None" = None  # the study's tracker in this process (Tune pickles its callbacks)


class TrialRuns(tune.Callback):
    """Each trial's child run gets its epochs as Tune hears them, and ends with the trial. Holds no
    tracker: Tune stores its callbacks with the experiment and restores them on resume, so they
    reach the tracker of the process running them (none: nothing to do)."""

    def __init__(self, phase: str, plans: dict):
        self.phase = phase
        self.identity = {key: {k: p[k] for k in ("arm", "config_id", "seed", "params")} for key, p in plans.items()}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if _active and "epoch" in result:
            _active.submit(_active.log_trial, self.phase, trial.trial_id, self.identity[plan_key(trial.config)])

    def on_trial_complete(self, iteration, trials, trial, **info):
        if _active:
            _active.submit(_active.end_trial, trial.trial_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        if _active:
            _active.submit(_active.end_trial, trial.trial_id, "FAILED")


# ----------------------------------------------------------------------------- MLflow

def _mlflow(log_file: str):
    """Import MLflow (the optional extra) with cxr-ray's settings; its messages go to ``log_file``."""
    for key, value in MLFLOW_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    try:
        import mlflow
    except ImportError:
        raise TrackingError("MLflow tracking needs the mlflow package: pip install 'cxr-ray[mlflow]'") from None
    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("mlflow", "urllib3", __name__):  # urllib3: the retry warnings of a server that is down
        logger = logging.getLogger(name)
        for old in logger.handlers[:]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return mlflow


def tracking_uri(sdir: str, given: str | None) -> str | None:
    """Where a study is logged: the URI given (``--mlflow``, the spec's ``tracking.mlflow``), else the
    one it was first logged to (a resumed study), else ``$MLFLOW_TRACKING_URI``; None: not tracked."""
    uri = storage.join(sdir, STATE)
    recorded = list(storage.read_json(uri)) if storage.exists(uri) else []
    return given or (recorded[0] if recorded else None) or os.environ.get("MLFLOW_TRACKING_URI") or None


def data_fingerprint(sdir: str) -> str:
    """One hash of the images (by content), labels and split a study used: equal for two studies
    exactly when they trained, validated and tested on the same images."""
    split = storage.read_csv(storage.join(sdir, "split.csv"), usecols=["sha1", "label", "split"])
    rows = split.sort_values(["sha1", "split", "label"]).to_csv(index=False)
    return hashlib.sha1(rows.encode()).hexdigest()[:16]


def spec_params(spec: specs.Spec) -> dict[str, str]:
    """The resolved spec as MLflow params: sections flattened to ``budget.max_epochs``, the rest as JSON."""
    params = {}
    for key, value in spec.raw.items():
        if isinstance(value, dict):
            params |= {f"{key}.{k}": v for k, v in value.items()}
        else:
            params[key] = value
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()}


@dataclass
class Child:
    """A trial's run in MLflow: its id, what it holds, and the last epoch logged to it."""
    run_id: str
    tags: dict
    status: str
    epoch: int = 0
    metrics: set = field(default_factory=set)
    has_params: bool = False


class Tracker:
    """One study in one MLflow tracking server. ``strict`` (``cxr-ray track``): a failure raises.
    Otherwise (a study running) the work runs on a thread of its own, off Tune's loop, and the
    first failure stops it: the console says so once and the study goes on."""

    def __init__(self, spec: specs.Spec, sdir: str, uri: str, strict: bool):
        self.spec, self.sdir, self.uri, self.strict = spec, sdir, uri, strict
        self.log_file = os.path.join(sdir, "tracking.log") if not storage.is_remote(sdir) else \
            os.path.join(tempfile.gettempdir(), "cxr-ray", f"tracking-{os.getpid()}.log")
        self.client = _mlflow(self.log_file).MlflowClient(uri)
        self.pool = None if strict else ThreadPoolExecutor(1, thread_name_prefix="cxr-ray-mlflow")
        self.failed = False
        self.counts = {"runs": 0, "epochs": 0, "artifacts": 0}  # what this process logged: child runs, epochs, files
        self.children: dict[str, Child] = {}
        self.run_id = self.experiment_id = ""
        self.user = None  # the parent run's mlflow.user, given to its children
        self.parent_metrics: set = set()
        self.version = None  # (ModelVersion, registered by this call) once registered

    # -- running the work

    def submit(self, fn, *args) -> None:
        if self.strict:
            fn(*args)
        elif not self.failed:
            self.pool.submit(self._guarded, fn, *args)

    def _guarded(self, fn, *args) -> None:
        if self.failed:
            return
        try:
            fn(*args)
        except Exception as e:  # a tracker never fails the study
            self.failed = True
            log.exception("MLflow logging stopped")
            print(f"MLflow ({self.uri}): {_why(e)}. Nothing more of this study is logged there; the study "
                  f"goes on. Upload it when it has finished: cxr-ray track {self.sdir} --mlflow {self.uri} "
                  f"(details in {self.log_file})", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Wait for what was submitted; the study's tracker is no longer active."""
        global _active
        if self.pool:
            self.pool.shutdown(wait=True)
        if _active is self:
            _active = None

    # -- the study's parent run

    def open(self, experiment: str | None) -> None:
        """Find the study's parent run by its ``study_key`` tag or create it. The key is written to
        the study directory (tracking.json) before the run exists: no kill leaves a second parent."""
        state_uri = storage.join(self.sdir, STATE)
        state = storage.read_json(state_uri) if storage.exists(state_uri) else {}
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        record = state.setdefault(self.uri, {"key": uuid.uuid4().hex, "experiment": name})
        storage.write_json(state_uri, state)
        name = record["experiment"]  # where the study's run is, whatever is asked now
        found = self.client.get_experiment_by_name(name)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(
            name, tags={"mlflow.experimentKind": "custom_model_development"})  # MLflow's UI: its training-runs view
        runs = self._search(f"tags.study_key = '{record['key']}'")
        if runs:
            run = runs[0]
        else:
            from mlflow.tracking.context.registry import resolve_tags
            trials_uri = storage.join(self.sdir, "trials.csv")  # an upload after the fact: when the study began
            start = record_times(storage.read_csv(trials_uri))[0] if storage.exists(trials_uri) else None
            run = self.client.create_run(self.experiment_id, start_time=start, run_name=self.spec.name,
                                         tags=resolve_tags({
                                             "study_key": record["key"], "study": self.spec.name,
                                             "spec_hash": self.spec.hash, "engine": self.spec.engine,
                                             "data_fingerprint": data_fingerprint(self.sdir), "study_dir": self.sdir,
                                             "mlflow.note.content": self.spec.description}))
        self.run_id = run.info.run_id
        state[self.uri] = record | {"experiment_id": self.experiment_id, "run_id": self.run_id}
        storage.write_json(state_uri, state)
        self.user = run.data.tags.get("mlflow.user")
        self.parent_metrics = set(run.data.metrics)
        if not run.data.params:
            self._batch(self.run_id, params=spec_params(self.spec))
        with tempfile.TemporaryDirectory() as stage:  # the spec first; the rest of the study at its end
            Path(stage, "spec.yaml").write_bytes(storage.read_bytes(storage.join(self.sdir, "spec.yaml")))
            self.client.log_artifact(self.run_id, str(Path(stage, "spec.yaml")))
        for child in self._search(f"tags.mlflow.parentRunId = '{self.run_id}'"):
            self.children[child.data.tags["trial_id"]] = Child(
                child.info.run_id, child.data.tags, child.info.status, int(child.data.metrics.get("epoch", 0)),
                set(child.data.metrics), bool(child.data.params))

    @property
    def url(self) -> str:
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"run {self.run_id} of experiment {self.experiment_id} in {self.uri}"

    # -- trials

    def log_trial(self, phase: str, trial_id: str, identity: dict) -> None:
        """The trial's child run, created if new, with every epoch of its ``metrics.csv`` not yet logged."""
        uri = storage.join(self.sdir, "runs", trial_id, "metrics.csv")
        history = storage.read_csv(uri) if storage.exists(uri) else pd.DataFrame({"epoch": []})
        child = self.children.get(trial_id)
        if child is None:
            tags = {"mlflow.parentRunId": self.run_id, "trial_id": trial_id, "phase": phase, "arm": identity["arm"],
                    "seed": str(int(identity["seed"])), "study": self.spec.name,
                    **({"mlflow.user": self.user} if self.user else {})}
            label = trial_label({k: v for k, v in identity.items() if k != "config_id" or phase == SEARCH})
            start = record_times(history)[0] if len(history) else None  # when it began, also if uploaded later
            run = self.client.create_run(self.experiment_id, start_time=start, run_name=label, tags=tags)
            child = self.children[trial_id] = Child(run.info.run_id, tags, run.info.status)
            self.counts["runs"] += 1
        if not child.has_params:
            params = {"arm": identity["arm"], "config_id": int(identity["config_id"]), "seed": int(identity["seed"]),
                      **identity["params"]}
            self._batch(child.run_id, params={k: str(v) for k, v in params.items()})
            child.has_params = True
        new = history[history["epoch"] > child.epoch].sort_values("epoch")
        epochs_per_batch = max(BATCH // max(len(new.columns), 1), 1)
        for start in range(0, len(new), epochs_per_batch):  # whole epochs per batch, in order
            rows = new.iloc[start:start + epochs_per_batch]
            metrics = [(k, v, int(r["epoch"]), int(r.get("finished_at", time.time()) * 1000))
                       for r in rows.to_dict("records") for k, v in _numbers(r).items()]
            self._batch(child.run_id, metrics=metrics)  # one request: an epoch is logged whole or not at all
            child.epoch = int(rows["epoch"].max())
            self.counts["epochs"] += len(rows)
        if len(history) and "engine" in history and child.tags.get("engine") != history["engine"].iloc[-1]:
            child.tags["engine"] = history["engine"].iloc[-1]
            self._batch(child.run_id, tags={"engine": child.tags["engine"]})

    def end_trial(self, trial_id: str, status: str, outcome: str | None = None, end_time: int | None = None) -> None:
        child = self.children.get(trial_id)
        if child is None:
            return
        if outcome and child.tags.get("outcome") != outcome:
            child.tags["outcome"] = outcome
            self._batch(child.run_id, tags={"outcome": outcome})
        if child.status == "RUNNING":
            self.client.set_terminated(child.run_id, status, end_time)
            child.status = status

    def log_phase(self, phase: str, trials: pd.DataFrame, summary: pd.DataFrame | None = None) -> None:
        """Every trial of a finished phase (its ``trials.csv`` rows): the run complete and ended, with
        the trial's outcome from the phase's ``trial_summary.csv`` when it has one (the search)."""
        outcomes = dict(zip(summary["trial_id"], summary["outcome"])) if summary is not None else {}
        for tid, rows in trials.groupby("trial_id", sort=False):
            first = rows.iloc[0]
            identity = {"arm": first["arm"], "config_id": first["config_id"], "seed": first["seed"],
                        "params": {c[3:]: v for c, v in first.items() if c.startswith("hp_") and pd.notna(v)}}
            self.log_trial(phase, tid, identity)
            failed = (rows["status"] == "error").any()
            end = record_times(rows)[1] if "finished_at" in rows and rows["finished_at"].notna().any() else None
            self.end_trial(tid, "FAILED" if failed else "FINISHED", outcomes.get(tid), end)

    # -- the end of the study

    def finish(self) -> None:
        """The finished study on its parent run: metrics, verdict, artifacts, the registered model."""
        sdir = self.sdir
        best = storage.read_json(storage.join(sdir, "best.json"))
        metrics = _table_metrics("budget", storage.read_csv(storage.join(sdir, "budget.csv")))
        sets = scored_sets(sdir)
        for name, folder in sets.items():
            for table in ("summary.csv", "comparison.csv"):
                metrics |= _table_metrics(name, storage.read_csv(storage.join(folder, table)))
            for run in storage.read_csv(storage.join(folder, "final.csv")).to_dict("records"):
                child = self._final_child(run["arm"], run["seed"])
                if child:
                    values = {f"{name}/{k}": v for k, v in _numbers(run).items() if k not in ("seed", "val_auroc")}
                    self._log_new(child.run_id, child.metrics, values)
                    if name == "test":  # scored on the test split: the final run did what it was for
                        self.end_trial(child.tags["trial_id"], "FINISHED", "completed")
        study = storage.read_json(storage.join(sdir, "study.json"))
        metrics |= {f"{phase}/{k}": v for phase, p in study.get("phases", {}).items() for k, v in _numbers(p).items()}
        metrics["driver_wall_s"] = study["driver_wall_s"]
        self._log_new(self.run_id, self.parent_metrics, metrics)
        verdicts = [best["verdict"]] + [storage.read_json(storage.join(folder, "verdict.json"))["verdict"]
                                        for name, folder in sets.items() if name != "test"]
        self._batch(self.run_id, tags={"verdict": best["verdict"], "served_arm": best["arm"],
                                       "served_seed": str(best["seed"]),
                                       "mlflow.note.content": "\n\n".join([self.spec.description, *verdicts]).strip()})
        with tempfile.TemporaryDirectory() as stage:
            self.counts["artifacts"] = stage_study_files(sdir, stage)
            self.client.log_artifacts(self.run_id, stage)
        self.version = self.register(best)
        if self.client.get_run(self.run_id).info.status == "RUNNING":  # uploaded after the fact: when it ended
            end = record_times(storage.read_csv(storage.join(sdir, "final_trials.csv")))[1] if self.strict else None
            self.client.set_terminated(self.run_id, "FINISHED", end)

    def _final_child(self, arm: str, seed) -> Child | None:
        return next((c for c in self.children.values() if c.tags.get("phase") == FINAL and c.tags.get("arm") == arm
                     and c.tags.get("seed") == str(int(seed))), None)

    def register(self, best: dict):
        """The served model as a logged model of the parent run, registered once as a new version of
        the model named after the study; its threshold, policy and metrics are the version's tags."""
        name = self.spec.name
        known = self.client.search_model_versions(f"name = '{name}' and run_id = '{self.run_id}'")
        if known:
            return known[0], False
        tags = served_tags(self.sdir, best) | {"spec_hash": self.spec.hash, "study": name,
                                                 "data_fingerprint": data_fingerprint(self.sdir)}
        from mlflow.entities import LoggedModelStatus
        from mlflow.exceptions import MlflowException
        models = [m for m in self.client.search_logged_models([self.experiment_id],
                                                              filter_string=f"source_run_id = '{self.run_id}'")
                  if m.status != LoggedModelStatus.FAILED]  # one a kill cut short is PENDING: finished now
        model = models[0] if models else \
            self.client.create_logged_model(self.experiment_id, name=name, source_run_id=self.run_id, tags=tags)
        if model.status != LoggedModelStatus.READY:
            with tempfile.TemporaryDirectory() as stage:
                model_bundle(self.sdir, best, stage)
                self.client.log_model_artifacts(model.model_id, stage)
            model = self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        try:
            self.client.create_registered_model(name, description=f"cxr-ray study {name}: chest X-ray pneumonia "
                                                "classifier, research software, not a medical device")
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        return self.client.create_model_version(name, source=model.model_uri, run_id=self.run_id,
                                                model_id=model.model_id, tags=tags), True

    # -- MLflow calls

    def _search(self, filter_string: str) -> list:
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string, max_results=1000, page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def _batch(self, run_id: str, metrics=(), params: dict | None = None, tags: dict | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v, step, ts in metrics],
                              params=[Param(k, v) for k, v in (params or {}).items()],
                              tags=[RunTag(k, v) for k, v in (tags or {}).items()])

    def _log_new(self, run_id: str, logged: set, values: dict) -> None:
        """Summary metrics (step 0) the run does not hold yet: logging one again would add a point."""
        now = int(time.time() * 1000)
        new = [(k, v, 0, now) for k, v in values.items() if k not in logged]
        for start in range(0, len(new), BATCH):
            self._batch(run_id, metrics=new[start:start + BATCH])
        logged.update(k for k, *_ in new)


def record_times(epochs: pd.DataFrame) -> tuple[int, int]:
    """When the recorded epochs began and ended (ms): MLflow shows a run uploaded later at its own times."""
    return (int((epochs["finished_at"] - epochs["epoch_time_s"]).min() * 1000),
            int(epochs["finished_at"].max() * 1000))


def _numbers(row: dict) -> dict[str, float]:
    """The numeric fields of a row (bools as 0/1) as MLflow metrics; an empty (NaN) field is not one."""
    return {k: float(v) for k, v in row.items()
            if k not in NOT_EPOCH_METRICS and isinstance(v, (int, float)) and v == v}


def _table_metrics(prefix: str, table: pd.DataFrame) -> dict[str, float]:
    """An arm-per-row table as ``PREFIX/ARM/COLUMN`` metrics (its numeric columns)."""
    return {f"{prefix}/{row['arm']}/{k}": v for row in table.to_dict("records") for k, v in _numbers(row).items()}


def _why(e: Exception) -> str:
    """One line a person reads (MLflow's message for a server that is down holds a urllib3 repr)."""
    text = str(e).strip()
    if "Max retries exceeded" in text:
        reason = re.search(r"\[Errno -?\d+\] ([^'\"]+)", text)
        return f"no answer from the server ({reason.group(1) if reason else 'retries exhausted'})"
    line = text.splitlines()[0][:300] if text else ""
    return line if type(e).__module__.startswith("mlflow") else f"{type(e).__name__}: {line}"


# ----------------------------------------------------------------------------- the study directory

def scored_sets(sdir: str) -> dict[str, str]:
    """Where each evaluation set's tables are: ``test`` (the internal split) and each scored external set."""
    external = storage.join(sdir, "external")
    return {"test": sdir} | {name: storage.join(external, name) for name in storage.listdir(external)
                             if storage.exists(storage.join(external, name, "summary.csv"))}


def stage_study_files(sdir: str, stage: str) -> int:
    """Copy what the parent run keeps of a study into ``stage``: its own files (spec, tables, verdicts)
    and the report, external results and site profiles; not checkpoints, Tune's files or logs."""
    count = 0
    for name in storage.listdir(sdir):
        uri = storage.join(sdir, name)
        if name in STUDY_FOLDERS:
            shutil.copytree(storage.local_dir(uri), Path(stage, name))
            count += sum(len(files) for _, _, files in os.walk(Path(stage, name)))
        elif name.endswith(STUDY_FILES) and name != STATE and ".tmp" not in name:
            Path(stage, name).write_bytes(storage.read_bytes(uri))
            count += 1
    return count


def model_bundle(sdir: str, best: dict, stage: str) -> None:
    """The served model as a study directory of its own, which ``cxr-ray serve`` serves as it serves
    the study: best.json, the served run's rows of final.csv and validation_predictions.csv, its
    arm's rows of summary.csv and of each external set's, the spec, the model card when there is
    one, and the checkpoint's weights and metadata (not its optimizer state)."""
    arm, seed, checkpoint = best["arm"], int(best["seed"]), best["checkpoint"]

    def rows(name: str, served_run: bool = False) -> None:
        table = storage.read_csv(storage.join(sdir, name))
        keep = table["arm"] == arm
        if served_run:
            keep &= table["seed"] == seed
        Path(stage, name).parent.mkdir(parents=True, exist_ok=True)
        table[keep].to_csv(Path(stage, name), index=False)

    Path(stage, "best.json").write_text(json.dumps(best, indent=1))
    rows("final.csv", served_run=True)
    rows("validation_predictions.csv", served_run=True)
    rows("summary.csv")
    for name in scored_sets(sdir):
        if name != "test":
            rows(f"external/{name}/summary.csv")
    for name in ("spec.yaml", "report/model_card.md", "report/model_card.json"):
        if storage.exists(storage.join(sdir, name)):
            Path(stage, name).parent.mkdir(parents=True, exist_ok=True)
            Path(stage, name).write_bytes(storage.read_bytes(storage.join(sdir, name)))
    Path(stage, checkpoint).mkdir(parents=True)
    for name in ("model.safetensors", "meta.json"):
        Path(stage, checkpoint, name).write_bytes(storage.read_bytes(storage.join(sdir, checkpoint, name)))


def served_tags(sdir: str, best: dict) -> dict[str, str]:
    """The registered version's tags: how its threshold was chosen, and the served run's metrics
    on the internal test split and on each external set."""
    policy = best["policy"]
    tags = {"arm": best["arm"], "seed": str(best["seed"]), "threshold": f"{best['threshold']:.6g}",
            "policy": policy["policy"] + (f" {policy['target']}" if policy.get("target") is not None else ""),
            "platt": json.dumps(best.get("platt")), "checkpoint": best["checkpoint"]}
    for name, folder in scored_sets(sdir).items():
        table = storage.read_csv(storage.join(folder, "final.csv"))
        row = table[(table["arm"] == best["arm"]) & (table["seed"] == int(best["seed"]))].iloc[0]
        tags |= {f"{name}_{m}": f"{row[m]:.4f}" for m in ("auroc", "accuracy", "sensitivity", "specificity")}
    return tags


# ----------------------------------------------------------------------------- entry points

def start(spec: specs.Spec, sdir: str) -> Tracker | None:
    """The running study's tracker (None: not tracked). A server that cannot be reached leaves the
    study untracked, said once; a missing mlflow package is an error before anything runs."""
    global _active
    uri = tracking_uri(sdir, spec.tracking.mlflow)
    if not uri:
        return None
    tracker = Tracker(spec, sdir, uri, strict=False)
    tracker._guarded(tracker.open, spec.tracking.experiment)
    if tracker.failed:
        tracker.close()
        return None
    print(f"MLflow: {tracker.url}", flush=True)
    _active = tracker
    return tracker


def end(tracker: Tracker) -> None:
    """After the study: its results on the parent run; waits for everything submitted."""
    tracker.submit(tracker.finish)
    tracker.close()
    if not tracker.failed:
        print(f"MLflow: logged {tracker.url}" + _version_text(tracker.version), flush=True)


def _version_text(version) -> str:
    if not version:
        return ""
    mv, new = version
    return f"; model {mv.name} version {mv.version}{'' if new else ' (registered before)'}"


def track(study_dir: str, uri: str | None, experiment: str | None = None) -> str:
    """``cxr-ray track``: upload a finished study from its directory alone; what MLflow already
    holds is not logged again. Returns the summary line."""
    sdir = finished_study(study_dir)
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise TrackingError("give the tracking server: --mlflow URI (or set MLFLOW_TRACKING_URI)")
    spec = specs.validate_text(storage.read_text(storage.join(sdir, "spec.yaml")), sdir)
    tracker = Tracker(spec, sdir, uri, strict=True)
    try:
        tracker.open(experiment)
        tracker.log_phase(SEARCH, storage.read_csv(storage.join(sdir, "trials.csv")),
                          storage.read_csv(storage.join(sdir, "trial_summary.csv")))
        tracker.log_phase(FINAL, storage.read_csv(storage.join(sdir, "final_trials.csv")))
        tracker.finish()
    except Exception as e:
        log.exception("upload failed")
        raise TrackingError(f"MLflow ({uri}): {_why(e)} (details in {tracker.log_file})") from None
    c = tracker.counts
    return (f"{tracker.url}: {len(tracker.children)} trial runs ({c['runs']} new), {c['epochs']} epochs logged, "
            f"{c['artifacts']} study files" + _version_text(tracker.version))


def download_model(model_uri: str, uri: str | None) -> str:
    """A registered version (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``) downloaded through
    MLflow into a new local directory that ``cxr-ray serve`` serves like a study."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise TrackingError(f"{model_uri}: give the tracking server with --mlflow URI (or set MLFLOW_TRACKING_URI)")
    target = tempfile.mkdtemp(prefix="cxr-ray-model-")
    mlflow = _mlflow(os.path.join(target, "tracking.log"))
    # models:/ is resolved through this process's registry URI whatever download_artifacts is given
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI") or uri)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=os.path.join(target, "model"))
    except Exception as e:
        raise TrackingError(f"{model_uri} from {uri}: {_why(e)}") from None
    if not os.path.exists(os.path.join(local, "best.json")):
        raise TrackingError(f"{model_uri}: not a model registered by cxr-ray (no best.json among its files)")
    return local
