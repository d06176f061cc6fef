"""Operating a service: Prometheus metrics, request IDs and W3C trace context, JSON access logs, graceful drain.

``install_observability(app, service=...)`` is the one call each app makes (``build_stage_app`` and central's
``build_app``). It adds:

* ``GET /metrics`` (Prometheus text format) from a registry of the app's own, so several apps can live in one
  process (tests, ``serve central --embedded``):

  ==========================================  =========  ============================================
  metric                                      type       labels
  ==========================================  =========  ============================================
  ``triptych_http_requests_total``            counter    triptych_service, method, route, status
  ``triptych_http_request_duration_seconds``  histogram  triptych_service, method, route, status
  ``triptych_http_requests_in_flight``        gauge      triptych_service
  ``triptych_build_info``                     gauge = 1  triptych_service, version
  ``triptych_ready``                          gauge 0/1  triptych_service
  ``triptych_queue_depth``                    gauge      triptych_service  (stages: waiting + computing)
  ``triptych_queue_wait_seconds``             histogram  triptych_service, op
  ``triptych_stage_compute_seconds``          histogram  triptych_service, op
  ``triptych_batch_size``                     histogram  triptych_service, op  (images per request)
  ``triptych_denoise_steps_total``            counter    triptych_service  (rate() of it = steps/s)
  ``triptych_model_info``                     gauge = 1  triptych_service, model, fingerprint, device,
                                                         dtype, version  (stages, once loaded)
  ``triptych_stage_hop_seconds``              histogram  stage, op, status  (central: each stage call,
                                                         request sent to reply read; status is the
                                                         HTTP code, or timeout / unreachable /
                                                         bad_response)
  ==========================================  =========  ============================================

  ``route`` is the route's template (``/v1/encode``), never the raw path, so label values stay bounded.
  The label is ``triptych_service`` rather than ``service``, which Kubernetes service discovery sets itself.

* A pure-ASGI middleware that, for every request: takes ``X-Request-ID`` from the caller (or makes one) and
  the W3C ``traceparent`` (or starts a trace), opens a span of its own, keeps them in a contextvar that
  ``outgoing_headers()`` reads, so central's stage calls carry the same request ID and trace; answers with
  ``X-Request-ID``; records the metrics above; and writes one JSON line to the ``triptych.access`` logger
  (``service, method, route, path, status, duration_ms, request_id, trace_id, span_id, parent_span_id``) at
  INFO, or at DEBUG for ``/healthz``, ``/readyz`` and ``/metrics``, which probes call every few seconds.

* Draining (``Lifecycle``): after ``begin_drain()`` (SIGTERM, through ``serve()``), ``/readyz`` and every
  request that would start work get 503 with the error envelope, ``/healthz`` and ``/metrics`` still answer,
  and the server exits once the work already admitted is done or ``drain_timeout_s`` has passed.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import signal
import sys
import time
import uuid
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import __version__
from shared.errors import error_envelope

if TYPE_CHECKING:
    from shared.runtime import StageRuntime

T = TypeVar("T")

QUEUE_DEPTH_METRIC = "triptych_queue_depth"
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# Answered while draining: liveness (the process is alive and finishing work) and metrics (watch it drain).
ALWAYS_SERVED = frozenset({"/healthz", "/metrics"})

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")

# How long an idle HTTP connection stays open (uvicorn's default is 5 s). Central's stage connections
# sit idle for a whole denoise between uses of the text encoder or VAE; a new connection per hop cost ~1 ms.
# Central's client drops its idle connections first (central.clients.KEEPALIVE_S).
KEEP_ALIVE_S = 75

HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

access_log = logging.getLogger("triptych.access")
log = logging.getLogger("triptych.observability")


# ================================================================================================ trace context
@dataclass(frozen=True)
class RequestContext:
    """One request's identity: the caller's request ID and trace, and this service's span within it."""

    request_id: str
    trace_id: str
    span_id: str
    parent_span_id: str | None
    flags: str = "01"
    tracestate: str | None = None

    @property
    def traceparent(self) -> str:
        """The W3C header for calls made while serving this request: this span is their parent."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def headers(self) -> dict[str, str]:
        headers = {"X-Request-ID": self.request_id, "traceparent": self.traceparent}
        if self.tracestate:
            headers["tracestate"] = self.tracestate
        return headers


_current: ContextVar[RequestContext | None] = ContextVar("triptych_request", default=None)


def current_context() -> RequestContext | None:
    """The request being served by this task, if any."""
    return _current.get()


def outgoing_headers() -> dict[str, str]:
    """Headers that carry the current request ID and trace to the next hop (empty outside a request)."""
    ctx = _current.get()
    return ctx.headers() if ctx else {}


def parse_traceparent(value: str | None) -> tuple[str, str, str] | None:
    """``(trace_id, parent_span_id, flags)`` from a W3C ``traceparent``, or None if it is not a valid one."""
    if not value:
        return None
    match = _TRACEPARENT.match(value.strip().lower())
    if not match:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    # Version ff is forbidden; version 00 has nothing after the flags; all-zero ids are invalid.
    if version == "ff" or (version == "00" and rest) or set(trace_id) == {"0"} or set(parent_id) == {"0"}:
        return None
    return trace_id, parent_id, flags


def context_from_headers(headers: dict[str, str]) -> RequestContext:
    """Continue the caller's request ID and trace when they are well-formed; start new ones otherwise."""
    request_id = headers.get(REQUEST_ID_HEADER, "")
    if not _REQUEST_ID.match(request_id):
        request_id = uuid.uuid4().hex
    parsed = parse_traceparent(headers.get("traceparent"))
    if parsed:
        trace_id, parent, flags = parsed
        tracestate = headers.get("tracestate") or None
    else:
        trace_id, parent, flags, tracestate = secrets.token_hex(16), None, "01", None
    return RequestContext(request_id, trace_id, secrets.token_hex(8), parent, flags, tracestate)


