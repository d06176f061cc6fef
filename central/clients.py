"""Typed stage clients over one interface with two transports: HTTP (msgpack) or in-process.

``TextEncoderClient``, ``UNetClient`` and ``VaeClient`` are what central and the Python client use. Each
wraps a ``Transport``:

* ``HttpTransport`` POSTs msgpack to a stage service with an explicit timeout per hop. Whatever goes wrong
  on the way becomes one of our errors: connection refused -> 503 ``StageUnavailable``, hop too slow -> 504
  ``StageTimeout``, garbage or a 5xx -> 502 ``StageBadResponse``; a stage's 413/422/429 is relayed as is.
* ``LocalTransport`` calls a stage runtime in this process (on the runtime's own model thread).

Every call names its operation (``shared.operations``): the path and the timeout come from there. This module
depends on the contract only (wire, protocol, operations, errors, tracing), never on a stage server.

HTTP goes through aiohttp rather than httpx: on the 2-core machine of docs/benchmarks.md an httpx round trip
cost 1.7 ms with an empty body and 4.5 ms with a 473 KB reply (SD-1.5's embeddings) against 0.7 ms for
both with aiohttp, and central makes three such round trips per image.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import aiohttp

from shared import wire
from shared.errors import (
    StageBadResponse,
    StageRefused,
    StageTimeout,
    StageUnavailable,
    TriptychError,
    UpstreamClientError,
)
from shared.operations import DECODE, DENOISE, ENCODE, ENCODE_IMAGE, Operation, StageName
from shared.protocol import (
    DecodeRequest,
    DecodeResponse,
    DenoiseRequest,
    DenoiseResponse,
    EncodeImageRequest,
    EncodeImageResponse,
    EncodeRequest,
    EncodeResponse,
    StageInfo,
    StageRequest,
    WireModel,
    parse_message,
)
from shared.settings import Settings
from shared.tracing import outgoing_headers

Req = TypeVar("Req", bound=StageRequest)
Resp = TypeVar("Resp", bound=WireModel)
T = TypeVar("T")

log = logging.getLogger("triptych.clients")

# A stage's own 4xx that says something about the user's request (an unknown LoRA is a 404); relayed to the
# caller unchanged.
RELAYED_STATUSES = {404, 413, 422, 429}
# Idle pooled connections are dropped after this long: below the services' own keep-alive
# (shared.serving.server.KEEP_ALIVE_S, 75 s), so central does not reuse a connection the stage is closing at
# that moment (with uvicorn's default 5 s the race showed up as a 503 under load). It is long enough that a
# connection outlives a whole generation: reconnecting for each hop cost ~1 ms per hop in the benchmark.
KEEPALIVE_S = 60.0
# A connection the stage closes this soon after the request was sent is retried once (see _aiohttp_exchange).
RETRY_WINDOW_S = 1.0


class Transport(Protocol):
    """How a client reaches one stage."""

    @property
    def stage(self) -> str: ...

    async def call(self, op: Operation[Req, Resp], request: Req, on_progress: Progress | None = None) -> Resp: ...

    async def info(self) -> StageInfo: ...

    async def aclose(self) -> None: ...


@dataclass
class HttpReply:
    """One stage answer: status, headers (lower-case names) and the whole body."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def media_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()


# (method, url, body, headers, timeout_s) -> reply. aiohttp by default; tests pass a stage app double.
Exchange = Callable[[str, str, bytes | None, dict[str, str], float], Awaitable[HttpReply]]
# A stage's progress events (the UNet: {"step", "steps", "preview"?}), called on central's event loop.
Progress = Callable[[dict[str, Any]], None]
# (stage, op, status or "timeout" / "unreachable" / "bad_response", seconds): central's hop metric.
HopObserver = Callable[[str, str, int | str, float], None]


