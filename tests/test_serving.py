"""Ray Serve on local Ray over real HTTP: parity with offline evaluation, hostile and malformed
input (the corpus of tests/hostile_corpus.py), limits, Host/Origin rules, the OpenAPI contract
(Schemathesis) and the pages in headless Chromium.

Two applications run in one Serve instance: the default one at / and a "strict" one at /strict
with tiny limits (upload time, bytes in flight, decoder time, one ongoing request per slot) so
that each limit can be hit quickly and deterministically.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import requests
import torch
from packaging.version import Version
from PIL import Image
from ray import serve

import hostile_corpus as hc
from conftest import CLI, REPO_ROOT, chromium, kill_session
from cxr_ray import config, data, imaging, model_card, models, runtime, serving, spec as specs, synthetic, training
from cxr_ray import metrics as cxr_metrics
from cxr_ray.results import Study

pytestmark = pytest.mark.e2e
SIZE = 48
LIMIT_MB = 1.0
STRICT = dict(upload_timeout_s=4.0, decode_timeout_s=1.0, inflight_mb=0.6, decode_workers=1,
              max_ongoing_requests=2, max_queued_requests=1, allowed_hosts="xray.internal",
              allow_origins=["http://app.example"])
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@contextlib.contextmanager
def browser_page():
    """A page in headless Chromium (the machine's own, see conftest.chromium), closed afterwards."""
    exe = chromium()
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page()
        finally:
            browser.close()


# ----------------------------------------------------------------------------- a served study

encode = hc.encode


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A study directory holding one checkpoint (random weights: parity needs no skill) and the
    files serving reads (spec.yaml, best.json, final.csv, summary.csv), plus non-square test images."""
    root = tmp_path_factory.mktemp("served")
    (root / "spec.yaml").write_text(specs.dump(specs.validate(
        {"name": "served", "data": {"source": "synthetic", "image_size": SIZE}, "arms": ["lcnet_050"],
         "budget": {"samples_per_arm": 1, "max_epochs": 1}}, "served.yaml")))
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
                           {"threshold": 0.4, "val_auroc": 0.9})  # the run's own; the study's final.csv says 0.5
    relative = "runs/t0/checkpoint_0"
    metrics = {m: 0.9 for m in cxr_metrics.REPORTED}
    (root / "best.json").write_text(json.dumps({"arm": "lcnet_050", "seed": 0, "checkpoint": relative,
                                                "test_metrics": metrics, "threshold": 0.5,
                                                "policy": {"policy": "youden", "target": None}}))
    pd.DataFrame([{"arm": "lcnet_050", "seed": 0, "val_auroc": 0.9, "threshold": 0.5, "checkpoint": relative}]).to_csv(
        root / "final.csv", index=False)
    pd.DataFrame([{"arm": "lcnet_050", "seeds": 1, **metrics}]).to_csv(root / "summary.csv", index=False)
    (root / "report").mkdir()
    for name, content in model_card.files(Study(str(root))).items():  # as the report step writes it
        (root / "report" / name).write_bytes(content)
    images = root / "images"
    images.mkdir()
    for it in synthetic.listing(8, seed=3):
        px = synthetic.render(it, 3, 128)[:100]  # 128 wide x 100 high, as films are rarely square
        (images / it.name).write_bytes(encode(px, "PNG"))
        (images / it.name.replace(".png", ".jpeg")).write_bytes(encode(px, "JPEG", quality=92))
    return root


@dataclass
class Served:
    url: str  # the default application
    strict: str  # the same model with tiny limits
    port: int


@pytest.fixture(scope="module")
def served(study):
    """Serve on local Ray, 127.0.0.1 and a free port; shut down afterwards."""
    started = not ray.is_initialized()
    runtime.connect(num_cpus=2, quiet=True)
    port = runtime.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(serving.build(str(study), max_batch_size=8, batch_wait_ms=20, max_upload_mb=LIMIT_MB),
              name="cxr-test", route_prefix="/")
    serve.run(serving.build(checkpoint=str(study / "runs/t0/checkpoint_0"), max_batch_size=2, batch_wait_ms=1,
                            max_upload_mb=LIMIT_MB, **STRICT), name="cxr-strict", route_prefix="/strict")
    base = f"http://127.0.0.1:{port}"
    yield Served(base, base + "/strict", port)
    serve.shutdown()
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def server(served) -> str:
    return served.url


def offline_probability(study: Path, path: Path) -> float:
    """What the offline evaluation computes: the cache's decoded pixels through the checkpoint."""
    model, meta = models.load_checkpoint(study / "runs/t0/checkpoint_0")
    pixels = data._decode_file((str(path), meta["image_size"]))[0]  # the cache's own worker function
    assert pixels is not None
    return float(models.predict(model, pixels[None], np.array([0]), (meta["mean"], meta["std"]),
                                torch.device("cpu"))[0])


def post(url: str, body: bytes, kind: str = "image/png", name: str | None = None, **kw) -> requests.Response:
    """One image as a raw body, or as a multipart file when ``name`` is given."""
    if name is not None:
        return requests.post(url, files={"file": (name, body, kind)}, timeout=60, **kw)
    return requests.post(url, data=body, headers={"content-type": kind, **kw.pop("headers", {})}, timeout=60, **kw)


def assert_alive(url: str, study: Path) -> None:
    assert requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"
    path = sorted((study / "images").glob("*.png"))[0]
    r = post(f"{url}/v1/predict", path.read_bytes())
    assert r.status_code == 200, r.text
    assert r.json()["probability"] == pytest.approx(offline_probability(study, path), abs=1e-5)  # still the model


def assert_error(r: requests.Response, status: int, file: str | None = None, words: str | None = None) -> dict:
    """The one error schema: {error, file, request}."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "file", "request"} and body["error"], body
    if file is not None:
        assert body["file"] == file and file in body["error"], body
    if words is not None:
        assert words in body["error"], body
    return body


# ----------------------------------------------------------------------------- the model's answers

def test_served_probability_equals_offline_evaluation(server, study):
    paths = sorted((study / "images").iterdir())
    probs = []
    for path in paths:
        kind = "image/png" if path.suffix == ".png" else "image/jpeg"
        raw = post(f"{server}/v1/predict", path.read_bytes(), kind).json()
        multi = post(f"{server}/v1/predict", path.read_bytes(), kind, name=path.name).json()
        expected = offline_probability(study, path)
        assert raw["probability"] == pytest.approx(expected, abs=1e-5), path.name
        assert multi["probability"] == pytest.approx(expected, abs=1e-5), path.name
        assert raw["label"] == ("PNEUMONIA" if expected >= 0.5 else "NORMAL") and raw["threshold"] == 0.5
        assert raw["model"]["arm"] == "lcnet_050" and raw["model"]["spec_hash"] == "abc123"
        assert raw["model"]["study"] == "served" and raw["model"]["checkpoint"] == "runs/t0/checkpoint_0"
        probs.append(expected)
    assert np.ptp(probs) > 0.01  # distinct values, so equality means something


def test_a_bare_checkpoint_is_served_at_its_own_threshold(served, study):
    """``cxr-ray serve --checkpoint DIR`` (the strict app): the run's validation threshold, no paths."""
    model = requests.get(f"{served.strict}/v1/model", timeout=30).json()
    assert model["threshold"] == pytest.approx(0.4) and model["model"]["checkpoint"] == "checkpoint_0"
    assert str(study) not in json.dumps(model)


def test_16_bit_png_and_dicom_are_handled(server):
    base = synthetic.render(synthetic.listing(1, 5)[0], 5, 96).astype(np.uint16) * 200  # 0..51000

    def prob(body, kind):
        r = post(f"{server}/v1/predict", body, kind)
        assert r.status_code == 200, r.text
        return r.json()["probability"]

    p16 = prob(encode(base, "PNG"), "image/png")  # 16-bit grayscale PNG: scaled, not clipped
    gray = imaging.to_pixels(encode(base, "PNG"), 96).pixels
    assert gray.min() == 0 and gray.max() == 255  # min-max scaled: nothing clipped at 255
    mono2 = prob(hc.dicom(base), "application/dicom")
    mono1 = prob(hc.dicom(base.max() - base, "MONOCHROME1"), "application/dicom")  # inverted storage
    rescaled = prob(hc.dicom(base // 2, RescaleSlope=2.0, RescaleIntercept=-100.0), "application/dicom")
    px1 = imaging.to_pixels(hc.dicom(base.max() - base, "MONOCHROME1"), SIZE).pixels.astype(int)
    px2 = imaging.to_pixels(hc.dicom(base), SIZE).pixels.astype(int)
    assert np.abs(px1 - px2).max() <= 1  # same picture, up to rounding
    assert mono1 == pytest.approx(mono2, abs=2e-3)
    assert rescaled == pytest.approx(mono2, abs=2e-3)
    assert mono2 == pytest.approx(p16, abs=2e-3)


def test_concurrent_requests_are_batched(server, study):
    body = sorted((study / "images").glob("*.png"))[0].read_bytes()

    def one(_):
        return post(f"{server}/v1/predict", body).status_code

    before = requests.get(f"{server}/v1/stats", timeout=30).json()["batch_sizes"]
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        assert set(pool.map(one, range(48))) == {200}
    after = requests.get(f"{server}/v1/stats", timeout=30).json()["batch_sizes"]
    grown = {int(k): v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    assert max(grown) > 1, f"no request was batched: {grown}"
    assert sum(k * v for k, v in grown.items()) == 48


def test_health_and_model_metadata_hold_no_paths_or_internals(server, study):
    health = requests.get(f"{server}/healthz", timeout=30).json()
    assert set(health) == {"status", "forward_ms", "probe"} and health["status"] == "ok"
    r = requests.get(f"{server}/v1/model", timeout=30)
    info = r.json()
    assert info["model"]["backbone"] == "lcnet_050" and info["preprocessing"]["image_size"] == SIZE
    assert info["model"]["study"] == "served" and info["model"]["spec_hash"] == "abc123"
    assert info["test_metrics"]["auroc"] == 0.9 and info["threshold"] == 0.5
    path = sorted((study / "images").glob("*.png"))[0]
    prediction = post(f"{server}/v1/predict", path.read_bytes()).text
    for text in (r.text, prediction):
        assert str(study) not in text and "study_dir" not in text and str(Path.home()) not in text


def test_model_card_is_linked_and_served_as_json_or_markdown(served, study):
    """GET /v1/model links the card; the card is the study's report/model_card.json (Markdown on
    Accept: text/markdown); a bare checkpoint has none: a 404 that says why, and a null link."""
    info = requests.get(f"{served.url}/v1/model", timeout=30).json()
    assert info["model_card"] == "/v1/model/card"
    card = requests.get(f"{served.url}{info['model_card']}", timeout=30)
    assert card.status_code == 200 and card.headers["content-type"].startswith("application/json")
    assert card.json() == json.loads((study / "report" / "model_card.json").read_text())
    assert card.json()["model"]["checkpoint"] == "runs/t0/checkpoint_0" and "not a medical device" in card.text.lower()
    md = requests.get(f"{served.url}/v1/model/card", headers={"Accept": "text/markdown"}, timeout=30)
    assert md.status_code == 200 and md.headers["content-type"].startswith("text/markdown")
    assert md.text == (study / "report" / "model_card.md").read_text() and md.text.startswith("# Model card")
    bare = requests.get(f"{served.strict}/v1/model", timeout=30).json()
    assert bare["model_card"] is None
    assert_error(requests.get(f"{served.strict}/v1/model/card", timeout=30), 404, words="checkpoint, not a study")
    spec = requests.get(f"{served.url}/openapi.json", timeout=30).json()
    responses = spec["paths"]["/v1/model/card"]["get"]["responses"]
    assert set(responses["200"]["content"]) == {"application/json", "text/markdown"}
    assert responses["200"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/ModelCard"
    assert "404" in responses


# ----------------------------------------------------------------------------- bad input: one 4xx each

BAD_INPUTS = {  # name -> (bytes builder, content type, status, words in the error)
    "empty body": (lambda: b"", "image/jpeg", 400, "empty"),
    "non-image bytes": (lambda: b"%PDF-1.4 not an x-ray" * 10, "image/jpeg", 415, "not a JPEG, PNG or DICOM"),
    "GIF": (lambda: b"GIF89a" + b"\0" * 200, "image/png", 415, "not a JPEG, PNG or DICOM"),
    "wrong content type": (lambda: b"\xff\xd8\xff\xe0" + b"0" * 100, "text/plain", 415, "content type"),
    "1x1 image": (lambda: encode(np.zeros((1, 1), np.uint8), "PNG"), "image/png", 422, "too small"),
    "20000x20000 image": (lambda: hc.png_claiming(20000, 20000), "image/png", 422, "too large"),
    "multi-frame image": (hc.two_frame_png, "image/png", 422, "multi-frame"),
    "oversized request": (lambda: b"\xff\xd8\xff" + b"0" * int(LIMIT_MB * 2**20 + 10), "image/jpeg", 413, "limit"),
    "JPEG cut mid-scan, EOI appended": (hc.jpeg_cut_mid_scan, "image/jpeg", 422, "truncated or corrupt"),
    "JPEG claiming 7000x7000 over 15 KB": (lambda: hc.jpeg_claiming(7000, 7000), "image/jpeg", 422,
                                           "truncated or corrupt"),
    "PNG cut short": (lambda: encode(hc.noise(64, 64), "PNG")[:-300], "image/png", 422, "truncated or corrupt"),
    "tall PNG 16 x 3,750,000": (lambda: hc.png_of_zeros(16, 3_750_000), "image/png", 422, "aspect ratio"),
    "16-bit PNG 7745 x 7745": (lambda: hc.png_of_zeros(7745, 7745, 16), "image/png", 422, "too large"),
    "RLE DICOM 7745 x 7745": (lambda: hc.rle_dicom_claiming(7745), "application/dicom", 422, "too large"),
    "progressive JPEG, 2000 repeated scans": (lambda: hc.jpeg_with_repeated_scan(2000), "image/jpeg", 422, "scans"),
    "CMYK JPEG": (hc.cmyk_jpeg, "image/jpeg", 422, "colour components"),
}
DECODER_WORDS = ("Error(", "Traceback", "struct.error", "image file is truncated", "Premature end", "pydicom",
                 "must be greater than")  # decoder internals that stay in the server log


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_one_clear_4xx_and_the_replica_keeps_serving(server, study, case):
    build, content_type, status, words = BAD_INPUTS[case]
    r = post(f"{server}/v1/predict", build(), content_type)
    body = assert_error(r, status, words=words)
    assert body["request"] == "POST /v1/predict"
    assert not any(w in body["error"] for w in DECODER_WORDS), body
    assert_alive(server, study)


@pytest.mark.parametrize("name", sorted(hc.bad_dicoms()))
def test_malformed_dicom_gets_a_422_naming_the_file(server, study, name):
    body = assert_error(post(f"{server}/v1/predict", hc.bad_dicoms()[name], "application/dicom", name=name), 422,
                        file=name)
    assert not any(w in body["error"] for w in DECODER_WORDS), body
    assert_alive(server, study)


def test_exif_with_zero_denominators_decodes_and_is_oriented(server):
    """Rationals like 72/0 in EXIF broke PIL's exif_transpose (a 500); they are irrelevant to the
    pixels, so the image is scored, with its orientation applied."""
    pixels = hc.noise(40, 64, 2)
    rotated = post(f"{server}/v1/predict", hc.jpeg_with_exif(hc.exif_zero_denominators(6), pixels), "image/jpeg")
    assert rotated.status_code == 200, rotated.text
    clean = hc.jpeg_with_exif(hc.exif_tiff([(0x0112, 3, 1, (6).to_bytes(2, "little"))]), pixels)
    assert rotated.json()["probability"] == pytest.approx(post(f"{server}/v1/predict", clean, "image/jpeg")
                                                          .json()["probability"], abs=1e-6)
    assert imaging.to_pixels(clean, SIZE).width == 64  # stored size; the pixels were rotated to portrait


def test_truncated_jpeg_is_refused_by_name(server, study):
    path = sorted((study / "images").glob("*.jpeg"))[0]
    cut = path.read_bytes()[: path.stat().st_size // 2]
    assert_error(post(f"{server}/v1/predict", cut, "image/jpeg", name="half.jpeg"), 422, file="half.jpeg",
                 words="truncated")
    assert_alive(server, study)


def test_batch_gives_a_result_per_file_and_200_despite_bad_files(server, study):
    paths = sorted((study / "images").glob("*.png"))[:3]
    bad = [("notes.txt", b"hello", "text/plain", 415), ("cut.jpeg", hc.jpeg_cut_mid_scan(), "image/jpeg", 422),
           ("tall.png", hc.png_of_zeros(16, 3_750_000), "image/png", 422), ("empty.png", b"", "image/png", 400),
           ("frames.dcm", hc.bad_dicoms()["frames-not-a-number.dcm"], "application/dicom", 422)]
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths] + [
        ("files", (name, body, kind)) for name, body, kind, _ in bad]
    r = requests.post(f"{server}/v1/predict/batch", files=files, timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["file"] for x in results] == [p.name for p in paths] + [b[0] for b in bad]
    for x, p in zip(results, paths):
        assert x["probability"] == pytest.approx(offline_probability(study, p), abs=1e-5)
    for x, (name, _, _, status) in zip(results[len(paths):], bad):
        assert x["status"] == status and name in x["error"] and "probability" not in x, x
    assert_alive(server, study)


def test_explain_is_correct_under_concurrency(server, study):
    """Grad-CAM on the shared model, 8 at once (one of them failed with a 500 before): every
    overlay's probability equals the offline one for its own image."""
    paths = sorted((study / "images").iterdir())

    def one(path):
        kind = "image/png" if path.suffix == ".png" else "image/jpeg"
        return path, post(f"{server}/v1/explain", path.read_bytes(), kind)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, paths * 2))
    for path, r in answers:
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        overlay = Image.open(io.BytesIO(r.content))
        assert overlay.size == (SIZE * 4, SIZE * 4) and overlay.mode == "RGB"
        assert float(r.headers["x-probability"]) == pytest.approx(offline_probability(study, path), abs=1e-5)


@pytest.mark.parametrize("endpoint", ["/v1/predict", "/v1/predict/batch"])
def test_a_large_text_field_beside_an_image_is_refused(server, study, endpoint):
    """The API reads only files: a text field may hold a note, not half a megabyte (under the
    request's own limit, so only the field's limit can refuse it)."""
    path = sorted((study / "images").glob("*.png"))[0]
    field = "file" if endpoint == "/v1/predict" else "files"
    image = {field: (path.name, path.read_bytes(), "image/png")}
    note = requests.post(f"{server}{endpoint}", files=image, data={"note": "seen by dr. x"}, timeout=60)
    assert note.status_code == 200, note.text
    big = requests.post(f"{server}{endpoint}", files=image, data={"note": "x" * 2**19}, timeout=60)
    assert_error(big, 413, words="non-file form field")
    assert_alive(server, study)


@pytest.mark.parametrize("endpoint", ["/v1/predict", "/v1/explain"])
def test_more_than_one_file_to_a_single_image_endpoint_is_a_400(server, study, endpoint):
    paths = sorted((study / "images").glob("*.png"))[:2]
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in paths]
    assert_error(requests.post(f"{server}{endpoint}", files=files, timeout=60), 400, words="2 files")


# ----------------------------------------------------------------------------- limits (the strict app)

def raw_request(port: int, path: str, headers: dict, body: bytes) -> socket.socket:
    """An HTTP request whose body may stop short of its Content-Length (a stalled upload)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"127.0.0.1:{port}", **headers}.items())
    sock.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + body)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(rest) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(lines[0].split()[1]), headers, rest


def test_stalled_uploads_time_out_and_a_full_replica_answers_503_with_retry_after(served, study):
    """Stalled uploads fill the strict replica (2 ongoing) and the proxy's queue (1 waiting): the
    next request gets 503 + Retry-After at once, a stalled one 408 after the upload time limit,
    and then the replica serves again."""
    stalled = []
    try:
        for _ in range(3):  # one at a time, so each is placed (2 on the replica, then 1 in the queue)
            stalled.append(raw_request(served.port, "/strict/v1/predict",
                                       {"Content-Type": "image/png", "Content-Length": "5000"}, b"\x89PNG\r\n\x1a\n"))
            time.sleep(0.6)  # the upload limit is 4 s
        busy = post(f"{served.strict}/v1/predict", sorted((study / "images").glob("*.png"))[0].read_bytes())
        answers = [read_response(sock) for sock in stalled]
    finally:
        for sock in stalled:
            sock.close()
    statuses = [status for status, _, _ in answers]
    assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1, (busy.text, statuses)
    assert statuses == [408, 408, 408], answers
    assert "not received within 4 s" in json.loads(answers[0][2])["error"]
    assert_alive(served.strict, study)


def test_bytes_in_flight_budget_gives_503_with_retry_after(served, study):
    body = b"\x89PNG\r\n\x1a\n" + b"\0" * int(0.8 * 2**20)  # under the upload limit, over the 0.6 MB budget
    r = post(f"{served.strict}/v1/predict", body)
    assert_error(r, 503, words="uploaded bytes")
    assert int(r.headers["retry-after"]) >= 1
    assert_alive(served.strict, study)


def test_a_request_s_decoder_time_is_limited_and_an_overrun_decoder_is_replaced(served, study):
    """Eight of the largest accepted images (0.2 s or more of decoding each) against 1 s of decoder
    time for the request: the rest are refused, a decoder may be killed mid-image, and the
    replica decodes again afterwards."""
    big = hc.png_of_zeros(7745, 7745)
    files = [("files", (f"big{i}.png", big, "image/png")) for i in range(8)]
    r = requests.post(f"{served.strict}/v1/predict/batch", files=files, timeout=120)
    assert r.status_code == 200, r.text
    refused = [x for x in r.json()["results"] if "error" in x]
    assert refused and all(x["status"] == 422 and "decode time limit" in x["error"] for x in refused), refused
    assert_alive(served.strict, study)


# ----------------------------------------------------------------------------- Host and Origin

def test_host_header_outside_the_allowlist_is_refused(served, study):
    for url, host in ((served.url, "evil.example"), (served.url, f"rebind.example:{served.port}"),
                      (served.url, "xray.internal"), (served.strict, "10.1.2.3")):
        assert_error(requests.get(f"{url}/v1/model", headers={"Host": host}, timeout=30), 400, words="Host")
    for url, host in ((served.url, f"localhost:{served.port}"), (served.url, f"[::1]:{served.port}"),
                      (served.strict, "xray.internal")):
        assert requests.get(f"{url}/v1/model", headers={"Host": host}, timeout=30).status_code == 200, host


def test_cross_origin_requests_are_refused_unless_allowed(served, study):
    body = sorted((study / "images").glob("*.png"))[0].read_bytes()
    before = requests.get(f"{served.url}/v1/stats", timeout=30).json()["images"]
    r = post(f"{served.url}/v1/predict", body, headers={"Origin": "http://evil.example"})
    assert_error(r, 403, words="cross-origin")
    assert requests.get(f"{served.url}/v1/stats", timeout=30).json()["images"] == before  # never scored
    same = post(f"{served.url}/v1/predict", body, headers={"Origin": served.url})
    assert same.status_code == 200 and "access-control-allow-origin" not in same.headers
    # the strict app allows http://app.example: CORS headers and a preflight answer
    ok = requests.get(f"{served.strict}/v1/model", headers={"Origin": "http://app.example"}, timeout=30)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://app.example"
    pre = requests.options(f"{served.strict}/v1/predict", timeout=30, headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 204 and "POST" in pre.headers["access-control-allow-methods"]
    assert_error(requests.get(f"{served.strict}/v1/model", headers={"Origin": "http://evil.example"}, timeout=30),
                 403)


# ----------------------------------------------------------------------------- the API contract

def test_openapi_documents_bodies_responses_and_one_error_schema(server):
    spec = requests.get(f"{server}/openapi.json", timeout=30).json()
    paths = spec["paths"]
    assert {"/v1/predict", "/v1/predict/batch", "/v1/explain", "/v1/model", "/v1/stats", "/healthz"} <= set(paths)
    error_ref = "#/components/schemas/ErrorBody"
    for path in ("/v1/predict", "/v1/explain"):
        content = paths[path]["post"]["requestBody"]["content"]
        assert set(content) == {"multipart/form-data", "image/jpeg", "image/png", "application/dicom"}
        assert content["multipart/form-data"]["schema"]["required"] == ["file"]
    batch = paths["/v1/predict/batch"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert batch["properties"]["files"]["type"] == "array"
    for path, ops in paths.items():
        for method, op in ops.items():
            expected = {"400", "403", "408", "413", "415", "422", "503"} if method == "post" else {"400", "403"}
            assert expected <= set(op["responses"]), (path, method)
            for status, response in op["responses"].items():
                if status.startswith(("4", "5")):
                    assert response["content"]["application/json"]["schema"]["$ref"] == error_ref, (path, status)
    assert paths["/v1/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"] \
        == "#/components/schemas/Prediction"
    assert set(paths["/v1/explain"]["post"]["responses"]["200"]["content"]) == {"image/png"}


def test_schemathesis_finds_no_failures(server, tmp_path):
    """Property-based requests from the OpenAPI schema, every check Schemathesis has. The config
    (tests/schemathesis.toml) allows 415/422 for schema-valid bytes that are not a decodable image:
    no schema can say "a valid JPEG"."""
    run = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "--config-file",
         str(REPO_ROOT / "tests" / "schemathesis.toml"),
         "run", f"{server}/openapi.json", "--seed", "1", "--max-examples", "25", "--workers", "1",
         "--request-timeout", "60", "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)  # its cache directory lands in tmp_path
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]


def test_docs_try_it_out_uploads_a_file_in_headless_chromium(server, study, tmp_path):
    """/docs (Swagger UI served by the replica itself, no CDN): Try it out on POST /v1/predict with
    a file, Execute, and the page shows the 200 answer."""
    path = sorted((study / "images").glob("*.jpeg"))[0]
    expected = offline_probability(study, path)
    with browser_page() as page:
        outside = []
        page.on("request", lambda req: outside.append(req.url) if not req.url.startswith(server) else None)
        page.goto(f"{server}/docs")
        op = "#operations-default-predict_v1_predict_post"
        page.click(f"{op} button.opblock-summary-control")
        page.click(f"{op} .try-out__btn")
        page.set_input_files(f"{op} input[type=file]", str(path))
        page.click(f"{op} .execute")
        answer = f"{op} .live-responses-table tbody tr.response"
        page.wait_for_selector(answer, timeout=60000)
        status = page.inner_text(f"{answer} .response-col_status").strip()
        shown = page.inner_text(f"{answer} .response-col_description")
        page.screenshot(path=str(tmp_path / "docs.png"), full_page=True)
    assert status == "200", shown
    assert json.loads(shown[shown.index("{"):shown.rindex("}") + 1])["probability"] == pytest.approx(expected, abs=1e-5)
    assert not outside, outside  # nothing fetched from anywhere but the server


def test_upload_page_in_headless_chromium(server, study, tmp_path):
    path = sorted((study / "images").glob("*.jpeg"))[0]
    expected = offline_probability(study, path)
    with browser_page() as page:
        page.goto(server + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('lcnet_050')")
        page.set_input_files("#file", str(path))
        page.click("button[type=submit]")
        page.wait_for_selector("#probability", timeout=30000)
        shown = float(page.inner_text("#probability"))
        page.wait_for_function("document.getElementById('heatmap').naturalWidth > 0", timeout=30000)
        page.screenshot(path=str(tmp_path / "page.png"))
    assert shown == pytest.approx(expected, abs=1e-3)
    assert Image.open(tmp_path / "page.png").size[0] > 100


def test_dependency_floors_exclude_known_vulnerable_versions():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    for requirement in ('"python-multipart>=0.0.18"', '"starlette>=0.47.2"', '"fastapi>=0.116.1"'):
        assert requirement in pyproject
    assert Version(metadata.version("python-multipart")) >= Version("0.0.18")
    assert Version(metadata.version("starlette")) >= Version("0.47.2")


# ----------------------------------------------------------------------------- entry points

def test_cli_serve_command_binds_localhost_and_stops_cleanly_on_sigterm(study, study_env):
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
        proc.terminate()  # SIGTERM, as `kill`, `docker stop` or systemd send it
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.rstrip().endswith("stopped") and "SIGTERM received" not in out, out
    finally:
        kill_session(proc.pid)


def test_cli_serve_refuses_a_port_another_server_holds(study, study_env):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        done = subprocess.run(CLI + ["serve", str(study), "--port", str(port)], env=study_env, capture_output=True,
                              text=True, timeout=120)
    assert done.returncode == 2 and not done.stdout, done.stdout
    assert done.stderr.strip() == (f"error: cannot serve on 127.0.0.1:{port}: Address already in use; stop what "
                                   "holds the port or choose another with --port"), done.stderr


def test_serve_app_builder_takes_serve_run_arguments(study):
    import serve_app
    app = serve_app.app({"study_dir": str(study), "replicas": "auto", "max_batch_size": "4",
                         "allowed_hosts": "xray.internal,pacs.internal", "upload_timeout_s": "10"})
    assert isinstance(app, serve.Application)
    with pytest.raises(FileNotFoundError, match="not a study directory"):
        serve_app.app({"study_dir": str(study / "images")})
