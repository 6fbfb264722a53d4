"""Serving a study's model over HTTP with Ray Serve: FastAPI ingress, server-side batching, and
bounded work per request.

The preprocessing is the training cache's own (``imaging.to_pixels``) with the size and
normalisation from the checkpoint's metadata, so a served probability equals the offline
evaluation's. Checkpoints load with safetensors and JSON only (no pickle).

Hostile input costs bounded memory and CPU: uploads are size- and time-limited while they are
read and count against the replica's bytes-in-flight budget; images decode in child processes
(``DecodePool``) under the header bounds of ``imaging``, a per-request limit on decoder time (an
overrun kills the decoder process) and a memory limit; Grad-CAM runs a few at a time. Every bad input
gets a 4xx JSON error (one schema, ``ErrorBody``) that names the request and the file and holds
no decoder internals (those go to the replica's log); a full replica answers 503 with
Retry-After. A Host allowlist and a same-origin rule keep web pages the operator opens (and DNS
rebinding) away from the API.

(No `from __future__ import annotations` here: FastAPI under Serve's ingress must see real types.)
"""

import asyncio
import io
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.config import BackpressureConfig
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from . import evaluation, imaging, metrics, models, storage
from .data import CLASSES
from .errors import CxrError
from .status import finished_study

log = logging.getLogger("ray.serve")

RAW_TYPES = {"image/jpeg", "image/jpg", "image/png", "application/dicom"}
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
MAX_BATCH_FILES = 256
WORKER_WAIT_S = 10.0  # longest wait for a free decoder or Grad-CAM slot before a 503
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class Limits:
    """What one replica lets a request cost; README 'Security' states each default."""
    max_upload_mb: float = 20.0  # one request's body
    upload_timeout_s: float = 30.0  # to receive one request's body
    decode_timeout_s: float = 10.0  # decoder seconds for all images of one request
    decode_workers: int = 2  # decoder processes per replica: concurrent decodes
    decoder_memory_mb: int = 512  # address space a decoder process may add to what it starts with
    inflight_mb: float = 256.0  # request bodies held by a replica at once
    explain_slots: int = 2  # concurrent Grad-CAM passes per replica
    allowed_hosts: tuple[str, ...] = ()  # Host header names served besides localhost and the bound host
    allow_origins: tuple[str, ...] = ()  # cross-origin callers allowed ("*": any)
    bound_host: str = "127.0.0.1"


class ServingError(CxrError, ValueError):
    """What to serve cannot be found or combined (command line and serve_app arguments)."""


