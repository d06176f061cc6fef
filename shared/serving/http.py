"""HTTP plumbing every Triptych server shares (central included): bounded bodies, msgpack replies, and
abandoning work whose caller hung up."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel

from shared import wire
from shared.errors import (
    MalformedRequest,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
    error_response,
)
from shared.protocol import parse_message
from shared.serving.middleware import PROBE_PATHS

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
log = logging.getLogger("triptych.http")
DISCONNECT_POLL_S = 0.25


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > max_bytes:
                raise PayloadTooLarge(f"body is {declared} bytes; at most {max_bytes} are allowed")
        except ValueError:
            raise MalformedRequest("Content-Length is not a number") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"body exceeds {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class BodyTimeout:
    """ASGI middleware: a request body must arrive within ``timeout_s`` of the request's start, whatever its
    size, or the read fails with 408 (the envelope, through the app's error handlers) and the connection is
    freed. Without it, a client announcing 100 kB and sending 10 bytes holds a connection for minutes. Only
    the body is timed: after its last chunk, ``receive`` (disconnect polling) waits as long as it likes."""

    def __init__(self, app: Any, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        complete = False

        async def timed_receive() -> Any:
            nonlocal complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                raise RequestTimeout(
                    f"the request body did not arrive within {self.timeout_s:g} s (TRIPTYCH_BODY_TIMEOUT_S)"
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        await self.app(scope, timed_receive, send)


@dataclass
class Slots:
    """The state of a ``ConnectionCap``: kept on ``app.state.connection_cap`` (metrics, tests)."""

    limit: int
    in_progress: int = 0


class ConnectionCap:
    """ASGI middleware: at most ``slots.limit`` requests in progress at once, counted from their headers (so a
    client still sending its body holds a slot until it finishes or ``BodyTimeout`` frees it). Past the limit a
    request gets 429 with ``Retry-After`` at once, before its body is read; the probes (``/healthz``,
    ``/readyz``, ``/metrics``) always pass so an orchestrator does not restart a service for being busy. It sits
    in front of everything else, so a flood is refused before keys are compared or routes run.

    The sockets themselves are bounded by uvicorn's ``limit_concurrency`` (``serve``: the limit + 64), whose
    plain-text 503 is reached only when this cap did not see the requests (idle keep-alive connections)."""

    def __init__(self, app: Any, slots: Slots) -> None:
        self.app = app
        self.slots = slots

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        slots = self.slots
        if slots.in_progress >= slots.limit:
            refusal = Overloaded(f"more than {slots.limit} requests at once (TRIPTYCH_MAX_CONNECTIONS); retry later")
            await error_response(refusal)(scope, receive, send)
            return
        slots.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            slots.in_progress -= 1


def install_connection_cap(app: FastAPI, limit: int) -> None:
    """Put a ``ConnectionCap`` of ``limit`` in front of ``app`` (call it after every other middleware) and tell
    ``shared.serving.server.serve`` the limit (uvicorn's socket bound derives from it)."""
    app.state.connection_cap = Slots(limit)
    app.add_middleware(ConnectionCap, slots=app.state.connection_cap)


async def read_message(request: Request, model: type[M], limits: wire.Limits) -> M:
    """A msgpack request body as a validated ``model`` (415 for another content type)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != wire.CONTENT_TYPE:
        raise UnsupportedMediaType(f"Content-Type must be {wire.CONTENT_TYPE}, got {content_type or 'none'}")
    return parse_message(await read_body(request, limits.max_body_bytes), model, limits)


class MsgpackResponse(Response):
    media_type = wire.CONTENT_TYPE

    def render(self, content: Any) -> bytes:
        return wire.encode(content)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await ``work`` while checking every DISCONNECT_POLL_S that the caller is still connected. If it has gone
    (a client hung up, central timed out), cancel the work and return None: a stage drops queued work and the
    UNet batcher a running job before its next step; in central, cancelling closes the hop's connection, so
    the stage working on it stops too."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                log.info("%s: caller disconnected; request abandoned", request.url.path)
                return None
    except asyncio.CancelledError:  # this request itself was cancelled (server shutting down)
        task.cancel()
        raise
    return task.result()
