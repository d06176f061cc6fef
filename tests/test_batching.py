"""Continuous batching in the UNet service, cancellation and backpressure (issue 5)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from diffusion_unet.app import build_app as unet_app
from diffusion_unet.denoise import JobCancelled
from diffusion_unet.runtime import UNetRuntime
from shared import wire
from shared.operations import DENOISE
from shared.protocol import DecodeRequest, DenoiseRequest, EncodeRequest


@pytest.fixture(scope="module")
def embeds(te_runtime):  # type: ignore[no-untyped-def]
    return te_runtime.encode(EncodeRequest(prompt=["a lighthouse"], negative_prompt=["fog"]))


def request(embeds, *, steps: int, seed: int, n: int = 1, guidance: float = 7.5, scheduler: str | None = None):  # type: ignore[no-untyped-def]
    return DenoiseRequest(
        prompt_embeds=embeds.prompt_embeds,
        negative_prompt_embeds=embeds.negative_prompt_embeds if guidance > 1 else None,
        num_images_per_prompt=n,
        height=64,
        width=64,
        num_inference_steps=steps,
        guidance_scale=guidance,
        seeds=[seed + i for i in range(n)],
        scheduler=scheduler,
    )


def pixels(vae_runtime, latents: torch.Tensor) -> np.ndarray:  # type: ignore[no-untyped-def]
    return vae_runtime.decode(DecodeRequest(latents=latents)).images.numpy().astype(np.int16)


def wait_until(predicate, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)


def test_batched_requests_stay_within_two_levels_of_their_solo_results(unet_runtime, vae_runtime, embeds) -> None:  # type: ignore[no-untyped-def]
    """Requests with different steps, seeds, guidance and schedulers share UNet forwards (SPEC §8: ≤ 2/255)."""
    reqs = [
        request(embeds, steps=30, seed=1, n=2),
        request(embeds, steps=12, seed=7, guidance=4.0, scheduler="EulerDiscreteScheduler"),
        request(embeds, steps=20, seed=3, guidance=1.0, scheduler="Euler a"),
    ]
    solo = [unet_runtime.denoise(r).latents for r in reqs]
    batcher = unet_runtime.batcher
    forwards_before, batcher.largest_batch = batcher.forwards, 0
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(unet_runtime.denoise, reqs[0])
        wait_until(lambda: batcher.active_images > 0)
        rest = [pool.submit(unet_runtime.denoise, r) for r in reqs[1:]]
        batched = [f.result(timeout=120).latents for f in (first, *rest)]
    assert batcher.largest_batch >= 3, "the requests never shared a forward"
    # Fewer forwards than the 62 steps run one by one would need.
    assert batcher.forwards - forwards_before < 30 + 12 + 20
    for s, b in zip(solo, batched, strict=True):
        assert int(np.abs(pixels(vae_runtime, s) - pixels(vae_runtime, b)).max()) <= 2


def test_a_short_request_overtakes_a_long_one(unet_runtime, embeds) -> None:  # type: ignore[no-untyped-def]
    """Step-level batching: a 4-step request arriving during a 50-step one leaves the batch first."""
    finished: list[str] = []

    def run(name: str, req: DenoiseRequest) -> None:
        unet_runtime.denoise(req)
        finished.append(name)

    long = threading.Thread(target=run, args=("long", request(embeds, steps=50, seed=1)))
    long.start()
    wait_until(lambda: unet_runtime.batcher.active_images > 0)
    short = threading.Thread(target=run, args=("short", request(embeds, steps=4, seed=2)))
    short.start()
    short.join(60)
    long.join(120)
    assert finished == ["short", "long"]


def test_a_cancelled_request_frees_its_slot(unet_runtime, embeds) -> None:  # type: ignore[no-untyped-def]
    work = unet_runtime.submit(DENOISE, request(embeds, steps=400, seed=1))
    wait_until(lambda: unet_runtime.batcher.active_images > 0)
    work.abandon()  # what the HTTP route does when its caller hangs up
    assert isinstance(work.exception(timeout=30), JobCancelled)
    # The next request runs at once: nothing is left in the batch.
    assert unet_runtime.denoise(request(embeds, steps=2, seed=1)).latents.shape == (1, 4, 8, 8)
    wait_until(lambda: unet_runtime.batcher.active_images == 0)


def test_more_steps_than_training_timesteps_is_422(unet_runtime, embeds) -> None:  # type: ignore[no-untyped-def]
    from shared.errors import InvalidValue

    with pytest.raises(InvalidValue, match="999") as err:
        unet_runtime.denoise(request(embeds, steps=1000, seed=1))
    assert err.value.param == "num_inference_steps"


def test_invalid_request_fails_alone_while_others_run(unet_runtime, embeds) -> None:  # type: ignore[no-untyped-def]
    from shared.errors import InvalidValue

    bad = request(embeds, steps=3, seed=1).model_copy(update={"scheduler": "NoSuchScheduler"})
    with ThreadPoolExecutor(2) as pool:
        good = pool.submit(unet_runtime.denoise, request(embeds, steps=20, seed=1))
        wait_until(lambda: unet_runtime.batcher.active_images > 0)
        with pytest.raises(InvalidValue):
            pool.submit(unet_runtime.denoise, bad).result(timeout=60)
        assert good.result(timeout=60).latents.shape == (1, 4, 8, 8)


def test_batching_off_runs_one_request_at_a_time(settings, unet_runtime, embeds) -> None:  # type: ignore[no-untyped-def]
    rt = UNetRuntime(settings.model_copy(update={"batching": False}))
    asyncio.run(rt.load_async())
    threads: list[str] = []
    prepare = rt.batcher._prepare

    def recording(req):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return prepare(req)

    rt.batcher._prepare = recording
    try:
        reqs = [request(embeds, steps=3, seed=5), request(embeds, steps=4, seed=6)]
        works = [rt.submit(DENOISE, r) for r in reqs]  # queued together, still run one after the other
        outs = [w.result(timeout=60).latents for w in works]
        together = rt.batcher.forwards
        for out, r in zip(outs, reqs, strict=True):
            assert torch.equal(out, unet_runtime.denoise(r).latents)
            assert torch.equal(out, rt.denoise(r).latents)
        # No forward was shared: the two alone take as many forwards as the two queued together.
        assert rt.batcher.largest_batch == 1 and rt.batcher.forwards == 2 * together
        # On the thread that loaded the model (one OpenMP pool), the same path as with batching on.
        assert len(threads) == 4 and all(t.startswith("diffusion_unet-model") for t in threads), threads
    finally:
        rt.close()


def test_full_queue_answers_429_with_retry_after(settings, unet_runtime, embeds) -> None:  # type: ignore[no-untyped-def]
    """Past `max_queue` admitted requests a stage refuses new work at once, and stays healthy."""
    body = wire.encode(request(embeds, steps=300, seed=1).to_wire())
    small = settings.model_copy(update={"max_queue": 1})
    original = unet_runtime.settings
    unet_runtime.settings = small
    try:
        with TestClient(unet_app(small, unet_runtime)) as client, ThreadPoolExecutor(1) as pool:
            headers = {"content-type": wire.CONTENT_TYPE}
            slow = pool.submit(client.post, "/v1/denoise", content=body, headers=headers)
            wait_until(lambda: unet_runtime.in_flight == 1)
            r = client.post("/v1/denoise", content=body, headers=headers)
            assert r.status_code == 429
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "overloaded"
            assert client.get("/healthz").status_code == 200
            assert slow.result(timeout=120).status_code == 200
    finally:
        unet_runtime.settings = original


@contextlib.contextmanager
def serving(app: Any) -> Iterator[int]:
    """``app`` under a real uvicorn server in a thread; yields its port."""
    import uvicorn

    from tests.conftest import free_port_block

    port = free_port_block(1)
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def post_then_hang_up(port: int, path: str, body: bytes, content_type: str, until: Callable[[], bool]) -> None:
    """Send one request over a raw socket and close the connection once ``until()`` holds."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_until(until)