class RequestError(Exception):
    def __init__(self, status: int, message: str, file: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.file, self.retry_after = status, message, file, retry_after


# ----------------------------------------------------------------------------- which model

@dataclass
class ModelChoice:
    checkpoints: list[str]  # local directories with model.safetensors + meta.json (several: a seed ensemble)
    identity: dict  # study, arm, seed, checkpoint (relative), spec_hash: what clients see
    test_metrics: dict
    threshold: float | None = None  # on the served probability; None: the checkpoint's own (Youden on validation)
    platt: tuple[float, float] | None = None  # calibration of the served probability
    operating_point: dict = field(default_factory=dict)  # how the threshold was chosen (policy, target, site)
    external_metrics: dict = field(default_factory=dict)  # external set -> the same metrics, when scored
    study_dir: str | None = None  # where it came from: for the server's log, never sent to clients


def _policy(text: str) -> tuple[str, float | None]:
    """``youden``, ``calibrated``, ``sensitivity:0.95`` or ``specificity:0.9``."""
    name, _, target = text.partition(":")
    if name not in metrics.POLICIES or (name in ("sensitivity", "specificity")) != bool(target):
        raise ServingError(f"threshold policy {text!r}: use youden, calibrated, sensitivity:TARGET or "
                           "specificity:TARGET")
    try:
        return name, float(target) if target else None
    except ValueError:
        raise ServingError(f"threshold policy {text!r}: the target must be a number such as 0.95") from None


def choose_model(study_dir: str | None = None, arm: str | None = None, checkpoint: str | None = None,
                 ensemble: bool = False, site: str | None = None, policy: str | None = None) -> ModelChoice:
    """What to serve: a finished study's best model (or its named arm's best final run), that arm's
    seed ensemble, or one checkpoint; at the operating point the study chose on validation, a
    serve-time ``policy`` chosen on the same validation split, or a deployment ``site``'s profile."""
    if checkpoint:
        if ensemble or site or policy:
            raise ServingError("--ensemble, --site and --threshold-policy need a study directory, not --checkpoint")
        local = storage.local_dir(storage.normalize(checkpoint))
        meta = json.loads(Path(local, "meta.json").read_text())
        return ModelChoice([local], {"study": meta.get("study"), "arm": meta.get("arm"),
                                     "seed": meta["config"]["seed"], "checkpoint": Path(checkpoint.rstrip("/")).name,
                                     "spec_hash": meta.get("spec_hash")}, {},
                           operating_point={"policy": "youden", "chosen_on": "the run's validation split"})
    if not study_dir:
        raise ServingError("give a study directory or --checkpoint")
    sdir = finished_study(study_dir)
    best = storage.read_json(storage.join(sdir, "best.json"))
    arm = arm or best["arm"]
    final = storage.read_csv(storage.join(sdir, "final.csv"))
    runs = final[final["arm"] == arm].sort_values("val_auroc", ascending=False, kind="stable")
    if not len(runs):
        raise FileNotFoundError(f"{sdir}: no final run of arm {arm!r} (arms: {', '.join(sorted(set(final.arm)))})")
    members = runs if ensemble else runs.iloc[:1]
    table = "ensembles.csv" if ensemble else "summary.csv"
    row = storage.read_csv(storage.join(sdir, table)).set_index("arm").loc[arm]
    test_metrics = {m: float(row[m]) for m in metrics.REPORTED}
    if ensemble:
        threshold, platt = float(row["threshold"]), _platt(row)
    else:
        threshold, platt = float(members.iloc[0]["threshold"]), _platt(members.iloc[0])
    point = {"policy": best["policy"]["policy"], "target": best["policy"]["target"],
             "chosen_on": "the study's validation split"}
    if policy:
        name, target = _policy(policy)
        val = storage.read_csv(storage.join(sdir, "validation_predictions.csv"))
        mine = val[val["arm"] == arm].pivot_table(index="item", columns="seed", values="probability")
        labels = val.drop_duplicates("item").set_index("item")["label"].reindex(mine.index).to_numpy()
        p_val = mine[[int(s) for s in members["seed"]]].mean(axis=1).to_numpy()
        threshold, platt = evaluation.choose_point(name, target, labels, p_val)
        point = {"policy": name, "target": target, "chosen_on": "the study's validation split (at serve time)"}
    if site:
        if arm != best["arm"]:
            raise ServingError(f"site profiles are fitted for the study's served arm {best['arm']}, not {arm}")
        uri = storage.join(sdir, "sites", f"{site}.json")
        if not storage.exists(uri):
            known = [n.removesuffix(".json") for n in storage.listdir(storage.join(sdir, "sites"))]
            raise FileNotFoundError(f"{sdir}: no site profile {site!r} (profiles: {', '.join(known) or 'none'}; "
                                    f"make one with cxr-ray calibrate {sdir} --name {site} ...)")
        profile = storage.read_json(uri)
        fitted = profile["ensemble" if ensemble else "model"]
        threshold, platt = fitted["threshold"], tuple(fitted["platt"]) if fitted["platt"] else None
        point = {"policy": profile["policy"], "target": profile["target"], "site": site,
                 "chosen_on": f"site {site}'s sample of {profile['images']} images"}
    external = {}
    for name in storage.listdir(storage.join(sdir, "external")):
        uri = storage.join(sdir, "external", name, "ensembles.csv" if ensemble else "summary.csv")
        if storage.exists(uri):
            ext = storage.read_csv(uri).set_index("arm")
            if arm in ext.index:
                external[name] = {m: float(ext.loc[arm, m]) for m in metrics.REPORTED}
    locals_ = [storage.local_dir(storage.join(sdir, c)) for c in members["checkpoint"]]
    meta = json.loads(Path(locals_[0], "meta.json").read_text())
    identity = {"study": meta["study"], "arm": arm, "seed": -1 if ensemble else int(members.iloc[0]["seed"]),
                "checkpoint": ",".join(members["checkpoint"]), "spec_hash": meta["spec_hash"]}
    return ModelChoice(locals_, identity, test_metrics, threshold, platt, point, external, sdir)


def _platt(row) -> tuple[float, float] | None:
    return (float(row["platt_a"]), float(row["platt_b"])) if "platt_a" in row and pd.notna(row["platt_a"]) else None


# ----------------------------------------------------------------------------- the model logic

class Predictor:
    """Model(s) + preprocessing, plain Python: testable without Serve, shared by the bare baseline.
    Several checkpoints (a seed ensemble) are served as the mean of their probabilities."""

    def __init__(self, choice: ModelChoice):
        loaded = [models.load_checkpoint(c) for c in choice.checkpoints]
        self.members = [m for m, _ in loaded]
        self.meta = loaded[0][1]
        if any((m["image_size"], m["mean"], m["std"]) != (self.meta["image_size"], self.meta["mean"], self.meta["std"])
               for _, m in loaded):
            raise ServingError("an ensemble's members must share their preprocessing (image size, normalisation)")
        self.identity = choice.identity | {"backbone": self.meta["backbone"], "image_size": self.meta["image_size"],
                                           "epoch": self.meta["epoch"], "members": len(self.members)}
        self.test_metrics, self.external_metrics = choice.test_metrics, choice.external_metrics
        self.operating_point = choice.operating_point | {"platt": choice.platt}
        self.size, self.norm = self.meta["image_size"], (self.meta["mean"], self.meta["std"])
        self.threshold = float(self.meta["threshold"] if choice.threshold is None else choice.threshold)
        self.platt = choice.platt
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for model in self.members:
            model.to(self.device)
            model.requires_grad_(False)  # Grad-CAM asks for d(logit)/d(maps) only: no shared .grad state
        self.model = self.members[0]
        with torch.no_grad():
            probe = self.model.features(torch.zeros(1, 1, self.size, self.size, device=self.device))
        self.explainable = probe.ndim == 4

    def pixels(self, data: bytes, name: str) -> np.ndarray:
        """Bytes -> the cache's uint8 square, in this process; RequestError (4xx) for anything unusable."""
        try:
            return imaging.to_pixels(data, self.size, name).pixels
        except imaging.ImageError as e:
            raise image_error(e, name) from None

    def probabilities(self, arrays: list[np.ndarray]) -> np.ndarray:
        """The served P(pneumonia): the members' mean, calibrated when the operating point says so."""
        x = models.normalize(torch.from_numpy(np.stack(arrays)).unsqueeze(1).to(self.device), self.norm)
        with torch.no_grad():
            p = torch.stack([torch.sigmoid(m(x)) for m in self.members]).mean(0).cpu().numpy()
        return metrics.apply_platt(p, self.platt).astype(np.float32)

    def result(self, probability: float) -> dict:
        label = int(probability >= self.threshold)
        return {"probability": float(probability), "label": CLASSES[label], "label_index": label,
                "threshold": self.threshold, "model": self.identity}

    def explain(self, array: np.ndarray) -> tuple[bytes, float]:
        """Grad-CAM of the last feature maps, as a PNG overlay on the model's input image.

        All autograd state is this call's own (the maps are a fresh leaf, the gradient is returned,
        not accumulated into parameters), so concurrent calls on the shared model are safe.
        """
        x = models.normalize(torch.tensor(array)[None, None].to(self.device), self.norm)
        cams, probs = [], []
        for model in self.members:  # an ensemble's map is the mean of its members' maps
            with torch.no_grad():
                maps = model.features(x)
            maps.requires_grad_(True)
            with torch.enable_grad():
                logit = model.classify(maps)
                (grad,) = torch.autograd.grad(logit.sum(), maps)
            with torch.no_grad():
                cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * maps).sum(1, keepdim=True))
                cams.append(F.interpolate(cam, size=array.shape, mode="bilinear", align_corners=False)[0, 0])
            probs.append(float(torch.sigmoid(logit).item()))
        cam = torch.stack(cams).mean(0).cpu().numpy()
        cam = cam / cam.max() if cam.max() > 0 else cam
        return overlay_png(array, cam), float(metrics.apply_platt([np.mean(probs)], self.platt)[0])


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


