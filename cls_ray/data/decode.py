"""Dataset images to pixels, inside Ray Data's decode tasks (and ``cls-ray evaluate``, and FFCV's reader).

The heavy imports (torch, torchvision, simplejpeg, Pillow) live here, not in :mod:`cls_ray.data.pipeline`: Ray
Data's coordinator actors and Ray Train's dataset manager unpickle the pipeline's UDFs with the dataset plan, which
imports their module, and they never decode.
"""

from __future__ import annotations

import io

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as decode_to_tensor

from cls_ray.data.images import decode_image

_PLAIN_MODES = ("L", "RGB")
_SLOW_PATH_KEYS = ("exif", "xmp", "XML:com.adobe.xmp", "Raw profile type exif", "transparency")
_JPEG_COLORSPACES = ("YCbCr", "Gray")
"""JPEG colour spaces that libjpeg-turbo converts to RGB exactly as Pillow does (CMYK, YCCK and Adobe RGB JPEGs
take the hardened decoder)."""
_ORIENTATION_MARKERS = (b"Exif\x00\x00", b"http://ns.adobe.com/xap/1.0/")
"""Byte strings an EXIF (APP1) or XMP segment, where Pillow reads an orientation from, must contain."""


def _decode_plain_jpeg(data: bytes, max_pixels: int) -> np.ndarray | None:
    """HWC RGB pixels of a YCbCr or grayscale JPEG with no orientation to apply, or None for anything else.

    libjpeg-turbo through simplejpeg, with the same accurate DCT and fancy upsampling as Pillow (the same pixels),
    in about two thirds of the time of ``torchvision.io`` and without parsing the file in Python first (``Image.open``
    costs ~35 us per image). Only a file that carries EXIF or XMP bytes is opened with Pillow, to read its
    orientation; a rotated or mirrored one is left to the hardened decoder, which applies it.
    """
    if data[:2] != b"\xff\xd8":
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in _JPEG_COLORSPACES or height * width > max_pixels:
            return None
        if any(marker in data for marker in _ORIENTATION_MARKERS):
            with Image.open(io.BytesIO(data)) as img:
                if img.getexif().get(0x0112, 1) not in (None, 0, 1):
                    return None
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except Exception:  # noqa: BLE001 - a truncated file, a malformed EXIF block...: the hardened decoder says what
        return None


def decode_stored_image(data: bytes, max_pixels: int, *, as_tensor: bool = False) -> Image.Image | torch.Tensor:
    """Decode one image of a dataset shard to RGB, pixel-identical to :func:`cls_ray.data.images.decode_image`.

    Ingest validated every stored image, so the common cases take a short path: plain JPEGs
    (:func:`_decode_plain_jpeg`), then plain grayscale or RGB PNGs without orientation or transparency, which
    ``torchvision.io`` decodes; anything else, or a file a short path fails on, goes through the full hardened
    decoder (which raises :class:`~cls_ray.data.images.ImageDecodeError` naming the problem). With ``as_tensor`` a
    short path returns a uint8 CHW tensor (a view of HWC pixels); the hardened path always returns a PIL image.
    """
    pixels = _decode_plain_jpeg(data, max_pixels)
    if pixels is not None:
        return torch.from_numpy(pixels).permute(2, 0, 1) if as_tensor else Image.fromarray(pixels, "RGB")
    try:
        img = Image.open(io.BytesIO(data))
        if (
            img.format in ("PNG", "JPEG")
            and img.mode in _PLAIN_MODES
            and img.size[0] * img.size[1] <= max_pixels
            and not any(key in img.info for key in _SLOW_PATH_KEYS)
        ):
            if as_tensor:
                return decode_to_tensor(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            return img.convert("RGB")
    except Exception:  # noqa: BLE001 - a truncated or corrupt file: the hardened decoder names what is wrong
        pass
    return decode_image(data, max_pixels)[0]
