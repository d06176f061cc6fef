"""Soak at saturation (hardening): twice central's capacity for a fixed time; memory, health and errors.

One ``triptych serve all`` tree (central and the three stages in their own processes, as deployed) on the tiny
random-weight model, with a small ``TRIPTYCH_MAX_QUEUE`` (``--capacity``, 4): central admits that many
generations at once and answers the rest 429 with ``Retry-After`` (``central.requests.GenerationSlots``).

1. waits for ``/readyz``, reads each of the four processes' RSS, open file descriptors and threads (/proc);
2. ``--multiple`` × capacity async clients (8) each send ``POST /v1/txt2img`` (``--steps`` steps, every request
   its own prompt and seed, PNG reply in JSON) as soon as their previous one is answered; a 429 makes the
   client wait ``--backoff`` s (± 50 % jitter) and retry. A warm-up (``--warmup`` s) comes first, then the
   measured window (``--duration`` s); RSS is sampled every ``--rss-interval`` s throughout;
3. over the measured window a thread polls every service's ``/healthz`` every ``--health-interval-ms`` ms;
4. after it: the RSS, descriptors and threads again, and a check that central's capacity came back (capacity
   concurrent requests, all 200, none 429).

Reported: statuses (200 / 429 / anything else: a 5xx is a finding and printed as such), images/s, latency
of the successful generations, ``/healthz`` p50/p99/max, and each process's RSS at ready, after the warm-up
and at the end, with the growth and the slope over the measured window (flat memory = small growth next to
the baseline). Nothing is asserted: the figures go to stdout as markdown, to ``bench/results/soak-*.json``
and to the "Soak at saturation" section of ``docs/benchmarks.md`` (between ``soak:begin`` / ``soak:end``
markers; ``--no-write-docs`` leaves the file alone; ``--render FILE`` rewrites it from a saved run).
``python -m bench.soak --help`` lists the knobs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.common import REPO, RESULTS_DIR, log, stats
from bench.machine import Counters, foreign_cpu_s, foreign_serve_count, machine_info, omp_env, steal_pct, wait_for_quiet
from bench.services import Server, free_port_block, prom_value, service_env, started, wait_ready
from bench.throughput_load import HealthPoller, request_body
from bench.throughput_report import f1

DOCS = REPO / "docs" / "benchmarks.md"
BEGIN = "<!-- soak:begin (written by `python -m bench.soak`) -->"
END = "<!-- soak:end -->"
# serve all's four children, by the module each runs (`python -m <module>`), in port order.
MODULES = ("central", "text_encoder", "diffusion_unet", "vae_decoder")


# ----------------------------------------------------------------------------------------------- cli
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="an existing model directory (default: create_tiny in a temp dir)")
    p.add_argument("--capacity", type=int, default=4, help="TRIPTYCH_MAX_QUEUE of the services (4)")
    p.add_argument("--multiple", type=float, default=2.0, help="clients = multiple × capacity (2)")
    p.add_argument("--duration", type=float, default=90, help="measured seconds at saturation (90)")
    p.add_argument("--warmup", type=float, default=15, help="seconds of the same load before measuring (15)")
    p.add_argument("--steps", type=int, default=8, help="num_inference_steps per request (8)")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--backoff", type=float, default=0.25, help="seconds a client waits after a 429, ± 50 %% (0.25)")
    p.add_argument("--health-interval-ms", type=int, default=100, help="/healthz probe period (100)")
    p.add_argument("--rss-interval", type=float, default=5, help="seconds between RSS samples (5)")
    p.add_argument("--request-timeout", type=float, default=120, help="client timeout per request, s (120)")
    p.add_argument("--cpu-threads", type=int, default=None, help="TRIPTYCH_CPU_THREADS for the services")
    p.add_argument("--wait-quiet", type=float, default=0, help="wait up to this many s for no other `serve` running")
    p.add_argument("--ready-timeout", type=float, default=300)
    p.add_argument("--no-write-docs", action="store_true", help="leave docs/benchmarks.md alone")
    p.add_argument("--out", type=Path, help="JSON results file (default bench/results/soak-<time>.json)")
    p.add_argument("--render", type=Path, help="no run: print (and write to the docs) a saved results file")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- processes
def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (from /proc/*/stat)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(proc.name))
        except (OSError, IndexError, ValueError):
            continue
    return out


def service_pids(root: int) -> dict[str, int]:
    """serve all's (``root``) four service processes by module name."""
    pids: dict[str, int] = {}
    for pid in children(root):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        for i, arg in enumerate(argv[:-1]):
            if arg == "-m" and argv[i + 1] in MODULES:
                pids[argv[i + 1]] = pid
    missing = set(MODULES) - set(pids)
    if missing:
        raise RuntimeError(f"serve all (pid {root}) has no {', '.join(sorted(missing))} process")
    return pids


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM in MiB, threads and open file descriptors of ``pid``; {} once it is gone."""
    try:
        fields = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in ln)
        fds = sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return {}
    return {
        "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
        "hwm_mib": int(fields["VmHWM"].split()[0]) / 1024,
        "threads": int(fields["Threads"]),
        "fds": fds,
    }


def snapshot(pids: dict[str, int]) -> dict[str, dict[str, float]]:
    return {name: proc_status(pid) for name, pid in pids.items()}


# ----------------------------------------------------------------------------------------------- load
class Soak:
    """The clients, the RSS sampler and the health probe of one soak; what they saw."""

    def __init__(self, args: argparse.Namespace, server: Server, pids: dict[str, int]) -> None:
        self.args, self.server, self.pids = args, server, pids
        self.clients = max(1, round(args.multiple * args.capacity))
        self.attempts: list[dict[str, Any]] = []  # every POST: status, start, end, latency
        self.rss_samples: list[tuple[float, dict[str, dict[str, float]]]] = []
        self.retry_after: dict[str, int] = {}
        self.five_xx: list[str] = []
        self.health: HealthPoller | None = None
        self.t0 = self.w0 = self.w1 = 0.0
        self.warm: dict[str, dict[str, float]] = {}
        self.cache_bytes: dict[str, float | None] = {}

    async def one(self, client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            r = await client.post(f"{self.server.url}/v1/txt2img", json=body)
            status: int | str = r.status_code
        except httpx.HTTPError as exc:
            r, status = None, f"error:{type(exc).__name__}"
        t1 = time.perf_counter()
        rec = {"status": status, "t_start": t0, "t_end": t1, "latency_ms": (t1 - t0) * 1000}
        self.attempts.append(rec)
        if r is not None and status == 429:
            ra = r.headers.get("retry-after", "none")
            self.retry_after[ra] = self.retry_after.get(ra, 0) + 1
        elif r is not None and isinstance(status, int) and status >= 500:
            msg = f"{status} at t={t1 - self.t0:.1f} s: {r.text[:300]}"
            self.five_xx.append(msg)
            log(f"!!! FINDING: POST /v1/txt2img answered {msg}")
        return rec

    async def worker(self, client: httpx.AsyncClient, k: int, deadline: float) -> None:
        rng = random.Random(k)
        i = 0
        while time.perf_counter() < deadline:
            body = request_body(i * self.clients + k, self.args.steps, self.args.guidance_scale, 10_000)
            i += 1
            first = time.perf_counter()
            while True:
                rec = await self.one(client, body)
                if rec["status"] != 429 or time.perf_counter() >= deadline:
                    break
                await asyncio.sleep(self.args.backoff * rng.uniform(0.5, 1.5))
            if rec["status"] == 200:
                rec["with_retries_ms"] = (rec["t_end"] - first) * 1000

    async def sampler(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.rss_samples.append((time.perf_counter() - self.t0, snapshot(self.pids)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.args.rss_interval)

    async def cache_bytes_now(self, client: httpx.AsyncClient) -> float | None:
        try:
            r = await client.get(f"{self.server.text_encoder_url}/metrics")
            return prom_value(r.text, "triptych_embedding_cache_bytes")
        except httpx.HTTPError:
            return None

    async def phases(self, client: httpx.AsyncClient, workers: asyncio.Future[Any]) -> None:
        """Mark the end of the warm-up (RSS baseline, the probe starts) and of the measured window."""
        a = self.args
        await asyncio.sleep(a.warmup)
        self.w0 = time.perf_counter()
        self.warm = snapshot(self.pids)
        self.cache_bytes["after_warmup"] = await self.cache_bytes_now(client)
        urls = {name: f"http://127.0.0.1:{self.server.base + i}" for i, name in enumerate(MODULES)}
        self.health = HealthPoller(urls, interval_s=a.health_interval_ms / 1000).__enter__()
        log(f"warm-up done; measuring for {a.duration:g} s")
        await asyncio.sleep(a.duration)
        self.w1 = time.perf_counter()
        self.health.__exit__()
        log("measured window over; letting the requests in flight finish")
        await workers

    async def run(self) -> dict[str, Any]:
        a = self.args
        limits = httpx.Limits(max_connections=self.clients + 4, max_keepalive_connections=self.clients + 4)
        timeout = httpx.Timeout(a.request_timeout, connect=10)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            self.t0 = time.perf_counter()
            deadline = self.t0 + a.warmup + a.duration
            stop = asyncio.Event()
            sampler = asyncio.create_task(self.sampler(stop))
            log(f"{self.clients} clients against capacity {a.capacity}: {a.warmup:g} s warm-up")
            workers = asyncio.gather(*(self.worker(client, k, deadline) for k in range(self.clients)))
            await self.phases(client, workers)
            drained = time.perf_counter()
            stop.set()
            await sampler
            await asyncio.sleep(2)  # let the services settle before the last reading
            end = snapshot(self.pids)
            self.cache_bytes["end"] = await self.cache_bytes_now(client)
            # Capacity came back: as many requests at once as central admits, each must be admitted.
            log(f"checking that central admits {a.capacity} requests at once again")
            bodies = [request_body(10**6 + i, a.steps, a.guidance_scale, 0) for i in range(a.capacity)]
            n0 = len(self.attempts)
            after = await asyncio.gather(*(self.one(client, b) for b in bodies))
            del self.attempts[n0:]
            central_in_flight = None
            try:
                r = await client.get(f"{self.server.url}/metrics")
                central_in_flight = prom_value(r.text, "triptych_http_requests_in_flight")
            except httpx.HTTPError:
                pass
        return {"end": end, "drain_s": drained - self.w1, "after": [r["status"] for r in after],
                "central_http_in_flight_end": central_in_flight}  # fmt: skip


# ----------------------------------------------------------------------------------------------- summary
def slope_mib_per_min(
    samples: list[tuple[float, dict[str, dict[str, float]]]], name: str, t0: float, t1: float
) -> float:
    """Least-squares slope of ``name``'s RSS over the samples taken in [t0, t1] (seconds since the start)."""
    pts = [(t, s[name]["rss_mib"]) for t, s in samples if t0 <= t <= t1 and s.get(name)]
    if len(pts) < 3:
        return float("nan")
    t, v = np.array(pts).T
    return float(np.polyfit(t, v, 1)[0] * 60)