def image_error(e: imaging.ImageError, name: str) -> RequestError:
    """415 for bytes of no accepted format, 422 for an accepted format that cannot be used; the
    decoder's own words go to the log, not to the client."""
    if e.detail:
        log.info("refused %s: %s [%s]", name, e, e.detail)
    return RequestError(415 if isinstance(e, imaging.UnsupportedFormat) else 422, str(e), name)


# ----------------------------------------------------------------------------- decoding in child processes

class _Decoder:
    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc

    async def ask(self, name: str, data: bytes) -> tuple[int, bytes]:
        encoded = name.encode("utf-8", "replace")
        self.proc.stdin.write(struct.pack(">II", len(encoded), len(data)) + encoded)
        self.proc.stdin.write(data)
        await self.proc.stdin.drain()
        kind, length = struct.unpack(">BI", await self.proc.stdout.readexactly(5))
        return kind, await self.proc.stdout.readexactly(length)

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


class DecodePool:
    """``workers`` decoder processes (``python -m cxr_ray.imaging SIZE MEMORY_MB``) behind one queue.

    A decode that outlives its request's decoder time is killed with its process (a thread could
    not be stopped); a decoder that crashes or runs out of its memory limit takes only itself down.
    Either way the process is replaced in the background. Waiting for a free decoder longer than
    ``WORKER_WAIT_S`` is a 503: the replica is busy, the input is not at fault.
    """

    def __init__(self, size: int, workers: int, memory_mb: int):
        self.size, self.workers, self.memory_mb = size, workers, memory_mb
        self.idle: asyncio.Queue[_Decoder] = asyncio.Queue()
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        for decoder in await asyncio.gather(*(self._spawn() for _ in range(self.workers))):
            self.idle.put_nowait(decoder)

    async def _spawn(self) -> _Decoder:
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cxr_ray.imaging", str(self.size), str(self.memory_mb),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env)
        return _Decoder(proc)

    def _background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _replace(self, decoder: _Decoder) -> None:
        decoder.kill()
        await decoder.proc.wait()
        self.idle.put_nowait(await self._spawn())

    async def _finish(self, decoder: _Decoder, pending: asyncio.Task, deadline: float) -> None:
        """A request went away mid-decode: reuse the decoder once it answers, or replace it."""
        try:
            async with asyncio.timeout_at(deadline):
                await pending
            self.idle.put_nowait(decoder)
        except Exception:  # noqa: BLE001 - overran, crashed or broke the stream: a new process
            await self._replace(decoder)

    async def decode(self, data: bytes, name: str, clock: "DecodeClock") -> np.ndarray:
        """The cache's pixels for one image within what is left of its request's decode time, or
        RequestError. Time spent waiting for a free decoder is not charged to the request."""
        if not data:
            raise RequestError(400, f"{name}: empty file", name)
        if clock.left <= 0:
            raise RequestError(422, f"{name}: not decoded: the request's images used up its decode time limit", name)
        try:
            decoder = await asyncio.wait_for(self.idle.get(), WORKER_WAIT_S)
        except TimeoutError:
            raise RequestError(503, "all image decoders of this replica are busy; retry later", name,
                               RETRY_AFTER_S) from None
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + clock.left
        pending = loop.create_task(decoder.ask(name, data))
        try:
            async with asyncio.timeout_at(deadline):
                kind, payload = await asyncio.shield(pending)
        except TimeoutError:
            pending.cancel()
            self._background(self._replace(decoder))
            log.warning("killed the decoder of %s: over the request's decode time limit", name)
            raise RequestError(422, f"{name}: decoding took longer than the request's decode time limit", name) \
                from None
        except asyncio.CancelledError:
            self._background(self._finish(decoder, pending, deadline))
            raise
        except (OSError, asyncio.IncompleteReadError) as e:
            self._background(self._replace(decoder))
            log.warning("the decoder died on %s (%r); replaced", name, e)
            raise RequestError(422, f"{name}: the image could not be decoded", name) from None
        finally:
            clock.left -= loop.time() - start
        self.idle.put_nowait(decoder)
        if kind == 0:
            return np.frombuffer(payload, np.uint8, offset=8).reshape(self.size, self.size)
        reply = json.loads(payload)
        if kind == 1:
            error = (imaging.UnsupportedFormat if reply["unsupported"] else imaging.ImageError)(
                reply["message"], reply["detail"])
            raise image_error(error, name)
        log.error("decoder fault on %s:\n%s", name, reply["detail"])
        raise RuntimeError(f"image decoder fault on {name}")

    async def close(self) -> None:
        while not self.idle.empty():
            decoder = self.idle.get_nowait()
            decoder.proc.stdin.close()
            await decoder.proc.wait()


