"""The base of the three stage runtimes: objects that own torch models and know nothing of HTTP.

A runtime is what a stage's FastAPI app serves and also what ``LocalTransport`` runs in-process, so
"remote stage" and "local stage" are one interface with two transports.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Protocol, TypeVar

import torch

from shared import __version__
from shared.batching import Work
from shared.errors import Overloaded, StageUnavailable
from shared.models import is_random_weights, resolve_device, resolve_dtype, resolve_model
from shared.protocol import ModelRef, StageInfo
from shared.settings import Settings

_CANCEL: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("triptych_cancel", default=None)


def cancel_requested() -> bool:
    """Inside work started by ``StageRuntime.run``: whether the request was abandoned by its caller."""
    token = _CANCEL.get()
    return token is not None and token.is_set()


def cancel_token() -> threading.Event | None:
    """The current request's cancellation event (set when its caller goes away), if any."""
    return _CANCEL.get()


log = logging.getLogger("triptych.runtime")


class _Closable(Protocol):
    def close(self) -> None: ...


B = TypeVar("B", bound=_Closable)


def _perform(work: Work, fn: Callable[[Any], Any], message: Any) -> None:
    """On a worker thread: ``fn(message)`` into ``work``, unless its caller gave up while it was queued."""
    if not work.start():
        return
    try:
        result = fn(message)
    except BaseException as exc:
        work.finish(error=exc)
    else:
        work.finish(result)


class StageRuntime:
    """Loads one stage's components and runs its compute on a single worker thread.

    One worker thread per runtime keeps torch work off the event loop (health endpoints answer while a
    request computes) and serialises requests, so no module or scheduler is ever used by two at once.
    """

    stage: ClassVar[str]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.model_id = ""
        self.fingerprint = ""
        self.random_weights = False
        self._ready = threading.Event()
        self._load_error: str | None = None
        # Requests admitted (queued or computing); past settings.max_queue new ones get 429.
        self._in_flight = 0
        # One thread loads, warms up and runs the torch calls: torch's OpenMP keeps a worker pool per calling
        # thread; with a second pool the UNet took 308-322 ms a step vs 223-283 (benchmarks.md). With batching
        # on, that thread runs the stage's batcher loops, which batched operations are handed to straight from
        # the event loop; operations without a batcher (the VAE's encode_image) run on ``_waiters`` under the
        # stage's model lock. With batching off, every request runs on the model thread, one at a time.
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.stage}-model")
        self._batchers: list[_Closable] = []
        self._waiters = (
            ThreadPoolExecutor(max_workers=settings.max_queue + 1, thread_name_prefix=f"{self.stage}-request")
            if settings.batching
            else None
        )

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        """Resolve the model and load this stage's components (blocking; call from a worker thread)."""
        try:
            if self.settings.cpu_threads:
                torch.set_num_threads(self.settings.cpu_threads)
            model = resolve_model(self.settings)
            self.model_id = model
            self.random_weights = is_random_weights(model)
            # Not under inference_mode: parameters created there lose requires_grad, and that alone changes
            # which CPU kernels run (1e-6 off, 1/255 in pixels) versus the pipeline's own loading.
            self._load(model)
            self._warm_up()
        except Exception as exc:
            # The details (paths included) go to the log only; clients see the kind of failure.
            self._load_error = f"{type(exc).__name__}; see the service log"
            log.exception("%s failed to load its model", self.stage)
            raise
        self._ready.set()
        log.info(
            "%s ready: model=%s fingerprint=%s device=%s dtype=%s",
            self.stage,
            self.model_id,
            self.fingerprint,
            self.device,
            self.dtype,
        )

    async def load_async(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._model_thread, self.load)

    def start_model_loop(self, loop: Callable[[], None]) -> None:
        """Run a batcher's loop on the model thread (after loading, which it waits behind). One per stage."""
        self._model_thread.submit(loop)

    def _load(self, model: str) -> None:
        raise NotImplementedError

    @property
    def channels_last(self) -> bool:
        """Channels-last convolutions: a win on CUDA tensor cores, usually not on CPU (setting or per device)."""
        setting = self.settings.channels_last
        return self.device.type == "cuda" if setting is None else setting

    def place(self, module: Any) -> Any:
        """Move a loaded module to the serving device and dtype, in the configured memory format."""
        module = module.to(self.device, self.dtype).eval()
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def _warm_up(self) -> None:
        """One small pass so the first real request does not pay for lazy initialisation."""

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def check_ready(self) -> None:
        if not self.ready:
            reason = f"model failed to load ({self._load_error})" if self._load_error else "model is loading"
            raise StageUnavailable(f"{self.stage} is not ready: {reason}", headers={"Retry-After": "5"})

    def own_batcher(self, batcher: B) -> B:
        """Register a batcher of this stage (its loop runs on the model thread): ``close()`` stops it."""
        self._batchers.append(batcher)
        return batcher

    def close(self) -> None:
        for batcher in self._batchers:
            batcher.close()
        if self._waiters is not None:
            self._waiters.shutdown(wait=False, cancel_futures=True)
        self._model_thread.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ execution
    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, op: str, message: Any, cancel: threading.Event) -> Work | None:
        """Hand ``message`` to the stage's batcher for operation ``op`` without blocking, or return None when
        ``op`` is not batched (then ``execute`` runs the method on a thread). Stages with batchers override it;
        setting ``cancel`` tells the batcher the caller went away."""
        return None

    async def execute(self, op: str, message: Any) -> Work:
        """Run operation ``op`` (the method of that name: ``encode``, ``denoise``, ...) on ``message``, off the
        event loop; returns the finished ``Work`` (result and timings). What the HTTP route and
        ``LocalTransport`` both call.

        Batched operations go straight to the batcher on the model thread and the event loop awaits their
        result: no thread in between. The others run on a thread (the model thread itself when batching is
        off). Bounded: with ``settings.max_queue`` requests already admitted, raises Overloaded (429 with
        Retry-After) instead of queueing without limit. If the caller is cancelled (its client went away), the
        work is dropped if still queued, and otherwise ``cancel_requested()`` turns true inside it, so long
        work such as the denoise loop stops early.
        """
        if self._in_flight >= self.settings.max_queue:
            raise Overloaded(
                f"{self.stage} is at capacity: {self._in_flight} requests admitted "
                f"(max_queue={self.settings.max_queue}); retry later",
                retry_after_s=1,
            )
        token = threading.Event()
        self._in_flight += 1
        try:
            work = self.submit(op, message, token)
            if work is None:
                work = Work()
                ctx = contextvars.copy_context()
                ctx.run(_CANCEL.set, token)
                (self._waiters or self._model_thread).submit(ctx.run, _perform, work, getattr(self, op), message)
            try:
                await asyncio.wrap_future(work)
            except asyncio.CancelledError:
                token.set()
                raise
            return work
        finally:
            self._in_flight -= 1

    async def call(self, op: str, message: Any) -> Any:
        """``execute(op, message)``'s result."""
        return (await self.execute(op, message)).result()

    def stats(self) -> dict[str, tuple[str, str, float]]:
        """Counters for /metrics: name -> (``"counter"`` or ``"gauge"``, help text, value)."""
        return {"requests_admitted": ("gauge", "Requests queued or computing in this stage", self._in_flight)}

    # ------------------------------------------------------------------ info
    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def info(self) -> StageInfo:
        self.check_ready()
        return StageInfo(
            stage=self.stage,  # type: ignore[arg-type]
            model=ModelRef(id=self.model_id, fingerprint=self.fingerprint),
            config=self.config(),
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            version=__version__,
            random_weights=self.random_weights,
        )
