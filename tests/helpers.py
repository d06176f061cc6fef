"""Assertions and doubles shared by the API test modules."""

from __future__ import annotations

from typing import Any

import httpx

from central.clients import Exchange, HttpReply, LocalTransport, TextEncoderClient, UNetClient, VaeClient
from central.pipeline import Orchestrator
from shared.settings import Settings

ENVELOPE_KEYS = {"type", "message", "param"}
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
