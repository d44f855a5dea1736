"""Offline batch prediction from a model package, with exactly the preprocessing and forward pass of serving.

:class:`Predictor` is the one inference path: the Ray Serve model replicas call :meth:`Predictor.predict_batch`
and the HTTP ingress calls :func:`preprocess_image`, so an image gets the same probabilities whether it is sent to
the endpoint or scored here (up to float rounding between batch sizes).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cls_ray import storage
from cls_ray.data.images import ImageDecodeError, decode_image
from cls_ray.data.transforms import ImageTransform, create_image_transform, normalize
from cls_ray.package import ModelPackage, load_model_package

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 64_000_000
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def preprocess_image(data: bytes, transform: ImageTransform, max_pixels: int) -> np.ndarray:
    """Decode untrusted image bytes and apply the model's eval transform: a uint8 CHW array.

    Raises:
        ImageDecodeError: the bytes are not a usable image (the ``reason`` says why).
    """
    image, _ = decode_image(data, max_pixels)
    try:
        return transform(image)
    except (ValueError, OSError, MemoryError, ZeroDivisionError, RuntimeError) as exc:  # RuntimeError: torch kernels
        # A decodable but degenerate image (e.g. one pixel wide after EXIF rotation) the resize cannot take.
        raise ImageDecodeError("unsupported", f"the image cannot be resized for the model: {exc}") from None


def top_k(probs: np.ndarray, classes: Sequence[str], k: int) -> list[list[dict[str, Any]]]:
    """Per row of ``probs`` (N, C): the ``k`` most probable classes as ``{"label", "class", "probability"}``."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[{"label": int(i), "class": classes[int(i)], "probability": float(row[i])} for i in idx]
            for row, idx in zip(probs, order, strict=True)]


class Predictor:
    """A loaded model package ready for inference: uint8 CHW images in, class probabilities out.

    Device, autocast and memory format are decided once here (channels-last and bf16/fp16 autocast on CUDA,
    float32 on CPU), so :meth:`predict_batch` does not branch on them.

    Args:
        package: a loaded model package (its model is moved to ``device``).
        device: ``"cpu"``, ``"cuda"`` or a torch device.
        amp: autocast dtype on CUDA: ``"bf16"``, ``"fp16"`` or ``"none"``.
    """

    def __init__(self, package: ModelPackage, device: str | torch.device = "cpu", amp: str = "bf16"):
        self.package = package
        self.device = torch.device(device)
        self.classes = list(package.classes)
        self.mean = list(package.data_config["mean"])
        self.std = list(package.data_config["std"])
        self.transform = create_image_transform(package.data_config)
        on_cuda = self.device.type == "cuda"
        self.memory_format = torch.channels_last if on_cuda else torch.contiguous_format
        self.model = package.model.to(self.device, memory_format=self.memory_format).eval()
        if on_cuda and amp in AMP_DTYPES:
            self._autocast = functools.partial(torch.autocast, "cuda", dtype=AMP_DTYPES[amp])
        else:
            self._autocast = contextlib.nullcontext

    @classmethod
    def from_uri(cls, model_uri: str, device: str | torch.device = "cpu", amp: str = "bf16") -> Predictor:
        """Load the package at ``model_uri`` (local path or s3://) onto ``device``."""
        return cls(load_model_package(model_uri, device="cpu"), device=device, amp=amp)

    def preprocess(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Image bytes -> uint8 CHW array, as the serving ingress does it."""
        return preprocess_image(data, self.transform, max_pixels)

    @torch.inference_mode()
    def predict_batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Class probabilities (N, C) float32 of preprocessed uint8 CHW images."""
        batch = torch.from_numpy(np.stack(images)).to(self.device, non_blocking=True)
        x = normalize(batch, self.mean, self.std).contiguous(memory_format=self.memory_format)
        with self._autocast():
            logits = self.model(x)
        return torch.softmax(logits.float(), dim=1).cpu().numpy()

    def predict_bytes(self, images: Sequence[bytes], batch_size: int = 64,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Probabilities (N, C) of encoded images; raises :class:`ImageDecodeError` on the first bad one."""
        arrays = [self.preprocess(data, max_pixels) for data in images]
        chunks = [self.predict_batch(arrays[i:i + batch_size]) for i in range(0, len(arrays), batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.classes)), np.float32)


def predict_files(model_uri: str, uris: Sequence[str], *, batch_size: int = 64, k: int = 5,
                  device: str = "cpu", max_pixels: int = DEFAULT_MAX_PIXELS) -> list[dict[str, Any]]:
    """Score image files (local paths or s3:// URIs) with a model package.

    Returns one dict per input, in order: ``{"path", "model", "top_k": [...], "probabilities": [...]}`` or, for a
    file that cannot be read or is not a usable image, ``{"path", "model", "error", "reason"}`` (``reason``
    ``unreadable`` for storage errors, else the decoder's reason); a bad file never stops the others. ``model`` is
    the package's ``{"name", "version"}``.
    """
    predictor = Predictor.from_uri(model_uri, device=device)
    k = max(1, min(k, len(predictor.classes)))
    model = {"name": predictor.package.name, "version": predictor.package.version}
    results: list[dict[str, Any]] = [{"path": uri, "model": model} for uri in uris]
    good: list[int] = []
    arrays: list[np.ndarray] = []
    for i, uri in enumerate(uris):
        try:
            arrays.append(predictor.preprocess(storage.read_bytes(uri), max_pixels))
            good.append(i)
        except storage.StorageError as exc:
            results[i].update(error=str(exc), reason="unreadable")
        except ImageDecodeError as exc:
            results[i].update(error=str(exc), reason=exc.reason)
    for start in range(0, len(arrays), batch_size):
        probs = predictor.predict_batch(arrays[start:start + batch_size])
        for i, row, best in zip(good[start:start + batch_size], probs, top_k(probs, predictor.classes, k),
                                strict=True):
            results[i].update(top_k=best, probabilities=row.tolist())
    logger.info("scored %d of %d files with %s", len(good), len(uris), model_uri)
    return results