def summarise(soak: Soak, ready: dict[str, dict[str, float]], tail: dict[str, Any]) -> dict[str, Any]:
    a = soak.args
    window = soak.w1 - soak.w0
    measured = [r for r in soak.attempts if soak.w0 <= r["t_end"] <= soak.w1]
    counts: dict[str, int] = {}
    for r in measured:
        counts[str(r["status"])] = counts.get(str(r["status"]), 0) + 1
    ok = [r for r in measured if r["status"] == 200]
    other = {k: v for k, v in counts.items() if k not in ("200", "429")}
    w0, w1 = soak.w0 - soak.t0, soak.w1 - soak.t0
    memory = {}
    for name in MODULES:
        r0, w, e = ready[name], soak.warm.get(name, {}), tail["end"].get(name, {})
        growth = e["rss_mib"] - w["rss_mib"] if e and w else float("nan")
        memory[name] = {
            "ready": r0,
            "after_warmup": w,
            "end": e,
            "growth_mib": growth,
            "growth_pct": 100 * growth / w["rss_mib"] if w else float("nan"),
            "slope_mib_per_min": slope_mib_per_min(soak.rss_samples, name, w0, w1),
        }
    health = {}
    assert soak.health is not None
    for name in MODULES:
        h = stats(soak.health.samples[name])
        h["failures"] = soak.health.failures[name]
        health[name] = h
    findings = [f"5xx: {m}" for m in soak.five_xx]
    findings += [f"{k}: {v} responses" for k, v in other.items() if not k.startswith("5")]
    if any(s != 200 for s in tail["after"]):
        findings.append(f"after the soak, {a.capacity} concurrent requests got {tail['after']} (capacity not back)")
    for name, h in health.items():
        if h.get("n") and h["p99"] >= 1000:
            findings.append(f"/healthz p99 of {name} {h['p99']:.0f} ms")
        if h["failures"]:
            findings.append(f"/healthz of {name} failed {h['failures']} times")
    for name, m in memory.items():
        if m["growth_pct"] > 20:
            findings.append(f"{name} RSS grew {m['growth_mib']:.0f} MiB ({m['growth_pct']:.0f} %) after the warm-up")
    return {
        "clients": soak.clients,
        "window_s": window,
        "drain_s": tail["drain_s"],
        "attempts_total": len(soak.attempts),
        "counts": counts,
        "other_statuses": other,
        "retry_after_seen": soak.retry_after,
        "images_per_s": len(ok) / window if window else 0.0,
        "latency_ms": stats([r["latency_ms"] for r in ok]),
        "with_retries_ms": stats([r["with_retries_ms"] for r in ok if "with_retries_ms" in r]),
        "healthz_ms": health,
        "memory": memory,
        "embedding_cache_bytes": soak.cache_bytes,
        "after_statuses": tail["after"],
        "central_http_in_flight_end": tail["central_http_in_flight_end"],
        "findings": findings,
    }