@dataclass
class DecodeClock:
    """Decoder seconds one request may still use (its images share them)."""
    left: float


# ----------------------------------------------------------------------------- reading uploads

class Budget:
    """Bytes of request bodies a replica holds at once; a request that would exceed it gets a 503."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise RequestError(503, "this replica holds its limit of uploaded bytes; retry later",
                               retry_after=RETRY_AFTER_S)
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n


@dataclass
class Upload:
    """One request's body as read under the limits; ``release()`` returns its bytes to the budget."""
    budget: Budget
    held: int = 0
    files: list[tuple[str, bytes]] = field(default_factory=list)

    def release(self) -> None:
        self.budget.give(self.held)
        self.held = 0


async def read_uploads(request: Request, limits: Limits, budget: Budget, upload: Upload) -> list[tuple[str, bytes]]:
    """The images of a request: a raw body (image/jpeg, image/png, application/dicom) or multipart
    files. The size limit, the upload deadline and the replica's byte budget are enforced while
    reading, before anything is decoded."""
    limit = int(limits.max_upload_mb * 2**20)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "multipart/form-data" and content_type not in RAW_TYPES:
        raise RequestError(415, f"content type {content_type or 'missing'!r} not accepted: send image/jpeg, "
                                "image/png, application/dicom, or multipart/form-data")
    try:
        declared = int(request.headers.get("content-length") or 0)
    except ValueError:
        raise RequestError(400, "malformed Content-Length header") from None
    if declared > limit:
        raise RequestError(413, f"request of {declared} bytes exceeds the {limit}-byte limit")
    deadline = asyncio.get_running_loop().time() + limits.upload_timeout_s

    async def chunks():
        total, stream = 0, request.stream().__aiter__()
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await anext(stream)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise RequestError(408, f"upload not received within {limits.upload_timeout_s:g} s") from None
            total += len(chunk)
            if total > limit:
                raise RequestError(413, f"request exceeds the {limit}-byte limit")
            budget.take(len(chunk))
            upload.held += len(chunk)
            yield chunk

    if content_type != "multipart/form-data":
        body = b"".join([chunk async for chunk in chunks()])
        if not body:
            raise RequestError(400, "empty request body")
        return [("body", body)]
    parser = MultiPartParser(request.headers, chunks(), max_files=MAX_BATCH_FILES, max_fields=16,
                             max_part_size=limit)
    try:
        form = await parser.parse()
    except RequestError:
        raise
    except MultiPartException as e:
        raise RequestError(400, f"malformed multipart body: {e.message}") from None
    except Exception as e:  # noqa: BLE001 - the multipart parser's own errors on malformed bodies
        log.info("malformed multipart body: %r", e)
        raise RequestError(400, "malformed multipart body") from None
    try:
        files = [(v.filename or k, await v.read()) for k, v in form.multi_items() if not isinstance(v, str)]
    finally:
        await form.close()
    if not files:
        raise RequestError(400, "multipart body holds no file (send the image as a file field)")
    return [(name[:200], data) for name, data in files]


def error_response(request: Request, e: RequestError) -> JSONResponse:
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
    return JSONResponse({"error": e.message, "file": e.file, "request": f"{request.method} {request.url.path}"},
                        status_code=e.status, headers=headers)


# ----------------------------------------------------------------------------- Host and Origin

