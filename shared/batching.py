"""Micro-batching for one-shot stage calls (text encode, VAE decode/encode).

Requests that are waiting when the worker becomes free, and that share a key (e.g. the latent shape),
run as one batch: one forward instead of several. Nobody waits for a batch to fill: a request alone runs
at once, so latency at low load is unchanged and throughput under load goes up. The UNet has its own,
step-level batcher (``diffusion_unet/batcher.py``) because its requests are long loops, not one call.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Req = TypeVar("Req")
Resp = TypeVar("Resp")
log = logging.getLogger("triptych.batching")


@dataclass
class _Item(Generic[Req, Resp]):
    request: Req
    done: threading.Event = field(default_factory=threading.Event)
    result: Resp | None = None
    error: BaseException | None = None


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
        self._pending: deque[_Item[Req, Resp]] = deque()
        self._started = False
        self._closed = False
        self.batches = 0
        self.largest_batch = 0

    def run(self, request: Req) -> Resp:
        """Submit one request and block the calling thread until its response is ready."""
        item: _Item[Req, Resp] = _Item(request)
        with self._cond:
            if self._closed:
                raise RuntimeError(f"the {self.name} batcher is closed")
            if not self._started:
                self._started = True
                self._start(self._loop)
            self._pending.append(item)
            self._cond.notify()
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result  # type: ignore[return-value]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _take(self) -> list[_Item[Req, Resp]] | None:
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
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            try:
                results = self._run_batch([item.request for item in batch])
                for item, result in zip(batch, results, strict=True):
                    item.result = result
            except Exception as exc:
                if len(batch) == 1:
                    batch[0].error = exc
                else:  # isolate the failing request: the others still get their answers
                    for item in batch:
                        try:
                            item.result = self._run_batch([item.request])[0]
                        except Exception as exc:
                            item.error = exc
            for item in batch:
                item.done.set()
