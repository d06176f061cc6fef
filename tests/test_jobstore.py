"""The durable job store (``central/jobstore.py``): one suite, run against both backends.

SQLite needs nothing; Redis runs against a real ``redis-server`` started here on a free port (the Debian
package ``redis-server``), and those cases skip when it is not installed. Time is a fake clock the test
moves, so leases and TTLs expire without sleeping.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from central.jobstore import (
    TERMINAL,
    Event,
    JobStore,
    RedisJobStore,
    SqliteJobStore,
    open_store,
)
from tests.conftest import REPO

T = TypeVar("T")
TTL = 3600.0
MAX_BYTES = 1 << 30
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3
JPEG = b"\xff\xd8\xff\xe0" + b"jpeg-body" * 50
REDIS_MISSING = "redis-server is not installed (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real, throwaway redis-server (no persistence) for this module; each test uses its own key prefix."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip(REDIS_MISSING)
    port = _free_port()
    workdir = tmp_path_factory.mktemp("redis")
    args = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*args, "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"redis-server exited with {proc.returncode}"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start listening"
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def run(loop: asyncio.AbstractEventLoop) -> Callable[[Coroutine[Any, Any, T]], T]:
    return loop.run_until_complete


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["sqlite", "redis"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, loop: asyncio.AbstractEventLoop, clock: FakeClock
) -> Iterator[JobStore]:
    """An open store of each backend, empty, on the fake clock."""
    s: SqliteJobStore | RedisJobStore
    if request.param == "sqlite":
        s = SqliteJobStore(tmp_path / "jobs.db", tmp_path / "results", ttl_s=TTL, max_bytes=MAX_BYTES, clock=clock)
    else:
        url = request.getfixturevalue("redis_url")
        s = RedisJobStore(url, ttl_s=TTL, max_bytes=MAX_BYTES, prefix=f"test:{uuid.uuid4().hex}:", clock=clock)
    loop.run_until_complete(s.open())
    yield s
    loop.run_until_complete(s.close())


def another_handle(store: JobStore) -> SqliteJobStore | RedisJobStore:
    """A second, independent (unopened) store on the same data: the same file, or the same Redis and prefix."""
    if isinstance(store, SqliteJobStore):
        return SqliteJobStore(
            store.path, store.results_dir, ttl_s=store.ttl_s, max_bytes=store.max_bytes, clock=store.clock
        )
    assert isinstance(store, RedisJobStore)
    return RedisJobStore(
        store.url, ttl_s=store.ttl_s, max_bytes=store.max_bytes, prefix=store.prefix, clock=store.clock
    )


def names(events: list[Event]) -> list[str]:
    return [e.event for e in events]


# ----------------------------------------------------------------------------------------------- create / get
def test_create_get_and_list_newest_first(store: JobStore, run: Any, clock: FakeClock) -> None:
    async def body() -> None:
        request = {"prompt": "a lighthouse, ünïcødé 🌊", "steps": 20, "image": "aGVsbG8=", "nested": {"a": [1, 2.5]}}
        first, created = await store.create("txt2img", request, owner="alice")
        assert created and len(first.id) == 32 and first.status == "queued"
        clock.advance(1)
        second, _ = await store.create("img2img", {"prompt": "b"}, owner="bob")
        clock.advance(1)
        third, _ = await store.create("inpaint", {"prompt": "c"}, owner="alice")

        got = await store.get(first.id)
        assert got is not None
        assert (got.task, got.request, got.status, got.created_at) == ("txt2img", request, "queued", first.created_at)
        assert got.created_at == clock.now - 2
        assert (got.started_at, got.finished_at, got.attempts, got.error, got.output) == (None, None, 0, None, None)
        assert got.progress == {"step": 0, "steps": 0} and not got.cancel_requested and got.owner == "alice"
        assert await store.get(uuid.uuid4().hex) is None

        assert [j.id for j in await store.list()] == [third.id, second.id, first.id]
        assert [j.id for j in await store.list(limit=2)] == [third.id, second.id]
        assert [j.id for j in await store.list(owner="alice")] == [third.id, first.id]
        assert await store.list(owner="nobody") == []
        assert await store.count_unfinished() == 3
        assert await store.events(first.id) == [Event(1, "queued", {"status": "queued"})]

    run(body())


def test_an_idempotency_key_returns_the_same_job_also_after_reopening(store: JobStore, run: Any) -> None:
    async def body() -> str:
        job, created = await store.create("txt2img", {"prompt": "a"}, idempotency_key="k1", owner="alice")
        again, created_again = await store.create("txt2img", {"prompt": "other"}, idempotency_key="k1", owner="alice")
        assert created and not created_again
        assert again.id == job.id and again.request == {"prompt": "a"}
        # The key is scoped by owner; no key never deduplicates.
        other, other_created = await store.create("txt2img", {"prompt": "a"}, idempotency_key="k1", owner="bob")
        assert other_created and other.id != job.id
        plain1, _ = await store.create("txt2img", {"prompt": "a"})
        plain2, _ = await store.create("txt2img", {"prompt": "a"})
        assert plain1.id != plain2.id
        assert len(await store.list()) == 4
        assert names(await store.events(job.id)) == ["queued"]  # no second "queued" for the replay
        return job.id

    job_id = run(body())
    run(store.close())

    async def reopened() -> None:
        fresh = another_handle(store)
        await fresh.open()
        try:
            job, created = await fresh.create("txt2img", {"prompt": "b"}, idempotency_key="k1", owner="alice")
            assert job.id == job_id and not created
            assert len(await fresh.list()) == 4
        finally:
            await fresh.close()

    run(reopened())
    run(store.open())  # the fixture closes it


def test_concurrent_creates_with_one_key_make_one_job(store: JobStore, run: Any) -> None:
    async def body() -> None:
        results = await asyncio.gather(*(store.create("txt2img", {"i": i}, idempotency_key="same") for i in range(20)))
        assert len({job.id for job, _ in results}) == 1
        assert sum(created for _, created in results) == 1
        assert await store.count_unfinished() == 1

    run(body())


# ------------------------------------------------------------------------------------------------------ claim
def test_claim_takes_the_oldest_queued_job_and_leases_it(store: JobStore, run: Any, clock: FakeClock) -> None:
    async def body() -> None:
        # Same timestamp for all three: the order is creation order, not the clock.
        ids = [(await store.create("txt2img", {"n": n}))[0].id for n in range(3)]
        claimed = await store.claim("worker-a", 30)
        assert claimed is not None and claimed.id == ids[0]
        assert (claimed.status, claimed.attempts, claimed.worker) == ("running", 1, "worker-a")
        assert claimed.started_at == clock.now and claimed.lease_until == clock.now + 30
        stored = await store.get(ids[0])
        assert stored is not None and stored.status == "running" and stored.lease_until == clock.now + 30
        assert await store.events(ids[0]) == [
            Event(1, "queued", {"status": "queued"}),
            Event(2, "started", {"attempt": 1, "worker": "worker-a"}),
        ]
        assert await store.count_unfinished() == 3
        second, third = await store.claim("worker-b", 30), await store.claim("worker-a", 30)
        assert second is not None and third is not None and [second.id, third.id] == ids[1:]
        assert await store.claim("worker-a", 30) is None
        assert await store.count_unfinished() == 3
        assert await store.finish(ids[1], "succeeded")
        assert await store.count_unfinished() == 2

    run(body())


def test_concurrent_claimers_never_get_the_same_job(store: JobStore, run: Any) -> None:
    async def body() -> None:
        ids = {(await store.create("txt2img", {"n": n}))[0].id for n in range(20)}
        claims = await asyncio.gather(*(store.claim(f"w{i}", 30) for i in range(30)))
        got = [job.id for job in claims if job is not None]
        assert len(got) == len(set(got)) == 20 and set(got) == ids
        assert sum(job is None for job in claims) == 10

    run(body())


def test_two_store_instances_on_the_same_data_never_share_a_job(store: JobStore, run: Any) -> None:
    """Two handles (SQLite: two connections on one file, each on its own thread; Redis: two clients, as two
    central replicas) claiming at once."""

    async def body() -> None:
        other = another_handle(store)
        await other.open()
        try:
            ids = {(await store.create("txt2img", {"n": n}))[0].id for n in range(24)}
            claims = await asyncio.gather(
                *(s.claim(f"{name}-{i}", 30) for i in range(16) for name, s in (("one", store), ("two", other)))
            )
            got = [job.id for job in claims if job is not None]
            assert len(got) == len(set(got)) == 24 and set(got) == ids
            by_worker = {job.worker or "" for job in claims if job is not None}
            assert any(w.startswith("one") for w in by_worker) and any(w.startswith("two") for w in by_worker)
        finally:
            await other.close()

    run(body())


def test_renew_extends_only_this_workers_lease(store: JobStore, run: Any, clock: FakeClock) -> None:
    async def body() -> None:
        job, _ = await store.create("txt2img", {})
        assert await store.claim("w1", 10) is not None
        assert not await store.renew(job.id, "w2", 60)
        clock.advance(5)
        assert await store.renew(job.id, "w1", 60)
        got = await store.get(job.id)
        assert got is not None and got.lease_until == clock.now + 60
        assert not await store.renew(uuid.uuid4().hex, "w1", 60)
        assert await store.finish(job.id, "failed", error={"type": "x", "message": "y", "param": None})
        assert not await store.renew(job.id, "w1", 60)

    run(body())


# ---------------------------------------------------------------------------------------- progress and events
def test_progress_and_events_keep_their_order_and_resume_after_an_id(store: JobStore, run: Any) -> None:
    async def body() -> None:
        job, _ = await store.create("txt2img", {})
        await store.claim("w", 30)
        await store.set_progress(job.id, 3, 10)
        got = await store.get(job.id)
        assert got is not None and got.progress == {"step": 3, "steps": 10}
        ids = [await store.append_event(job.id, "progress", {"step": s, "steps": 10, "eta_s": 1.5}) for s in (1, 2)]
        ids.append(await store.append_event(job.id, "preview", {"step": 2, "image": "/9j/AAAA"}))
        assert ids == [3, 4, 5]  # 1 queued, 2 started
        events = await store.events(job.id)
        assert [e.id for e in events] == [1, 2, 3, 4, 5]
        assert names(events) == ["queued", "started", "progress", "progress", "preview"]
        assert events[3].data == {"step": 2, "steps": 10, "eta_s": 1.5}
        assert await store.events(job.id, after=3) == events[3:]
        assert await store.events(job.id, after=5) == []
        assert await store.events(uuid.uuid4().hex) == []
        # Progress stops moving once the job is finished.
        assert await store.finish(job.id, "succeeded")
        await store.set_progress(job.id, 9, 10)
        got = await store.get(job.id)
        assert got is not None and got.progress == {"step": 3, "steps": 10}

    run(body())


def test_concurrent_event_appends_get_distinct_consecutive_ids(store: JobStore, run: Any) -> None:
    async def body() -> None:
        job, _ = await store.create("txt2img", {})
        ids = await asyncio.gather(*(store.append_event(job.id, "progress", {"step": s}) for s in range(25)))
        assert sorted(ids) == list(range(2, 27))
        assert [e.id for e in await store.events(job.id)] == list(range(1, 27))

    run(body())


# ------------------------------------------------------------------------------------------------------ finish
def test_finish_with_images_then_the_images_are_served(store: JobStore, run: Any, clock: FakeClock) -> None:
    async def body() -> None:
        job, _ = await store.create("txt2img", {"prompt": "x"})
        await store.claim("w", 30)
        clock.advance(2)
        output = {"seeds": [7, 8], "parameters": {"steps": 2}, "timings": {"total_ms": 1.0}, "num_images": 2}
        assert await store.finish(job.id, "succeeded", output=output, images=[PNG, JPEG])
        got = await store.get(job.id)
        assert got is not None
        assert (got.status, got.finished_at, got.output, got.error) == ("succeeded", clock.now, output, None)
        assert await store.image(job.id, 0) == PNG
        assert await store.image(job.id, 1) == JPEG
        assert await store.image(job.id, 2) is None
        assert await store.image(job.id, -1) is None
        assert await store.image(uuid.uuid4().hex, 0) is None
        last = (await store.events(job.id))[-1]
        assert (last.event, last.data) == ("succeeded", {"status": "succeeded", "error": None})
        if isinstance(store, SqliteJobStore):
            assert sorted(p.name for p in (store.results_dir / job.id).iterdir()) == ["0.png", "1.jpg"]
            assert [p.name for p in store.results_dir.iterdir()] == [job.id]  # no temporary left behind

        # A second finish is refused and changes nothing.
        n_events = len(await store.events(job.id))
        assert not await store.finish(job.id, "failed", error={"type": "x", "message": "late", "param": None})
        assert not await store.finish(job.id, "succeeded", images=[b"other"])
        again = await store.get(job.id)
        assert again is not None and (again.status, again.error) == ("succeeded", None)
        assert await store.image(job.id, 0) == PNG
        assert len(await store.events(job.id)) == n_events

    run(body())


def test_concurrent_finishes_let_exactly_one_win_with_its_images(store: JobStore, run: Any) -> None:
    async def body() -> None:
        job, _ = await store.create("txt2img", {})
        await store.claim("w", 30)
        candidates = [bytes([i]) * (100 + i) for i in range(6)]
        results = await asyncio.gather(*(store.finish(job.id, "succeeded", images=[c]) for c in candidates))
        assert sum(results) == 1
        assert await store.image(job.id, 0) == candidates[results.index(True)]
        assert names(await store.events(job.id)).count("succeeded") == 1
        if isinstance(store, SqliteJobStore):
            assert [p.name for p in store.results_dir.iterdir()] == [job.id]

    run(body())


def test_a_failed_job_keeps_its_error_and_no_images(store: JobStore, run: Any) -> None:
    async def body() -> None:
        job, _ = await store.create("txt2img", {})
        await store.claim("w", 30)
        error = {"type": "stage_unavailable", "message": "the UNet is down", "param": None}
        assert await store.finish(job.id, "failed", error=error, images=[PNG])
        got = await store.get(job.id)
        assert got is not None and got.status == "failed" and got.error == error
        assert await store.image(job.id, 0) is None
        last = (await store.events(job.id))[-1]
        assert (last.event, last.data) == ("failed", {"status": "failed", "error": error})
        assert not await store.finish(uuid.uuid4().hex, "succeeded")
        with pytest.raises(ValueError, match="terminal"):
            await store.finish(job.id, "running")

    run(body())


# ------------------------------------------------------------------------------------------------------ cancel
def test_cancel_queued_running_finished_and_unknown(store: JobStore, run: Any) -> None:
    async def body() -> None:
        running, _ = await store.create("txt2img", {"n": 1})
        finished, _ = await store.create("txt2img", {"n": 2})
        claimed = [await store.claim("w", 30), await store.claim("w", 30)]
        assert [job.id for job in claimed if job is not None] == [running.id, finished.id]
        assert await store.finish(finished.id, "succeeded")
        waiting, _ = await store.create("txt2img", {"n": 3})
        assert await store.count_unfinished() == 2

        canceled = await store.request_cancel(waiting.id)
        assert canceled is not None and canceled.status == "canceled" and canceled.finished_at is not None
        last = (await store.events(waiting.id))[-1]
        assert (last.event, last.data) == ("canceled", {"status": "canceled", "error": None})
        assert await store.count_unfinished() == 1
        assert await store.claim("w2", 30) is None  # a canceled job is never started
        assert not await store.finish(waiting.id, "succeeded")

        flagged = await store.request_cancel(running.id)
        assert flagged is not None and flagged.status == "running" and flagged.cancel_requested
        assert "canceled" not in names(await store.events(running.id))
        assert not await store.renew(running.id, "w", 30)  # tells the runner to stop
        assert await store.finish(running.id, "canceled")
        got = await store.get(running.id)
        assert got is not None and got.status == "canceled"

        unchanged = await store.request_cancel(finished.id)
        assert unchanged is not None and unchanged.status == "succeeded" and not unchanged.cancel_requested
        assert names(await store.events(finished.id))[-1] == "succeeded"
        assert await store.request_cancel(uuid.uuid4().hex) is None

    run(body())


# ----------------------------------------------------------------------------------------------------- recover
def test_recover_requeues_expired_leases_and_leaves_the_rest(store: JobStore, run: Any, clock: FakeClock) -> None:
    async def body() -> None:
        short, _ = await store.create("txt2img", {"n": 1})
        long, _ = await store.create("txt2img", {"n": 2})
        waiting, _ = await store.create("txt2img", {"n": 3})
        await store.claim("dead", 10)
        await store.claim("alive", 100)
        await store.set_progress(short.id, 4, 10)
        clock.advance(50)
        assert await store.recover(max_attempts=3, all_running=False) == {"requeued": 1, "failed": 0, "canceled": 0}
        got = await store.get(short.id)
        assert got is not None and (got.status, got.attempts, got.worker) == ("queued", 1, None)
        assert got.progress == {"step": 0, "steps": 0}
        assert (await store.events(short.id))[-1] == Event(3, "requeued", {"attempts": 1})
        alive = await store.get(long.id)
        assert alive is not None and alive.status == "running" and alive.worker == "alive"
        still = await store.get(waiting.id)
        assert still is not None and still.status == "queued" and still.attempts == 0
        assert await store.count_unfinished() == 3
        # The re-queued job keeps its place: it is older than `waiting`.
        again = await store.claim("new", 10)
        assert again is not None and again.id == short.id and again.attempts == 2

    run(body())


def test_recover_fails_a_job_that_keeps_getting_interrupted(store: JobStore, run: Any, clock: FakeClock) -> None:
    async def body() -> None:
        job, _ = await store.create("txt2img", {})
        for _ in range(2):
            assert (await store.claim("w", 10)) is not None
            clock.advance(11)
            counts = await store.recover(max_attempts=2, all_running=False)
        assert counts == {"requeued": 0, "failed": 1, "canceled": 0}
        got = await store.get(job.id)
        assert got is not None and got.status == "failed" and got.attempts == 2
        assert got.error is not None and got.error["type"] == "interrupted" and got.error["param"] is None
        assert names(await store.events(job.id)) == ["queued", "started", "requeued", "started", "failed"]
        assert (await store.events(job.id))[-1].data == {"status": "failed", "error": got.error}
        assert await store.count_unfinished() == 0
        assert not await store.finish(job.id, "succeeded")

    run(body())


def test_recover_all_running_takes_back_unexpired_jobs(store: JobStore, run: Any) -> None:
    async def body() -> None:
        a, _ = await store.create("txt2img", {})
        b, _ = await store.create("txt2img", {})
        c, _ = await store.create("txt2img", {})
        await store.claim("w", 1e6)
        await store.claim("w", 1e6)
        assert await store.recover(max_attempts=3, all_running=False) == {"requeued": 0, "failed": 0, "canceled": 0}
        assert await store.recover(max_attempts=3, all_running=True) == {"requeued": 2, "failed": 0, "canceled": 0}
        jobs = {j.id: j for j in await store.list()}
        assert [jobs[i].status for i in (a.id, b.id, c.id)] == ["queued"] * 3
        assert [jobs[i].attempts for i in (a.id, b.id, c.id)] == [1, 1, 0]

    run(body())


def test_recover_cancels_a_running_job_whose_cancel_was_requested(store: JobStore, run: Any) -> None:
    async def body() -> None:
        job, _ = await store.create("txt2img", {})
        await store.claim("w", 30)
        await store.request_cancel(job.id)
        assert await store.recover(max_attempts=3, all_running=True) == {"requeued": 0, "failed": 0, "canceled": 1}
        got = await store.get(job.id)
        assert got is not None and got.status == "canceled"
        assert names(await store.events(job.id))[-1] == "canceled"

    run(body())


# ------------------------------------------------------------------------------------------------------- purge
async def _finished(store: JobStore, images: list[bytes] | None = None, key: str | None = None) -> str:
    job, _ = await store.create("txt2img", {}, idempotency_key=key)
    claimed = await store.claim("w", 30)
    assert claimed is not None and claimed.id == job.id
    assert await store.finish(job.id, "succeeded", output={"num_images": len(images or [])}, images=images)
    return job.id


def test_purge_drops_finished_jobs_past_the_ttl(store: JobStore, run: Any, clock: FakeClock) -> None:
    async def body() -> None:
        old_running, _ = await store.create("txt2img", {"n": "started long ago, still running"})
        await store.claim("slow", 1e6)
        old = await _finished(store, [PNG], key="old-key")
        clock.advance(TTL / 2)
        recent = await _finished(store, [JPEG])
        clock.advance(TTL / 2 + 1)
        assert await store.purge() == 1
        assert await store.get(old) is None
        assert await store.image(old, 0) is None
        assert await store.events(old) == []
        assert await store.image(recent, 0) == JPEG
        assert [j.id for j in await store.list()] == [recent, old_running.id]
        if isinstance(store, SqliteJobStore):
            assert not (store.results_dir / old).exists() and (store.results_dir / recent).exists()
        # The key is free again once its job is gone.
        fresh, created = await store.create("txt2img", {}, idempotency_key="old-key")
        assert created and fresh.id != old
        assert await store.purge() == 0

    run(body())


def test_purge_drops_the_oldest_finished_jobs_while_images_exceed_max_bytes(
    store: JobStore, run: Any, clock: FakeClock
) -> None:
    async def body() -> None:
        no_images = await _finished(store)
        clock.advance(1)
        ids = []
        for n in range(3):
            ids.append(await _finished(store, [bytes([n]) * 60, bytes([n]) * 40]))
            clock.advance(1)
        store.max_bytes = 250  # type: ignore[attr-defined]
        assert await store.purge() == 1
        assert await store.get(ids[0]) is None and await store.image(ids[0], 0) is None
        assert [await store.image(i, 1) for i in ids[1:]] == [bytes([1]) * 40, bytes([2]) * 40]
        assert await store.get(no_images) is not None  # dropping it would free nothing
        store.max_bytes = 100  # type: ignore[attr-defined]
        assert await store.purge() == 1
        assert await store.get(ids[1]) is None and await store.get(ids[2]) is not None
        if isinstance(store, SqliteJobStore):
            assert sorted(p.name for p in store.results_dir.iterdir()) == [ids[2]]

    run(body())


def test_sqlite_purge_removes_result_directories_no_job_owns(tmp_path: Path, run: Any, clock: FakeClock) -> None:
    async def body() -> None:
        store = SqliteJobStore(tmp_path / "jobs.db", tmp_path / "results", ttl_s=TTL, max_bytes=MAX_BYTES, clock=clock)
        await store.open()
        try:
            running, _ = await store.create("txt2img", {})
            await store.claim("w", 30)
            done = await _finished(store, [PNG])
            queued, _ = await store.create("txt2img", {})
            root = store.results_dir
            leftovers = [root / uuid.uuid4().hex, root / f"{done}.{uuid.uuid4().hex}.tmp", root / queued.id]
            in_flight = root / f"{running.id}.{uuid.uuid4().hex}.tmp"  # a finish writing right now
            for d in [*leftovers, in_flight]:
                d.mkdir()
                (d / "0.png").write_bytes(PNG)
            assert await store.purge() == 0
            assert sorted(p.name for p in root.iterdir()) == sorted([done, in_flight.name])
            assert await store.image(done, 0) == PNG
        finally:
            await store.close()

    run(body())


def test_redis_gives_finished_jobs_a_ttl(redis_url: str, run: Any, clock: FakeClock) -> None:
    """Redis drops a finished job (hash, events, images, idempotency key) by itself after ttl_s."""
    store = RedisJobStore(redis_url, ttl_s=TTL, max_bytes=MAX_BYTES, prefix=f"test:{uuid.uuid4().hex}:", clock=clock)

    async def body() -> None:
        await store.open()
        try:
            job_id = await _finished(store, [PNG], key="k")
            waiting, _ = await store.create("txt2img", {})
            r = store._r
            keys = [
                k.decode() for k in await r.keys(store.prefix + "*") if isinstance(k, bytes) and job_id.encode() in k
            ]
            assert sorted(k.split(":")[2] for k in keys) == ["events", "img", "job"]
            idem = await r.keys(store.prefix + "idem:*")
            assert len(idem) == 1
            for key in [*keys, idem[0]]:
                assert 0 < await r.pttl(key) <= TTL * 1000, key
            assert await r.pttl(store.prefix + "job:" + waiting.id) == -1  # an unfinished job never expires
        finally:
            await store.close()

    run(body())


# -------------------------------------------------------------------------------------------- factory, SQLite
def test_open_store_picks_the_backend_from_the_url(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {"db_path": tmp_path / "j.db", "results_dir": tmp_path / "r", "ttl_s": 1.0, "max_bytes": 1}
    assert isinstance(open_store(jobs_url=None, **kwargs), SqliteJobStore)
    assert isinstance(open_store(jobs_url="", **kwargs), SqliteJobStore)
    for url in ("redis://localhost:6379/0", "rediss://cache.example:6380"):
        store = open_store(jobs_url=url, **kwargs)
        assert isinstance(store, RedisJobStore) and store.url == url


def test_sqlite_uses_wal(tmp_path: Path, run: Any) -> None:
    store = SqliteJobStore(tmp_path / "jobs.db", tmp_path / "results", ttl_s=TTL, max_bytes=MAX_BYTES)
    run(store.open())
    run(store.close())
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


CHILD = r"""
import asyncio, sys
from pathlib import Path
from central.jobstore import SqliteJobStore

