"""Throughput (issue 5, item 6; SPEC §9): step-level batching, embedding cache and backpressure, side by side.

One run, one machine, one process tree:

1. makes the default ``tiny`` random-weight model (``create_tiny``) in a temporary folder, or uses ``--model``;
2. starts two ``triptych serve all`` process trees on free loopback ports: one with the defaults (batching on)
   and one with ``TRIPTYCH_BATCHING=false`` (``--no-batching-off`` skips it); both idle except when measured;
3. loads ``diffusers.StableDiffusionPipeline`` on the same directory in this process;
4. for each repetition: diffusers serves N requests one after another (pipeline + PIL PNG encode, as central
   does), then for each concurrency level (1/4/8/16) and each server (order rotated) the same kind of
   requests go through central's ``POST /v1/txt2img`` (JSON reply) from a closed loop of C clients.
   Every request has its own prompt and seed. Images/s = requests / makespan; latency per request;
5. while concurrency 16 runs, a thread polls central's and the UNet's ``/healthz`` (p99 at saturation);
6. a 4-step request sent while a 50-step one is denoising: its latency vs its solo latency, on both servers;
7. text-encoder cache: ``POST /v1/encode`` (msgpack) straight to a text encoder, a fresh random prompt (miss)
   vs a repeated one (hit), for the tiny model, the ``sd15`` preset (768-wide, 1-layer CLIP) and a random
   CLIP ViT-L-sized text encoder (12 layers, 768 wide: SD-1.5's real encoder cost) in their own processes;
8. wire codec µs per SD-1.5-sized payload (``bench.split_overhead.bench_wire``).

It prints the machine, the settings and a markdown section to stdout and writes JSON (and the services' logs)
to ``bench/results/``. ``python -m bench.throughput --help`` lists the knobs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import os
import random
import string
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.split_overhead import (
    PNG_COMPRESS_LEVEL,
    REPO,
    RESULTS_DIR,
    bench_wire,
    cpu_times,
    loadavg,
    log,
    machine_info,
    percentile,
    stop,
    wait_ready,
    wire_table,
)

PROMPT = "a watercolor painting of a red fox in the snow"
SERVE_MARK = "central.cli serve"


# ----------------------------------------------------------------------------------------------- helpers
def stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "min": min(values),
        "max": max(values),
        "mean": float(np.mean(values)),
    }


def serve_processes() -> list[tuple[int, str]]:
    """Every process whose command line contains ``central.cli serve`` (ours and anyone else's)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if SERVE_MARK in cmd:
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


def free_port_blocks(count: int, size: int) -> list[int]:
    """``count`` non-overlapping blocks of ``size`` free loopback ports, held open until all are chosen."""
    import socket

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


# ----------------------------------------------------------------------------------------------- services
@dataclass
class Server:
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
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    log(f"[{name}] started `{' '.join(cmd[2:])}` (pid {proc.pid}); log: {log_path.relative_to(REPO)}")
    try:
        yield Server(name, proc, base, log_path)
    finally:
        stop(proc)
        log_file.close()


# ----------------------------------------------------------------------------------------------- requests
def request_body(i: int, steps: int, guidance: float, seed_base: int) -> dict[str, Any]:
    return {
        "prompt": f"{PROMPT}, variation {i}",
        "seed": seed_base + i,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "output_format": "png",
    }


async def post_txt2img(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = await client.post(f"{url}/v1/txt2img", json=body)
    t1 = time.perf_counter()
    rec: dict[str, Any] = {"status": r.status_code, "latency_ms": (t1 - t0) * 1000, "t_start": t0, "t_end": t1}
    if r.status_code == 200:
        tm = r.json()["timings"]
        rec.update({k: tm[k] for k in ("encode_ms", "denoise_ms", "decode_ms", "total_ms")})
    else:
        rec["error"] = r.text[:300]
    return rec


async def closed_loop(url: str, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """``concurrency`` clients, each sending its next request as soon as its previous one is answered."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    records: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10), limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                records.append(await post_txt2img(client, url, body))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        makespan = time.perf_counter() - t0
    ok = [r for r in records if r["status"] == 200]
    return {
        "concurrency": concurrency,
        "requests": len(bodies),
        "ok": len(ok),
        "errors": {str(s): sum(1 for r in records if r["status"] == s) for s in {r["status"] for r in records}}
        if len(ok) != len(records)
        else {},
        "error_samples": [r["error"] for r in records if r["status"] != 200][:3],
        "makespan_s": makespan,
        "images_per_s": len(ok) / makespan,
        "latencies_ms": [r["latency_ms"] for r in ok],
        "hop_ms": {k: [r[k] for r in ok] for k in ("encode_ms", "denoise_ms", "decode_ms")},
    }


class HealthPoller:
    """A thread that GETs ``/healthz`` on each URL in turn every ``interval_s`` and records the latencies."""

    def __init__(self, urls: dict[str, str], interval_s: float = 0.02) -> None:
        self.urls = urls
        self.interval_s = interval_s
        self.samples: dict[str, list[float]] = {name: [] for name in urls}
        self.failures: dict[str, int] = {name: 0 for name in urls}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="healthz-poller", daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                for name, url in self.urls.items():
                    t0 = time.perf_counter()
                    try:
                        ok = client.get(f"{url}/healthz").status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    ms = (time.perf_counter() - t0) * 1000
                    if ok:
                        self.samples[name].append(ms)
                    else:
                        self.failures[name] += 1
                self._stop.wait(self.interval_s)

    def __enter__(self) -> HealthPoller:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()


async def unet_metric(client: httpx.AsyncClient, server: Server, name: str) -> float:
    r = await client.get(f"{server.unet_url}/metrics")
    return prom_value(r.text, name) or 0.0


def unet_metrics_sync(server: Server) -> dict[str, float]:
    text = httpx.get(f"{server.unet_url}/metrics", timeout=10).text
    names = ("triptych_unet_forwards", "triptych_unet_largest_batch_images", "triptych_denoise_steps_total")
    return {n: prom_value(text, n) or 0.0 for n in names}


# ----------------------------------------------------------------------------------------------- diffusers
def diffusers_sequential(pipe: Any, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """The same requests, one after another, in this process: pipeline + PNG encode like central's."""
    import torch

    lat = []
    t_all = time.perf_counter()
    for body in bodies:
        t0 = time.perf_counter()
        out = pipe(
            body["prompt"],
            num_inference_steps=body["num_inference_steps"],
            guidance_scale=body["guidance_scale"],
            generator=[torch.Generator("cpu").manual_seed(body["seed"])],
            output_type="pil",
        )
        buf = io.BytesIO()
        out.images[0].save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        lat.append((time.perf_counter() - t0) * 1000)
    makespan = time.perf_counter() - t_all
    return {
        "requests": len(bodies),
        "makespan_s": makespan,
        "images_per_s": len(bodies) / makespan,
        "latencies_ms": lat,
    }


# ----------------------------------------------------------------------------------------------- 4 under 50
async def short_under_long(
    server: Server, steps_long: int, steps_short: int, trials: int, delay_s: float
) -> dict[str, Any]:
    """Latency of a ``steps_short`` request solo, and sent while a ``steps_long`` one is denoising."""
    gauge = "triptych_unet_batch_images" if server.name == "batching_on" else "triptych_requests_admitted"
    solo: list[float] = []
    long_solo: list[float] = []
    under: list[dict[str, float]] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10)) as client:
        for i in range(trials + 1):  # the first of each is a warm-up
            rec = await post_txt2img(client, server.url, request_body(9000 + i, steps_short, 7.5, 9000))
            if i:
                solo.append(rec["latency_ms"])
        for i in range(2):
            rec = await post_txt2img(client, server.url, request_body(9100 + i, steps_long, 7.5, 9100))
            if i:
                long_solo.append(rec["latency_ms"])
        for i in range(trials):
            long_task = asyncio.create_task(
                post_txt2img(client, server.url, request_body(9200 + i, steps_long, 7.5, 9200))
            )
            t_sent = time.perf_counter()
            # The long request is in the UNet (its text encoding is done) ...
            while await unet_metric(client, server, gauge) < 1 and not long_task.done():
                await asyncio.sleep(0.005)
            t_in_unet = time.perf_counter()
            # ... and a few of its steps have run.
            await asyncio.sleep(delay_s)
            short = await post_txt2img(client, server.url, request_body(9300 + i, steps_short, 7.5, 9300))
            long = await long_task
            under.append(
                {
                    "short_ms": short["latency_ms"],
                    "long_ms": long["latency_ms"],
                    "long_in_unet_after_ms": (t_in_unet - t_sent) * 1000,
                    "short_sent_after_long_ms": (short["t_start"] - long["t_start"]) * 1000,
                    "long_finished_after_short": float(long["t_end"] > short["t_end"]),
                    **{f"short_{k}": short.get(k, float("nan")) for k in ("encode_ms", "denoise_ms", "decode_ms")},
                }
            )
    solo_p50 = percentile(solo, 50)
    under_ms = [u["short_ms"] for u in under]
    return {
        "server": server.name,
        "steps_long": steps_long,
        "steps_short": steps_short,
        "solo_short_ms": solo,
        "solo_long_ms": long_solo,
        "under": under,
        "solo_p50_ms": solo_p50,
        "under_p50_ms": percentile(under_ms, 50),
        "ratio_p50": percentile(under_ms, 50) / solo_p50,
        "ratio_max": max(under_ms) / solo_p50,
        "long_still_running_all": all(u["long_finished_after_short"] for u in under),
    }


# ----------------------------------------------------------------------------------------------- cache
def random_prompt(rng: random.Random) -> str:
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(rng.randint(6, 12))]
    return " ".join(words)


