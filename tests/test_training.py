"""Ray Train fine-tuning on local Ray: DDP on CPU (gloo), the run's record (history and checkpoints),
the dashboard's Train view and Prometheus gauges, a crashed worker, a killed `cxr-ray train`."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import CLI, dashboard_get, kill_session, scrape_metrics
from cxr_ray import config, data, metrics, models, runtime, training

pytestmark = pytest.mark.e2e
SIZE = 32


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return data.prepare("synthetic", None, SIZE, None, synthetic_images=240, cache_root=tmp_path_factory.mktemp("c"),
                        progress=False)


def train_config(**kw) -> config.TrainConfig:
    return config.TrainConfig(**({"backbone": "lcnet_050", "image_size": SIZE, "epochs": 2, "batch_size": 32,
                                  "lr": 3e-3} | kw))


def read_log(path) -> pd.DataFrame:
    return pd.read_csv(path) if os.path.exists(path) else pd.DataFrame(columns=["epoch"])


def test_ddp_run_records_every_epoch_and_its_checkpoint_reproduces_val_auroc(prepared, local_ray, tmp_path):
    ref = runtime.put_data(prepared)
    run_dir = tmp_path / "ddp"
    scraped, done = [], threading.Event()
    gauges = ("ray_cxr_ray_train_images_per_second{", "ray_cxr_ray_trial_epoch{", "ray_cxr_ray_trial_metric{")
    scraper = threading.Thread(target=scrape_metrics, args=(gauges, scraped, done))
    scraper.start()
    try:
        result = training.fit(train_config(), ref, name="ddp", storage_path=str(tmp_path), workers=2)
    finally:
        done.set()
        scraper.join()
    assert result.error is None
    # Rank 0's gauges reached the metrics-export port (what Grafana and Prometheus scrape), tagged by run.
    for gauge in gauges:
        assert any(ln.startswith(gauge) and 'trial="ddp"' in ln and float(ln.rsplit(" ", 1)[1]) > 0
                   for ln in scraped), (gauge, scraped)
    assert any('metric="val_auroc"' in ln for ln in scraped)
    # The dashboard's Train view lists the run (Ray keeps it empty unless state tracking is on).
    runs = dashboard_get(local_ray, "/api/train/v2/runs/v1").json()["train_runs"]  # the Train V2 view
    assert any(r["name"] == "ddp" and r["status"] == "FINISHED" for r in runs), [(r["name"], r["status"])
                                                                                for r in runs]

    rows = read_log(run_dir / "metrics.csv")
    assert rows["epoch"].tolist() == [1, 2] and set(rows["engine"]) == {"train"}
    for key in ("train_loss", "val_loss", "val_auroc", "val_sensitivity", "val_specificity", "val_f1",
                "val_accuracy_youden", "val_f1_youden", "threshold", "images_per_s", "data_wait_fraction"):
        assert rows[key].notna().all(), key
    # One checkpoint per epoch at a path known before the epoch was reported; the newest two are kept.
    saved = training.checkpoints(str(run_dir))
    assert sorted(saved) == [1, 2] and rows["checkpoint"].tolist() == [saved[1], saved[2]]
    # The checkpoint loads into a fresh model and reproduces the reported validation AUROC on the
    # FULL validation split (each worker scored half of it; the report gathers both halves).
    model, meta = models.load_checkpoint(saved[2])
    val = prepared.rows["val"]
    probs = models.predict(model, prepared.cache.images, val, (meta["mean"], meta["std"]), torch.device("cpu"))
    y = prepared.cache.index["label"].to_numpy()[val]
    on_disk = np.load(os.path.join(saved[2], "val_probabilities.npy"))
    np.testing.assert_allclose(probs, on_disk, atol=1e-5)  # float noise from other batch shapes only
    assert metrics.auroc(y, on_disk) == pytest.approx(rows["val_auroc"].iloc[-1], abs=1e-9)
    assert meta["epoch"] == 2 and meta["image_size"] == SIZE and meta["threshold"] == rows["threshold"].iloc[-1]
    assert sorted(os.listdir(saved[2])) == ["meta.json", "model.safetensors", "train_state.pt",
                                            "val_probabilities.npy"]

    # Launching the finished run again trains nothing and reports its last epoch once more (what a
    # resumed study needs when its driver died after the run's last checkpoint).
    again = training.fit(train_config(), ref, name="ddp", storage_path=str(tmp_path), workers=2)
    assert again.metrics["epoch"] == 2 and again.metrics["started_at_epoch"] == 2
    assert training.checkpoints(str(run_dir)) == saved  # nothing new written
    pd.testing.assert_frame_equal(read_log(run_dir / "metrics.csv"), rows)  # the history is untouched


def test_crashed_worker_is_restarted_from_the_last_checkpoint(prepared, local_ray, tmp_path):
    """Train's FailureConfig: kill the Train worker process mid-run; the run continues from its checkpoint."""
    from ray.util.state import list_actors
    ref = runtime.put_data(prepared)
    log = tmp_path / "crash" / "metrics.csv"
    box = {}
    thread = threading.Thread(target=lambda: box.update(result=training.fit(
        train_config(epochs=6, augment="none"), ref, name="crash", storage_path=str(tmp_path), workers=1,
        max_failures=2)))
    thread.start()
    deadline = time.time() + 180
    while len(read_log(log)) < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert len(read_log(log)) >= 2, "the run never reached epoch 2"
    worker = [a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]
    assert len(worker) == 1
    os.kill(worker[0].pid, signal.SIGKILL)
    thread.join(timeout=300)
    history = read_log(log)
    assert history["epoch"].tolist() == [1, 2, 3, 4, 5, 6] and box["result"].error is None
    # The replacement worker group continued from the last checkpoint Train had registered, not from 0:
    # epoch 1's at least (epoch 2's record can land before its checkpoint is registered, seen in CI).
    assert history["started_at_epoch"].iloc[0] == 0 and history["started_at_epoch"].iloc[-1] >= 1
    assert history["pid"].nunique() == 2  # two worker processes wrote the record
    assert sorted(training.checkpoints(str(tmp_path / "crash"))) == [5, 6]  # the newest two are kept


def test_killed_train_command_resumes_at_the_next_epoch(tmp_path, study_env):
    out = tmp_path / "runs"
    cmd = CLI + ["train", "--backbone", "lcnet_050", "--size", str(SIZE), "--epochs", "4", "--workers", "1",
                 "--synthetic-images", "240", "--set", "batch_size=32", "--out", str(out), "--name", "r"]
    log = out / "r" / "metrics.csv"
    first = subprocess.Popen(cmd, env=study_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.time() + 240
        while len(read_log(log)) < 2 and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert read_log(log)["epoch"].tolist()[:2] == [1, 2]
    finally:
        kill_session(first.pid)
    done = len(read_log(log))
    assert done < 4, "finished before it could be killed"
    second = subprocess.run(cmd, env=study_env, capture_output=True, text=True, timeout=300,
                            start_new_session=True)
    assert second.returncode == 0, second.stderr[-3000:]
    history = read_log(log)
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    # Resumed from the newest checkpoint: epoch `done`'s, or the one before when the kill fell between
    # the epoch's history row and its checkpoint (the row is written first, then replaced on retraining).
    assert set(history["started_at_epoch"].iloc[done:]) <= {done - 1, done}
    printed = [ln for ln in second.stdout.splitlines() if " epoch " in ln]
    assert [ln.split(" epoch ")[1].split("/")[0].strip() for ln in printed] == [str(e) for e in range(done + 1, 5)]
    assert "last checkpoint:" in second.stdout and "checkpoint_000004" in second.stdout
