"""Jobs (SPEC §11): submit a generation, watch it form, cancel it, find its images later, across restarts.

``POST /v1/jobs`` stores the request (with its seed fixed, so a re-run gives the same pixels) in the job store
(``central.jobstore``: SQLite by default, Redis for several central replicas) and answers 202 at once. A
``JobRunner`` in each central process takes queued jobs (``jobs_concurrency`` at a time; the UNet batches
them step by step) and runs each exactly as the sync endpoint would, with the UNet's answer streamed: after
every step a ``progress`` event, every ``jobs_preview_every`` steps a ``preview`` (a JPEG of the linear
latent -> RGB approximation), both appended to the job's event log, which ``GET /v1/jobs/{id}/events`` relays
as Server-Sent Events from the first event on (``Last-Event-ID`` resumes).

Cancel cancels the job's task: the streamed UNet call is closed, and the UNet drops the job before its next
step (the path a disconnected client takes). On start-up, jobs left running by a process that died are
re-queued (or failed as ``interrupted`` after ``jobs_max_attempts``); a job that never started stays queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pybase64
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from central.images import MEDIA_TYPES, encode_images
from central.jobstore import TERMINAL, Job, JobStore, SqliteJobStore, open_store
from central.pipeline import Orchestrator
from central.requests import TASKS, read_job_request
from shared.errors import InvalidValue, NotFound, Overloaded, StageUnavailable, TriptychError, error_envelope
from shared.protocol import Txt2ImgRequest
from shared.settings import Settings

log = logging.getLogger("triptych.jobs")

#: Image fields of the task requests: stored as base64 text, left out of the job's public ``request``.
IMAGE_FIELDS = ("image", "mask_image")
IDEMPOTENCY_KEY_MAX = 200
#: How often a running job's lease is renewed (and a cancel asked on another replica is noticed).
RENEW_S = 1.0
#: How often an idle runner looks for jobs queued by another replica (its own wake it at once).
POLL_S = 1.0
#: A comment line on an idle event stream, so proxies keep it open.
SSE_KEEPALIVE_S = 15.0
PREVIEW_JPEG_QUALITY = 80
#: The longest pause between two runs of a job waiting for an unavailable stage.
STAGE_RETRY_MAX_S = 5.0
#: (event name, data) on their way to the store; None ends the stream.
EventQueue = asyncio.Queue[tuple[str, dict[str, Any]] | None]


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def stored_request(req: Txt2ImgRequest) -> dict[str, Any]:
    """What the store keeps of a request: JSON, images as base64, and the seed fixed (a re-queued job gives the
    pixels the first run would have)."""
    data = req.model_dump(mode="python", exclude_none=True)
    if data.get("seed") is None:
        data["seed"] = secrets.randbelow(2**31)

    def text(value: Any) -> Any:
        return pybase64.b64encode(value).decode("ascii") if isinstance(value, bytes) else value

    for name in IMAGE_FIELDS:
        if name in data:
            data[name] = text(data[name])
    for spec in data.get("controlnets", []):
        spec["image"] = text(spec["image"])
    return data


def public_request(request: dict[str, Any]) -> dict[str, Any]:
    """The job's request as ``GET /v1/jobs/{id}`` shows it: without the image data."""
    out = {k: v for k, v in request.items() if k not in IMAGE_FIELDS}
    if "controlnets" in out:
        out["controlnets"] = [{k: v for k, v in c.items() if k != "image"} for c in out["controlnets"]]
    return out


def owner_of(request: Request, keyed: bool) -> str:
    """Who submitted: a digest of the API key when keys are configured (the key itself is never stored),
    else the client's address."""
    if keyed:
        given = request.headers.get("authorization", "").partition(" ")[2].strip()
        return "key:" + hashlib.sha256(given.encode()).hexdigest()[:16]
    return "addr:" + (request.client.host if request.client else "unknown")