class HttpTransport:
    """A stage service over HTTP: one pooled aiohttp session per stage, each operation with the timeout its
    declaration names (``Operation.timeout`` of ``settings``)."""

    def __init__(
        self,
        stage: StageName,
        base_url: str,
        settings: Settings,
        *,
        limits: wire.Limits = wire.DEFAULT_LIMITS,
        exchange: Exchange | None = None,
        on_hop: HopObserver | None = None,
        host_header: str | None = None,
    ) -> None:
        self.stage = stage
        self.base_url = base_url.rstrip("/")
        self._host = host_header  # a replica reached by its address still gets the service's name as Host
        self._settings = settings
        self._token = settings.stage_token.get_secret_value()  # sent to the stage when set (SPEC §13)
        self._connect = settings.connect_timeout_s
        self._info_timeout = settings.info_timeout_s
        self._limits = limits
        self._exchange: Exchange = exchange or self._aiohttp_exchange
        self.on_hop = on_hop
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ aiohttp
    def _client(self) -> aiohttp.ClientSession:
        """The session of the running event loop (made on first use: aiohttp binds a session to its loop)."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=KEEPALIVE_S),
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
            self._session_loop = loop
        return self._session

    async def _aiohttp_exchange(
        self, method: str, url: str, body: bytes | None, headers: dict[str, str], timeout_s: float
    ) -> HttpReply:
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(self._connect, timeout_s))
        sent = time.perf_counter()
        try:
            return await self._request(method, url, body, headers, timeout)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            # The stage closed the connection before answering, at once: most often a pooled keep-alive
            # connection it was closing just then. Stage operations are pure functions of their message, so
            # sending it again is safe. Not when the connection could not be made at all, nor when the stage
            # died after working on it for a while (it would only die again): those are 503 now.
            if isinstance(exc, aiohttp.ClientConnectorError) or time.perf_counter() - sent > RETRY_WINDOW_S:
                raise
            first = exc
        try:
            return await self._request(method, url, body, headers, timeout)
        except aiohttp.ClientConnectorError:
            # The stage is gone now: it may have died working on the first attempt, so this is not a call it
            # never took (StageRefused) but the first attempt's lost connection.
            raise first from None

    async def _request(
        self, method: str, url: str, body: bytes | None, headers: dict[str, str], timeout: aiohttp.ClientTimeout
    ) -> HttpReply:
        async with self._client().request(method, url, data=body, headers=headers, timeout=timeout) as r:
            return HttpReply(r.status, {k.lower(): v for k, v in r.headers.items()}, await self._read(r))

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        """The body, refused (502) as soon as it is known to exceed the wire limit."""
        limit = self._limits.max_body_bytes
        declared = response.content_length
        if declared is not None and declared > limit:
            raise StageBadResponse(f"{self.stage} answered with {declared} bytes; at most {limit} are accepted")
        if declared is not None:
            return await response.read()
        chunks, size = [], 0
        async for chunk in response.content.iter_chunked(1 << 20):
            size += len(chunk)
            if size > limit:
                raise StageBadResponse(f"{self.stage} answered with more than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    # ------------------------------------------------------------------ one hop
    def _headers(self, accept: str, body: bytes | None) -> dict[str, str]:
        headers = {"accept": accept, **outgoing_headers()}
        if self._token:
            headers["authorization"] = f"Bearer {self._token}"
        if self._host:
            headers["host"] = self._host
        if body is not None:
            headers["content-type"] = wire.CONTENT_TYPE
        return headers

    async def _send(self, op: str, method: str, path: str, timeout_s: float, body: bytes | None = None) -> HttpReply:
        accept = wire.CONTENT_TYPE if body is not None else "application/json"
        exchange = self._exchange(method, self.base_url + path, body, self._headers(accept, body), timeout_s)
        return await self._guarded(op, path, timeout_s, exchange)

    async def _guarded(self, op: str, path: str, timeout_s: float, exchange: Awaitable[T]) -> T:
        """``exchange`` with every transport failure turned into one of our errors, and the hop observed."""
        start = time.perf_counter()
        status: int | str = "unreachable"
        try:
            result = await exchange
            status = result.status if isinstance(result, HttpReply) else 200
            return result
        except TriptychError:
            status = "bad_response"
            raise
        except aiohttp.ConnectionTimeoutError:
            # The stage's address goes to the log, not to the caller (internal URLs are not public).
            log.debug("%s at %s did not accept a connection in time", self.stage, self.base_url)
            raise StageRefused(f"{self.stage} did not accept a connection in time") from None
        except TimeoutError:  # asyncio's total timeout and aiohttp's socket read timeout both derive from it
            status = "timeout"
            raise StageTimeout(f"{self.stage} did not answer {path} within {timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            log.debug("%s at %s is unreachable: %s", self.stage, self.base_url, exc)
            # No connection: nothing was sent. A connection lost after sending: the stage may have worked on it.
            error = StageRefused if isinstance(exc, aiohttp.ClientConnectorError) else StageUnavailable
            raise error(f"{self.stage} is unreachable ({type(exc).__name__})") from None
        finally:
            if self.on_hop is not None:
                self.on_hop(self.stage, op, status, time.perf_counter() - start)

    def _raise_for_status(self, reply: HttpReply, path: str) -> None:
        status = reply.status
        if 200 <= status < 300:
            return
        err: dict[str, Any] = {}
        try:
            body = json.loads(reply.body)
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                err = body["error"]
        except ValueError:
            pass
        message = str(err.get("message") or f"HTTP {status}")
        headers = {"Retry-After": reply.headers["retry-after"]} if "retry-after" in reply.headers else {}
        if status == 429 and not err:
            # A bare 429 (a proxy in front of the stage, say) is still backpressure, not a broken stage.
            raise UpstreamClientError(429, "overloaded", f"{self.stage} is overloaded", None, headers)
        if status in RELAYED_STATUSES and err:
            raise UpstreamClientError(status, str(err.get("type", "invalid_value")), message, err.get("param"), headers)
        if status == 503:
            # A stage answers 503 only for work it did not (or no longer will) compute: loading, draining.
            raise StageRefused(f"{self.stage} is unavailable: {message}", headers=headers)
        if status == 504:
            raise StageTimeout(f"{self.stage} timed out: {message}")
        raise StageBadResponse(f"{self.stage} answered {path} with HTTP {status}: {message}")

    async def call(self, op: Operation[Req, Resp], request: Req, on_progress: Progress | None = None) -> Resp:
        path = op.path
        if on_progress is not None:
            return await self._streamed(op, request, on_progress)
        reply = await self._send(op.name, "POST", path, op.timeout(self._settings), wire.encode(request.to_wire()))
        self._raise_for_status(reply, path)
        if reply.media_type != wire.CONTENT_TYPE:
            raise StageBadResponse(f"{self.stage} answered {path} with a non-msgpack body")
        try:
            return parse_message(reply.body, op.response, self._limits)
        except TriptychError as exc:
            raise StageBadResponse(f"{self.stage} answered {path} with an invalid message: {exc.message}") from None

    async def _streamed(self, op: Operation[Req, Resp], request: Req, on_progress: Progress) -> Resp:
        """``op`` with its answer streamed (``wire.STREAM_CONTENT_TYPE``): progress frames go to ``on_progress``
        as they arrive, the result frame is the answer. Cancelling this call closes the connection, and the
        stage abandons the work (the UNet before its next step)."""
        body = wire.encode(request.to_wire())
        headers = self._headers(wire.STREAM_CONTENT_TYPE, body)
        timeout_s = op.timeout(self._settings)
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(self._connect, timeout_s))

        async def exchange() -> Resp:
            url = self.base_url + op.path
            async with self._client().post(url, data=body, headers=headers, timeout=timeout) as r:
                media = r.headers.get("content-type", "").split(";")[0].strip().lower()
                if r.status != 200 or media != wire.STREAM_CONTENT_TYPE:
                    reply = HttpReply(r.status, {k.lower(): v for k, v in r.headers.items()}, await self._read(r))
                    self._raise_for_status(reply, op.path)
                    raise StageBadResponse(f"{self.stage} answered {op.path} with {media or 'no'} content type")
                reader = wire.FrameReader(self._limits)
                async for chunk in r.content.iter_any():
                    try:
                        frames = reader.feed(chunk)
                    except wire.WireError as exc:
                        raise StageBadResponse(f"{self.stage} streamed an invalid frame: {exc}") from None
                    for frame in frames:
                        result = self._frame(op, frame, on_progress)
                        if result is not None:
                            return result
            raise StageBadResponse(f"{self.stage}'s stream for {op.path} ended without a result")

        return await self._guarded(op.name, op.path, timeout_s, exchange())

    def _frame(self, op: Operation[Req, Resp], frame: Any, on_progress: Progress) -> Resp | None:
        """One frame of a streamed answer: progress (handed on), the result, or the stage's error (raised)."""
        event = frame.get("event") if isinstance(frame, dict) else None
        if event == "progress":
            on_progress({k: v for k, v in frame.items() if k != "event"})
            return None
        if event == "result" and isinstance(frame.get("message"), dict):
            try:
                return op.response.model_validate(frame["message"])
            except ValueError as exc:
                raise StageBadResponse(f"{self.stage} streamed an invalid result: {exc}") from None
        if event == "error" and isinstance(frame.get("status"), int):
            envelope = {"error": frame.get("error")}
            self._raise_for_status(HttpReply(frame["status"], {}, json.dumps(envelope).encode()), op.path)
        raise StageBadResponse(f"{self.stage} streamed an unknown frame ({str(event)[:40]!r})")

    async def info(self) -> StageInfo:
        reply = await self._send("info", "GET", "/v1/info", self._info_timeout)
        self._raise_for_status(reply, "/v1/info")
        try:
            return StageInfo.model_validate_json(reply.body)
        except ValueError as exc:
            raise StageBadResponse(f"{self.stage} answered /v1/info with an invalid body: {exc}") from None

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None