@dataclass(frozen=True)
class Policy:
    hosts: frozenset[str]
    any_ip: bool  # bound to a wildcard address: any IP literal is a name of this server
    origins: frozenset[str]

    @classmethod
    def of(cls, limits: Limits) -> "Policy":
        bound = limits.bound_host.strip("[]").lower()
        wildcard = bound in ("0.0.0.0", "::", "")
        hosts = {*LOCAL_HOSTS, *(h.strip("[]").lower() for h in limits.allowed_hosts), *(() if wildcard else (bound,))}
        return cls(frozenset(hosts), wildcard, frozenset(o.rstrip("/").lower() for o in limits.allow_origins))

    def host_ok(self, host: str) -> bool:
        name = urlsplit(f"//{host}").hostname or ""
        if name in self.hosts:
            return True
        try:
            ipaddress.ip_address(name)
            return self.any_ip
        except ValueError:
            return False

    @staticmethod
    def same_origin(origin: str, host: str) -> bool:
        return urlsplit(origin).netloc.lower() == host.lower()

    def origin_allowed(self, origin: str) -> bool:
        return "*" in self.origins or origin.rstrip("/").lower() in self.origins


class Guard:
    """ASGI middleware: a Host outside the allowlist gets 400 (DNS rebinding), a request from
    another origin gets 403 unless allowed (any page the operator opens can POST a multipart form
    to localhost), and allowed origins get CORS headers and preflight answers.

    The policy is per replica process, set by ``CXRServer.__init__`` before any request arrives.
    """
    policy: Policy | None = None

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or Guard.policy is None:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host, origin = headers.get("host", ""), headers.get("origin")
        request = f"{scope['method']} {scope['path']}"
        if not Guard.policy.host_ok(host):
            return await self._refuse(send, 400, f"Host {host!r} is not a name of this server (allowed: localhost, "
                                                 "the bound address, --allowed-host names)", request)
        if origin is None or Guard.policy.same_origin(origin, host):
            return await self.app(scope, receive, send)
        if not Guard.policy.origin_allowed(origin):
            return await self._refuse(send, 403, f"cross-origin request from {origin} refused (start the server "
                                                 "with --allow-origin to allow a web app)", request)
        cors = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
                (b"access-control-expose-headers", b"X-Probability, X-Label, Retry-After")]
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            return await self._answer(send, 204, b"", cors + [
                (b"access-control-allow-methods", b"GET, POST"),
                (b"access-control-allow-headers", b"Content-Type"), (b"access-control-max-age", b"600")])

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message = message | {"headers": [*message.get("headers", []), *cors]}
            await send(message)

        return await self.app(scope, receive, send_with_cors)

    @staticmethod
    async def _answer(send, status: int, body: bytes, headers: list) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _refuse(self, send, status: int, message: str, request: str) -> None:
        body = json.dumps({"error": message, "file": None, "request": request}).encode()
        await self._answer(send, status, body, [(b"content-type", b"application/json")])


# ----------------------------------------------------------------------------- the API contract

class ErrorBody(BaseModel):
    """Every error the API answers (the proxy's own 503 under backpressure is plain text)."""
    error: str = Field(description="what is wrong, in words fit for the client")
    file: str | None = Field(description="the file it concerns (multipart filename, or 'body' for a raw body)")
    request: str = Field(description="method and path of the request")


class ModelIdentity(BaseModel):
    study: str | None
    arm: str | None
    seed: int | None = Field(description="-1 for a seed ensemble")
    checkpoint: str = Field(description="relative to the study directory (comma-separated for an ensemble)")
    spec_hash: str | None
    backbone: str
    image_size: int
    epoch: int
    members: int = Field(description="models averaged (1, or the seeds of an ensemble)")


class Prediction(BaseModel):
    probability: float = Field(ge=0, le=1, description="P(pneumonia)")
    label: Literal["NORMAL", "PNEUMONIA"]
    label_index: Literal[0, 1]
    threshold: float
    model: ModelIdentity


class FilePrediction(Prediction):
    file: str


class FileError(BaseModel):
    file: str
    error: str
    status: int = Field(description="the status this file alone would have got")


class BatchResult(BaseModel):
    results: list[FilePrediction | FileError] = Field(description="one per file, in request order")


class Preprocessing(BaseModel):
    image_size: int
    mean: float
    std: float
    channels: int
    geometry: str


class OperatingPoint(BaseModel):
    policy: str = Field(description="youden, sensitivity, specificity or calibrated (see the README)")
    target: float | None = Field(default=None, description="the sensitivity or specificity aimed at")
    site: str | None = Field(default=None, description="the site profile, when one is served")
    chosen_on: str = Field(description="the labelled images the threshold was chosen on")
    platt: tuple[float, float] | None = Field(default=None, description="calibration of the served probability")


class ModelInfo(BaseModel):
    model: ModelIdentity
    threshold: float
    operating_point: OperatingPoint
    preprocessing: Preprocessing
    class_names: list[str]
    test_metrics: dict[str, float | None] = Field(description="on the study's internal test split")
    external_metrics: dict[str, dict[str, float | None]] = Field(
        description="per external set (collected apart from train), when the study scored one")
    validation_metrics: dict[str, Any]


class Health(BaseModel):
    status: Literal["ok"]
    forward_ms: float
    probe: float


class Stats(BaseModel):
    batch_sizes: dict[str, int]
    images: int


