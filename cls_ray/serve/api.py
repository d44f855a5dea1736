"""The FastAPI application of the ingress: cls-ray's own ``/v1`` API, the Open Inference Protocol (KServe v2)
routes, health checks, the upload page at ``/`` and the OpenAPI docs.

Every error is JSON ``{"error", "reason", "image"}`` with a 4xx status for anything a client can cause; an
unexpected failure is logged here and answered with a generic 500, never a stack trace.

Serve builds the app on every ingress replica (``@serve.ingress(create_api)``); the routes reach that replica's
:class:`~cls_ray.serve.deployment.ClassifierIngress` (its config, model metadata and model handle) through the
:data:`Ingress` dependency, which reads Serve's replica context.
"""

from __future__ import annotations

import logging
import time
from importlib import resources
from typing import Annotated, Any

import ray.exceptions
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cls_ray import telemetry
from cls_ray.predict import top_k as top_k_classes
from cls_ray.serve import kserve, schemas
from cls_ray.serve.inputs import RequestError, parse_predict_request, read_body, resolve_top_k

logger = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
INTERNAL_ERROR = {"error": "internal server error", "reason": "internal_error", "image": None}


class CatchAllMiddleware:
    """Outermost guard: an exception nobody handled becomes a logged, generic JSON 500."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        status = 500

        async def tracking_send(message: Message) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                started, status = True, int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await JSONResponse(INTERNAL_ERROR, status_code=500)(scope, receive, send)
        finally:
            # The route template (FastAPI records the matched route in the scope), not the path: bounded tags.
            telemetry.record_request(getattr(scope.get("route"), "path", "unmatched"), status)


def _error_response(status: int, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, status_code=status)


def _install_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        return _error_response(exc.status, exc.body())

    @api.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return _error_response(exc.status_code, {"error": str(exc.detail), "reason": "http_error", "image": None})

    @api.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return _error_response(422, {"error": f"invalid request: {where}", "reason": "invalid_request", "image": None})

    @api.exception_handler(ray.exceptions.RayError)
    async def model_unavailable(_: Request, exc: ray.exceptions.RayError) -> JSONResponse:
        if isinstance(exc, ray.exceptions.RayTaskError):
            logger.error("the model deployment failed: %s", exc)
            return _error_response(500, INTERNAL_ERROR)
        logger.warning("model replica unavailable: %s", type(exc).__name__)
        return _error_response(
            503, {"error": "the model is not available right now; retry", "reason": "model_unavailable", "image": None}
        )


def _page() -> str:
    return resources.files("cls_ray.serve").joinpath("static/index.html").read_text(encoding="utf-8")


async def current_ingress() -> Any:
    """The :class:`~cls_ray.serve.deployment.IngressReplica` serving this request (ingress or single deployment)."""
    return serve.get_replica_context().servable_object


Ingress = Annotated[Any, Depends(current_ingress)]
"""Route parameter type: FastAPI passes the serving replica (:func:`current_ingress`)."""


def authorize(ingress: Any, request: Request) -> None:
    """Refuse the request (401) unless it carries the API key the replica requires (if any)."""
    ingress.check_api_key(request.headers.get(API_KEY_HEADER))


def _openapi(api: FastAPI) -> dict[str, Any]:
    """The OpenAPI schema, naming the served model: built at the first request for it, when the replica is known
    (Serve calls :func:`create_api` before the replica is registered as the servable object)."""
    if api.openapi_schema is None:
        ingress = serve.get_replica_context().servable_object
        api.version = ingress.version
        api.description = (
            f"Image classifier {ingress.name} ({ingress.meta['architecture']}, "
            f"{len(ingress.classes)} classes) served by Ray Serve."
        )
    return FastAPI.openapi(api)


def create_api() -> FastAPI:
    """Build the ingress's FastAPI app (Serve calls this on each ingress replica, after its constructor)."""
    api = FastAPI(title="cls-ray")
    api.openapi = lambda: _openapi(api)  # type: ignore[method-assign]
    _install_error_handlers(api)
    api.add_middleware(CatchAllMiddleware)
    page = _page()

    @api.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @api.get("/healthz", response_model=schemas.HealthResponse, tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the ingress answers."""
        return {"status": "ok"}

    @api.get(
        "/readyz",
        response_model=schemas.HealthResponse,
        tags=["health"],
        responses={503: {"model": schemas.ErrorResponse}},
    )
    async def readyz(ingress: Ingress) -> Any:
        """Readiness: a model replica answers."""
        if await ingress.model_ready():
            return {"status": "ready"}
        return _error_response(503, {"error": "no model replica is ready", "reason": "not_ready", "image": None})

    @api.get("/v1/models", response_model=schemas.ModelsResponse, tags=["v1"], responses=schemas.ERROR_RESPONSES)
    async def models(request: Request, ingress: Ingress) -> dict[str, Any]:
        """Metadata of the served model: classes, architecture, preprocessing, metrics."""
        authorize(ingress, request)
        return {"models": [ingress.model_info()]}

    @api.get("/v1/stats", response_model=schemas.StatsResponse, tags=["v1"], responses=schemas.ERROR_RESPONSES)
    async def stats(request: Request, ingress: Ingress) -> dict[str, Any]:
        """Dynamic-batching statistics of one model replica."""
        authorize(ingress, request)
        return await ingress.model_stats()

    @api.post(
        "/v1/predict",
        response_model=schemas.PredictResponse,
        response_model_by_alias=True,
        tags=["v1"],
        responses=schemas.ERROR_RESPONSES,
        openapi_extra={"requestBody": schemas.PREDICT_REQUEST_BODY},
    )
    async def predict(request: Request, ingress: Ingress, top_k: str | None = None) -> dict[str, Any]:
        """Top-k classes of one or more images: raw bytes, multipart files, or JSON with base64 images."""
        start = time.perf_counter()
        authorize(ingress, request)
        body = await read_body(request, ingress.cfg.max_request_bytes)
        inputs = await parse_predict_request(request, body, ingress.cfg.max_images)
        k = resolve_top_k(top_k, inputs.top_k, ingress.cfg.default_top_k, len(ingress.classes))
        probs = await ingress.probabilities(inputs.images)
        best = top_k_classes(probs, ingress.classes, k)
        return {
            "model": {"name": ingress.name, "version": ingress.version},
            "predictions": [
                {"index": i, "filename": name, "top_k": scores}
                for i, (name, scores) in enumerate(zip(inputs.filenames, best, strict=True))
            ],
            "latency_ms": (time.perf_counter() - start) * 1000.0,
        }

    _add_v2_routes(api)
    return api


def _check_model(ingress: Any, name: str, version: str | None = None) -> None:
    if name != ingress.name or (version is not None and version != ingress.version):
        raise RequestError(
            404,
            "unknown_model",
            f"no model {name!r}"
            + (f" version {version!r}" if version is not None else "")
            + f"; this server has {ingress.name!r} version {ingress.version!r}",
        )


def _add_v2_routes(api: FastAPI) -> None:
    """Open Inference Protocol REST routes (health, server and model metadata, readiness, infer)."""

    @api.get("/v2", tags=["v2"])
    async def server_metadata() -> dict[str, Any]:
        return {"name": "cls-ray", "version": "2", "extensions": ["binary_tensor_data"]}

    @api.get("/v2/health/live", tags=["v2"])
    async def live() -> dict[str, bool]:
        return {"live": True}

    @api.get("/v2/health/ready", tags=["v2"])
    async def ready(ingress: Ingress) -> Any:
        ok = await ingress.model_ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @api.get("/v2/models/{name}/ready", tags=["v2"])
    @api.get("/v2/models/{name}/versions/{version}/ready", tags=["v2"])
    async def model_ready(ingress: Ingress, name: str, version: str | None = None) -> Any:
        _check_model(ingress, name, version)
        ok = await ingress.model_ready()
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)

    @api.get("/v2/models/{name}", tags=["v2"], responses=schemas.ERROR_RESPONSES)
    @api.get("/v2/models/{name}/versions/{version}", tags=["v2"], responses=schemas.ERROR_RESPONSES)
    async def model_metadata(
        request: Request, ingress: Ingress, name: str, version: str | None = None
    ) -> dict[str, Any]:
        authorize(ingress, request)
        _check_model(ingress, name, version)
        return kserve.model_metadata(ingress.name, ingress.version, len(ingress.classes))

    @api.post(
        "/v2/models/{name}/infer",
        tags=["v2"],
        responses=schemas.ERROR_RESPONSES,
        openapi_extra={"requestBody": schemas.V2_INFER_REQUEST_BODY},
    )
    @api.post(
        "/v2/models/{name}/versions/{version}/infer",
        tags=["v2"],
        responses=schemas.ERROR_RESPONSES,
        openapi_extra={"requestBody": schemas.V2_INFER_REQUEST_BODY},
    )
    async def infer(request: Request, ingress: Ingress, name: str, version: str | None = None) -> Response:
        """Class probabilities (FP32 [N, C]) of a BYTES input ``image`` of N encoded image files."""
        authorize(ingress, request)
        _check_model(ingress, name, version)
        body = await read_body(request, ingress.cfg.max_request_bytes)
        parsed = kserve.parse_infer_request(body, request.headers.get(kserve.HEADER_LENGTH))
        if not parsed.images:
            raise RequestError(400, "no_images", "the input 'image' holds no element")
        if len(parsed.images) > ingress.cfg.max_images:
            raise RequestError(413, "too_many_images", f"at most {ingress.cfg.max_images} images per request")
        probs = await ingress.probabilities(parsed.images)
        content, headers = kserve.encode_infer_response(probs, ingress.name, ingress.version, parsed)
        media = headers.pop("content-type")
        return Response(content, media_type=media, headers=headers)
