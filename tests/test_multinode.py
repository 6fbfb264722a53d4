"""Two Ray nodes on this machine: a study submitted through the Jobs API runs its trials on the
worker node, the worker node is killed mid-trial, a replacement joins, and the study finishes,
on both trial engines (the loop in the Tune trial, or a Ray Train run per trial).

The head and both worker nodes are started by this test (`ray start --block` in sessions of their
own, private ports and temp dir) and only they are stopped: never `ray stop`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import CLI, kill_session
from cxr_ray import training
from cxr_ray.runtime import free_port

pytestmark = pytest.mark.e2e
BIN = Path(CLI[0]).parent if os.path.isabs(CLI[0]) else None
EPOCHS = 4
SPEC = f"""
name: multinode
seed: 0
data: {{source: synthetic, image_size: 32, synthetic_images: 600}}
arms: [lcnet_050, mobilenetv3_small_050]
search_space:
  lr: {{loguniform: [1e-3, 1e-2]}}
fixed: {{batch_size: 32}}
budget: {{samples_per_arm: 1, max_epochs: {EPOCHS}, grace_period: 1, reduction_factor: 2}}
resources: {{workers_per_trial: 1, cpus_per_worker: 1, max_concurrent_trials: 2, worker_resources: {{trainer: 1}},
            engine: ENGINE}}
final: {{seeds: [0], bootstrap: 100}}
"""


def ray_cmd(*args) -> list[str]:
    return [str(BIN / "ray") if BIN else "ray", *args]


class Cluster:
    def __init__(self, root: Path, env: dict):
        self.root, self.gcs_port, self.dash_port = root, free_port(), free_port()
        self.env = env | {"RAY_AUTH_MODE": "token",  # the cluster keeps token auth on
                          "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{self.dash_port}",
                          "PATH": f"{BIN}:{env['PATH']}" if BIN else env["PATH"]}
        self.sessions: list[int] = []
        # Ray's unix sockets live under the temp dir and their paths must stay under 108 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="cxr-", dir="/tmp")

    def start(self, *args, log: str) -> int:
        proc = subprocess.Popen(ray_cmd("start", "--block", "--disable-usage-stats", *args), env=self.env,
                                stdout=open(self.root / log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.sessions.append(proc.pid)
        return proc.pid

    def start_head(self) -> None:
        self.start("--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={self.dash_port}", "--num-cpus=1", f"--temp-dir={self.temp_dir}",
                   log="head.log")
        self.wait_nodes(1)

    def start_worker(self, log: str) -> int:
        pid = self.start(f"--address=127.0.0.1:{self.gcs_port}", "--num-cpus=2", '--resources={"trainer": 2}',
                         log=log)
        return pid

    def nodes(self) -> list[dict]:
        code = ("import json, ray; ray.init(address='auto', logging_level='ERROR'); "
                "print('NODES', json.dumps([{'id': n['NodeID'], 'alive': n['Alive'], "
                "'trainer': n['Resources'].get('trainer', 0)} for n in ray.nodes()]))")
        out = subprocess.run([str(BIN / "python") if BIN else "python", "-c", code], capture_output=True, text=True,
                             env=self.env | {"RAY_ADDRESS": f"127.0.0.1:{self.gcs_port}"}, timeout=120)
        found = [line[6:] for line in out.stdout.splitlines() if line.startswith("NODES ")]  # Ray prints too
        return json.loads(found[-1]) if found else []

    def wait_nodes(self, alive: int, trainers: int | None = None, timeout: float = 120) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            nodes = [n for n in self.nodes() if n["alive"]]
            if len(nodes) == alive and (trainers is None or sum(n["trainer"] > 0 for n in nodes) == trainers):
                return nodes
            time.sleep(1)
        raise AssertionError(f"cluster never reached {alive} alive nodes: {self.nodes()}")

    def job(self, command: str, *args, timeout=300) -> str:
        """`ray job ...` against this cluster; stdout and stderr (the CLI logs its status there).
        Retried while the head's job agent is still starting ("try again later")."""
        deadline = time.time() + 90
        while True:
            out = subprocess.run(ray_cmd("job", command, "--address", f"http://127.0.0.1:{self.dash_port}", *args),
                                 env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 timeout=timeout)
            if out.returncode == 0 or command == "status":
                return out.stdout
            assert "try again later" in out.stdout and time.time() < deadline, out.stdout[-3000:]
            time.sleep(2)

    def stop(self) -> None:
        for sid in reversed(self.sessions):
            kill_session(sid)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, study_env):
    c = Cluster(tmp_path_factory.mktemp("cluster"), study_env)
    try:
        c.start_head()
        yield c
    finally:
        c.stop()


