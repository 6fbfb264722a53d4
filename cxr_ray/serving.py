"""Serving a study's model over HTTP with Ray Serve: FastAPI ingress and server-side batching.

The preprocessing is the training cache's own (``imaging.decode``: decode, grayscale, keep
aspect, resize short side, centre crop), with the size and normalisation read from the
checkpoint's metadata, so a served probability equals the offline evaluation's. Checkpoints
load with safetensors and JSON only (no pickle). Every malformed request gets a 4xx JSON
error that names the request and the file; the replica keeps serving.

(No `from __future__ import annotations` here: FastAPI under Serve's ingress must see real types.)
"""

import asyncio
import io
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.formparsers import MultiPartParser

from . import imaging, models, storage
from .data import CLASSES

RAW_TYPES = {"image/jpeg", "image/jpg", "image/png", "application/dicom"}
DEFAULT_MAX_UPLOAD_MB = 20.0


class RequestError(Exception):
    def __init__(self, status: int, message: str, file: str | None = None):
        super().__init__(message)
        self.status, self.message, self.file = status, message, file


# ----------------------------------------------------------------------------- which model

@dataclass
class ModelChoice:
    checkpoint: str  # local directory with model.safetensors + meta.json
    identity: dict  # study, arm, seed, checkpoint, spec_hash
    test_metrics: dict


def choose_model(study_dir: str | None = None, arm: str | None = None, checkpoint: str | None = None) -> ModelChoice:
    """The best model of a finished study, its named arm's best final model, or a checkpoint."""
    if checkpoint:
        local = storage.local_dir(storage.normalize(checkpoint))
        meta = json.loads(Path(local, "meta.json").read_text())
        return ModelChoice(local, {"study": meta.get("study"), "arm": meta.get("arm"), "seed": meta["config"]["seed"],
                                   "checkpoint": checkpoint, "spec_hash": meta.get("spec_hash")}, {})
    if not study_dir:
        raise RequestError(400, "give a study directory or --checkpoint")
    sdir = storage.normalize(study_dir)
    best_uri = storage.join(sdir, "best.json")
    if not storage.exists(best_uri):
        raise FileNotFoundError(f"{sdir}: no best.json; is the study finished? (cxr-ray study status {sdir})")
    best = storage.read_json(best_uri)
    metrics = best["test_metrics"]
    relative, seed, arm = best["checkpoint"], best["seed"], arm or best["arm"]
    if arm != best["arm"]:
        final = storage.read_csv(storage.join(sdir, "final.csv"))
        runs = final[final["arm"] == arm].sort_values("val_auroc", ascending=False, kind="stable")
        if not len(runs):
            raise FileNotFoundError(f"{sdir}: no final run of arm {arm!r} (arms: {', '.join(sorted(set(final.arm)))})")
        relative, seed = runs.iloc[0]["checkpoint"], int(runs.iloc[0]["seed"])
        summary = storage.read_csv(storage.join(sdir, "summary.csv")).set_index("arm")
        metrics = {m: float(summary.loc[arm, m]) for m in ("auroc", "accuracy", "sensitivity", "specificity", "f1",
                                                            "ece")}
    local = storage.local_dir(storage.join(sdir, relative))
    meta = json.loads(Path(local, "meta.json").read_text())
    identity = {"study": meta["study"], "arm": arm, "seed": seed, "checkpoint": relative,
                "spec_hash": meta["spec_hash"], "study_dir": sdir}
    return ModelChoice(local, identity, metrics)


# ----------------------------------------------------------------------------- the model logic

class Predictor:
    """Model + preprocessing, plain Python: testable without Serve, shared by the bare baseline."""

    def __init__(self, choice: ModelChoice):
        self.model, self.meta = models.load_checkpoint(choice.checkpoint)
        self.identity = choice.identity | {"backbone": self.meta["backbone"], "image_size": self.meta["image_size"],
                                           "epoch": self.meta["epoch"]}
        self.test_metrics = choice.test_metrics
        self.size, self.norm = self.meta["image_size"], (self.meta["mean"], self.meta["std"])
        self.threshold = float(self.meta["threshold"])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)

    def pixels(self, data: bytes, name: str) -> np.ndarray:
        """Bytes -> the cache's uint8 square (``imaging.to_pixels``); RequestError (4xx) for anything unusable."""
        try:
            return imaging.to_pixels(data, self.size, name).pixels
        except imaging.UnsupportedFormat as e:
            raise RequestError(415, str(e), name) from None
        except imaging.ImageError as e:
            raise RequestError(400 if not data else 422, str(e), name) from None

    def probabilities(self, arrays: list[np.ndarray]) -> np.ndarray:
        x = torch.from_numpy(np.stack(arrays)).unsqueeze(1).to(self.device)
        with torch.no_grad():
            return torch.sigmoid(self.model(models.normalize(x, self.norm))).cpu().numpy()

    def result(self, probability: float) -> dict:
        label = int(probability >= self.threshold)
        return {"probability": float(probability), "label": CLASSES[label], "label_index": label,
                "threshold": self.threshold, "model": self.identity}

    def explain(self, array: np.ndarray) -> tuple[bytes, float]:
        """Grad-CAM of the last feature maps, as a PNG overlay on the model's input image."""
        x = models.normalize(torch.tensor(array)[None, None].to(self.device), self.norm)
        maps = self.model.features(x)
        if maps.ndim != 4:
            raise RequestError(422, f"Grad-CAM needs spatial feature maps; {self.meta['backbone']} gives tokens")
        maps.retain_grad()
        logit = self.model.classify(maps)
        logit.sum().backward()
        self.model.zero_grad(set_to_none=True)
        weights = maps.grad.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * maps).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=array.shape, mode="bilinear", align_corners=False)[0, 0].detach().cpu().numpy()
        cam = cam / cam.max() if cam.max() > 0 else cam
        return overlay_png(array, cam), float(torch.sigmoid(logit).item())


