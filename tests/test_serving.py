"""Ray Serve on local Ray over real HTTP: parity with offline evaluation, bad input, batching, pages."""
from __future__ import annotations

import concurrent.futures
import io
import json
import os
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import requests
import torch
from PIL import Image
from ray import serve

from conftest import CLI, kill_session
from cxr_ray import config, data, imaging, models, runtime, serving, synthetic, training

pytestmark = pytest.mark.e2e
SIZE = 48
LIMIT_MB = 1.0


# ----------------------------------------------------------------------------- a served study

def encode(pixels: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A study directory holding one checkpoint (random weights: parity needs no skill) and the
    files serving reads (best.json, final.csv, summary.csv), plus non-square test images."""
    root = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    cfg = config.TrainConfig(backbone="lcnet_050", image_size=SIZE, study="served", arm="lcnet_050",
                               spec_hash="abc123")
    model = models.build_model(cfg.backbone, image_size=SIZE)
    opt = training.make_optimizer(model, cfg)
    items = synthetic.listing(64, seed=1)  # a few steps, so outputs differ between images
    x = torch.from_numpy(np.stack([synthetic.render(it, 1, SIZE) for it in items])).unsqueeze(1)
    y = torch.tensor([float(it.label) for it in items])
    for _ in range(15):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(models.normalize(x, models.normalization(cfg.backbone))), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # exact BatchNorm statistics for eval mode
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        model(models.normalize(x, models.normalization(cfg.backbone)))
    model.eval()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt = root / "runs" / "t0" / "checkpoint_0"
    ckpt.mkdir(parents=True)
    models.save_checkpoint(ckpt, model, opt, sched, 1, cfg, models.normalization(cfg.backbone),
                             {"threshold": 0.5, "val_auroc": 0.9})
    relative = "runs/t0/checkpoint_0"
    metrics = {m: 0.9 for m in ("auroc", "accuracy", "sensitivity", "specificity", "f1", "ece")}
    (root / "best.json").write_text(json.dumps({"arm": "lcnet_050", "seed": 0, "checkpoint": relative,
                                                "test_metrics": metrics}))
    pd.DataFrame([{"arm": "lcnet_050", "seed": 0, "val_auroc": 0.9, "checkpoint": relative}]).to_csv(
        root / "final.csv", index=False)
    pd.DataFrame([{"arm": "lcnet_050", **metrics}]).to_csv(root / "summary.csv", index=False)
    images = root / "images"
    images.mkdir()
    for it in synthetic.listing(8, seed=3):
        px = synthetic.render(it, 3, 128)[:100]  # 128 wide x 100 high, as films are rarely square
        (images / it.name).write_bytes(encode(px, "PNG"))
        (images / it.name.replace(".png", ".jpeg")).write_bytes(encode(px, "JPEG", quality=92))
    return root


@pytest.fixture(scope="module")
def server(study):
    """Serve on local Ray, 127.0.0.1 and a free port; shut down afterwards."""
    started = not ray.is_initialized()
    runtime.connect(num_cpus=2, quiet=True)
    port = runtime.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(serving.build(str(study), max_batch_size=8, batch_wait_ms=20, max_upload_mb=LIMIT_MB),
              name="cxr-test", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    if started:
        ray.shutdown()


def offline_probability(study: Path, path: Path) -> float:
    """What the offline evaluation computes: the cache's decoded pixels through the checkpoint."""
    model, meta = models.load_checkpoint(study / "runs/t0/checkpoint_0")
    pixels = data._decode_file((str(path), meta["image_size"]))[0]  # the cache's own worker function
    assert pixels is not None
    return float(models.predict(model, pixels[None], np.array([0]), (meta["mean"], meta["std"]),
                                  torch.device("cpu"))[0])


def assert_alive(server: str, study: Path) -> None:
    assert requests.get(f"{server}/healthz", timeout=30).json()["status"] == "ok"
    path = sorted((study / "images").glob("*.png"))[0]
    r = requests.post(f"{server}/v1/predict", data=path.read_bytes(), headers={"content-type": "image/png"},
                      timeout=30)
    assert r.status_code == 200 and 0 <= r.json()["probability"] <= 1


# ----------------------------------------------------------------------------- tests

def test_served_probability_equals_offline_evaluation(server, study):
    paths = sorted((study / "images").iterdir())
    probs = []
    for path in paths:
        kind = "image/png" if path.suffix == ".png" else "image/jpeg"
        raw = requests.post(f"{server}/v1/predict", data=path.read_bytes(), headers={"content-type": kind},
                            timeout=30).json()
        multi = requests.post(f"{server}/v1/predict", files={"file": (path.name, path.read_bytes(), kind)},
                              timeout=30).json()
        expected = offline_probability(study, path)
        assert raw["probability"] == pytest.approx(expected, abs=1e-5), path.name
        assert multi["probability"] == pytest.approx(expected, abs=1e-5), path.name
        assert raw["label"] == ("PNEUMONIA" if expected >= 0.5 else "NORMAL") and raw["threshold"] == 0.5
        assert raw["model"]["arm"] == "lcnet_050" and raw["model"]["spec_hash"] == "abc123"
        assert raw["model"]["checkpoint"] == "runs/t0/checkpoint_0"
        probs.append(expected)
    assert np.ptp(probs) > 0.01  # distinct values, so equality means something


def png_with_size(width: int, height: int) -> bytes:
    """A valid small PNG whose header claims ``width`` x ``height`` (a decompression-bomb probe)."""
    png = encode(np.zeros((20, 20), np.uint8), "PNG")
    ihdr = bytearray(png[8:33])
    ihdr[8:16] = struct.pack(">II", width, height)
    ihdr[21:25] = struct.pack(">I", zlib.crc32(bytes(ihdr[4:21])))
    return png[:8] + bytes(ihdr) + png[33:]


def two_frame_png() -> bytes:
    buf = io.BytesIO()
    frames = [Image.fromarray(np.full((64, 64), v, np.uint8)) for v in (0, 255)]
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
    return buf.getvalue()


BAD_INPUTS = {
    "empty body": (b"", "image/jpeg", 400),
    "non-image bytes": (b"%PDF-1.4 definitely not an x-ray" * 10, "image/jpeg", 415),
    "wrong content type": (b"\xff\xd8\xff\xe0" + b"0" * 100, "text/plain", 415),
    "1x1 image": (encode(np.zeros((1, 1), np.uint8), "PNG"), "image/png", 422),
    "20000x20000 image": (png_with_size(20000, 20000), "image/png", 422),
    "multi-frame image": (two_frame_png(), "image/png", 422),
    "oversized request": (b"\xff\xd8\xff" + b"0" * int(LIMIT_MB * 1024 * 1024 + 10), "image/jpeg", 413),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_a_clear_4xx_and_the_replica_keeps_serving(server, study, case):
    body, content_type, status = BAD_INPUTS[case]
    r = requests.post(f"{server}/v1/predict", data=body, headers={"content-type": content_type}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["error"] and err["request"] == "POST /v1/predict"
    assert_alive(server, study)


def test_truncated_jpeg_is_refused_by_name(server, study):
    path = sorted((study / "images").glob("*.jpeg"))[0]
    cut = path.read_bytes()[: path.stat().st_size // 2]
    r = requests.post(f"{server}/v1/predict", files={"file": ("half.jpeg", cut, "image/jpeg")}, timeout=30)
    assert r.status_code == 422 and r.json()["file"] == "half.jpeg" and "truncated" in r.json()["error"]
    assert_alive(server, study)


def test_batch_endpoint_answers_every_good_file_despite_a_bad_one(server, study):
    paths = sorted((study / "images").glob("*.png"))[:3]
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths] + [
        ("files", ("notes.txt", b"hello", "text/plain"))]
    results = requests.post(f"{server}/v1/predict/batch", files=files, timeout=60).json()["results"]
    assert [r["file"] for r in results] == [p.name for p in paths] + ["notes.txt"]
    for r, p in zip(results, paths):
        assert r["probability"] == pytest.approx(offline_probability(study, p), abs=1e-5)
    assert results[-1]["status"] == 415 and "probability" not in results[-1]


def test_16_bit_png_and_dicom_are_handled(server, study):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    base = synthetic.render(synthetic.listing(1, 5)[0], 5, 96).astype(np.uint16) * 200  # 0..51000

    def post(body, kind):
        r = requests.post(f"{server}/v1/predict", data=body, headers={"content-type": kind}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["probability"]

    p16 = post(encode(base, "PNG"), "image/png")  # 16-bit grayscale PNG: scaled, not clipped
    gray = imaging.decode(encode(base, "PNG"), 96)
    assert gray.min() == 0 and gray.max() == 255  # min-max scaled: nothing clipped at 255

    def dicom(pixels, photometric, slope=1.0, intercept=0.0) -> bytes:
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.Rows, ds.Columns = pixels.shape
        ds.PhotometricInterpretation = photometric
        ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 16, 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = pixels.astype(np.uint16).tobytes()
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        return buf.getvalue()

    mono2 = post(dicom(base, "MONOCHROME2"), "application/dicom")
    mono1 = post(dicom(base.max() - base, "MONOCHROME1"), "application/dicom")  # inverted storage
    rescaled = post(dicom(base // 2, "MONOCHROME2", slope=2.0, intercept=-100.0), "application/dicom")
    px1 = imaging.decode(dicom(base.max() - base, "MONOCHROME1"), SIZE).astype(int)
    px2 = imaging.decode(dicom(base, "MONOCHROME2"), SIZE).astype(int)
    assert np.abs(px1 - px2).max() <= 1  # same picture, up to rounding
    assert mono1 == pytest.approx(mono2, abs=2e-3)
    assert rescaled == pytest.approx(mono2, abs=2e-3)
    assert mono2 == pytest.approx(p16, abs=2e-3)


def test_concurrent_requests_are_batched(server, study):
    body = sorted((study / "images").glob("*.png"))[0].read_bytes()

    def one(_):
        return requests.post(f"{server}/v1/predict", data=body, headers={"content-type": "image/png"},
                             timeout=60).status_code

    before = requests.get(f"{server}/v1/stats", timeout=30).json()["batch_sizes"]
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        assert set(pool.map(one, range(48))) == {200}
    after = requests.get(f"{server}/v1/stats", timeout=30).json()["batch_sizes"]
    grown = {int(k): v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    assert max(grown) > 1, f"no request was batched: {grown}"
    assert sum(k * v for k, v in grown.items()) == 48


def test_health_metadata_docs_and_explain(server, study):
    health = requests.get(f"{server}/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["forward_ms"] > 0
    info = requests.get(f"{server}/v1/model", timeout=30).json()
    assert info["model"]["backbone"] == "lcnet_050" and info["preprocessing"]["image_size"] == SIZE
    assert info["test_metrics"]["auroc"] == 0.9 and info["threshold"] == 0.5
    assert requests.get(f"{server}/docs", timeout=30).status_code == 200
    paths = requests.get(f"{server}/openapi.json", timeout=30).json()["paths"]
    assert {"/v1/predict", "/v1/predict/batch", "/v1/explain", "/v1/model", "/healthz"} <= set(paths)
    path = sorted((study / "images").glob("*.png"))[0]
    r = requests.post(f"{server}/v1/explain", data=path.read_bytes(), headers={"content-type": "image/png"},
                      timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    overlay = Image.open(io.BytesIO(r.content))
    assert overlay.size == (SIZE * 4, SIZE * 4) and overlay.mode == "RGB"
    assert float(r.headers["x-probability"]) == pytest.approx(offline_probability(study, path), abs=1e-5)


def chromium() -> str | None:
    for path in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if os.path.exists(path):
            return path
    return None


def test_upload_page_in_headless_chromium(server, study, tmp_path):
    exe = chromium()
    if not exe:
        pytest.skip("chromium not installed (apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright
    path = sorted((study / "images").glob("*.jpeg"))[0]
    expected = offline_probability(study, path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        page.goto(server + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('lcnet_050')")
        page.set_input_files("#file", str(path))
        page.click("button[type=submit]")
        page.wait_for_selector("#probability", timeout=30000)
        shown = float(page.inner_text("#probability"))
        page.wait_for_function("document.getElementById('heatmap').naturalWidth > 0", timeout=30000)
        page.screenshot(path=str(tmp_path / "page.png"))
        browser.close()
    assert shown == pytest.approx(expected, abs=1e-3)
    assert Image.open(tmp_path / "page.png").size[0] > 100


def test_cli_serve_command_binds_localhost(study, study_env):
    port = str(runtime.free_port())
    proc = subprocess.Popen(CLI + ["serve", str(study), "--port", port], env=study_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, ok = time.time() + 180, False
        while time.time() < deadline and proc.poll() is None and not ok:
            try:
                ok = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
            except (requests.ConnectionError, requests.Timeout):
                time.sleep(1)
        assert ok, "cxr-ray serve never answered /healthz"
        listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
        assert f"127.0.0.1:{port}" in listening and f"0.0.0.0:{port}" not in listening
    finally:
        kill_session(proc.pid)


def test_serve_app_builder_takes_serve_run_arguments(study):
    import serve_app
    app = serve_app.app({"study_dir": str(study), "replicas": "auto", "max_batch_size": "4"})
    assert isinstance(app, serve.Application)
    with pytest.raises(FileNotFoundError, match="no best.json"):
        serve_app.app({"study_dir": str(study / "images")})