def test_a_caller_that_hangs_up_frees_its_batch_slot(settings, unet_runtime, embeds) -> None:  # type: ignore[no-untyped-def]
    """Over real HTTP: closing the connection mid-request cancels the job within a step or so."""
    with serving(unet_app(settings, unet_runtime)) as port:
        body = wire.encode(request(embeds, steps=900, seed=1).to_wire())
        forwards_before = unet_runtime.batcher.forwards
        post_then_hang_up(port, "/v1/denoise", body, wire.CONTENT_TYPE, lambda: unet_runtime.batcher.active_images > 0)
        # Socket closed: the stage notices, cancels, and the batch empties long before 900 steps.
        wait_until(lambda: unet_runtime.batcher.active_images == 0, timeout_s=60)
        assert unet_runtime.batcher.forwards - forwards_before < 900
        wait_until(lambda: unet_runtime.in_flight == 0)


def test_a_client_that_hangs_up_on_central_stops_the_denoise(settings, te_runtime, unet_runtime, vae_runtime) -> None:  # type: ignore[no-untyped-def]
    """The user closes the connection to central mid-generation: central abandons the request and the UNet
    drops the job before its next step, instead of computing an image nobody will receive."""
    from central.app import build_app as central_app
    from tests.helpers import local_orchestrator

    orchestrator = local_orchestrator(settings, te_runtime, unet_runtime, vae_runtime)
    with serving(central_app(settings, orchestrator=orchestrator)) as port:
        body = json.dumps({"prompt": "a fox", "num_inference_steps": 450, "seed": 1}).encode()
        forwards_before = unet_runtime.batcher.forwards
        post_then_hang_up(port, "/v1/txt2img", body, "application/json", lambda: unet_runtime.batcher.active_images > 0)
        wait_until(lambda: unet_runtime.batcher.active_images == 0, timeout_s=60)
        assert unet_runtime.batcher.forwards - forwards_before < 450
        wait_until(lambda: unet_runtime.in_flight == 0)


