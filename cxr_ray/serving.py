"""The Serve deployment of a study's model: FastAPI ingress, server-side batching, the routes, the
application builder (``build``, also ``serve_app.py``) and ``cxr-ray serve``.

What it puts together, one module each: which model and operating point (serve_model), the
model's answers and Grad-CAM (serve_predictor), decoding in child processes (serve_decoders),
what a request may cost and who may send it (serve_limits), and the API contract and pages
(serve_api). Every bad input gets a 4xx JSON error in one schema; a full replica answers 503
with Retry-After. The process that builds the application only chooses the model: torch is
loaded by the replicas, so `cxr-ray serve` refuses a bad study or a held port in seconds.

(No `from __future__ import annotations` here: FastAPI under Serve's ingress must see real types.)
"""

import asyncio
import inspect
import logging
import math
import os
import signal
import socket
import time
from collections import Counter

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.config import BackpressureConfig
from starlette.exceptions import HTTPException as StarletteHTTPException

from .serve_api import (BATCH_BODY, BINARY, CARD_RESPONSES, DOCS_ASSETS, GET_ERRORS, IMAGE_BODY, UPLOAD_ERRORS,
                        UPLOAD_PAGE, BatchResult, Health, ModelInfo, Prediction, Stats, errors)
from .serve_decoders import DecodeClock, DecodePool
from .serve_limits import (LOCAL_HOSTS, RETRY_AFTER_S, WORKER_WAIT_S, BytesInFlight, Guard, Limits, RequestError,
                           TrustPolicy, Upload, error_response, read_uploads)
from .serve_model import ModelChoice, ServingError, choose_model

log = logging.getLogger("ray.serve")

MAX_BATCH_SIZE = 16  # images per forward pass of a replica (@serve.batch)
BATCH_WAIT_MS = 5.0  # how long a batch waits to fill


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
    async def __init__(self, choice: ModelChoice, max_batch_size: int, batch_wait_ms: float, limits: Limits):
        from .serve_predictor import Predictor  # torch: the replica's alone (a driver only chooses the model)
        Guard.trust = TrustPolicy.of(limits)
        self.predictor = Predictor(choice)
        self.card = choice.card
        self.limits = limits
        self.in_flight = BytesInFlight(int(limits.inflight_mb * 2**20))
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

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_MS / 1000)  # set again in __init__
    async def batched(self, arrays: list[np.ndarray]) -> list[float]:
        self.batch_sizes[len(arrays)] += 1
        return [float(p) for p in await asyncio.to_thread(self.predictor.probabilities, arrays)]

    def _clock(self) -> DecodeClock:
        return DecodeClock(self.limits.decode_timeout_s)

    async def _score(self, name: str, data: bytes, clock: DecodeClock) -> dict:
        return self.predictor.result(await self.batched(await self.decoders.decode(data, name, clock)))

    async def _one_file(self, request: Request, upload: Upload) -> tuple[str, bytes]:
        files = await read_uploads(request, self.limits, upload)
        if len(files) != 1:
            raise RequestError(400, f"{len(files)} files sent: send one (use /v1/predict/batch for several)")
        return files[0]

    @api.post("/v1/predict", summary="P(pneumonia) for one image (raw body or multipart file)",
              response_model=Prediction, responses=UPLOAD_ERRORS, openapi_extra=IMAGE_BODY)
    async def predict(self, request: Request):
        upload = Upload(self.in_flight)
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
        upload = Upload(self.in_flight)
        try:
            files = await read_uploads(request, self.limits, upload)
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
        upload = Upload(self.in_flight)
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
    async def model_info(self, request: Request):
        meta = self.predictor.meta
        root = request.scope.get("root_path", "").rstrip("/")
        return {"model": self.predictor.identity, "threshold": self.predictor.threshold,
                "model_card": f"{root}/v1/model/card" if self.card.json else None,
                "operating_point": self.predictor.operating_point,
                "preprocessing": {k: meta[k] for k in ("image_size", "mean", "std", "channels", "geometry")},
                "class_names": meta["class_names"], "test_metrics": finite(self.predictor.test_metrics),
                "external_metrics": {k: finite(v) for k, v in self.predictor.external_metrics.items()},
                "validation_metrics": finite(meta["metrics"])}

    @api.get("/v1/model/card", summary="The model card: intended use, data, selection, metrics, limits",
             response_model=None, responses=CARD_RESPONSES)
    async def model_card(self, request: Request):
        if not self.card.json:
            return error_response(request, RequestError(404, f"no model card: {self.card.missing}"))
        if "text/markdown" in request.headers.get("accept", ""):
            return Response(self.card.markdown, media_type="text/markdown; charset=utf-8")
        return JSONResponse(self.card.json)

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
          prevalence: float | str | None = None, replicas: str | int = 1, max_replicas: int = 4, max_batch_size: int = MAX_BATCH_SIZE,
          batch_wait_ms: float = BATCH_WAIT_MS, gpus_per_replica: float = 0, max_upload_mb: float = Limits.max_upload_mb,
          upload_timeout_s: float = Limits.upload_timeout_s, decode_timeout_s: float = Limits.decode_timeout_s,
          decode_workers: int = Limits.decode_workers, inflight_mb: float = Limits.inflight_mb,
          max_ongoing_requests: int | None = None, max_queued_requests: int = 128,
          allowed_hosts=(), allow_origins=(), host: str = Limits.bound_host):
    """The Serve application; its defaults are cxr-ray's (``cxr-ray serve`` and ``serve_app`` pass
    only what they are given). ``replicas='auto'`` autoscales between 1 and ``max_replicas``.

    ``host`` is the address Serve binds (for the Host allowlist); requests beyond
    ``max_ongoing_requests`` per replica wait at the proxy, and beyond ``max_queued_requests``
    they get 503 with Retry-After.
    """
    choice = choose_model(study_dir, arm, checkpoint, ensemble=str(ensemble).lower() in ("true", "1", "yes"),
                          site=site, policy=threshold_policy, prevalence=prevalence)
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
    """``cxr-ray serve``: start Serve on host:port and block until Ctrl-C or SIGTERM. The command
    line's options are build()'s, by name; an option it leaves out (None) keeps build()'s default."""
    from . import runtime
    options = {k: v for k, v in vars(args).items() if k in inspect.signature(build).parameters and v is not None}
    host = options.setdefault("host", Limits.bound_host)
    if not os.environ.get("RAY_ADDRESS"):
        port_is_free(host, args.port)
    if host not in LOCAL_HOSTS:
        print(f"WARNING: binding {host}: the API has no authentication; anyone who can reach this address "
              "can send images to the model. Put it behind an authenticating proxy, and name the host clients "
              "use with --allowed-host.", flush=True)
    app = build(**options)
    runtime.connect()
    signal.signal(signal.SIGTERM, _interrupt)  # `kill`, `docker stop`, systemd: the same clean stop as Ctrl-C
    try:
        serve.start(http_options={"host": host, "port": args.port})
        serve.run(app, name="cxr-ray", route_prefix="/")
        print(f"serving on http://{host}:{args.port}/  (API docs at /docs; Ctrl-C to stop)", flush=True)
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
