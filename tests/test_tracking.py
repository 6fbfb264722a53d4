"""MLflow tracking and the model registry against a real ``mlflow server`` on a loopback port
(SQLite backend, artifacts uploaded and downloaded through the server over HTTP), and Tune's
TensorBoard files.

The end-to-end scenario is one tiny study (32 px, 2 arms x 2 configurations x 2 epochs, one final
seed, a synthetic external site): run with ``--mlflow``, SIGKILLed mid-search, resumed without the
flag (it must continue the same parent run), the MLflow server killed while the final phase runs
(the study must finish, saying once what was not logged), the server restarted and the rest
uploaded with ``cxr-ray track``. Every test then checks the one end state: nothing missing, nothing
logged twice.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests

from conftest import CLI, REPO_ROOT, TINY_SPEC, kill_session, needed
from cxr_ray import runtime, serve_model, spec as specs, tracking
from cxr_ray.study_layout import trial_id_of

SPEC = TINY_SPEC.replace("name: tiny", "name: tracked").replace(
    "samples_per_arm: 3, max_epochs: 3", "samples_per_arm: 2, max_epochs: 2").replace(
    "  weight_decay: {loguniform: [1e-5, 1e-3]}\n", "").replace("seeds: [0, 1]", "seeds: [0]") + """
external:
  - {name: site2, source: synthetic, synthetic_images: 120, synthetic_seed: 5, synthetic_shift: 0.5}
"""
assert "samples_per_arm: 2, max_epochs: 2" in SPEC and "seeds: [0]" in SPEC and "weight_decay" not in SPEC
NOISE = ("View run", "View experiment", "🏃", "🧪", "Retrying", "urllib3", "Downloading artifacts", "Traceback")


# ----------------------------------------------------------------------------- without MLflow

def run_python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})})


def test_an_untracked_study_never_imports_mlflow(tmp_path):
    """Every module a study, the CLI and serving import, and the tracker a study starts with no
    tracking URI anywhere: mlflow stays unimported (it is an optional extra)."""
    out = run_python(f"""
import sys
from cxr_ray import cli, serving, spec, study, tracking
s = spec.validate({{"name": "x", "data": {{"source": "synthetic"}}, "arms": ["resnet18"],
                    "budget": {{"samples_per_arm": 1, "max_epochs": 1}}}})
assert tracking.start(s, {str(tmp_path)!r}) is None
assert len(tracking.tune_callbacks({str(tmp_path)!r}, "search", {{}})) == 2
print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))
""", env={"MLFLOW_TRACKING_URI": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_tracking_without_the_mlflow_package_is_a_one_line_error(tmp_path):
    """Asked for (``--mlflow``) but not installed: exit 2 naming the extra, before any training."""
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC)
    out = run_python(f"""
