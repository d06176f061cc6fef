"""Fault tests with real processes ("Hardening", prove it): the three stages and central as separate OS
processes on loopback, then a stage killed mid-request, drained under load, answering garbage, hanging, or
dead before a request starts. Central must answer each with the SPEC §7 envelope (no traceback), keep living,
and recover without a restart once the stage is back.

The module's stack (``Stack``) is one set of processes on free ports:

* text encoder, UNet and VAE, each ``triptych serve <stage>`` on its own;
* in front of the VAE, a tiny hand-made HTTP server (``FAKE_STAGE``, no torch) that central takes for the VAE:
  it proxies to the real VAE, or (switched through a control file) answers garbage, a 500 HTML page, hangs,
  reads the body slowly, or hangs up. That server *is* the fault under test;
* central, pointed at the text encoder, the UNet and the fake VAE, with a short decode timeout.

A test that kills a process restarts it (or leaves it dead: ``Stack.ensure`` restarts whatever is down before
the next test that needs it), so the tests do not depend on their order, only their cost does: they are
written cheapest first, so that each restart serves the most tests (the UNet and central are each started
three times in all).
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, free_port_block
from tests.helpers import assert_envelope, assert_no_leak

pytestmark = pytest.mark.timeout(240)

GOOD: dict[str, Any] = {"prompt": "a lighthouse in fog", "seed": 11, "num_inference_steps": 2}
# Long enough (~5 s for one request on an idle core, 1 thread) that a request is still denoising while the test
# kills or drains the UNet; the tests never wait for a whole one unless the drain requires it. (500 is the most.)
LONG_STEPS = 499
DECODE_TIMEOUT_S = 3.0  # central's hop timeout for the VAE: what the hanging fakes run into
INFO_TIMEOUT_S = 3.0  # central's timeout for a stage's /v1/info (its readiness probe)
DRAIN_TIMEOUT_S = 120.0  # the stack's own drain: far longer than any request here
SHORT_DRAIN_S = 1.0  # the drain-timeout branch

# ================================================================================================ the fake VAE
FAKE_STAGE = r'''
"""A stand-in for a stage: proxies to the real one, or misbehaves as the control file says."""
import http.server, random, sys, time, urllib.error, urllib.request

port, upstream, control = int(sys.argv[1]), sys.argv[2].rstrip("/"), sys.argv[3]
HTML = (b"<html><head><title>500 Internal Server Error</title></head><body><h1>Internal Server Error</h1>"
        b"<pre>Traceback (most recent call last):\n  File \"/srv/stage/app.py\", line 12</pre></body></html>")


def mode():
    try:
        with open(control) as f:
            return f.read().strip() or "proxy"
    except OSError:
        return "proxy"


def wait_while(m, limit_s=60.0):
    deadline = time.monotonic() + limit_s
    while mode() == m and time.monotonic() < deadline:
        time.sleep(0.05)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection, closed after the answer (or without one)

    def log_message(self, *args):
        pass

    def reply(self, status, ctype, body, length=None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def proxy(self, body):
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")}
        req = urllib.request.Request(upstream + self.path, data=body, method=self.command, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                status, rh, data = r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            status, rh, data = e.code, e.headers, e.read()
        self.reply(status, rh.get("content-type", "application/octet-stream"), data)

    def do_GET(self):  # probes and /v1/info reach the real stage (central must find it compatible), unless
        m = mode()
        if self.path == "/v1/info" and m == "info-hang":
            wait_while(m)
        elif self.path == "/v1/info" and m == "info-garbage":
            self.reply(200, "application/json", b'{"stage": "vae_decoder", "model": ')
        else:
            self.proxy(None)

    def do_POST(self):
        m = mode()
        length = int(self.headers.get("content-length") or 0)
        if m == "slow-read":  # one byte every 0.2 s, and no answer before the whole body is in
            for _ in range(length):
                if mode() != m:
                    return
                self.rfile.read(1)
                time.sleep(0.2)
            wait_while(m)
            return
        body = self.rfile.read(length)
        if m == "garbage":
            self.reply(200, "application/msgpack", random.Random(0).randbytes(4096))
        elif m == "html-500":
            self.reply(500, "text/html; charset=utf-8", HTML)
        elif m == "truncated":  # declares 4096 bytes, sends 10, hangs up
            self.reply(200, "application/msgpack", b"\x81\xa6images\xc4\x00\x00", length=4096)
        elif m == "hang-up":  # reads the request, closes without a word
            return
        elif m == "hang":  # reads the request, never answers (until the test moves on)
            wait_while(m)
        else:
            self.proxy(body)


http.server.ThreadingHTTPServer.daemon_threads = True
http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


# ================================================================================================ processes
def prom(url: str) -> list[tuple[str, dict[str, str], float]]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of ``url``'s samples ``name`` whose labels include ``labels`` (0 when there are none)."""
    return sum(v for n, lab, v in prom(url) if n == name and labels.items() <= lab.items())