# ------------------------------------------------------------------------------------------- embedding cache
def test_repeated_prompts_hit_the_embedding_cache(te_runtime) -> None:  # type: ignore[no-untyped-def]
    cache = te_runtime.cache
    first = te_runtime.encode(EncodeRequest(prompt=["a never seen prompt 1"], negative_prompt=["ugly 1"]))
    hits, misses = cache.hits, cache.misses
    again = te_runtime.encode(EncodeRequest(prompt=["a never seen prompt 1"], negative_prompt=["ugly 1"]))
    assert (cache.hits - hits, cache.misses - misses) == (2, 0)
    assert torch.equal(first.prompt_embeds, again.prompt_embeds)
    assert torch.equal(first.negative_prompt_embeds, again.negative_prompt_embeds)
    # A prompt list mixing hits and misses gives the same rows as computing it cold.
    mixed = te_runtime.encode(EncodeRequest(prompt=["a never seen prompt 1", "another new one"]))
    assert torch.equal(mixed.prompt_embeds[:1], first.prompt_embeds)


def test_embedding_cache_is_bounded_in_bytes_and_can_be_off(settings) -> None:  # type: ignore[no-untyped-def]
    from text_encoder.runtime import TextEncoderRuntime

    one = 77 * 32 * 4  # bytes of one tiny-model embedding
    rt = TextEncoderRuntime(settings.model_copy(update={"embedding_cache_bytes": 3 * one}))
    rt.load()
    for i in range(6):
        rt.encode(EncodeRequest(prompt=[f"prompt {i}"], do_classifier_free_guidance=False))
    assert len(rt.cache) == 3 and rt.cache.bytes == 3 * one
    hits = rt.cache.hits
    rt.encode(EncodeRequest(prompt=["prompt 0"], do_classifier_free_guidance=False))  # evicted: a miss
    rt.encode(EncodeRequest(prompt=["prompt 5"], do_classifier_free_guidance=False))  # recent: a hit
    assert rt.cache.hits - hits == 1
    rt.close()

    off = TextEncoderRuntime(settings.model_copy(update={"embedding_cache_bytes": 0}))
    off.load()
    off.encode(EncodeRequest(prompt=["x"]))
    off.encode(EncodeRequest(prompt=["x"]))
    assert len(off.cache) == 0 and off.cache.hits == 0
    off.close()


