"""Typed stage clients over one interface with two transports: HTTP (msgpack) or in-process.

``TextEncoderClient``, ``UNetClient`` and ``VaeClient`` are what central and the Python client use. Each
wraps a ``Transport``:

* ``HttpTransport`` POSTs msgpack to a stage service with an explicit timeout per hop. Whatever goes wrong
  on the way becomes one of our errors: connection refused -> 503 ``StageUnavailable``, hop too slow -> 504
  ``StageTimeout``, garbage or a 5xx -> 502 ``StageBadResponse``; a stage's 413/422/429 is relayed as is.
* ``LocalTransport`` calls a ``StageRuntime`` in this process on the runtime's own torch thread.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

import httpx

from shared import wire
from shared.errors import (
    StageBadResponse,
    StageTimeout,
    StageUnavailable,
    TriptychError,
    UpstreamClientError,
)
from shared.observability import trace_event_hooks
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
    WireModel,
)
from shared.runtime import StageRuntime
from shared.stage_app import parse_message

R = TypeVar("R", bound=WireModel)

# A stage's own 4xx that says something about the user's request; relayed to the caller unchanged.
RELAYED_STATUSES = {413, 422, 429}


class Transport(Protocol):
    """How a client reaches one stage."""

    stage: str

    async def call(self, op: str, request: WireModel, response_type: type[R]) -> R: ...

    async def info(self) -> StageInfo: ...

    async def aclose(self) -> None: ...


class HttpTransport:
    """A stage service over HTTP. One pooled ``httpx.AsyncClient`` per stage; timeouts are per operation."""

    def __init__(
        self,
        stage: str,
        base_url: str,
        *,
        op_timeouts_s: dict[str, float],
        connect_timeout_s: float = 5.0,
        info_timeout_s: float = 5.0,
        limits: wire.Limits = wire.DEFAULT_LIMITS,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.stage = stage
        self.base_url = base_url
        self._op_timeouts = op_timeouts_s
        self._connect = connect_timeout_s
        self._info_timeout = info_timeout_s
        self._limits = limits
        self._client = httpx.AsyncClient(
            base_url=base_url,
            transport=transport,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
            event_hooks=trace_event_hooks(stage),  # X-Request-ID + traceparent on every hop; hop timings
        )

    def _timeout(self, seconds: float) -> httpx.Timeout:
        return httpx.Timeout(seconds, connect=min(self._connect, seconds))

    async def _send(self, method: str, path: str, timeout_s: float, **kwargs: Any) -> httpx.Response:
        try:
            return await self._client.request(method, path, timeout=self._timeout(timeout_s), **kwargs)
        except httpx.ConnectTimeout:
            raise StageUnavailable(f"{self.stage} at {self.base_url} did not accept a connection in time") from None
        except httpx.TimeoutException:
            raise StageTimeout(f"{self.stage} did not answer {path} within {timeout_s:g} s") from None
        except httpx.TransportError as exc:
            raise StageUnavailable(f"{self.stage} at {self.base_url} is unreachable ({type(exc).__name__})") from None

    def _raise_for_status(self, response: httpx.Response, path: str) -> None:
        if response.is_success:
            return
        status = response.status_code
        err: dict[str, Any] = {}
        try:
            body = response.json()
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                err = body["error"]
        except ValueError:
            pass
        message = str(err.get("message") or f"HTTP {status}")
        headers = {"Retry-After": response.headers["retry-after"]} if "retry-after" in response.headers else {}
        if status == 429 and not err:
            # A bare 429 (a proxy in front of the stage, say) is still backpressure, not a broken stage.
            raise UpstreamClientError(429, "overloaded", f"{self.stage} is overloaded", None, headers)
        if status in RELAYED_STATUSES and err:
            raise UpstreamClientError(status, str(err.get("type", "invalid_value")), message, err.get("param"), headers)
        if status == 503:
            raise StageUnavailable(f"{self.stage} is unavailable: {message}", headers=headers)
        if status == 504:
            raise StageTimeout(f"{self.stage} timed out: {message}")
        raise StageBadResponse(f"{self.stage} answered {path} with HTTP {status}: {message}")

    async def call(self, op: str, request: WireModel, response_type: type[R]) -> R:
        path = "/v1/" + op.replace("_", "-")  # runtime method encode_image <-> route /v1/encode-image
        response = await self._send(
            "POST",
            path,
            self._op_timeouts.get(op, max(self._op_timeouts.values(), default=60.0)),
            content=wire.encode(request.to_wire()),
            headers={"content-type": wire.CONTENT_TYPE, "accept": wire.CONTENT_TYPE},
        )
        self._raise_for_status(response, path)
        if response.headers.get("content-type", "").split(";")[0] != wire.CONTENT_TYPE:
            raise StageBadResponse(f"{self.stage} answered {path} with a non-msgpack body")
        try:
            return parse_message(response.content, response_type, self._limits)
        except TriptychError as exc:
            raise StageBadResponse(f"{self.stage} answered {path} with an invalid message: {exc.message}") from None

    async def info(self) -> StageInfo:
        response = await self._send("GET", "/v1/info", self._info_timeout)
        self._raise_for_status(response, "/v1/info")
        try:
            return StageInfo.model_validate(response.json())
        except ValueError as exc:
            raise StageBadResponse(f"{self.stage} answered /v1/info with an invalid body: {exc}") from None

    async def aclose(self) -> None:
        await self._client.aclose()


class LocalTransport:
    """A stage runtime in this process: same messages, no serialisation, no network."""

    def __init__(self, runtime: StageRuntime, *, owned: bool = False) -> None:
        self.runtime = runtime
        self.stage = runtime.stage
        self._owned = owned

    async def call(self, op: str, request: WireModel, response_type: type[R]) -> R:
        self.runtime.check_ready()
        result = await self.runtime.run(getattr(self.runtime, op), request)
        if not isinstance(result, response_type):
            raise StageBadResponse(f"{self.stage}.{op} returned {type(result).__name__}")
        return result

    async def info(self) -> StageInfo:
        return self.runtime.info()

    async def aclose(self) -> None:
        if self._owned:  # a runtime handed in by the caller stays the caller's to close
            self.runtime.close()


class StageClient:
    """Base of the typed clients: holds the transport."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    async def info(self) -> StageInfo:
        return await self.transport.info()

    async def aclose(self) -> None:
        await self.transport.aclose()


class TextEncoderClient(StageClient):
    async def encode(self, request: EncodeRequest) -> EncodeResponse:
        return await self.transport.call("encode", request, EncodeResponse)


class UNetClient(StageClient):
    async def denoise(self, request: DenoiseRequest) -> DenoiseResponse:
        return await self.transport.call("denoise", request, DenoiseResponse)


class VaeClient(StageClient):
    async def decode(self, request: DecodeRequest) -> DecodeResponse:
        return await self.transport.call("decode", request, DecodeResponse)

    async def encode_image(self, request: EncodeImageRequest) -> EncodeImageResponse:
        return await self.transport.call("encode_image", request, EncodeImageResponse)