def denoise_calls(unet_url: str) -> float:
    """HTTP requests the UNet has answered on /v1/denoise, whatever their status."""
    return metric(unet_url, "triptych_http_requests_total", route="/v1/denoise")


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log else ""
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}\n{tail}")


def status_of(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return None


@dataclass
class Proc:
    """One service process of the stack: how to start it, and the running one."""

    name: str
    port: int
    cmd: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self, **extra_env: str) -> None:
        assert not self.alive, f"{self.name} is already running"
        self.extra_env = extra_env
        with open(self.log, "ab") as log:
            log.write(f"\n===== start {self.name} {extra_env or ''}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.cmd,
                cwd=REPO,
                env={**self.env, **extra_env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a signal to the test run does not reach it; we signal it by pid
            )

    def signal(self, sig: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)

    def kill(self) -> None:
        if self.alive:
            assert self.popen is not None
            self.popen.kill()
            self.popen.wait(timeout=30)

    def stop(self) -> None:
        if self.alive:
            assert self.popen is not None
            self.popen.terminate()
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=30)

    def wait_ready(self, timeout_s: float = 180) -> None:
        def ready() -> bool:
            if not self.alive:
                assert self.popen is not None
                raise AssertionError(
                    f"{self.name} exited with {self.popen.returncode}\n{self.log.read_text(errors='replace')[-3000:]}"
                )
            return status_of(f"{self.url}/readyz") == 200

        wait_for(ready, timeout_s, f"{self.name} to be ready", self.log)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


class Stack:
    """Text encoder, UNet, real VAE, the fake VAE in front of it, and central: separate processes."""

    def __init__(self, model: Path, tmp: Path) -> None:
        base = free_port_block(5)
        self.tmp = tmp
        self.control = tmp / "fake-vae.mode"
        self.control.write_text("proxy")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIPTYCH_")}
        env.update(
            TRIPTYCH_MODEL=str(model),
            TRIPTYCH_DEVICE="cpu",
            TRIPTYCH_DTYPE="float32",
            TRIPTYCH_CACHE_DIR=str(tmp / "cache"),
            TRIPTYCH_LOG_LEVEL="WARNING",
            TRIPTYCH_LOG_FORMAT="json",
            TRIPTYCH_CPU_THREADS="1",  # five processes on a 2-core machine: no oversubscription
            TRIPTYCH_DRAIN_TIMEOUT_S=str(DRAIN_TIMEOUT_S),
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
        )
        ports = {"central": base, "text_encoder": base + 1, "diffusion_unet": base + 2, "fake_vae": base + 3,
                 "vae_decoder": base + 4}  # fmt: skip

        def serve(service: str, port: int) -> list[str]:
            return [sys.executable, "-m", "central.cli", "serve", service, "--host", "127.0.0.1", "--port", str(port)]

        script = tmp / "fake_stage.py"
        script.write_text(FAKE_STAGE)
        central_env = {
            **env,
            "TRIPTYCH_TEXT_ENCODER_URL": f"http://127.0.0.1:{ports['text_encoder']}",
            "TRIPTYCH_DIFFUSION_UNET_URL": f"http://127.0.0.1:{ports['diffusion_unet']}",
            "TRIPTYCH_VAE_DECODER_URL": f"http://127.0.0.1:{ports['fake_vae']}",
            "TRIPTYCH_DECODE_TIMEOUT_S": str(DECODE_TIMEOUT_S),
            "TRIPTYCH_INFO_TIMEOUT_S": str(INFO_TIMEOUT_S),
        }
        real_vae = f"http://127.0.0.1:{ports['vae_decoder']}"
        self.procs = {
            "text_encoder": Proc("text_encoder", ports["text_encoder"], serve("text-encoder", ports["text_encoder"]),
                                 env, tmp / "text_encoder.log"),
            "diffusion_unet": Proc("diffusion_unet", ports["diffusion_unet"],
                                   serve("diffusion-unet", ports["diffusion_unet"]), env, tmp / "diffusion_unet.log"),
            "vae_decoder": Proc("vae_decoder", ports["vae_decoder"], serve("vae-decoder", ports["vae_decoder"]),
                                env, tmp / "vae_decoder.log"),
            "fake_vae": Proc("fake_vae", ports["fake_vae"],
                             [sys.executable, str(script), str(ports["fake_vae"]), real_vae, str(self.control)],
                             env, tmp / "fake_vae.log"),
            "central": Proc("central", ports["central"], serve("central", ports["central"]), central_env,
                            tmp / "central.log"),
        }  # fmt: skip

    @property
    def central(self) -> Proc:
        return self.procs["central"]

    @property
    def unet(self) -> Proc:
        return self.procs["diffusion_unet"]

    @property
    def fake_vae(self) -> Proc:
        return self.procs["fake_vae"]

    def ensure(self, **variants: dict[str, str]) -> None:
        """Every process running, with the stack's own settings or, for a process named in ``variants``, those
        extra environment variables; and central ready. Restarts what is down or set differently."""
        self.control.write_text("proxy")
        started = []
        for proc in self.procs.values():
            wanted = variants.get(proc.name, {})
            if proc.alive and proc.extra_env != wanted:
                proc.stop()
            if not proc.alive:
                proc.start(**wanted)
                started.append(proc)
        for proc in started:
            if proc.name != "fake_vae":  # it has no /readyz of its own: it proxies the VAE's
                proc.wait_ready()
        self.central.wait_ready()

    def close(self) -> None:
        """SIGTERM to all at once (nothing is in flight: each exits at once), then wait; kill what hangs."""
        for proc in self.procs.values():
            if proc.alive and proc.popen is not None:
                proc.popen.terminate()
        for proc in self.procs.values():
            proc.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log_text()[-2000:]}" for p in self.procs.values())


