"""What every stage's FastAPI app shares: one msgpack route per declared operation, health, readiness, info,
the lifespan that loads the model in the background, error handlers and observability."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline

from shared import __version__, wire
from shared.errors import TriptychError, error_envelope, install_error_handlers
from shared.operations import Operation
from shared.serving.http import BodyTimeout, MsgpackResponse, install_connection_cap, read_message, unless_disconnected
from shared.serving.middleware import install_observability
from shared.serving.runtime import StageRuntime
from shared.serving.security import install_access, split_list
from shared.settings import Settings

log = logging.getLogger("triptych.stage")


async def get_runtime(request: Request) -> StageRuntime:
    """The app's runtime, once its model is loaded (503 with Retry-After until then)."""
    runtime: StageRuntime = request.app.state.runtime
    runtime.check_ready()
    return runtime


RuntimeDep = Annotated[StageRuntime, Depends(get_runtime)]


def message_route(router: APIRouter, op: Operation[Any, Any]) -> None:
    """Register ``POST op.path``: msgpack ``op.request`` in, ``op.response`` out, computed by the runtime's
    batcher for ``op``. Value errors it raises (InvalidValue) become 422; a caller that hangs up abandons it."""

    async def endpoint(request: Request, runtime: RuntimeDep) -> Response:
        message = await read_message(request, op.request, request.app.state.limits)
        if wire.STREAM_CONTENT_TYPE in request.headers.get("accept", ""):
            return streamed(request, runtime, op, message)
        metrics = request.app.state.metrics
        depth = metrics.queue_depth.labels(metrics.service)
        admitted = time.perf_counter()
        depth.inc()
        try:
            work = await unless_disconnected(request, runtime.execute(op, message))
        finally:
            depth.dec()
        if work is None:
            return Response(status_code=499)
        metrics.observe_stage_call(op.name, message, admitted, work)
        return MsgpackResponse(work.result().to_wire())

    endpoint.__name__ = op.name
    router.add_api_route(
        op.path,
        endpoint,
        methods=["POST"],
        summary=op.summary,
        response_class=MsgpackResponse,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {wire.CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}},
            },
        },
    )


def streamed(request: Request, runtime: StageRuntime, op: Operation[Any, Any], message: Any) -> Response:
    """The answer as a stream of frames (``wire.STREAM_CONTENT_TYPE``): ``{"event": "progress", ...}`` as the
    work goes (the UNet: every step, with a ``preview`` tensor every ``preview_every`` steps), then one
    ``{"event": "result", "message": ...}`` or ``{"event": "error", "status", "error": {envelope}}``.

    A request the stage refuses (422, 429, 503) is refused before the stream starts, with its usual status.
    A caller that hangs up mid-stream abandons the work: the UNet drops the job before its next step (that is
    how central cancels a job)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def on_progress(event: dict[str, Any]) -> None:  # on the model thread
        loop.call_soon_threadsafe(events.put_nowait, event)

    metrics = request.app.state.metrics
    admitted = time.perf_counter()
    work = runtime.submit(op, message, on_progress)
    done = asyncio.wrap_future(work)
    depth = metrics.queue_depth.labels(metrics.service)
    depth.inc()

    async def frames() -> AsyncIterator[bytes]:
        try:
            while not done.done():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                yield wire.encode_frame({"event": "progress", **getter.result()})
            while not events.empty():  # scheduled before the result: still in order
                yield wire.encode_frame({"event": "progress", **events.get_nowait()})
            try:
                result = work.result()
            except TriptychError as exc:
                yield wire.encode_frame({"event": "error", "status": exc.status, **exc.envelope()})
            except Exception:
                log.exception("%s failed", op.name)
                envelope = error_envelope("internal_error", f"{op.name} failed; see the stage's log")
                yield wire.encode_frame({"event": "error", "status": 500, **envelope})
            else:
                metrics.observe_stage_call(op.name, message, admitted, work)
                yield wire.encode_frame({"event": "result", "message": result.to_wire()})
        finally:
            depth.dec()
            if not work.done():
                work.abandon()
                log.info("%s: caller disconnected; streamed request abandoned", op.path)

    return StreamingResponse(frames(), media_type=wire.STREAM_CONTENT_TYPE)


def build_stage_app(
    runtime: StageRuntime,
    *,
    title: str,
    routes: APIRouter | None = None,
    owns_runtime: bool = True,
    settings: Settings | None = None,
) -> FastAPI:
    """A stage app around ``runtime``: a route per operation the runtime serves, plus ``routes`` (GET routes
    of the stage's own). The model loads in the background at start-up, so ``/healthz`` answers at once and
    ``/readyz`` turns 200 when the weights are in and warmed up. An app that does not own its runtime (tests,
    embedded use) leaves it open at shutdown."""

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

    app = FastAPIOffline(title=title, version=__version__, lifespan=lifespan)
    app.state.runtime = runtime
    app.state.limits = wire.Limits(max_body_bytes=(settings or runtime.settings).max_body_bytes)
    install_error_handlers(app)
    install_observability(app, service=runtime.stage, runtime=runtime, drain_timeout_s=runtime.settings.drain_timeout_s)
    stage_settings = settings or runtime.settings
    app.add_middleware(BodyTimeout, timeout_s=stage_settings.body_timeout_s)
    token = stage_settings.stage_token.get_secret_value()
    # Stages take no browser calls: no CORS origins, so any cross-origin POST is refused.
    install_access(
        app, keys=[token] if token else [], hosts=split_list(stage_settings.allowed_hosts), who=runtime.stage
    )
    install_connection_cap(app, stage_settings.max_connections)

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

    stage_routes = APIRouter(tags=[runtime.stage])
    for op in runtime.operations:
        message_route(stage_routes, op)
    app.include_router(stage_routes)
    if routes is not None:
        app.include_router(routes)
    return app
