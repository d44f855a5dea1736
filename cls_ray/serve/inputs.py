"""Turning an untrusted HTTP request into image bytes and parameters, or a 4xx :class:`RequestError`.

``POST /v1/predict`` takes raw image bytes (``image/*`` or ``application/octet-stream``), a multipart upload of one
or more files, or JSON with base64 images. Sizes are checked while the body streams in, before anything is parsed.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

RAW_TYPES = ("application/octet-stream",)
ACCEPTED = "image/*, application/octet-stream, multipart/form-data or application/json"


class RequestError(Exception):
    """A client mistake answered with ``status`` and ``{"error": message, "reason": reason, "image": i}``."""

    def __init__(self, status: int, reason: str, message: str, image: int | None = None):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.image = image

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "reason": self.reason, "image": self.image}


@dataclass
class ImageInputs:
    """The images of one request, in order, and the ``top_k`` the body asked for (None: not given)."""

    images: list[bytes]
    filenames: list[str | None] = field(default_factory=list)
    top_k: Any = None


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as the declared, streamed or decompressed size passes ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, "bad_content_length", f"invalid Content-Length {declared!r}")
        if int(declared) > limit:
            raise RequestError(413, "request_too_large", f"the request has {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise RequestError(413, "request_too_large", f"the request is over the limit of {limit} bytes")
        chunks.append(chunk)
    return _decompress(b"".join(chunks), request.headers.get("content-encoding", ""), limit)


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo a gzip/deflate Content-Encoding (Triton clients can compress requests), at most ``limit`` bytes out."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise RequestError(
            415, "unsupported_encoding", f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none"
        )
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise RequestError(400, "invalid_encoding", f"the {encoding} body does not decompress: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise RequestError(413, "request_too_large", f"the decompressed request is over the limit of {limit} bytes")
    return out


def decode_base64(text: Any, where: str, image: int | None = None) -> bytes:
    """Strict base64 (an optional ``data:...;base64,`` prefix is dropped) or a 400 naming ``where``."""
    if not isinstance(text, str):
        raise RequestError(400, "invalid_base64", f"{where} must be a base64 string", image)
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "invalid_base64", f"{where} is not valid base64", image) from None


def _parse_json(body: bytes) -> ImageInputs:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise RequestError(422, "invalid_request", 'the JSON body needs "images": a list of base64 strings')
    images = [decode_base64(text, f"images[{i}]", i) for i, text in enumerate(doc["images"])]
    return ImageInputs(images, [None] * len(images), doc.get("top_k"))


async def _parse_multipart(request: Request, body: bytes, max_images: int) -> ImageInputs:
    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        # The body was read (and size-checked) already; the form parser reads it again from memory.
        form = await Request(request.scope, replay).form(max_files=max_images + 1, max_fields=100)
    except (HTTPException, MultiPartException) as exc:
        detail = str(getattr(exc, "detail", None) or getattr(exc, "message", exc))
        if "too many files" in detail.lower():
            raise RequestError(413, "too_many_images", f"at most {max_images} images per request") from None
        raise RequestError(400, "invalid_multipart", f"malformed multipart body: {detail}") from None
    try:
        images: list[bytes] = []
        names: list[str | None] = []
        top_k = None
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                images.append(await value.read())
                names.append(value.filename)
            elif key == "top_k":
                top_k = value
        return ImageInputs(images, names, top_k)
    finally:
        await form.close()


async def parse_predict_request(request: Request, body: bytes, max_images: int) -> ImageInputs:
    """Images and top_k of a ``/v1/predict`` request; 415 for other content types, 413 past ``max_images``."""
    ctype = content_type(request)
    if ctype.startswith("image/") or ctype in RAW_TYPES:
        inputs = ImageInputs([body], [None])
    elif ctype == "application/json":
        inputs = _parse_json(body)
    elif ctype == "multipart/form-data":
        inputs = await _parse_multipart(request, body, max_images)
    else:
        raise RequestError(
            415, "unsupported_media_type", f"Content-Type {ctype or '(none)'} is not accepted; send {ACCEPTED}"
        )
    if not inputs.images:
        raise RequestError(422, "no_images", "the request holds no image")
    if len(inputs.images) > max_images:
        raise RequestError(413, "too_many_images", f"at most {max_images} images per request")
    return inputs


def resolve_top_k(query: str | None, body_value: Any, default: int, num_classes: int) -> int:
    """``top_k`` from the query string, else the body, else ``default`` capped at the class count; 422 if invalid."""
    if query is not None:
        value: Any = query.strip()
        if not (value.isdigit() or (value.startswith("-") and value[1:].isdigit())):
            raise RequestError(422, "invalid_top_k", f"top_k must be an integer, got {query!r}")
        value = int(value)
    elif body_value is not None:
        value = body_value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(422, "invalid_top_k", f"top_k must be an integer, got {body_value!r}")
    else:
        return min(default, num_classes)
    if not 1 <= value <= num_classes:
        raise RequestError(422, "invalid_top_k", f"top_k must be between 1 and {num_classes}, got {value}")
    return value