BINARY = {"type": "string", "format": "binary"}
IMAGE = BINARY | {"minLength": 1}  # an empty single upload is a 400; in a batch it is that file's error
IMAGE_BODY = {"requestBody": {"required": True, "description": "one chest X-ray: a multipart file field `file`, "
                              "or the raw bytes with their content type", "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {"file": IMAGE}}},
    "image/jpeg": {"schema": IMAGE}, "image/png": {"schema": IMAGE}, "application/dicom": {"schema": IMAGE}}}}
BATCH_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"],
    "properties": {"files": {"type": "array", "items": BINARY, "minItems": 1, "maxItems": MAX_BATCH_FILES}}}}}}}
RETRY_AFTER = {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}}


def errors(*statuses: int) -> dict:
    words = {400: "bad request: empty body or file, malformed multipart, more than one file, a Host that is not "
                  "this server's", 403: "cross-origin request not allowed", 408: "upload not received in time",
             413: "request too large", 415: "not a JPEG, PNG or DICOM image, or content type not accepted",
             422: "an accepted format that cannot be used: corrupt, truncated, too large, too small, implausible "
                  "shape, multi-frame, too slow to decode",
             501: "Grad-CAM is not available for this model", 503: "replica busy (retry after Retry-After seconds) "
                                                                   "or model unhealthy"}
    out = {s: {"model": ErrorBody, "description": words[s]} for s in statuses}
    if 503 in out:
        out[503] |= {"headers": RETRY_AFTER, "content": {"text/plain": {"schema": {"type": "string"}}}}
    return out


UPLOAD_ERRORS = errors(400, 403, 408, 413, 415, 422, 503)
GET_ERRORS = errors(400, 403)


