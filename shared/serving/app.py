"""What every stage's FastAPI app shares: msgpack bodies, health/readiness/info, lifespan, error handlers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from shared import __version__, wire
from shared.errors import (
    MalformedRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
    install_error_handlers,
    validation_error,
)
from shared.observability import install_observability
from shared.runtime import StageRuntime
from shared.settings import Settings

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
log = logging.getLogger("triptych.stage")
DISCONNECT_POLL_S = 0.25


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > max_bytes:
                raise PayloadTooLarge(f"body is {declared} bytes; at most {max_bytes} are allowed")
        except ValueError:
            raise MalformedRequest("Content-Length is not a number") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"body exceeds {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_message(body: bytes, model: type[M], limits: wire.Limits) -> M:
    """msgpack bytes -> a validated protocol model; every failure is a 400, 413 or 422."""
    try:
        message = wire.decode(body, limits)
    except wire.WireError as exc:
        raise (PayloadTooLarge if exc.too_large else MalformedRequest)(str(exc)) from None
    if not isinstance(message, dict):
        raise MalformedRequest(f"message must be a msgpack map, got {type(message).__name__}")
    try:
        return model.model_validate(message)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False)) from None


async def read_message(request: Request, model: type[M], limits: wire.Limits) -> M:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != wire.CONTENT_TYPE:
        raise UnsupportedMediaType(f"Content-Type must be {wire.CONTENT_TYPE}, got {content_type or 'none'}")
    return parse_message(await read_body(request, limits.max_body_bytes), model, limits)


class MsgpackResponse(Response):
    media_type = wire.CONTENT_TYPE

    def render(self, content: Any) -> bytes:
        return wire.encode(content)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await ``work`` while checking every DISCONNECT_POLL_S that the caller is still connected. If it has gone
    (a client hung up, central timed out), cancel the work and return None: a stage drops queued work and the
    UNet batcher a running job before its next step; in central, cancelling closes the hop's connection, so
    the stage working on it stops too."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                log.info("%s: caller disconnected; request abandoned", request.url.path)
                return None
    except asyncio.CancelledError:  # this request itself was cancelled (server shutting down)
        task.cancel()
        raise
    return task.result()


async def get_runtime(request: Request) -> StageRuntime:
    runtime: StageRuntime = request.app.state.runtime
    runtime.check_ready()
    return runtime


RuntimeDep = Annotated[StageRuntime, Depends(get_runtime)]


def message_route(
    router: APIRouter,
    path: str,
    request_model: type[M],
    op: str,
    *,
    summary: str,
) -> None:
    """Register ``POST path``: msgpack ``request_model`` in, the result of the runtime's method ``op`` (a
    protocol model) out as msgpack. Value errors it raises (InvalidValue) become 422."""

    async def endpoint(request: Request) -> Response:
        runtime = await get_runtime(request)
        message = await read_message(request, request_model, request.app.state.limits)
        obs = request.app.state.observability  # measured: queue depth, wait and compute time, batch size
        result = await unless_disconnected(request, obs.run_stage(runtime, op, message))
        if result is None:
            return Response(status_code=499)
        return MsgpackResponse(result.to_wire())

    endpoint.__name__ = path.strip("/").replace("/", "_").replace("-", "_")
    router.add_api_route(
        path,
        endpoint,
        methods=["POST"],
        summary=summary,
        response_class=MsgpackResponse,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {wire.CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}},
            },
        },
    )


def build_stage_app(
    runtime: StageRuntime,
    routes: APIRouter,
    *,
    title: str,
    owns_runtime: bool = True,
    settings: Settings | None = None,
) -> FastAPI:
    """A stage app around ``runtime``. The model loads in the background at start-up, so ``/healthz``
    answers at once and ``/readyz`` turns 200 when the weights are in and warmed up. An app that does not
    own its runtime (tests, embedded use) leaves it open at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = None
        if not runtime.ready:
            task = asyncio.create_task(runtime.load_async())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # logged in runtime.load
        try:
            yield
        finally:
            if task is not None and not task.done():
                task.cancel()
            if owns_runtime:
                runtime.close()

    app = FastAPI(title=title, version=__version__, lifespan=lifespan)
    app.state.runtime = runtime
    app.state.limits = wire.Limits(max_body_bytes=(settings or runtime.settings).max_body_bytes)
    install_error_handlers(app)
    install_observability(app, service=runtime.stage, runtime=runtime, drain_timeout_s=runtime.settings.drain_timeout_s)

    @app.get("/healthz", summary="Process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "stage": runtime.stage}

    @app.get("/readyz", summary="Weights loaded and warmed up")
    async def readyz() -> JSONResponse:
        runtime.check_ready()
        return JSONResponse({"status": "ready", "stage": runtime.stage})

    @app.get("/v1/info", summary="Model, fingerprint and the config other stages must agree with")
    async def info(rt: RuntimeDep) -> dict[str, Any]:
        return rt.info().model_dump()

    app.include_router(routes)
    return app
