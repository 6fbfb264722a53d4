"""Connecting to Ray: a local instance started the way studies need it, or a cluster.

Every environment variable cxr-ray sets lives in ``RAY_ENVIRONMENT`` below, applied in one place
(``connect``): to this process and, through the job's runtime environment, to every Ray worker of
the job (Tune trials, Train controllers and workers), on a laptop or a cluster alike.
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile

import numpy as np
import ray

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


def put_data(prepared: Prepared, external: dict[str, np.ndarray] | None = None) -> ray.ObjectRef:
    """Place the decoded images and split rows in the object store once per run, with the decoded
    images of the study's ``external`` sets by name (its final runs score them at their last epoch).

    Workers on the same node then share one copy (zero-copy numpy); other nodes fetch it.
    """
    return ray.put({
        "images": np.ascontiguousarray(prepared.cache.images),
        "labels": prepared.cache.index["label"].to_numpy(np.int8),
        **{name: rows for name, rows in prepared.rows.items()},
        "external": {name: np.ascontiguousarray(images) for name, images in (external or {}).items()},
    })