UPLOAD_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cxr-ray</title>
<style>
body{font-family:system-ui,sans-serif;max-width:760px;margin:2rem auto;padding:0 1rem;color:#222}
#result{font-size:1.2rem;margin:1rem 0} .PNEUMONIA{color:#b3261e} .NORMAL{color:#1b6e3a}
.note{color:#666;font-size:.9rem} img{max-width:100%;image-rendering:auto;border:1px solid #ccc}
</style></head><body>
<h1>Chest X-ray pneumonia classifier</h1>
<p class="note">Research use only, not a medical device. Model: <span id="model">loading...</span>.
API: <a href="docs">docs</a></p>
<form id="form"><input type="file" id="file" name="file" accept="image/jpeg,image/png,.dcm,application/dicom">
<button type="submit">Classify</button></form>
<div id="result"></div><img id="heatmap" alt="Grad-CAM heatmap" hidden>
<script>
fetch('v1/model').then(r => r.json()).then(m => {
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
  const r = await fetch('v1/predict', {method: 'POST', body});
  const j = await r.json().catch(() => ({error: r.statusText}));
  if (!r.ok) { out.textContent = `Error ${r.status}: ${j.error}`; return; }
  out.innerHTML = `<span class="${j.label}" id="label">${j.label}</span>: P(pneumonia) = ` +
    `<span id="probability">${j.probability.toFixed(3)}</span> (threshold ${j.threshold.toFixed(3)})`;
  const body2 = new FormData(); body2.append('file', file);
  const h = await fetch('v1/explain', {method: 'POST', body: body2});
  if (h.ok) { img.src = URL.createObjectURL(await h.blob()); img.hidden = false; }
});
</script></body></html>
"""

DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
               "favicon-32x32.png": "image/png"}

api = FastAPI(title="cxr-ray", version="1", docs_url=None, redoc_url=None,
              description="Pneumonia classifier from a cxr-ray study. Research use only, not a medical device. "
                          "Every error is a JSON `ErrorBody`; limits are listed in the project README (Security).")
api.add_middleware(Guard)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException):
    """Unknown paths and methods answer in the one error schema too."""
    return JSONResponse({"error": str(e.detail), "file": None, "request": f"{request.method} {request.url.path}"},
                        status_code=e.status_code, headers=e.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError):
    return JSONResponse({"error": "invalid request", "file": None,
                         "request": f"{request.method} {request.url.path}"}, status_code=400)


def finite(metrics: dict) -> dict:
    """JSON has no NaN: undefined metrics (e.g. AUROC of one class) are sent as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


# The routes below are pickled with the app when the class is decorated: every global they use is
# defined above this line.
@serve.deployment(max_ongoing_requests=64)
@serve.ingress(api)
class CXRServer:
    async def __init__(self, choice: ModelChoice, max_batch_size: int = 16, batch_wait_ms: float = 5.0,
                       limits: Limits = Limits()):
        Guard.policy = Policy.of(limits)
        self.predictor = Predictor(choice)
        self.limits = limits
        self.budget = Budget(int(limits.inflight_mb * 2**20))
        self.decoders = DecodePool(self.predictor.size, limits.decode_workers, limits.decoder_memory_mb)
        await self.decoders.start()
        self.explain_slots = asyncio.Semaphore(limits.explain_slots)
        self.batched.set_max_batch_size(max_batch_size)
        self.batched.set_batch_wait_timeout_s(batch_wait_ms / 1000)
        self.batch_sizes: Counter = Counter()
        from swagger_ui_bundle import swagger_ui_path
        self.docs_assets = {name: (swagger_ui_path / name).read_bytes() for name in DOCS_ASSETS}
        log.info("serving %s from %s", choice.identity, choice.study_dir or ", ".join(choice.checkpoints))

    async def __del__(self):
        await self.decoders.close()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def batched(self, arrays: list[np.ndarray]) -> list[float]:
        self.batch_sizes[len(arrays)] += 1
        return [float(p) for p in await asyncio.to_thread(self.predictor.probabilities, arrays)]

    def _clock(self) -> DecodeClock:
        return DecodeClock(self.limits.decode_timeout_s)

    async def _score(self, name: str, data: bytes, clock: DecodeClock) -> dict:
        return self.predictor.result(await self.batched(await self.decoders.decode(data, name, clock)))

    async def _one_file(self, request: Request, upload: Upload) -> tuple[str, bytes]:
        files = await read_uploads(request, self.limits, self.budget, upload)
        if len(files) != 1:
            raise RequestError(400, f"{len(files)} files sent: send one (use /v1/predict/batch for several)")
        return files[0]

    @api.post("/v1/predict", summary="P(pneumonia) for one image (raw body or multipart file)",
              response_model=Prediction, responses=UPLOAD_ERRORS, openapi_extra=IMAGE_BODY)
    async def predict(self, request: Request):
        upload = Upload(self.budget)
        try:
            name, data = await self._one_file(request, upload)
            return await self._score(name, data, self._clock())
        except RequestError as e:
            return error_response(request, e)
        finally:
            upload.release()

    @api.post("/v1/predict/batch", summary="P(pneumonia) for several images (multipart files); one result or "
                                           "error per file", response_model=BatchResult, responses=UPLOAD_ERRORS,
              openapi_extra=BATCH_BODY)
    async def predict_batch(self, request: Request):
        upload = Upload(self.budget)
        try:
            files = await read_uploads(request, self.limits, self.budget, upload)
            clock = self._clock()

            async def one(name, data):
                try:
                    return {"file": name} | await self._score(name, data, clock)
                except RequestError as e:  # one bad file does not cost the others their answer
                    return {"file": name, "error": e.message, "status": e.status}

            return {"results": await asyncio.gather(*(one(n, d) for n, d in files))}
        except RequestError as e:
            return error_response(request, e)
        finally:
            upload.release()

    @api.post("/v1/explain", summary="Grad-CAM heatmap overlay (PNG) for one image", response_class=Response,
              responses={200: {"description": "the overlay", "content": {"image/png": {"schema": BINARY}},
                               "headers": {"X-Probability": {"schema": {"type": "string"}, "required": True},
                                           "X-Label": {"schema": {"type": "string"}, "required": True}}},
                         **UPLOAD_ERRORS, **errors(501)}, openapi_extra=IMAGE_BODY)
    async def explain(self, request: Request):
        upload = Upload(self.budget)
        try:
            if not self.predictor.explainable:
                raise RequestError(501, f"Grad-CAM needs spatial feature maps; {self.predictor.meta['backbone']} "
                                        "gives tokens")
            name, data = await self._one_file(request, upload)
            pixels = await self.decoders.decode(data, name, self._clock())
            try:
                await asyncio.wait_for(self.explain_slots.acquire(), WORKER_WAIT_S)
            except TimeoutError:
                raise RequestError(503, "all Grad-CAM slots of this replica are busy; retry later", name,
                                   RETRY_AFTER_S) from None
            try:
                png, p = await asyncio.to_thread(self.predictor.explain, pixels)
            finally:
                self.explain_slots.release()
        except RequestError as e:
            return error_response(request, e)
        finally:
            upload.release()
        result = self.predictor.result(p)
        return Response(png, media_type="image/png", headers={"X-Probability": f"{p:.6f}",
                                                              "X-Label": result["label"]})

    @api.get("/v1/model", summary="Model identity, preprocessing and the study's test metrics",
             response_model=ModelInfo, responses=GET_ERRORS)
    async def model_info(self):
        meta = self.predictor.meta
        return {"model": self.predictor.identity, "threshold": self.predictor.threshold,
                "operating_point": self.predictor.operating_point,
                "preprocessing": {k: meta[k] for k in ("image_size", "mean", "std", "channels", "geometry")},
                "class_names": meta["class_names"], "test_metrics": finite(self.predictor.test_metrics),
                "external_metrics": {k: finite(v) for k, v in self.predictor.external_metrics.items()},
                "validation_metrics": finite(meta["metrics"])}

    @api.get("/v1/stats", summary="Server-side batch sizes seen by this replica", response_model=Stats,
             responses=GET_ERRORS)
    async def stats(self):
        return {"batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "images": sum(k * v for k, v in self.batch_sizes.items())}

    @api.get("/healthz", summary="Model loaded and a forward pass works", response_model=Health,
             responses=GET_ERRORS | errors(503))
    async def healthz(self, request: Request):
        start = time.perf_counter()
        try:
            p = await asyncio.to_thread(self.predictor.probabilities,
                                        [np.zeros((self.predictor.size,) * 2, np.uint8)])
        except Exception:  # noqa: BLE001 - reported as unhealthy; the trace goes to the log, not the client
            log.exception("health check forward pass failed")
            return error_response(request, RequestError(503, "the model's forward pass failed (see the server log)",
                                                        retry_after=RETRY_AFTER_S))
        return {"status": "ok", "forward_ms": 1000 * (time.perf_counter() - start), "probe": float(p[0])}

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self):
        return UPLOAD_PAGE

    @api.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs(self, request: Request):
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}{api.openapi_url}", title="cxr-ray API",
                                   swagger_js_url=f"{root}/docs/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}/docs/swagger-ui.css",
                                   swagger_favicon_url=f"{root}/docs/favicon-32x32.png")

    @api.get("/docs/{asset}", include_in_schema=False)
    async def docs_asset(self, asset: str):
        if asset not in DOCS_ASSETS:
            raise StarletteHTTPException(404, "Not Found")
        return Response(self.docs_assets[asset], media_type=DOCS_ASSETS[asset],
                        headers={"Cache-Control": "public, max-age=86400"})


