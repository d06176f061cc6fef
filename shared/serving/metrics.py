"""Prometheus metrics of one service, from a registry of the app's own so several apps can live in one
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
A stage runtime adds its own counters (``StageRuntime.stats``: cache hits, UNet forwards, ...).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from fastapi.responses import Response
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

from shared import __version__
from shared.protocol import StageRequest
from shared.serving.batching import Work

if TYPE_CHECKING:
    from shared.serving.runtime import StageRuntime

QUEUE_DEPTH_METRIC = "triptych_queue_depth"
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


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


class Metrics:
    """One app's metrics registry; ``app.state.metrics``."""

    def __init__(self, service: str, *, runtime: StageRuntime | None = None) -> None:
        # No `*_created` series: a timestamp per label set doubles what is scraped and no dashboard uses it.
        disable_created_metrics()
        self.service = service
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
            "central: one stage call, from sending the request to having read the whole reply",
            ["stage", "op", "status"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.queue_depth.labels(service).set(0)
        self.in_flight.labels(service).set(0)

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def observe_stage_call(self, op: str, message: StageRequest, admitted: float, work: Work) -> None:
        """One request a stage computed: its wait for the model thread, compute time, images and steps."""
        if work.started is not None and work.finished is not None:
            self.queue_wait.labels(self.service, op).observe(work.started - admitted)
            self.compute.labels(self.service, op).observe(work.finished - work.started)
        if message.batch_size:
            self.batch_size.labels(self.service, op).observe(message.batch_size)
        if message.denoising_steps:
            self.denoise_steps.labels(self.service).inc(message.denoising_steps)

    def observe_hop(self, stage: str, op: str, status: int | str, seconds: float) -> None:
        """central: one call to ``stage``."""
        self.hop_seconds.labels(stage, op, str(status)).observe(seconds)
