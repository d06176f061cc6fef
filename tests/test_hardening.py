"""Hardening (issue 11): NaN and infinity never pass silently, and stage inputs are bounded before allocation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from central.app import build_app
from diffusion_unet.app import build_app as unet_app
from shared import wire
from shared.protocol import EncodeRequest
from shared.settings import Settings
from tests.helpers import assert_envelope, decode_all, local_orchestrator, wire_orchestrator
from vae_decoder.app import build_app as vae_app


def post_msgpack(client: TestClient, path: str, message: dict[str, Any]) -> Any:
    return client.post(path, content=wire.encode(message), headers={"content-type": wire.CONTENT_TYPE})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_stages_refuse_non_finite_tensors_naming_them(
    settings: Settings, te_runtime: Any, unet_runtime: Any, vae_runtime: Any, bad: float
) -> None:
    """Before: NaN latents decoded to a black 200 image, NaN embeddings denoised to NaN latents."""
    clean = torch.randn(1, 4, 8, 8)
    latents = clean.clone()
    latents[0, 1, 2, 3] = bad
    with TestClient(vae_app(settings, vae_runtime)) as vae:
        err = assert_envelope(post_msgpack(vae, "/v1/decode", {"latents": latents}), 422, param="latents")
        assert "NaN or infinite" in err["message"]
        assert post_msgpack(vae, "/v1/decode", {"latents": clean}).status_code == 200
    e = te_runtime.encode(EncodeRequest(prompt=["a lighthouse"], do_classifier_free_guidance=False))
    embeds = e.prompt_embeds.clone()
    embeds[0, 5, 7] = bad
    good = {"height": 64, "width": 64, "num_inference_steps": 2, "guidance_scale": 1.0, "seeds": [1]}
    with TestClient(unet_app(settings, unet_runtime)) as unet:
        err = assert_envelope(post_msgpack(unet, "/v1/denoise", {**good, "prompt_embeds": embeds}), 422)
        assert err["param"] == "prompt_embeds"
        init = {"latent_mean": latents, "latent_std": clean.abs(), "strength": 0.5, "scaling_factor": 0.18}
        message = {**good, "prompt_embeds": e.prompt_embeds, "image": init}
        assert_envelope(post_msgpack(unet, "/v1/denoise", message), 422, param="image.latent_mean")


@pytest.fixture()
def central(settings: Settings, te_runtime: Any, unet_runtime: Any, vae_runtime: Any) -> Iterator[TestClient]:
    orch = wire_orchestrator(settings, te_runtime, unet_runtime, vae_runtime)
    with TestClient(build_app(settings, orchestrator=orch)) as client:
        yield client


BODY = {"prompt": "a lighthouse", "seed": 3, "num_inference_steps": 3}


@pytest.mark.parametrize("where", ["unet", "vae"])
def test_a_model_that_produces_nan_fails_the_request_instead_of_a_black_200(
    central: TestClient, unet_runtime: Any, vae_runtime: Any, where: str
) -> None:
    """Before: a UNet or VAE overflowing (fp16 on GPUs) gave 200 with a black image. Now the stage answers the
    ``numerical_error`` envelope, central a 502 naming it, and the next request is served as before."""
    before = decode_all(central.post("/v1/txt2img", json=BODY))
    module = unet_runtime.variants["base"].unet if where == "unet" else vae_runtime.vae.decoder
    hook = module.register_forward_hook(
        lambda _m, _a, out: (out[0] * float("nan"),) if where == "unet" else out * float("nan")
    )
    try:
        err = assert_envelope(central.post("/v1/txt2img", json=BODY), 502, type_="bad_gateway")
    finally:
        hook.remove()
    assert "NaN or infinite" in err["message"] and ("UNet" if where == "unet" else "VAE") in err["message"]
    assert (decode_all(central.post("/v1/txt2img", json=BODY)) == before).all()


def test_the_numerical_error_envelope_comes_from_the_stage(settings: Settings, vae_runtime: Any) -> None:
    hook = vae_runtime.vae.decoder.register_forward_hook(lambda _m, _a, out: out * float("nan"))
    try:
        with TestClient(vae_app(settings, vae_runtime)) as vae:
            r = post_msgpack(vae, "/v1/decode", {"latents": torch.randn(1, 4, 8, 8)})
    finally:
        hook.remove()
    err = assert_envelope(r, 500, type_="numerical_error")
    assert "float32" in err["message"]


def test_local_stages_fail_the_same_way(
    settings: Settings, te_runtime: Any, unet_runtime: Any, vae_runtime: Any
) -> None:
    """In-process stages (``LocalTransport``): the same refusal reaches the caller, not a black image."""
    orch = local_orchestrator(settings, te_runtime, unet_runtime, vae_runtime)
    hook = vae_runtime.vae.decoder.register_forward_hook(lambda _m, _a, out: out * float("nan"))
    try:
        with TestClient(build_app(settings, orchestrator=orch)) as client:
            r = client.post("/v1/txt2img", json=BODY)
    finally:
        hook.remove()
    assert r.status_code >= 500 and "NaN or infinite" in r.json()["error"]["message"]


def test_stages_bound_their_inputs_before_allocating(
    settings: Settings, te_runtime: Any, unet_runtime: Any, vae_runtime: Any
) -> None:
    """Before: 10000 latents to /v1/decode (a 10 MB body) were decoded, taking the VAE to 8.5 GB. Every stage
    now refuses more images than ``TRIPTYCH_MAX_NUM_IMAGES`` and sides over ``TRIPTYCH_MAX_SIDE`` before queueing."""
    with TestClient(vae_app(settings, vae_runtime)) as vae:
        err = assert_envelope(post_msgpack(vae, "/v1/decode", {"latents": torch.zeros(10000, 4, 8, 8)}), 422)
        assert err["param"] == "latents" and "10000 images" in err["message"]
        huge = torch.zeros(1, 4, 257, 8)  # 2056 pixels high
        assert "2056" in assert_envelope(post_msgpack(vae, "/v1/decode", {"latents": huge}), 422)["message"]
        many = torch.zeros(9, 64, 64, 3, dtype=torch.uint8)
        assert_envelope(post_msgpack(vae, "/v1/encode-image", {"images": many}), 422, param="images")
        tall = torch.zeros(1, 2056, 8, 3, dtype=torch.uint8)
        assert_envelope(post_msgpack(vae, "/v1/encode-image", {"images": tall}), 422, param="images")
        assert post_msgpack(vae, "/v1/decode", {"latents": torch.zeros(8, 4, 8, 8)}).status_code == 200
    e = te_runtime.encode(EncodeRequest(prompt=["a lighthouse"], do_classifier_free_guidance=False))
    good = {"prompt_embeds": e.prompt_embeds, "height": 64, "width": 64, "num_inference_steps": 2,
            "guidance_scale": 1.0, "seeds": list(range(9))}  # fmt: skip
    with TestClient(unet_app(settings, unet_runtime)) as unet:
        message = {**good, "num_images_per_prompt": 9}
        assert_envelope(post_msgpack(unet, "/v1/denoise", message), 422, param="num_images_per_prompt")
        message = {**good, "seeds": [1], "height": 4096}
        assert_envelope(post_msgpack(unet, "/v1/denoise", message), 422, param="height")


def test_outpaint_checks_the_canvas_size_before_building_it(
    central: TestClient, init_image: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: 4096 on every side built a 8256² canvas (1 GB per request) and only then answered 422. Now the
    size is checked first, 413 as for any too-large image, and the canvas is never built."""
    import central.pipeline as pipeline
    from tests.helpers import png_b64

    built: list[Any] = []
    real = pipeline.outpaint_canvas
    monkeypatch.setattr(pipeline, "outpaint_canvas", lambda *a: built.append(a) or real(*a))
    body = {"prompt": "wide", "image": png_b64(init_image), "num_inference_steps": 2}
    sides = {"left": 4096, "right": 4096, "top": 4096, "bottom": 4096}
    err = assert_envelope(central.post("/v1/outpaint", json={**body, **sides}), 413, param="image")
    assert "8256x8256" in err["message"] and built == []
    assert_envelope(central.post("/v1/outpaint", json={**body, "left": 4000}), 413, param="image")  # one side
    assert central.post("/v1/outpaint", json={**body, "left": 8, "right": 8}).status_code == 200
    assert len(built) == 1