def preview_jpeg(preview: torch.Tensor) -> str:
    """The first image of a uint8 (B, h, w, 3) preview as base64 JPEG."""
    buf = io.BytesIO()
    Image.fromarray(preview[0].numpy()).save(buf, format="JPEG", quality=PREVIEW_JPEG_QUALITY)
    return pybase64.b64encode(buf.getvalue()).decode("ascii")


class JobRunner:
    """Takes queued jobs from the store and runs them (see the module docstring)."""

    def __init__(self, store: JobStore, orchestrator: Orchestrator, settings: Settings) -> None:
        self.store = store
        self.orchestrator = orchestrator
        self.settings = settings
        self.worker = f"central-{uuid.uuid4().hex[:12]}"
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._cancelled: set[str] = set()  # running jobs a user cancelled (not: this runner stopping)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        # One SQLite file has one central: whatever it shows running was running in a process that is gone.
        recovered = await self.store.recover(
            max_attempts=self.settings.jobs_max_attempts, all_running=isinstance(self.store, SqliteJobStore)
        )
        if any(recovered.values()):
            log.warning("jobs left by a previous run: %s", recovered)
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self.settings.jobs_concurrency)]
        self._tasks.append(asyncio.create_task(self._maintain()))

    async def stop(self) -> None:
        """Stop taking jobs; the running ones are left running in the store, and re-queued by the next start
        (SQLite) or once their lease expires (Redis)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def wake(self) -> None:
        self._wake.set()

    async def notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_change(self, timeout_s: float) -> None:
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout_s)

    # ------------------------------------------------------------------ the loop
    async def _work(self) -> None:
        while True:
            try:
                job = await self.store.claim(self.worker, self.settings.jobs_lease_s)
            except Exception:
                log.exception("claiming a job failed")
                job = None
            if job is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), POLL_S)
                continue
            await self.notify()
            try:
                await self._run(job)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job %s: the runner failed", job.id)
            await self.notify()

    async def _maintain(self) -> None:
        """Now and then: re-queue jobs whose lease expired (another replica died), drop expired results."""
        while True:
            await asyncio.sleep(max(self.settings.jobs_lease_s, 5.0))
            try:
                await self.store.recover(max_attempts=self.settings.jobs_max_attempts, all_running=False)
                await self.store.purge()
            except Exception:
                log.exception("job store maintenance failed")

    async def _run(self, job: Job) -> None:
        events: EventQueue = asyncio.Queue()
        writer = asyncio.create_task(self._write_events(job.id, events))
        generation = asyncio.create_task(self._patiently(job, events))
        self._running[job.id] = generation
        renewer = asyncio.create_task(self._renew(job.id, generation))
        try:
            images, output = await generation
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if job.id not in self._cancelled or (current is not None and current.cancelling()):
                raise  # this runner is stopping: the job stays running in the store, to be recovered
            await self._drain(events, writer)
            await self.store.finish(job.id, "canceled")
        except TriptychError as exc:
            await self._drain(events, writer)
            await self.store.finish(job.id, "failed", error=exc.envelope()["error"])
        except Exception:
            log.exception("job %s failed", job.id)
            await self._drain(events, writer)
            error = error_envelope("internal_error", "the job failed; see central's log")["error"]
            await self.store.finish(job.id, "failed", error=error)
        else:
            await self._drain(events, writer)
            await self.store.finish(job.id, "succeeded", output=output, images=images)
        finally:
            renewer.cancel()
            writer.cancel()
            self._running.pop(job.id, None)
            self._cancelled.discard(job.id)

    async def _drain(self, events: EventQueue, writer: asyncio.Task[None]) -> None:
        """Let the events already produced reach the store before the terminal one."""
        events.put_nowait(None)
        with contextlib.suppress(Exception):
            await writer

    async def _write_events(self, job_id: str, events: EventQueue) -> None:
        while (item := await events.get()) is not None:
            name, data = item
            try:
                if name == "progress":
                    await self.store.set_progress(job_id, data["step"], data["steps"])
                await self.store.append_event(job_id, name, data)
            except Exception:
                log.exception("job %s: writing a %s event failed", job_id, name)
            await self.notify()

    async def _renew(self, job_id: str, generation: asyncio.Task[Any]) -> None:
        """Keep the lease; stop the job when the store says it is no longer ours (cancelled elsewhere)."""
        while not generation.done():
            await asyncio.sleep(RENEW_S)
            try:
                if not await self.store.renew(job_id, self.worker, self.settings.jobs_lease_s):
                    self._cancelled.add(job_id)
                    generation.cancel()
                    return
            except Exception:
                log.exception("job %s: renewing its lease failed", job_id)

    async def _patiently(self, job: Job, events: EventQueue) -> tuple[list[bytes], dict[str, Any]]:
        """``_generate``, run again while a stage is unavailable (restarting, scaling from zero), for up to
        ``jobs_stage_wait_s``: a job outlives a stage's restart instead of failing with it. Each wait is a
        ``waiting`` event; a run again starts over (its seed is fixed, so its pixels are the same)."""
        deadline = time.monotonic() + self.settings.jobs_stage_wait_s
        delay = 1.0
        while True:
            try:
                return await self._generate(job, events)
            except StageUnavailable as exc:
                if time.monotonic() + delay > deadline:
                    raise
                events.put_nowait(("waiting", {"error": exc.envelope()["error"], "retry_in_s": delay}))
                await asyncio.sleep(delay)
                delay = min(delay * 2, STAGE_RETRY_MAX_S)

    async def _generate(self, job: Job, events: EventQueue) -> tuple[list[bytes], dict[str, Any]]:
        """The job's task, as the sync endpoint runs it; returns the image files and the output without them."""
        data = dict(job.request)
        preview_every = int(data.pop("preview_every", self.settings.jobs_preview_every))
        req = TASKS[job.task].model_validate(data)
        started = time.perf_counter()
        first: list[tuple[int, float]] = []  # the first step reported, and when

        def on_progress(event: dict[str, Any]) -> None:  # on the event loop, between two UNet steps
            step, steps = int(event["step"]), int(event["steps"])
            now = time.perf_counter()
            first[:] = first or [(step, now)]
            done, since = step - first[0][0], now - first[0][1]
            eta = round(since / done * (steps - step), 2) if done > 0 else None
            events.put_nowait(("progress", {"step": step, "steps": steps, "eta_s": eta}))
            preview = event.get("preview")
            if isinstance(preview, torch.Tensor) and preview.ndim == 4:
                events.put_nowait(("preview", {"step": step, "image": preview_jpeg(preview)}))

        gen = await self.orchestrator.generate(req, on_progress=on_progress, preview_every=preview_every)
        t0 = time.perf_counter()
        files = await run_in_threadpool(encode_images, gen.images, req.output_format)
        timings = {**gen.timings_ms, "image_encode_ms": (time.perf_counter() - t0) * 1000}
        timings["total_ms"] = (time.perf_counter() - started) * 1000
        output = {
            "seeds": gen.seeds,
            "parameters": {**gen.parameters, "output_format": req.output_format},
            "timings": timings,
            "media_type": MEDIA_TYPES[req.output_format],
            "num_images": len(files),
        }
        return files, output

    async def cancel(self, job_id: str) -> Job | None:
        job = await self.store.request_cancel(job_id)
        if job is not None and job.status == "running" and job_id in self._running:
            self._cancelled.add(job_id)
            self._running[job_id].cancel()  # the UNet call closes: the job leaves its batch before the next step
        await self.notify()
        return job