@pytest.fixture(scope="module")
def stack_processes(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tiny_model, tmp_path_factory.mktemp("faults"))
    try:
        s.ensure()
        yield s
    finally:
        s.close()


@pytest.fixture
def stack(stack_processes: Stack) -> Stack:
    """The module's stack, with whatever an earlier test killed or changed started again."""
    stack_processes.ensure()
    return stack_processes


def txt2img(central: str, steps: int = 2, seed: int = 11, timeout_s: float = 120) -> httpx.Response:
    return httpx.post(f"{central}/v1/txt2img", json={**GOOD, "seed": seed, "num_inference_steps": steps},
                      timeout=timeout_s)  # fmt: skip


class Background:
    """Requests running on threads; ``results()`` waits for them."""

    def __init__(self, calls: list[Callable[[], httpx.Response]]) -> None:
        self.out: list[httpx.Response | BaseException | None] = [None] * len(calls)
        self.threads = [threading.Thread(target=self._run, args=(i, c), daemon=True) for i, c in enumerate(calls)]
        for t in self.threads:
            t.start()

    def _run(self, i: int, call: Callable[[], httpx.Response]) -> None:
        try:
            self.out[i] = call()
        except BaseException as exc:  # reported by results()
            self.out[i] = exc

    def running(self) -> int:
        return sum(t.is_alive() for t in self.threads)

    def results(self, timeout_s: float = 180) -> list[httpx.Response]:
        deadline = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        assert not self.running(), f"requests still unanswered after {timeout_s:g} s"
        for r in self.out:
            assert isinstance(r, httpx.Response), f"request failed on the client side: {r!r}"
        return [r for r in self.out if isinstance(r, httpx.Response)]


def long_generations(central: str, seeds: tuple[int, ...]) -> Background:
    """One LONG_STEPS generation per seed, started at once on their own threads."""
    return Background([functools.partial(txt2img, central, steps=LONG_STEPS, seed=seed) for seed in seeds])


def wait_denoising(stack: Stack, n: int, log: Path | None = None) -> None:
    """Until ``n`` requests are admitted to the UNet's model (read, queued or computing)."""
    wait_for(
        lambda: metric(stack.unet.url, "triptych_queue_depth") >= n,
        60,
        f"{n} request(s) to be in the UNet's denoise",
        log or stack.unet.log,
    )


def assert_no_traceback(proc: Proc, since: int) -> None:
    text = proc.log_text()[since:]
    assert "Traceback" not in text, f"{proc.name} logged a traceback:\n{text[-4000:]}"


