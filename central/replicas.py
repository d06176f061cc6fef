"""Several replicas of one stage behind one ``Transport``: least-in-flight routing and failover.

A stage URL setting (``TRIPTYCH_DIFFUSION_UNET_URL``, ...) names one replica or several:

* ``http://unet-a:8002,http://unet-b:8002``: a fixed list.
* ``dns+http://diffusion-unet-replicas:8002``: every address the name resolves to (a Kubernetes headless
  Service lists one per ready pod), looked up again at most every ``RESOLVE_TTL_S``, so pods that come and go
  are followed without restarting central.

Each call goes to the replica with the fewest calls in flight from this central (ties: the one least recently
chosen), skipping replicas that failed in the last ``DOWN_S`` while others remain. A call is sent to another
replica only when the first one took no work: it could not be reached, it answered 503 before admitting the
call (loading, draining: ``StageRefused``) or 429 (full). A replica that dies while computing fails that call
(503): the work it had started is not silently done twice; the next calls go to the live replicas.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

from central.clients import HopObserver, HttpTransport, Progress, Transport
from shared import wire
from shared.errors import StageBadResponse, StageRefused, StageUnavailable, TriptychError, UpstreamClientError
from shared.operations import Operation, StageName
from shared.protocol import StageInfo, StageRequest, WireModel
from shared.settings import Settings

Req = TypeVar("Req", bound=StageRequest)
Resp = TypeVar("Resp", bound=WireModel)

log = logging.getLogger("triptych.replicas")

DNS_SCHEME = "dns+"
# How long a DNS answer is used before the name is looked up again: short, so a new pod takes work within a
# second of being ready, and a lookup is not paid on every hop of every request.
RESOLVE_TTL_S = 1.0
# A replica that refused a call is tried last for this long (it is still tried when no other is left).
DOWN_S = 2.0


def is_replicated(url: str) -> bool:
    """Whether a stage URL setting names several replicas (a list or a DNS name), not one plain URL."""
    return "," in url or url.startswith(DNS_SCHEME)


def stage_transport(stage: StageName, url: str, settings: Settings, *, limits: wire.Limits) -> Transport:
    """The transport for a stage URL setting: one ``HttpTransport``, or ``ReplicaTransport`` over several."""
    if is_replicated(url):
        return ReplicaTransport(stage, url, settings, limits=limits)
    return HttpTransport(stage, url, settings, limits=limits)


@dataclass
class Replica:
    url: str
    transport: HttpTransport
    in_flight: int = 0
    down_until: float = 0.0
    last_chosen: int = 0


class ReplicaTransport:
    """One stage served by several replicas (see the module docstring)."""

    def __init__(self, stage: StageName, spec: str, settings: Settings, *, limits: wire.Limits) -> None:
        self.stage = stage
        self._settings = settings
        self._limits = limits
        self._on_hop: HopObserver | None = None
        self._replicas: dict[str, Replica] = {}
        self._ticket = itertools.count(1)
        self._dns: tuple[str, str, int] | None = None  # (scheme, host, port) of a dns+ URL
        self._resolved_at = -RESOLVE_TTL_S
        self._resolving: asyncio.Future[None] | None = None
        if spec.startswith(DNS_SCHEME):
            parts = urlsplit(spec[len(DNS_SCHEME) :])
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{stage}: {spec!r} is not dns+http://name:port")
            self._dns = (parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        else:
            for url in (part.strip().rstrip("/") for part in spec.split(",")):
                if url:
                    self._add(url)

    # ------------------------------------------------------------------ the replica set
    @property
    def on_hop(self) -> HopObserver | None:
        return self._on_hop

    @on_hop.setter
    def on_hop(self, observer: HopObserver | None) -> None:
        self._on_hop = observer
        for replica in self._replicas.values():
            replica.transport.on_hop = observer

    @property
    def replicas(self) -> list[Replica]:
        return list(self._replicas.values())

    def _add(self, url: str, host_header: str | None = None) -> None:
        transport = HttpTransport(self.stage, url, self._settings, limits=self._limits, host_header=host_header)
        transport.on_hop = self._on_hop
        self._replicas[url] = Replica(url, transport)

    async def _refresh(self) -> None:
        """For a DNS name: look it up again once ``RESOLVE_TTL_S`` has passed (one lookup at a time)."""
        if self._dns is None or time.monotonic() - self._resolved_at < RESOLVE_TTL_S:
            return
        if self._resolving is None:
            self._resolving = asyncio.ensure_future(self._resolve())
        resolving = self._resolving
        try:
            await asyncio.shield(resolving)
        finally:
            if self._resolving is resolving and resolving.done():
                self._resolving = None

    async def _resolve(self) -> None:
        assert self._dns is not None
        scheme, host, port = self._dns
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            # Stale addresses are better than none (a DNS hiccup); with none known the call fails below.
            log.warning("%s: resolving %s failed (%s); keeping %d known replica(s)", self.stage, host, exc,
                        len(self._replicas))  # fmt: skip
            return
        addresses = sorted({str(info[4][0]) for info in infos})
        urls = {f"{scheme}://[{a}]:{port}" if ":" in a else f"{scheme}://{a}:{port}" for a in addresses}
        for url in set(self._replicas) - urls:
            gone = self._replicas.pop(url)
            if gone.in_flight == 0:
                await gone.transport.aclose()  # one still in use closes with the garbage collector
        for url in sorted(urls - set(self._replicas)):
            self._add(url, host_header=f"{host}:{port}")
        self._resolved_at = time.monotonic()

    def _pick(self, exclude: set[str]) -> Replica | None:
        now = time.monotonic()
        candidates = [r for r in self._replicas.values() if r.url not in exclude]
        if not candidates:
            return None
        best = min(candidates, key=lambda r: (r.down_until > now, r.in_flight, r.last_chosen))
        best.last_chosen = next(self._ticket)
        return best

    # ------------------------------------------------------------------ Transport
    async def call(self, op: Operation[Req, Resp], request: Req, on_progress: Progress | None = None) -> Resp:
        await self._refresh()
        tried: set[str] = set()
        refusal: TriptychError | None = None
        while (replica := self._pick(tried)) is not None:
            tried.add(replica.url)
            replica.in_flight += 1
            try:
                result = await replica.transport.call(op, request, on_progress)
            except StageRefused as exc:  # took no work: the next replica may
                replica.down_until = time.monotonic() + DOWN_S
                refusal = exc
                continue
            except UpstreamClientError as exc:
                if exc.status != 429:
                    raise
                refusal = exc  # full: another replica may have room
                continue
            except StageUnavailable:
                replica.down_until = time.monotonic() + DOWN_S  # died while working: not retried
                raise
            finally:
                replica.in_flight -= 1
            replica.down_until = 0.0
            return result
        if refusal is None:
            raise StageRefused(f"{self.stage}: no replica is known (nothing resolved yet)")
        if len(tried) > 1 and isinstance(refusal, StageUnavailable):
            raise StageRefused(f"{self.stage}: none of {len(tried)} replicas took the call ({refusal.message})")
        raise refusal

    async def info(self) -> StageInfo:
        """One replica's info, after checking that every replica that answers serves the same model: a rolling
        update half done must not mix two models' tensors in one request."""
        await self._refresh()
        replicas = self.replicas
        answers = await asyncio.gather(*(r.transport.info() for r in replicas), return_exceptions=True)
        infos: list[StageInfo] = []
        for replica, answer in zip(replicas, answers, strict=True):
            if isinstance(answer, StageInfo):
                infos.append(answer)
                replica.down_until = 0.0
            elif isinstance(answer, StageUnavailable):
                replica.down_until = time.monotonic() + DOWN_S
            elif isinstance(answer, BaseException):
                raise answer
        if not infos:
            failure = next((a for a in answers if isinstance(a, BaseException)), None)
            if isinstance(failure, TriptychError):
                raise StageRefused(f"{self.stage}: no replica answers ({failure.message})")
            raise StageRefused(f"{self.stage}: no replica is known")
        first = infos[0]
        for other in infos[1:]:
            if (other.model, other.config) != (first.model, first.config):
                raise StageBadResponse(
                    f"{self.stage} replicas disagree: model {first.model.id} ({first.model.fingerprint}) "
                    f"vs {other.model.id} ({other.model.fingerprint})"
                )
        return first

    async def aclose(self) -> None:
        for replica in self._replicas.values():
            await replica.transport.aclose()
