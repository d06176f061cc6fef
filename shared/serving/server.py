"""Running a service under uvicorn with a graceful drain on SIGTERM / SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from shared.errors import error_envelope

log = logging.getLogger("triptych.server")

# How long an idle HTTP connection stays open (uvicorn's default is 5 s). Central's stage connections
# sit idle for a whole denoise between uses of the text encoder or VAE; a new connection per hop cost ~1 ms.
# Central's client drops its idle connections first (central.clients.KEEPALIVE_S).
KEEP_ALIVE_S = 75
# Sockets uvicorn accepts beyond TRIPTYCH_MAX_CONNECTIONS (idle keep-alive ones, probes) before its plain 503.
CONNECTION_MARGIN = 64


class Lifecycle:
    """Whether the service still takes work, and how much admitted work is still running.

    After ``begin_drain()`` (SIGTERM, through ``serve()``), ``/readyz`` and every request that would start work
    get 503 with the error envelope, ``/healthz`` and ``/metrics`` still answer, and the server exits once the
    work already admitted is done or ``drain_timeout_s`` has passed.
    """

    def __init__(self, service: str, drain_timeout_s: float) -> None:
        self.service = service
        self.drain_timeout_s = drain_timeout_s
        self.in_flight = 0
        self._drain_deadline: float | None = None
        #: Set when the drain times out: requests still running are stopped and answered 503 (the middleware
        #: waits on it beside each admitted request).
        self.expired = asyncio.Event()

    def expire(self) -> None:
        """The drain timed out: stop what is still running (each gets the 503 envelope). On the event loop."""
        self.expired.set()

    def stopped(self, request_id: str) -> Response:
        return JSONResponse(
            status_code=503,
            content=error_envelope(
                "unavailable",
                f"{self.service} is shutting down: this request was stopped at the end of the drain "
                f"({self.drain_timeout_s:g} s); retry (another replica)",
            ),
            headers={"Retry-After": "1", "Connection": "close", "X-Request-ID": request_id},
        )

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    def begin_drain(self) -> None:
        """Stop taking work. Safe to call from a signal handler; a second call changes nothing."""
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + self.drain_timeout_s

    def drained(self) -> bool:
        """True once draining and either every admitted request has finished or the drain timed out."""
        if self._drain_deadline is None:
            return False
        return self.in_flight == 0 or time.monotonic() >= self._drain_deadline

    def refusal(self, request_id: str) -> Response:
        return JSONResponse(
            status_code=503,
            content=error_envelope(
                "unavailable", f"{self.service} is shutting down and takes no new work; retry (another replica)"
            ),
            headers={"Retry-After": "1", "Connection": "close", "X-Request-ID": request_id},
        )


def serve(app: FastAPI, *, host: str, port: int) -> None:
    """Run ``app`` under uvicorn with a graceful drain on SIGTERM / SIGINT.

    First signal: ``/readyz`` and new work answer 503; once admitted requests are done (or after the app's
    drain timeout, ``TRIPTYCH_DRAIN_TIMEOUT_S``) uvicorn shuts down as usual and the process exits 0.
    A second signal stops at once.
    """
    cap = getattr(app.state, "connection_cap", None)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        # The launcher has configured logging (text or JSON, and the levels) for the whole process.
        log_config=None,
        log_level=None,
        access_log=False,  # triptych.access writes one line per request instead
        timeout_keep_alive=KEEP_ALIVE_S,
        timeout_graceful_shutdown=5,  # what is left after the drain: closing idle connections
        # The hard bound on sockets; the app's own ConnectionCap answers 429 envelopes below it.
        limit_concurrency=cap.limit + CONNECTION_MARGIN if cap is not None else None,
    )
    server = DrainingServer(config, getattr(app.state, "lifecycle", None))
    server.run()


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` whose first SIGTERM/SIGINT drains instead of closing the listening socket at once.

    The socket stays open while draining so that requests still routed here (a load balancer that has not
    yet seen the pod leave) get a clean 503 they can retry, rather than a refused connection.
    """

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle | None) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        lc = self.lifecycle
        if lc is None or lc.draining or self.should_exit:
            super().handle_exit(sig, frame)  # no drain support, or a second signal: stop now
            return
        lc.begin_drain()
        log.warning(
            "%s: %s received; draining %d in-flight request(s) for up to %.0f s",
            lc.service,
            signal.Signals(sig).name,
            lc.in_flight,
            lc.drain_timeout_s,
        )

    async def on_tick(self, counter: int) -> bool:
        lc = self.lifecycle
        if lc is not None and not self.should_exit and lc.drained():
            if lc.in_flight == 0:
                self.should_exit = True
            elif not lc.expired.is_set():
                # Stop them with a 503 envelope each (not uvicorn's plain 500 when it cancels the tasks), then
                # exit once they have been answered, or a few ticks later whatever happens.
                log.error("%s: drain timeout; stopping %d request(s) with 503", lc.service, lc.in_flight)
                lc.expire()
                self._expired_at = counter
            elif lc.expired.is_set() and counter - getattr(self, "_expired_at", counter) > 20:  # ticks: 0.1 s
                self.should_exit = True
        result: bool = await super().on_tick(counter)
        return result
