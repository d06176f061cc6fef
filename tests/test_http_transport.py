"""HttpTransport over real loopback sockets: what aiohttp does when a stage is down, slow, drops the
connection, closes a keep-alive connection under it, or answers too much.

The stage is a scripted raw HTTP/1.1 server (asyncio streams), so each failure is the real one on the wire,
not an exception made up by a test double. tests/test_central_api.py checks how every such failure reaches
central's caller; tests/test_processes.py runs the real stage services.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import torch

from central import clients
from central.clients import HttpTransport, TextEncoderClient
from shared import wire
from shared.errors import StageBadResponse, StageTimeout, StageUnavailable
from shared.protocol import EncodeRequest
from shared.settings import Settings

EMBEDS = {"prompt_embeds": torch.ones(1, 77, 32), "negative_prompt_embeds": torch.zeros(1, 77, 32), "encode_ms": 1.0}
REQUEST = EncodeRequest(prompt=["a fox"], negative_prompt=[""])

Handler = Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes] | None:
    """One HTTP/1.1 request (request line, lower-cased headers, body), or None if the client closed."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    headers = {k.lower(): v for k, v in headers.items()}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return lines[0], headers, body


def reply(status: int, body: bytes, content_type: str = wire.CONTENT_TYPE, extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


class RawStage:
    """A loopback server; ``handler(connection_number, reader, writer)`` scripts each connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str], bytes]] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(self.connections, reader, writer)
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: Any) -> None:
        self.server.close()


def transport(url: str, timeout_s: float = 5.0, **kwargs: Any) -> HttpTransport:
    settings = Settings(encode_timeout_s=timeout_s, connect_timeout_s=2.0)
    return HttpTransport("text_encoder", url, settings, **kwargs)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_good_answer_round_trips_and_carries_msgpack_headers() -> None:
    async def handler(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (req := await read_request(reader)) is not None:
            stage.requests.append(req)
            writer.write(reply(200, wire.encode(EMBEDS)))

    stage = RawStage(handler)

    async def go() -> None:
        async with stage as url:
            t = transport(url)
            for _ in range(3):
                out = await TextEncoderClient(t).encode(REQUEST)
                assert torch.equal(out.prompt_embeds, EMBEDS["prompt_embeds"])
            await t.aclose()

    run(go())
    assert stage.connections == 1, "keep-alive: three calls share one pooled connection"
    line, headers, body = stage.requests[0]
    assert line == "POST /v1/encode HTTP/1.1"
    assert headers["content-type"] == wire.CONTENT_TYPE and headers["accept"] == wire.CONTENT_TYPE
    assert wire.decode(body)["prompt"] == ["a fox"]


def test_connection_refused_is_unavailable() -> None:
    async def go() -> None:
        t = transport(f"http://127.0.0.1:{closed_port()}")
        with pytest.raises(StageUnavailable, match=r"text_encoder .* unreachable"):
            await TextEncoderClient(t).encode(REQUEST)
        await t.aclose()

    run(go())


def test_a_stage_that_never_answers_times_out_at_the_hop_timeout() -> None:
    async def handler(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    async def go() -> float:
        async with RawStage(handler) as url:
            t = transport(url, timeout_s=0.3)
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(StageTimeout, match=r"within 0\.3 s"):
                await TextEncoderClient(t).encode(REQUEST)
            elapsed = loop.time() - start
            await t.aclose()
            return elapsed

    assert run(go()) < 5  # the hop's own timeout, not some default


def test_a_dropped_connection_is_retried_once_then_unavailable() -> None:
    async def handler(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)  # read it, then hang up without a word

    stage = RawStage(handler)

    async def go() -> None:
        async with stage as url:
            t = transport(url)
            with pytest.raises(StageUnavailable, match="ServerDisconnectedError"):
                await TextEncoderClient(t).encode(REQUEST)
            await t.aclose()

    run(go())
    assert stage.connections == 2, "one retry on a fresh connection, not more"


def test_a_stage_that_dies_while_working_is_not_sent_the_request_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a connection closed at once is retried: a stage that crashed on a request would crash again."""
    monkeypatch.setattr(clients, "RETRY_WINDOW_S", 0.1)

    async def handler(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(0.3)  # works on it for a while, then the process dies

    stage = RawStage(handler)

    async def go() -> None:
        async with stage as url:
            t = transport(url)
            with pytest.raises(StageUnavailable):
                await TextEncoderClient(t).encode(REQUEST)
            await t.aclose()

    run(go())
    assert stage.connections == 1


def test_keep_alive_connection_closed_by_the_stage_is_retried_transparently() -> None:
    """The race behind the 503 seen at concurrency 16: the stage times out an idle keep-alive connection at
    the moment central reuses it. Here the first connection answers once, then hangs up on the next request."""

    async def handler(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (req := await read_request(reader)) is not None:
            stage.requests.append(req)
            if n == 1 and len(stage.requests) > 1:
                return  # close without answering the second request on this connection
            writer.write(reply(200, wire.encode(EMBEDS)))
            await writer.drain()

    stage = RawStage(handler)

    async def go() -> None:
        async with stage as url:
            t = transport(url)
            for _ in range(2):
                out = await TextEncoderClient(t).encode(REQUEST)
                assert torch.equal(out.negative_prompt_embeds, EMBEDS["negative_prompt_embeds"])  # type: ignore[arg-type]
            await t.aclose()

    run(go())
    assert stage.connections == 2 and len(stage.requests) == 3


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_oversized_answer_is_refused_as_bad_gateway(chunked: bool) -> None:
    limit = 64 * 1024

    async def handler(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if not chunked:  # declares 1 GB and sends nothing: refused from the header alone
            writer.write(
                f"HTTP/1.1 200 OK\r\ncontent-type: {wire.CONTENT_TYPE}\r\ncontent-length: {10**9}\r\n\r\n".encode()
            )
            await writer.drain()
            await asyncio.sleep(5)
            return
        writer.write(
            f"HTTP/1.1 200 OK\r\ncontent-type: {wire.CONTENT_TYPE}\r\ntransfer-encoding: chunked\r\n\r\n".encode()
        )
        chunk = b"\x00" * 16384
        for _ in range(8):
            writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def go() -> None:
        async with RawStage(handler) as url:
            t = transport(url, limits=wire.Limits(max_body_bytes=limit))
            with pytest.raises(StageBadResponse, match=str(limit)):
                await TextEncoderClient(t).encode(REQUEST)
            await t.aclose()

    run(go())


def test_central_drops_idle_connections_before_the_stages_do() -> None:
    """Otherwise central reuses connections the stage is closing (the keep-alive race above, on every
    request that follows a pause longer than the stage's keep-alive)."""
    from central.clients import KEEPALIVE_S
    from shared.serving.server import KEEP_ALIVE_S

    assert 0 < KEEPALIVE_S < KEEP_ALIVE_S