# ----------------------------------------------------------------------------------------------- report
def markdown(res: dict[str, Any]) -> str:
    m, st, s, env = res["machine"], res["settings"], res["summary"], res["environment"]
    mem = next((ln.split()[1] for ln in m["free_h"] if ln.startswith("Mem:")), "?")
    c = s["counts"]
    lat, rr = s["latency_ms"], s["with_retries_ms"]
    steal = env.get("cpu_steal_pct")
    L = [
        "## Soak at saturation",
        "",
        f"Measured {res['started_at']} by `{res['command']}` ({res['elapsed_s']:.0f} s for the whole run). Raw "
        "results: `bench/results/soak-*.json`.",
        "",
        f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), {mem} RAM, {m['platform']}; GPU: {m['cuda'] or 'none'}.",
        f"- Software: Python {m['python']}, torch {m['torch']}, diffusers {m['diffusers']}, "
        f"transformers {m['transformers']}.",
        f"- Model: {st['model_desc']}; {st['steps']} steps, guidance {st['guidance_scale']}, PNG reply in JSON; "
        "every request its own prompt and seed.",
        f"- Services: one `triptych serve all`, TRIPTYCH_MAX_QUEUE={st['capacity']} (central's bound on "
        f"generations in flight, and each stage's), TRIPTYCH_MAX_BATCH_SIZE={st['max_batch_size']}, "
        f"TRIPTYCH_EMBEDDING_CACHE_BYTES={st['embedding_cache_bytes']}, TRIPTYCH_CPU_THREADS={st['cpu_threads']}.",
        f"- Load: {s['clients']} async httpx clients ({st['multiple']:g}× capacity), each sending its next "
        f"`POST /v1/txt2img` when the last is answered; after a 429 a client waits {st['backoff_s']:g} s ± 50 % "
        f"and retries (central asked for Retry-After {', '.join(s['retry_after_seen']) or '–'} s). "
        f"{st['warmup_s']:g} s warm-up, then {s['window_s']:.0f} s measured (the requests in flight at its end "
        f"took {s['drain_s']:.1f} s more and are not counted); `/healthz` of each service polled every "
        f"{st['health_interval_ms']} ms from a thread of the bench during the measured window.",
        f"- Machine load: {env['quiet']['foreign_serve_processes']} other `serve` processes and CPUs "
        f"{env['quiet']['cpu_busy_pct']:.0f} % busy when the run began; 1-min load average "
        f"{env['loadavg_start'][0]:.2f} at start, {env['loadavg_end'][0]:.2f} at end"
        + (f"; CPU steal {steal:.1f} %" if steal is not None else "")
        + (
            f"; CPU time used by other processes {env['foreign_cpu_s']:.0f} s of "
            f"{res['elapsed_s'] * int(m['nproc']):.0f} s available"
            if env.get("foreign_cpu_s") is not None
            else ""
        )
        + f"; other `serve` processes at the end: {env['foreign_serve_end']}.",
        "",
        "| answers in the window: 200 / 429 / other | images/s | generation p50 / p99 / max ms "
        "(200s only) | p50 / p99 ms including 429 retries | capacity back after (all 200) |",
        "|---|---:|---|---|---|",
        f"| {c.get('200', 0)} / {c.get('429', 0)} / {sum(s['other_statuses'].values())}"
        f"{' ' + str(s['other_statuses']) if s['other_statuses'] else ''} | **{s['images_per_s']:.2f}** | "
        f"{f1(lat.get('p50', 0))} / {f1(lat.get('p99', 0))} / {f1(lat.get('max', 0))} | "
        f"{f1(rr.get('p50', 0))} / {f1(rr.get('p99', 0))} | "
        f"{'yes' if all(x == 200 for x in s['after_statuses']) else 'NO: ' + str(s['after_statuses'])} |",
        "",
        "| service | RSS MiB at ready | after warm-up | end | growth since warm-up | slope in window MiB/min "
        "| peak (VmHWM) MiB | threads (warm-up → end) | open fds (warm-up → end) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, mm in s["memory"].items():
        r0, w, e = mm["ready"], mm["after_warmup"], mm["end"]
        L.append(
            f"| {name} | {r0['rss_mib']:.0f} | {w['rss_mib']:.0f} | {e['rss_mib']:.0f} | "
            f"**{mm['growth_mib']:+.1f} ({mm['growth_pct']:+.1f} %)** | {mm['slope_mib_per_min']:+.2f} | "
            f"{e['hwm_mib']:.0f} | {w['threads']:.0f} → {e['threads']:.0f} | {w['fds']:.0f} → {e['fds']:.0f} |"
        )
    cb = s["embedding_cache_bytes"]
    if cb.get("after_warmup") is not None and cb.get("end") is not None:
        L += ["", f"The text encoder's embedding cache held {cb['after_warmup'] / 2**20:.1f} MiB after the warm-up "
                  f"and {cb['end'] / 2**20:.1f} MiB at the end (every prompt is new; it is bounded by "
                  f"TRIPTYCH_EMBEDDING_CACHE_BYTES)."]  # fmt: skip
    L += [
        "",
        "| `/healthz` at saturation | samples | p50 ms | p99 ms | max ms | failures |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, h in s["healthz_ms"].items():
        if not h.get("n"):
            L.append(f"| {name} | 0 | – | – | – | {h['failures']} |")
            continue
        L.append(f"| {name} | {h['n']} | {f1(h['p50'])} | **{f1(h['p99'])}** | {f1(h['max'])} | {h['failures']} |")
    L += ["", "Findings: " + ("; ".join(f"**{x}**" for x in s["findings"]) if s["findings"] else "none (no 5xx, "
          "no failed probe, capacity back after the soak, no RSS growth above 20 % after the warm-up).")]  # fmt: skip
    return "\n".join(L)


def write_docs(section: str) -> None:
    """Replace the text between the soak markers of docs/benchmarks.md, or append it with them."""
    block = f"{BEGIN}\n\n{section}\n\n{END}"
    text = DOCS.read_text(encoding="utf-8") if DOCS.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOCS.write_text(text, encoding="utf-8")
    log(f"rewrote the soak section of {DOCS.relative_to(REPO)}")


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        section = markdown(json.loads(args.render.read_text(encoding="utf-8")))
        print(section)
        if not args.no_write_docs:
            write_docs(section)
        return 0
    command = "python -m bench.soak" + ("" if not (argv or sys.argv[1:]) else " " + " ".join(argv or sys.argv[1:]))
    quiet = wait_for_quiet(args.wait_quiet)
    started_t = time.monotonic()
    started_at = dt.datetime.now(dt.UTC).replace(microsecond=0)
    counters_start = Counters.read()
    from shared.serving.models import create_tiny
    from shared.settings import Settings

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    out_path = args.out or RESULTS_DIR / f"soak-{stamp}.json"
    extra = {"TRIPTYCH_MAX_QUEUE": str(args.capacity)}
    if args.cpu_threads:
        extra["TRIPTYCH_CPU_THREADS"] = str(args.cpu_threads)
    defaults = Settings()

    with tempfile.TemporaryDirectory(prefix="triptych-soak-") as tmp_s:
        tmp = Path(tmp_s)
        if args.model:
            model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
            model_desc = f"`{args.model}`"
        else:
            log("creating the tiny random-weight model")
            model = str(create_tiny(tmp / "tiny"))
            model_desc = "the default `tiny` random-weight model (`create_tiny`: 64×64 images)"
        base = free_port_block(4)
        cmd = [sys.executable, "-m", "central.cli", "serve", "all", "--host", "127.0.0.1", "--port", str(base)]
        lp = RESULTS_DIR / f"soak-{stamp}.services.log"
        with started("soak", cmd, service_env(model, tmp, extra), base, lp) as server:
            ready_s = wait_ready(server.url, args.ready_timeout, lp, server.proc)
            pids = service_pids(server.proc.pid)
            log(f"ready in {ready_s:.0f} s; pids {pids}")
            ready = snapshot(pids)
            soak = Soak(args, server, pids)
            tail = asyncio.run(soak.run())
            foreign_end = foreign_serve_count([server.proc.pid])
            log("stopping the services")

    summary = summarise(soak, ready, tail)
    environment = {
        "quiet": quiet,
        "loadavg_start": counters_start.load,
        "loadavg_end": (end := Counters.read()).load,
        "cpu_steal_pct": steal_pct(counters_start, end),
        "foreign_cpu_s": foreign_cpu_s(counters_start, end),
        "foreign_serve_end": foreign_end,
        "omp_env": omp_env(),
    }
    results: dict[str, Any] = {
        "benchmark": "soak",
        "command": command,
        "started_at": started_at.isoformat(),
        "elapsed_s": time.monotonic() - started_t,
        "machine": machine_info(),
        "environment": environment,
        "settings": {
            "model": args.model or "tiny (temp dir)",
            "model_desc": model_desc,
            "capacity": args.capacity,
            "multiple": args.multiple,
            "steps": args.steps,
            "guidance_scale": args.guidance_scale,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "backoff_s": args.backoff,
            "health_interval_ms": args.health_interval_ms,
            "rss_interval_s": args.rss_interval,
            "max_batch_size": defaults.max_batch_size,
            "embedding_cache_bytes": defaults.embedding_cache_bytes,
            "cpu_threads": args.cpu_threads or defaults.cpu_threads or "unset (torch default)",
            "ready_s": ready_s,
            "pids": pids,
        },
        "summary": summary,
        "rss_samples": soak.rss_samples,
        "attempts": [{k: v for k, v in r.items() if k != "t_start"} for r in soak.attempts],
    }
    out_path.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    section = markdown(results)
    print(section)
    if not args.no_write_docs:
        write_docs(section)
    for f in summary["findings"]:
        log(f"!!! FINDING: {f}")
    log(f"wrote {out_path.relative_to(REPO) if out_path.is_relative_to(REPO) else out_path}")
    log(f"done in {results['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
