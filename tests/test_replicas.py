"""Replicas of a stage (issue 11, item 12): least-in-flight routing, failover only for work not started, a
SIGKILLed or draining replica, DNS names. Real stage processes on loopback; central in this process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from central.app import build_app, http_orchestrator
from central.replicas import ReplicaTransport
from shared.operations import DENOISE
from shared.protocol import DenoiseRequest
from shared.settings import Settings
from tests.conftest import free_port_block, spawn_triptych, wait_ready
from tests.helpers import assert_envelope

pytestmark = pytest.mark.timeout(300)

BODY = {"prompt": "two lighthouses", "seed": 11, "num_inference_steps": 3}


class Stage:
    """One stage service process (``triptych serve <service> --port``)."""

    def __init__(self, service: str, port: int, env: dict[str, str], log_path: Path) -> None:
        self.service, self.port, self.env, self.log_path = service, port, env, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Stage:
        self.proc = spawn_triptych(["serve", self.service, "--port", str(self.port)], self.env, self.log_path)
        try:
            wait_ready(self.url, self.proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{self.log_path.read_text(errors='replace')[-3000:]}") from None
        return self

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples whose labels include ``labels`` (0 when none)."""
        total = 0.0
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def denoise_calls(self) -> float:
        return self.metric("triptych_http_requests_total", route="/v1/denoise", method="POST")


@pytest.fixture(scope="module")
def stages(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Stage]]:
    """A text encoder, a VAE and two UNet replicas, each its own process."""
    tmp = tmp_path_factory.mktemp("replicas")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIPTYCH_")}
    env.update(TRIPTYCH_MODEL=str(tiny_model), TRIPTYCH_DEVICE="cpu", TRIPTYCH_DTYPE="float32",
               TRIPTYCH_LOG_LEVEL="WARNING", TRIPTYCH_DRAIN_TIMEOUT_S="30")  # fmt: skip
    base = free_port_block(5)
    names = [("text-encoder", "te"), ("vae-decoder", "vae"), ("diffusion-unet", "a"), ("diffusion-unet", "b")]
    procs = {key: Stage(service, base + i, env, tmp / f"{key}.log") for i, (service, key) in enumerate(names)}
    procs["spare_port"] = Stage("diffusion-unet", base + 4, env, tmp / "spare.log")  # never started
    try:
        for key in ("te", "vae", "a", "b"):
            procs[key].start()
        yield procs
    finally:
        for stage in procs.values():
            stage.stop()


def central_settings(settings: Settings, stages: dict[str, Stage], unet_url: str) -> Settings:
    return settings.model_copy(
        update={
            "text_encoder_url": stages["te"].url,
            "diffusion_unet_url": unet_url,
            "vae_decoder_url": stages["vae"].url,
        }
    )


def denoise_request(steps: int = 40) -> DenoiseRequest:
    import torch

    return DenoiseRequest(
        prompt_embeds=torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0)),
        negative_prompt_embeds=torch.zeros(1, 77, 32),
        height=64, width=64, num_inference_steps=steps, guidance_scale=7.5, seeds=[3],
    )  # fmt: skip


def test_calls_go_to_the_replica_with_the_fewest_in_flight(settings: Settings, stages: dict[str, Stage]) -> None:
    """Two calls at once land on two replicas (a round-robin could too; the third, sent while the first two run
    and one replica is refused, shows the choice follows what is in flight)."""
    a, b = stages["a"], stages["b"]
    transport = ReplicaTransport("diffusion_unet", f"{a.url},{b.url}", settings, limits=_limits(settings))
    before = (a.denoise_calls(), b.denoise_calls())

    async def two_at_once() -> list[Any]:
        try:
            calls = [transport.call(DENOISE, denoise_request()) for _ in range(2)]
            return await asyncio.gather(*calls)
        finally:
            await transport.aclose()

    results = asyncio.run(two_at_once())
    assert len(results) == 2
    assert (a.denoise_calls() - before[0], b.denoise_calls() - before[1]) == (1, 1)
    assert all(r.in_flight == 0 for r in transport.replicas)


def test_a_replica_that_takes_no_connection_is_skipped_and_pixels_do_not_change(
    settings: Settings, stages: dict[str, Stage]
) -> None:
    """A listed replica that is down (nothing listens) costs a refused connection, not the request: the call
    goes to the live one, and the image equals the one-URL deployment's."""
    dead, live = stages["spare_port"], stages["b"]
    one = central_settings(settings, stages, live.url)
    two = central_settings(settings, stages, f"{dead.url},{live.url}")
    with TestClient(build_app(one, orchestrator=http_orchestrator(one))) as client:
        expected = client.post("/v1/txt2img", json=BODY)
    with TestClient(build_app(two, orchestrator=http_orchestrator(two))) as client:
        before = live.denoise_calls()
        got = [client.post("/v1/txt2img", json=BODY) for _ in range(3)]
        ready = client.get("/readyz")
    assert expected.status_code == 200, expected.text
    assert [r.status_code for r in got] == [200, 200, 200]
    assert {r.json()["images"][0] for r in got} == {expected.json()["images"][0]}
    assert live.denoise_calls() - before == 3
    assert ready.status_code == 200  # one replica up is enough


