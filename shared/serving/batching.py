"""Micro-batching for one-shot stage calls (text encode, VAE decode/encode).

Requests that are waiting when the worker becomes free, and that share a key (e.g. the latent shape),
run as one batch: one forward instead of several. Nobody waits for a batch to fill: a request alone runs
at once, so latency at low load is unchanged and throughput under load goes up. The UNet has its own,
step-level batcher (``diffusion_unet/batcher.py``) because its requests are long loops, not one call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Req = TypeVar("Req")
Resp = TypeVar("Resp")
log = logging.getLogger("triptych.batching")


class Work(Future[Any]):
    """One request's result, handed from the stage's model thread to whoever waits for it (an asyncio task
    through ``asyncio.wrap_future``, or a thread through ``result()``), with when the model thread started
    and finished it (the queue-wait and compute metrics)."""

    started: float | None = None
    finished: float | None = None

    def start(self) -> bool:
        """Claim it for running; False if its caller has already given up on it (then skip it)."""
        if not self.set_running_or_notify_cancel():
            return False
        self.started = time.perf_counter()
        return True

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.finished = time.perf_counter()
        if error is not None:
            self.set_exception(error)
        else:
            self.set_result(result)


@dataclass
class _Item(Generic[Req]):
    request: Req
    work: Work = field(default_factory=Work)


class MicroBatcher(Generic[Req, Resp]):
    """Runs ``run_batch`` on groups of waiting requests with equal ``key``, up to ``max_items`` (by ``size``).

    ``run_batch(requests) -> responses`` (same order). If a batch fails, its requests are retried one by one so
    a single bad request fails alone. One thread does all the work: no module is used by two threads at once.
    """

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[Req]], list[Resp]],
        *,
        key: Callable[[Req], Hashable],
        size: Callable[[Req], int],
        max_items: int,
        start: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        """``start(loop)`` runs the batch loop on the thread that should own the model (default: a new one)."""
        self.name = name
        self._start = start or (lambda loop: threading.Thread(target=loop, name=f"{name}-batcher", daemon=True).start())
        self._run_batch = run_batch
        self._key = key
        self._size = size
        self.max_items = max_items
        self._cond = threading.Condition()
        self._pending: deque[_Item[Req]] = deque()
        self._started = False
        self._closed = False
        self.batches = 0
        self.largest_batch = 0

    def submit(self, request: Req) -> Work:
        """Queue one request; its ``Work`` completes when the batch it joined has run. Never blocks."""
        item: _Item[Req] = _Item(request)
        with self._cond:
            if self._closed:
                raise RuntimeError(f"the {self.name} batcher is closed")
            if not self._started:
                self._started = True
                self._start(self._loop)
            self._pending.append(item)
            self._cond.notify()
        return item.work

    def run(self, request: Req) -> Resp:
        """Submit one request and block the calling thread until its response is ready."""
        result: Resp = self.submit(request).result()
        return result

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _take(self) -> list[_Item[Req]] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if not self._pending:
                return None
            first = self._pending.popleft()
            batch, key, room = [first], self._key(first.request), self.max_items - self._size(first.request)
            for item in list(self._pending):
                size = self._size(item.request)
                if size <= room and self._key(item.request) == key:
                    self._pending.remove(item)
                    batch.append(item)
                    room -= size
            # Callers that gave up while queued (a client went away) are dropped here.
            return [item for item in batch if item.work.start()]

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            if not batch:
                continue
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            try:
                results = self._run_batch([item.request for item in batch])
            except Exception as exc:
                if len(batch) == 1:
                    batch[0].work.finish(error=exc)
                    continue
                for item in batch:  # isolate the failing request: the others still get their answers
                    try:
                        item.work.finish(self._run_batch([item.request])[0])
                    except Exception as exc:
                        item.work.finish(error=exc)
                continue
            for item, result in zip(batch, results, strict=True):
                item.work.finish(result)
