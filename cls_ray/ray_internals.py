"""The one place cls-ray touches Ray's private APIs: each use, why no public API does it, and its fallback.

Everything else in cls-ray uses Ray's public API. What is left here has no public equivalent in Ray 2.60. Each use
is wrapped so that a Ray upgrade which moves, renames or reshapes it logs one warning (once per process and use)
and falls back to a safe behaviour, instead of breaking a run:

* :func:`ray_address_file`: ``ray._common.utils.get_ray_address_file``, the file where ``ray.init()`` with no
  address finds the cluster the last ``ray start`` recorded (:mod:`cls_ray.ray_connect` checks that address
  answers before connecting). Fallback: Ray 2.60's rule, kept here (``$RAY_TMPDIR``, else ``$TMPDIR`` on Linux,
  else ``/tmp``; then ``ray/ray_current_cluster``).
* :func:`serve_http_address`: ``ray.serve.context._get_global_client().http_config``, where a running Serve's
  proxies listen: ``serve.start`` ignores new HTTP options when Serve already runs, and ``serve.status()`` does not
  report them. Fallback: ``None``; the caller reports the host and port it asked for.
* :func:`execution_callback_base`, :func:`add_execution_callback`, :func:`data_progress`: Ray Data's
  ``ExecutionCallback`` hook (``DataContext.custom_execution_callback_classes``), the streaming executor's
  ``_topology`` and the operators' progress counters (:data:`DATA_PROGRESS_COUNTERS`), which the idle backoff of
  the scheduling loop reads (:mod:`cls_ray.data.backoff`). Fallback: the backoff is not installed, or turns itself
  off at its first step; Ray Data then runs as it does without cls-ray.
* :func:`trial_index`: the ``{n}_{params}`` format of Tune's ``Trial.experiment_tag`` (``n``: the order in which
  the searcher created the trial), which names trials ``trial_0001_...`` deterministically so a resumed experiment
  keeps its names. Fallback: ``None``; trials are named after their public ``trial_id``.
* :func:`stop_tune_credential_propagation`: ``ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE``, the
  variables Tune copies from the driver into every trial's runtime env, AWS credentials among them (which Ray's
  runtime-env agent then logs in clear). Fallback: one warning; Tune keeps copying them.
* :func:`ray_jemalloc_library`: ``ray/core/libjemalloc.so`` inside Ray's wheel, the allocator cls-ray preloads
  into CPU training workers (``train.cpu_allocator``). Fallback: ``None``; the workers keep the system allocator.

Public APIs replaced what used to be private: ``DataConfig.default_ingest_options()`` gives the evaluation splits
their execution options (:mod:`cls_ray.train.splits`), and ``@serve.ingress(create_api)`` builds the ingress's
FastAPI app on each replica, its routes reading the replica through ``serve.get_replica_context().servable_object``
(:mod:`cls_ray.serve.api`).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_WARNED: set[str] = set()
_WARNED_LOCK = threading.Lock()

DATA_PROGRESS_COUNTERS = (
    "num_inputs_received",
    "num_tasks_submitted",
    "num_tasks_finished",
    "num_task_outputs_generated",
    "num_outputs_taken",
    "num_external_inqueue_blocks",
    "num_external_outqueue_blocks",
)
"""Counters of Ray Data's ``OpRuntimeMetrics`` that move whenever an operator makes progress."""


def _first_time(use: str) -> bool:
    with _WARNED_LOCK:
        if use in _WARNED:
            return False
        _WARNED.add(use)
        return True


def _fall_back(
    use: str, internal: str, exc: BaseException | None, consequence: str, *, level: int = logging.WARNING
) -> None:
    """Log, once per process and ``use``, that a Ray internal is not as cls-ray expects and what it does instead."""
    if not _first_time(use):
        return
    import ray

    why = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    logger.log(level, "Ray %s: %s is not what cls-ray expects%s; %s", ray.__version__, internal, why, consequence)


# ---------------------------------------------------------------------------------------------------------------
# Ray core