def overlay_png(gray: np.ndarray, heat: np.ndarray, scale: int = 4) -> bytes:
    from matplotlib import colormaps
    from PIL import Image
    rgb = np.repeat(gray[..., None] / 255.0, 3, axis=2)
    colour = colormaps["inferno"](heat)[..., :3]
    alpha = 0.45 * heat[..., None]
    blend = ((1 - alpha) * rgb + alpha * colour) * 255
    img = Image.fromarray(blend.round().astype(np.uint8)).resize((gray.shape[1] * scale, gray.shape[0] * scale),
                                                                 Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- HTTP

async def read_uploads(request: Request, limit: int) -> list[tuple[str, bytes]]:
    """The images of a request: a raw body (image/jpeg, image/png, application/dicom) or multipart
    files. Enforces the size limit while reading, before anything is decoded."""
    declared = int(request.headers.get("content-length") or 0)
    if declared > limit:
        raise RequestError(413, f"request of {declared} bytes exceeds the {limit}-byte limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"request exceeds the {limit}-byte limit")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        async def stream():
            yield bytes(body)
        try:
            form = await MultiPartParser(request.headers, stream(), max_files=256, max_fields=16).parse()
        except Exception as e:
            raise RequestError(400, f"malformed multipart body: {e}") from None
        files = [(v.filename or k, await v.read()) for k, v in form.multi_items() if hasattr(v, "read")]
        if not files:
            raise RequestError(400, "multipart body holds no file (send the image as a file field)")
        return files
    if content_type not in RAW_TYPES:
        raise RequestError(415, f"content type {content_type or 'missing'!r} not accepted: send image/jpeg, "
                                "image/png, application/dicom, or multipart/form-data")
    if not body:
        raise RequestError(400, "empty request body")
    return [("body", bytes(body))]


def error_response(request: Request, e: RequestError) -> JSONResponse:
    return JSONResponse({"error": e.message, "file": e.file, "request": f"{request.method} {request.url.path}"},
                        status_code=e.status)


UPLOAD_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cxr-ray</title>
<style>
body{font-family:system-ui,sans-serif;max-width:760px;margin:2rem auto;padding:0 1rem;color:#222}
#result{font-size:1.2rem;margin:1rem 0} .PNEUMONIA{color:#b3261e} .NORMAL{color:#1b6e3a}
.note{color:#666;font-size:.9rem} img{max-width:100%;image-rendering:auto;border:1px solid #ccc}
</style></head><body>
<h1>Chest X-ray pneumonia classifier</h1>
<p class="note">Research use only, not a medical device. Model: <span id="model">loading...</span></p>
<form id="form"><input type="file" id="file" name="file" accept="image/jpeg,image/png,.dcm,application/dicom">
<button type="submit">Classify</button></form>
<div id="result"></div><img id="heatmap" alt="Grad-CAM heatmap" hidden>
<script>
fetch('/v1/model').then(r => r.json()).then(m => {
  document.getElementById('model').textContent =
    `${m.model.arm} (${m.model.backbone}, ${m.model.image_size}px) from study ${m.model.study}`;
});
document.getElementById('form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const file = document.getElementById('file').files[0];
  const out = document.getElementById('result'), img = document.getElementById('heatmap');
  if (!file) { out.textContent = 'Choose an image first.'; return; }
  out.textContent = 'Classifying...'; img.hidden = true;
  const body = new FormData(); body.append('file', file);
  const r = await fetch('/v1/predict', {method: 'POST', body});
  const j = await r.json();
  if (!r.ok) { out.textContent = `Error ${r.status}: ${j.error}`; return; }
  out.innerHTML = `<span class="${j.label}" id="label">${j.label}</span>: P(pneumonia) = ` +
    `<span id="probability">${j.probability.toFixed(3)}</span> (threshold ${j.threshold.toFixed(3)})`;
  const body2 = new FormData(); body2.append('file', file);
  const h = await fetch('/v1/explain', {method: 'POST', body: body2});
  if (h.ok) { img.src = URL.createObjectURL(await h.blob()); img.hidden = false; }
});
</script></body></html>
"""


api = FastAPI(title="cxr-ray", description="Pneumonia classifier from a cxr-ray study. Research use only, "
                                           "not a medical device.")


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(api)
class CXRServer:
    def __init__(self, choice: ModelChoice, max_batch_size: int = 16, batch_wait_ms: float = 5.0,
                 max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB):
        self.predictor = Predictor(choice)
        self.limit = int(max_upload_mb * 1024 * 1024)
        self.batched.set_max_batch_size(max_batch_size)
        self.batched.set_batch_wait_timeout_s(batch_wait_ms / 1000)
        self.batch_sizes: Counter = Counter()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def batched(self, arrays: list[np.ndarray]) -> list[float]:
        self.batch_sizes[len(arrays)] += 1
        return [float(p) for p in await asyncio.to_thread(self.predictor.probabilities, arrays)]

    async def _score(self, name: str, data: bytes) -> dict:
        pixels = await asyncio.to_thread(self.predictor.pixels, data, name)
        return self.predictor.result(await self.batched(pixels))

    @api.post("/v1/predict", summary="P(pneumonia) for one image (raw body or multipart)")
    async def predict(self, request: Request):
        try:
            files = await read_uploads(request, self.limit)
            if len(files) != 1:
                raise RequestError(400, f"{len(files)} files sent: use /v1/predict/batch for several")
            return await self._score(*files[0])
        except RequestError as e:
            return error_response(request, e)

    @api.post("/v1/predict/batch", summary="P(pneumonia) for several images (multipart files)")
    async def predict_batch(self, request: Request):
        try:
            files = await read_uploads(request, self.limit)
        except RequestError as e:
            return error_response(request, e)

        async def one(name, data):
            try:
                return {"file": name} | await self._score(name, data)
            except RequestError as e:  # one bad file does not cost the others their answer
                return {"file": name, "error": e.message, "status": e.status}

        return {"results": await asyncio.gather(*(one(n, d) for n, d in files))}

    @api.post("/v1/explain", summary="Grad-CAM heatmap overlay (PNG) for one image")
    async def explain(self, request: Request):
        try:
            files = await read_uploads(request, self.limit)
            name, data = files[0]
            pixels = await asyncio.to_thread(self.predictor.pixels, data, name)
            png, p = await asyncio.to_thread(self.predictor.explain, pixels)
        except RequestError as e:
            return error_response(request, e)
        result = self.predictor.result(p)
        return Response(png, media_type="image/png", headers={"X-Probability": f"{p:.6f}",
                                                              "X-Label": result["label"]})

    @api.get("/v1/model", summary="Model identity, preprocessing and the study's test metrics")
    async def model_info(self):
        meta = self.predictor.meta
        return {"model": self.predictor.identity, "threshold": self.predictor.threshold,
                "preprocessing": {k: meta[k] for k in ("image_size", "mean", "std", "channels", "geometry")},
                "class_names": meta["class_names"], "test_metrics": self.predictor.test_metrics,
                "validation_metrics": meta["metrics"]}

    @api.get("/v1/stats", summary="Requests and server-side batch sizes seen by this replica")
    async def stats(self):
        return {"batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "images": sum(k * v for k, v in self.batch_sizes.items())}

    @api.get("/healthz", summary="Model loaded and a forward pass works")
    async def healthz(self):
        start = time.perf_counter()
        try:
            p = await asyncio.to_thread(self.predictor.probabilities,
                                        [np.zeros((self.predictor.size,) * 2, np.uint8)])
        except Exception as e:
            return JSONResponse({"status": "error", "error": str(e)}, status_code=503)
        return {"status": "ok", "forward_ms": 1000 * (time.perf_counter() - start), "probe": float(p[0])}

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self):
        return UPLOAD_PAGE


def build(study_dir: str | None = None, arm: str | None = None, checkpoint: str | None = None,
          replicas: str | int = 1, max_replicas: int = 4, max_batch_size: int = 16, batch_wait_ms: float = 5.0,
          gpus_per_replica: float = 0, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB):
    """The Serve application. ``replicas='auto'`` autoscales between 1 and ``max_replicas``."""
    choice = choose_model(study_dir, arm, checkpoint)
    options: dict = {"ray_actor_options": {"num_cpus": 1, "num_gpus": float(gpus_per_replica)},
                     "max_ongoing_requests": max(64, 4 * int(max_batch_size))}
    if str(replicas) == "auto":
        options["autoscaling_config"] = {"min_replicas": 1, "max_replicas": int(max_replicas),
                                         "target_ongoing_requests": int(max_batch_size)}
    else:
        options["num_replicas"] = int(replicas)
    return CXRServer.options(**options).bind(choice, int(max_batch_size), float(batch_wait_ms), float(max_upload_mb))


def serve_blocking(args) -> None:
    """``cxr-ray serve``: start Serve on host:port and block until interrupted."""
    from . import runtime
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: binding {args.host}: the API has no authentication; anyone who can reach this address "
              "can send images to the model. Put it behind an authenticating proxy.", flush=True)
    app = build(args.dir, args.arm, args.checkpoint, args.replicas, args.max_replicas, args.max_batch_size,
                args.batch_wait_ms, args.gpus_per_replica, args.max_upload_mb)
    runtime.connect()
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="cxr-ray", route_prefix="/")
    print(f"serving on http://{args.host}:{args.port}/  (API docs at /docs; Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