PNG = bytes.fromhex(sys.argv[3])

async def main():
    store = SqliteJobStore(Path(sys.argv[1]), Path(sys.argv[2]), ttl_s=3600, max_bytes=1 << 30)
    await store.open()
    done, _ = await store.create("txt2img", {"prompt": "done"})
    await store.claim("child", 3600)
    await store.finish(done.id, "succeeded", output={"num_images": 1}, images=[PNG])
    print("finished", done.id, flush=True)
    held, _ = await store.create("txt2img", {"prompt": "held"})
    await store.claim("child", 3600)
    print("running", held.id, flush=True)
    i = 0
    while True:
        job, _ = await store.create("txt2img", {"prompt": f"p{i}"}, idempotency_key=f"k{i}")
        print("created", job.id, f"k{i}", flush=True)
        await store.set_progress(held.id, i, 10**6)
        await store.append_event(held.id, "progress", {"step": i})
        i += 1

asyncio.run(main())
"""


def test_sqlite_survives_kill_9(tmp_path: Path, run: Any) -> None:
    """A child process creates, claims and finishes jobs, then is SIGKILLed mid-write: after reopening and
    recover(all_running=True), every acknowledged job is there, nothing is left running, the finished job
    has its images, the idempotency keys still hold and the database is intact."""
    db, results = tmp_path / "jobs.db", tmp_path / "results"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db), str(results), PNG.hex()],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        assert child.stdout is not None
        while sum(line.startswith("created") for line in lines) < 30:
            line = child.stdout.readline()
            assert line, f"the child stopped early: {child.stderr.read() if child.stderr else ''}"
            lines.append(line)
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate(timeout=30)
        lines += out.splitlines()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    rows = [line.split() for line in lines if line.strip()]
    done = next(r[1] for r in rows if r[0] == "finished")
    held = next(r[1] for r in rows if r[0] == "running")
    created = {r[1]: r[2] for r in rows if r[0] == "created"}

    async def body() -> None:
        store = SqliteJobStore(db, results, ttl_s=TTL, max_bytes=MAX_BYTES)
        await store.open()
        try:
            counts = await store.recover(max_attempts=3, all_running=True)
            assert counts == {"requeued": 1, "failed": 0, "canceled": 0}
            jobs = {j.id: j for j in await store.list(limit=100_000)}
            assert not [j.id for j in jobs.values() if j.status == "running"]
            assert jobs[done].status == "succeeded" and await store.image(done, 0) == PNG
            assert (jobs[held].status, jobs[held].attempts) == ("queued", 1)
            assert set(created) <= set(jobs)
            assert all(jobs[i].status == "queued" for i in created)
            assert {j.status for j in jobs.values()} <= {"queued", "succeeded"} | TERMINAL
            events = await store.events(held)
            assert [e.id for e in events] == list(range(1, len(events) + 1))
            assert names(events)[:2] == ["queued", "started"] and names(events)[-1] == "requeued"
            for job_id, key in list(created.items())[:5]:
                again, was_created = await store.create("txt2img", {}, idempotency_key=key)
                assert again.id == job_id and not was_created
            claimed = await store.claim("after-restart", 30)
            assert claimed is not None and claimed.id == held  # the interrupted job comes first
        finally:
            await store.close()

    run(body())
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
