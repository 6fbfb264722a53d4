"""Images decoded in child processes of the replica (``python -m cxr_ray.imaging``), so a hostile
upload costs bounded time and memory: the header bounds of ``imaging``, a per-request limit on
decoder time (an overrun kills the decoder process) and a memory limit per process.

The decoder processes run with one thread each (their environment says so): each decodes one image
at a time, and the replica's CPU is shared with the model.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import sys
from dataclasses import dataclass

import numpy as np

from . import imaging
from .serve_limits import RETRY_AFTER_S, WORKER_WAIT_S, RequestError, image_error

log = logging.getLogger("ray.serve")


@dataclass
class DecodeClock:
    """Decoder seconds one request may still use (its images share them)."""
    left: float


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

    async def decode(self, data: bytes, name: str, clock: DecodeClock) -> np.ndarray:
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
