"""Image corruptions of the report's robustness section, on decoded images, before the serving preprocessing.

Each corruption takes a decoded uint8 CHW image at its stored resolution and returns one of the same kind, so a
corrupted image then goes through exactly the eval transform serving uses (:func:`create_image_transform`): resize,
center crop, normalise. The kernels are torchvision's (``transforms.v2.functional``); this module only fixes the
parameters of each severity and the seed of the random ones.

Strengths are given relative to the model's input size where they are spatial (blur sigma, shift), so a severity
means the same on a 28 px and on a 4,000 px source image. Severity 0 is the identity. Random corruptions (noise)
are seeded from the image's path and the corruption, so two reports of the same split give the same numbers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torchvision.transforms.v2 import functional as F

SEVERITIES = (1, 2, 3)

#: Per corruption: a one-line description for the page, and the parameter of severities 1, 2, 3.
CORRUPTIONS: dict[str, tuple[str, tuple[float, float, float]]] = {
    "gaussian_noise": ("additive Gaussian noise, sigma as a share of the pixel range", (0.04, 0.08, 0.16)),
    "gaussian_blur": ("Gaussian blur, sigma in model-input pixels", (0.6, 1.2, 2.4)),
    "jpeg": ("JPEG re-compression at this quality", (40, 20, 8)),
    "low_light": ("brightness scaled by this factor", (0.6, 0.4, 0.2)),
    "contrast": ("contrast scaled by this factor", (0.6, 0.4, 0.2)),
    "grayscale": ("colour saturation scaled by this factor (0: grayscale)", (0.6, 0.3, 0.0)),
    "shift": ("rotation (degrees) with a 1 + deg/100 zoom and deg/100 translation", (6.0, 12.0, 20.0)),
}


def parameter(name: str, severity: int) -> float:
    """The parameter of ``name`` at ``severity`` (1-3)."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity {severity} of {name}: use 0 (none) or one of {SEVERITIES}")
    return CORRUPTIONS[name][1][severity - 1]


def seed_for(key: str, name: str, severity: int) -> int:
    """A 63-bit seed from the image's key (its path in the dataset) and the corruption."""
    return int.from_bytes(hashlib.sha256(f"{key}|{name}|{severity}".encode()).digest()[:8], "big") >> 1


def _scale(image: torch.Tensor, input_size: int) -> float:
    """Source pixels per model-input pixel (the eval transform resizes the short side to about ``input_size``)."""
    return max(1.0, min(image.shape[-2:]) / max(1, input_size))


def corrupt(image: torch.Tensor, name: str, severity: int, *, key: str, input_size: int) -> torch.Tensor:
    """``image`` (uint8 CHW, RGB) corrupted by ``name`` at ``severity``; severity 0 returns it unchanged.

    Args:
        key: identifies the image (its dataset path); seeds the random corruptions.
        input_size: the model's input side, to which spatial strengths are relative.
    """
    if severity == 0:
        if name not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
        return image
    p = parameter(name, severity)
    return _KERNELS[name](image, p, key=key, severity=severity, input_size=input_size)


def _noise(image: torch.Tensor, sigma: float, *, key: str, severity: int, input_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed_for(key, "gaussian_noise", severity))
    x = image.float() / 255.0
    noisy = x + sigma * torch.randn(x.shape, generator=generator)
    return (noisy.clamp_(0, 1) * 255.0).round_().to(torch.uint8)


def _blur(image: torch.Tensor, sigma: float, *, key: str, severity: int, input_size: int) -> torch.Tensor:
    s = sigma * _scale(image, input_size)
    k = 2 * int(3 * s + 0.5) + 1
    k = min(k, 2 * (min(image.shape[-2:]) // 2) - 1) if min(image.shape[-2:]) > 2 else 1
    return F.gaussian_blur(image, [k, k], [s, s]) if k > 1 else image


def _jpeg(image: torch.Tensor, quality: float, *, key: str, severity: int, input_size: int) -> torch.Tensor:
    return F.jpeg(image.contiguous(), int(quality))


def _brightness(image: torch.Tensor, factor: float, *, key: str, severity: int, input_size: int) -> torch.Tensor:
    return F.adjust_brightness(image, factor)


def _contrast(image: torch.Tensor, factor: float, *, key: str, severity: int, input_size: int) -> torch.Tensor:
    return F.adjust_contrast(image, factor)


def _saturation(image: torch.Tensor, factor: float, *, key: str, severity: int, input_size: int) -> torch.Tensor:
    return F.adjust_saturation(image, factor)


def _shift(image: torch.Tensor, degrees: float, *, key: str, severity: int, input_size: int) -> torch.Tensor:
    # Alternating direction per image (from its seed), fixed magnitude per severity.
    sign = 1.0 if seed_for(key, "shift", severity) % 2 else -1.0
    height, width = image.shape[-2:]
    offset = degrees / 100.0
    return F.affine(
        image,
        angle=sign * degrees,
        translate=[sign * offset * width, offset * height],
        scale=1.0 + degrees / 100.0,
        shear=[0.0, 0.0],
        interpolation=F.InterpolationMode.BILINEAR,
    )


_KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "gaussian_noise": _noise,
    "gaussian_blur": _blur,
    "jpeg": _jpeg,
    "low_light": _brightness,
    "contrast": _contrast,
    "grayscale": _saturation,
    "shift": _shift,
}
