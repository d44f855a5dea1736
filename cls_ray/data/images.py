"""Decoding untrusted image bytes into RGB, shared by ingest (validation) and serving (requests).

Everything a real folder or a hostile client sends is handled here: truncated and corrupt files, non-images,
decompression bombs, EXIF orientation, CMYK / 16-bit / palette / alpha modes and multi-frame files.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

LUMA_MIN_SIDE = 64
"""A JPEG kept as it is is validated at the smallest DCT scale (1, 1/2, 1/4 or 1/8) whose short side is at least
this many pixels: the perceptual hash's working size (``near_duplicates.SIDE``)."""


class ImageDecodeError(ValueError):
    """An image was refused; ``reason`` is a short machine-friendly tag, the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float grayscale to 8 bits, scaled by the image's own range (not clipped at 255)."""
    arr = np.asarray(img).astype(np.float64)
    finite = arr[np.isfinite(arr)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    scaled = (np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo) - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(background, rgba).convert("RGB")
    else:
        rgb = img.convert("RGB")
    rgb.info = {}  # no transparency key, ICC profile or EXIF travels on with the validated pixels
    return rgb


@dataclass(frozen=True)
class DecodedImage:
    """A validated image and the facts about its source that decide whether its bytes can be kept as they are."""

    image: Image.Image
    """The fully decoded RGB image, EXIF orientation applied, alpha flattened on white (but see ``luma_only``)."""
    format: str
    """Pillow's name of the source format (``JPEG``, ``PNG``, ``GIF``...)."""
    source_mode: str
    """Pillow's mode of the source before conversion (``RGB``, ``L``, ``CMYK``, ``I;16``, ``P``...)."""
    n_frames: int
    """Frames in the source (only the first is used)."""
    transposed: bool
    """EXIF orientation rotated or flipped the image."""
    flattened: bool
    """An alpha channel or transparency key was composited on white."""
    size: tuple[int, int]
    """The image's width and height (after EXIF orientation)."""
    luma_only: bool = False
    """``image`` is the JPEG's luma plane alone (grayscale), not the RGB image (``inspect_image``'s
    ``keep_jpeg_side``)."""


def inspect_image(data: bytes, max_pixels: int, keep_jpeg_side: int | None = None) -> DecodedImage:
    """Fully decode ``data`` to RGB (see :func:`decode_image`) and report what the source was.

    With ``keep_jpeg_side``, a JPEG whose bytes can be stored as they are (RGB or grayscale, no EXIF rotation, no
    side above ``keep_jpeg_side``: ingest keeps such files unchanged) is decoded by libjpeg to its luma plane only
    (``luma_only``), DCT-scaled (``Image.draft``) to the smallest of 1, 1/2, 1/4 and 1/8 of its size whose short side
    is still at least :data:`LUMA_MIN_SIDE`. libjpeg still entropy-decodes every coefficient of every component (a
    scaled inverse DCT reads fewer of them, but the Huffman stream must be parsed whole to reach the next block),
    so a truncated or corrupt stream fails exactly as in a full decode; only the chroma planes, the full-size
    inverse DCT, upsampling and colour conversion, which cannot fail, are skipped, and no RGB copies are made. That
    decode is what ingest validates such a file with, and it is the grayscale image a perceptual hash reads: the
    hash reduces every other image by the same powers of two (``near_duplicates.thumbnail``), so a PNG copy of a
    JPEG, or a copy at twice or half its size, lands on the same grid (docs/design.md, "Near-duplicates", has the
    measured distances).

    Raises:
        ImageDecodeError: empty data, not an image, truncated/corrupt, too many pixels, or a decoder failure.
    """
    if not data:
        raise ImageDecodeError("empty", "zero-byte file")
    with warnings.catch_warnings():
        # Pillow's own bomb check (warning past MAX_IMAGE_PIXELS) becomes a refusal; ours follows at open time,
        # from the header, before any pixel is decoded.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)  # e.g. "Palette images with Transparency expressed in bytes"
        try:
            return _decode(data, max_pixels, keep_jpeg_side)
        except ImageDecodeError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError("too_many_pixels", f"decompression bomb: {exc}") from None
        except UnidentifiedImageError:
            raise ImageDecodeError("not_an_image", "not a recognised image format") from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
            raise ImageDecodeError("corrupt", f"corrupt or truncated image: {exc}") from None
        except (
            MemoryError,
            RecursionError,
            IndexError,
            KeyError,
            TypeError,
            ZeroDivisionError,
            AttributeError,
            RuntimeError,
            NotImplementedError,
        ) as exc:
            raise ImageDecodeError("decoder_error", f"the decoder failed: {type(exc).__name__}: {exc}") from None


def _decode(data: bytes, max_pixels: int, keep_jpeg_side: int | None) -> DecodedImage:
    img = Image.open(io.BytesIO(data))
    fmt = img.format or "unknown"
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError("corrupt", f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise ImageDecodeError("too_many_pixels", f"{width}x{height} exceeds the pixel limit of {max_pixels}")
    if (
        keep_jpeg_side is not None
        and fmt == "JPEG"  # one frame: Pillow names a multi-frame JPEG "MPO"
        and img.mode in ("RGB", "L")
        and max(width, height) <= keep_jpeg_side
        and img.getexif().get(0x0112, 1) in (None, 0, 1)
    ):
        source_mode = img.mode
        img.draft("L", (LUMA_MIN_SIDE, LUMA_MIN_SIDE))  # libjpeg's output: the luma plane, DCT-scaled
        img.load()
        return DecodedImage(img, fmt, source_mode, 1, False, False, (width, height), luma_only=True)
    n_frames = int(getattr(img, "n_frames", 1) or 1)
    img.seek(0)  # multi-frame images (GIF, APNG, WebP, TIFF pages): the first frame
    img.load()
    source_mode = img.mode
    orientation = img.getexif().get(0x0112, 1)
    flattened = source_mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    rgb = _to_rgb(ImageOps.exif_transpose(img))
    rgb.load()
    if rgb.size[0] * rgb.size[1] > max_pixels:  # a frame or page larger than the header said
        raise ImageDecodeError("too_many_pixels", f"{rgb.size[0]}x{rgb.size[1]} exceeds the pixel limit")
    return DecodedImage(rgb, fmt, source_mode, n_frames, orientation not in (None, 0, 1), flattened, rgb.size)


def decode_image(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    """Fully decode ``data`` to an RGB image with EXIF orientation applied; returns ``(image, source_format)``.

    Raises:
        ImageDecodeError: empty data, not an image, truncated/corrupt, too many pixels, or a decoder failure.
    """
    decoded = inspect_image(data, max_pixels)
    return decoded.image, decoded.format
