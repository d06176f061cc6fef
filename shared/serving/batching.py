"""The one execution path of a stage: a batcher per operation, all served by the stage's model thread.

Every request a stage computes goes ``StageRuntime.submit`` -> its operation's ``Batcher`` -> the
``ModelWorker`` thread, which runs the batchers' work one unit at a time. "Batching off" is the same path
with a batch size of 1. One thread owns the model because torch's OpenMP keeps a worker pool per calling
thread: with a second pool the UNet took 308-322 ms a step instead of 223-283 (docs/benchmarks.md), and no
module or scheduler is ever used by two threads at once.

* ``MicroBatcher`` (text encode, VAE decode): requests that are waiting when the thread becomes free and
  that share a key (e.g. the latent shape) run as one call. Nobody waits for a batch to fill: a request alone
  runs at once, so latency at low load is unchanged and throughput under load goes up.
* The UNet's ``ContinuousBatcher`` (``diffusion_unet/batcher.py``) works one denoising step at a time, so
  requests join and leave the running batch between steps.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Req = TypeVar("Req")
Resp = TypeVar("Resp")
T = TypeVar("T")
log = logging.getLogger("triptych.batching")
#: Receives the progress events of long work (the UNet: ``{"step", "steps", "preview"}``) on the model thread.
ProgressCallback = Callable[[dict[str, Any]], None]


class Work(Future[Any]):
    """One request's result, handed from the model thread to whoever waits for it (an asyncio task through
    ``asyncio.wrap_future``, or a thread through ``result()``), with when the model thread started and
    finished it (the queue-wait and compute metrics)."""

    started: float | None = None
    finished: float | None = None
    #: Called on the model thread with each progress event of long work (the UNet: one per step); set by
    #: whoever submitted it, before the work is queued. It must only hand the event over (it runs between steps).
    on_progress: ProgressCallback | None = None

    def __init__(self) -> None:
        super().__init__()
        self._abandoned = threading.Event()

    def abandon(self) -> None:
        """The caller went away: dropped if still queued, and long work (the denoise loop) stops early."""
        self._abandoned.set()
        self.cancel()

    @property
    def abandoned(self) -> bool:
        return self._abandoned.is_set()

    def start(self) -> bool:
        """Claim it for running; False if its caller has already given up on it (then skip it)."""
        if self.abandoned or not self.set_running_or_notify_cancel():
            return False
        self.started = time.perf_counter()
        return True

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.finished = time.perf_counter()
        if error is not None:
            self.set_exception(error)
        else:
            self.set_result(result)


class ModelWorker:
    """A stage's model thread: loads the model, then serves every batcher of the stage in turn."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.cond = threading.Condition()
        self._batchers: list[Batcher[Any, Any]] = []
        self._looping = False
        self.closed = False

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on the model thread (loading, warming up), behind anything already running there."""
        return self._executor.submit(fn)

    def attach(self, batcher: Batcher[Any, Any]) -> None:
        with self.cond:
            self._batchers.append(batcher)

    def wake(self) -> None:
        """Called with ``cond`` held after queueing work: start the loop on first use, else wake it."""
        if self.closed:
            raise RuntimeError(f"the {self.name} worker is closed")
        if not self._looping:
            self._looping = True
            self._executor.submit(self._loop)
        self.cond.notify()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not any(b.has_work() for b in self._batchers):
                    if self.closed:
                        return
                    self.cond.wait()
            for batcher in self._batchers:
                try:
                    batcher.run_once()
                except Exception:  # a batcher's own bug must not stop the stage: its requests already failed
                    log.exception("%s: the %s batcher failed", self.name, batcher.name)

    def close(self) -> None:
        """Take no more work; what is queued still runs, then the thread ends."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self._executor.shutdown(wait=False)


class Batcher(ABC, Generic[Req, Resp]):
    """One operation's queue. ``submit`` runs on any thread; ``run_once`` on the model thread only."""

    def __init__(self, name: str, worker: ModelWorker, *, check: Callable[[Req], None] | None = None) -> None:
        self.name = name
        self.worker = worker
        self._check = check
        self.batches = 0
        self.largest_batch = 0
        worker.attach(self)

    def submit(self, request: Req, on_progress: ProgressCallback | None = None) -> Work:
        """Queue one request and return its ``Work`` at once. The operation's ``check`` runs first, on the
        caller's thread, so a request the model cannot take (wrong shape, unknown variant) fails with its
        422 before it waits in any queue."""
        if self._check is not None:
            self._check(request)
        work = Work()
        work.on_progress = on_progress
        with self.worker.cond:
            self._enqueue(request, work)
            self.worker.wake()
        return work

    def _counted(self, size: int) -> None:
        self.batches += 1
        self.largest_batch = max(self.largest_batch, size)

    @abstractmethod
    def _enqueue(self, request: Req, work: Work) -> None:
        """Add to the queue (``worker.cond`` is held)."""

    @abstractmethod
    def has_work(self) -> bool:
        """Whether ``run_once`` has something to do (``worker.cond`` is held)."""

    @abstractmethod
    def run_once(self) -> None:
        """On the model thread: one unit of work (a batch, or one step of the running batch)."""


@dataclass
class _Item(Generic[Req]):
    request: Req
    work: Work = field(default_factory=Work)


class MicroBatcher(Batcher[Req, Resp]):
    """Runs ``run_batch`` on groups of waiting requests with equal ``key``, up to ``max_items`` (by ``size``).

    ``run_batch(requests) -> responses`` (same order). If a batch fails, its requests are retried one by one so
    a single bad request fails alone.
    """

    def __init__(
        self,
        name: str,
        worker: ModelWorker,
        run_batch: Callable[[list[Req]], list[Resp]],
        *,
        key: Callable[[Req], Hashable] = lambda request: None,
        size: Callable[[Req], int] = lambda request: 1,
        max_items: int,
        check: Callable[[Req], None] | None = None,
    ) -> None:
        super().__init__(name, worker, check=check)
        self._run_batch = run_batch
        self._key = key
        self._size = size
        self.max_items = max_items
        self._pending: deque[_Item[Req]] = deque()

    def _enqueue(self, request: Req, work: Work) -> None:
        self._pending.append(_Item(request, work))

    def has_work(self) -> bool:
        return bool(self._pending)

    def _take(self) -> list[_Item[Req]]:
        with self.worker.cond:
            if not self._pending:
                return []
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

    def run_once(self) -> None:
        batch = self._take()
        if not batch:
            return
        self._counted(len(batch))
        try:
            results = self._run_batch([item.request for item in batch])
        except Exception as exc:
            if len(batch) == 1:
                batch[0].work.finish(error=exc)
                return
            for item in batch:  # isolate the failing request: the others still get their answers
                try:
                    item.work.finish(self._run_batch([item.request])[0])
                except Exception as exc:
                    item.work.finish(error=exc)
            return
        for item, result in zip(batch, results, strict=True):
            item.work.finish(result)
