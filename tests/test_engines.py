"""The ``tune`` trial engine on local Ray: single-worker trials run the training loop inside their Tune
trial. Findable in the dashboard (Actors view, through its HTTP API with the token) and in Prometheus;
a trial whose process is killed mid-run is retried by Tune from its last checkpoint."""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import dashboard_get, scrape_metrics
from cxr_ray import data, runtime, spec as specs, study

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def data_ref(local_ray, tmp_path_factory):
    prepared = data.prepare("synthetic", None, 32, None, synthetic_images=240, cache_root=tmp_path_factory.mktemp("c"),
                            progress=False)
    return runtime.put_data(prepared)


def tune_spec(samples: int, epochs: int, **resources) -> specs.Spec:
    return specs.validate({
        "name": "engines", "data": {"source": "synthetic", "image_size": 32},
        "arms": ["lcnet_050"], "search_space": {"lr": {"loguniform": [1e-3, 1e-2]}}, "fixed": {"batch_size": 32},
        "budget": {"samples_per_arm": samples, "max_epochs": epochs, "grace_period": epochs},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 2, "engine": "tune",
                      **resources}}, "test")


def history(sdir, trial_id: str) -> pd.DataFrame:
    path = os.path.join(sdir, "runs", trial_id, "metrics.csv")
    return pd.read_csv(path) if os.path.exists(path) else pd.DataFrame(columns=["epoch", "pid"])


def test_tune_trials_are_findable_in_the_dashboard_and_in_prometheus(local_ray, data_ref, tmp_path):
    spec = tune_spec(samples=3, epochs=3)
    plans = study.search_plans(spec, specs.sample_configs(spec))
    scraped, done = [], threading.Event()
    gauges = ("ray_cxr_ray_train_images_per_second{", "ray_cxr_ray_trial_epoch{", "ray_cxr_ray_trial_metric{")
    scraper = threading.Thread(target=scrape_metrics, args=(gauges, scraped, done))
    scraper.start()
    try:
        results = study.phase_tuner(spec, str(tmp_path), study.SEARCH, plans, data_ref).fit()
    finally:
        done.set()
        scraper.join()
    assert not results.errors
    trial_ids = [study.trial_id_of(os.path.basename(r.path)) for r in results]
    histories = {tid: history(tmp_path, tid) for tid in trial_ids}
    assert all(h["epoch"].tolist() == [1, 2, 3] and set(h["engine"]) == {"tune"} for h in histories.values())
    # Actor reuse: one process serves trial after trial (2 slots for 3 trials), so torch loads once per slot.
    assert len({h["pid"].iloc[0] for h in histories.values()}) <= 2

    # Actors view: each trial's process is a Tune trial actor, and its log holds the trial's epoch lines.
    actors = dashboard_get(local_ray, "/api/v0/actors", detail="true", limit=1000).json()["data"]["result"]["result"]
    for r in results:
        tid, name = study.trial_id_of(os.path.basename(r.path)), os.path.basename(r.path)
        pid = int(histories[tid]["pid"].iloc[0])
        actor = next(a for a in actors if a.get("pid") == pid)
        assert actor["repr_name"] == "run_trial" and actor["class_name"] == "ImplicitFunc", actor
        log = dashboard_get(local_ray, "/api/v0/logs/file", actor_id=actor["actor_id"], suffix="out",
                            lines=1000).text
        assert f"[{name}] epoch 3/3" in log, log[-2000:]

    # Prometheus: throughput, epoch and the validation metrics of every trial, tagged by trial.
    for gauge in gauges:
        tagged = {tid for tid in trial_ids if any(ln.startswith(gauge) and f'trial="{tid}"' in ln for ln in scraped)}
        assert tagged == set(trial_ids), (gauge, tagged)
    epochs = [float(ln.rsplit(" ", 1)[1]) for ln in scraped if ln.startswith("ray_cxr_ray_trial_epoch{")]
    assert max(epochs) == 3
    # The shipped Grafana dashboard queries exactly these metrics, by labels they carry.
    dashboard = json.loads((Path(__file__).parents[1] / "deploy" / "grafana" / "cxr-ray-study.json").read_text())
    queried = {m for p in dashboard["panels"] for t in p["targets"] for m in re.findall(r"ray_cxr_ray_\w+", t["expr"])}
    exported = {ln.split("{", 1)[0] for ln in scraped}
    assert queried and queried <= exported, (queried, exported)
    assert all('study="engines"' in ln and 'arm="lcnet_050"' in ln for ln in scraped)


def test_tune_trial_killed_mid_run_is_retried_from_its_last_checkpoint(local_ray, data_ref, tmp_path):
    spec = tune_spec(samples=1, epochs=8, max_failures=2)
    plans = study.search_plans(spec, specs.sample_configs(spec))
    box = {}
    thread = threading.Thread(target=lambda: box.update(
        results=study.phase_tuner(spec, str(tmp_path), study.SEARCH, plans, data_ref).fit()))
    thread.start()
    deadline = time.time() + 180
    runs = tmp_path / "runs"
    while time.time() < deadline:
        found = list(runs.glob("*/metrics.csv")) if runs.exists() else []
        if found and len(h := history(tmp_path, found[0].parent.name)) >= 2:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the trial never reached epoch 2")
    killed_at = int(h["epoch"].max())
    assert killed_at < 8, "finished before it could be killed"
    os.kill(int(h["pid"].iloc[-1]), signal.SIGKILL)
    thread.join(timeout=300)
    results = box["results"]
    assert not results.errors  # retried (resources.max_failures), then completed
    h = history(tmp_path, found[0].parent.name)
    assert h["epoch"].tolist() == list(range(1, 9))
    assert h["pid"].nunique() == 2  # the killed process and its replacement
    after = h[h["pid"] != h["pid"].iloc[0]]
    # The replacement continued from the newest checkpoint (epoch killed_at, or the one before if the
    # kill fell between the epoch's history row and its checkpoint), not from scratch.
    assert set(after["started_at_epoch"]) <= {killed_at - 1, killed_at} and after["epoch"].min() >= killed_at
