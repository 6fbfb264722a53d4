"""What one request may cost a replica, and who may send it.

Uploads are read under a size limit, an upload deadline and the replica's bytes-in-flight budget,
before anything is decoded; non-file form fields get a small limit of their own (the API reads
only files). A Host allowlist and a same-origin rule (``Guard``) keep web pages the operator opens,
and DNS rebinding, away from the API. Every refusal is a ``RequestError``: a 4xx (or a 503 with
Retry-After when the replica is full) answered in the one error schema, ``{error, file, request}``,
whose words name the request and the file and hold no decoder internals (those go to the log).
"""
import asyncio
import ipaddress
import json
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.formparsers import MultiPartException, MultiPartParser

from . import imaging

log = logging.getLogger("ray.serve")

RAW_TYPES = {"image/jpeg", "image/jpg", "image/png", "application/dicom"}
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
MAX_BATCH_FILES = 256
MAX_FORM_FIELDS = 16
MAX_FIELD_BYTES = 64 * 1024  # one non-file form field: the API reads none, so a small bound (Starlette's is 1 MiB)
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


class RequestError(Exception):
    """A request refused: its HTTP status, words for the client, the file it concerns."""

    def __init__(self, status: int, message: str, file: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.file, self.retry_after = status, message, file, retry_after


def image_error(e: imaging.ImageError, name: str) -> RequestError:
    """415 for bytes of no accepted format, 422 for an accepted format that cannot be used; the
    decoder's own words go to the log, not to the client."""
    if e.detail:
        log.info("refused %s: %s [%s]", name, e, e.detail)
    return RequestError(415 if isinstance(e, imaging.UnsupportedFormat) else 422, str(e), name)


def error_response(request: Request, e: RequestError) -> JSONResponse:
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
    return JSONResponse({"error": e.message, "file": e.file, "request": f"{request.method} {request.url.path}"},
                        status_code=e.status, headers=headers)


# ----------------------------------------------------------------------------- reading uploads

class BytesInFlight:
    """Bytes of request bodies a replica holds at once; a request that would exceed ``limit`` gets a 503."""

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
    """One request's body as read under the limits; ``release()`` returns its bytes to the replica."""
    in_flight: BytesInFlight
    held: int = 0

    def release(self) -> None:
        self.in_flight.give(self.held)
        self.held = 0


async def read_uploads(request: Request, limits: Limits, upload: Upload) -> list[tuple[str, bytes]]:
    """The images of a request: a raw body (image/jpeg, image/png, application/dicom) or multipart
    files. The size limit, the upload deadline and the replica's bytes in flight are enforced while
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
            upload.in_flight.take(len(chunk))
            upload.held += len(chunk)
            yield chunk

    if content_type != "multipart/form-data":
        body = b"".join([chunk async for chunk in chunks()])
        if not body:
            raise RequestError(400, "empty request body")
        return [("body", body)]
    # Starlette applies max_part_size to non-file fields only; files are bounded by the request's limit.
    parser = MultiPartParser(request.headers, chunks(), max_files=MAX_BATCH_FILES, max_fields=MAX_FORM_FIELDS,
                             max_part_size=MAX_FIELD_BYTES)
    try:
        form = await parser.parse()
    except RequestError:
        raise
    except MultiPartException as e:
        if "exceeded maximum size" in e.message:  # Starlette's words for a field over max_part_size
            raise RequestError(413, f"a non-file form field exceeds the {MAX_FIELD_BYTES // 1024} KiB limit "
                                    "(send images as file fields)") from None
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


# ----------------------------------------------------------------------------- Host and Origin

@dataclass(frozen=True)
class TrustPolicy:
    """Which Host names are this server's and which web origins may call it cross-origin."""
    hosts: frozenset[str]
    any_ip: bool  # bound to a wildcard address: any IP literal is a name of this server
    origins: frozenset[str]

    @classmethod
    def of(cls, limits: Limits) -> "TrustPolicy":
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

    The trust policy is per replica process, set by the deployment before any request arrives.
    """
    trust: TrustPolicy | None = None

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or Guard.trust is None:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host, origin = headers.get("host", ""), headers.get("origin")
        request = f"{scope['method']} {scope['path']}"
        if not Guard.trust.host_ok(host):
            return await self._refuse(send, 400, f"Host {host!r} is not a name of this server (allowed: localhost, "
                                                 "the bound address, --allowed-host names)", request)
        if origin is None or Guard.trust.same_origin(origin, host):
            return await self.app(scope, receive, send)
        if not Guard.trust.origin_allowed(origin):
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
