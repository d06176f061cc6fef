"""What every stage's FastAPI app shares: one msgpack route per declared operation, health, readiness, info,
the lifespan that loads the model in the background, error handlers and observability."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline

from shared import __version__, wire
from shared.errors import install_error_handlers
from shared.operations import Operation
from shared.serving.http import BodyTimeout, MsgpackResponse, install_connection_cap, read_message, unless_disconnected
from shared.serving.middleware import install_observability
from shared.serving.runtime import StageRuntime
from shared.serving.security import install_access, split_list
from shared.settings import Settings


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
