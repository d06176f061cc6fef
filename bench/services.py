"""Triptych's services as child process trees of a benchmark: start, wait for, read metrics from, stop.

The benchmarks measure the real deployment shape (``triptych serve all``: central and the three stages in their
own processes, talking over loopback HTTP), not an in-process stand-in. So each run starts its own trees on
free ports, in their own sessions, with logs kept next to the results; start-up is never measured, only waited
for; and every tree is stopped on the way out, killed if it hangs, so a failed run leaves nothing behind that
would skew the next one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import REPO, log


# ----------------------------------------------------------------------------------------------- ports
def free_port_block(n: int = 4) -> int:
    """A base port with ``n`` consecutive free loopback ports (best effort)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        try:
            for p in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return base
    raise RuntimeError("no block of 4 free loopback ports")


def free_port_blocks(count: int, size: int) -> list[int]:
    """``count`` non-overlapping blocks of ``size`` free loopback ports, held open until all are chosen."""
    held: list[socket.socket] = []
    bases: list[int] = []
    try:
        while len(bases) < count:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
            s.close()
            block = []
            try:
                for p in range(base, base + size):
                    b = socket.socket()
                    block.append(b)
                    b.bind(("127.0.0.1", p))
            except OSError:
                for b in block:
                    b.close()
                continue
            held.extend(block)
            bases.append(base)
    finally:
        for s in held:
            s.close()
    return bases


# ----------------------------------------------------------------------------------------------- lifecycle
@dataclass
class Server:
    """One started ``serve`` tree; central listens on ``base``, the stages on the ports after it."""

    name: str
    proc: subprocess.Popen[bytes]
    base: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.base}"

    @property
    def text_encoder_url(self) -> str:
        return f"http://127.0.0.1:{self.base + 1}"

    @property
    def unet_url(self) -> str:
        return f"http://127.0.0.1:{self.base + 2}"


def service_env(model: str, tmp: Path, extra: dict[str, str]) -> dict[str, str]:
    """This process's environment plus the model, a cache folder under ``tmp`` and ``extra``."""
    env = dict(os.environ)
    env.update(
        TRIPTYCH_MODEL=model,
        TRIPTYCH_CACHE_DIR=str(tmp / "triptych-cache"),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@contextmanager
def started(name: str, cmd: list[str], env: dict[str, str], base: int, log_path: Path) -> Iterator[Server]:
    """``cmd`` (a ``serve`` command on ``base``) in its own session, output to ``log_path``; stopped on exit."""
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    log(f"[{name}] started `{' '.join(cmd[2:])}` (pid {proc.pid}); log: {log_path.relative_to(REPO)}")
    try:
        yield Server(name, proc, base, log_path)
    finally:
        stop(proc)
        log_file.close()


@contextmanager
def served(
    model: str, device: str, dtype: str, threads: int | None, embedding_cache: bool, log_path: Path
) -> Iterator[str]:
    """``triptych serve all`` in its own session on free ports; yields central's URL; stops it on exit."""
    base = free_port_block(4)
    env = dict(os.environ)
    env.update(
        TRIPTYCH_MODEL=model,
        TRIPTYCH_DEVICE=device,
        TRIPTYCH_DTYPE=dtype,
        TRIPTYCH_CACHE_DIR=str(log_path.parent / "triptych-cache"),
        PYTHONUNBUFFERED="1",
    )
    if not embedding_cache:
        # diffusers encodes the prompt every call; a cache hit on the fixed prompt would not be like for like.
        env["TRIPTYCH_EMBEDDING_CACHE_BYTES"] = "0"
    if threads:
        env.update(TRIPTYCH_CPU_THREADS=str(threads), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "central.cli", "serve", "all", "--host", "127.0.0.1", "--port", str(base)]
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    log(f"started `triptych serve all --port {base}` (pid {proc.pid}); service logs: {log_path}")
    url = f"http://127.0.0.1:{base}"
    try:
        yield url
    finally:
        stop(proc)
        log_file.close()


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """SIGTERM to `serve all` (it stops its four children and waits for them); SIGKILL its group if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log(f"serve all (pid {proc.pid}) did not stop in {timeout_s:g} s; killing its process group")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log(f"services stopped (serve all exited with {proc.returncode})")


def wait_ready(url: str, timeout_s: float, log_path: Path, proc: subprocess.Popen[bytes] | None = None) -> float:
    """Seconds until ``url``'s /readyz answers 200; gives up early if ``proc`` exits."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc is not None and proc.poll() is not None:
            break
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    tail = log_path.read_text(errors="replace")[-4000:]
    raise RuntimeError(f"{url} not ready after {time.monotonic() - start:.0f} s; service log tail:\n{tail}")


# ----------------------------------------------------------------------------------------------- metrics
def prom_value(text: str, name: str) -> float | None:
    """The first sample of metric ``name`` (or ``name_total``, a counter's sample) in Prometheus text."""
    for candidate in (name, f"{name}_total"):
        for line in text.splitlines():
            if line.startswith(candidate) and (line[len(candidate) : len(candidate) + 1] in ("{", " ")):
                try:
                    return float(line.rsplit(" ", 1)[1])
                except ValueError:
                    return None
    return None


async def unet_metric(client: httpx.AsyncClient, server: Server, name: str) -> float:
    """One metric of ``server``'s UNet stage (0 when absent), without blocking the event loop."""
    r = await client.get(f"{server.unet_url}/metrics")
    return prom_value(r.text, name) or 0.0


def unet_metrics_sync(server: Server) -> dict[str, float]:
    """The UNet stage's forward, largest-batch and step counters, to tell how much batching happened."""
    text = httpx.get(f"{server.unet_url}/metrics", timeout=10).text
    names = ("triptych_unet_forwards", "triptych_unet_largest_batch_images", "triptych_denoise_steps_total")
    return {n: prom_value(text, n) or 0.0 for n in names}
