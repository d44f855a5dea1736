"""Building, starting and describing the Ray Serve application of a model package.

Three ways to run the same application:

* ``cls-ray serve MODEL_URI`` (:func:`serve_model`), or :func:`start_serving` / :func:`stop_serving` from Python;
* ``serve run cls_ray.serve.app:build_app model_uri=URI [max_batch_size=16 ...]``: :func:`build_app` is a Serve
  application builder whose ``args`` are ``model_uri`` plus any :class:`ServeConfig` field;
* ``serve run cls_ray.serve.app:app`` with ``CLS_RAY_MODEL_URI`` (and optionally ``CLS_RAY_CONFIG``, a cls-ray
  YAML config) in the environment; or ``serve deploy`` / a KubeRay RayService with the YAML written by
  :func:`write_serve_config` (``cls-ray serve MODEL_URI --write-config FILE``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
import typing
from typing import Any

import yaml
from ray import serve
from ray.serve import Application

from cls_ray import ray_internals, storage
from cls_ray.config import ConfigError, ServeConfig, load_config, section_from_dict
from cls_ray.package import read_package_meta
from cls_ray.serve.deployment import (
    INGRESS_DEPLOYMENT,
    MODEL_DEPLOYMENT,
    SINGLE_DEPLOYMENT,
    ClassifierIngress,
    ClassifierModel,
    ClassifierServer,
)

logger = logging.getLogger(__name__)

MODEL_URI_ENV = "CLS_RAY_MODEL_URI"
CONFIG_ENV = "CLS_RAY_CONFIG"
BUILDER_IMPORT_PATH = "cls_ray.serve.app:build_app"
HTTP_LEVEL_FIELDS = ("host", "port", "app_name", "route_prefix", "request_timeout_s")
"""ServeConfig fields that belong to the Serve instance or the application entry, not to the builder's args."""


def _autoscaling(min_replicas: int, max_replicas: int, target: float, cfg: ServeConfig) -> dict[str, Any]:
    return {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "target_ongoing_requests": target,
        "upscale_delay_s": cfg.upscale_delay_s,
        "downscale_delay_s": cfg.downscale_delay_s,
    }


def model_deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Serve options of the model deployment; batching lives in ``user_config`` so it updates in place."""
    return {
        "name": MODEL_DEPLOYMENT,
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "autoscaling_config": _autoscaling(cfg.min_replicas, cfg.max_replicas, cfg.target_ongoing_requests, cfg),
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        "user_config": {"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s},
    }


def ingress_deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Serve options of the HTTP ingress deployment."""
    return {
        "name": INGRESS_DEPLOYMENT,
        "max_ongoing_requests": cfg.ingress_max_ongoing_requests,
        "autoscaling_config": _autoscaling(
            cfg.ingress_min_replicas, cfg.ingress_max_replicas, cfg.ingress_target_ongoing_requests, cfg
        ),
        "ray_actor_options": {"num_cpus": cfg.ingress_num_cpus},
    }


def single_deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Serve options of the one deployment of ``serve.topology=single``: the model's scaling and batching, the
    CPUs of a model and an ingress replica together."""
    options = model_deployment_options(cfg)
    options["name"] = SINGLE_DEPLOYMENT
    options["ray_actor_options"] = {"num_cpus": cfg.num_cpus + cfg.ingress_num_cpus, "num_gpus": cfg.num_gpus}
    return options


def build_application(model_uri: str, cfg: ServeConfig) -> Application:
    """The Serve application of a model package (ingress over model deployment, or the one deployment of
    ``serve.topology=single``); nothing is loaded yet."""
    if cfg.topology == "single":
        return ClassifierServer.options(**single_deployment_options(cfg)).bind(model_uri, dataclasses.asdict(cfg))
    model = ClassifierModel.options(**model_deployment_options(cfg)).bind(
        model_uri, use_gpu=cfg.num_gpus > 0, amp=cfg.amp, backend=cfg.backend, precision=cfg.onnx_precision
    )
    return ClassifierIngress.options(**ingress_deployment_options(cfg)).bind(model, model_uri, dataclasses.asdict(cfg))


def _takes_str(field_type: Any) -> bool:
    return field_type is str or str in typing.get_args(field_type)


def serve_config_from_args(args: dict[str, Any], base: ServeConfig | None = None) -> ServeConfig:
    """A :class:`ServeConfig` from builder ``args``; ``serve run`` passes every value as a string, so strings
    for non-string fields are read as YAML scalars (``8`` -> 8, ``true`` -> True) and then type-checked."""
    hints = typing.get_type_hints(ServeConfig)
    values = dataclasses.asdict(base or ServeConfig())
    for key, value in args.items():
        if key in hints and isinstance(value, str) and not _takes_str(hints[key]):
            value = yaml.safe_load(value)
        values[key] = value
    return section_from_dict(ServeConfig, values, "Serve application args", prefix="serve.")


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder: ``serve run cls_ray.serve.app:build_app model_uri=URI [field=value ...]``.

    ``model_uri`` falls back to ``$CLS_RAY_MODEL_URI``; the other args are :class:`ServeConfig` fields, applied
    over the ``serve`` section of ``$CLS_RAY_CONFIG`` when that names a config file.
    """
    args = dict(args)
    model_uri = args.pop("model_uri", None) or os.environ.get(MODEL_URI_ENV)
    if not model_uri:
        raise ConfigError(
            f"the Serve application needs a model package: pass args model_uri=URI or set ${MODEL_URI_ENV}"
        )
    base = load_config(os.environ[CONFIG_ENV]).serve if os.environ.get(CONFIG_ENV) else None
    return build_application(str(model_uri), serve_config_from_args(args, base))