def observe_hop(stage: str, op: str, status: int | str, seconds: float) -> None:
    """Record one call from central to ``stage`` in the serving app's hop histogram (no-op outside a request)."""
    obs = _current_observability.get()
    if obs is not None:
        obs.hop_seconds.labels(stage, op, str(status)).observe(seconds)


# ================================================================================================ logging
class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the record's ``fields`` and the request IDs."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update(getattr(record, "fields", {}))
        ctx = _current.get()
        if ctx is not None:
            data.setdefault("request_id", ctx.request_id)
            data.setdefault("trace_id", ctx.trace_id)
        if record.exc_info and record.exc_info[0] is not None:
            data["exception"] = record.exc_info[0].__name__
        return json.dumps(data, default=str)


def configure_access_log() -> None:
    """Send ``triptych.access`` to stderr as JSON lines, once per process (apps may be built many times)."""
    if any(getattr(h, "_triptych_json", False) for h in access_log.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._triptych_json = True  # type: ignore[attr-defined]
    access_log.addHandler(handler)
    # Its own format; not also printed as text by the root handler.
    access_log.propagate = False


# ================================================================================================ lifecycle
class Lifecycle:
    """Whether the service still takes work, and how much admitted work is still running."""

    def __init__(self, service: str, drain_timeout_s: float) -> None:
        self.service = service
        self.drain_timeout_s = drain_timeout_s
        self.in_flight = 0
        self._drain_deadline: float | None = None

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    def begin_drain(self) -> None:
        """Stop taking work. Safe to call from a signal handler; a second call changes nothing."""
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + self.drain_timeout_s

    def drained(self) -> bool:
        """True once draining and either every admitted request has finished or the drain timed out."""
        if self._drain_deadline is None:
            return False
        return self.in_flight == 0 or time.monotonic() >= self._drain_deadline

    def refusal(self, request_id: str) -> Response:
        return JSONResponse(
            status_code=503,
            content=error_envelope(
                "unavailable", f"{self.service} is shutting down and takes no new work; retry (another replica)"
            ),
            headers={"Retry-After": "1", "Connection": "close", "X-Request-ID": request_id},
        )


# ================================================================================================ metrics
def _route_of(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


def batch_size_of(message: Any) -> int | None:
    """Images in one stage request, from whichever of the protocol's batch-carrying fields it has."""
    seeds = getattr(message, "seeds", None)
    if isinstance(seeds, list) and seeds:
        return len(seeds)
    for name in ("latents", "images"):
        shape = getattr(getattr(message, name, None), "shape", None)
        if shape:
            return int(shape[0])
    embeds = getattr(getattr(message, "prompt_embeds", None), "shape", None)
    if embeds:
        return int(embeds[0]) * int(getattr(message, "num_images_per_prompt", 1) or 1)
    prompts = getattr(message, "prompt", None)
    if isinstance(prompts, list):
        return len(prompts)
    return None


def denoise_steps_of(message: Any) -> int:
    """Denoising iterations a request runs: ``num_inference_steps``, cut by ``strength`` as diffusers does."""
    steps = getattr(message, "num_inference_steps", None)
    if not isinstance(steps, int):
        return 0
    strength = getattr(message, "strength", None)
    return min(int(steps * strength), steps) if isinstance(strength, float) else steps


class _StageCollector(Collector):
    """Scrape-time view of a stage runtime: readiness and, once loaded, which model it serves."""

    def __init__(self, service: str, runtime: StageRuntime | None) -> None:
        self.service = service
        self.runtime = runtime

    def collect(self) -> Iterable[Metric]:
        ready = GaugeMetricFamily("triptych_ready", "1 when the service takes work", labels=["triptych_service"])
        rt = self.runtime
        ready.add_metric([self.service], 1.0 if rt is None or rt.ready else 0.0)
        yield ready
        if rt is not None and rt.ready:
            info = GaugeMetricFamily(
                "triptych_model_info",
                "The model this stage serves (value is always 1)",
                labels=["triptych_service", "model", "fingerprint", "device", "dtype", "version"],
            )
            dtype = str(rt.dtype).removeprefix("torch.")
            info.add_metric([self.service, rt.model_id, rt.fingerprint, str(rt.device), dtype, __version__], 1.0)
            yield info
            # Runtime counters (embedding-cache hits/misses/bytes, batcher forwards and active images, ...).
            for name, (kind, help_text, value) in rt.stats().items():
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                metric = family(f"triptych_{name}", help_text, labels=["triptych_service"])
                metric.add_metric([self.service], float(value))
                yield metric


class Observability:
    """One app's metrics registry, lifecycle and hooks; ``app.state.observability``."""

    def __init__(self, service: str, *, runtime: StageRuntime | None = None, drain_timeout_s: float = 30.0):
        self.service = service
        self.lifecycle = Lifecycle(service, drain_timeout_s)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        svc = ["triptych_service"]
        http = [*svc, "method", "route", "status"]
        self.requests = Counter("triptych_http_requests", "HTTP requests answered", http, registry=r)
        self.latency = Histogram(
            "triptych_http_request_duration_seconds", "HTTP request latency", http, buckets=HTTP_BUCKETS, registry=r
        )
        self.in_flight = Gauge("triptych_http_requests_in_flight", "HTTP requests being served", svc, registry=r)
        build = Gauge("triptych_build_info", "Triptych version (value is always 1)", [*svc, "version"], registry=r)
        build.labels(service, __version__).set(1)
        r.register(_StageCollector(service, runtime))
        self.queue_depth = Gauge(
            QUEUE_DEPTH_METRIC,
            "Requests admitted to the model and not yet answered (waiting + computing)",
            svc,
            registry=r,
        )
        ops = [*svc, "op"]
        self.queue_wait = Histogram(
            "triptych_queue_wait_seconds", "Time a request waited for the model", ops, buckets=HTTP_BUCKETS, registry=r
        )
        self.compute = Histogram(
            "triptych_stage_compute_seconds", "Model compute time per request", ops, buckets=HTTP_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "triptych_batch_size", "Images per stage request", ops, buckets=BATCH_BUCKETS, registry=r
        )
        self.denoise_steps = Counter("triptych_denoise_steps", "Denoising iterations run", svc, registry=r)
        self.hop_seconds = Histogram(
            "triptych_stage_hop_seconds",
            "central: one stage call, until the stage's response headers",
            ["stage", "op", "status"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.queue_depth.labels(service).set(0)
        self.in_flight.labels(service).set(0)

    def metrics_response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def run_stage(self, runtime: StageRuntime, op: str, message: Any) -> Any:
        """``runtime.call(op, message)``, measured: queue depth while admitted, the wait for the model thread,
        compute time, batch size."""
        depth = self.queue_depth.labels(self.service)
        admitted = time.perf_counter()
        depth.inc()
        try:
            work = await runtime.execute(op, message)
        finally:
            depth.dec()
        if work.started is not None and work.finished is not None:
            self.queue_wait.labels(self.service, op).observe(work.started - admitted)
            self.compute.labels(self.service, op).observe(work.finished - work.started)
        size = batch_size_of(message)
        if size:
            self.batch_size.labels(self.service, op).observe(size)
        steps = denoise_steps_of(message)
        if steps:
            self.denoise_steps.labels(self.service).inc(steps)
        return work.result()


_current_observability: ContextVar[Observability | None] = ContextVar("triptych_observability", default=None)


class ObservabilityMiddleware:
    """Request context, metrics, one access-log line and drain refusals for every HTTP request."""

    def __init__(self, app: ASGIApp, observability: Observability) -> None:
        self.app = app
        self.obs = observability

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        ctx = context_from_headers(headers)
        token = _current.set(ctx)
        obs_token = _current_observability.set(self.obs)
        obs, path = self.obs, scope["path"]
        probe = path in PROBE_PATHS
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = ctx.request_id
            await send(message)

        in_flight = obs.in_flight.labels(obs.service)
        in_flight.inc()
        admitted = not probe and not obs.lifecycle.draining
        if admitted:
            obs.lifecycle.in_flight += 1
        try:
            if obs.lifecycle.draining and path not in ALWAYS_SERVED and not admitted:
                await obs.lifecycle.refusal(ctx.request_id)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            if admitted:
                obs.lifecycle.in_flight -= 1
            in_flight.dec()
            elapsed = time.perf_counter() - start
            route = _route_of(scope)
            labels = (obs.service, scope["method"], route, str(status))
            obs.requests.labels(*labels).inc()
            obs.latency.labels(*labels).observe(elapsed)
            access_log.log(
                logging.DEBUG if probe else logging.INFO,
                "request",
                extra={
                    "fields": {
                        "service": obs.service,
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
            _current_observability.reset(obs_token)
            _current.reset(token)


def install_observability(
    app: FastAPI,
    *,
    service: str,
    runtime: StageRuntime | None = None,
    drain_timeout_s: float = 30.0,
) -> Observability:
    """Add ``/metrics``, the request middleware and drain support to ``app``; returns the new state."""
    # No `*_created` series: a timestamp per label set doubles what is scraped and no dashboard uses it.
    disable_created_metrics()
    obs = Observability(service, runtime=runtime, drain_timeout_s=drain_timeout_s)
    app.state.observability = obs
    configure_access_log()
    app.add_middleware(ObservabilityMiddleware, observability=obs)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return obs.metrics_response()

    return obs


# ================================================================================================ serving
def _find_observability(app: Any) -> Observability | None:
    state = getattr(app, "state", None)
    return getattr(state, "observability", None)


def serve(app: FastAPI, *, host: str, port: int, log_level: str) -> None:
    """Run ``app`` under uvicorn with a graceful drain on SIGTERM / SIGINT.

    First signal: ``/readyz`` and new work answer 503; once admitted requests are done (or after the app's
    drain timeout, ``TRIPTYCH_DRAIN_TIMEOUT_S``) uvicorn shuts down as usual and the process exits 0.
    A second signal stops at once.
    """
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level.lower(),
        access_log=False,  # triptych.access writes one JSON line per request instead
        timeout_keep_alive=KEEP_ALIVE_S,
        timeout_graceful_shutdown=5,  # what is left after the drain: closing idle connections
    )
    server = DrainingServer(config, _find_observability(app))
    server.run()


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` whose first SIGTERM/SIGINT drains instead of closing the listening socket at once.

    The socket stays open while draining so that requests still routed here (a load balancer that has not
    yet seen the pod leave) get a clean 503 they can retry, rather than a refused connection.
    """

    def __init__(self, config: uvicorn.Config, observability: Observability | None) -> None:
        super().__init__(config)
        self.observability = observability

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        obs = self.observability
        if obs is None or obs.lifecycle.draining or self.should_exit:
            super().handle_exit(sig, frame)  # no drain support, or a second signal: stop now
            return
        obs.lifecycle.begin_drain()
        log.warning(
            "%s: %s received; draining %d in-flight request(s) for up to %.0f s",
            obs.service,
            signal.Signals(sig).name,
            obs.lifecycle.in_flight,
            obs.lifecycle.drain_timeout_s,
        )

    async def on_tick(self, counter: int) -> bool:
        obs = self.observability
        if obs is not None and not self.should_exit and obs.lifecycle.drained():
            if obs.lifecycle.in_flight:
                log.error("%s: drain timeout; %d request(s) still running", obs.service, obs.lifecycle.in_flight)
            self.should_exit = True
        result: bool = await super().on_tick(counter)
        return result


__all__ = [
    "QUEUE_DEPTH_METRIC",
    "DrainingServer",
    "Lifecycle",
    "Observability",
    "ObservabilityMiddleware",
    "RequestContext",
    "current_context",
    "install_observability",
    "observe_hop",
    "outgoing_headers",
    "parse_traceparent",
    "serve",
]