def cache_hit_miss(te_url: str, n: int, seed: int) -> dict[str, Any]:
    """``/v1/encode`` (prompt only, no guidance) with a fresh random prompt (miss) vs one repeated (hit)."""
    from shared import wire

    rng = random.Random(seed)
    headers = {"content-type": wire.CONTENT_TYPE, "accept": wire.CONTENT_TYPE}

    def call(client: httpx.Client, prompt: str) -> tuple[float, float]:
        body = wire.encode({"prompt": [prompt], "do_classifier_free_guidance": False})
        t0 = time.perf_counter()
        r = client.post(f"{te_url}/v1/encode", content=body, headers=headers)
        r.raise_for_status()
        msg = wire.decode(r.content)
        ms = (time.perf_counter() - t0) * 1000
        assert tuple(msg["prompt_embeds"].shape[:2]) == (1, 77)
        return ms, float(msg["encode_ms"])

    def metrics(client: httpx.Client) -> tuple[float, float]:
        text = client.get(f"{te_url}/metrics").text
        hits = prom_value(text, "triptych_embedding_cache_hits") or 0.0
        return hits, prom_value(text, "triptych_embedding_cache_misses") or 0.0

    hit_prompt = random_prompt(rng)
    wall: dict[str, list[float]] = {"miss": [], "hit": []}
    server: dict[str, list[float]] = {"miss": [], "hit": []}
    with httpx.Client(timeout=120) as client:
        for _ in range(3):  # warm-up: connection, first shapes; also puts hit_prompt in the cache
            call(client, hit_prompt)
            call(client, random_prompt(rng))
        h0, m0 = metrics(client)
        for _ in range(n):  # interleaved so both see the same conditions
            w, s = call(client, random_prompt(rng))
            wall["miss"].append(w)
            server["miss"].append(s)
            w, s = call(client, hit_prompt)
            wall["hit"].append(w)
            server["hit"].append(s)
        h1, m1 = metrics(client)
    return {
        "n": n,
        "wall_ms": {k: stats(v) for k, v in wall.items()},
        "server_encode_ms": {k: stats(v) for k, v in server.items()},
        "ratio_wall_p50": percentile(wall["miss"], 50) / percentile(wall["hit"], 50),
        "ratio_server_p50": percentile(server["miss"], 50) / max(percentile(server["hit"], 50), 1e-6),
        "counted_hits": h1 - h0,
        "counted_misses": m1 - m0,
    }