def _names(value) -> tuple[str, ...]:
    """Host or origin lists from Python (a list) or `serve run` arguments (a comma-separated string)."""
    if isinstance(value, str):
        value = value.split(",")
    return tuple(v.strip() for v in value or () if v.strip())


def build(study_dir: str | None = None, arm: str | None = None, checkpoint: str | None = None,
          ensemble: bool = False, site: str | None = None, threshold_policy: str | None = None,
          replicas: str | int = 1, max_replicas: int = 4, max_batch_size: int = 16, batch_wait_ms: float = 5.0,
          gpus_per_replica: float = 0, max_upload_mb: float = Limits.max_upload_mb,
          upload_timeout_s: float = Limits.upload_timeout_s, decode_timeout_s: float = Limits.decode_timeout_s,
          decode_workers: int = Limits.decode_workers, inflight_mb: float = Limits.inflight_mb,
          max_ongoing_requests: int | None = None, max_queued_requests: int = 128,
          allowed_hosts=(), allow_origins=(), host: str = "127.0.0.1"):
    """The Serve application. ``replicas='auto'`` autoscales between 1 and ``max_replicas``.

    ``host`` is the address Serve binds (for the Host allowlist); requests beyond
    ``max_ongoing_requests`` per replica wait at the proxy, and beyond ``max_queued_requests``
    they get 503 with Retry-After.
    """
    choice = choose_model(study_dir, arm, checkpoint, ensemble=str(ensemble).lower() in ("true", "1", "yes"),
                          site=site, policy=threshold_policy)
    limits = Limits(max_upload_mb=float(max_upload_mb), upload_timeout_s=float(upload_timeout_s),
                    decode_timeout_s=float(decode_timeout_s), decode_workers=int(decode_workers),
                    inflight_mb=float(inflight_mb), allowed_hosts=_names(allowed_hosts),
                    allow_origins=_names(allow_origins), bound_host=str(host))
    ongoing = int(max_ongoing_requests or max(64, 4 * int(max_batch_size)))
    options: dict = {"ray_actor_options": {"num_cpus": 1, "num_gpus": float(gpus_per_replica)},
                     "max_ongoing_requests": ongoing, "max_queued_requests": int(max_queued_requests),
                     "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S)}
    if str(replicas) == "auto":
        options["autoscaling_config"] = {"min_replicas": 1, "max_replicas": int(max_replicas),
                                         "target_ongoing_requests": int(max_batch_size)}
    else:
        options["num_replicas"] = int(replicas)
    return CXRServer.options(**options).bind(choice, int(max_batch_size), float(batch_wait_ms), limits)


def serve_blocking(args) -> None:
    """``cxr-ray serve``: start Serve on host:port and block until Ctrl-C or SIGTERM."""
    from . import runtime
    if not os.environ.get("RAY_ADDRESS"):
        port_is_free(args.host, args.port)
    if args.host not in LOCAL_HOSTS:
        print(f"WARNING: binding {args.host}: the API has no authentication; anyone who can reach this address "
              "can send images to the model. Put it behind an authenticating proxy, and name the host clients "
              "use with --allowed-host.", flush=True)
    app = build(args.dir, args.arm, args.checkpoint, args.ensemble, args.site, args.threshold_policy, args.replicas,
                args.max_replicas, args.max_batch_size, args.batch_wait_ms, args.gpus_per_replica, args.max_upload_mb,
                upload_timeout_s=args.upload_timeout_s, decode_timeout_s=args.decode_timeout_s,
                allowed_hosts=args.allowed_host, allow_origins=args.allow_origin, host=args.host)
    runtime.connect()
    signal.signal(signal.SIGTERM, _interrupt)  # `kill`, `docker stop`, systemd: the same clean stop as Ctrl-C
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name="cxr-ray", route_prefix="/")
        print(f"serving on http://{args.host}:{args.port}/  (API docs at /docs; Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        print("stopped", flush=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def port_is_free(host: str, port: int) -> None:
    """Serve's proxy on a port that another server holds fails quietly in Ray (requests would reach
    the other server): refuse to start instead, naming the port."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ServingError(f"cannot serve on {host}:{port}: {e.strerror}; stop what holds the port or choose "
                               "another with --port") from None
