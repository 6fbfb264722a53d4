"""Ray Train fine-tuning on local Ray: DDP on CPU (gloo), checkpoints, worker crash, kill and resume."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import numpy as np
import pandas as pd
import pytest
import ray

from conftest import CLI, kill_session
from cxr_ray import config, data, metrics, models, runtime, training

pytestmark = pytest.mark.e2e
SIZE = 32


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return data.prepare("synthetic", None, SIZE, None, synthetic_images=240, cache_root=tmp_path_factory.mktemp("c"),
                        progress=False)


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    runtime.connect(num_cpus=2, quiet=True)
    yield
    if started:
        ray.shutdown()


def train_config(**kw) -> config.TrainConfig:
    return config.TrainConfig(**({"backbone": "lcnet_050", "image_size": SIZE, "epochs": 2, "batch_size": 32,
                                    "lr": 3e-3} | kw))


def scrape_throughput_gauge(found: list, done: threading.Event) -> None:
    """Poll this node's Prometheus endpoint while a run trains (Ray exports worker metrics every few seconds
    and drops them about 20 s after the worker exits, so the scrape has to happen during the run)."""
    import requests
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    grace = None
    while grace is None or (not found and time.time() < grace):  # up to 15 s more after the run
        time.sleep(1)
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        found += [ln for ln in text.splitlines() if ln.startswith("ray_cxr_ray_train_images_per_second{")]
        if done.is_set() and grace is None:
            grace = time.time() + 15


def read_log(path) -> pd.DataFrame:
    return pd.read_csv(path) if os.path.exists(path) else pd.DataFrame(columns=["epoch"])


def test_ddp_two_workers_report_every_epoch_and_checkpoint_reproduces_val_auroc(prepared, local_ray, tmp_path):
    ref = runtime.put_data(prepared)
    log = tmp_path / "metrics.csv"
    scraped, done = [], threading.Event()
    scraper = threading.Thread(target=scrape_throughput_gauge, args=(scraped, done))
    scraper.start()
    try:
        result = training.fit(train_config(), ref, name="ddp", storage_path=str(tmp_path), workers=2,
                              callbacks=[training.EpochLog(str(log))])
    finally:
        done.set()
        scraper.join()
    # Rank 0's throughput gauge reached the metrics-export port (what Grafana and Prometheus scrape).
    assert any('trial="ddp"' in ln and float(ln.rsplit(" ", 1)[1]) > 0 for ln in scraped), scraped
    rows = read_log(log)
    assert rows["epoch"].tolist() == [1, 2]
    for key in ("train_loss", "val_loss", "val_auroc", "val_sensitivity", "val_specificity", "val_f1",
                "val_accuracy_youden", "val_f1_youden", "threshold", "images_per_s", "data_wait_fraction"):
        assert rows[key].notna().all(), key
    # The checkpoint loads into a fresh model and reproduces the reported validation AUROC on the
    # FULL validation split (each worker scored half of it; the report gathers both halves).
    model, meta = models.load_checkpoint(result.checkpoint.path)
    val = prepared.rows["val"]
    probs = models.predict(model, prepared.cache.images, val, (meta["mean"], meta["std"]), torch_device())
    y = prepared.cache.index["label"].to_numpy()[val]
    saved = np.load(os.path.join(result.checkpoint.path, "val_probabilities.npy"))
    np.testing.assert_allclose(probs, saved, atol=1e-5)  # float noise from other batch shapes only
    assert metrics.auroc(y, saved) == pytest.approx(rows["val_auroc"].iloc[-1], abs=1e-9)
    assert meta["epoch"] == 2 and meta["image_size"] == SIZE and meta["threshold"] == rows["threshold"].iloc[-1]
    assert sorted(os.listdir(result.checkpoint.path)) == ["meta.json", "model.safetensors", "train_state.pt",
                                                          "val_probabilities.npy"]

    # Launching the finished run again trains nothing and reports its last epoch once more (what a
    # resumed study needs when its driver died after the run's last checkpoint).
    checkpoints = sorted(p.name for p in (tmp_path / "ddp").glob("checkpoint_*"))
    again = training.fit(train_config(), ref, name="ddp", storage_path=str(tmp_path), workers=2,
                         callbacks=[training.EpochLog(str(log))])
    assert again.checkpoint.path == result.checkpoint.path and again.metrics["epoch"] == 2
    assert sorted(p.name for p in (tmp_path / "ddp").glob("checkpoint_*")) == checkpoints  # nothing new written
    pd.testing.assert_frame_equal(read_log(log), rows)  # the history is untouched


def torch_device():
    import torch
    return torch.device("cpu")


def test_crashed_worker_is_restarted_from_the_last_checkpoint(prepared, local_ray, tmp_path):
    """FailureConfig: kill the Train worker process mid-run; the run continues from its checkpoint."""
    from ray.util.state import list_actors
    ref = runtime.put_data(prepared)
    log = tmp_path / "metrics.csv"
    box = {}
    thread = threading.Thread(target=lambda: box.update(result=training.fit(
        train_config(epochs=6, augment=False), ref, name="crash", storage_path=str(tmp_path), workers=1, max_failures=2,
        callbacks=[training.EpochLog(str(log))])))
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
    # The replacement worker group continued from the last checkpoint (epoch 2 or later), not from 0.
    assert history["started_at_epoch"].iloc[0] == 0 and history["started_at_epoch"].iloc[-1] >= 2


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
    assert set(history["started_at_epoch"].iloc[done:]) <= {done, done + 1}  # resumed, not restarted
    assert "epoch   1 " not in second.stdout + second.stderr  # did not start over
