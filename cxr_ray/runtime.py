"""Connecting to Ray: a local instance started the way studies need it, or a cluster.

Every environment variable cxr-ray sets for Ray and its workers lives in ``RAY_ENVIRONMENT`` below,
applied in one place (``connect``): to this process and, through the job's runtime environment, to
every Ray worker of the job (Tune trials, Train controllers and workers), on a laptop or a cluster
alike. The two other places that set one do so for a single process and what it starts: the
serving decoder processes run with one thread each (serve_decoders.py), and
benchmarks/bench_asha.py points its own run at a scratch image cache (CXR_RAY_CACHE).
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile

import numpy as np
import ray

from . import data
from .data import Prepared

RAY_ENVIRONMENT = {
    # The dashboard's Train view lists Train runs (DDP trials, `cxr-ray train`) only with this on.
    "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
    # Tune's default console output (experiment boxes, result tables) gives way to console.py's lines.
    "RAY_AIR_NEW_OUTPUT": "0",
    # A Train controller polls its workers this often; at Ray's default (2 s) a finished run waits
    # up to 2 s to notice, paid once per DDP trial.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
# Local instances only (no spot preemption on this machine): one actor fewer per Train run.
LOCAL_ENVIRONMENT = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(num_cpus: int | None = None, num_gpus: int | None = None, quiet: bool = False,
            verbose: bool = False, log_file: str | None = None) -> str:
    """Start or join Ray; returns the dashboard URL. ``RAY_ADDRESS`` selects a cluster.

    A local instance starts with the dashboard on 127.0.0.1 and a free port, and sets
    RAY_API_SERVER_ADDRESS for every worker: Ray Train's placement-group cleaner asks the State API
    (served by the dashboard) to release the workers of a trial that ASHA stopped; without it the
    next trial waits forever for resources. Unless ``verbose``, the workers' output stays in Ray's
    log files (/tmp/ray/session_latest/logs) and Ray's own messages below ERROR go to ``log_file``;
    the console prints what matters (console.py).
    """
    if ray.is_initialized():
        url = ray._private.worker.get_dashboard_url()
    else:
        local = not os.environ.get("RAY_ADDRESS")
        defaults = RAY_ENVIRONMENT | (LOCAL_ENVIRONMENT if local else {})
        env = {k: os.environ.get(k, v) for k, v in defaults.items()}  # a value the user set wins
        kwargs: dict = {"log_to_driver": verbose, "logging_level": logging.INFO}
        if not verbose:
            log_file = log_file or os.path.join(tempfile.gettempdir(), "cxr-ray", f"driver-{os.getpid()}.log")
            send_ray_logs_to(log_file)
        if local:
            port = free_port()
            env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
            kwargs |= {"num_cpus": num_cpus, "num_gpus": num_gpus, "include_dashboard": True,
                       "dashboard_host": "127.0.0.1", "dashboard_port": port}
        os.environ.update(env)  # this process: a TorchTrainer built here (`cxr-ray train`) reads them too
        ctx = ray.init(runtime_env={"env_vars": env}, **kwargs)
        url = ctx.dashboard_url
    if url and not url.startswith("http"):
        url = f"http://{url}"
    if not quiet:
        print(f"Ray dashboard: {url or '(not running)'}" + (f"  (Ray's messages: {log_file})" if log_file else ""),
              flush=True)
    return url or ""


def send_ray_logs_to(path: str) -> None:
    """Ray's driver-side messages go to ``path``; only its errors still reach the console.
    ("ray.serve" has its own console handler and does not pass records up to "ray".)"""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for logger in (logging.getLogger("ray"), logging.getLogger("ray.serve")):
        for handler in logger.handlers:
            handler.setLevel(logging.ERROR)
        if logger.name == "ray" or not logger.propagate:
            logger.addHandler(to_file)


def worker_task(fn, resources, *args):
    """``fn(*args)`` as one Ray task with a trial worker's ``resources`` (spec.Resources: its CPUs, GPU
    and custom resources) on the cluster this process joins, on a node that reads the study's
    storage: the caller ships the inputs and never imports torch itself."""
    connect(quiet=True)
    r = resources
    task = ray.remote(fn).options(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker,
                                  resources=r.worker_resources or None)
    return ray.get(task.remote(*args))


SHIP_LIMIT_ENV = "CXR_RAY_SHIP_LIMIT_MB"
SHIP_LIMIT_MB = 1024  # caches above this are memory-mapped by every node instead of shipped


def ship_limit() -> int:
    """Bytes of decoded images that still travel through the object store (``$CXR_RAY_SHIP_LIMIT_MB``)."""
    return int(float(os.environ.get(SHIP_LIMIT_ENV, SHIP_LIMIT_MB)) * 2**20)


def put_data(prepared: Prepared, external: dict[str, np.ndarray] | None = None) -> ray.ObjectRef:
    """Place the training data where every worker finds it, once per run, with the decoded images
    of the study's ``external`` sets by name (its final runs score them at their last epoch).

    Up to ``ship_limit()`` bytes the decoded images go into the object store (workers on a node
    share one copy, zero-copy numpy; other nodes fetch it). Above it, shipping would hold the whole
    array in each node's object store (images x size^2 bytes: 100,000 images at 224 px are 5 GB),
    so workers memory-map the cache file instead: this node's own file on a single-node instance;
    on a cluster, the file under a cache root every node mounts (spec ``data.cache``), or else a
    copy published once to the study's storage (``Prepared.publish_to``) that each node reads from
    there (memory-mapped on a shared file system, downloaded once per node from object storage).
    """
    images = prepared.cache.images
    common = {"labels": prepared.cache.index["label"].to_numpy(np.int8),
              **{name: rows for name, rows in prepared.rows.items()},
              "external": {name: np.ascontiguousarray(a) for name, a in (external or {}).items()}}
    if images.nbytes <= ship_limit():
        return ray.put({"images": np.ascontiguousarray(images), **common})
    location = str(prepared.cache.dir / "images.npy")
    several_nodes = bool(os.environ.get("RAY_ADDRESS")) or sum(n["Alive"] for n in ray.nodes()) > 1
    if several_nodes and prepared.publish_to:
        location = data.publish_images(prepared.cache, prepared.publish_to)
    print(f"decoded images: {images.nbytes / 2**30:.2f} GiB, above the {ship_limit() / 2**30:.2f} GiB shipped "
          f"through the object store: every worker memory-maps {location}", flush=True)
    return ray.put({"images_uri": location, **common})


def fetch_data(ref: ray.ObjectRef) -> dict:
    """A worker's view of ``put_data``'s data: the shipped array, or the cache file memory-mapped."""
    found = dict(ray.get(ref))
    if "images_uri" in found:
        found["images"] = data.map_images(found.pop("images_uri"))
    return found
