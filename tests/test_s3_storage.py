"""A study whose storage is S3: run, status, report and serve work on an s3:// study directory,
on both trial engines.

The S3 endpoint is a moto server on 127.0.0.1 (real HTTP, real pyarrow S3 client, real Ray study);
AWS_ENDPOINT_URL points every process of the study (driver, Tune trials, Train workers) at it.
"""
from __future__ import annotations

import subprocess

import moto.server as moto_server
import pytest

from conftest import CLI, TINY_SPEC

pytestmark = pytest.mark.e2e

SPEC = (TINY_SPEC.replace("name: tiny", "name: on_s3").replace("arms: [lcnet_050, mobilenetv3_small_050]",
                                                              "arms: [lcnet_050]")
        .replace("samples_per_arm: 3, max_epochs: 3", "samples_per_arm: 2, max_epochs: 2"))


@pytest.fixture
def s3_env(study_env, monkeypatch):
    from cxr_ray.runtime import free_port
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import pyarrow.fs as pafs
    pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir("cxr-studies")
    yield study_env | env
    server.stop()


@pytest.mark.parametrize("engine", ["tune", "train"])
def test_study_report_and_serving_on_s3(s3_env, tmp_path, engine):
    from cxr_ray import storage
    from cxr_ray.serve_model import choose_model
    from cxr_ray.serve_predictor import Predictor
    assert "arms: [lcnet_050]" in SPEC and "samples_per_arm: 2, max_epochs: 2" in SPEC  # TINY_SPEC unchanged
    spec = tmp_path / "on_s3.yaml"
    spec.write_text(SPEC.replace("max_concurrent_trials: 2}", f"max_concurrent_trials: 2, engine: {engine}}}"))
    run = subprocess.run(CLI + ["study", "run", str(spec), "--storage", f"s3://cxr-studies/{engine}"], env=s3_env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    study = f"s3://cxr-studies/{engine}/on_s3"
    assert not (tmp_path / "runs").exists()  # nothing landed on local disk instead

    # The layout on S3 is the one a local study has.
    for name in ("spec.yaml", "split.csv", "trials.csv", "budget.csv", "final.csv", "summary.csv", "best.json",
                 "report/index.html", "report/report.md", "report/roc.png"):
        assert storage.exists(storage.join(study, name)), name
    assert any(n.startswith("checkpoint_") for trial in storage.listdir(storage.join(study, "runs"))
               for n in storage.listdir(storage.join(study, "runs", trial)))

    status = subprocess.run(CLI + ["study", "status", study], env=s3_env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "lcnet_050" in status.stdout, status.stdout + status.stderr

    # The report can be rebuilt from S3 alone.
    import pyarrow.fs as pafs
    index = storage.join(study, "report", "index.html")
    fs, path = pafs.FileSystem.from_uri(index)
    fs.delete_file(path)
    report = subprocess.run(CLI + ["report", study], env=s3_env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    assert b"lcnet_050" in storage.read_bytes(index)

    # Serving fetches the best checkpoint from S3 and scores a test image as the study did.
    import numpy as np

    from cxr_ray import data
    choice = choose_model(study)
    assert choice.identity["arm"] == "lcnet_050" and choice.identity["study"] == "on_s3"
    predictor = Predictor(choice)
    best = storage.read_json(storage.join(study, "best.json"))
    predictions = storage.read_csv(storage.join(study, "predictions.csv"))
    served = predictions[(predictions["arm"] == best["arm"]) & (predictions["seed"] == best["seed"])].iloc[0]
    cache = data.prepare("synthetic", None, 32, None, synthetic_images=300, progress=False).cache  # pixels: a pure function of seed and size
    pixels = cache.images[int(np.flatnonzero(cache.index["item"] == served["item"])[0])]
    assert predictor.probabilities([pixels])[0] == pytest.approx(served["probability"], abs=1e-5)