def _default_ray_address_file() -> Path:
    """Ray 2.60's own rule (``ray._common.utils.get_default_system_temp_dir``), for when it cannot be imported."""
    if "RAY_TMPDIR" in os.environ:
        temp = os.environ["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and "TMPDIR" in os.environ:
        temp = os.environ["TMPDIR"]
    elif sys.platform.startswith(("linux", "darwin")):
        temp = "/tmp"
    else:
        temp = tempfile.gettempdir()
    return Path(temp) / "ray" / "ray_current_cluster"


def ray_address_file() -> Path:
    """The file ``ray.init()`` with no address reads: the address the last ``ray start`` on this machine recorded."""
    try:
        from ray._common.utils import get_ray_address_file

        return Path(get_ray_address_file(None))
    except Exception as exc:  # noqa: BLE001 - moved, renamed or re-signed: all mean "use the known rule"
        path = _default_ray_address_file()
        _fall_back(
            "ray_address_file",
            "ray._common.utils.get_ray_address_file",
            exc,
            f"looking for the recorded cluster address at {path} (Ray 2.60's location)",
        )
        return path


def ray_jemalloc_library() -> str | None:
    """The ``libjemalloc.so`` Ray's wheel ships for its own workers, or ``None`` where this installation has none."""
    import ray

    library = os.path.join(os.path.dirname(ray.__file__), "core", "libjemalloc.so")
    if os.path.isfile(library):
        return library
    # Ray's Linux wheels ship it; elsewhere (macOS) its absence is expected, not a sign of a changed Ray.
    level = logging.WARNING if sys.platform.startswith("linux") else logging.INFO
    _fall_back(
        "ray_jemalloc_library",
        f"the jemalloc library of Ray's wheel ({library})",
        None,
        "CPU training workers use the system allocator (train.cpu_allocator=system says so explicitly)",
        level=level,
    )
    return None


# ---------------------------------------------------------------------------------------------------------------
# Ray Serve


def serve_http_address() -> tuple[str, int] | None:
    """Host and port the running Serve instance's proxies listen on (``None`` if that cannot be read).

    ``serve.start(http_options=...)`` applies its options only when it starts Serve; a Serve already running in the
    cluster keeps its own, and no public API says which (``serve.status()`` reports proxies, not their address).
    """
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        return str(http.host), int(http.port)
    except Exception as exc:  # noqa: BLE001 - an internal API: any failure means "report what was asked for"
        _fall_back(
            "serve_http_address",
            "ray.serve.context._get_global_client().http_config",
            exc,
            "reporting the configured serve.host and serve.port as the served address",
        )
        return None


# ---------------------------------------------------------------------------------------------------------------
# Ray Data


def execution_callback_base() -> type | None:
    """Ray Data's ``ExecutionCallback`` (the hook called after every step of the streaming executor), or ``None``."""
    try:
        from ray.data._internal.execution.execution_callback import ExecutionCallback
    except Exception as exc:  # noqa: BLE001 - moved or renamed
        _fall_back(
            "execution_callback",
            "ray.data._internal.execution.execution_callback.ExecutionCallback",
            exc,
            "the idle backoff of Ray Data's scheduling loop is off (data.idle_backoff)",
        )
        return None
    return ExecutionCallback


def add_execution_callback(context: Any, callback: type) -> bool:
    """Register ``callback`` in a ``DataContext`` (once); ``False`` if the context has no such hook."""
    classes = getattr(context, "custom_execution_callback_classes", None)
    if not isinstance(classes, list):
        _fall_back(
            "execution_callback_classes",
            "DataContext.custom_execution_callback_classes",
            None,
            "the idle backoff of Ray Data's scheduling loop is off (data.idle_backoff)",
        )
        return False
    if callback not in classes:
        classes.append(callback)
    return True


def data_progress(executor: Any) -> tuple[int, ...] | None:
    """The :data:`DATA_PROGRESS_COUNTERS` of every operator of a running streaming executor (``()`` before it has
    operators); ``None`` where Ray's executor no longer has them."""
    try:
        topology = executor._topology
        if not topology:
            return ()
        return tuple(int(getattr(op.metrics, name)) for op in topology for name in DATA_PROGRESS_COUNTERS)
    except Exception as exc:  # noqa: BLE001 - a renamed attribute or counter, a changed type
        _fall_back(
            "data_progress",
            "Ray Data's StreamingExecutor._topology / operator metrics counters",
            exc,
            "the idle backoff of the scheduling loop turns itself off (data.idle_backoff)",
        )
        return None


# ---------------------------------------------------------------------------------------------------------------
# Ray Tune


def trial_index(trial: Any) -> int | None:
    """The 1-based order in which Tune's searcher created ``trial`` (the ``n`` of ``Trial.experiment_tag``, which
    Ray 2.60 writes as ``{n}_{params}``); ``None`` where the tag does not start with it."""
    try:
        return int(str(trial.experiment_tag).split("_", 1)[0])
    except (AttributeError, ValueError) as exc:
        _fall_back(
            "trial_index",
            "the '{n}_{params}' format of Tune's Trial.experiment_tag",
            exc,
            "trials are named after their trial_id instead of a number",
        )
        return None


CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")
"""The AWS credential variables Ray Tune copies from the driver into every trial's runtime env."""


def stop_tune_credential_propagation() -> bool:
    """Stop Ray Tune from copying the driver's AWS credential variables into each trial actor's runtime env.

    Ray 2.60's ``ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE`` names them, and Ray's runtime-env agent
    then logs that runtime env, secret key included, in ``runtime_env_agent.log`` (readable from the dashboard and
    ``ray logs``). cls-ray takes credentials only from each node's own environment or files (a local cluster
    inherits the driver's; a remote node has its own, as every other Ray worker there needs them), so removing the
    names loses nothing. No public API controls the propagation. Returns whether the names were removed; where the
    set is missing or reshaped, one warning says Tune may still copy them."""
    try:
        from ray.tune.execution import class_cache

        names = class_cache.ENV_VARS_TO_PROPAGATE
        if not isinstance(names, set):
            raise TypeError(f"expected a set, found {type(names).__name__}")
        names.difference_update(CREDENTIAL_VARIABLES)
        return True
    except Exception as exc:  # noqa: BLE001 - moved, renamed or reshaped: warn once, keep running
        _fall_back(
            "tune_credential_propagation",
            "ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE",
            exc,
            "Ray Tune may copy the AWS credential variables into trial runtime envs, which Ray's runtime-env agent "
            "logs; prefer instance roles or credential files on the nodes",
        )
        return False
