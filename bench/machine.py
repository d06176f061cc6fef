"""The machine a benchmark ran on and how busy it was, so that every recorded number can be judged.

CPU benchmarks on a shared VM are only as good as the quiet they ran in. Both benchmarks therefore wait for a
quiet machine before they start (each by its own criterion), note the load and the hypervisor's CPU steal
across the run, and record the hardware and software versions next to the results. The throughput benchmark
also counts other people's ``serve`` processes, since a second Triptych on the same CPUs would halve its
images/s without any error.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import log

# A Triptych service process: `triptych serve ...` (central.cli) or a stage run as `python -m <stage>`.
SERVE_MARKS = ("central.cli serve", "-m central ", "-m text_encoder", "-m diffusion_unet", "-m vae_decoder")


# ----------------------------------------------------------------------------------------------- counters
def cpu_times() -> dict[str, int]:
    """Aggregate jiffies from /proc/stat (Linux), to report how much CPU was stolen by the hypervisor."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return {}
    names = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]
    return {name: int(v) for name, v in zip(names, fields, strict=False)}


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


@dataclass(frozen=True)
class Counters:
    """Machine-wide CPU jiffies, the load average and this process tree's CPU times, read at one moment."""

    cpu: dict[str, int]
    load: list[float]
    own: os.times_result

    @classmethod
    def read(cls) -> Counters:
        return cls(cpu_times(), loadavg(), os.times())


def _has_steal(start: Counters, end: Counters) -> bool:
    return bool(start.cpu and end.cpu and "steal" in start.cpu)


def steal_pct(start: Counters, end: Counters) -> float | None:
    """Share of the CPU time between ``start`` and ``end`` that the hypervisor stole; None off Linux."""
    if not _has_steal(start, end):
        return None
    busy = sum(end.cpu.values()) - sum(start.cpu.values())
    return 100 * (end.cpu["steal"] - start.cpu["steal"]) / busy if busy else 0.0


def foreign_cpu_s(start: Counters, end: Counters) -> float | None:
    """CPU seconds between ``start`` and ``end`` spent by processes other than this one and its children."""
    if not _has_steal(start, end):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    busy_s = sum(end.cpu[k] - start.cpu[k] for k in ("user", "nice", "system", "irq", "softirq", "steal")) / hz
    # Ours: this process and its (waited-for) children, i.e. every service process of this run.
    own_s = sum(
        getattr(end.own, k) - getattr(start.own, k) for k in ("user", "system", "children_user", "children_system")
    )
    return max(0.0, busy_s - own_s)


def omp_env() -> dict[str, str]:
    """The OpenMP/MKL variables in this environment: they change torch's threading in every process."""
    return {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "GOMP_"))}


# ----------------------------------------------------------------------------------------------- description
def _cmd(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    lscpu = _cmd(["lscpu"]).splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu if ln.startswith("Model name")), platform.processor())
    info: dict[str, Any] = {
        "nproc": _cmd(["nproc"]) or str(os.cpu_count()),
        "cpu_model": model,
        "lscpu_head": lscpu[:10],
        "free_h": _cmd(["free", "-h"]).splitlines(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torch_threads_bench": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


# ----------------------------------------------------------------------------------------------- quiet
def wait_low_load(timeout_s: float) -> float:
    """Wait (up to ``timeout_s``) for the 1-min load average to fall below half the CPUs; the seconds waited."""
    start = time.monotonic()
    limit = (os.cpu_count() or 2) / 2
    while (load := (loadavg() or [0.0])[0]) >= limit and time.monotonic() - start < timeout_s:
        log(f"load average {load:.2f} ≥ {limit:g}: waiting for a quieter machine")
        time.sleep(15)
    return time.monotonic() - start


def serve_processes() -> list[tuple[int, str]]:
    """Every Triptych service process (ours and anyone else's), by its command line (``SERVE_MARKS``)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(mark in cmd for mark in SERVE_MARKS):
            out.append((int(proc.name), cmd.strip()))
    return out


def descendants(pid: int) -> set[int]:
    """``pid`` and its descendants (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(proc.name))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo.extend(children.get(p, []))
    return out


def foreign_serve_count(own_roots: list[int]) -> int:
    """How many ``serve`` processes run that are not in the process trees rooted at ``own_roots``."""
    own: set[int] = set()
    for root in own_roots:
        own |= descendants(root)
    return sum(1 for pid, _ in serve_processes() if pid not in own)


def cpu_busy_pct(window_s: float) -> float:
    """Share of all CPUs busy (not idle or iowait) over the next ``window_s`` seconds, from /proc/stat."""
    a = cpu_times()
    time.sleep(window_s)
    b = cpu_times()
    total = sum(b.values()) - sum(a.values())
    idle = (b.get("idle", 0) - a.get("idle", 0)) + (b.get("iowait", 0) - a.get("iowait", 0))
    return 100.0 * (1 - idle / total) if total else 0.0


def wait_for_quiet(max_wait_s: float) -> dict[str, Any]:
    """Wait (up to ``max_wait_s``) until no other `serve` process runs and the CPUs are < 15 % busy for 5 s."""
    start = time.monotonic()
    last_log = -60.0
    while True:
        n, busy = len(serve_processes()), cpu_busy_pct(5)
        waited = time.monotonic() - start
        if (n == 0 and busy < 15) or waited >= max_wait_s:
            return {"waited_s": round(waited, 1), "foreign_serve_processes": n, "cpu_busy_pct": round(busy, 1),
                    "load1": (loadavg() or [0.0])[0], "quiet": n == 0 and busy < 15}  # fmt: skip
        if waited - last_log >= 30:
            last_log = waited
            log(f"waiting for quiet: {n} `serve` processes of others, CPUs {busy:.0f} % busy")