def search_in_progress(study: Path) -> bool:
    """A search trial has committed a checkpoint for some but not all epochs (on the shared storage,
    before the epoch is reported)."""
    if (study / "trials.csv").exists():
        return False
    return any(1 <= epoch < EPOCHS for run in study.glob("runs/*") for epoch in training.checkpoints(str(run)))


@pytest.mark.parametrize("engine", ["tune", "train"])
def test_study_runs_on_the_worker_node_and_survives_losing_it(cluster, tmp_path, engine):
    head = cluster.wait_nodes(1)[0]["id"]
    first = cluster.start_worker(f"{engine}-worker1.log")
    nodes = cluster.wait_nodes(2, trainers=1)
    worker1 = next(n["id"] for n in nodes if n["id"] != head)
    spec, storage = tmp_path / "multinode.yaml", tmp_path / "shared"
    spec.write_text(SPEC.replace("ENGINE", engine))
    submitted = cluster.job("submit", "--no-wait", "--", CLI[0], "study", "run", str(spec), "--storage",
                            str(storage), "--no-report")
    job_id = next(w.strip("'") for w in submitted.split() if w.strip("'").startswith("raysubmit_"))
    study = storage / "multinode"

    # Kill the worker node while a search trial is part-way through its epochs.
    deadline = time.time() + 400
    while time.time() < deadline and not search_in_progress(study):
        time.sleep(0.1)
    assert search_in_progress(study), cluster.job("logs", job_id)[-3000:]
    kill_session(first)
    cluster.wait_nodes(1)  # the head notices the lost node
    second = cluster.start_worker(f"{engine}-worker2.log")
    try:
        nodes = cluster.wait_nodes(2, trainers=1)
        worker2 = next(n["id"] for n in nodes if n["id"] != head)
        assert worker2 != worker1

        deadline = time.time() + 600
        while time.time() < deadline:
            state = cluster.job("status", job_id).lower()  # "... RUNNING" or "Job '...' succeeded"
            if any(s in state for s in ("succeeded", "failed", "stopped")):
                break
            time.sleep(3)
        logs = cluster.job("logs", job_id)
    finally:  # the next test starts from the head alone
        kill_session(second)
        cluster.wait_nodes(1)
    assert "succeeded" in state, logs[-5000:]

    trials = pd.concat([pd.read_csv(study / "trials.csv"), pd.read_csv(study / "final_trials.csv")])
    assert set(trials["node_id"]) <= {worker1, worker2} and head not in set(trials["node_id"])
    assert worker2 in set(trials["node_id"])  # the replacement node took over
    search = pd.read_csv(study / "trials.csv")
    for tid, g in search.groupby("trial_id"):
        assert sorted(g["epoch"]) == list(range(1, EPOCHS + 1)), f"{tid}: {list(g['epoch'])}"
    # At least one trial ran on both nodes: started on the killed node, finished on its replacement
    # from its last checkpoint (its epochs are not repeated).
    moved = [tid for tid, g in search.groupby("trial_id") if set(g["node_id"]) == {worker1, worker2}]
    assert moved, search[["trial_id", "epoch", "node_id"]].to_string()
    # The final run with seed 0 repeats the search run of the same configuration and seed: an
    # interrupted-and-resumed trial must have followed exactly the uninterrupted trajectory.
    final = pd.read_csv(study / "final_trials.csv")
    for arm in search["arm"].unique():
        resumed = search[search["arm"] == arm].sort_values("epoch")["val_auroc"].to_numpy()
        uninterrupted = final[final["arm"] == arm].sort_values("epoch")["val_auroc"].to_numpy()
        assert resumed == pytest.approx(uninterrupted, abs=1e-6), arm
    for name in ("summary.csv", "comparison.csv", "best.json", "budget.csv"):
        assert (study / name).exists(), name

    status = subprocess.run(CLI + ["study", "status", str(study)], capture_output=True, text=True, timeout=120,
                            env=cluster.env)
    assert status.returncode == 0 and "final evaluation" in status.stdout
