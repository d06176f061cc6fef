"""Load for the throughput benchmark: the requests, the closed loop of clients that sends them, and a health probe.

Step-level batching only pays off when several requests are in flight, and only a closed loop (each client
sends its next request when its previous one is answered) holds the concurrency at exactly C without
overloading the queue; images/s is then requests over makespan. Every request gets its own prompt and seed so
no cache can answer it. The health poller runs in a thread, not on the load's event loop, so a slow
``/healthz`` shows up as the service's latency rather than the client's.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx

from bench.common import PROMPT


def request_body(i: int, steps: int, guidance: float, seed_base: int) -> dict[str, Any]:
    """The ``i``-th request of a batch: its own prompt variation and seed, a PNG reply."""
    return {
        "prompt": f"{PROMPT}, variation {i}",
        "seed": seed_base + i,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "output_format": "png",
    }


async def post_txt2img(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One ``POST /v1/txt2img``: status, client latency, start/end times and, on success, central's hop timings."""
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
