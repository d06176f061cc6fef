"""Operating the services (issue 4): /metrics, X-Request-ID + traceparent across the hops, JSON access logs,
and the SIGTERM drain — in-process first, then with real processes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from central.app import build_app as central_app
from central.clients import HttpTransport, TextEncoderClient, UNetClient, VaeClient
from central.pipeline import Orchestrator
from shared import __version__, wire
from shared.serving.logs import JsonFormatter, access_log
from shared.serving.server import Lifecycle
from shared.settings import Settings
from shared.tracing import context_from_headers, parse_traceparent
from tests.conftest import REPO, free_port_block, spawn_triptych
from tests.helpers import asgi_exchange

GOOD: dict[str, Any] = {"prompt": "a lighthouse at dusk", "seed": 3, "num_inference_steps": 2}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
STAGE_OPS = {"text_encoder": "encode", "diffusion_unet": "denoise", "vae_decoder": "decode"}


# ================================================================================================ helpers
class Records(logging.Handler):
    """Collects ``triptych.access`` records (that logger does not propagate to pytest's handler)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self) -> list[dict[str, Any]]:
        """Each record as the JSON line the services print."""
        formatter = JsonFormatter()
        return [json.loads(formatter.format(r)) for r in self.records]


@pytest.fixture
def access_records() -> Iterator[Records]:
    handler = Records()
    level = access_log.level
    access_log.addHandler(handler)
    access_log.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        access_log.removeHandler(handler)
        access_log.setLevel(level)


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def value(text: str, name: str, **labels: str) -> float:
    """The one sample ``name`` whose labels include ``labels``."""
    found = [v for n, lab, v in samples(text) if n == name and labels.items() <= lab.items()]
    assert len(found) == 1, f"{len(found)} samples of {name}{labels}"
    return found[0]


@pytest.fixture(scope="module")
def topology(
    settings: Settings, te_runtime: Any, unet_runtime: Any, vae_runtime: Any
) -> Iterator[tuple[TestClient, dict[str, TestClient]]]:
    """central over real HTTP clients whose transport is each stage's ASGI app: every hop goes through
    the stage's middleware, in one process."""
    from diffusion_unet.app import build_app as unet_app
    from text_encoder.app import build_app as te_app
    from vae_decoder.app import build_app as vae_app

    apps = {
        "text_encoder": te_app(settings, te_runtime),
        "diffusion_unet": unet_app(settings, unet_runtime),
        "vae_decoder": vae_app(settings, vae_runtime),
    }

    def transport(stage: str) -> HttpTransport:
        return HttpTransport(stage, f"http://{stage}", settings, exchange=asgi_exchange(apps[stage]))

    orchestrator = Orchestrator(
        TextEncoderClient(transport("text_encoder")),
        UNetClient(transport("diffusion_unet")),
        VaeClient(transport("vae_decoder")),
        settings,
    )
    with TestClient(central_app(settings, orchestrator=orchestrator)) as central:
        stages = {name: TestClient(app) for name, app in apps.items()}
        yield central, stages


# ================================================================================================ trace context
def test_traceparent_parsing() -> None:
    assert parse_traceparent(f"00-{TRACE_ID}-{CALLER_SPAN}-01") == (TRACE_ID, CALLER_SPAN, "01")
    assert parse_traceparent(f"00-{TRACE_ID.upper()}-{CALLER_SPAN}-00") == (TRACE_ID, CALLER_SPAN, "00")
    # A future version may append fields; version 00 may not.
    assert parse_traceparent(f"01-{TRACE_ID}-{CALLER_SPAN}-01-extra") == (TRACE_ID, CALLER_SPAN, "01")
    for bad in (
        None,
        "",
        "garbage",
        f"00-{TRACE_ID}-{CALLER_SPAN}-01-extra",
        f"ff-{TRACE_ID}-{CALLER_SPAN}-01",
        f"00-{'0' * 32}-{CALLER_SPAN}-01",
        f"00-{TRACE_ID}-{'0' * 16}-01",
        f"00-{TRACE_ID[:-1]}-{CALLER_SPAN}-01",
    ):
        assert parse_traceparent(bad) is None, bad


def test_request_context_continues_or_starts_a_trace() -> None:
    ctx = context_from_headers({"x-request-id": "abc-123", "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"})
    assert (ctx.request_id, ctx.trace_id, ctx.parent_span_id) == ("abc-123", TRACE_ID, CALLER_SPAN)
    assert ctx.span_id != CALLER_SPAN and re.fullmatch(r"[0-9a-f]{16}", ctx.span_id)
    assert ctx.headers()["traceparent"] == f"00-{TRACE_ID}-{ctx.span_id}-01"
    # Not well-formed: a request ID with spaces or over 128 characters is replaced, a bad traceparent ignored.
    for rid in ("has spaces", "x" * 129, "line\nbreak"):
        fresh = context_from_headers({"x-request-id": rid, "traceparent": "00-nope"})
        assert re.fullmatch(r"[0-9a-f]{32}", fresh.request_id) and fresh.parent_span_id is None
        assert re.fullmatch(r"[0-9a-f]{32}", fresh.trace_id)


# ================================================================================================ in-process
def test_one_request_is_followed_through_every_hop(topology: Any, access_records: Records) -> None:
    central, _ = topology
    r = central.post(
        "/v1/txt2img",
        json=GOOD,
        headers={"X-Request-ID": "follow-me-1", "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "follow-me-1"
    assert "Server-Timing" in r.headers
    lines = [line for line in access_records.lines() if line["request_id"] == "follow-me-1"]
    by_service = {line["service"]: line for line in lines}
    assert set(by_service) == {"central", *STAGE_OPS}, lines
    assert len(lines) == 4, "one line per request per service"
    central_line = by_service["central"]
    assert central_line["parent_span_id"] == CALLER_SPAN
    for line in lines:
        assert line["trace_id"] == TRACE_ID
        assert line["status"] == 200 and line["level"] == "info" and line["duration_ms"] > 0
    for stage, op in STAGE_OPS.items():
        # Each stage's span is a child of central's.
        assert by_service[stage]["parent_span_id"] == central_line["span_id"]
        assert by_service[stage]["route"] == f"/v1/{op}"
    assert central_line["route"] == "/v1/txt2img"


def test_a_request_without_an_id_gets_one(topology: Any, access_records: Records) -> None:
    central, _ = topology
    r = central.get("/v1/info", headers={"X-Request-ID": "not valid at all"})
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    # central's own line and each stage's /v1/info line share the generated ID.
    services = {line["service"] for line in access_records.lines() if line["request_id"] == rid}
    assert services == {"central", *STAGE_OPS}


def test_probes_are_logged_at_debug_only(topology: Any, access_records: Records) -> None:
    central, stages = topology
    for client in (central, *stages.values()):
        assert client.get("/healthz").status_code == 200
    levels = {line["route"]: line["level"] for line in access_records.lines()}
    assert levels["/healthz"] == "debug"


def test_metrics_on_every_service_after_a_request(topology: Any, unet_runtime: Any) -> None:
    central, stages = topology
    assert central.post("/v1/txt2img", json=GOOD).status_code == 200
    text = central.get("/metrics").text
    assert central.get("/metrics").headers["content-type"].startswith("text/plain")
    common = {"triptych_service": "central"}
    assert value(text, "triptych_http_requests_total", route="/v1/txt2img", status="200", **common) >= 1
    assert value(text, "triptych_http_request_duration_seconds_count", route="/v1/txt2img", status="200") >= 1
    assert value(text, "triptych_http_requests_in_flight", **common) >= 1  # this scrape itself
    assert value(text, "triptych_build_info", version=__version__, **common) == 1
    for stage, op in STAGE_OPS.items():
        assert value(text, "triptych_stage_hop_seconds_count", stage=stage, op=op, status="200") >= 1
    assert not [n for n, _, _ in samples(text) if n.endswith("_created")]

    for stage, op in STAGE_OPS.items():
        text = stages[stage].get("/metrics").text
        svc = {"triptych_service": stage}
        assert value(text, "triptych_http_requests_total", route=f"/v1/{op}", status="200", **svc) >= 1
        assert value(text, "triptych_http_request_duration_seconds_bucket", route=f"/v1/{op}", le="+Inf") >= 1
        assert value(text, "triptych_stage_compute_seconds_count", op=op, **svc) >= 1
        assert value(text, "triptych_stage_compute_seconds_sum", op=op, **svc) > 0
        assert value(text, "triptych_queue_wait_seconds_count", op=op, **svc) >= 1
        assert value(text, "triptych_batch_size_count", op=op, **svc) >= 1
        assert value(text, "triptych_queue_depth", **svc) == 0  # nothing running between requests
        assert value(text, "triptych_ready", **svc) == 1
        assert value(text, "triptych_model_info", **svc, version=__version__) == 1
    unet_text = stages["diffusion_unet"].get("/metrics").text
    assert value(unet_text, "triptych_denoise_steps_total") >= GOOD["num_inference_steps"]
    assert value(unet_text, "triptych_model_info", fingerprint=unet_runtime.fingerprint) == 1


def test_route_labels_stay_bounded(topology: Any) -> None:
    central, _ = topology
    for i in range(3):
        assert central.get(f"/no/such/path/{i}").status_code == 404
    text = central.get("/metrics").text
    routes = {lab.get("route") for n, lab, _ in samples(text) if n == "triptych_http_requests_total"}
    assert "unmatched" in routes and not [r for r in routes if r and r.startswith("/no/")]


def test_draining_app_refuses_work_but_stays_alive(settings: Settings, te_runtime: Any) -> None:
    from text_encoder.app import build_app as te_app

    app = te_app(settings, te_runtime)
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
        app.state.lifecycle.begin_drain()
        for method, path in (("GET", "/readyz"), ("POST", "/v1/encode"), ("GET", "/v1/info")):
            r = client.request(method, path, content=wire.encode({"prompt": ["x"]}))
            assert r.status_code == 503, (path, r.text)
            assert r.json()["error"]["type"] == "unavailable" and "shutting down" in r.json()["error"]["message"]
            assert r.headers["retry-after"] == "1" and r.headers["x-request-id"]
        assert client.get("/healthz").status_code == 200
        assert client.get("/metrics").status_code == 200


def test_drain_ends_when_work_is_done_or_time_is_up() -> None:
    lifecycle = Lifecycle("x", drain_timeout_s=60)
    lifecycle.in_flight = 1
    assert not lifecycle.drained()  # not draining yet
    lifecycle.begin_drain()
    assert not lifecycle.drained()
    lifecycle.in_flight = 0
    assert lifecycle.drained()
    stuck = Lifecycle("x", drain_timeout_s=0)
    stuck.in_flight = 1
    stuck.begin_drain()
    assert stuck.drained()


# ================================================================================================ real processes
def clean_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIPTYCH_")}
    env.update(settings)
    return env


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def is_ready(url: str) -> bool:
    return httpx.get(f"{url}/readyz", timeout=2).status_code == 200


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def test_request_id_in_the_logs_of_all_four_processes(tiny_model: Path, tmp_path: Path) -> None:
    base = free_port_block()
    log = tmp_path / "serve-all.log"
    env = clean_env(TRIPTYCH_MODEL=str(tiny_model), TRIPTYCH_DEVICE="cpu", TRIPTYCH_LOG_LEVEL="INFO")
    proc = spawn_triptych(["serve", "all", "--host", "127.0.0.1", "--port", str(base)], env, log)
    url = f"http://127.0.0.1:{base}"
    try:
        wait_for(lambda: proc.poll() is None and is_ready(url), 180, "serve all to be ready", log)
        rid = f"e2e-{uuid.uuid4().hex}"
        r = httpx.post(f"{url}/v1/txt2img", json=GOOD, headers={"X-Request-ID": rid}, timeout=120)
        assert r.status_code == 200 and r.headers["x-request-id"] == rid

        def logged_by_all() -> bool:
            services = {line.get("service") for line in json_lines(log) if line.get("request_id") == rid}
            return services == {"central", *STAGE_OPS}

        wait_for(logged_by_all, 10, f"{rid} in the logs of all four services", log)
        lines = [line for line in json_lines(log) if line.get("request_id") == rid]
        assert len({line["trace_id"] for line in lines}) == 1
        assert {(line["service"], line["route"], line["status"]) for line in lines} == {
            ("central", "/v1/txt2img", 200),
            *((stage, f"/v1/{op}", 200) for stage, op in STAGE_OPS.items()),
        }
        # Every process serves /metrics.
        for port in range(base, base + 4):
            assert "triptych_http_requests_total" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        stop(proc)


def drain_scenario(
    proc: subprocess.Popen[bytes],
    url: str,
    log: Path,
    slow: Callable[[], httpx.Response],
    new_work: Callable[[], httpx.Response],
) -> httpx.Response:
    """Start ``slow``, SIGTERM while it runs, check refusals, and return its response once it completes."""
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["response"] = slow()
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    worker = threading.Thread(target=call)
    worker.start()
    wait_in_flight(url, log)
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 503, 10, "/readyz to turn 503", log)
    refused = new_work()
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["type"] == "unavailable"
    assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    assert worker.is_alive(), "the slow request finished before the drain was tested; make it slower"
    assert proc.poll() is None, "exited while a request was still in flight"
    worker.join(timeout=300)
    assert "error" not in result, result.get("error")
    # Exits on its own once the in-flight request is done (the drain timeout is far longer).
    proc.wait(timeout=60)
    assert proc.returncode == 0, log.read_text(errors="replace")[-3000:]
    response: httpx.Response = result["response"]
    return response


def wait_in_flight(url: str, log: Path) -> None:
    """Until a request is in flight at ``url`` besides this scrape."""
    wait_for(
        lambda: value(httpx.get(f"{url}/metrics", timeout=5).text, "triptych_http_requests_in_flight") >= 2,
        30,
        "the slow request to be in flight",
        log,
    )


def test_sigterm_drains_central(tiny_model: Path, tmp_path: Path) -> None:
    """central (stages embedded): SIGTERM mid-request -> 503 for new work, the request completes, exit 0."""
    port = free_port_block(1)
    log = tmp_path / "central.log"
    env = clean_env(TRIPTYCH_MODEL=str(tiny_model), TRIPTYCH_DEVICE="cpu", TRIPTYCH_DRAIN_TIMEOUT_S="300")
    proc = spawn_triptych(["serve", "central", "--embedded", "--port", str(port)], env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is None and is_ready(url), 120, "central to be ready", log)
        slow = {**GOOD, "num_inference_steps": 400}
        response = drain_scenario(
            proc,
            url,
            log,
            slow=lambda: httpx.post(f"{url}/v1/txt2img", json=slow, timeout=300),
            new_work=lambda: httpx.post(f"{url}/v1/txt2img", json=GOOD, timeout=30),
        )
        assert response.status_code == 200, response.text
        assert len(response.json()["images"]) == 1
    finally:
        stop(proc)


def test_sigterm_drains_a_stage(tiny_model: Path, tmp_path: Path) -> None:
    """The UNet stage on its own: the same contract on the msgpack API."""
    port = free_port_block(1)
    log = tmp_path / "unet.log"
    env = clean_env(TRIPTYCH_MODEL=str(tiny_model), TRIPTYCH_DEVICE="cpu", TRIPTYCH_DRAIN_TIMEOUT_S="300")
    proc = spawn_triptych(["serve", "diffusion-unet", "--port", str(port)], env, log)
    url = f"http://127.0.0.1:{port}"
    embeds = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0))

    def denoise(steps: int) -> httpx.Response:
        body = {
            "prompt_embeds": embeds,
            "negative_prompt_embeds": embeds * 0,
            "height": 64,
            "width": 64,
            "num_inference_steps": steps,
            "seeds": [0],
        }
        return httpx.post(
            f"{url}/v1/denoise",
            content=wire.encode(body),
            headers={"content-type": wire.CONTENT_TYPE},
            timeout=300,
        )

    try:
        wait_for(lambda: proc.poll() is None and is_ready(url), 120, "the UNet stage to be ready", log)
        response = drain_scenario(proc, url, log, slow=lambda: denoise(400), new_work=lambda: denoise(2))
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == wire.CONTENT_TYPE
        assert "latents" in wire.decode(response.content)
    finally:
        stop(proc)