class LocalStage(Protocol):
    """What ``LocalTransport`` needs of a stage runtime loaded in this process (``shared.serving.runtime``)."""

    @property
    def stage(self) -> str: ...

    @property
    def ready(self) -> bool: ...

    async def load_async(self) -> None: ...

    async def call(
        self, op: Operation[Req, Resp], message: Req, on_progress: Callable[[dict[str, Any]], None] | None = None
    ) -> Resp: ...

    def info(self) -> StageInfo: ...

    def close(self) -> None: ...


class LocalTransport:
    """A stage runtime in this process: same messages, no serialisation, no network."""

    def __init__(self, runtime: LocalStage, *, owned: bool = False) -> None:
        self.runtime = runtime
        self.stage = runtime.stage
        self._owned = owned

    async def call(self, op: Operation[Req, Resp], request: Req, on_progress: Progress | None = None) -> Resp:
        listener = None
        if on_progress is not None:
            loop = asyncio.get_running_loop()

            def listener(event: dict[str, Any]) -> None:  # on the model thread: hand over to the event loop
                loop.call_soon_threadsafe(on_progress, event)

        result = await self.runtime.call(op, request, listener)
        if not isinstance(result, op.response):
            raise StageBadResponse(f"{self.stage}.{op.name} returned {type(result).__name__}")
        return result

    async def info(self) -> StageInfo:
        return self.runtime.info()

    async def aclose(self) -> None:
        if self._owned:  # a runtime handed in by the caller stays the caller's to close
            self.runtime.close()