import sys
sys.modules["mlflow"] = None  # as if the package were not installed: importing it raises ImportError
from cxr_ray import cli
cli.main(["study", "run", {str(spec)!r}, "--out", {str(tmp_path / "study")!r}, "--mlflow", "http://127.0.0.1:9"])
""", env={"CXR_RAY_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().splitlines()[-1] == ("error: MLflow tracking needs the mlflow package: "
                                                   "pip install 'cxr-ray[mlflow]'")
    assert not (tmp_path / "study" / "search").exists()


def test_tracking_section_is_validated_and_no_part_of_the_study():
    base = specs.yaml_load(SPEC)
    plain = specs.validate(dict(base))
    tracked = specs.validate(base | {"tracking": {"mlflow": "http://mlflow:5000", "experiment": "cxr"}})
    assert tracked.tracking == specs.Tracking("http://mlflow:5000", "cxr")
    # where a study is logged changes neither its hash nor its spec.yaml: resuming elsewhere is the same study
    assert tracked.hash == plain.hash and specs.dump(tracked) == specs.dump(plain)
    with pytest.raises(specs.SpecError, match="unknown key tracking.uri"):
        specs.validate(base | {"tracking": {"uri": "http://x"}}, "s.yaml")
    with pytest.raises(specs.SpecError, match="tracking.mlflow: expected str or null, got int 5000"):
        specs.validate(base | {"tracking": {"mlflow": 5000}}, "s.yaml")


def test_data_fingerprint_follows_the_images_labels_and_split(fake_study_dir, tmp_path):
    sdir = tmp_path / "fake"
    shutil.copytree(fake_study_dir, sdir)
    split = pd.read_csv(sdir / "split.csv")
    first = tracking.data_fingerprint(str(sdir))
    shuffled = split.sample(frac=1, random_state=0).assign(item="elsewhere/" + split["item"])
    shuffled.to_csv(sdir / "split.csv", index=False)
    assert tracking.data_fingerprint(str(sdir)) == first  # the same images by content: row order and paths aside
    moved = split.copy()
    moved.loc[moved["split"] == "val", "split"] = "train"
    moved.loc[moved.index[0], "split"] = "val"
    moved.to_csv(sdir / "split.csv", index=False)
    assert tracking.data_fingerprint(str(sdir)) != first


def history(epochs: int) -> pd.DataFrame:
    """A run's metrics.csv as the training loop writes it (the columns the event file reads)."""
    return pd.DataFrame({"epoch": range(1, epochs + 1), "train_loss": [0.7 - 0.1 * e for e in range(epochs)],
                         "val_auroc": [0.6 + 0.05 * e for e in range(epochs)], "epoch_time_s": 4.0,
                         "finished_at": [1.8e9 + 5 * e for e in range(epochs)], "started_at_epoch": 0,
                         "pid": 4242, "engine": "tune", "checkpoint": "runs/t/checkpoint_000001"})


def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    points = []
    for events_file in sorted(folder.glob("events.out.tfevents.*")):
        events = EventAccumulator(str(events_file))
        events.Reload()
        if tag in events.Tags()["scalars"]:
            points += [(e.step, round(e.value, 6)) for e in events.Scalars(tag)]
    return sorted(points)


def test_tensorboard_file_is_the_record_stepped_by_epoch_and_only_grows(tmp_path):
    """The event file holds each epoch of the record once, with the epoch as the step; a later epoch
    is appended (TensorBoard follows appends), the same record again changes nothing, and a file cut
    short by a kill is written anew."""
    tracking.write_events(str(tmp_path), history(2))
    (first,) = tmp_path.glob("events.out.tfevents.*")
    two = first.read_bytes()
    tracking.write_events(str(tmp_path), history(3))
    three = first.read_bytes()
    assert three.startswith(two) and len(three) > len(two)
    tracking.write_events(str(tmp_path), history(3))
    assert first.read_bytes() == three
    assert scalars(tmp_path, "val_auroc") == [(1, 0.6), (2, 0.65), (3, 0.7)]
    assert scalars(tmp_path, "train_loss") == [(1, 0.7), (2, 0.6), (3, 0.5)]
    assert scalars(tmp_path, "pid") == scalars(tmp_path, "started_at_epoch") == []  # where it ran: no metric
    first.write_bytes(three[:-7])  # the last event cut short
    tracking.write_events(str(tmp_path), history(3))
    assert first.read_bytes() == three and list(tmp_path.iterdir()) == [first]


# ----------------------------------------------------------------------------- a real MLflow server