def test_a_replica_killed_mid_request_fails_that_request_only_and_the_next_go_to_the_live_one(
    settings: Settings, stages: dict[str, Stage], tiny_model: Path, tmp_path: Path
) -> None:
    """SIGKILL of the replica computing a request: that request is 503 (its work had started, so it is not
    silently run again elsewhere), and the following requests are served by the other replica at once."""
    victim = Stage("diffusion-unet", stages["spare_port"].port, stages["a"].env, tmp_path / "victim.log").start()
    live = stages["b"]
    two = central_settings(settings, stages, f"{victim.url},{live.url}")
    try:
        app = build_app(two, orchestrator=http_orchestrator(two))
        with TestClient(app):
            pass  # the lifespan checks both replicas

        async def scenario() -> tuple[httpx.Response, float, list[httpx.Response]]:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://central", timeout=120) as client:
                busy_b = live.denoise_calls()
                slow = asyncio.ensure_future(client.post("/v1/txt2img", json={**BODY, "num_inference_steps": 400}))
                while (
                    victim.metric("triptych_http_requests_in_flight") < 2
                ):  # besides this scrape  # it is computing on the victim
                    await asyncio.sleep(0.05)
                victim.signal(signal.SIGKILL)
                failed = await slow
                retried_on_b = live.denoise_calls() - busy_b
                after = [await client.post("/v1/txt2img", json=BODY) for _ in range(2)]
            await app.state.orchestrator.aclose()  # its sessions belong to this event loop
            return failed, retried_on_b, after

        with TestClient(app):
            failed, retried_on_b, after = asyncio.run(scenario())
        assert_envelope(failed, 503, type_="unavailable")
        assert retried_on_b == 0
        assert [r.status_code for r in after] == [200, 200]
    finally:
        victim.stop()


def test_a_draining_replica_sends_new_work_to_the_others(
    settings: Settings, stages: dict[str, Stage], tmp_path: Path
) -> None:
    """SIGTERM: the replica finishes what it has and refuses new work with 503 before admitting it; central
    sends that work to another replica instead of failing it."""
    leaving = Stage("diffusion-unet", stages["spare_port"].port, stages["a"].env, tmp_path / "leaving.log").start()
    live = stages["b"]
    two = central_settings(settings, stages, f"{leaving.url},{live.url}")
    try:
        app = build_app(two, orchestrator=http_orchestrator(two))

        async def scenario() -> tuple[httpx.Response, list[httpx.Response]]:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://central", timeout=120) as client:
                long = asyncio.ensure_future(client.post("/v1/txt2img", json={**BODY, "num_inference_steps": 150}))
                while leaving.metric("triptych_http_requests_in_flight") < 2:  # besides this scrape
                    await asyncio.sleep(0.05)
                leaving.signal(signal.SIGTERM)
                while httpx.get(f"{leaving.url}/readyz", timeout=5).status_code == 200:
                    await asyncio.sleep(0.05)
                # Each new request would pick the draining replica first if only in-flight counts mattered
                # after the long one ends; they are refused there and served by the live one.
                new = [await client.post("/v1/txt2img", json=BODY) for _ in range(3)]
                finished = await long
            await app.state.orchestrator.aclose()
            return finished, new

        with TestClient(app):
            long, new = asyncio.run(scenario())
        assert long.status_code == 200, long.text  # admitted before the drain: finished
        assert [r.status_code for r in new] == [200, 200, 200]
        assert leaving.proc is not None and leaving.proc.wait(timeout=60) == 0
    finally:
        leaving.stop()


def test_a_dns_name_is_every_address_it_resolves_to(settings: Settings, stages: dict[str, Stage]) -> None:
    """``dns+http://name:port``: the replicas are the name's addresses, looked up at most every second (a
    Kubernetes headless Service). ``localhost`` may also resolve to ::1, where nothing listens: skipped."""
    port = stages["b"].port
    dns = central_settings(settings, stages, f"dns+http://localhost:{port}")
    with TestClient(build_app(dns, orchestrator=http_orchestrator(dns))) as client:
        ok = client.post("/v1/txt2img", json=BODY)
        ready = client.get("/readyz")
        transport = client.app.state.orchestrator.unet.transport  # type: ignore[attr-defined]
    assert ok.status_code == 200, ok.text
    assert ready.status_code == 200
    assert isinstance(transport, ReplicaTransport)
    assert f"http://127.0.0.1:{port}" in {r.url for r in transport.replicas}


def test_replicas_serving_different_models_make_central_not_ready(settings: Settings, stages: dict[str, Stage]) -> None:
    """A rolling update half done (or a wrong address) must not mix two models' tensors in one request."""
    mixed = central_settings(settings, stages, f"{stages['b'].url},{stages['vae'].url}")
    app = build_app(mixed, orchestrator=http_orchestrator(mixed))
    with TestClient(app, raise_server_exceptions=False) as client:
        ready = client.get("/readyz")
    err = assert_envelope(ready, 503)
    assert "replicas disagree" in err["message"]


def test_stage_url_settings_take_lists_and_dns_names() -> None:
    ok = Settings(diffusion_unet_url="http://a:1/, http://b:2", vae_decoder_url="dns+http://vae-headless:8003")
    assert ok.diffusion_unet_url == "http://a:1,http://b:2"
    assert ok.vae_decoder_url == "dns+http://vae-headless:8003"
    for bad in ("a:1", "http://a:1,b:2", "dns+http://a:1,http://b:2", ","):
        with pytest.raises(ValueError, match="stage URL"):
            Settings(diffusion_unet_url=bad)


def _limits(settings: Settings) -> Any:
    from shared import wire

    return wire.Limits(max_body_bytes=settings.max_body_bytes)