def __getattr__(name: str) -> Any:
    # ``cls_ray.serve.app:app`` is built on access (PEP 562), so importing this module never needs the env var.
    if name == "app":
        return build_app({})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def serve_config_dict(model_uri: str, cfg: ServeConfig) -> dict[str, Any]:
    """The Serve config (``serve deploy`` / RayService ``serveConfigV2``) of a model package."""
    args = {"model_uri": model_uri}
    args.update({k: v for k, v in dataclasses.asdict(cfg).items() if k not in HTTP_LEVEL_FIELDS})
    if cfg.topology == "single":
        deployments = [single_deployment_options(cfg)]
    else:
        deployments = [model_deployment_options(cfg), ingress_deployment_options(cfg)]
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s},
        "applications": [
            {
                "name": cfg.app_name,
                "route_prefix": cfg.route_prefix,
                "import_path": BUILDER_IMPORT_PATH,
                "args": args,
                "deployments": deployments,
            }
        ],
    }


def write_serve_config(model_uri: str, cfg: ServeConfig, path: str) -> str:
    """Write the Serve config YAML for ``serve deploy FILE`` (local path or s3://); returns ``path``."""
    model_uri = storage.absolute(model_uri)
    read_package_meta(model_uri)  # a wrong URI is reported now, not when the cluster tries to load it
    text = (
        "# Serve config of a cls-ray model package: `serve deploy` this file, or paste it as a KubeRay\n"
        "# RayService's serveConfigV2. Deployment settings here override the builder's defaults.\n"
    )
    text += yaml.safe_dump(serve_config_dict(model_uri, cfg), sort_keys=False)
    storage.write_bytes(path, text.encode())
    logger.info("wrote Serve config %s", path)
    return path


def base_url(cfg: ServeConfig, host: str | None = None, port: int | None = None) -> str:
    """``http://HOST:PORT/PREFIX`` (no trailing slash); a wildcard bind address is shown as 127.0.0.1."""
    host = cfg.host if host is None else host
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{host}:{cfg.port if port is None else port}{cfg.route_prefix.rstrip('/')}"


def _running_http_address(cfg: ServeConfig) -> tuple[str, int]:
    """Where Serve's proxies really listen: HTTP options apply only when Serve starts, not to a running one (a Ray
    internal tells; where it cannot, what was asked for)."""
    running = ray_internals.serve_http_address()
    if running is None:
        return cfg.host, cfg.port
    host, port = running
    if port != cfg.port:
        logger.warning(
            "Serve was already running on port %d in this cluster; serve.port=%d is not applied", port, cfg.port
        )
    return host, port


def _ensure_ray(detach: bool) -> None:
    from cls_ray.ray_connect import ensure_ray

    if not detach:
        ensure_ray()
        return
    try:
        ensure_ray(existing_cluster=True)
    except ConnectionError as exc:
        raise ConfigError(
            f"--detach needs a running Ray cluster to outlive this command ({exc}): start one with "
            "`ray start --head` (or set RAY_ADDRESS), or serve without --detach"
        ) from exc


def start_serving(model_uri: str, cfg: ServeConfig, *, detach: bool = False) -> str:
    """Deploy a model package on Ray Serve (starting Ray if needed) and return its base URL once it answers.

    In a process that already called ``ray.init`` (the demo, tests), the application runs in that cluster until
    :func:`stop_serving`. ``detach=True`` connects to a running cluster, so the application outlives this process.
    """
    model_uri = storage.absolute(model_uri)  # replicas load it from their own working directory
    read_package_meta(model_uri)
    _ensure_ray(detach)
    serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s})
    serve.run(build_application(model_uri, cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    url = base_url(cfg, *_running_http_address(cfg))
    logger.info("serving %s at %s", model_uri, url)
    return url


def stop_serving(app_name: str | None = None) -> None:
    """Delete one application, or (``None``) shut Serve down entirely."""
    if app_name is None:
        serve.shutdown()
    else:
        serve.delete(app_name)


def report_serving(url: str, model_uri: str, detach: bool) -> None:
    """Tell the person at the terminal where the model is served (the CLI's output, not logging)."""
    print(f"Serving {model_uri} at {url}/  (page: {url}/, API docs: {url}/docs)", flush=True)
    if detach:
        print("Detached: the application keeps running in the Ray cluster; stop it with `serve shutdown`.")
    else:
        print("Press Ctrl+C to stop.", flush=True)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve_model(model_uri: str, cfg: ServeConfig, blocking: bool = True) -> str:
    """``cls-ray serve``: deploy, print the URL and, when ``blocking``, serve until Ctrl+C; returns the URL."""
    url = start_serving(model_uri, cfg, detach=not blocking)
    report_serving(url, model_uri, detach=not blocking)
    if not blocking:
        return url
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` / a container stop ends serving like Ctrl+C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("stopping")
    finally:
        stop_serving(cfg.app_name)  # only this application: the cluster may serve others
    return url