@dataclass
class Server:
    """``mlflow server`` on a loopback port, SQLite backend, artifacts proxied through the server
    (clients upload and download them over HTTP, as with a remote server); restartable on the same
    store and port; stopped by its process group."""
    root: Path
    port: int
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = REPO_ROOT / ".venv" / "bin" / "mlflow"
        exe = str(exe) if exe.exists() else shutil.which("mlflow")
        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(
            [exe, "server", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db", "--artifacts-destination",
             str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
        deadline = time.time() + 300
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                if requests.get(f"{self.url}/health", timeout=5).text == "OK":
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        pytest.fail("mlflow server never answered /health:\n" + (self.root / "server.log").read_text()[-3000:])

    def stop(self) -> None:
        kill_session(self.proc.pid)
        self.proc.wait(timeout=60)

    def get(self, endpoint: str, **params) -> dict:
        r = requests.get(f"{self.url}/api/2.0/mlflow/{endpoint}", params=params, timeout=60)
        assert r.ok, r.text
        return r.json()

    def post(self, endpoint: str, body: dict) -> dict:
        r = requests.post(f"{self.url}/api/2.0/mlflow/{endpoint}", json=body, timeout=60)
        assert r.ok, r.text
        return r.json()

    def runs(self, experiment_id: str) -> list[dict]:
        return self.post("runs/search", {"experiment_ids": [experiment_id], "max_results": 1000}).get("runs", [])

    def history(self, run_id: str, key: str) -> list[dict]:
        return self.get("metrics/get-history", run_id=run_id, metric_key=key, max_results=10000).get("metrics", [])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    try:
        import mlflow  # noqa: F401
    except ImportError:
        needed("mlflow is not installed (pip install -e '.[test]' installs it)")
    s = Server(tmp_path_factory.mktemp("mlflow"), runtime.free_port())
    s.start()
    yield s
    if s.proc.poll() is None:
        s.stop()


def tags(run: dict) -> dict:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def params(run: dict) -> dict:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def metrics(run: dict) -> dict:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def artifact_paths(server: Server, run_id: str, path: str = "") -> set[str]:
    found = set()
    for f in server.get("artifacts/list", run_id=run_id, path=path).get("files", []):
        found |= artifact_paths(server, run_id, f["path"]) if f["is_dir"] else {f["path"]}
    return found


# ----------------------------------------------------------------------------- the tracked study

def history_rows(study: Path) -> dict[str, pd.DataFrame]:
    return {p.parent.name: pd.read_csv(p) for p in study.glob("runs/*/metrics.csv")}


def wait_for(condition, timeout: float, what: str, details) -> None:
    """Poll ``condition`` until it holds; after ``timeout`` seconds fail with ``details()`` (a log's tail)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    pytest.fail(f"{what} never happened:\n" + details()[-4000:])


def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=30).status_code == 200
    except (requests.ConnectionError, requests.Timeout):
        return False


@dataclass
class Tracked:
    study: Path
    server: Server
    experiment_id: str
    parent_before_kill: str
    epochs_before_kill: dict  # trial id -> epochs MLflow held at the SIGKILL
    run_log: str  # console of the first, killed run
    resume_log: str  # console of the resumed run, during which the server went down
    track_out: str  # cxr-ray track's output


@pytest.fixture(scope="module")
def tracked(server, tmp_path_factory, study_env) -> Tracked:
    root = tmp_path_factory.mktemp("tracked")
    (root / "tracked.yaml").write_text(SPEC)
    study, log_path = root / "tracked", root / "run.log"
    env = {**study_env, "MLFLOW_TRACKING_URI": ""}

    # 1. run with --mlflow; SIGKILL once a search trial has ended and MLflow holds some epochs
    with open(log_path, "w") as log:
        driver = subprocess.Popen(CLI + ["study", "run", str(root / "tracked.yaml"), "--out", str(study),
                                         "--no-report", "--mlflow", server.url], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def killable():
            assert driver.poll() is None, log_path.read_text()[-3000:]
            state = study / "tracking.json"
            done = [t for t, h in history_rows(study).items() if len(h) and h["epoch"].max() >= 2]
            if not state.exists() or not done:
                return False
            record = json.loads(state.read_text())[server.url]
            children = [r for r in server.runs(record["experiment_id"]) if tags(r).get("mlflow.parentRunId")]
            return any("epoch" in metrics(r) for r in children)
        wait_for(killable, 600, "a search trial ending with its epochs in MLflow", log_path.read_text)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        kill_session(driver.pid)
    record = json.loads((study / "tracking.json").read_text())[server.url]
    before = {tags(r)["trial_id"]: int(metrics(r).get("epoch", 0)) for r in server.runs(record["experiment_id"])
              if "trial_id" in tags(r)}
    run_log = log_path.read_text()

    # 2. resume without --mlflow (tracking.json says where); the server goes down in the final phase
    resume_path = root / "resume.log"
    with open(resume_path, "w") as log:
        resumed = subprocess.Popen(CLI + ["study", "resume", str(study)], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: (study / "final").exists() or resumed.poll() is not None, 900, "the final phase",
                 resume_path.read_text)
        server.stop()
        rc = resumed.wait(timeout=900)
    finally:
        kill_session(resumed.pid)
    resume_log = resume_path.read_text()
    assert rc == 0, resume_log[-5000:]

    # 3. the server back on the same store; the rest uploaded from the study directory
    server.start()
    out = subprocess.run(CLI + ["track", str(study), "--mlflow", server.url], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return Tracked(study, server, record["experiment_id"], record["run_id"], before, run_log, resume_log,
                   out.stdout + out.stderr)


def study_runs(t: Tracked) -> tuple[dict, list[dict]]:
    runs = t.server.runs(t.experiment_id)
    parents = [r for r in runs if "mlflow.parentRunId" not in tags(r)]
    assert len(parents) == 1, [tags(r).get("mlflow.runName") for r in parents]
    return parents[0], [r for r in runs if tags(r).get("mlflow.parentRunId") == parents[0]["info"]["run_id"]]


@pytest.mark.e2e
def test_one_parent_run_continued_through_kill_resume_and_upload(tracked):
    parent, children = study_runs(tracked)
    assert parent["info"]["run_id"] == tracked.parent_before_kill
    assert parent["info"]["status"] == "FINISHED"
    t = tags(parent)
    spec = specs.validate_text((tracked.study / "spec.yaml").read_text(), "spec.yaml")
    assert t["spec_hash"] == spec.hash and t["study"] == "tracked" and t["engine"] == "tune"
    assert t["data_fingerprint"] == tracking.data_fingerprint(str(tracked.study))
    assert params(parent) == tracking.spec_params(spec)
    assert params(parent)["budget.max_epochs"] == "2" and json.loads(params(parent)["arms"])[0]["name"] == "lcnet_050"
    best = json.loads((tracked.study / "best.json").read_text())
    assert t["verdict"] == best["verdict"] and best["verdict"] in t["mlflow.note.content"]
    # every planned trial once: 2 arms x 2 configurations in the search, 2 arms x 1 seed in the final phase
    ids = [tags(c)["trial_id"] for c in children]
    assert len(ids) == len(set(ids)) == 6
    search = {trial_id_of(p.name) for p in (tracked.study / "search").iterdir() if p.is_dir()}
    final = {trial_id_of(p.name) for p in (tracked.study / "final").iterdir() if p.is_dir()}
    assert set(ids) == search | final
    assert all(tags(c)["phase"] == ("search" if tags(c)["trial_id"] in search else "final") for c in children)
    assert all(c["info"]["status"] == "FINISHED" for c in children)


@pytest.mark.e2e
def test_each_epoch_logged_once_with_the_epoch_as_step(tracked):
    """The children MLflow held at the kill kept their epochs and got the rest; every epoch of every
    run's own record is in MLflow exactly once, with its values."""
    _, children = study_runs(tracked)
    assert any(tracked.epochs_before_kill.values())  # logged live before the kill
    for child in children:
        tid = tags(child)["trial_id"]
        record = pd.read_csv(tracked.study / "runs" / tid / "metrics.csv")
        for key in ("val_auroc", "train_loss", "epoch"):
            points = tracked.server.history(child["info"]["run_id"], key)
            expected = record.dropna(subset=[key])  # an empty value (NaN) is no point
            assert [p["step"] for p in points] == expected["epoch"].tolist(), (tid, key, points)
            assert [p["value"] for p in points] == pytest.approx(expected[key].tolist(), abs=1e-12)
        assert tags(child)["engine"] == record["engine"].iloc[-1] == "tune"
        # the run began when its first epoch did (MLflow's own clock would say when it was logged)
        assert int(child["info"]["start_time"]) == int((record["finished_at"] - record["epoch_time_s"]).min() * 1000)


@pytest.mark.e2e
def test_children_carry_their_configuration_and_outcome(tracked):
    _, children = study_runs(tracked)
    summary = pd.read_csv(tracked.study / "trial_summary.csv").set_index("trial_id")
    final = pd.read_csv(tracked.study / "final.csv")
    for child in children:
        t, p = tags(child), params(child)
        if t["phase"] == "search":
            row = summary.loc[t["trial_id"]]
            assert t["outcome"] == row["outcome"]
            assert {k: v for k, v in p.items() if k != "lr"} == {"arm": row["arm"], "config_id": str(row["config_id"]),
                                                                 "seed": str(row["seed"])}
            assert float(p["lr"]) == pytest.approx(row["hp_lr"], rel=1e-12)
            assert t["mlflow.runName"] == f"{row['arm']}-c{row['config_id']}-s{row['seed']}"
        else:
            assert t["outcome"] == "completed" and t["mlflow.runName"] == f"{t['arm']}-s0"
            row = final[(final["arm"] == t["arm"]) & (final["seed"] == 0)].iloc[0]
            m = metrics(child)
            assert m["test/auroc"] == pytest.approx(row["auroc"])
            assert m["test/threshold"] == pytest.approx(row["threshold"])
            ext = pd.read_csv(tracked.study / "external" / "site2" / "final.csv")
            assert m["site2/auroc"] == pytest.approx(ext[ext["arm"] == t["arm"]].iloc[0]["auroc"])
    assert {tags(c)["outcome"] for c in children if tags(c)["phase"] == "search"} >= {"completed"}


@pytest.mark.e2e
def test_parent_holds_final_metrics_with_cis_budget_and_the_study_files(tracked):
    parent, _ = study_runs(tracked)
    m = metrics(parent)
    summary = pd.read_csv(tracked.study / "summary.csv")
    for row in summary.to_dict("records"):
        for key in ("auroc", "auroc_ci_low", "auroc_ci_high", "accuracy_ci_high"):
            assert m[f"test/{row['arm']}/{key}"] == pytest.approx(row[key])
    site2 = pd.read_csv(tracked.study / "external" / "site2" / "summary.csv")
    assert m[f"site2/{site2.iloc[0]['arm']}/auroc_ci_low"] == pytest.approx(site2.iloc[0]["auroc_ci_low"])
    budget = pd.read_csv(tracked.study / "budget.csv")
    assert [m[f"budget/{r['arm']}/epochs"] for r in budget.to_dict("records")] == budget["epochs"].tolist()
    for key in m:  # summary metrics logged once, even though the study's end was reached twice (resume, track)
        assert len(tracked.server.history(parent["info"]["run_id"], key)) == 1, key
    files = artifact_paths(tracked.server, parent["info"]["run_id"])
    assert {"spec.yaml", "summary.csv", "final.csv", "trials.csv", "best.json", "budget.csv", "report/index.html",
            "report/report.md", "external/site2/summary.csv", "external/site2/verdict.json"} <= files
    assert not any(f.startswith(("runs/", "search/", "final/")) or f.endswith(".log") or f == "tracking.json"
                   for f in files)


@pytest.mark.e2e
def test_the_served_model_is_a_registered_version_with_its_operating_point(tracked):
    parent, _ = study_runs(tracked)
    found = tracked.server.get("model-versions/search", filter="name='tracked'")["model_versions"]
    assert len(found) == 1 and found[0]["version"] == "1" and found[0]["run_id"] == parent["info"]["run_id"]
    t = {x["key"]: x["value"] for x in found[0]["tags"]}
    best = json.loads((tracked.study / "best.json").read_text())
    final = pd.read_csv(tracked.study / "final.csv")
    served = final[(final["arm"] == best["arm"]) & (final["seed"] == best["seed"])].iloc[0]
    assert float(t["threshold"]) == pytest.approx(best["threshold"], rel=1e-5)
    assert t["policy"] == "youden" and t["arm"] == best["arm"] and t["seed"] == str(best["seed"])
    assert float(t["test_auroc"]) == pytest.approx(served["auroc"], abs=1e-4)
    assert "site2_auroc" in t and t["spec_hash"] == tags(parent)["spec_hash"]


@pytest.mark.e2e
def test_a_down_server_never_failed_the_study_and_was_said_once(tracked):
    assert "MLflow: http://127.0.0.1" in tracked.run_log  # the parent run's address, printed once at the start
    messages = [line for line in tracked.resume_log.splitlines() if "Nothing more of this study is logged" in line]
    assert len(messages) == 1, tracked.resume_log[-3000:]
    assert f"cxr-ray track {tracked.study} --mlflow {tracked.server.url}" in messages[0]
    assert (tracked.study / "study.json").exists() and (tracked.study / "report" / "index.html").exists()
    for text in (tracked.run_log, tracked.resume_log, tracked.track_out):  # MLflow's own chatter went to the log
        assert not any(word in text for word in NOISE), text[-3000:]
    assert "Retrying" in (tracked.study / "tracking.log").read_text()


@pytest.mark.e2e
def test_uploading_again_logs_nothing_twice(tracked, study_env):
    parent, children = study_runs(tracked)
    before = {c["info"]["run_id"]: len(tracked.server.history(c["info"]["run_id"], "val_auroc")) for c in children}
    out = subprocess.run(CLI + ["track", str(tracked.study), "--mlflow", tracked.server.url], env=study_env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "6 trial runs (0 new), 0 epochs logged" in out.stdout and "version 1 (registered before)" in out.stdout
    _, again = study_runs(tracked)
    assert {c["info"]["run_id"]: len(tracked.server.history(c["info"]["run_id"], "val_auroc")) for c in again} == before
    assert len(tracked.server.get("model-versions/search", filter="name='tracked'")["model_versions"]) == 1


@pytest.mark.e2e
def test_tensorboard_files_hold_each_epoch_once_at_its_step_after_the_resume(tracked):
    """Every trial's event files, whichever process wrote them (killed or resumed), hold each epoch
    of its record once at its epoch, and nothing else Tune would have written."""
    for phase in ("search", "final"):
        for trial_dir in (p for p in (tracked.study / phase).iterdir() if p.is_dir()):
            record = pd.read_csv(tracked.study / "runs" / trial_id_of(trial_dir.name) / "metrics.csv")
            points, expected = scalars(trial_dir, "train_loss"), record.dropna(subset=["train_loss"])
            assert [s for s, _ in points] == expected["epoch"].tolist(), trial_dir.name
            assert [v for _, v in points] == pytest.approx(expected["train_loss"].tolist(), rel=1e-6, abs=1e-5)  # float32 events
            assert scalars(trial_dir, "ray/tune/val_auroc") == []


@pytest.mark.e2e
def test_serve_a_registered_version_over_http(tracked, study_env, tmp_path):
    """``cxr-ray serve models:/tracked/1`` downloads the version through MLflow and serves what
    serving the study directory serves: the same model, threshold and metrics."""
    import torch
    from PIL import Image

    from cxr_ray import data, models, serving, synthetic
    port = str(runtime.free_port())
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(CLI + ["serve", "models:/tracked/1", "--mlflow", tracked.server.url, "--port", port],
                                env=study_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is None and answers(f"http://127.0.0.1:{port}/healthz"), 300,
                 "cxr-ray serve answering /healthz", log.read_text)
        info = requests.get(f"http://127.0.0.1:{port}/v1/model", timeout=30).json()
        choice = serve_model.choose_model(str(tracked.study))
        assert {k: info["model"][k] for k in choice.identity} == choice.identity
        assert info["threshold"] == pytest.approx(choice.threshold)
        assert info["operating_point"]["policy"] == choice.operating_point["policy"] == "youden"
        assert info["test_metrics"] == pytest.approx(choice.test_metrics)
        assert info["external_metrics"]["site2"] == pytest.approx(choice.external_metrics["site2"])
        image = tmp_path / "film.png"
        Image.fromarray(synthetic.render(synthetic.listing(4, seed=9)[1], 9, 80)[:64]).save(image)
        answer = requests.post(f"http://127.0.0.1:{port}/v1/predict", data=image.read_bytes(),
                               headers={"content-type": "image/png"}, timeout=60).json()
        model, meta = models.load_checkpoint(tracked.study / choice.identity["checkpoint"])
        pixels = data._decode_file((str(image), meta["image_size"]))[0]  # the cache's own worker function
        offline = float(models.predict(model, pixels[None], np.array([0]), (meta["mean"], meta["std"]),
                                       torch.device("cpu"))[0])
        assert answer["probability"] == pytest.approx(offline, abs=1e-5)
    finally:
        kill_session(proc.pid)


@pytest.mark.e2e
def test_serving_an_unknown_version_is_a_one_line_error(tracked, study_env):
    out = subprocess.run(CLI + ["serve", "models:/tracked/7", "--mlflow", tracked.server.url], env=study_env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and not out.stdout
    assert out.stderr.startswith("error: models:/tracked/7 from http://127.0.0.1") and "not found" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
