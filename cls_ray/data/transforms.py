"""The one source of preprocessing: timm's transform factory driven by a model's data config.

Training, evaluation, batch prediction and serving all call these. Transforms produce uint8 CHW tensors;
normalisation (mean/std) happens on the worker's device with :func:`normalize`, so CPU tasks ship 4x fewer bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform

from cls_ray.config import DataConfig


def _image_size(data_config: dict[str, Any]) -> int:
    return int(data_config["input_size"][-1])


def create_eval_transform(data_config: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """Resize + center crop per the model's data config; PIL RGB in, uint8 CHW tensor out."""
    return create_transform(
        _image_size(data_config),
        is_training=False,
        use_prefetcher=True,
        interpolation=data_config.get("interpolation", "bilinear"),
        crop_pct=data_config.get("crop_pct", 0.875),
        crop_mode=data_config.get("crop_mode", "center"),
    )


def pillow_safe_auto_augment(policy: str | None) -> str | None:
    """timm's RandAugment policy string, capped so that it never asks Pillow to posterize to 0 bits.

    With ``inc1`` (timm's default ``rand-m9-mstd0.5-inc1``) a sampled magnitude of 10 maps PosterizeIncreasing to
    0 bits; Pillow >= 11 refuses that with ``ValueError`` (older Pillow returned a black image), which would kill
    a decode task at random (~0.2% of images). Capping the magnitude at 9 (``mmax9``) keeps at least 1 bit and
    changes every other op by at most one magnitude step at the tail of the distribution. An explicit ``mmax``
    is left alone.
    """
    if not policy or not policy.startswith("rand"):
        return policy
    parts = policy.split("-")
    if "inc1" in parts and not any(p.startswith("mmax") for p in parts):
        return policy + "-mmax9"
    return policy


def create_train_transform(data_config: dict[str, Any], cfg: DataConfig) -> Callable[[Image.Image], torch.Tensor]:
    """RandomResizedCrop, flip, colour jitter / RandAugment; PIL RGB in, uint8 CHW tensor out.

    Random erasing works on normalised tensors, so the train loop applies it on device (timm's prefetcher
    pattern) with the same ``cfg.re_prob``.
    """
    return create_transform(
        _image_size(data_config),
        is_training=True,
        use_prefetcher=True,
        scale=tuple(cfg.scale),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=pillow_safe_auto_augment(cfg.auto_augment),
        interpolation="random" if cfg.auto_augment else data_config.get("interpolation", "bilinear"),
        mean=tuple(data_config["mean"]),
    )


def to_uint8_array(tensor_or_array: Any) -> np.ndarray:
    """A transform's output as a contiguous uint8 CHW array."""
    if isinstance(tensor_or_array, torch.Tensor):
        return tensor_or_array.numpy().astype(np.uint8, copy=False)
    return np.ascontiguousarray(tensor_or_array, dtype=np.uint8)


def normalize(batch: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 NCHW -> float normalised, on whatever device ``batch`` is on."""
    mean_t = torch.tensor([m * 255 for m in mean], device=batch.device).view(1, -1, 1, 1)
    std_t = torch.tensor([s * 255 for s in std], device=batch.device).view(1, -1, 1, 1)
    return (batch.float() - mean_t) / std_t
