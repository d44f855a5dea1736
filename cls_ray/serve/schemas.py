"""Request and response bodies of the HTTP API (pydantic models; they also make the OpenAPI document)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ClassScore(BaseModel):
    """One of the top-k classes of an image."""

    model_config = ConfigDict(populate_by_name=True)

    label: int = Field(description="Class index in the model's label order.")
    class_name: str = Field(alias="class", description="Class name.")
    probability: float = Field(description="Softmax probability.")


class ImagePrediction(BaseModel):
    """The prediction for one image of a request, in request order."""

    index: int
    filename: str | None = Field(default=None, description="The uploaded file's name (multipart uploads).")
    top_k: list[ClassScore]


class ModelRef(BaseModel):
    name: str
    version: str


class PredictResponse(BaseModel):
    """Answer of ``POST /v1/predict``."""

    model: ModelRef
    predictions: list[ImagePrediction]
    latency_ms: float = Field(description="Time spent inside the server on this request.")


class PredictJSONRequest(BaseModel):
    """JSON form of ``POST /v1/predict``."""

    images: list[str] = Field(description="Base64-encoded image files (a data: URL prefix is accepted).")
    top_k: int | None = Field(default=None, description="Classes per image; the query parameter wins if both.")


class ModelInfo(BaseModel):
    """Metadata of the served model package."""

    name: str
    version: str
    architecture: str
    classes: list[str]
    num_classes: int
    input_size: list[int]
    data_config: dict[str, Any]
    metrics: dict[str, Any]
    default_top_k: int
    max_images: int
    max_request_bytes: int


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class ErrorResponse(BaseModel):
    """Every error answer: a message, a short machine-friendly reason and, for image errors, which image."""

    error: str
    reason: str
    image: int | None = None


class StatsResponse(BaseModel):
    """Dynamic-batching statistics of the model replica that answered."""

    replica: str
    batches: int
    images: int
    mean_batch_size: float
    max_batch_size_seen: int
    batch_size_histogram: dict[str, int]
    max_batch_size: int
    batch_wait_timeout_s: float


class HealthResponse(BaseModel):
    status: str


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Malformed request (bad JSON, multipart or base64)",
        401: "Missing or wrong X-API-Key",
        413: "Request too large, too many images, or an image with too many pixels",
        415: "Unsupported Content-Type, or the bytes are not an image",
        422: "Invalid parameter (top_k) or a corrupt image",
        503: "The model is not available right now; retry",
    }.items()
}

PREDICT_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "top_k": {"type": "integer"},
                },
            }
        },
        "application/json": {"schema": PredictJSONRequest.model_json_schema()},
    },
}

V2_INFER_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "id": {"type": "string"},
                    "parameters": {"type": "object"},
                    "inputs": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "shape", "datatype"],
                            "properties": {
                                "name": {"type": "string", "example": "image"},
                                "shape": {"type": "array", "items": {"type": "integer"}},
                                "datatype": {"type": "string", "example": "BYTES"},
                                "data": {
                                    "type": "array",
                                    "items": {"type": "string"},
                                    "description": "base64-encoded image files",
                                },
                            },
                        },
                    },
                    "outputs": {"type": "array", "items": {"type": "object"}},
                },
            }
        },
        "application/octet-stream": {
            "schema": {"type": "string", "format": "binary"},
            "description": "Binary tensor data extension: JSON header of Inference-Header-Content-Length bytes, "
            "then each BYTES element as a 4-byte little-endian length and the encoded image.",
        },
    },
}