# ================================================================================================ human logs
class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_auto_log_format_is_text_at_a_terminal_and_json_elsewhere() -> None:
    from shared.serving.logs import resolve_format

    assert resolve_format("auto", _Stream(True)) == "text"
    assert resolve_format("auto", _Stream(False)) == "json"
    assert resolve_format("json", _Stream(True)) == "json"
    assert resolve_format("text", _Stream(False)) == "text"


def test_text_access_line_is_one_short_line() -> None:
    from shared.serving.logs import TextFormatter

    fields = {"service": "central", "method": "POST", "path": "/v1/txt2img", "status": 200, "duration_ms": 812.34,
              "request_id": "1a2b3c4d5e6f"}  # fmt: skip
    record = logging.LogRecord("triptych.access", logging.INFO, __file__, 1, "request", None, None)
    record.fields = fields
    line = TextFormatter("central").format(record)
    assert line.endswith("INFO    central        POST /v1/txt2img 200 812.3 ms  rid=1a2b3c4d"), line
    assert "\n" not in line


def test_serve_all_at_a_terminal_prints_concise_text(tiny_model: Path, tmp_path: Path) -> None:
    """`make run` in a terminal: human lines, the banner, one line per request per service, and none of the
    readiness polling (central's /readyz and the stages' /v1/info) nor httpx's own request lines."""
    import pty

    base = free_port_block()
    primary, secondary = pty.openpty()
    env = clean_env(TRIPTYCH_MODEL=str(tiny_model), TRIPTYCH_DEVICE="cpu", TRIPTYCH_CACHE_DIR=str(tmp_path))
    cmd = [sys.executable, "-m", "central.cli", "serve", "all", "--port", str(base)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=secondary, stderr=secondary)
    os.close(secondary)
    chunks: list[bytes] = []

    def drain() -> None:
        with contextlib.suppress(OSError):
            while data := os.read(primary, 65536):
                chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{base}"
    try:
        wait_for(lambda: proc.poll() is None and is_ready(url), 180, "serve all to be ready")
        wait_for(lambda: b"Ctrl-C stops" in b"".join(chunks), 10, "the banner")
        rid = uuid.uuid4().hex
        r = httpx.post(f"{url}/v1/txt2img", json=GOOD, headers={"X-Request-ID": rid}, timeout=120)
        assert r.status_code == 200
        wait_for(lambda: b"".join(chunks).count(rid[:8].encode()) >= 4, 10, "four access lines")
    finally:
        stop(proc)
        reader.join(10)
        os.close(primary)
    text = b"".join(chunks).decode(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    assert not [line for line in lines if line.lstrip().startswith("{")], text[-3000:]
    assert "/readyz" not in text and "/v1/info" not in text and "HTTP Request" not in text, text[-3000:]
    assert "it/s" not in text, "progress bars"
    assert {line.split()[2] for line in lines if rid[:8] in line} == {"central", *STAGE_OPS}
    assert f"Triptych is ready at {url}" in text
    # Short: the whole start, one request and the stop fit on a screen.
    assert len(lines) < 40, text


def test_a_request_outliving_the_drain_gets_503_and_the_process_exits(tiny_model: Path, tmp_path: Path) -> None:
    """A 1 s drain and a request that needs far longer: after SIGTERM the request gets the 503 envelope (before:
    uvicorn cancelled it at exit and sent a plain-text 500, with a traceback in the log), the UNet stops the
    job, and the process exits 0 within seconds of the drain timeout."""
    port = free_port_block(1)
    log = tmp_path / "central.log"
    env = clean_env(TRIPTYCH_MODEL=str(tiny_model), TRIPTYCH_DEVICE="cpu", TRIPTYCH_DRAIN_TIMEOUT_S="1")
    proc = spawn_triptych(["serve", "central", "--embedded", "--port", str(port)], env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is None and is_ready(url), 120, "central to be ready", log)
        result: dict[str, Any] = {}
        slow = {**GOOD, "num_inference_steps": 499}
        worker = threading.Thread(
            target=lambda: result.update(r=httpx.post(f"{url}/v1/txt2img", json=slow, timeout=120))
        )
        worker.start()
        wait_in_flight(url, log)
        proc.send_signal(signal.SIGTERM)
        worker.join(timeout=60)
        response = result["r"]
        assert response.status_code == 503, response.text
        assert response.json()["error"]["type"] == "unavailable" and "drain" in response.json()["error"]["message"]
        proc.wait(timeout=30)
        assert proc.returncode == 0
        text = log.read_text(errors="replace")
        assert "Traceback" not in text, text[-3000:]
    finally:
        stop(proc)