# ================================================================================================ garbage
@pytest.mark.parametrize(
    ("mode", "statuses", "type_"),
    [
        pytest.param("garbage", {502}, "bad_gateway", id="200-msgpack-random-bytes"),
        pytest.param("html-500", {502}, "bad_gateway", id="500-html-page"),
        pytest.param("truncated", {502, 503}, None, id="body-cut-short"),
        pytest.param("hang-up", {502, 503}, None, id="closes-without-answer"),
    ],
)
def test_vae_answering_garbage_is_a_bad_gateway(stack: Stack, mode: str, statuses: set[int], type_: str | None) -> None:
    """What answers at the VAE's address misbehaves: central answers with the envelope (502 bad_gateway for a
    reply that is not a decode response), leaks nothing of the reply, stays alive, and the next good request
    succeeds."""
    central = stack.central
    log_mark = len(central.log_text())
    stack.control.write_text(mode)
    r = txt2img(central.url)
    assert r.status_code in statuses, r.text[:600]
    err = assert_envelope(r, r.status_code, type_=type_)
    assert "vae_decoder" in err["message"], err
    assert "Internal Server Error" not in r.text and "/srv/" not in r.text
    assert status_of(f"{central.url}/healthz") == 200

    stack.control.write_text("proxy")
    ok = txt2img(central.url)
    assert ok.status_code == 200, ok.text[:600]
    assert central.alive
    assert_no_traceback(central, log_mark)


# ================================================================================================ hangs
@pytest.mark.parametrize("mode", ["hang", "slow-read"])
def test_vae_that_hangs_is_a_timeout(stack: Stack, mode: str) -> None:
    """The VAE's address accepts the connection and never answers (or takes the body a byte at a time): central
    answers 504 `timeout` once TRIPTYCH_DECODE_TIMEOUT_S has passed, instead of hanging with it, and stays up."""
    central = stack.central
    stack.control.write_text(mode)
    started = time.monotonic()
    r = txt2img(central.url, timeout_s=DECODE_TIMEOUT_S + 60)  # the client's own bound: far past central's
    elapsed = time.monotonic() - started
    err = assert_envelope(r, 504, type_="timeout")
    assert "vae_decoder" in err["message"], err
    assert elapsed >= DECODE_TIMEOUT_S, "answered before the hop timeout: not the timeout path"
    assert status_of(f"{central.url}/healthz") == 200

    stack.control.write_text("proxy")
    ok = txt2img(central.url)
    assert ok.status_code == 200, ok.text[:600]


@pytest.mark.parametrize("mode", ["info-hang", "info-garbage"])
def test_vae_info_misbehaving_makes_central_unready_not_hung(stack: Stack, mode: str) -> None:
    """The VAE's /v1/info hangs or is not JSON: central's /readyz answers 503 with the envelope (after at most
    TRIPTYCH_INFO_TIMEOUT_S, not hanging with it) and /healthz stays 200; ready again once the VAE behaves."""
    central = stack.central
    stack.control.write_text(mode)
    ready = httpx.get(f"{central.url}/readyz", timeout=INFO_TIMEOUT_S + 60)
    err = assert_envelope(ready, 503, type_="unavailable")
    assert "vae_decoder" in err["message"], err
    assert status_of(f"{central.url}/healthz") == 200
    stack.control.write_text("proxy")
    wait_for(lambda: status_of(f"{central.url}/readyz") == 200, 30, "central to be ready again", central.log)


# ================================================================================================ a stage known as dead
def test_a_dead_vae_known_as_dead_fails_before_the_denoise(stack: Stack) -> None:
    """With the process at the VAE's address gone, the first generation finds out (503, after its denoise);
    from then on a generation of many steps fails at once with 503 and the UNet never sees it. Once the VAE is
    back, the next generation succeeds. The same holds when central learnt it from a /readyz probe."""
    central, unet, vae = stack.central, stack.unet, stack.fake_vae

    vae.kill()
    before = denoise_calls(unet.url)
    first = txt2img(central.url)
    err = assert_envelope(first, 503, type_="unavailable")
    assert "vae_decoder" in err["message"], err
    # Central could not know yet: this one did run its denoise (and the counter counts what it should).
    assert denoise_calls(unet.url) == before + 1

    before = denoise_calls(unet.url)
    r = txt2img(central.url, steps=LONG_STEPS)
    err = assert_envelope(r, 503, type_="unavailable")
    assert "vae_decoder" in err["message"], err
    assert denoise_calls(unet.url) == before, "the UNet ran a denoise for a request whose VAE was known dead"

    vae.start()
    wait_for(lambda: status_of(f"{vae.url}/healthz") == 200, 30, "the VAE address to answer again", vae.log)
    ok = txt2img(central.url)
    assert ok.status_code == 200, ok.text[:600]

    # Known from a readiness probe rather than from a failed request.
    vae.kill()
    ready = httpx.get(f"{central.url}/readyz", timeout=10)
    err = assert_envelope(ready, 503, type_="unavailable")
    assert "vae_decoder" in err["message"], err
    before = denoise_calls(unet.url)
    assert_envelope(txt2img(central.url, steps=LONG_STEPS), 503, type_="unavailable")
    assert denoise_calls(unet.url) == before, "the UNet ran a denoise for a request whose VAE was known dead"
    assert_no_leak(ready.text)