def test_cache_and_batcher_counters_are_on_metrics(settings, te_runtime, unet_runtime, embeds) -> None:  # type: ignore[no-untyped-def]
    from text_encoder.app import build_app as te_app

    with TestClient(te_app(settings, te_runtime)) as client:
        body = wire.encode(EncodeRequest(prompt=["metrics prompt"]).to_wire())
        for _ in range(2):
            assert client.post("/v1/encode", content=body, headers={"content-type": wire.CONTENT_TYPE}).is_success
        text = client.get("/metrics").text
    hits = [line for line in text.splitlines() if line.startswith("triptych_embedding_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) >= 2
    with TestClient(unet_app(settings, unet_runtime)) as client:
        assert "triptych_unet_forwards_total" in client.get("/metrics").text


# ------------------------------------------------------------------------------------------- performance settings
def test_channels_last_stays_within_two_levels(settings, unet_runtime, vae_runtime, embeds) -> None:  # type: ignore[no-untyped-def]
    from vae_decoder.runtime import VaeRuntime

    cl = settings.model_copy(update={"channels_last": True})
    unet, vae = UNetRuntime(cl), VaeRuntime(cl)
    unet.load()
    vae.load()
    try:
        conv = unet.variants["base"].unet.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
        req = request(embeds, steps=4, seed=3)
        ours = vae.decode(DecodeRequest(latents=unet.denoise(req).latents)).images.numpy().astype(np.int16)
        ref = pixels(vae_runtime, unet_runtime.denoise(req).latents)
        assert int(np.abs(ours - ref).max()) <= 2
    finally:
        unet.close()
        vae.close()


def test_compile_and_thread_settings_are_applied(settings, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """torch.compile itself takes minutes on a 2-core CPU; here we check it wraps the UNet that is served."""
    compiled: list[object] = []

    def fake_compile(module):  # type: ignore[no-untyped-def]
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    threads = torch.get_num_threads()
    rt = UNetRuntime(settings.model_copy(update={"compile": True, "cpu_threads": 1}))
    try:
        rt.load()
        assert compiled == [rt.variants["base"].unet]
        assert torch.get_num_threads() == 1
    finally:
        rt.close()
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- micro-batching
def test_concurrent_decodes_share_one_vae_forward(vae_runtime) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    latents = [torch.randn(n, 4, 8, 8) for n in (1, 2, 1)]
    solo = [vae_runtime.decode_batch([DecodeRequest(latents=x)])[0].images for x in latents]
    batcher = vae_runtime.decode_batcher
    gate = threading.Event()
    original = batcher._run_batch

    def held(requests):  # type: ignore[no-untyped-def]
        gate.wait(30)  # hold the first batch so the others queue up behind it
        return original(requests)

    batcher._run_batch = held
    try:
        batches, largest = batcher.batches, batcher.largest_batch
        batcher.largest_batch = 0
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(vae_runtime.decode, DecodeRequest(latents=latents[0]))]
            wait_until(lambda: batcher.batches > batches)  # the first is taken (and held at the gate)
            futures += [pool.submit(vae_runtime.decode, DecodeRequest(latents=x)) for x in latents]
            wait_until(lambda: len(batcher._pending) == 3)
            gate.set()
            results = [f.result(timeout=60).images for f in futures]
    finally:
        batcher._run_batch = original
    assert batcher.batches - batches == 2 and batcher.largest_batch == 3  # 1 held, then the 3 waiting together
    for got, want in zip(results[1:], solo, strict=True):
        assert got.shape == want.shape
        assert int((got.to(torch.int16) - want.to(torch.int16)).abs().max()) <= 2
    batcher.largest_batch = max(largest, batcher.largest_batch)


def test_concurrent_encodes_are_batched_and_a_bad_one_fails_alone(te_runtime) -> None:  # type: ignore[no-untyped-def]
    batcher = te_runtime.batcher
    batches = batcher.batches
    gate = threading.Event()
    original = te_runtime._embed
    boom = te_runtime.plan("boom")

    def held(plans, state):  # type: ignore[no-untyped-def]
        gate.wait(30)
        if boom in plans:
            raise ValueError("boom")
        return original(plans, state)

    te_runtime._embed = held
    try:
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(te_runtime.encode, EncodeRequest(prompt=["batch a"]))
            wait_until(lambda: batcher.batches > batches)
            rest = [
                pool.submit(te_runtime.encode, EncodeRequest(prompt=[p], do_classifier_free_guidance=g))
                for p, g in (("batch b", True), ("boom", False), ("batch c", False))
            ]
            wait_until(lambda: len(batcher._pending) == 3)
            gate.set()
            assert first.result(timeout=60).prompt_embeds.shape == (1, 77, 32)
            b, bad, c = rest
            assert b.result(timeout=60).negative_prompt_embeds is not None
            assert c.result(timeout=60).negative_prompt_embeds is None
            with pytest.raises(ValueError, match="boom"):
                bad.result(timeout=60)
    finally:
        te_runtime._embed = original
    alone = te_runtime.encode(EncodeRequest(prompt=["batch c"], do_classifier_free_guidance=False))
    assert torch.equal(alone.prompt_embeds, c.result().prompt_embeds)
