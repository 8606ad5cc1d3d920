"""The search service's HTTP API and page: ``heimdex-clip serve``.

FastAPI on uvicorn. Every error is the project's shape, ``{"error": {"code", "message", "retryable"}}``
with a 4xx for the caller's mistakes, and never a traceback. Handlers stay thin: the work is
:class:`~heimdex_clip_assets.pipeline.search.SearchService`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from importlib import resources
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from heimdex_clip_assets.pipeline.search import Hit, SearchService
from heimdex_clip_contract.errors import ClipError, ImageTooLargeError, InvalidImageError, InvalidRequestError

from .auth import Authenticator, Principal
from .metrics import Metrics, MetricsMiddleware

STATIC = resources.files(__package__).joinpath("static")

# Error code -> HTTP status; codes not listed are 503 when retryable (try again), else 500.
STATUS_BY_CODE = {
    "invalid_request": 400,
    "invalid_image": 400,
    "image_download_failed": 400,
    "auth_failed": 401,
    "forbidden": 403,
    "not_found": 404,
    "image_too_large": 413,
    "timeout": 504,
}


# --------------------------------------------------------------------------------------- models
class HitOut(BaseModel):
    scene_id: str
    video_id: str
    filename: str | None
    index: int = Field(description="The scene's index within its video")
    start_s: float
    end_s: float
    score: float = Field(description="Cosine similarity, 1 = identical direction")
    thumbnail_url: str | None = Field(description="Signed, short-lived; null if the file is missing")
    video_url: str | None = Field(description="Signed video URL ending in #t=<start_s>")


class SearchOut(BaseModel):
    hits: list[HitOut]
    model_version: str
    cached: bool = Field(False, description="The query's vector came from the cache")


class EmbedTextIn(BaseModel):
    text: str


class EmbedTextOut(BaseModel):
    embedding: list[float]
    dim: int
    model_version: str
    cached: bool


class ImageUrlIn(BaseModel):
    url: str


class VideoOut(BaseModel):
    id: str
    filename: str | None
    scenes: int


class VideosOut(BaseModel):
    videos: list[VideoOut]


class ErrorBody(BaseModel):
    code: str
    message: str
    retryable: bool


class ErrorOut(BaseModel):
    error: ErrorBody


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut} for status in (400, 401, 403, 404, 413, 503)
}


def principal(request: Request) -> Principal:
    return request.app.state.authenticator.authenticate(request.headers.get("authorization"))


Caller = Annotated[Principal, Depends(principal)]


# ----------------------------------------------------------------------------------------- app
def app_from_env() -> FastAPI:
    """The app on ``Settings.from_env()``: what ``heimdex-clip serve`` runs in each uvicorn worker."""
    from heimdex_clip_assets import services
    from heimdex_clip_assets.config import Settings

    settings = Settings.from_env()
    return create_app(
        services.search_service(settings),
        Authenticator(settings.search_api_keys, settings.supabase_jwt_secret),
        max_image_bytes=settings.max_image_size_bytes,
    )


def create_app(
    service: SearchService, authenticator: Authenticator, *, max_image_bytes: int = 10 * 1024 * 1024
) -> FastAPI:
    metrics = Metrics(service)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()  # the encoder's batching thread and the open database connections

    app = FastAPI(
        title="heimdex-clip search",
        version="1",
        description="Text or image in, the caller's closest video scenes out.",
        lifespan=lifespan,
    )
    app.state.authenticator = authenticator
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    backend = service.encoder.backend
    max_bytes = max_image_bytes

    def error_response(err: ClipError, status: int | None = None) -> JSONResponse:
        metrics.errors.labels(err.code).inc()
        status = status or STATUS_BY_CODE.get(err.code) or (503 if err.retryable else 500)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": err.to_dict()}, status_code=status, headers=headers)

    @app.exception_handler(ClipError)
    async def on_clip_error(request: Request, err: ClipError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body"))
        return error_response(InvalidRequestError(f"{where or 'request'}: {first.get('msg', 'invalid')}"))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        message = {404: f"No route {request.url.path}; see /docs"}.get(exc.status_code, str(exc.detail))
        return error_response(ClipError(message, code=code, retryable=False), exc.status_code)

    async def text_vector(text: str) -> tuple[np.ndarray, bool]:
        future, cached = service.text_vector(text)
        metrics.cache.labels("hit" if cached else "miss").inc()
        return await asyncio.wrap_future(future), cached

    def hits_out(hits: list[Hit]) -> list[HitOut]:
        return [HitOut(**hit.__dict__) for hit in hits]

    # ----------------------------------------------------------------------------------- routes
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC.joinpath("index.html")))

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """Liveness and the database: 200 when a trivial query answers."""
        await run_in_threadpool(service.store.query, "SELECT 1")
        return {"status": "ok", "backend": backend, "model_version": service.encoder.model_version}

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text format: requests, latency histograms, encoder calls, errors by code."""
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/search", response_model=SearchOut, responses=ERRORS, tags=["search"])
    async def search_text(
        caller: Caller,
        q: Annotated[str, Query(description="What the scene shows, in words")],
        limit: Annotated[int, Query(description="1 to 100")] = 10,
        video_id: Annotated[str | None, Query(description="Only this video's scenes")] = None,
        user_id: Annotated[str | None, Query(description="Only this owner's scenes (API keys)")] = None,
        min_score: Annotated[float | None, Query(ge=-1, le=1)] = None,
    ) -> SearchOut:
        """Text to the closest scenes, best first."""
        tenant = caller.tenant(user_id)
        vector, cached = await text_vector(q)
        hits = await run_in_threadpool(
            service.search, vector, limit=limit, user_id=tenant, video_id=video_id, min_score=min_score
        )
        return SearchOut(hits=hits_out(hits), model_version=service.encoder.model_version, cached=cached)

    @app.post(
        "/v1/search/image",
        response_model=SearchOut,
        responses=ERRORS,
        tags=["search"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {"file": {"type": "string", "format": "binary"}},
                            "required": ["file"],
                        }
                    },
                    "application/json": {"schema": ImageUrlIn.model_json_schema()},
                },
            }
        },
    )
    async def search_image(
        request: Request,
        caller: Caller,
        limit: int = 10,
        video_id: str | None = None,
        user_id: str | None = None,
        min_score: Annotated[float | None, Query(ge=-1, le=1)] = None,
    ) -> SearchOut:
        """An image (uploaded as ``file``, or ``{"url": ...}``) to the closest scenes."""
        tenant = caller.tenant(user_id)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            data = await _read_upload(request, max_bytes)
            vector = await run_in_threadpool(service.image_vector, data)
        elif kind == "application/json":
            url = _json_url(await request.body())
            vector = await run_in_threadpool(service.image_url_vector, url)
        else:
            raise InvalidRequestError(
                "Send the image as multipart/form-data (field 'file') or JSON {\"url\": ...}"
            )
        hits = await run_in_threadpool(
            service.search, vector, limit=limit, user_id=tenant, video_id=video_id, min_score=min_score
        )
        return SearchOut(hits=hits_out(hits), model_version=service.encoder.model_version)

    @app.post("/v1/embed/text", response_model=EmbedTextOut, responses=ERRORS, tags=["embed"])
    async def embed_text(body: EmbedTextIn, caller: Caller) -> EmbedTextOut:
        """The query's vector in the scenes' space (unit length)."""
        vector, cached = await text_vector(body.text)
        return EmbedTextOut(
            embedding=vector.tolist(),
            dim=int(vector.shape[0]),
            model_version=service.encoder.model_version,
            cached=cached,
        )

    @app.get("/v1/videos", response_model=VideosOut, responses=ERRORS, tags=["search"])
    async def videos(caller: Caller, user_id: str | None = None) -> VideosOut:
        """The caller's videos that have searchable scenes, for the page's video filter."""
        rows = await run_in_threadpool(service.store.searchable_videos, caller.tenant(user_id))
        return VideosOut(videos=[VideoOut(**row) for row in rows])

    return app


async def _read_upload(request: Request, max_bytes: int) -> bytes:
    form = await request.form(max_files=1, max_fields=8, max_part_size=max_bytes)
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise InvalidRequestError("Attach the image as the form field 'file'")
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"The image is over {max_bytes:,} bytes; send a smaller one")
    if not data:
        raise InvalidImageError("The uploaded file is empty; attach a JPEG, PNG or WebP image")
    return data


def _json_url(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise InvalidRequestError('The body is not valid JSON; send {"url": "https://..."}') from exc
    url = data.get("url") if isinstance(data, dict) else None
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise InvalidRequestError('Send {"url": "https://..."}: an http(s) URL of an image')
    return url
