"""The base of the three stage runtimes: objects that own torch models and know nothing of HTTP.

A runtime is what a stage's FastAPI app serves and also what central's ``LocalTransport`` runs in-process, so
"remote stage" and "local stage" are one interface with two transports. Each runtime declares one batcher per
operation it serves (``shared.operations``); every request reaches the model through it, on the model thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from abc import ABC, abstractmethod
from typing import Any, ClassVar, TypeVar

import torch

from shared import __version__
from shared.errors import InvalidValue, Overloaded, StageUnavailable
from shared.operations import OPERATIONS, Operation, StageName
from shared.protocol import ModelRef, StageInfo, StageRequest, WireModel
from shared.serving.batching import Batcher, ModelWorker, ProgressCallback, Work
from shared.serving.models import is_random_weights, public_model_id, resolve_device, resolve_dtype, resolve_model
from shared.settings import Settings

log = logging.getLogger("triptych.runtime")

Req = TypeVar("Req", bound=StageRequest)
Resp = TypeVar("Resp", bound=WireModel)


class StageRuntime(ABC):
    """Loads one stage's components and runs all of its compute on one model thread."""

    stage: ClassVar[StageName]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.model_id = ""
        self.fingerprint = ""
        self.random_weights = False
        self._ready = threading.Event()
        self._load_error: str | None = None
        self.worker = ModelWorker(f"{self.stage}-model")
        self._batchers: dict[str, Batcher[Any, Any]] = {}
        # Requests admitted (queued or computing); past settings.max_queue new ones get 429.
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()

    @property
    def operations(self) -> tuple[Operation[Any, Any], ...]:
        return OPERATIONS[self.stage]

    @property
    def max_batch(self) -> int:
        """Images (prompts, for the text encoder) one forward may hold; 1 with batching off."""
        return self.settings.max_batch_size if self.settings.batching else 1

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        """Resolve the model, load this stage's components and warm up (blocking; ``load_async`` runs it on
        the model thread, where the compute will run)."""
        try:
            if self.settings.cpu_threads:
                torch.set_num_threads(self.settings.cpu_threads)
            model = resolve_model(self.settings)
            self.model_id = public_model_id(model)
            log.info("%s: model %s", self.stage, model)
            self.random_weights = is_random_weights(model)
            # Not under inference_mode: parameters created there lose requires_grad, and that alone changes
            # which CPU kernels run (1e-6 off, 1/255 in pixels) versus the pipeline's own loading.
            self._load(model)
            batchers = self._make_batchers()
            if set(batchers) != set(self.operations):
                raise RuntimeError(f"{self.stage} must have one batcher per operation: {self.operations}")
            self._batchers = {op.name: batcher for op, batcher in batchers.items()}
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
            str(self.dtype).removeprefix("torch."),
        )

    async def load_async(self) -> None:
        await asyncio.wrap_future(self.worker.call(self.load))

    @abstractmethod
    def _load(self, model: str) -> None:
        """Load this stage's components from ``model`` (a diffusers directory or hub id)."""

    @abstractmethod
    def _make_batchers(self) -> dict[Operation[Any, Any], Batcher[Any, Any]]:
        """One batcher per operation of this stage, on ``self.worker`` with ``self.max_batch``."""

    @abstractmethod
    def _warm_up(self) -> None:
        """One small pass so the first real request does not pay for lazy initialisation (on the loading thread,
        with the compute methods directly: the batchers' loop has not started)."""

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

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def check_bounds(self, images: int, height: int, width: int, *, param: str, size_param: str | None = None) -> None:
        """A stage's own bounds, checked before a request is queued or anything is allocated for it (a client
        may call a stage directly): at most ``max_num_images`` images, sides of at most ``max_side`` pixels.
        Central checks the same limits on its requests. ``size_param`` (default ``param``) names a size error."""
        s = self.settings
        if images > s.max_num_images:
            raise InvalidValue(f"`{param}` holds {images} images; at most {s.max_num_images} are allowed "
                               "(TRIPTYCH_MAX_NUM_IMAGES)", param=param)  # fmt: skip
        if max(height, width) > s.max_side:
            where = size_param or param
            raise InvalidValue(f"`{where}`: {width}x{height} pixels; at most {s.max_side} a side is allowed "
                               "(TRIPTYCH_MAX_SIDE)", param=where)  # fmt: skip

    def check_ready(self) -> None:
        if not self.ready:
            reason = f"model failed to load ({self._load_error})" if self._load_error else "model is loading"
            raise StageUnavailable(f"{self.stage} is not ready: {reason}", headers={"Retry-After": "5"})

    def close(self) -> None:
        self.worker.close()

    # ------------------------------------------------------------------ execution
    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, op: Operation[Req, Resp], message: Req, on_progress: ProgressCallback | None = None) -> Work:
        """Hand ``message`` to ``op``'s batcher without blocking; the ``Work`` completes with an ``op.response``.

        Bounded: with ``settings.max_queue`` requests already admitted, raises Overloaded (429 with
        Retry-After) instead of queueing without limit. ``on_progress`` gets the operation's progress events on
        the model thread (the UNet: ``{"step", "steps", "preview"}`` after every step).
        """
        self.check_ready()
        with self._in_flight_lock:
            if self._in_flight >= self.settings.max_queue:
                raise Overloaded(
                    f"{self.stage} is at capacity: {self._in_flight} requests admitted "
                    f"(max_queue={self.settings.max_queue}); retry later",
                    retry_after_s=1,
                )
            self._in_flight += 1
        try:
            work = self._batchers[op.name].submit(message, on_progress)
        except BaseException:
            self._released()
            raise
        work.add_done_callback(self._released)
        return work

    def _released(self, _: object = None) -> None:
        with self._in_flight_lock:
            self._in_flight -= 1

    async def execute(
        self, op: Operation[Req, Resp], message: Req, on_progress: ProgressCallback | None = None
    ) -> Work:
        """Run ``op`` on ``message`` and return the finished ``Work`` (result and timings): what the HTTP
        route and ``LocalTransport`` both call. The event loop awaits the model thread directly. If the caller
        is cancelled (its client went away), the work is abandoned: dropped if still queued, and the denoise
        loop stops before its next step."""
        work = self.submit(op, message, on_progress)
        try:
            await asyncio.wrap_future(work)
        except asyncio.CancelledError:
            work.abandon()
            raise
        return work

    async def call(self, op: Operation[Req, Resp], message: Req, on_progress: ProgressCallback | None = None) -> Resp:
        """``execute(op, message)``'s result."""
        result: Resp = (await self.execute(op, message, on_progress)).result()
        return result

    def run(self, op: Operation[Req, Resp], message: Req) -> Resp:
        """``op`` on ``message``, blocking the calling thread until the model thread has answered."""
        result: Resp = self.submit(op, message).result()
        return result

    def stats(self) -> dict[str, tuple[str, str, float]]:
        """Counters for /metrics: name -> (``"counter"`` or ``"gauge"``, help text, value)."""
        return {"requests_admitted": ("gauge", "Requests queued or computing in this stage", self._in_flight)}

    # ------------------------------------------------------------------ info
    @abstractmethod
    def config(self) -> dict[str, Any]:
        """What other stages must agree with (SPEC §5), for ``/v1/info``."""

    def info(self) -> StageInfo:
        self.check_ready()
        return StageInfo(
            stage=self.stage,
            model=ModelRef(id=self.model_id, fingerprint=self.fingerprint),
            config=self.config(),
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            version=__version__,
            random_weights=self.random_weights,
        )
