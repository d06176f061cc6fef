"""Assertions and doubles shared by the API test modules."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import PIL.Image
import torch

from central.clients import Exchange, HttpReply, LocalTransport, TextEncoderClient, UNetClient, VaeClient
from central.pipeline import Orchestrator
from shared.settings import Settings

ENVELOPE_KEYS = {"type", "message", "param"}


# ------------------------------------------------------------------------------------------- images and pixels
def png_b64(image: PIL.Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode_all(response: Any) -> np.ndarray:
    """The images of a 200 JSON task response, uint8 (B, H, W, 3)."""
    assert response.status_code == 200, response.text
    return np.stack([np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(b)))) for b in response.json()["images"]])


def pipeline_pixels(out: Any) -> np.ndarray:
    """A diffusers pipeline output (``output_type="pil"``) as uint8 (B, H, W, 3)."""
    return np.stack([np.asarray(im) for im in out.images])


def gens(seed: int, n: int) -> list[torch.Generator]:
    """One CPU generator per image, seeds ``seed + i`` (SPEC §8)."""
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


LEAKS = ("Traceback", "/work/", "site-packages", 'File "', '.py", line')


def assert_no_leak(text: str) -> None:
    for marker in LEAKS:
        assert marker not in text, f"response leaks {marker!r}: {text[:500]}"


def assert_envelope(response: Any, status: int, *, type_: str | None = None, param: Any = ...) -> dict[str, Any]:
    """The response is the SPEC §7 envelope with ``status``; returns the inner error object."""
    text = response.text
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {text[:600]}"
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == ENVELOPE_KEYS, err
    assert isinstance(err["type"], str) and err["type"]
    assert isinstance(err["message"], str) and err["message"]
    assert err["param"] is None or isinstance(err["param"], str)
    if type_ is not None:
        assert err["type"] == type_, err
    if param is not ...:
        assert err["param"] == param, err
    assert_no_leak(text)
    return err


def asgi_exchange(app: Any) -> Exchange:
    """An ``HttpTransport`` exchange that hands each request to ``app`` in this process (through httpx's
    ASGI transport): the stage's real middleware, routes and msgpack handling, without a socket."""
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))

    async def exchange(
        method: str, url: str, body: bytes | None, headers: dict[str, str], timeout_s: float
    ) -> HttpReply:
        r = await client.request(method, url, content=body, headers=headers, timeout=timeout_s)
        return HttpReply(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content)

    return exchange


def local_orchestrator(settings: Settings, te: Any, unet: Any, vae: Any) -> Orchestrator:
    """Central's orchestrator with all three stages in this process (runtimes the caller owns)."""
    return Orchestrator(
        TextEncoderClient(LocalTransport(te)),
        UNetClient(LocalTransport(unet)),
        VaeClient(LocalTransport(vae)),
        settings,
    )


def wire_orchestrator(settings: Settings, te: Any, unet: Any, vae: Any) -> Orchestrator:
    """Central's orchestrator calling the three stages' real apps through the msgpack wire, in this process:
    every tensor crosses the codec as it does between services."""
    from central.clients import HttpTransport
    from diffusion_unet.app import build_app as unet_app
    from text_encoder.app import build_app as te_app
    from vae_decoder.app import build_app as vae_app

    def transport(stage: Any, app: Any) -> HttpTransport:
        return HttpTransport(stage, f"http://{stage}", settings, exchange=asgi_exchange(app))

    return Orchestrator(
        TextEncoderClient(transport("text_encoder", te_app(settings, te))),
        UNetClient(transport("diffusion_unet", unet_app(settings, unet))),
        VaeClient(transport("vae_decoder", vae_app(settings, vae))),
        settings,
    )


def load_runtimes(settings: Settings) -> dict[str, Any]:
    """The three stage runtimes, each loaded on its own model thread (where ``cpu_threads`` applies)."""
    from diffusion_unet.runtime import UNetRuntime
    from text_encoder.runtime import TextEncoderRuntime
    from vae_decoder.runtime import VaeRuntime

    runtimes = {"te": TextEncoderRuntime(settings), "unet": UNetRuntime(settings), "vae": VaeRuntime(settings)}
    for rt in runtimes.values():
        asyncio.run(rt.load_async())
    return runtimes


def step_together(unet: Any, reqs: list[Any]) -> list[Any]:
    """Every request's denoise job stepped together (one UNet forward per step for all still running) on this
    thread, as the UNet batcher would: for tests that need batches of a known make-up (the model thread is
    idle between tests). Returns the finished jobs."""
    from diffusion_unet.denoise import step

    with torch.inference_mode():
        jobs = [unet.prepare(r) for r in reqs]
        while running := [j for j in jobs if not j.done]:
            step(running)
        return jobs


@contextlib.contextmanager
def counted_forwards(module: torch.nn.Module) -> Iterator[dict[str, int]]:
    """Counts ``module``'s forwards inside the block (``n``) and the most rows one of them had (``rows``)."""
    calls = {"n": 0, "rows": 0}

    def count(_module: Any, args: tuple[Any, ...]) -> None:
        calls.update(n=calls["n"] + 1, rows=max(calls["rows"], int(args[0].shape[0])))

    hook = module.register_forward_pre_hook(count)
    try:
        yield calls
    finally:
        hook.remove()


def latent_pixels(vae_runtime: Any, latents: torch.Tensor) -> np.ndarray:
    """Latents decoded by the VAE stage's runtime, as int16 pixels (to subtract)."""
    from shared.protocol import DecodeRequest

    return vae_runtime.decode(DecodeRequest(latents=latents)).images.numpy().astype(np.int16)


@contextlib.contextmanager
def serving_in_thread(app: Any) -> Iterator[int]:
    """``app`` under a real uvicorn server in a thread on a free loopback port (for clients that speak HTTP
    only, like ``webuiapi`` and ``openai``); yields the port, stops the server on exit."""
    import threading
    import time

    import uvicorn

    from tests.conftest import free_port_block

    port = free_port_block(1)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(20)
