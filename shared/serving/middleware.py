"""``install_observability(app, service=...)``: the one call each app makes (stage apps and central). It adds

* ``GET /metrics`` (``serving.metrics``), ``app.state.metrics``;
* drain support (``serving.server.Lifecycle``), ``app.state.lifecycle``;
* a pure-ASGI middleware that, for every request: takes ``X-Request-ID`` from the caller (or makes one) and
  the W3C ``traceparent`` (or starts a trace), opens a span of its own and makes it the current request
  (``shared.tracing``), so calls made while serving it carry the same request ID and trace; answers with
  ``X-Request-ID``; records the HTTP metrics; refuses new work with 503 while draining; and writes one line
  to the ``triptych.access`` logger (``service, method, route, path, status, duration_ms, request_id,
  trace_id, span_id, parent_span_id``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi import FastAPI
from fastapi.responses import Response
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import tracing
from shared.serving.logs import access_log
from shared.serving.metrics import Metrics
from shared.serving.runtime import StageRuntime
from shared.serving.server import Lifecycle

PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# Logged at DEBUG: what probes and central's readiness check call every few seconds (503 while loading).
QUIET_PATHS = PROBE_PATHS | {"/v1/info"}
# Answered while draining: liveness (the process is alive and finishing work) and metrics (watch it drain).
ALWAYS_SERVED = frozenset({"/healthz", "/metrics"})


async def _first(task: asyncio.Task[None], expired: asyncio.Event) -> bool:
    """Wait for ``task`` or ``expired``; True when the drain expired first."""
    waiter = asyncio.ensure_future(expired.wait())
    try:
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    return task not in done


def scope_headers(scope: Scope) -> dict[str, str]:
    """An ASGI request's headers as a dict of lower-case names (the last value of a repeated header)."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _route_of(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class ObservabilityMiddleware:
    """Request context, metrics, one access-log line and drain refusals for every HTTP request."""

    async def _until_drain_expires(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        """Run an admitted request; if the drain times out first, stop it and answer the 503 envelope (if its
        answer has not started), instead of uvicorn cancelling it at exit with a plain-text 500."""
        if self.lifecycle.expired.is_set():
            await self.lifecycle.stopped(request_id)(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, tracked))
        if not await _first(task, self.lifecycle.expired):
            task.result()  # its own exception, if any, as without the drain
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if not started:
            await self.lifecycle.stopped(request_id)(scope, receive, send)

    def __init__(self, app: ASGIApp, metrics: Metrics, lifecycle: Lifecycle) -> None:
        self.app = app
        self.metrics = metrics
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope_headers(scope)
        ctx = tracing.context_from_headers(headers)
        token = tracing.enter(ctx)
        metrics, lifecycle, path = self.metrics, self.lifecycle, scope["path"]
        probe = path in PROBE_PATHS
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = ctx.request_id
            await send(message)

        in_flight = metrics.in_flight.labels(metrics.service)
        in_flight.inc()
        admitted = not probe and not lifecycle.draining
        if admitted:
            lifecycle.in_flight += 1
        try:
            if lifecycle.draining and path not in ALWAYS_SERVED and not admitted:
                await lifecycle.refusal(ctx.request_id)(scope, receive, send_with_id)
            elif admitted:
                await self._until_drain_expires(scope, receive, send_with_id, ctx.request_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            if admitted:
                lifecycle.in_flight -= 1
            in_flight.dec()
            elapsed = time.perf_counter() - start
            route = _route_of(scope)
            labels = (metrics.service, scope["method"], route, str(status))
            metrics.requests.labels(*labels).inc()
            metrics.latency.labels(*labels).observe(elapsed)
            access_log.log(
                logging.DEBUG if path in QUIET_PATHS else logging.INFO,
                "request",
                extra={
                    "fields": {
                        "service": metrics.service,
                        "method": scope["method"],
                        "route": route,
                        "path": path,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 3),
                        "request_id": ctx.request_id,
                        "trace_id": ctx.trace_id,
                        "span_id": ctx.span_id,
                        "parent_span_id": ctx.parent_span_id,
                    }
                },
            )
            tracing.leave(token)


def install_observability(
    app: FastAPI,
    *,
    service: str,
    runtime: StageRuntime | None = None,
    drain_timeout_s: float = 30.0,
) -> Metrics:
    """Add ``/metrics``, the request middleware and drain support to ``app``; returns its metrics."""
    metrics = Metrics(service, runtime=runtime)
    lifecycle = Lifecycle(service, drain_timeout_s)
    app.state.metrics = metrics
    app.state.lifecycle = lifecycle
    app.add_middleware(ObservabilityMiddleware, metrics=metrics, lifecycle=lifecycle)

    @app.get("/metrics", include_in_schema=False)
    async def metrics_route() -> Response:
        return metrics.response()

    return metrics
