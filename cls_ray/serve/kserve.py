"""Open Inference Protocol (KServe v2 / Triton) REST codec for an image classifier.

The model has one input, ``image``: a BYTES tensor of shape ``[N]`` holding encoded image files, and one output,
``probabilities``: FP32 ``[N, C]``. BYTES elements arrive either inside the JSON as base64 strings (KServe's
convention for binary payloads in JSON), or through the binary tensor data extension that Triton clients use by
default: an ``Inference-Header-Content-Length`` header gives the size of the JSON part, the raw tensor bytes follow
it, and each BYTES element there is a 4-byte little-endian length followed by its bytes. Outputs are answered the
same way the client asked: in the JSON, or as binary data when ``binary_data`` / ``binary_data_output`` is set.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from cls_ray.serve.inputs import RequestError, decode_base64

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass
class InferRequest:
    """A parsed v2 infer request: the encoded images, the request id and how to return the output."""

    images: list[bytes]
    request_id: str | None
    binary_output: bool


def _bad(message: str, reason: str = "invalid_infer_request") -> RequestError:
    return RequestError(400, reason, message)


def _split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        json_part, binary = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise _bad(f"{HEADER_LENGTH} {header_length!r} does not fit a body of {len(body)} bytes")
        json_part, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        doc = json.loads(json_part)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, "invalid_json", f"the inference header is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _bad("the inference request must be a JSON object")
    return doc, binary


def _deserialize_bytes(raw: bytes, count: int) -> list[bytes]:
    """Triton's BYTES serialization: per element a uint32 little-endian length, then the bytes."""
    items: list[bytes] = []
    pos = 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise _bad("truncated BYTES element length in the binary data")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise _bad("a BYTES element is longer than the binary data holds")
        items.append(raw[pos : pos + size])
        pos += size
    if len(items) != count:
        raise _bad(f"the input's shape says {count} elements but its binary data holds {len(items)}")
    return items


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        return [x for item in data for x in _flatten(item)]
    return [data]


def _tensor_images(tensor: dict[str, Any], binary: bytes) -> list[bytes]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _bad("input 'image' needs a shape: a list of non-negative integers")
    count = math.prod(shape)
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or size > len(binary):
            raise _bad(f"binary_data_size {size!r} does not fit the {len(binary)} bytes after the header")
        return _deserialize_bytes(binary[:size], count)
    if "data" not in tensor:
        raise _bad("input 'image' has neither data nor binary_data_size")
    items = _flatten(tensor["data"])
    if len(items) != count:
        raise _bad(f"the input's shape {shape} says {count} elements but data holds {len(items)}")
    return [decode_base64(text, f"image[{i}] (BYTES data in JSON must be base64)", i) for i, text in enumerate(items)]


def _wants_binary(doc: dict[str, Any]) -> bool:
    outputs = doc.get("outputs")
    if outputs is None:
        return bool((doc.get("parameters") or {}).get("binary_data_output", False))
    if not isinstance(outputs, list):
        raise _bad("outputs must be a list")
    for out in outputs:
        if not isinstance(out, dict) or out.get("name") != OUTPUT_NAME:
            name = out.get("name") if isinstance(out, dict) else out
            raise _bad(f"unknown output {name!r}; this model has one output {OUTPUT_NAME!r}", "unknown_output")
    return any((out.get("parameters") or {}).get("binary_data", False) for out in outputs)


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """Parse a v2 ``/infer`` body (plain JSON, or the binary tensor data extension)."""
    doc, binary = _split_body(body, header_length)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _bad(f"the request needs exactly one input, {INPUT_NAME!r}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise _bad(f"unknown input {tensor.get('name')!r}; this model has one input {INPUT_NAME!r}", "unknown_input")
    if tensor.get("datatype") != "BYTES":
        raise _bad(
            f"input {INPUT_NAME!r} must have datatype BYTES (encoded image files), not {tensor.get('datatype')!r}",
            "invalid_datatype",
        )
    request_id = doc.get("id")
    return InferRequest(
        _tensor_images(tensor, binary), str(request_id) if request_id is not None else None, _wants_binary(doc)
    )


def encode_infer_response(
    probs: np.ndarray, model_name: str, model_version: str, request: InferRequest
) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers (``Inference-Header-Content-Length`` for binary output)."""
    probs = np.ascontiguousarray(probs, dtype="<f4")
    output: dict[str, Any] = {"name": OUTPUT_NAME, "datatype": "FP32", "shape": list(probs.shape)}
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": [output]}
    if request.request_id is not None:
        doc["id"] = request.request_id
    if not request.binary_output:
        output["data"] = probs.ravel().tolist()
        return json.dumps(doc).encode(), {"content-type": "application/json"}
    raw = probs.tobytes()
    output["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps(doc).encode()
    return header + raw, {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def model_metadata(model_name: str, model_version: str, num_classes: int) -> dict[str, Any]:
    """``GET /v2/models/{name}``: the tensors the model takes and returns (-1: any batch size)."""
    return {
        "name": model_name,
        "versions": [model_version],
        "platform": "pytorch_timm",
        "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, num_classes]}],
    }
