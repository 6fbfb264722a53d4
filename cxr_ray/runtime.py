"""Connecting to Ray: a local instance started the way studies need it, or a cluster.

A local instance starts with the dashboard on 127.0.0.1 and a free port, and exports
RAY_API_SERVER_ADDRESS before ``ray.init`` so every worker inherits it: Ray Train's
placement-group cleaner asks the State API (served by the dashboard) to release the
workers of a trial that ASHA stopped. Without it the next trial waits forever for
resources (see ../shared/RAY_NOTES.md).
"""
from __future__ import annotations

import os
import socket

import numpy as np
import ray

from .data import Prepared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(num_cpus: int | None = None, num_gpus: int | None = None, quiet: bool = False) -> str:
    """Start or join Ray; returns the dashboard URL. ``RAY_ADDRESS`` selects a cluster."""
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ctx = ray.init(log_to_driver=True)
        else:
            port = free_port()
            os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
            ctx = ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True,
                           dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=True)
        url = ctx.dashboard_url or ""
    else:
        url = ray.get_runtime_context().get_node_id() and (ray.worker.get_dashboard_url() or "")
    url = url if url.startswith("http") or not url else f"http://{url}"
    if not quiet:
        print(f"Ray dashboard: {url or '(not running)'}", flush=True)
    return url


def put_data(prepared: Prepared) -> ray.ObjectRef:
    """Place the decoded images and split rows in the object store once per run.

    Workers on the same node then share one copy (zero-copy numpy); other nodes fetch it.
    """
    return ray.put({
        "images": np.ascontiguousarray(prepared.cache.images),
        "labels": prepared.cache.index["label"].to_numpy(np.int8),
        **{name: rows for name, rows in prepared.rows.items()},
    })
