"""The one source of preprocessing: timm's transform factory driven by a model's data config.

Training, evaluation, batch prediction and serving all call these. Transforms produce uint8 CHW tensors;
normalisation (mean/std) happens on the worker's device with :func:`normalize`, so CPU tasks ship 4x fewer bytes.

timm's factory decides what is done (:func:`create_train_transform`, :func:`create_eval_transform`);
:class:`ImageTransform` decides how: the ops timm composed, run by torchvision's ``transforms.v2`` kernels on uint8
tensors wherever each op has one (2-3x faster than Pillow's resize, within 1-2 levels of it per pixel), with
OpenCV's resize for the crops RandomResizedCrop enlarges (:class:`RandomResizedCropUint8`), and timm's own PIL
pipeline otherwise (RandAugment, random interpolation).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation
from torchvision import transforms as tv1
from torchvision.transforms import v2
from torchvision.transforms.functional import pil_to_tensor

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
        tensor_or_array = tensor_or_array.numpy()  # a strided view where the tensor is one: copied once, below
    return np.ascontiguousarray(tensor_or_array, dtype=np.uint8)


def normalize(batch: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 NCHW -> float normalised, on whatever device ``batch`` is on."""
    mean_t = torch.tensor([m * 255 for m in mean], device=batch.device).view(1, -1, 1, 1)
    std_t = torch.tensor([s * 255 for s in std], device=batch.device).view(1, -1, 1, 1)
    return (batch.float() - mean_t) / std_t


class RandomResizedCropUint8(v2.RandomResizedCrop):
    """``v2.RandomResizedCrop`` with timm's crop draws, whose bilinear enlargements run in OpenCV.

    The crop box comes from timm's own sampler (``RandomResizedCropAndInterpolation.get_params``, Python's
    ``random``): the same draws as timm's PIL pipeline, in ~3 us instead of ~18 us for torchvision's torch-RNG ones.
    A crop no larger than the output in either direction is only enlarged, where antialiasing does nothing:
    ``cv2.resize(INTER_LINEAR)`` on the decoded HWC pixels then gives Pillow's bilinear result to within one level
    in about a third of the time of torch's uint8 kernel (~50 vs ~150 us for 224 px here). Crops that shrink
    in either direction, other interpolations and other inputs take torchvision's antialiased kernel as before.
    """

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        top, left, height, width = RandomResizedCropAndInterpolation.get_params(flat_inputs[0], self.scale, self.ratio)
        return {"top": top, "left": left, "height": height, "width": width}

    def _opencv_crop(self, inpt: Any, params: dict[str, Any]) -> np.ndarray | None:
        """The crop as an HWC array view when OpenCV resizes it (see the class docstring), else None."""
        if (
            self.interpolation == v2.InterpolationMode.BILINEAR
            and type(inpt) is torch.Tensor
            and inpt.dtype == torch.uint8
            and inpt.ndim == 3
            and inpt.device.type == "cpu"
            and params["height"] <= self.size[0]
            and params["width"] <= self.size[1]
        ):
            top, left, height, width = params["top"], params["left"], params["height"], params["width"]
            # decode_stored_image returns a CHW view of HWC pixels: this permute is free, the crop a view of it.
            return np.ascontiguousarray(inpt.permute(1, 2, 0).numpy())[top : top + height, left : left + width]
        return None

    def _resize_into(self, crop: np.ndarray, out: np.ndarray) -> None:
        written = cv2.resize(crop, (self.size[1], self.size[0]), dst=out, interpolation=cv2.INTER_LINEAR)
        if written is not out:  # OpenCV allocated a new array: a single-channel crop comes back 2-D
            np.copyto(out, written.reshape(*written.shape[:2], -1))

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        crop = self._opencv_crop(inpt, params)
        if crop is None:
            return super().transform(inpt, params)
        out = np.empty((*self.size, crop.shape[2]), dtype=np.uint8)
        self._resize_into(crop, out)
        return torch.from_numpy(out).permute(2, 0, 1)

    def write(self, image: torch.Tensor, out: np.ndarray) -> None:
        """Crop and resize a uint8 CHW ``image`` straight into ``out``, a uint8 HWC array of the output size."""
        params = self.make_params([image])
        crop = self._opencv_crop(image, params)
        if crop is not None:
            self._resize_into(crop, out)
        else:  # torchvision returns a contiguous CHW crop: torch's copy transposes it ~3-5x faster than numpy's
            torch.from_numpy(out).copy_(super().transform(image, params).permute(1, 2, 0))


