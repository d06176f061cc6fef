"""Continuous batching at step granularity: requests join and leave the running batch between steps.

One thread owns the UNet. Before every step it admits waiting requests (up to ``max_batch_size`` images in
flight), drops requests whose caller went away, groups the active jobs whose inputs can be concatenated
(``DenoiseJob.key``: same variant, latent size and embedding shape) and runs one UNet forward per group.
Each job then steps its *own* scheduler on its slice, with its own timestep, guidance scale, step count and
generators, so a 4-step request that arrives during a 50-step one finishes after about 4 steps instead of
waiting for all 50, and the UNet is used by one thread only.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from shared.batching import Work
from shared.protocol import DenoiseRequest, DenoiseResponse

if TYPE_CHECKING:
    from diffusion_unet.runtime import DenoiseJob, UNetRuntime

log = logging.getLogger("triptych.batcher")


@dataclass
class _Waiter:
    request: DenoiseRequest
    cancel: threading.Event | None
    work: Work = field(default_factory=Work)
    job: DenoiseJob | None = None

    @property
    def images(self) -> int:
        return self.request.batch_size


class ContinuousBatcher:
    """Runs every admitted denoise job, one step at a time, sharing UNet forwards between compatible jobs."""

    def __init__(self, runtime: UNetRuntime, *, max_batch_size: int) -> None:
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self._cond = threading.Condition()
        self._pending: deque[_Waiter] = deque()
        self._closed = False
        self._started = False
        # Read by /metrics and tests: forwards run, and the images in the largest forward so far.
        self.forwards = 0
        self.largest_batch = 0
        self.active_images = 0

    def submit(self, request: DenoiseRequest, cancel: threading.Event | None = None) -> Work:
        """Queue one request; its ``Work`` completes with the final latents. Never blocks. Setting ``cancel``
        (its caller went away) drops the job before its next step."""
        waiter = _Waiter(request, cancel)
        with self._cond:
            if self._closed:
                raise RuntimeError("the UNet batcher is closed")
            if not self._started:
                self._started = True
                self.runtime.start_model_loop(self._loop)
            self._pending.append(waiter)
            self._cond.notify()
        return waiter.work

    def run(self, request: DenoiseRequest, cancel: threading.Event | None = None) -> DenoiseResponse:
        """Submit one request and block the calling thread until its final latents are ready."""
        result: DenoiseResponse = self.submit(request, cancel).result()
        return result

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    # ------------------------------------------------------------------ the batcher thread
    def _admit(self, active: list[_Waiter]) -> list[_Waiter]:
        """Waiting requests that fit next to ``active`` (a lone request larger than the cap still runs)."""
        with self._cond:
            while not self._pending and not active and not self._closed:
                self._cond.wait()
            room = self.max_batch_size - sum(w.images for w in active)
            admitted: list[_Waiter] = []
            while self._pending and (self._pending[0].images <= room or (not active and not admitted)):
                waiter = self._pending.popleft()
                if waiter.work.start():  # else its caller gave up while it was queued
                    room -= waiter.images
                    admitted.append(waiter)
            return admitted

    @staticmethod
    def _finish(waiter: _Waiter, result: DenoiseResponse | None = None, error: BaseException | None = None) -> None:
        waiter.work.finish(result, error)

    def _loop(self) -> None:
        from diffusion_unet.runtime import JobCancelled

        active: list[_Waiter] = []
        with torch.inference_mode():
            while True:
                for waiter in self._admit(active):
                    try:
                        waiter.job = self.runtime.prepare(waiter.request)
                        active.append(waiter)
                    except Exception as exc:  # invalid input: that request fails, the batch goes on
                        self._finish(waiter, error=exc)
                if self._closed and not active:
                    return
                still: list[_Waiter] = []
                for waiter in active:
                    if waiter.cancel is not None and waiter.cancel.is_set():
                        self._finish(waiter, error=JobCancelled("the caller went away"))
                    else:
                        still.append(waiter)
                active = still
                self.active_images = sum(w.images for w in active)
                groups: dict[tuple[object, ...], list[_Waiter]] = {}
                for waiter in active:
                    assert waiter.job is not None
                    groups.setdefault(waiter.job.key, []).append(waiter)
                for group in groups.values():
                    jobs = [w.job for w in group if w.job is not None]
                    try:
                        self.runtime.step(jobs)
                    except Exception as exc:
                        log.exception("a denoise step failed for %d request(s)", len(group))
                        for waiter in group:
                            self._finish(waiter, error=exc)
                            waiter.job = None
                        continue
                    self.forwards += 1
                    self.largest_batch = max(self.largest_batch, sum(w.images for w in group))
                remaining = []
                for waiter in active:
                    if waiter.job is None:
                        continue
                    if waiter.job.done:
                        self._finish(waiter, result=waiter.job.result())
                    else:
                        remaining.append(waiter)
                active = remaining
                self.active_images = sum(w.images for w in active)
