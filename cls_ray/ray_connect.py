"""Connecting to Ray: the cluster the user means, never a dead one that a crashed instance left behind.

``ray.init()`` with no address connects to ``RAY_ADDRESS`` if set (``ray job submit`` sets it), else to the address
the last ``ray start`` on this machine recorded in ``/tmp/ray/ray_current_cluster``, else starts a local instance.
A ``ray start`` head that was killed (or a ``ray.cluster_utils.Cluster`` whose process died) leaves that file behind,
and ``ray.init()`` then retries the dead address for minutes before failing. cls-ray keeps Ray's order but checks
that something answers at the recorded address first; if nothing does, it says so and starts a local instance.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import ray

from cls_ray import ray_internals, storage
from cls_ray.progress import forward_worker_output, ray_logging_level

logger = logging.getLogger(__name__)


def recorded_address() -> tuple[Path, str | None]:
    """The file ``ray.init()`` reads when given no address, and the address it records (``None`` if none)."""
    path = ray_internals.ray_address_file()  # where ray.init() itself looks (a Ray internal)
    try:
        address = path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return path, None
    return path, address or None


def answers(address: str, timeout_s: float = 2.0) -> bool:
    """Whether anything accepts a TCP connection at ``host:port`` (a live GCS does at once)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def ensure_ray(*, existing_cluster: bool = False) -> None:
    """Connect this process to Ray once: ``RAY_ADDRESS``, else a live ``ray start`` cluster on this machine, else a
    new local instance. ``existing_cluster=True`` (``cls-ray serve --detach``) refuses to start a local one.

    Token authentication is Ray's own: connecting without an explicit address lets ``ray.init`` pick up the token
    of a ``ray start`` cluster (``~/.ray/auth_token`` or ``RAY_AUTH_TOKEN``)."""
    if ray.is_initialized():
        return
    # S3-compatible stores: a local instance inherits this process's environment; a cluster started elsewhere gets
    # the variables cls-ray chose through this job's runtime env (Ray Data tasks, train workers, trials, replicas).
    compat = storage.s3_compat_env()
    runtime_env = {"env_vars": compat} if compat else None
    # The CLI's quiet console (cls_ray.progress): worker and actor output stays in Ray's log files unless -v.
    options = {
        "runtime_env": runtime_env,
        "log_to_driver": forward_worker_output(),
        "logging_level": ray_logging_level(),
    }
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**options)
        return
    path, address = recorded_address()
    if address is not None and answers(address):
        ray.init(address="auto" if existing_cluster else None, **options)
        return
    if address is not None:
        logger.warning(
            "ignoring %s: it records a Ray cluster at %s, but nothing answers there (a Ray instance "
            "that was killed or crashed left it; `ray stop` removes it)",
            path,
            address,
        )
    if existing_cluster:
        stale = f" ({path} names {address}, where nothing answers)" if address else ""
        raise ConnectionError(f"no running Ray cluster to connect to{stale}")
    ray.init(address="local", log_to_driver=forward_worker_output(), logging_level=ray_logging_level())