def test_central_sheds_load_past_its_bound_instead_of_queueing_without_limit(
    settings: Settings, te_runtime: Any, unet_runtime: Any, vae_runtime: Any
) -> None:
    """Before: central's pool to a stage held as many requests as the stage admits, so the stage's 429 was
    never reached and 400 concurrent requests all waited. Now central admits ``max_queue`` generations and
    answers 429 with ``Retry-After`` past that, at once; the admitted ones finish."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    bounded = settings.model_copy(update={"max_queue": 2})
    orch = local_orchestrator(bounded, te_runtime, unet_runtime, vae_runtime)
    release, entered = threading.Event(), threading.Semaphore(0)

    def hold(_module: Any, _args: Any) -> None:
        entered.release()
        assert release.wait(60)

    hook = unet_runtime.variants["base"].unet.register_forward_pre_hook(hold)
    try:
        with TestClient(build_app(bounded, orchestrator=orch)) as client, ThreadPoolExecutor(3) as pool:
            first = [pool.submit(client.post, "/v1/txt2img", json={**BODY, "seed": i}) for i in range(2)]
            assert entered.acquire(timeout=30)  # one is in the UNet
            deadline = time.monotonic() + 30
            while client.app.state.generation_slots.in_flight < 2:  # and the other admitted by central
                assert time.monotonic() < deadline
                time.sleep(0.005)
            r = pool.submit(client.post, "/v1/txt2img", json=BODY).result(timeout=30)
            err = assert_envelope(r, 429, type_="overloaded")
            assert r.headers["retry-after"] == "1" and "central is at capacity" in err["message"]
            release.set()
            assert [f.result(timeout=60).status_code for f in first] == [200, 200]
            assert client.post("/v1/txt2img", json=BODY).status_code == 200  # the bound is released
    finally:
        release.set()
        hook.remove()


def test_a_request_fails_fast_when_a_stage_is_known_to_be_down(
    settings: Settings, te_runtime: Any, unet_runtime: Any, vae_runtime: Any
) -> None:
    """Before: with the VAE gone (and /readyz already 503), a request still ran the whole denoise and failed
    after it. A stage last found unreachable is now probed before any work: 503 without a UNet forward."""
    from central.clients import HttpTransport, LocalTransport

    orch = local_orchestrator(settings, te_runtime, unet_runtime, vae_runtime)
    with TestClient(build_app(settings, orchestrator=orch)) as client:
        assert client.post("/v1/txt2img", json=BODY).status_code == 200  # all up: the stages' infos are known
        # The VAE service dies: its address no longer answers.
        dead = settings.model_copy(update={"vae_decoder_url": "http://127.0.0.1:9", "connect_timeout_s": 1.0})
        orch.vae.transport = HttpTransport("vae_decoder", dead.vae_decoder_url, dead)
        assert_envelope(client.get("/readyz"), 503)
        forwards = unet_runtime.batcher.forwards
        err = assert_envelope(client.post("/v1/txt2img", json={**BODY, "num_inference_steps": 30}), 503)
        assert "vae_decoder" in err["message"]
        assert unet_runtime.batcher.forwards == forwards  # nothing was spent on the UNet
        orch.vae.transport = LocalTransport(vae_runtime)  # it comes back: served again, no restart
        assert client.post("/v1/txt2img", json=BODY).status_code == 200


def test_public_answers_name_no_server_path(
    settings: Settings, te_runtime: Any, unet_runtime: Any, vae_runtime: Any
) -> None:
    """Before: /v1/info and the metrics' labels showed the model cache under the home directory (and so that
    the services ran as root), and a 503 named the stages' internal URLs."""
    from central.clients import HttpTransport
    from shared.serving.models import public_model_id

    model_dir = str(settings.model)
    assert public_model_id(model_dir) == model_dir.rstrip("/").rsplit("/", 1)[-1]
    assert (
        public_model_id("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    )
    orch = local_orchestrator(settings, te_runtime, unet_runtime, vae_runtime)
    secret_url = "http://10.9.8.7:8003"
    dead = settings.model_copy(update={"vae_decoder_url": secret_url, "connect_timeout_s": 0.2})
    orch.vae.transport = HttpTransport("vae_decoder", secret_url, dead)
    with TestClient(build_app(settings, orchestrator=orch)) as client:
        info = client.get("/v1/info").json()
        metrics = client.get("/metrics").text
        models = client.get("/v1/models")
        ready = client.get("/readyz")
    text = str(info) + str(models.json()) + ready.text
    assert model_dir not in text and "/" not in info["stages"]["text_encoder"]["model"]["id"]
    assert "10.9.8.7" not in text and model_dir not in metrics
    assert "vae_decoder" in ready.json()["error"]["message"]


def test_a_request_still_running_at_the_drain_timeout_gets_the_503_envelope() -> None:
    """Before: when the drain timed out, uvicorn cancelled what was left and the client got a plain-text 500
    (and the log a traceback). Now each gets the 503 envelope, and a request that finishes in time is served."""
    import asyncio

    import httpx
    from fastapi import FastAPI

    from shared.serving.middleware import install_observability

    app = FastAPI()
    install_observability(app, service="probe", drain_timeout_s=0.05)
    lifecycle = app.state.lifecycle
    stopped: list[str] = []

    @app.get("/slow")
    async def slow(seconds: float) -> dict[str, str]:
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            stopped.append("cancelled")  # the work itself is stopped, not left running
            raise
        return {"done": "yes"}

    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://probe") as client:
            quick = asyncio.ensure_future(client.get("/slow", params={"seconds": 0.01}))
            long = asyncio.ensure_future(client.get("/slow", params={"seconds": 30}))
            await asyncio.sleep(0.2)
            lifecycle.begin_drain()
            late = await client.get("/slow", params={"seconds": 0})  # new work while draining: refused
            lifecycle.expire()  # what DrainingServer does once the drain timeout has passed
            return await quick, await asyncio.wait_for(long, 10), late

    quick, long, late = asyncio.run(scenario())
    assert quick.status_code == 200 and quick.json() == {"done": "yes"}
    err = assert_envelope(long, 503, type_="unavailable")
    assert "stopped at the end of the drain" in err["message"] and long.headers["retry-after"] == "1"
    assert stopped == ["cancelled"] and lifecycle.in_flight == 0
    assert "shutting down" in assert_envelope(late, 503)["message"]


@pytest.mark.parametrize("service", ["central", "vae_decoder"])
def test_a_body_that_does_not_arrive_in_time_is_408(
    settings: Settings, te_runtime: Any, unet_runtime: Any, vae_runtime: Any, service: str
) -> None:
    """Before: a client announcing 100 kB and sending 10 bytes held its connection for minutes (2000 of them
    stayed open). Now the body must arrive within TRIPTYCH_BODY_TIMEOUT_S: 408, and the service goes on."""
    import asyncio

    import httpx

    quick = settings.model_copy(update={"body_timeout_s": 0.5})
    if service == "central":
        app = build_app(quick, orchestrator=local_orchestrator(quick, te_runtime, unet_runtime, vae_runtime))
        path, content_type, good = "/v1/txt2img", "application/json", b'{"prompt": "x", "num_inference_steps": 2}'
    else:
        app = vae_app(quick, vae_runtime)
        path, content_type, good = "/v1/decode", wire.CONTENT_TYPE, wire.encode({"latents": torch.randn(1, 4, 8, 8)})

    async def trickle() -> Any:
        yield good[:10]
        await asyncio.sleep(30)  # the rest never comes in time
        yield good[10:]

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc", timeout=20) as client:
            headers = {"content-type": content_type, "content-length": str(len(good))}
            slow = await asyncio.wait_for(client.post(path, content=trickle(), headers=headers), 10)
            fine = await client.post(path, content=good, headers={"content-type": content_type})
            return slow, fine

    with TestClient(app):  # the lifespan (central checks its stages)
        slow, fine = asyncio.run(scenario())
    err = assert_envelope(slow, 408, type_="request_timeout")
    assert "TRIPTYCH_BODY_TIMEOUT_S" in err["message"]
    assert fine.status_code == 200, fine.text


def test_connections_past_the_cap_are_refused_with_429_while_probes_pass(settings: Settings, vae_runtime: Any) -> None:
    """Before: every slow sender held a connection and nothing bounded how many; 2000 of them stayed open. Now
    TRIPTYCH_MAX_CONNECTIONS requests are held at most: the next gets 429 + Retry-After before its body is read,
    the probes still answer, and once the slow ones are timed out (408) the service takes work again."""
    import asyncio

    import httpx

    capped = settings.model_copy(update={"body_timeout_s": 1.0, "max_connections": 2})
    app = vae_app(capped, vae_runtime)
    good = wire.encode({"latents": torch.randn(1, 4, 8, 8)})
    headers = {"content-type": wire.CONTENT_TYPE, "content-length": str(len(good))}

    async def trickle() -> Any:
        yield good[:10]
        await asyncio.sleep(30)
        yield good[10:]

    async def scenario() -> tuple[list[httpx.Response], httpx.Response, httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc", timeout=20) as client:
            slow = [asyncio.ensure_future(client.post("/v1/decode", content=trickle(), headers=headers)) for _ in "ab"]
            while app.state.connection_cap.in_progress < 2:  # both slow senders hold their slot
                await asyncio.sleep(0.01)
            refused = await client.post("/v1/decode", content=good, headers={"content-type": wire.CONTENT_TYPE})
            probe = await client.get("/healthz")
            held = await asyncio.wait_for(asyncio.gather(*slow), 10)
            after = await client.post("/v1/decode", content=good, headers={"content-type": wire.CONTENT_TYPE})
            return list(held), refused, probe, after

    with TestClient(app):
        held, refused, probe, after = asyncio.run(scenario())
    err = assert_envelope(refused, 429, type_="overloaded")
    assert "TRIPTYCH_MAX_CONNECTIONS" in err["message"] and refused.headers["retry-after"] == "1"
    assert probe.status_code == 200
    assert [r.status_code for r in held] == [408, 408]
    assert after.status_code == 200 and app.state.connection_cap.in_progress == 0