def inprocess_encode_ms(model: str, n: int, seed: int) -> dict[str, float]:
    """Reference: the same text encoder run in this process's main thread (what a miss costs the model alone),
    tokenizer included, like ``StableDiffusionPipeline.encode_prompt`` for one prompt."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    rng = random.Random(seed)
    tok = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").eval()
    times = []
    with torch.inference_mode():
        for i in range(n + 2):
            t0 = time.perf_counter()
            ids = tok([random_prompt(rng)], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            te(ids.input_ids)[0]
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1000)
    del te
    return stats(times)


def make_clip_l_text_encoder(base_model: Path, out: Path) -> Path:
    """A text-encoder-only model dir: sd15's tokenizer and a random CLIP ViT-L/14-sized text encoder
    (12 layers, 768 wide, 3072 MLP, 12 heads: SD-1.5's), so a cache miss costs what SD-1.5's does."""
    import shutil

    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(base_model / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    tokenizer = CLIPTokenizer.from_pretrained(str(out / "tokenizer"))
    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    CLIPTextModel(cfg).save_pretrained(str(out / "text_encoder"))
    (out / "TRIPTYCH_RANDOM_WEIGHTS").write_text("random CLIP ViT-L-sized text encoder for bench.throughput\n")
    return out


# ----------------------------------------------------------------------------------------------- report
def f1(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def markdown(res: dict[str, Any]) -> str:
    m, st, env = res["machine"], res["settings"], res["environment"]
    mem = next((ln.split()[1] for ln in m["free_h"] if ln.startswith("Mem:")), "?")
    L: list[str] = []
    L += [
        "## Throughput: step-level batching, embedding cache, health at saturation",
        "",
        f"Measured {res['started_at']} by `{res['command']}` ({res['elapsed_s']:.0f} s for the whole run).",
        "",
        f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), {mem} RAM, {m['platform']}; GPU: {m['cuda'] or 'none'}.",
        f"- Software: Python {m['python']}, torch {m['torch']}, diffusers {m['diffusers']}, "
        f"transformers {m['transformers']}.",
        f"- Model: {st['model_desc']}; {st['steps']} steps, guidance {st['guidance_scale']} (CFG: 2 UNet rows per "
        f"image), native size, PNG reply in JSON; every request its own prompt and seed.",
        f"- Services: `triptych serve all` ×{2 if st['batching_off'] else 1} (batching on = defaults"
        + (", and `TRIPTYCH_BATCHING=false`" if st["batching_off"] else "")
        + f"); TRIPTYCH_MAX_BATCH_SIZE={st['max_batch_size']}, TRIPTYCH_MAX_QUEUE={st['max_queue']}, "
        f"TRIPTYCH_EMBEDDING_CACHE_BYTES={st['embedding_cache_bytes']}, TRIPTYCH_CPU_THREADS={st['cpu_threads']}; "
        f"device cpu, float32. diffusers runs in the bench process (torch threads {m['torch_threads_bench']}).",
        f"- Requests per concurrency level and repetition: {st['requests_desc']}; {st['reps']} repetitions"
        + (
            f" (of {st['reps_asked']} asked: the rest would not fit in {st['time_budget_s']:g} s)"
            if st["reps"] < st["reps_asked"]
            else ""
        )
        + ", "
        "order of the servers rotated; images/s = requests / makespan (median across repetitions, min–max in "
        "brackets); latencies pooled across repetitions.",
        f"- Load: {env['quiet']['foreign_serve_processes']} other `serve` processes, CPUs "
        f"{env['quiet']['cpu_busy_pct']:.0f} % busy and load {env['quiet']['load1']:.2f} when the run began (waited "
        f"{env['quiet']['waited_s']:.0f} s for quiet{'' if env['quiet']['quiet'] else ', in vain'}); "
        f"other `serve` processes seen during the run: max {env['foreign_serve_max']}; 1-min load average "
        f"{env['loadavg_start'][0]:.2f} at start, {env['loadavg_end'][0]:.2f} at end"
        + (f"; CPU steal {env['cpu_steal_pct']:.1f} %" if env.get("cpu_steal_pct") is not None else "")
        + (
            f"; CPU time used by other processes during the run {env['foreign_cpu_s']:.0f} s of "
            f"{res['elapsed_s'] * int(m['nproc']):.0f} s available"
            if env.get("foreign_cpu_s") is not None
            else ""
        )
        + ".",
        "",
        "### Images/s and latency vs concurrency",
        "",
    ]
    d = res["summary"]["diffusers"]
    head = (
        "| concurrency | server | images/s | × sequential diffusers | p50 ms | p95 ms | "
        "p50 hop ms: encode / denoise / decode | images per UNet forward | errors |"
    )
    L += [head, "|---:|---|---:|---:|---:|---:|---|---:|---|"]
    L.append(
        f"| 1 (one after another) | plain diffusers `StableDiffusionPipeline` + PNG | {d['images_per_s']:.2f} "
        f"[{d['ips_min']:.2f}–{d['ips_max']:.2f}] | 1.00 | {f1(d['latency']['p50'])} | "
        f"{f1(d['latency']['p95'])} | – | 1 | – |"
    )
    for row in res["summary"]["levels"]:
        per_fwd = f"{row['images_per_forward']:.2f}" if row.get("images_per_forward") else "1 (no batcher)"
        label = "Triptych, batching on" if row["server"] == "batching_on" else "Triptych, `TRIPTYCH_BATCHING=false`"
        L.append(
            f"| {row['concurrency']} | {label} | {row['images_per_s']:.2f} [{row['ips_min']:.2f}–{row['ips_max']:.2f}] "
            f"| **{row['vs_diffusers']:.2f}** | {f1(row['latency']['p50'])} | {f1(row['latency']['p95'])} | "
            f"{' / '.join(f1(row['hop_p50_ms'][k]) for k in ('encode_ms', 'denoise_ms', 'decode_ms'))} | "
            f"{per_fwd} | {row['errors'] or 'none'} |"
        )
    su = res["short_under_long"]
    L += [
        "",
        f"### A {st['short_steps']}-step request sent while a {st['long_steps']}-step one is denoising "
        f"({st['sul_trials']} trials; sent {st['sul_delay_ms']:.0f} ms after the long one entered the UNet)",
        "",
        f"| server | {st['short_steps']}-step solo p50 ms | {st['long_steps']}-step solo ms | "
        f"{st['short_steps']}-step under the {st['long_steps']}-step, p50 (max) ms | ratio p50 (max) | "
        f"{st['long_steps']}-step still running when it finished |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in su.items():
        waited = "no: it waited for it" if name == "batching_off" else "not always"
        label = "batching on (continuous)" if name == "batching_on" else "`TRIPTYCH_BATCHING=false` (one at a time)"
        under = [u["short_ms"] for u in r["under"]]
        L.append(
            f"| {label} | {f1(r['solo_p50_ms'])} | {f1(percentile(r['solo_long_ms'], 50))} | "
            f"{f1(r['under_p50_ms'])} ({f1(max(under))}) | **{r['ratio_p50']:.2f}×** ({r['ratio_max']:.2f}×) | "
            f"{'yes, every trial' if r['long_still_running_all'] else waited} |"
        )
    L += [
        "",
        "### Text-encoder embedding cache: `POST /v1/encode` (msgpack, one prompt, no guidance) straight to the stage",
        "",
        "| text encoder | miss p50 ms (client) | hit p50 ms (client) | **hit speed-up** | "
        "miss p50 ms (server `encode_ms`) | hit p50 ms (server) | counted hits / misses | "
        "same encoder in-process, p50 ms |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, c in res["cache"].items():
        if "error" in c:
            L.append(f"| {name} | – | – | – | – | – | failed: {c['error'][:80]} |")
            continue
        L.append(
            f"| {name} | {f1(c['wall_ms']['miss']['p50'])} | {f1(c['wall_ms']['hit']['p50'])} | "
            f"**{c['ratio_wall_p50']:.1f}×** | {f1(c['server_encode_ms']['miss']['p50'])} | "
            f"{c['server_encode_ms']['hit']['p50']:.3f} | {c['counted_hits']:.0f} / {c['counted_misses']:.0f} | "
            f"{f1(c['inprocess_ms']['p50']) if 'inprocess_ms' in c else '–'} |"
        )
    L += [
        "",
        f"### `/healthz` while concurrency {max(st['levels'])} runs (saturated; polled every "
        f"{st['health_interval_ms']} ms from a thread of the bench)",
        "",
        "| server | service | samples | p50 ms | p99 ms | max ms | failures |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for server, by in res["summary"]["healthz"].items():
        for svc, h in by.items():
            L.append(
                f"| {server} | {svc} | {h['n']} | {f1(h['p50'])} | **{f1(h['p99'])}** | {f1(h['max'])} | "
                f"{h['failures']} |"
            )
    if res["wire"]:
        L += ["", "### Wire codec (`shared.wire.encode` + `decode`, one-tensor message, median of 5 timed loops)"]
        L += wire_table(res["wire"])
    L += ["", "### Targets (issue 5)", ""]
    L += [f"- {t}" for t in res["targets"]]
    return "\n".join(L)


def targets(res: dict[str, Any]) -> list[str]:
    out = []
    st = res["settings"]
    on8 = next((r for r in res["summary"]["levels"] if r["server"] == "batching_on" and r["concurrency"] == 8), None)
    if on8:
        v = on8["vs_diffusers"]
        out.append(
            f"concurrency 8 ≥ 1.6× sequential diffusers (2× the aim): {v:.2f}× "
            f"(repetitions {on8['ips_min'] / res['summary']['diffusers']['images_per_s']:.2f}–"
            f"{on8['ips_max'] / res['summary']['diffusers']['images_per_s']:.2f}×) → "
            f"{'met' if v >= 1.6 else 'NOT met'}{' (the 2× aim too)' if v >= 2 else ''}"
        )
    su = res["short_under_long"].get("batching_on")
    if su:
        r = su["ratio_p50"]
        out.append(
            f"{st['short_steps']}-step under a running {st['long_steps']}-step within 2× of solo: {r:.2f}× "
            f"(worst trial {su['ratio_max']:.2f}×) → {'met' if r < 2 else 'NOT met'}"
        )
    for name, c in res["cache"].items():
        if "error" in c:
            continue
        r = c["ratio_wall_p50"]
        out.append(f"cache hit ≥ 20× faster than a miss, {name}: {r:.1f}× → {'met' if r >= 20 else 'NOT met'}")
    for server, by in res["summary"]["healthz"].items():
        if server != "batching_on":
            continue
        for svc, h in by.items():
            out.append(f"`/healthz` p99 < 50 ms at saturation, {svc}: {h['p99']:.1f} ms → "
                       f"{'met' if h['p99'] < 50 else 'NOT met'}")  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="an existing model directory (default: create_tiny in a temp dir)")
    p.add_argument("--steps", type=int, default=20, help="num_inference_steps of the throughput requests (20)")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--levels", default="1,4,8,16", help="concurrency levels (1,4,8,16)")
    p.add_argument(
        "--requests", type=int, default=None, help="requests per level and repetition (default max(8, 2×level))"
    )
    p.add_argument("--diffusers-requests", type=int, default=16, help="sequential diffusers requests per repetition")
    p.add_argument("--reps", type=int, default=3, help="repetitions of the sweep, at most (3)")
    p.add_argument("--min-reps", type=int, default=2, help="repetitions run whatever the time budget (2)")
    p.add_argument(
        "--time-budget", type=float, default=345, help="seconds for the whole run; later repetitions are skipped (345)"
    )
    p.add_argument("--no-batching-off", action="store_true", help="skip the TRIPTYCH_BATCHING=false server")
    p.add_argument("--short-steps", type=int, default=4)
    p.add_argument("--long-steps", type=int, default=50)
    p.add_argument("--sul-trials", type=int, default=5, help="trials of the short-under-long test (5)")
    p.add_argument(
        "--sul-delay-ms", type=float, default=100, help="after the long request is in the UNet, wait this long (100)"
    )
    p.add_argument("--cache-n", type=int, default=30, help="hit and miss calls per text encoder (30)")
    p.add_argument("--no-sd15-cache", action="store_true", help="skip the sd15-preset text encoder")
    p.add_argument("--no-clip-l-cache", action="store_true", help="skip the CLIP ViT-L-sized text encoder")
    p.add_argument("--health-interval-ms", type=int, default=20)
    p.add_argument("--max-batch-size", type=int, default=None, help="TRIPTYCH_MAX_BATCH_SIZE for the services")
    p.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        help="TRIPTYCH_CPU_THREADS for the services, and diffusers' torch threads",
    )
    p.add_argument("--wait-quiet", type=float, default=0, help="wait up to this many s for no other `serve` running")
    p.add_argument("--ready-timeout", type=float, default=300)
    p.add_argument("--no-wire", action="store_true")
    p.add_argument("--out", type=Path, help="JSON results file (default bench/results/throughput-<time>.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m bench.throughput" + (
        "" if not (argv or sys.argv[1:]) else " " + " ".join(argv or sys.argv[1:])
    )
    quiet = wait_for_quiet(args.wait_quiet)
    started_t = time.monotonic()
    started_at = dt.datetime.now(dt.UTC).replace(microsecond=0)
    cpu0, load0, own0 = cpu_times(), loadavg(), os.times()
    levels = [int(x) for x in args.levels.split(",")]

    import torch

    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from shared.models import create_tiny
    from shared.settings import Settings

    diffusers_logging.disable_progress_bar()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    out_path = args.out or RESULTS_DIR / f"throughput-{stamp}.json"
    defaults = Settings()
    extra: dict[str, str] = {}
    if args.max_batch_size:
        extra["TRIPTYCH_MAX_BATCH_SIZE"] = str(args.max_batch_size)
    if args.cpu_threads:
        extra["TRIPTYCH_CPU_THREADS"] = str(args.cpu_threads)

    wire_rows: list[dict[str, Any]] = []
    if not args.no_wire:
        log("wire codec micro-benchmark")
        wire_rows = bench_wire(min_time_s=0.05, repeats=5)

    own_roots: list[int] = []
    foreign_seen: list[int] = []
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="triptych-throughput-") as tmp_s, ExitStack() as stack:
        tmp = Path(tmp_s)
        if args.model:
            model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
            model_desc = f"`{args.model}`"
        else:
            log("creating the tiny random-weight model")
            model = str(create_tiny(tmp / "tiny"))
            model_desc = "the default `tiny` random-weight model (`create_tiny`: 64×64 images, 8×8 latents)"
        cache_models: dict[str, str] = {}
        if not args.no_sd15_cache or not args.no_clip_l_cache:
            log("creating the sd15-preset model (text encoder only is served)")
            sd15 = create_tiny(tmp / "sd15", preset="sd15")
            if not args.no_sd15_cache:
                cache_models["sd15 preset (768 wide, 1 layer)"] = str(sd15)
            if not args.no_clip_l_cache:
                log("creating a random CLIP ViT-L-sized text encoder (12 layers × 768)")
                cache_models["CLIP ViT-L-sized (768 wide, 12 layers, random)"] = str(
                    make_clip_l_text_encoder(sd15, tmp / "clip-l")
                )

        # ---- start everything at once (start-up is not measured), then wait for readiness
        names = ["batching_on"] + ([] if args.no_batching_off else ["batching_off"])
        bases = free_port_blocks(len(names) + len(cache_models), 4)
        servers: dict[str, Server] = {}
        for name, base in zip(names, bases, strict=False):
            env = service_env(
                model, tmp, {**extra, **({"TRIPTYCH_BATCHING": "false"} if name == "batching_off" else {})}
            )
            cmd = [sys.executable, "-m", "central.cli", "serve", "all", "--host", "127.0.0.1", "--port", str(base)]
            lp = RESULTS_DIR / f"throughput-{stamp}.{name}.services.log"
            servers[name] = stack.enter_context(started(name, cmd, env, base, lp))
            own_roots.append(servers[name].proc.pid)
        te_servers: dict[str, Server] = {}
        for (label, path), base in zip(cache_models.items(), bases[len(names) :], strict=True):
            env = service_env(path, tmp, extra)
            cmd = [sys.executable, "-m", "central.cli", "serve", "text-encoder", "--host", "127.0.0.1",
                   "--port", str(base)]  # fmt: skip
            slug = "sd15" if label.startswith("sd15") else "clip_l"
            lp = RESULTS_DIR / f"throughput-{stamp}.text_encoder_{slug}.log"
            te_servers[label] = stack.enter_context(started(label, cmd, env, base, lp))
            own_roots.append(te_servers[label].proc.pid)

        log("loading StableDiffusionPipeline in the bench process")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        # UNet forwards per image: len(timesteps), which for PNDM (SD-1.5's default) is steps + 1.
        probe = type(pipe.scheduler).from_config(pipe.scheduler.config)
        probe.set_timesteps(args.steps)
        unet_iters = len(probe.timesteps)
        ready: dict[str, float] = {}
        for name, s in servers.items():
            ready[name] = wait_ready(s.url, args.ready_timeout, s.log_path, s.proc)
        for label, s in te_servers.items():
            ready[label] = wait_ready(s.url, args.ready_timeout, s.log_path, s.proc)
        log(f"all ready ({', '.join(f'{k} {v:.0f} s' for k, v in ready.items())})")

        # ---- text-encoder cache first, while everything else is idle
        cache: dict[str, Any] = {}
        te_urls = {
            "tiny model (32 wide, 2 layers)" if not args.model else "the model": servers["batching_on"].text_encoder_url
        }
        te_urls.update({label: s.url for label, s in te_servers.items()})
        for i, (label, url) in enumerate(te_urls.items()):
            log(f"text-encoder cache: {label}")
            try:
                cache[label] = cache_hit_miss(url, args.cache_n, seed=i)
            except Exception as exc:  # report and go on
                cache[label] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"  {json.dumps({k: v for k, v in cache[label].items() if k.startswith(('ratio', 'error'))})}")
        for s in list(te_servers.values()):  # free their memory and CPU before the sweep
            stop(s.proc)
        te_models = {next(iter(te_urls)): model, **cache_models}
        for label, path in te_models.items():
            if "error" not in cache[label]:
                cache[label]["inprocess_ms"] = inprocess_encode_ms(path, 5, seed=99)

        # ---- warm-up: every server at the highest level once; diffusers twice
        def bodies(level_i: int, rep: int, n: int) -> list[dict[str, Any]]:
            return [
                request_body(i, args.steps, args.guidance_scale, 100_000 * (rep + 1) + 1000 * level_i) for i in range(n)
            ]

        log("warm-up")
        diffusers_sequential(pipe, bodies(99, 99, 2))
        for name, s in servers.items():  # batch shapes up to the cap; unbatched servers need no more than a few
            n_warm = max(levels) if name == "batching_on" else min(4, max(levels))
            asyncio.run(closed_loop(s.url, bodies(98, 98, n_warm), n_warm))

        n_for = {c: args.requests or max(8, 2 * c) for c in levels}
        runs: dict[str, list[dict[str, Any]]] = {}
        diff_runs: list[dict[str, Any]] = []
        health: dict[str, list[HealthPoller]] = {name: [] for name in servers}
        reps_done, rep_time_s = 0, 0.0
        for rep in range(args.reps):
            # Keep the whole run within --time-budget: after the minimum, skip repetitions that would not fit
            # (the short-under-long test and shutdown still follow: about 45 s).
            rep_start = time.monotonic()
            if rep >= args.min_reps and rep_time_s and (rep_start - started_t) + rep_time_s + 45 > args.time_budget:
                log(f"skipping repetitions {rep + 1}-{args.reps}: past --time-budget {args.time_budget:g} s")
                break
            foreign_seen.append(foreign_serve_count(own_roots))
            r = diffusers_sequential(pipe, bodies(0, rep, args.diffusers_requests))
            diff_runs.append(r)
            log(f"rep {rep + 1}/{args.reps}: diffusers sequential {r['images_per_s']:.2f} images/s")
            for li, c in enumerate(levels):
                order = names[(rep + li) % len(names) :] + names[: (rep + li) % len(names)]
                for name in order:
                    s = servers[name]
                    before = unet_metrics_sync(s)
                    if c == max(levels):
                        poller = HealthPoller({"central": s.url, "diffusion_unet": s.unet_url},
                                              args.health_interval_ms / 1000)  # fmt: skip
                        with poller:
                            r = asyncio.run(closed_loop(s.url, bodies(li + 1, rep, n_for[c]), c))
                        health[name].append(poller)
                    else:
                        r = asyncio.run(closed_loop(s.url, bodies(li + 1, rep, n_for[c]), c))
                    after = unet_metrics_sync(s)
                    fw = after["triptych_unet_forwards"] - before["triptych_unet_forwards"]
                    r["unet_forwards"] = fw
                    r["images_per_forward"] = (r["ok"] * unet_iters / fw) if fw else None
                    r["server"], r["rep"] = name, rep
                    runs.setdefault(name, []).append(r)
                    log(
                        f"rep {rep + 1}/{args.reps}: {name} c={c}: {r['images_per_s']:.2f} images/s, "
                        f"p50 {percentile(r['latencies_ms'], 50):.0f} ms"
                        + (f", {r['images_per_forward']:.2f} images/forward" if r["images_per_forward"] else "")
                        + (f", errors {r['errors']}" if r["errors"] else "")
                    )
            foreign_seen.append(foreign_serve_count(own_roots))
            reps_done += 1
            rep_time_s = max(rep_time_s, time.monotonic() - rep_start)

        # ---- a short request under a long one
        sul: dict[str, Any] = {}
        for name, s in servers.items():
            log(f"{args.short_steps}-step under {args.long_steps}-step: {name}")
            sul[name] = asyncio.run(
                short_under_long(s, args.long_steps, args.short_steps, args.sul_trials, args.sul_delay_ms / 1000)
            )
            log(f"  ratio p50 {sul[name]['ratio_p50']:.2f}×, max {sul[name]['ratio_max']:.2f}×")
        final_metrics = {name: unet_metrics_sync(s) for name, s in servers.items()}
        foreign_seen.append(foreign_serve_count(own_roots))
        log("stopping the services")

    # ---- summary
    d_ips = [r["images_per_s"] for r in diff_runs]
    d_summary = {
        "images_per_s": float(np.median(d_ips)),
        "ips_min": min(d_ips),
        "ips_max": max(d_ips),
        "latency": stats([x for r in diff_runs for x in r["latencies_ms"]]),
    }
    levels_summary = []
    for c in levels:
        for name in names:
            rs = [r for r in runs[name] if r["concurrency"] == c]
            ips = [r["images_per_s"] for r in rs]
            errs: dict[str, int] = {}
            for r in rs:
                for k, v in r["errors"].items():
                    errs[k] = errs.get(k, 0) + v
            ipf = [r["images_per_forward"] for r in rs if r["images_per_forward"]]
            levels_summary.append(
                {
                    "concurrency": c,
                    "server": name,
                    "requests_per_rep": n_for[c],
                    "images_per_s": float(np.median(ips)),
                    "ips_min": min(ips),
                    "ips_max": max(ips),
                    "ips_reps": ips,
                    "vs_diffusers": float(np.median(ips)) / d_summary["images_per_s"],
                    "latency": stats([x for r in rs for x in r["latencies_ms"]]),
                    "hop_p50_ms": {k: percentile([x for r in rs for x in r["hop_ms"][k]], 50) for k in rs[0]["hop_ms"]},
                    "images_per_forward": float(np.median(ipf)) if ipf else None,
                    "errors": errs,
                }
            )
    health_summary: dict[str, dict[str, Any]] = {}
    for name, pollers in health.items():
        health_summary[name] = {}
        for svc in ("central", "diffusion_unet"):
            h = stats([x for p in pollers for x in p.samples[svc]])
            h["failures"] = sum(p.failures[svc] for p in pollers)
            health_summary[name][svc] = h

    cpu1, load1, own1 = cpu_times(), loadavg(), os.times()
    steal = foreign_cpu_s = None
    if cpu0 and cpu1 and "steal" in cpu0:
        busy = sum(cpu1.values()) - sum(cpu0.values())
        steal = 100 * (cpu1["steal"] - cpu0["steal"]) / busy if busy else 0.0
        hz = os.sysconf("SC_CLK_TCK")
        busy_s = sum(cpu1[k] - cpu0[k] for k in ("user", "nice", "system", "irq", "softirq", "steal")) / hz
        # Ours: this process and its (waited-for) children, i.e. every service process of this run.
        own_s = sum(getattr(own1, k) - getattr(own0, k) for k in ("user", "system", "children_user", "children_system"))
        foreign_cpu_s = max(0.0, busy_s - own_s)
    req_desc = ", ".join(f"{n_for[c]} at {c}" for c in levels) + f"; diffusers {args.diffusers_requests} sequential"
    results = {
        "benchmark": "throughput",
        "command": command,
        "started_at": started_at.isoformat(),
        "elapsed_s": time.monotonic() - started_t,
        "machine": machine_info(),
        "environment": {
            "quiet": quiet,
            "foreign_serve_max": max(foreign_seen) if foreign_seen else 0,
            "foreign_serve_seen": foreign_seen,
            "loadavg_start": load0,
            "loadavg_end": load1,
            "cpu_steal_pct": steal,
            "foreign_cpu_s": foreign_cpu_s,
            "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "GOMP_"))},
        },
        "settings": {
            "model": args.model or "tiny (temp dir)",
            "model_desc": model_desc,
            "steps": args.steps,
            "guidance_scale": args.guidance_scale,
            "levels": levels,
            "requests_per_level": n_for,
            "requests_desc": req_desc,
            "diffusers_requests": args.diffusers_requests,
            "reps": reps_done,
            "reps_asked": args.reps,
            "time_budget_s": args.time_budget,
            "batching_off": not args.no_batching_off,
            "max_batch_size": args.max_batch_size or defaults.max_batch_size,
            "max_queue": defaults.max_queue,
            "embedding_cache_bytes": defaults.embedding_cache_bytes,
            "cpu_threads": args.cpu_threads or defaults.cpu_threads or "unset (torch default)",
            "unet_forwards_per_image": unet_iters,
            "short_steps": args.short_steps,
            "long_steps": args.long_steps,
            "sul_trials": args.sul_trials,
            "sul_delay_ms": args.sul_delay_ms,
            "health_interval_ms": args.health_interval_ms,
            "ready_s": ready,
        },
        "summary": {"diffusers": d_summary, "levels": levels_summary, "healthz": health_summary},
        "short_under_long": sul,
        "cache": cache,
        "wire": wire_rows,
        "unet_metrics_end": final_metrics,
        "runs": runs,
        "diffusers_runs": diff_runs,
    }
    results["targets"] = targets(results)
    out_path.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    print(markdown(results))
    log(f"wrote {out_path.relative_to(REPO) if out_path.is_relative_to(REPO) else out_path}")
    log(f"done in {results['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
