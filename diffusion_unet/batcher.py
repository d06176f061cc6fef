"""Continuous batching at step granularity: requests join and leave the running batch between steps.

Before every step, on the model thread, the batcher admits waiting requests (up to ``max_images`` images in
flight), drops requests whose caller went away, groups the active jobs whose inputs can be concatenated
(``DenoiseJob.key``: same variant, latent size and embedding shape; mixable LoRA sets and ControlNets may
differ) and runs one UNet forward per group.
Each job then steps its *own* scheduler on its slice, with its own timestep, guidance scale, step count and
generators, so a 4-step request that arrives during a 50-step one finishes after about 4 steps instead of
waiting for all 50. With ``max_images`` = 1 (batching off) requests run one after another, each alone.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffusion_unet.denoise import DenoiseJob, JobCancelled, step
from diffusion_unet.previews import latent_preview
from shared.errors import TriptychError
from shared.protocol import DenoiseRequest, DenoiseResponse
from shared.serving.batching import Batcher, ModelWorker, Work

log = logging.getLogger("triptych.batcher")


@dataclass
class _Waiter:
    request: DenoiseRequest
    work: Work
    job: DenoiseJob | None = None
    reported: int = 0  # the last progress step its listener was told

    @property
    def images(self) -> int:
        return self.request.batch_size


class ContinuousBatcher(Batcher[DenoiseRequest, DenoiseResponse]):
    """Runs every admitted denoise job, one step at a time, sharing UNet forwards between compatible jobs."""

    def __init__(
        self,
        worker: ModelWorker,
        prepare: Callable[[DenoiseRequest], DenoiseJob],
        *,
        max_images: int,
        check: Callable[[DenoiseRequest], None] | None = None,
        ready: Callable[[DenoiseRequest], bool] | None = None,
        preview: Callable[[torch.Tensor], torch.Tensor | None] = latent_preview,
    ) -> None:
        super().__init__("unet-denoise", worker, check=check)
        self._prepare = prepare
        self._ready = ready or (lambda _: True)
        self._preview = preview
        self.max_images = max_images
        self._pending: deque[_Waiter] = deque()
        self._active: list[_Waiter] = []
        # Read by /metrics and tests: the images of the running batch.
        self.active_images = 0

    @property
    def forwards(self) -> int:
        """UNet forwards run so far (one per group per step)."""
        return self.batches

    def _enqueue(self, request: DenoiseRequest, work: Work) -> None:
        self._pending.append(_Waiter(request, work))

    def has_work(self) -> bool:
        """Called with ``worker.cond`` held. Waiting requests whose LoRAs are still being read are not work yet:
        the reader wakes the worker when it is done (``LoraStore.prefetch``)."""
        return bool(self._active) or any(self._ready(w.request) for w in self._pending)

    def _admit(self) -> list[_Waiter]:
        """Waiting requests that fit next to the active ones, in arrival order (a lone request larger than the
        cap still runs). A request whose LoRAs are still being read stays waiting without holding up the ones
        behind it, so loading a LoRA never stalls the model thread (Katz-style overlap, minus the
        approximation: the request starts only once its LoRAs are in, so it stays exact)."""
        with self.worker.cond:
            room = self.max_images - sum(w.images for w in self._active)
            admitted: list[_Waiter] = []
            waiting: deque[_Waiter] = deque()
            while self._pending:
                waiter = self._pending.popleft()
                if not self._ready(waiter.request):
                    waiting.append(waiter)
                elif waiter.images <= room or (not self._active and not admitted):
                    if waiter.work.start():  # else its caller gave up while it was queued
                        room -= waiter.images
                        admitted.append(waiter)
                else:  # the first that does not fit: it and everything after it wait for room
                    waiting.append(waiter)
                    waiting.extend(self._pending)
                    self._pending.clear()
            self._pending = waiting
            return admitted

    def _report_progress(self) -> None:
        """After a step: each job whose caller listens gets ``{"step", "steps"}`` when its progress moved (counted
        as the diffusers pipelines count it, ``DenoiseJob.progress``) and, every ``preview_every`` steps,
        ``preview`` of its latents (``UNetRuntime.preview``). The listener only hands the event over."""
        for waiter in self._active:
            job, listener = waiter.job, waiter.work.on_progress
            if job is None or listener is None or job.progress == waiter.reported:
                continue
            waiter.reported = job.progress
            event: dict[str, object] = {"step": job.progress, "steps": job.steps}
            every = waiter.request.preview_every
            if every and job.progress % every == 0 and not job.done:
                preview = self._preview(job.latents)
                if preview is not None:
                    event["preview"] = preview
            try:
                listener(event)
            except Exception:  # a listener's bug must not fail the batch
                log.exception("a progress listener failed")

    def run_once(self) -> None:
        """Admit, drop abandoned jobs, then one step of every active job (one forward per compatible group)."""
        with torch.inference_mode():
            for waiter in self._admit():
                try:
                    waiter.job = self._prepare(waiter.request)
                    self._active.append(waiter)
                except Exception as exc:  # invalid input: that request fails, the batch goes on
                    waiter.work.finish(error=exc)
            groups: dict[tuple[object, ...], list[_Waiter]] = {}
            for waiter in self._active:
                if waiter.work.abandoned:
                    waiter.work.finish(error=JobCancelled("the caller went away"))
                    waiter.job = None
                elif waiter.job is not None:
                    groups.setdefault(waiter.job.key, []).append(waiter)
            self.active_images = sum(w.images for group in groups.values() for w in group)
            for group in groups.values():
                try:
                    step([w.job for w in group if w.job is not None])
                except Exception as exc:
                    if isinstance(exc, TriptychError):  # the requests' own fault (a LoRA that does not fit)
                        log.info("a denoise step refused %d request(s): %s", len(group), exc.message)
                    else:
                        log.exception("a denoise step failed for %d request(s)", len(group))
                    for waiter in group:
                        waiter.work.finish(error=exc)
                        waiter.job = None
                    continue
                self._counted(sum(w.images for w in group))
            self._report_progress()
            remaining = []
            for waiter in self._active:
                if waiter.job is None:
                    continue
                if waiter.job.done:
                    try:
                        response = waiter.job.result()
                    except TriptychError as exc:  # NaN latents: that request fails, the batch goes on
                        log.warning("a denoise job failed at the end: %s", exc.message)
                        waiter.work.finish(error=exc)
                    else:
                        waiter.work.finish(response)
                else:
                    remaining.append(waiter)
            self._active = remaining
            self.active_images = sum(w.images for w in remaining)