class StageClient:
    """Base of the typed clients: holds the transport, and whether the stage was last found unreachable."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        #: When a call or info last failed with StageUnavailable (None: the last one answered).
        self.down_since: float | None = None

    async def info(self) -> StageInfo:
        return await self._watched(self.transport.info())

    async def ensure_up(self) -> None:
        """Fail fast: a stage last found unreachable is asked for its info again before a request spends work
        in the other stages (a dead VAE must not cost a whole denoise first). A stage that answers is up."""
        if self.down_since is not None:
            await self.info()

    async def _call(self, op: Operation[Req, Resp], request: Req, on_progress: Progress | None = None) -> Resp:
        return await self._watched(self.transport.call(op, request, on_progress))

    async def _watched(self, call: Awaitable[T]) -> T:
        try:
            result = await call
        except StageUnavailable:
            self.down_since = self.down_since or time.monotonic()
            raise
        self.down_since = None
        return result

    async def aclose(self) -> None:
        await self.transport.aclose()


class TextEncoderClient(StageClient):
    async def encode(self, request: EncodeRequest) -> EncodeResponse:
        return await self._call(ENCODE, request)


class UNetClient(StageClient):
    async def denoise(self, request: DenoiseRequest, on_progress: Progress | None = None) -> DenoiseResponse:
        """The denoise loop; with ``on_progress``, its events after every step (and ``preview`` tensors every
        ``request.preview_every`` steps) as they happen."""
        return await self._call(DENOISE, request, on_progress)


class VaeClient(StageClient):
    async def decode(self, request: DecodeRequest) -> DecodeResponse:
        return await self._call(DECODE, request)

    async def encode_image(self, request: EncodeImageRequest) -> EncodeImageResponse:
        return await self._call(ENCODE_IMAGE, request)
