"""The Ray Serve deployments: the model replicas (dynamic batching) and the HTTP ingress in front of them.

The ingress parses requests and decodes/resizes images on CPU; the model deployment receives one preprocessed
uint8 image per call and ``@serve.batch`` groups concurrent calls (from all requests and ingress replicas) into one
forward pass. The two scale apart: decoding is CPU work, the forward pass may sit on a GPU. ``serve.topology=
single`` puts both in one deployment (:class:`ClassifierServer`): the same API and batching, one Ray hop less.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import os
import time
from typing import Any

import numpy as np
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool

from cls_ray import telemetry
from cls_ray.config import ConfigError, ServeConfig
from cls_ray.data.images import ImageDecodeError
from cls_ray.data.transforms import create_image_transform
from cls_ray.package import read_package_meta
from cls_ray.predict import Predictor, preprocess_image
from cls_ray.serve.api import create_api
from cls_ray.serve.inputs import RequestError

logger = logging.getLogger(__name__)

MODEL_DEPLOYMENT = "ClassifierModel"
INGRESS_DEPLOYMENT = "ClassifierIngress"
SINGLE_DEPLOYMENT = "Classifier"
"""``serve.topology=single``: ingress and model in one deployment (:class:`ClassifierServer`)."""
DECODE_STATUS = {"too_many_pixels": 413, "not_an_image": 415}
"""HTTP status per :class:`ImageDecodeError` reason; every other reason (corrupt, empty, ...) is a 422."""


@serve.deployment(name=MODEL_DEPLOYMENT)
class ClassifierModel:
    """Model replica: loads the package once and answers batched calls of :meth:`predict`.

    Args:
        model_uri: model package, local path or s3:// URI.
        use_gpu: run on CUDA (channels-last, autocast with ``amp``).
        amp: ``bf16``, ``fp16`` or ``none``; ignored on CPU.
        backend: ``torch`` or ``onnx`` (the package's recorded ONNX export of ``precision`` on ONNX Runtime).
        precision: ``fp32`` or ``int8``, for the onnx backend.
    """

    def __init__(
        self, model_uri: str, use_gpu: bool = False, amp: str = "bf16", backend: str = "torch", precision: str = "fp32"
    ):
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("serve.num_gpus > 0 but this replica sees no CUDA device")
        device = "cuda" if use_gpu else "cpu"
        self.predictor = Predictor.from_uri(model_uri, device=device, amp=amp, backend=backend, precision=precision)
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.batching = {"max_batch_size": 32, "batch_wait_timeout_s": 0.01}
        self.replica = serve.get_replica_context().replica_id.unique_id
        logger.info("model replica %s serving %s on %s (%s backend)", self.replica, model_uri, device, backend)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve ``user_config``: batching parameters change in place, without restarting the replica."""
        self.batching = {
            "max_batch_size": int(user_config["max_batch_size"]),
            "batch_wait_timeout_s": float(user_config["batch_wait_timeout_s"]),
        }
        self.predict.set_max_batch_size(self.batching["max_batch_size"])
        self.predict.set_batch_wait_timeout_s(self.batching["batch_wait_timeout_s"])
        self.batch_sizes.clear()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """One preprocessed uint8 CHW image per call -> its class probabilities; calls are batched."""
        self.batch_sizes[len(images)] += 1
        # The forward pass runs in a thread, so the event loop keeps queueing the next batch meanwhile.
        started = time.perf_counter()
        probs = await asyncio.to_thread(self.predictor.predict_batch, images)
        telemetry.record_batch(len(images), time.perf_counter() - started)
        return list(probs)

    def stats(self) -> dict[str, Any]:
        """Batch sizes this replica ran since it started (or was reconfigured)."""
        batches = sum(self.batch_sizes.values())
        images = sum(size * n for size, n in self.batch_sizes.items())
        return {
            "replica": self.replica,
            "batches": batches,
            "images": images,
            "mean_batch_size": images / batches if batches else 0.0,
            "max_batch_size_seen": max(self.batch_sizes, default=0),
            "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            **self.batching,
        }

    def ready(self) -> bool:
        return True


def decode_error(exc: ImageDecodeError, index: int) -> RequestError:
    return RequestError(DECODE_STATUS.get(exc.reason, 422), exc.reason, f"image {index}: {exc}", index)


class IngressReplica:
    """What the FastAPI app of :mod:`cls_ray.serve.api` reads on its replica: config, model metadata, request
    checks, decoding, and :meth:`probabilities` through the model deployment (:class:`ClassifierIngress`), or
    through the model in the same replica (:class:`ClassifierServer`).

    Args:
        model: handle of the :class:`ClassifierModel` deployment (None in :class:`ClassifierServer`).
        model_uri: the same package (only its ``model.json`` is read here).
        config: the :class:`ServeConfig` fields, as a dict.
    """

    def __init__(self, model: DeploymentHandle, model_uri: str, config: dict[str, Any]):
        self.model = model
        self.cfg = ServeConfig(**config)
        self.meta = read_package_meta(model_uri)
        self.classes: list[str] = list(self.meta["classes"])
        self.name, self.version = self.meta["name"], self.meta["version"]  # read_package_meta always sets both
        self.transform = create_image_transform(self.meta["data_config"])
        self.api_key = self._read_api_key()

    def _read_api_key(self) -> str | None:
        env = self.cfg.api_key_env
        if not env:
            return None
        key = os.environ.get(env, "")
        if not key:
            # Fail closed: an API key was asked for, so never serve without one.
            raise ConfigError(
                f"serve.api_key_env names {env!r}, but that environment variable is empty on "
                "this replica; set it in the cluster's environment"
            )
        return key

    def check_api_key(self, given: str | None) -> None:
        if self.api_key is None:
            return
        if given is None or not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise RequestError(401, "unauthorized", "a valid X-API-Key header is required")

    def _preprocess_all(self, images: list[bytes]) -> list[np.ndarray]:
        arrays = []
        for i, data in enumerate(images):
            try:
                arrays.append(preprocess_image(data, self.transform, self.cfg.max_pixels))
            except ImageDecodeError as exc:
                raise decode_error(exc, i) from None
            except Exception as exc:  # noqa: BLE001 - any decoder failure on client bytes is the client's 4xx
                logger.warning("image %d: decoder failed: %s: %s", i, type(exc).__name__, exc)
                raise RequestError(422, "decoder_error", f"image {i}: the decoder failed on this file", i) from None
        return arrays

    def _predict(self, array: np.ndarray) -> Any:
        """The awaitable probabilities of one preprocessed image: a call of the model deployment."""
        return self.model.predict.remote(array)

    async def probabilities(self, images: list[bytes]) -> np.ndarray:
        """Decode and resize the images here, score them on the model (batched); (N, C) probabilities."""
        arrays = await run_in_threadpool(self._preprocess_all, images)
        calls = [self._predict(arr) for arr in arrays]
        try:
            rows = await asyncio.wait_for(asyncio.gather(*calls), timeout=self.cfg.request_timeout_s)
        except TimeoutError:
            raise RequestError(503, "model_timeout", "the model did not answer in time; retry") from None
        return np.stack(rows)

    async def model_stats(self) -> dict[str, Any]:
        return await self.model.stats.remote()

    async def model_ready(self, timeout_s: float = 5.0) -> bool:
        try:
            return bool(await asyncio.wait_for(self.model.ready.remote(), timeout=timeout_s))
        except Exception:  # noqa: BLE001 - any failure to answer means not ready
            return False

    def model_info(self) -> dict[str, Any]:
        dc = self.meta["data_config"]
        return {
            "name": self.name,
            "version": self.version,
            "architecture": self.meta["architecture"],
            "classes": self.classes,
            "num_classes": len(self.classes),
            "input_size": list(dc["input_size"]),
            "data_config": dc,
            "metrics": self.meta.get("metrics") or {},
            "default_top_k": min(self.cfg.default_top_k, len(self.classes)),
            "max_images": self.cfg.max_images,
            "max_request_bytes": self.cfg.max_request_bytes,
        }


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress(create_api)  # a builder: Serve calls it on each replica, whose routes then read this object
class ClassifierIngress(IngressReplica):
    """HTTP ingress: the FastAPI app of :mod:`cls_ray.serve.api` over the model deployment (``model``, a handle of
    :class:`ClassifierModel`)."""


@serve.deployment(name=SINGLE_DEPLOYMENT)
@serve.ingress(create_api)
class ClassifierServer(IngressReplica):
    """``serve.topology=single``: the HTTP API of :class:`ClassifierIngress` and the batched model of
    :class:`ClassifierModel` in one replica. Requests of the replica are batched together by the same
    ``@serve.batch`` method, called in process instead of through a deployment handle.

    Args:
        model_uri: model package, local path or s3:// URI.
        config: the :class:`ServeConfig` fields, as a dict.
    """

    def __init__(self, model_uri: str, config: dict[str, Any]):
        super().__init__(None, model_uri, config)  # type: ignore[arg-type]  # no model handle: the model is here
        cfg = self.cfg
        torch.set_num_threads(max(1, int(cfg.num_cpus)))  # the model's share; decoding has the rest
        model_class = ClassifierModel.func_or_class
        self.local_model = model_class(
            model_uri, use_gpu=cfg.num_gpus > 0, amp=cfg.amp, backend=cfg.backend, precision=cfg.onnx_precision
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.local_model.reconfigure(user_config)

    def _predict(self, array: np.ndarray) -> Any:
        return self.local_model.predict(array)  # the same @serve.batch method, in process

    async def model_stats(self) -> dict[str, Any]:
        return self.local_model.stats()

    async def model_ready(self, timeout_s: float = 5.0) -> bool:
        return self.local_model.ready()
