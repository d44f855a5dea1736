"""Decoding untrusted image bytes into RGB, shared by ingest (validation) and serving (requests).

Everything a real folder or a hostile client sends is handled here: truncated and corrupt files, non-images,
decompression bombs, EXIF orientation, CMYK / 16-bit / palette / alpha modes and multi-frame files.
"""

from __future__ import annotations

import io
import struct
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError


class ImageDecodeError(ValueError):
    """An image was refused; ``reason`` is a short machine-friendly tag, the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit integer grayscale: scale to 8 bits by the image's own range instead of clipping at 255.
        lo, hi = img.getextrema()
        scale = 255.0 / (hi - lo) if hi > lo else 1.0
        img = img.point(lambda v: (v - lo) * scale).convert("L")
    elif img.mode == "F":
        lo, hi = img.getextrema()
        scale = 255.0 / (hi - lo) if hi > lo else 1.0
        img = img.point(lambda v: (v - lo) * scale).convert("L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    """Fully decode ``data`` to an RGB image with EXIF orientation applied; returns ``(image, source_format)``.

    Raises:
        ImageDecodeError: empty data, not an image, truncated/corrupt, too many pixels, or a decoder failure.
    """
    if not data:
        raise ImageDecodeError("empty", "zero-byte file")
    with warnings.catch_warnings():
        # Pillow's own bomb check (warning past MAX_IMAGE_PIXELS) becomes a refusal; ours follows at open time,
        # from the header, before any pixel is decoded.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            fmt = img.format or "unknown"
            width, height = img.size
            if width * height > max_pixels or width <= 0 or height <= 0:
                raise ImageDecodeError("too_many_pixels",
                                       f"{width}x{height} exceeds the pixel limit of {max_pixels}")
            img.seek(0)  # multi-frame images (GIF, APNG, WebP, TIFF pages): the first frame
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
            img.load()
            return img, fmt
        except ImageDecodeError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError("too_many_pixels", f"decompression bomb: {exc}") from None
        except UnidentifiedImageError:
            raise ImageDecodeError("not_an_image", "not a recognised image format") from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
            raise ImageDecodeError("corrupt", f"corrupt or truncated image: {exc}") from None
        except (MemoryError, RecursionError, IndexError, KeyError, TypeError, ZeroDivisionError,
                AttributeError, RuntimeError) as exc:
            raise ImageDecodeError("decoder_error", f"the decoder failed: {type(exc).__name__}: {exc}") from None