def tensor_transform(transform: Callable[[Any], Any]) -> v2.Compose | None:
    """The ops of a timm transform as a ``torchvision.transforms.v2`` pipeline over uint8 CHW tensors, or None.

    timm's transforms call torchvision's v1 functional API, which casts uint8 tensors to float to resize (slower
    than Pillow); the v2 kernels resize uint8 directly. Each op keeps its parameters (size, scale, ratio,
    interpolation, probabilities, jitter ranges; antialiased resizing, as Pillow does). Returns None when any op
    has no tensor equivalent here (timm's RandAugment and AutoAugment, random interpolation, ``ResizeKeepRatio``
    crops): the caller then runs timm's PIL pipeline as it is.
    """
    ops = list(transform.transforms) if isinstance(transform, tv1.Compose) else [transform]
    out: list[Any] = []
    for op in ops:
        if isinstance(op, MaybePILToTensor):
            continue  # the input is a tensor already
        if isinstance(op, RandomResizedCropAndInterpolation):
            if not isinstance(op.interpolation, tv1.InterpolationMode):
                return None  # a random choice of interpolation per image
            out.append(
                RandomResizedCropUint8(
                    op.size, scale=op.scale, ratio=op.ratio, interpolation=op.interpolation, antialias=True
                )
            )
        elif type(op) is tv1.RandomHorizontalFlip:
            out.append(v2.RandomHorizontalFlip(op.p))
        elif type(op) is tv1.RandomVerticalFlip:
            out.append(v2.RandomVerticalFlip(op.p))
        elif type(op) is tv1.ColorJitter:
            ranges = {k: getattr(op, k) for k in ("brightness", "contrast", "saturation", "hue")}
            if any(r is not None for r in ranges.values()):
                out.append(v2.ColorJitter(**ranges))
        elif type(op) is tv1.Resize:
            out.append(v2.Resize(op.size, interpolation=op.interpolation, max_size=op.max_size, antialias=True))
        elif type(op) is tv1.CenterCrop:
            out.append(v2.CenterCrop(op.size))
        else:
            return None
    return v2.Compose(out)


class ImageTransform:
    """One image -> uint8 CHW array through a timm transform: on tensors where :func:`tensor_transform` can, else PIL.

    Takes a decoded RGB image either as a PIL image or as a uint8 CHW tensor (as ``decode_stored_image`` returns);
    :attr:`takes_tensors` tells a decoder which one saves a conversion.

    The common train pipeline, a random resized crop with or without a horizontal flip, runs its two ops directly
    instead of through ``v2.Compose``, whose per-call dispatch (flattening inputs, querying sizes, the flip's RNG
    tensor) cost more than the crop's own resize; the crop is resized into the output row and flipped in place there
    (~80 us per 224 px image instead of ~170 us). Same ops, same parameters, same pixels.

    Args:
        transform: A transform from :func:`create_train_transform` or :func:`create_eval_transform`.
    """

    def __init__(self, transform: Callable[[Image.Image], Any]):
        self.pil_transform = transform
        self.tensor_transform = tensor_transform(transform)
        self._crop, self._hflip = None, 0.0
        ops = self.tensor_transform.transforms if self.tensor_transform is not None else []
        if [type(op) for op in ops] in ([RandomResizedCropUint8], [RandomResizedCropUint8, v2.RandomHorizontalFlip]):
            self._crop, self._hflip = ops[0], ops[1].p if len(ops) == 2 else 0.0

    @property
    def takes_tensors(self) -> bool:
        return self.tensor_transform is not None

    def __call__(self, image: Image.Image | torch.Tensor, out: np.ndarray | None = None) -> np.ndarray:
        """The transformed image as a uint8 CHW array; written into ``out`` (e.g. a row of a batch) when given."""
        if self.tensor_transform is not None:
            if isinstance(image, Image.Image):
                image = pil_to_tensor(image)
            if self._crop is not None:
                return self._crop_flip(image, out)
            result = self.tensor_transform(image)  # maybe a strided view: copied once, into the output
        else:
            if isinstance(image, torch.Tensor):
                image = v2.functional.to_pil_image(image)
            result = self.pil_transform(image)
        if out is None:
            return to_uint8_array(result)
        if isinstance(result, torch.Tensor):
            # Into a CHW view of an HWC row: a transposition when the result is contiguous CHW (torchvision's kernels
            # on a crop), which torch's copy does in ~80 us and numpy's in ~200-370 us at 224 px.
            torch.from_numpy(out).copy_(result)
        else:
            np.copyto(out, result)
        return out

    def _crop_flip(self, image: torch.Tensor, out: np.ndarray | None) -> np.ndarray:
        height, width = self._crop.size
        # A CHW view of a contiguous HWC row (DecodeBatch's rows) is written in place; anything else via a buffer.
        direct = out is not None and out.transpose(1, 2, 0).flags.c_contiguous
        hwc = out.transpose(1, 2, 0) if direct else np.empty((height, width, image.shape[0]), dtype=np.uint8)
        self._crop.write(image, hwc)
        if self._hflip and random.random() < self._hflip:
            cv2.flip(hwc, 1, dst=hwc)
        if direct:
            return out
        if out is None:
            return np.ascontiguousarray(hwc.transpose(2, 0, 1))
        np.copyto(out, hwc.transpose(2, 0, 1))
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.tensor_transform if self.takes_tensors else self.pil_transform})"


def create_image_transform(data_config: dict[str, Any], cfg: DataConfig | None = None) -> ImageTransform:
    """The train transform (``cfg`` given) or the eval transform (``cfg`` None) as an :class:`ImageTransform`."""
    return ImageTransform(
        create_train_transform(data_config, cfg) if cfg is not None else create_eval_transform(data_config)
    )