# ================================================================================================ SIGKILL mid-request
@pytest.mark.timeout(300)
def test_unet_killed_mid_denoise_then_restarted_on_the_same_port(stack: Stack) -> None:
    """SIGKILL the UNet while central waits on its denoise: 503 envelope, central alive but not ready (naming
    the stage); the UNet back on the same port and the next request succeeds with the same central process."""
    central, unet = stack.central, stack.unet
    central_pid = central.popen.pid if central.popen else None
    log_mark = len(central.log_text())
    pending = Background([lambda: txt2img(central.url, steps=LONG_STEPS)])
    wait_denoising(stack, 1)
    unet.signal(signal.SIGKILL)
    assert unet.popen is not None
    unet.popen.wait(timeout=30)

    (response,) = pending.results(60)
    assert response.status_code in (502, 503), response.text
    err = assert_envelope(response, response.status_code)
    assert "diffusion_unet" in err["message"], err
    assert "127.0.0.1" not in err["message"], "a stage's address is not for the caller"

    assert status_of(f"{central.url}/healthz") == 200
    ready = httpx.get(f"{central.url}/readyz", timeout=10)
    err = assert_envelope(ready, 503, type_="unavailable")
    assert "diffusion_unet" in err["message"], err
    # While it is down, a new request fails the same way, at once.
    assert_envelope(txt2img(central.url), 503, type_="unavailable")

    unet.start()
    unet.wait_ready()
    wait_for(lambda: status_of(f"{central.url}/readyz") == 200, 30, "central to be ready again", central.log)
    ok = txt2img(central.url)
    assert ok.status_code == 200, ok.text
    assert len(ok.json()["images"]) == 1
    assert central.alive and central.popen is not None and central.popen.pid == central_pid
    assert_no_traceback(central, log_mark)


# ================================================================================================ SIGTERM under load
def test_central_sigterm_under_load_finishes_admitted_work(stack: Stack) -> None:
    """Three generations in flight through central (in the UNet's denoise), then SIGTERM to central: all three
    finish with 200, new generations get central's 503 envelope, /healthz stays 200 and /readyz turns 503, and
    central exits 0 once they are done. The stages are untouched."""
    central = stack.central
    log_mark = len(central.log_text())
    pending = long_generations(central.url, seeds=(4, 5, 6))
    wait_denoising(stack, 3, central.log)
    central.signal(signal.SIGTERM)
    sent = time.monotonic()
    wait_for(lambda: status_of(f"{central.url}/readyz") == 503, 10, "central's /readyz to turn 503", central.log)

    refused = txt2img(central.url)
    err = assert_envelope(refused, 503, type_="unavailable")
    assert "shutting down" in err["message"], err
    assert refused.headers.get("retry-after"), refused.headers
    assert status_of(f"{central.url}/healthz") == 200
    assert pending.running() == 3, "the admitted requests finished before the drain was tested; use more steps"

    for r in pending.results(DRAIN_TIMEOUT_S):
        assert r.status_code == 200, r.text[:600]
    assert central.popen is not None
    code = central.popen.wait(timeout=30)
    assert code == 0, central.log_text()[-3000:]
    assert time.monotonic() - sent < DRAIN_TIMEOUT_S + 10
    # The stages were not disturbed: nothing of theirs is still admitted.
    assert metric(stack.unet.url, "triptych_queue_depth") == 0
    assert stack.unet.alive
    assert_no_traceback(central, log_mark)


