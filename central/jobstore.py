"""The durable job store behind ``/v1/jobs`` (SPEC §11): jobs, their events and their result images.

Two backends with one contract (``JobStore``), both tested by one suite (``tests/test_jobstore.py``):

* ``SqliteJobStore`` (the default, ``TRIPTYCH_JOBS_DB``): one embedded SQLite file plus a results
  directory. For one central process (several processes on one file also stay correct: every write is a
  ``BEGIN IMMEDIATE`` transaction).
* ``RedisJobStore`` (``TRIPTYCH_JOBS_URL=redis://...``): several central replicas share one Redis; every
  read-modify-write is one Lua script, so it is atomic across replicas.

The lifecycle::

    create -> queued --claim--> running --finish--> succeeded | failed | canceled
                 ^                 |  \\--request_cancel--> cancel_requested (the runner stops, finish(canceled))
                 +----recover------+  (lease expired: re-queued, or failed "interrupted" after max_attempts)
    queued --request_cancel--> canceled at once

Events, per job, numbered 1, 2, 3... (the SSE id; ``Last-Event-ID`` resumes after it): ``queued`` (create),
``started`` (claim; data ``{"attempt", "worker"}``), ``requeued`` (recover; data ``{"attempts"}``),
whatever the runner appends (``progress``, ``preview``), and one terminal event named after the final
status with data ``{"status", "error"}``.

Durability rules every backend keeps:

* A job is never "succeeded without its images": the images are written (and fsynced, for SQLite) before
  the status flips, in the same step that flips it or before it.
* A job is never lost or stuck: ``create`` returns only once the job is committed; a running job whose
  worker died (its lease expired, or every running job after a single-process crash) is re-queued or,
  past ``max_attempts``, failed with ``{"type": "interrupted"}`` by ``recover``.
* Nothing is pickled: requests, outputs, errors and event data are JSON.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, cast

import orjson
import redis.asyncio as aioredis

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})
UNFINISHED: frozenset[str] = frozenset({"queued", "running"})
# Events appended at every denoising step: losing the last few of them to a power cut is harmless, so the
# SQLite store commits them without waiting for the disk (see SqliteJobStore).
VOLATILE_EVENTS: frozenset[str] = frozenset({"progress", "preview"})

T = TypeVar("T")


@dataclass
class Job:
    """One job as stored. ``request`` is opaque to the store (the task's JSON body)."""

    id: str  # uuid4 hex
    task: str  # "txt2img" | "img2img" | "inpaint" | "outpaint"
    request: dict[str, Any]
    status: JobStatus
    created_at: float  # time.time()
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0  # times it was claimed (started)
    error: dict[str, Any] | None = None  # the SPEC error object {"type", "message", "param"}
    output: dict[str, Any] | None = None  # the sync response body without the images
    progress: dict[str, int] = field(default_factory=lambda: {"step": 0, "steps": 0})
    idempotency_key: str | None = None
    owner: str | None = None  # who submitted (a hash of the API key or the client address)
    cancel_requested: bool = False
    worker: str | None = None  # id of the worker process that runs (or ran) it
    lease_until: float | None = None


@dataclass
class Event:
    """One event of a job: ``id`` counts 1, 2, 3... per job."""

    id: int
    event: str
    data: dict[str, Any]


class JobStore(Protocol):
    """What the job runner and the routes use (``central/jobs.py``). Every method is a coroutine."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def create(
        self, task: str, request: dict[str, Any], *, idempotency_key: str | None = None, owner: str | None = None
    ) -> tuple[Job, bool]: ...
    async def get(self, job_id: str) -> Job | None: ...
    async def list(self, *, limit: int = 50, owner: str | None = None) -> builtins.list[Job]: ...
    async def count_unfinished(self) -> int: ...
    async def claim(self, worker: str, lease_s: float) -> Job | None: ...
    async def renew(self, job_id: str, worker: str, lease_s: float) -> bool: ...
    async def set_progress(self, job_id: str, step: int, steps: int) -> None: ...
    async def append_event(self, job_id: str, event: str, data: dict[str, Any]) -> int: ...
    async def events(self, job_id: str, after: int = 0) -> builtins.list[Event]: ...
    async def finish(
        self,
        job_id: str,
        status: str,
        *,
        output: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        images: builtins.list[bytes] | None = None,
    ) -> bool: ...
    async def request_cancel(self, job_id: str) -> Job | None: ...
    async def image(self, job_id: str, index: int) -> bytes | None: ...
    async def recover(self, *, max_attempts: int, all_running: bool) -> dict[str, int]: ...
    async def purge(self) -> int: ...


def open_store(*, jobs_url: str | None, db_path: Path, results_dir: Path, ttl_s: float, max_bytes: int) -> JobStore:
    """The store the settings name: ``redis://`` / ``rediss://`` → Redis, anything else (unset) → SQLite.

    Nothing is connected yet: ``await store.open()`` before use and ``await store.close()`` after.
    """
    if jobs_url and jobs_url.startswith(("redis://", "rediss://")):
        return RedisJobStore(jobs_url, ttl_s=ttl_s, max_bytes=max_bytes)
    return SqliteJobStore(db_path, results_dir, ttl_s=ttl_s, max_bytes=max_bytes)


# ----------------------------------------------------------------------------------------------- helpers
def new_job_id() -> str:
    return uuid.uuid4().hex


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _loads_opt(text: str | bytes | None) -> Any:
    return None if text is None or text == "" else orjson.loads(text)


def image_extension(data: bytes) -> str:
    """The file extension of encoded image bytes, sniffed from the magic number ("bin" when unknown)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "bin"


def interrupted_error(attempts: int) -> dict[str, Any]:
    return {
        "type": "interrupted",
        "message": f"the job was interrupted {attempts} time(s) (its worker stopped before finishing); giving up",
        "param": None,
    }


def _check_terminal(status: str) -> None:
    if status not in TERMINAL:
        raise ValueError(f"finish() takes a terminal status ({', '.join(sorted(TERMINAL))}), not {status!r}")


def _fsync_dir(path: Path) -> None:
    """Make the entries of ``path`` (a created or renamed file) durable (POSIX; a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


# ======================================================================================================= SQLite
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- FIFO order of creation (created_at may tie)
        id TEXT NOT NULL UNIQUE,
        task TEXT NOT NULL,
        request TEXT NOT NULL,                   -- JSON
        status TEXT NOT NULL,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT,                              -- JSON
        output TEXT,                             -- JSON
        step INTEGER NOT NULL DEFAULT 0,
        steps INTEGER NOT NULL DEFAULT 0,
        idempotency_key TEXT,
        owner TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        worker TEXT,
        lease_until REAL,
        images TEXT,                             -- JSON list of file names under results_dir/<id>/
        image_bytes INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX IF NOT EXISTS jobs_status_seq ON jobs(status, seq)",
    "CREATE INDEX IF NOT EXISTS jobs_owner_seq ON jobs(owner, seq)",
    "CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished_at) WHERE finished_at IS NOT NULL",
    "CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs(ifnull(owner, ''), idempotency_key)"
    " WHERE idempotency_key IS NOT NULL",
    """CREATE TABLE IF NOT EXISTS events (
        job_id TEXT NOT NULL,
        id INTEGER NOT NULL,
        event TEXT NOT NULL,
        data TEXT NOT NULL,                      -- JSON
        PRIMARY KEY (job_id, id)
    ) WITHOUT ROWID""",
)
_COLUMNS = (
    "id, task, request, status, created_at, started_at, finished_at, attempts, error, output, step, steps,"
    " idempotency_key, owner, cancel_requested, worker, lease_until"
)
_TERMINAL_SQL = "('succeeded', 'failed', 'canceled')"


def _row_job(row: tuple[Any, ...]) -> Job:
    (id_, task, request, status, created_at, started_at, finished_at, attempts, error, output, step, steps,
     key, owner, cancel_requested, worker, lease_until) = row  # fmt: skip
    return Job(
        id=id_,
        task=task,
        request=orjson.loads(request),
        status=status,
        created_at=created_at,
        started_at=started_at,
        finished_at=finished_at,
        attempts=attempts,
        error=_loads_opt(error),
        output=_loads_opt(output),
        progress={"step": step, "steps": steps},
        idempotency_key=key,
        owner=owner,
        cancel_requested=bool(cancel_requested),
        worker=worker,
        lease_until=lease_until,
    )


def _select_job(conn: sqlite3.Connection, job_id: str) -> Job | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return None if row is None else _row_job(row)


def _add_event(conn: sqlite3.Connection, job_id: str, event: str, data: dict[str, Any]) -> int:
    """Append one event inside the caller's transaction; its id is the job's last id + 1."""
    (last,) = conn.execute("SELECT ifnull(max(id), 0) FROM events WHERE job_id = ?", (job_id,)).fetchone()
    conn.execute(
        "INSERT INTO events (job_id, id, event, data) VALUES (?, ?, ?, ?)", (job_id, last + 1, event, _dumps(data))
    )
    return int(last) + 1


def _terminate(
    conn: sqlite3.Connection, job_id: str, status: str, now: float, *, output: Any = None, error: Any = None
) -> None:
    """Make a job terminal and append its terminal event, inside the caller's transaction."""
    conn.execute(
        "UPDATE jobs SET status = ?, finished_at = ?, output = ?, error = ?, lease_until = NULL WHERE id = ?",
        (status, now, None if output is None else _dumps(output), None if error is None else _dumps(error), job_id),
    )
    _add_event(conn, job_id, status, {"status": status, "error": error})


class SqliteJobStore:
    """Jobs in one SQLite file (WAL), result images as files under ``results_dir/<job id>/<i>.<ext>``.

    Threading: one connection, opened, used and closed by one dedicated thread (a 1-worker executor), so a
    query never blocks the event loop and the connection is never shared between threads. Every write is a
    ``BEGIN IMMEDIATE`` transaction: it takes SQLite's write lock up front, so read-then-write steps (claim
    the oldest queued job, create-or-return by idempotency key, finish only an unfinished job) are atomic
    also against a second process on the same file (it waits up to ``busy_timeout_s``).

    Durability: WAL journal (readers never block the writer, a crash mid-commit leaves the previous state)
    with ``synchronous=FULL``: a commit returns only once the WAL is fsynced, so a job acknowledged with
    202, or a "succeeded" after its images, survives a power cut too, not only ``kill -9`` (which NORMAL
    would already survive). FULL costs one fsync per commit; the only frequent writes (per-step progress,
    ``progress``/``preview`` events, lease renewals) switch that connection to NORMAL for their one
    commit: they are reconstructible, and the next FULL commit syncs them along with itself, in order.

    Images: written to ``results_dir/<id>.<token>.tmp/`` (each file fsynced, then the directory), renamed
    to ``results_dir/<id>/`` and the parent fsynced, then the job is marked succeeded, all inside one
    transaction of the writer thread. A crash before the commit leaves a directory that no succeeded job
    owns; ``finish`` replaces it and ``purge`` removes it.

    ``clock`` (default ``time.time``) gives every timestamp and lease; tests pass a fake one.
    """

    def __init__(
        self,
        path: Path,
        results_dir: Path,
        *,
        ttl_s: float,
        max_bytes: int,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 30.0,
    ) -> None:
        self.path = Path(path)
        self.results_dir = Path(results_dir)
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.clock = clock
        self.busy_timeout_s = busy_timeout_s
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    # ------------------------------------------------------------------------------------- the writer thread
    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on the store's thread (reads use it too: one connection, one thread)."""
        if self._executor is None or self._conn is None:
            raise RuntimeError("the job store is not open")
        conn = self._conn
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, conn)

    async def _tx(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        """Run ``fn(conn)`` in one ``BEGIN IMMEDIATE`` transaction; ``durable=False`` commits without fsync."""

        def run(conn: sqlite3.Connection) -> T:
            if not durable:
                conn.execute("PRAGMA synchronous = NORMAL")
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(conn)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                return result
            finally:
                if not durable:
                    conn.execute("PRAGMA synchronous = FULL")

        return await self._call(run)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.results_dir.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; every write opens its own BEGIN IMMEDIATE.
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        try:
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if str(mode).lower() != "wal":
                raise RuntimeError(f"SQLite refused WAL mode for {self.path.name} (journal_mode is {mode})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        return conn

    async def open(self) -> None:
        if self._conn is not None:
            return
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobstore-sqlite")
        try:
            self._conn = await asyncio.get_running_loop().run_in_executor(executor, self._connect)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        self._executor = executor

    async def close(self) -> None:
        if self._conn is None or self._executor is None:
            return
        conn, executor = self._conn, self._executor
        await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        self._conn = self._executor = None
        executor.shutdown(wait=True)

    # ------------------------------------------------------------------------------------------------- jobs
    async def create(
        self, task: str, request: dict[str, Any], *, idempotency_key: str | None = None, owner: str | None = None
    ) -> tuple[Job, bool]:
        now = self.clock()

        def run(conn: sqlite3.Connection) -> tuple[Job, bool]:
            if idempotency_key is not None:
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE ifnull(owner, '') = ? AND idempotency_key = ?",
                    (owner or "", idempotency_key),
                ).fetchone()
                if row is not None:
                    return _row_job(row), False
            job = Job(new_job_id(), task, request, "queued", now, idempotency_key=idempotency_key, owner=owner)
            conn.execute(
                "INSERT INTO jobs (id, task, request, status, created_at, idempotency_key, owner)"
                " VALUES (?, ?, ?, 'queued', ?, ?, ?)",
                (job.id, task, _dumps(request), now, idempotency_key, owner),
            )
            _add_event(conn, job.id, "queued", {"status": "queued"})
            return job, True

        return await self._tx(run)

    async def get(self, job_id: str) -> Job | None:
        return await self._call(lambda conn: _select_job(conn, job_id))

    async def list(self, *, limit: int = 50, owner: str | None = None) -> builtins.list[Job]:
        def run(conn: sqlite3.Connection) -> builtins.list[Job]:
            if owner is None:
                rows = conn.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY seq DESC LIMIT ?", (limit,))
            else:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE owner = ? ORDER BY seq DESC LIMIT ?", (owner, limit)
                )
            return [_row_job(row) for row in rows]

        return await self._call(run)

    async def count_unfinished(self) -> int:
        def run(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')").fetchone()[0])

        return await self._call(run)

    async def claim(self, worker: str, lease_s: float) -> Job | None:
        """Take the oldest queued job (FIFO by creation; a re-queued job keeps its place) and append ``started``."""

        def run(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            now = self.clock()
            conn.execute(
                "UPDATE jobs SET status = 'running', started_at = ?, attempts = attempts + 1, worker = ?,"
                " lease_until = ? WHERE id = ?",
                (now, worker, now + lease_s, row[0]),
            )
            job = _select_job(conn, row[0])
            assert job is not None
            _add_event(conn, job.id, "started", {"attempt": job.attempts, "worker": worker})
            return job

        return await self._tx(run)

    async def renew(self, job_id: str, worker: str, lease_s: float) -> bool:
        """Extend the lease of ``worker``'s running job. False when it is not (any more) that worker's running
        job, and also when a cancel was requested: the lease is still extended then, so the runner has time to
        stop and ``finish(..., "canceled")`` before ``recover`` could take the job back."""

        def run(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE jobs SET lease_until = ? WHERE id = ? AND status = 'running' AND worker = ?",
                (self.clock() + lease_s, job_id, worker),
            )
            if cur.rowcount != 1:
                return False
            (cancel,) = conn.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return not cancel

        return await self._tx(run, durable=False)

    async def set_progress(self, job_id: str, step: int, steps: int) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE jobs SET step = ?, steps = ? WHERE id = ? AND status IN ('queued', 'running')",
                (step, steps, job_id),
            )

        await self._tx(run, durable=False)

    async def append_event(self, job_id: str, event: str, data: dict[str, Any]) -> int:
        return await self._tx(lambda conn: _add_event(conn, job_id, event, data), durable=event not in VOLATILE_EVENTS)

    async def events(self, job_id: str, after: int = 0) -> builtins.list[Event]:
        def run(conn: sqlite3.Connection) -> builtins.list[Event]:
            rows = conn.execute(
                "SELECT id, event, data FROM events WHERE job_id = ? AND id > ? ORDER BY id", (job_id, after)
            )
            return [Event(int(i), e, orjson.loads(d)) for i, e, d in rows]

        return await self._call(run)

    def _write_images(self, job_id: str, images: builtins.list[bytes]) -> tuple[Path, builtins.list[str]]:
        """Write the images to a fresh temporary directory, every file and the directory fsynced."""
        tmp = self.results_dir / f"{job_id}.{uuid.uuid4().hex}.tmp"
        tmp.mkdir(parents=True)
        names = []
        for i, data in enumerate(images):
            name = f"{i}.{image_extension(data)}"
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            names.append(name)
        _fsync_dir(tmp)
        return tmp, names

    async def finish(
        self,
        job_id: str,
        status: str,
        *,
        output: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        images: builtins.list[bytes] | None = None,
    ) -> bool:
        """Make a queued or running job terminal; False (and nothing written) when it is unknown or was already
        terminal. ``images`` are kept only with ``succeeded``, and are on disk before the status flips."""
        _check_terminal(status)
        current = await self.get(job_id)
        if current is None or current.status in TERMINAL:
            return False
        staged: tuple[Path, builtins.list[str]] | None = None
        if status == "succeeded" and images:
            # File I/O off the writer thread: the database stays available while megabytes are fsynced.
            staged = await asyncio.to_thread(self._write_images, job_id, images)
        total = sum(len(b) for b in images or []) if staged else 0
        now = self.clock()

        def run(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[0] in TERMINAL:
                return False
            names: builtins.list[str] = []
            if staged is not None:
                tmp, names = staged
                final = self.results_dir / job_id
                if final.exists():  # left by an attempt that crashed between the rename and its commit
                    shutil.rmtree(final)
                os.rename(tmp, final)
                _fsync_dir(self.results_dir)
            _terminate(conn, job_id, status, now, output=output, error=error)
            if staged is not None:
                conn.execute("UPDATE jobs SET images = ?, image_bytes = ? WHERE id = ?", (_dumps(names), total, job_id))
            return True

        try:
            done = await self._tx(run)
        except BaseException:
            if staged is not None:
                shutil.rmtree(staged[0], ignore_errors=True)
            raise
        if not done and staged is not None:
            await asyncio.to_thread(shutil.rmtree, staged[0], True)
        return done

    async def request_cancel(self, job_id: str) -> Job | None:
        def run(conn: sqlite3.Connection) -> Job | None:
            job = _select_job(conn, job_id)
            if job is None or job.status in TERMINAL:
                return job
            conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            if job.status == "queued":
                _terminate(conn, job_id, "canceled", self.clock())
            return _select_job(conn, job_id)

        return await self._tx(run)

    async def image(self, job_id: str, index: int) -> bytes | None:
        def names(conn: sqlite3.Connection) -> builtins.list[str]:
            row = conn.execute("SELECT status, images FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[0] != "succeeded" or row[1] is None:
                return []
            return cast(builtins.list[str], orjson.loads(row[1]))

        files = await self._call(names)
        if not 0 <= index < len(files):
            return None
        path = self.results_dir / job_id / files[index]
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:  # purged between the query and the read
            return None

    async def recover(self, *, max_attempts: int, all_running: bool) -> dict[str, int]:
        """Take back running jobs whose worker is gone: the lease expired, or any running job when
        ``all_running`` (one process, at start-up after a crash). Each is re-queued (event ``requeued``,
        attempts kept) while ``attempts < max_attempts``, else failed with ``interrupted``; a job whose cancel
        was requested becomes canceled. Queued jobs are left alone."""

        def run(conn: sqlite3.Connection) -> dict[str, int]:
            now = self.clock()
            counts = {"requeued": 0, "failed": 0, "canceled": 0}
            rows = conn.execute(
                "SELECT id, attempts, cancel_requested FROM jobs WHERE status = 'running'"
                " AND (? OR lease_until IS NULL OR lease_until < ?) ORDER BY seq",
                (int(all_running), now),
            ).fetchall()
            for job_id, attempts, cancel in rows:
                if cancel:
                    _terminate(conn, job_id, "canceled", now)
                    counts["canceled"] += 1
                elif attempts < max_attempts:
                    conn.execute(
                        "UPDATE jobs SET status = 'queued', started_at = NULL, worker = NULL, lease_until = NULL,"
                        " step = 0, steps = 0 WHERE id = ?",
                        (job_id,),
                    )
                    _add_event(conn, job_id, "requeued", {"attempts": attempts})
                    counts["requeued"] += 1
                else:
                    _terminate(conn, job_id, "failed", now, error=interrupted_error(attempts))
                    counts["failed"] += 1
            return counts

        return await self._tx(run)

    async def purge(self) -> int:
        """Drop finished jobs older than ``ttl_s``, then the oldest finished jobs with images while the images
        exceed ``max_bytes``, then any result directory no job owns (left by a crash). Returns jobs dropped."""

        def run(conn: sqlite3.Connection) -> builtins.list[str]:
            cutoff = self.clock() - self.ttl_s
            old = conn.execute(f"SELECT id FROM jobs WHERE status IN {_TERMINAL_SQL} AND finished_at < ?", (cutoff,))
            drop: builtins.list[str] = [row[0] for row in old]
            conn.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in drop])
            (total,) = conn.execute("SELECT ifnull(sum(image_bytes), 0) FROM jobs").fetchone()
            if total > self.max_bytes:
                rows = conn.execute(
                    f"SELECT id, image_bytes FROM jobs WHERE status IN {_TERMINAL_SQL} AND image_bytes > 0"
                    " ORDER BY finished_at, seq"
                ).fetchall()
                for job_id, size in rows:
                    if total <= self.max_bytes:
                        break
                    conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
                    drop.append(job_id)
                    total -= size
            conn.executemany("DELETE FROM events WHERE job_id = ?", [(i,) for i in drop])
            return drop

        dropped = await self._tx(run)
        # Files after the commit: a crash in between leaves directories no job owns, removed below next time.
        await self._call(lambda conn: self._remove_unowned(conn))
        return len(dropped)

    def _remove_unowned(self, conn: sqlite3.Connection) -> None:
        """Remove result directories no job owns: ``<id>/`` unless that job succeeded, ``<id>.<token>.tmp/``
        unless that job is still unfinished (its images may be being written now). Runs on the writer
        thread, so it never races ``finish``'s rename-and-commit."""
        try:
            entries = builtins.list(self.results_dir.iterdir())
        except FileNotFoundError:
            return
        for entry in entries:
            job_id = entry.name.split(".", 1)[0]
            row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            status = None if row is None else row[0]
            keep = status in UNFINISHED if entry.name.endswith(".tmp") else status == "succeeded"
            if not keep:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()


# ======================================================================================================== Redis
# Every script takes the key prefix as ARGV[1] and derives key names from it (job ids come out of sorted sets
# inside the scripts), so this store is for a standalone or Sentinel-managed Redis, not Redis Cluster.
_LUA_TERMINATE = """
local function terminate(P, id, status, now, output, err, ttl_ms)
  local key = P .. 'job:' .. id
  redis.call('HSET', key, 'status', status, 'finished_at', now)
  redis.call('HDEL', key, 'lease_until')
  if output ~= '' then redis.call('HSET', key, 'output', output) end
  if err ~= '' then redis.call('HSET', key, 'error', err) end
  redis.call('ZREM', P .. 'queue', id)
  redis.call('ZREM', P .. 'running', id)
  redis.call('ZADD', P .. 'finished', now, id)
  local events = P .. 'events:' .. id
  local data = '{"status":"' .. status .. '","error":' .. (err ~= '' and err or 'null') .. '}'
  local n = redis.call('RPUSH', events, '{"event":"' .. status .. '","data":' .. data .. '}')
  redis.call('PEXPIRE', key, ttl_ms)
  redis.call('PEXPIRE', events, ttl_ms)
  local idem = redis.call('HGET', key, 'idem')
  if idem and redis.call('GET', idem) == id then redis.call('PEXPIRE', idem, ttl_ms) end
  return n
end
"""

# ARGV: P, has_key, idem key, owner index key ('' for none), id, queued event, then HSET field/value pairs.
_LUA_CREATE = """
local P, has_key, idem, owner_index, id = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if has_key == '1' then
  local existing = redis.call('GET', idem)
  if existing and redis.call('EXISTS', P .. 'job:' .. existing) == 1 then
    return {0, existing}
  end
end
local seq = redis.call('INCR', P .. 'seq')
redis.call('HSET', P .. 'job:' .. id, 'seq', seq, unpack(ARGV, 7))
redis.call('ZADD', P .. 'queue', seq, id)
redis.call('ZADD', P .. 'jobs', seq, id)
if owner_index ~= '' then redis.call('ZADD', owner_index, seq, id) end
if has_key == '1' then redis.call('SET', idem, id) end
redis.call('RPUSH', P .. 'events:' .. id, ARGV[6])
return {1, id}
"""

# ARGV: P, worker, now, lease_until. Pops the oldest queued id (stale ids of expired jobs are skipped).
_LUA_CLAIM = """
local P, worker, now, lease_until = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
while true do
  local popped = redis.call('ZPOPMIN', P .. 'queue')
  if #popped == 0 then return false end
  local id = popped[1]
  local key = P .. 'job:' .. id
  if redis.call('HGET', key, 'status') == 'queued' then
    local attempt = redis.call('HINCRBY', key, 'attempts', 1)
    redis.call('HSET', key, 'status', 'running', 'started_at', now, 'worker', worker, 'lease_until', lease_until)
    redis.call('ZADD', P .. 'running', lease_until, id)
    redis.call('RPUSH', P .. 'events:' .. id,
      '{"event":"started","data":{"attempt":' .. attempt .. ',"worker":' .. cjson.encode(worker) .. '}}')
    return redis.call('HGETALL', key)
  end
end
"""

# ARGV: P, id, worker, lease_until -> 1 renewed, 0 not this worker's running job or cancel requested.
_LUA_RENEW = """
local P, id = ARGV[1], ARGV[2]
local key = P .. 'job:' .. id
local f = redis.call('HMGET', key, 'status', 'worker', 'cancel_requested')
if f[1] ~= 'running' or f[2] ~= ARGV[3] then return 0 end
redis.call('HSET', key, 'lease_until', ARGV[4])
redis.call('ZADD', P .. 'running', ARGV[4], id)
if f[3] == '1' then return 0 end
return 1
"""

# ARGV: P, id, step, steps
_LUA_PROGRESS = """
local key = ARGV[1] .. 'job:' .. ARGV[2]
local status = redis.call('HGET', key, 'status')
if status == 'queued' or status == 'running' then redis.call('HSET', key, 'step', ARGV[3], 'steps', ARGV[4]) end
return 0
"""

# ARGV: P, id, entry -> the event id (the list's new length). A finished job's events expire with it.
_LUA_APPEND = """
local events = ARGV[1] .. 'events:' .. ARGV[2]
local n = redis.call('RPUSH', events, ARGV[3])
local ttl = redis.call('PTTL', ARGV[1] .. 'job:' .. ARGV[2])
if ttl > 0 then redis.call('PEXPIRE', events, ttl) end
return n
"""

# ARGV: P, id, status, now, output, error, ttl_ms, image token, image count, image bytes -> 1 done, 0 terminal
_LUA_FINISH = (
    _LUA_TERMINATE
    + """
local P, id, status, now, ttl_ms = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[7]
local key = P .. 'job:' .. id
local current = redis.call('HGET', key, 'status')
if current ~= 'queued' and current ~= 'running' then return 0 end
terminate(P, id, status, now, ARGV[5], ARGV[6], ttl_ms)
local count = tonumber(ARGV[9])
if count > 0 then
  redis.call('HSET', key, 'img_token', ARGV[8], 'img_count', count, 'img_bytes', ARGV[10])
  redis.call('HSET', P .. 'imgbytes', id, ARGV[10])
  redis.call('INCRBY', P .. 'imgbytes_total', ARGV[10])
  for i = 0, count - 1 do redis.call('PEXPIRE', P .. 'img:' .. id .. ':' .. ARGV[8] .. ':' .. i, ttl_ms) end
end
return 1
"""
)

# ARGV: P, id, now, ttl_ms -> the job's fields after (empty when unknown)
_LUA_CANCEL = (
    _LUA_TERMINATE
    + """
local P, id = ARGV[1], ARGV[2]
local key = P .. 'job:' .. id
local status = redis.call('HGET', key, 'status')
if status == 'queued' then
  redis.call('HSET', key, 'cancel_requested', '1')
  terminate(P, id, 'canceled', ARGV[3], '', '', ARGV[4])
elseif status == 'running' then
  redis.call('HSET', key, 'cancel_requested', '1')
end
return redis.call('HGETALL', key)
"""
)

# ARGV: P, now, max_attempts, all_running, ttl_ms -> {requeued, failed, canceled}
_LUA_RECOVER = (
    _LUA_TERMINATE
    + """
local P, now, max_attempts, ttl_ms = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[5]
local ids
if ARGV[4] == '1' then
  ids = redis.call('ZRANGE', P .. 'running', 0, -1)
else
  ids = redis.call('ZRANGEBYSCORE', P .. 'running', '-inf', '(' .. now)
end
local requeued, failed, canceled = 0, 0, 0
for _, id in ipairs(ids) do
  local key = P .. 'job:' .. id
  local f = redis.call('HMGET', key, 'status', 'attempts', 'cancel_requested', 'seq')
  if f[1] ~= 'running' then
    redis.call('ZREM', P .. 'running', id)
  elseif f[3] == '1' then
    terminate(P, id, 'canceled', now, '', '', ttl_ms)
    canceled = canceled + 1
  elseif tonumber(f[2]) < max_attempts then
    redis.call('HSET', key, 'status', 'queued', 'step', 0, 'steps', 0)
    redis.call('HDEL', key, 'worker', 'lease_until', 'started_at')
    redis.call('ZREM', P .. 'running', id)
    redis.call('ZADD', P .. 'queue', f[4], id)
    redis.call('RPUSH', P .. 'events:' .. id, '{"event":"requeued","data":{"attempts":' .. f[2] .. '}}')
    requeued = requeued + 1
  else
    local msg = 'the job was interrupted ' .. f[2] ..
      ' time(s) (its worker stopped before finishing); giving up'
    local err = '{"type":"interrupted","message":' .. cjson.encode(msg) .. ',"param":null}'
    terminate(P, id, 'failed', now, '', err, ttl_ms)
    failed = failed + 1
  end
end
return {requeued, failed, canceled}
"""
)

# ARGV: P, cutoff, max_bytes -> jobs dropped
_LUA_PURGE = """
local P, cutoff, max_bytes = ARGV[1], ARGV[2], tonumber(ARGV[3])
local function drop(id)
  local key = P .. 'job:' .. id
  local f = redis.call('HMGET', key, 'idem', 'owner_index', 'img_token', 'img_count')
  if f[3] and f[4] then
    for i = 0, tonumber(f[4]) - 1 do redis.call('DEL', P .. 'img:' .. id .. ':' .. f[3] .. ':' .. i) end
  end
  if f[1] and redis.call('GET', f[1]) == id then redis.call('DEL', f[1]) end
  if f[2] then redis.call('ZREM', f[2], id) end
  redis.call('DEL', key, P .. 'events:' .. id)
  redis.call('ZREM', P .. 'jobs', id)
  redis.call('ZREM', P .. 'finished', id)
  local size = redis.call('HGET', P .. 'imgbytes', id)
  if size then
    redis.call('DECRBY', P .. 'imgbytes_total', size)
    redis.call('HDEL', P .. 'imgbytes', id)
  end
end
local n = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'finished', '-inf', '(' .. cutoff)) do
  drop(id)
  n = n + 1
end
local total = tonumber(redis.call('GET', P .. 'imgbytes_total') or '0')
if total > max_bytes then
  for _, id in ipairs(redis.call('ZRANGE', P .. 'finished', 0, -1)) do
    if total <= max_bytes then break end
    local size = redis.call('HGET', P .. 'imgbytes', id)
    if size then
      drop(id)
      n = n + 1
      total = total - tonumber(size)
    end
  end
end
return n
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _num(value: float | int) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class RedisJobStore:
    """Jobs shared by several central replicas through one Redis (``redis.asyncio``).

    Keys, under ``prefix``: ``job:<id>`` (a hash; request/output/error as JSON text), ``events:<id>`` (a
    list of ``{"event", "data"}`` JSON; the event id is the list position + 1, so RPUSH's reply is the id),
    ``img:<id>:<token>:<i>`` (image bytes), ``queue`` (sorted set of queued ids by creation sequence: FIFO,
    and a re-queued job keeps its place), ``running`` (ids by lease expiry), ``finished`` (ids by finish
    time), ``jobs`` and ``owner:<sha256>`` (ids by sequence, for listing), ``idem:<sha256(owner, key)>``
    (the job id of an idempotency key).

    Atomicity across replicas: every step that reads and then writes (create-or-return by idempotency key,
    claim, renew, finish, cancel, recover, purge) is one Lua script, which Redis runs without interleaving
    any other command; a claim pops from ``queue`` inside the script, so two replicas never get one job.
    Images are SET (under a fresh token) before the finish script flips the status; a finish that loses
    the race deletes its own token's images, never the winner's.

    Expiry: a finished job's hash, events, images and idempotency key get a TTL of ``ttl_s`` (Redis itself
    drops them even if nobody purges); ``purge`` drops them at the TTL too, keeps the index sets clean and
    enforces ``max_bytes`` on the images. Lists skip ids whose hash is gone. Durability is the server's:
    run Redis with AOF (``appendfsync everysec`` or ``always``) for jobs to survive a Redis restart.

    Timestamps and leases use this process's ``clock`` (replicas' clocks should agree to well within a lease).
    """

    def __init__(
        self,
        url: str,
        *,
        ttl_s: float,
        max_bytes: int,
        prefix: str = "triptych:",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.prefix = prefix
        self.clock = clock
        self._redis: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}

    @property
    def _r(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError("the job store is not open")
        return self._redis

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl_s * 1000))

    async def open(self) -> None:
        if self._redis is not None:
            return
        client = aioredis.Redis.from_url(self.url, decode_responses=False)
        try:
            await client.ping()
        except BaseException:
            await client.aclose()
            raise
        self._redis = client
        sources = {
            "create": _LUA_CREATE,
            "claim": _LUA_CLAIM,
            "renew": _LUA_RENEW,
            "progress": _LUA_PROGRESS,
            "append": _LUA_APPEND,
            "finish": _LUA_FINISH,
            "cancel": _LUA_CANCEL,
            "recover": _LUA_RECOVER,
            "purge": _LUA_PURGE,
        }
        self._scripts = {name: client.register_script(src) for name, src in sources.items()}

    async def close(self) -> None:
        if self._redis is not None:
            client, self._redis = self._redis, None
            await client.aclose()

    async def _run(self, name: str, *args: str | int | float) -> Any:
        return await self._scripts[name](keys=[], args=[self.prefix, *args], client=self._r)

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _digest(self, *parts: str) -> str:
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

    @staticmethod
    def _decode(raw: Any) -> Job | None:
        """A job from HGETALL's reply (a dict, or the flat list a script returns); None when empty."""
        if not raw:
            return None
        if isinstance(raw, dict):
            items: Iterable[tuple[Any, Any]] = raw.items()
        else:
            items = zip(raw[0::2], raw[1::2], strict=True)
        h = {_text(k): _text(v) for k, v in items}
        if "id" not in h:  # only a stray field left (e.g. a progress write raced an expiry)
            return None

        def opt_float(name: str) -> float | None:
            return float(h[name]) if name in h else None

        return Job(
            id=h["id"],
            task=h["task"],
            request=orjson.loads(h["request"]),
            status=cast(JobStatus, h["status"]),
            created_at=float(h["created_at"]),
            started_at=opt_float("started_at"),
            finished_at=opt_float("finished_at"),
            attempts=int(h.get("attempts", "0")),
            error=_loads_opt(h.get("error")),
            output=_loads_opt(h.get("output")),
            progress={"step": int(h.get("step", "0")), "steps": int(h.get("steps", "0"))},
            idempotency_key=h.get("idempotency_key"),
            owner=h.get("owner"),
            cancel_requested=h.get("cancel_requested") == "1",
            worker=h.get("worker"),
            lease_until=opt_float("lease_until"),
        )

    # ------------------------------------------------------------------------------------------------- jobs
    async def create(
        self, task: str, request: dict[str, Any], *, idempotency_key: str | None = None, owner: str | None = None
    ) -> tuple[Job, bool]:
        job = Job(new_job_id(), task, request, "queued", self.clock(), idempotency_key=idempotency_key, owner=owner)
        idem = self._key("idem", self._digest(owner or "", idempotency_key or ""))
        owner_index = self._key("owner", self._digest(owner)) if owner is not None else ""
        fields: builtins.list[str] = [
            "id", job.id, "task", task, "request", _dumps(request), "status", "queued",
            "created_at", _num(job.created_at), "attempts", "0", "step", "0", "steps", "0", "cancel_requested", "0",
        ]  # fmt: skip
        if idempotency_key is not None:
            fields += ["idempotency_key", idempotency_key, "idem", idem]
        if owner is not None:
            fields += ["owner", owner, "owner_index", owner_index]
        queued = _dumps({"event": "queued", "data": {"status": "queued"}})
        created, job_id = await self._run(
            "create", "1" if idempotency_key is not None else "0", idem, owner_index, job.id, queued, *fields
        )
        if created:
            return job, True
        existing = await self.get(job_id.decode())
        if existing is None:  # expired between the script and this read: extremely unlikely; make a fresh one
            return await self.create(task, request, idempotency_key=idempotency_key, owner=owner)
        return existing, False

    async def get(self, job_id: str) -> Job | None:
        return self._decode(await self._r.hgetall(self._key("job", job_id)))

    async def list(self, *, limit: int = 50, owner: str | None = None) -> builtins.list[Job]:
        index = self._key("owner", self._digest(owner)) if owner is not None else self._key("jobs")
        out: builtins.list[Job] = []
        stale: builtins.list[bytes] = []
        start = 0
        while len(out) < limit:
            ids = cast(builtins.list[bytes], await self._r.zrevrange(index, start, start + limit - 1))
            if not ids:
                break
            start += len(ids)
            async with self._r.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hgetall(self._key("job", job_id.decode()))
                hashes = await pipe.execute()
            for job_id, raw in zip(ids, hashes, strict=True):
                job = self._decode(raw)
                if job is None:
                    stale.append(job_id)
                elif len(out) < limit:
                    out.append(job)
        if stale:  # ids of jobs Redis expired before a purge got to them
            await self._r.zrem(index, *stale)
        return out

    async def count_unfinished(self) -> int:
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.zcard(self._key("queue"))
            pipe.zcard(self._key("running"))
            queued, running = await pipe.execute()
        return int(queued) + int(running)

    async def claim(self, worker: str, lease_s: float) -> Job | None:
        """Take the oldest queued job (FIFO by creation; a re-queued job keeps its place) and append ``started``."""
        now = self.clock()
        return self._decode(await self._run("claim", worker, _num(float(now)), _num(float(now + lease_s))))

    async def renew(self, job_id: str, worker: str, lease_s: float) -> bool:
        """As ``SqliteJobStore.renew``: False when not this worker's running job, or when a cancel was requested
        (the lease is extended anyway)."""
        return bool(await self._run("renew", job_id, worker, _num(float(self.clock() + lease_s))))

    async def set_progress(self, job_id: str, step: int, steps: int) -> None:
        await self._run("progress", job_id, int(step), int(steps))

    async def append_event(self, job_id: str, event: str, data: dict[str, Any]) -> int:
        return int(await self._run("append", job_id, _dumps({"event": event, "data": data})))

    async def events(self, job_id: str, after: int = 0) -> builtins.list[Event]:
        raw = await self._r.lrange(self._key("events", job_id), max(0, after), -1)
        out = []
        for offset, entry in enumerate(raw):
            parsed = orjson.loads(entry)
            out.append(Event(max(0, after) + offset + 1, parsed["event"], parsed["data"]))
        return out

    def _image_key(self, job_id: str, token: str, index: int) -> str:
        return self._key("img", job_id, token, str(index))

    async def finish(
        self,
        job_id: str,
        status: str,
        *,
        output: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        images: builtins.list[bytes] | None = None,
    ) -> bool:
        """As ``SqliteJobStore.finish``: the images are stored before the script that flips the status."""
        _check_terminal(status)
        current = await self._r.hget(self._key("job", job_id), "status")
        if current not in (b"queued", b"running"):
            return False
        token = uuid.uuid4().hex
        stored = images if status == "succeeded" and images else []
        if stored:
            # Until the finish script gives them the job's TTL, orphans (a replica dying right here) expire alone.
            orphan_px = self._ttl_ms + 3_600_000
            async with self._r.pipeline(transaction=False) as pipe:
                for i, data in enumerate(stored):
                    pipe.set(self._image_key(job_id, token, i), data, px=orphan_px)
                await pipe.execute()
        done = await self._run(
            "finish",
            job_id,
            status,
            _num(float(self.clock())),
            "" if output is None else _dumps(output),
            "" if error is None else _dumps(error),
            self._ttl_ms,
            token,
            len(stored),
            sum(len(b) for b in stored),
        )
        if not done and stored:
            await self._r.delete(*(self._image_key(job_id, token, i) for i in range(len(stored))))
        return bool(done)

    async def request_cancel(self, job_id: str) -> Job | None:
        return self._decode(await self._run("cancel", job_id, _num(float(self.clock())), self._ttl_ms))

    async def image(self, job_id: str, index: int) -> bytes | None:
        status, token, count = await self._r.hmget(self._key("job", job_id), ["status", "img_token", "img_count"])
        if status != b"succeeded" or token is None or count is None or not 0 <= index < int(count):
            return None
        data = await self._r.get(self._image_key(job_id, _text(token), index))
        return None if data is None else cast(bytes, data)

    async def recover(self, *, max_attempts: int, all_running: bool) -> dict[str, int]:
        """As ``SqliteJobStore.recover``. With several replicas, pass ``all_running=False``: another replica's
        running job is not interrupted just because this one restarted."""
        requeued, failed, canceled = await self._run(
            "recover", _num(float(self.clock())), int(max_attempts), "1" if all_running else "0", self._ttl_ms
        )
        return {"requeued": int(requeued), "failed": int(failed), "canceled": int(canceled)}

    async def purge(self) -> int:
        return int(await self._run("purge", _num(float(self.clock() - self.ttl_s)), int(self.max_bytes)))