# ---------------------------------------------------------------------------------------------- routes
def job_urls(job_id: str) -> dict[str, str]:
    base = f"/v1/jobs/{job_id}"
    return {"get": base, "events": f"{base}/events", "cancel": f"{base}/cancel"}


async def job_body(store: JobStore, job: Job, *, images: bool = True) -> dict[str, Any]:
    """``GET /v1/jobs/{id}``: the job, with the sync response as ``output`` once it succeeded (its ``images``
    only when ``images``: a listing links them by ``image_urls`` instead of carrying every job's pixels)."""
    output: dict[str, Any] | None = None
    image_urls: list[str] = []
    if job.status == "succeeded" and job.output is not None:
        count = int(job.output.get("num_images", 0))
        image_urls = [f"/v1/jobs/{job.id}/images/{i}" for i in range(count)]
        output = {k: job.output[k] for k in ("seeds", "parameters", "timings") if k in job.output}
        if images:
            files = [await store.image(job.id, i) for i in range(count)]
            output["images"] = [pybase64.b64encode(f).decode("ascii") for f in files if f is not None]
    queued_until = job.started_at or job.finished_at or time.time()
    return {
        "id": job.id,
        "task": job.task,
        "status": job.status,
        "progress": job.progress,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "timings": {
            "queued_ms": round((queued_until - job.created_at) * 1000, 1),
            "running_ms": None
            if job.started_at is None
            else round(((job.finished_at or time.time()) - job.started_at) * 1000, 1),
        },
        "attempts": job.attempts,
        "error": job.error,
        "output": output,
        "image_urls": image_urls,
        "request": public_request(job.request),
        "urls": job_urls(job.id),
    }


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def install_jobs(app: FastAPI, settings: Settings) -> None:
    """The ``/v1/jobs`` routes; the store and the runner start with the app (``start_jobs``)."""
    keyed = bool(settings.api_keys.get_secret_value())

    def runner(request: Request) -> JobRunner:
        jobs: JobRunner | None = getattr(request.app.state, "jobs", None)
        if jobs is None:
            raise TriptychError("the job runner is not running")
        return jobs

    async def found(jobs: JobRunner, job_id: str) -> Job:
        job = await jobs.store.get(job_id) if len(job_id) <= 64 else None
        if job is None:
            raise NotFound(f"no job {job_id[:64]!r} (finished jobs are kept {settings.jobs_ttl_s:g} s)", param="id")
        return job

    @app.post("/v1/jobs", status_code=202, summary="Submit a generation of any task as a job; 202 at once")
    async def submit(request: Request) -> Response:
        jobs = runner(request)
        key = request.headers.get("idempotency-key")
        if key is not None and not 0 < len(key) <= IDEMPOTENCY_KEY_MAX:
            raise InvalidValue(f"Idempotency-Key must be 1-{IDEMPOTENCY_KEY_MAX} characters", param="Idempotency-Key")
        owner = owner_of(request, keyed)
        task, req, preview_every = await read_job_request(request, settings)
        unfinished = await jobs.store.count_unfinished()
        if unfinished >= settings.jobs_max_queued:
            raise Overloaded(
                f"{unfinished} jobs are queued or running (TRIPTYCH_JOBS_MAX_QUEUED={settings.jobs_max_queued}); "
                "retry later",
                retry_after_s=5,
            )
        stored = stored_request(req)
        if preview_every is not None:
            stored["preview_every"] = preview_every
        job, created = await jobs.store.create(task, stored, idempotency_key=key, owner=owner)
        if created:
            jobs.wake()
        body = {"id": job.id, "status": job.status, "urls": job_urls(job.id)}
        return json_response(body, 202, {"Location": f"/v1/jobs/{job.id}"})

    @app.get("/v1/jobs", summary="Recent jobs, newest first (with API keys: the caller's own)")
    async def list_jobs(request: Request, limit: int = 50) -> Response:
        jobs = runner(request)
        if not 1 <= limit <= 500:
            raise InvalidValue("`limit` must be 1-500", param="limit")
        found_jobs = await jobs.store.list(limit=limit, owner=owner_of(request, True) if keyed else None)
        return json_response({"jobs": [await job_body(jobs.store, j, images=False) for j in found_jobs]})

    @app.get("/v1/jobs/{job_id}", summary="A job: status, progress, timings, and its output once succeeded")
    async def get_job(request: Request, job_id: str) -> Response:
        jobs = runner(request)
        return json_response(await job_body(jobs.store, await found(jobs, job_id)))

    @app.get("/v1/jobs/{job_id}/images/{index}", summary="One image of a succeeded job, as a file")
    async def job_image(request: Request, job_id: str, index: int) -> Response:
        jobs = runner(request)
        job = await found(jobs, job_id)
        data = await jobs.store.image(job_id, index) if job.status == "succeeded" and index >= 0 else None
        if data is None or job.output is None:
            raise NotFound(f"job {job_id} has no image {index} (status {job.status})", param="index")
        return Response(data, media_type=str(job.output.get("media_type", "application/octet-stream")),
                        headers={"Cache-Control": "private, max-age=3600"})  # fmt: skip

    @app.post("/v1/jobs/{job_id}/cancel", summary="Cancel a job: the UNet stops it before its next step")
    async def cancel_job(request: Request, job_id: str) -> Response:
        jobs = runner(request)
        job = await found(jobs, job_id)
        if job.status in TERMINAL:
            return JSONResponse(
                error_envelope("conflict", f"job {job_id} has already finished ({job.status})", "id"), 409
            )
        await jobs.cancel(job_id)
        return json_response(await job_body(jobs.store, await found(jobs, job_id)))

    @app.get("/v1/jobs/{job_id}/events", summary="Server-Sent Events of a job, from its first (Last-Event-ID resumes)")
    async def job_events(request: Request, job_id: str) -> StreamingResponse:
        jobs = runner(request)
        job = await found(jobs, job_id)
        after = 0
        with contextlib.suppress(ValueError):
            after = max(0, int(request.headers.get("last-event-id", "0")))

        async def stream() -> AsyncIterator[bytes]:
            nonlocal after
            terminal = job.status in TERMINAL
            idle = time.monotonic()
            while True:
                batch = await jobs.store.events(job_id, after)
                for event in batch:
                    after = event.id
                    data = orjson.dumps(event.data).decode()
                    yield f"id: {event.id}\nevent: {event.event}\ndata: {data}\n\n".encode()
                    terminal = terminal or event.event in TERMINAL
                if batch:
                    idle = time.monotonic()
                if terminal and not batch:
                    return
                if time.monotonic() - idle > SSE_KEEPALIVE_S:
                    yield b": keep-alive\n\n"
                    idle = time.monotonic()
                if not batch:
                    await jobs.wait_change(POLL_S)
                    if not terminal and await jobs.store.get(job_id) is None:
                        return  # dropped (its TTL passed) while this stream waited

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )


async def start_jobs(app: FastAPI, settings: Settings, orchestrator: Orchestrator) -> JobRunner:
    """Open the store and start the runner (called from central's lifespan)."""
    cache = settings.cache_dir / "jobs"
    results = settings.jobs_dir or cache
    store = open_store(
        jobs_url=settings.jobs_url or None,
        db_path=settings.jobs_db or cache / "jobs.sqlite3",
        results_dir=Path(results) / "results" if settings.jobs_dir is None else Path(results),
        ttl_s=settings.jobs_ttl_s,
        max_bytes=settings.jobs_max_bytes,
    )
    await store.open()
    runner = JobRunner(store, orchestrator, settings)
    await runner.start()
    app.state.jobs = runner
    return runner


async def stop_jobs(app: FastAPI) -> None:
    runner: JobRunner | None = getattr(app.state, "jobs", None)
    if runner is not None:
        await runner.stop()
        await runner.store.close()
        app.state.jobs = None