def test_central_sigterm_past_the_drain_timeout_answers_503_and_the_unet_stops(stack_processes: Stack) -> None:
    """Central with a 1 s drain and three generations that need far longer: after SIGTERM each gets central's 503
    envelope, central exits 0 within seconds, and the UNet notices its caller gone and abandons the three
    denoise jobs (answered 499 to nobody) instead of computing them for no one."""
    stack = stack_processes
    stack.ensure(central={"TRIPTYCH_DRAIN_TIMEOUT_S": str(SHORT_DRAIN_S)})
    central, unet = stack.central, stack.unet
    log_mark = len(central.log_text())
    abandoned = metric(unet.url, "triptych_http_requests_total", route="/v1/denoise", status="499")
    pending = long_generations(central.url, seeds=(7, 8, 9))
    wait_denoising(stack, 3, central.log)
    central.signal(signal.SIGTERM)
    sent = time.monotonic()
    for r in pending.results(60):
        err = assert_envelope(r, 503, type_="unavailable")
        assert "drain" in err["message"], err
    assert central.popen is not None
    code = central.popen.wait(timeout=SHORT_DRAIN_S + 20)
    assert code == 0, central.log_text()[-3000:]
    assert time.monotonic() - sent < SHORT_DRAIN_S + 20
    assert_no_traceback(central, log_mark)
    wait_for(
        lambda: metric(unet.url, "triptych_http_requests_total", route="/v1/denoise", status="499") == abandoned + 3,
        60,
        "the UNet to abandon the three denoise jobs of the stopped generations",
        unet.log,
    )
    assert metric(unet.url, "triptych_queue_depth") == 0


def test_unet_sigterm_under_load_finishes_admitted_work(stack: Stack) -> None:
    """Three generations in the UNet's denoise, then SIGTERM to the UNet: all three finish with 200, a new
    generation during the drain gets central's 503 envelope (relaying the stage's refusal), and the UNet exits
    0 once they are done."""
    central, unet = stack.central, stack.unet
    log_mark = len(unet.log_text())
    pending = long_generations(central.url, seeds=(1, 2, 3))
    wait_denoising(stack, 3)
    unet.signal(signal.SIGTERM)
    sent = time.monotonic()
    wait_for(lambda: status_of(f"{unet.url}/readyz") == 503, 10, "the UNet's /readyz to turn 503", unet.log)

    refused = txt2img(central.url)
    err = assert_envelope(refused, 503, type_="unavailable")
    assert pending.running() == 3, "the admitted requests finished before the drain was tested; use more steps"
    assert "shutting down" in err["message"], err
    assert unet.alive, "the UNet exited while admitted requests were still running"
    assert status_of(f"{central.url}/healthz") == 200

    for r in pending.results(DRAIN_TIMEOUT_S):
        assert r.status_code == 200, r.text[:600]
        assert len(r.json()["images"]) == 1
    assert unet.popen is not None
    code = unet.popen.wait(timeout=30)
    assert code == 0, unet.log_text()[-3000:]
    assert time.monotonic() - sent < DRAIN_TIMEOUT_S + 10
    assert_no_traceback(unet, log_mark)


def test_unet_sigterm_past_the_drain_timeout_answers_503(stack_processes: Stack) -> None:
    """A UNet with a 1 s drain and three generations that need far longer: after SIGTERM each gets the 503
    envelope through central (the stage stopped it at the end of its drain), no traceback in the UNet's log, and
    the UNet exits 0 within a few seconds of its drain timeout."""
    stack = stack_processes
    stack.ensure(diffusion_unet={"TRIPTYCH_DRAIN_TIMEOUT_S": str(SHORT_DRAIN_S)})
    central, unet = stack.central, stack.unet
    log_mark = len(unet.log_text())
    pending = long_generations(central.url, seeds=(1, 2, 3))
    wait_denoising(stack, 3)
    unet.signal(signal.SIGTERM)
    sent = time.monotonic()
    for r in pending.results(60):
        err = assert_envelope(r, 503, type_="unavailable")
        assert "drain" in err["message"], err
    assert unet.popen is not None
    code = unet.popen.wait(timeout=SHORT_DRAIN_S + 20)
    assert code == 0, unet.log_text()[-3000:]
    assert time.monotonic() - sent < SHORT_DRAIN_S + 20
    assert_no_traceback(unet, log_mark)
    assert status_of(f"{central.url}/healthz") == 200
    assert_envelope(httpx.get(f"{central.url}/readyz", timeout=10), 503, type_="unavailable")
