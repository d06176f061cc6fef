"""Split overhead (SPEC §9): Triptych's four processes vs ``StableDiffusionPipeline`` in-process, side by side.

One run, one process tree, one machine:

1. makes the SD-1.5-sized random-weight model (``create_tiny(preset="sd15")``: 77x768 embeddings, 4x64x64
   latents, 512x512 images) in a temporary folder, or uses ``--model PATH``;
2. starts ``triptych serve all`` on free loopback ports and waits for central's ``/readyz``;
3. loads ``diffusers.StableDiffusionPipeline.from_pretrained`` on the same directory in this process;
4. after warm-ups, runs each iteration three ways in a rotating order: central ``POST /v1/txt2img`` with a
   JSON reply, the same with ``Accept: image/png``, and the pipeline with the same prompt, steps, guidance
   and seeded CPU generator, followed by a PIL PNG encode with central's settings (``compress_level=1``);
5. reports medians and p90s of the end-to-end latencies, their ratio, the orchestration overhead
   (client wall time - the stages' own ``compute_ms`` - central's PNG encode) split into its parts, the
   wire codec's cost per SD-1.5 payload, and the largest pixel difference between central and diffusers.

It prints a markdown table, writes JSON to ``bench/results/`` and, with ``--write-docs``, replaces the results
section of ``docs/benchmarks.md``. Run it with ``make bench`` or ``python -m bench.split_overhead --help``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import http.client
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
DOCS = REPO / "docs" / "benchmarks.md"


def markers(section: str) -> tuple[str, str]:
    """The comments around one configuration's results in docs/benchmarks.md (one section per --threads)."""
    return (
        f"<!-- split_overhead:{section}:begin (written by `python -m bench.split_overhead --write-docs`) -->",
        f"<!-- split_overhead:{section}:end -->",
    )


PROMPT = "a watercolor painting of a red fox in the snow"
SEED = 42
PNG_COMPRESS_LEVEL = 1  # what central.app.encode_images uses for PNG

# The SD-1.5 payloads that cross the wire on one 512x512 request with classifier-free guidance.
WIRE_PAYLOADS: list[tuple[str, tuple[int, ...], str]] = [
    ("embeddings (prompt + negative)", (2, 77, 768), "float32"),
    ("embeddings (prompt + negative)", (2, 77, 768), "float16"),
    ("latents", (1, 4, 64, 64), "float32"),
    ("latents", (1, 4, 64, 64), "float16"),
    ("images", (1, 512, 512, 3), "uint8"),
]


# ----------------------------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); with few samples p90 sits near the maximum."""
    return float(np.percentile(np.asarray(values, dtype=float), q))


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": percentile(values, 50),
        "p90": percentile(values, 90),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


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


def wait_quiet(timeout_s: float) -> float:
    """Wait (up to ``timeout_s``) for the 1-min load average to fall below half the CPUs; the seconds waited."""
    start = time.monotonic()
    limit = (os.cpu_count() or 2) / 2
    while (load := (loadavg() or [0.0])[0]) >= limit and time.monotonic() - start < timeout_s:
        log(f"load average {load:.2f} ≥ {limit:g}: waiting for a quieter machine")
        time.sleep(15)
    return time.monotonic() - start


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


# ----------------------------------------------------------------------------------------------- wire codec
def bench_wire(min_time_s: float = 0.2, repeats: int = 5) -> list[dict[str, Any]]:
    """µs per ``wire.encode`` and ``wire.decode`` of a one-tensor message, for each SD-1.5 payload."""
    import torch

    from shared import wire

    def per_call_us(fn: Callable[[], Any]) -> float:
        fn()
        loops = 1
        while True:  # grow the loop until one measurement takes min_time_s
            t0 = time.perf_counter()
            for _ in range(loops):
                fn()
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time_s or loops >= 1 << 20:
                break
            loops *= 2
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(loops):
                fn()
            samples.append((time.perf_counter() - t0) / loops * 1e6)
        return float(np.median(samples))

    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, shape, dtype_name in WIRE_PAYLOADS:
        if dtype_name == "uint8":
            tensor = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        else:
            tensor = torch.randn(shape, generator=gen).to(wire.DTYPES[dtype_name][0])
        message = {"tensor": tensor}
        body = wire.encode(message)
        back = wire.decode(body)["tensor"]
        assert torch.equal(back, tensor), "wire round trip changed the tensor"
        enc = per_call_us(partial(wire.encode, message))
        dec = per_call_us(partial(wire.decode, body))
        rows.append(
            {
                "payload": name,
                "shape": list(shape),
                "dtype": dtype_name,
                "bytes": len(body),
                "encode_us": enc,
                "decode_us": dec,
                "roundtrip_us": enc + dec,
                "gb_per_s": len(body) / ((enc + dec) * 1e-6) / 1e9,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------- services
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


def parse_server_timing(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";dur=")
        if rest:
            out[f"{name}_ms"] = float(rest)
    return out


# ----------------------------------------------------------------------------------------------- one run each
class Client:
    """The bench's HTTP client: one keep-alive ``http.client`` connection to central.

    The client is the user's, not Triptych's, so the one that adds least to the wall time is used: on the
    benchmark machine httpx spent 1.3 ms more than ``http.client`` receiving an 857 KB JSON reply.
    """

    @dataclass
    class Reply:
        status_code: int
        headers: dict[str, str]
        content: bytes

        def raise_for_status(self) -> None:
            if self.status_code >= 400:
                raise RuntimeError(f"HTTP {self.status_code}: {self.content[:500]!r}")

        def json(self) -> Any:
            return json.loads(self.content)

    def __init__(self, url: str, timeout_s: float = 900) -> None:
        parsed = urlsplit(url)
        self._conn = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port, timeout=timeout_s)

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> Reply:
        try:
            self._conn.request("POST", path, body=body, headers=headers)
            r = self._conn.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            # central closed the idle keep-alive connection (uvicorn: after 5 s, while the pipeline ran)
            self._conn.close()
            self._conn.request("POST", path, body=body, headers=headers)
            r = self._conn.getresponse()
        content = r.read()
        return self.Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, content)

    def close(self) -> None:
        self._conn.close()


def png_pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> int:
    if a.shape != b.shape:
        return -1
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def run_central_json(client: Client, body: bytes) -> tuple[dict[str, Any], np.ndarray]:
    t0 = time.perf_counter()
    r = client.post("/v1/txt2img", body, {"content-type": "application/json"})
    wall = (time.perf_counter() - t0) * 1000
    r.raise_for_status()
    t1 = time.perf_counter()
    data = r.json()
    png = base64.b64decode(data["images"][0])
    parse_ms = (time.perf_counter() - t1) * 1000
    tm = data["timings"]
    compute = tm["compute_ms"]
    compute_sum = compute["encode"] + compute["denoise"] + compute["decode"]
    hops = tm["encode_ms"] + tm["denoise_ms"] + tm["decode_ms"]
    rec = {
        "wall_ms": wall,
        "server_total_ms": tm["total_ms"],
        "hop_encode_ms": tm["encode_ms"],
        "hop_denoise_ms": tm["denoise_ms"],
        "hop_decode_ms": tm["decode_ms"],
        "compute_encode_ms": compute["encode"],
        "compute_denoise_ms": compute["denoise"],
        "compute_decode_ms": compute["decode"],
        "compute_sum_ms": compute_sum,
        "image_encode_ms": tm["image_encode_ms"],
        # The split's own cost: everything that is neither model compute nor the PNG encode.
        "overhead_ms": wall - compute_sum - tm["image_encode_ms"],
        "overhead_incl_png_ms": wall - compute_sum,
        "transport_encode_ms": tm["encode_ms"] - compute["encode"],
        "transport_denoise_ms": tm["denoise_ms"] - compute["denoise"],
        "transport_decode_ms": tm["decode_ms"] - compute["decode"],
        # central's own work outside the hops and the PNG encode: JSON parse, validation, stage-info check.
        "central_internal_ms": tm["total_ms"] - hops - tm["image_encode_ms"],
        # after total_ms was taken: response model + base64 + JSON render, HTTP to this client.
        "response_ms": wall - tm["total_ms"],
        "client_parse_ms": parse_ms,
        "response_bytes": len(r.content),
        "png_bytes": len(png),
    }
    return rec, png_pixels(png)


def run_central_png(client: Client, body: bytes) -> tuple[dict[str, Any], np.ndarray]:
    headers = {"content-type": "application/json", "accept": "image/png"}
    t0 = time.perf_counter()
    r = client.post("/v1/txt2img", body, headers)
    wall = (time.perf_counter() - t0) * 1000
    r.raise_for_status()
    assert r.headers["content-type"] == "image/png", r.headers["content-type"]
    st = parse_server_timing(r.headers.get("server-timing", ""))
    hops = st.get("encode_ms", 0) + st.get("denoise_ms", 0) + st.get("decode_ms", 0)
    rec = {
        "wall_ms": wall,
        "server_total_ms": st.get("total_ms", float("nan")),
        "image_encode_ms": st.get("image_encode_ms", float("nan")),
        "hops_sum_ms": hops,
        # No compute_ms in this reply (only Server-Timing): hop walls are the finest split available.
        "outside_hops_ms": wall - hops - st.get("image_encode_ms", 0),
        "response_ms": wall - st.get("total_ms", float("nan")),
        "png_bytes": len(r.content),
    }
    return rec, png_pixels(r.content)


def run_diffusers(pipe: Any, steps: int, size: int, guidance: float) -> tuple[dict[str, Any], np.ndarray]:
    import torch

    generator = [torch.Generator("cpu").manual_seed(SEED)]
    t0 = time.perf_counter()
    out = pipe(
        PROMPT,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generator,
        output_type="pil",
    )
    pipe_ms = (time.perf_counter() - t0) * 1000
    image = out.images[0]
    t1 = time.perf_counter()
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    png_ms = (time.perf_counter() - t1) * 1000
    rec = {"pipeline_ms": pipe_ms, "png_encode_ms": png_ms, "total_ms": pipe_ms + png_ms, "png_bytes": buf.tell()}
    return rec, np.asarray(image)


# ----------------------------------------------------------------------------------------------- report
ROWS: list[tuple[str, str, str]] = [
    # (label, key in the summary, unit)
    ("**central end-to-end**, JSON reply (client wall time)", "central_json.wall_ms", "ms"),
    ("central end-to-end, `Accept: image/png` (client wall time)", "central_png.wall_ms", "ms"),
    ('**diffusers** `StableDiffusionPipeline`, `output_type="pil"`', "diffusers.pipeline_ms", "ms"),
    ("diffusers + PIL PNG encode (`compress_level=1`)", "diffusers.total_ms", "ms"),
    ("**latency ratio** central / diffusers, both with PNG encode", "ratio.with_png", "x"),
    ("latency ratio without PNG encode (central wall − image_encode_ms) / pipeline", "ratio.without_png", "x"),
    ("latency ratio, `Accept: image/png` / (diffusers + PNG)", "ratio.png_accept", "x"),
    ("compute ratio: Σ stage compute_ms / diffusers pipeline", "ratio.compute", "x"),
    ("stage compute Σ (encode + denoise + decode compute_ms)", "central_json.compute_sum_ms", "ms"),
    ("  text_encoder compute_ms", "central_json.compute_encode_ms", "ms"),
    ("  diffusion_unet compute_ms", "central_json.compute_denoise_ms", "ms"),
    ("  vae_decoder compute_ms", "central_json.compute_decode_ms", "ms"),
    ("PNG encode in central (image_encode_ms)", "central_json.image_encode_ms", "ms"),
    ("PNG encode of the diffusers image in the bench (PIL)", "diffusers.png_encode_ms", "ms"),
    ("**orchestration overhead** = wall − Σ compute_ms − image_encode_ms", "central_json.overhead_ms", "ms"),
    ("  transport, encode hop (hop wall − compute)", "central_json.transport_encode_ms", "ms"),
    ("  transport, denoise hop", "central_json.transport_denoise_ms", "ms"),
    ("  transport, decode hop", "central_json.transport_decode_ms", "ms"),
    ("  central, outside the hops (request parse, validation, info check)", "central_json.central_internal_ms", "ms"),
    ("  response: JSON + base64 render, HTTP to the client (wall − total_ms)", "central_json.response_ms", "ms"),
    ("**overhead probes** (1-step requests): wall − Σ compute_ms − image_encode_ms", "probe.overhead_ms", "ms"),
    ("  probes: transport, encode hop", "probe.transport_encode_ms", "ms"),
    ("  probes: transport, denoise hop", "probe.transport_denoise_ms", "ms"),
    ("  probes: transport, decode hop", "probe.transport_decode_ms", "ms"),
    ("  probes: central, outside the hops", "probe.central_internal_ms", "ms"),
    ("  probes: response (wall − total_ms)", "probe.response_ms", "ms"),
    ("orchestration overhead including central's PNG encode", "central_json.overhead_incl_png_ms", "ms"),
    ("`Accept: image/png`: wall − Σ hop walls − image_encode_ms", "central_png.outside_hops_ms", "ms"),
    ("pixel max abs diff, central JSON PNG vs diffusers", "pixels.json_vs_diffusers", "px"),
    ("pixel max abs diff, central `image/png` vs diffusers", "pixels.png_vs_diffusers", "px"),
]


def fmt(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.3f}"
    if unit == "px":
        return f"{value:.0f}"
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.2f}"


def markdown(results: dict[str, Any]) -> str:
    s = results["summary"]
    n = results["settings"]["iterations"]
    probes = results["settings"]["probes"]
    lines = [
        f"| measurement (n = {n} paired iterations; {probes} overhead probes) | median | p90 | unit |",
        "|---|---:|---:|---|",
    ]
    for label, key, unit in ROWS:
        group, name = key.split(".")
        if name not in s.get(group, {}):
            continue
        st = s[group][name]
        lines.append(f"| {label} | {fmt(st['median'], unit)} | {fmt(st['p90'], unit)} | {unit} |")
    if not results["wire"]:
        return "\n".join(lines)
    lines += ["", "Wire codec (`shared.wire.encode` + `decode` of a one-tensor message, median of 5 timed loops):"]
    lines += wire_table(results["wire"])
    return "\n".join(lines)


def wire_table(rows: list[dict[str, Any]]) -> list[str]:
    """``bench_wire``'s rows as markdown lines (a blank line first)."""
    lines = [
        "",
        "| payload | shape | dtype | bytes | encode µs | decode µs | encode+decode µs | GB/s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for w in rows:
        shape = "×".join(str(d) for d in w["shape"])
        lines.append(
            f"| {w['payload']} | {shape} | {w['dtype']} | {w['bytes']:,} | {w['encode_us']:.1f} | "
            f"{w['decode_us']:.1f} | {w['roundtrip_us']:.1f} | {w['gb_per_s']:.2f} |"
        )
    return lines


def targets(results: dict[str, Any]) -> list[str]:
    s = results["summary"]
    ratio = s["ratio"]["with_png"]["median"]
    over = s["central_json"]["overhead_ms"]["median"]
    return [
        f"latency ratio ≤ 1.05: median {ratio:.3f} → {'met' if ratio <= 1.05 else 'NOT met'}",
        f"orchestration overhead ≤ 15 ms: median {over:.1f} ms → {'met' if over <= 15 else 'NOT met'}",
    ]


def docs_section(results: dict[str, Any]) -> str:
    m, st = results["machine"], results["settings"]
    begin, end = markers(st["section"])
    mem = next((ln.split()[1] for ln in m["free_h"] if ln.startswith("Mem:")), "?")
    env = results["environment"]
    steal = env.get("cpu_steal_pct")
    lines = [
        begin,
        "",
        f"### {st['title']}",
        "",
        f"Measured {results['started_at']} by `python -m bench.split_overhead` "
        f"({results['elapsed_s']:.0f} s for the whole run).",
        "",
        f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), {mem} RAM, {m['platform']}; GPU: {m['cuda'] or 'none'}.",
        f"- Software: Python {m['python']}, torch {m['torch']}, diffusers {m['diffusers']}, "
        f"transformers {m['transformers']}.",
        f"- Settings: model `sd15` preset (random weights, SD-1.5-sized payloads), {st['size']}×{st['size']}, "
        f"{st['steps']} steps, guidance {st['guidance_scale']} (CFG, UNet batch 2), device {st['device']}, "
        f"dtype {st['dtype']}, seed {SEED}, {st['warmup']} warm-up + {st['iterations']} measured iterations, "
        f"order rotated each iteration; torch threads: {st['threads_desc']}; text-embedding cache "
        f"{'on (hits after the first request)' if st['embedding_cache'] else 'off'}; every other service "
        "setting at its default (UNet continuous batching on).",
        f"- Load: 1-min load average during the measured iterations median {env['load1_during']['median']:.2f}, "
        f"max {env['load1_during']['max']:.2f} (at start / end {env['loadavg_start']} / {env['loadavg_end']})"
        + (f"; CPU steal during the run {steal:.1f} %" if steal is not None else "")
        + (f"; OpenMP environment {env['omp_env']}" if env["omp_env"] else "; no OMP_*/MKL_* variables set")
        + (
            f"; waited {env['wait_quiet_s']:.0f} s (`--wait-quiet`) for the load to drop before starting."
            if env.get("wait_quiet_s")
            else "."
        ),
        "",
        markdown(results),
        "",
        "Targets: " + "; ".join(targets(results)) + ".",
        "",
        end,
    ]
    return "\n".join(lines)


def write_docs(results: dict[str, Any]) -> None:
    section = docs_section(results)
    begin, end = markers(results["settings"]["section"])
    text = DOCS.read_text(encoding="utf-8") if DOCS.exists() else "# Benchmarks\n\n## Results\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOCS.write_text(text, encoding="utf-8")
    log(f"rewrote the results section of {DOCS.relative_to(REPO)}")


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.split_overhead", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="an existing model directory (default: make the sd15 preset in a temp dir)")
    p.add_argument("--iterations", type=int, default=5, help="measured iterations (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up iterations, not recorded (default 1)")
    p.add_argument("--steps", type=int, default=20, help="num_inference_steps (default 20)")
    p.add_argument("--size", type=int, default=512, help="width = height in pixels (default 512)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="default 7.5, the pipeline's")
    p.add_argument("--device", default="cpu", help="cpu|cuda|cuda:N for both sides (default cpu)")
    p.add_argument("--dtype", default="auto", help="auto|float32|float16|bfloat16 for both sides")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for the bench and every service (OMP_NUM_THREADS); default: torch's own (= nproc)",
    )
    p.add_argument(
        "--embedding-cache",
        action="store_true",
        help="leave the text encoder's embedding cache on (default: off, so every request encodes like diffusers)",
    )
    p.add_argument(
        "--probes",
        type=int,
        default=20,
        help="extra 1-step central requests that sample the orchestration overhead (default 20; 0: none)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to SECONDS for the 1-min load average to drop below nproc/2 (default 0: don't wait)",
    )
    p.add_argument("--ready-timeout", type=float, default=300, help="seconds to wait for central's /readyz")
    p.add_argument("--no-wire", action="store_true", help="skip the wire codec micro-benchmark")
    p.add_argument("--write-docs", action="store_true", help="rewrite the results section of docs/benchmarks.md")
    p.add_argument("--out", type=Path, help="JSON results file (default bench/results/split_overhead-<time>.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    waited_s = wait_quiet(args.wait_quiet) if args.wait_quiet else 0.0
    started = time.monotonic()
    started_at = dt.datetime.now(dt.UTC).replace(microsecond=0)
    cpu0, load0 = cpu_times(), loadavg()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from shared.models import create_tiny, resolve_device, resolve_dtype

    diffusers_logging.disable_progress_bar()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    out_path = args.out or RESULTS_DIR / f"split_overhead-{stamp}.json"

    wire_rows: list[dict[str, Any]] = []
    if not args.no_wire:
        log("wire codec micro-benchmark")
        wire_rows = bench_wire()

    with tempfile.TemporaryDirectory(prefix="triptych-bench-") as tmp:
        tmp_path = Path(tmp)
        if args.model:
            model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
        else:
            log("creating the sd15-preset random-weight model")
            model = str(create_tiny(tmp_path / "sd15", preset="sd15"))
        log_path = RESULTS_DIR / f"split_overhead-{stamp}.services.log"
        with served(model, str(device), dtype_name, args.threads, args.embedding_cache, log_path) as url:
            log("loading StableDiffusionPipeline in the bench process")
            with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older ones lack it
                warnings.simplefilter("ignore", FutureWarning)
                pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype).to(device)
            pipe.set_progress_bar_config(disable=True)
            ready_s = wait_ready(url, args.ready_timeout, log_path)
            log(f"central ready after {ready_s:.1f} s")
            request = {
                "prompt": PROMPT,
                "seed": SEED,
                "num_inference_steps": args.steps,
                "guidance_scale": args.guidance_scale,
                "width": args.size,
                "height": args.size,
                "output_format": "png",
            }
            body = json.dumps(request).encode()
            records: dict[str, list[dict[str, Any]]] = {
                "central_json": [],
                "central_png": [],
                "diffusers": [],
                "probe": [],
            }
            diffs: dict[str, list[float]] = {"json_vs_diffusers": [], "png_vs_diffusers": []}
            with contextlib.closing(Client(url)) as client:
                runners: dict[str, Callable[[], tuple[dict[str, Any], np.ndarray]]] = {
                    "central_json": lambda: run_central_json(client, body),
                    "central_png": lambda: run_central_png(client, body),
                    "diffusers": lambda: run_diffusers(pipe, args.steps, args.size, args.guidance_scale),
                }
                kinds = list(runners)
                total = args.warmup + args.iterations
                for i in range(total):
                    warm = i < args.warmup
                    order = kinds[i % 3 :] + kinds[: i % 3]  # rotate, so no side always runs first
                    pixels: dict[str, np.ndarray] = {}
                    this: dict[str, dict[str, Any]] = {}
                    for kind in order:
                        this[kind], pixels[kind] = runners[kind]()
                        this[kind]["load1"] = (loadavg() or [float("nan")])[0]
                        if not warm:
                            records[kind].append(this[kind])
                    d_json = max_abs_diff(pixels["central_json"], pixels["diffusers"])
                    d_png = max_abs_diff(pixels["central_png"], pixels["diffusers"])
                    if not warm:
                        diffs["json_vs_diffusers"].append(d_json)
                        diffs["png_vs_diffusers"].append(d_png)
                    label = "warm-up" if warm else "iteration"
                    dif = this["diffusers"]
                    log(
                        f"{label} {i + 1 if warm else i + 1 - args.warmup}/{args.warmup if warm else args.iterations}:"
                        f" central json {this['central_json']['wall_ms']:.0f} ms"
                        f" (overhead {this['central_json']['overhead_ms']:.1f} ms),"
                        f" image/png {this['central_png']['wall_ms']:.0f} ms,"
                        f" diffusers {dif['pipeline_ms']:.0f} + {dif['png_encode_ms']:.0f} ms;"
                        f" max pixel diff json/png vs diffusers {d_json}/{d_png}"
                    )
                if args.probes:
                    # The overhead does not depend on the step count (the loop stays inside the UNet stage and the
                    # payloads are the same), so short requests measure it many times at little cost.
                    probe_body = json.dumps({**request, "num_inference_steps": 1}).encode()
                    run_central_json(client, probe_body)
                    for _ in range(args.probes):
                        rec, _ = run_central_json(client, probe_body)
                        rec["load1"] = (loadavg() or [float("nan")])[0]
                        records["probe"].append(rec)
                    med = percentile([r["overhead_ms"] for r in records["probe"]], 50)
                    log(f"{args.probes} one-step overhead probes: median overhead {med:.1f} ms")

    cpu1, load1 = cpu_times(), loadavg()
    steal_pct = None
    if cpu0 and cpu1 and "steal" in cpu0:
        busy = sum(cpu1.values()) - sum(cpu0.values())
        steal_pct = 100 * (cpu1["steal"] - cpu0["steal"]) / busy if busy else 0.0

    summ: dict[str, dict[str, dict[str, float]]] = {}
    for kind, recs in records.items():
        if not recs:
            continue
        keys = [k for k in recs[0] if isinstance(recs[0][k], int | float)]
        summ[kind] = {k: summary([float(r[k]) for r in recs]) for k in keys}
    cj, cp, df = records["central_json"], records["central_png"], records["diffusers"]
    summ["ratio"] = {
        "with_png": summary([c["wall_ms"] / d["total_ms"] for c, d in zip(cj, df, strict=True)]),
        "without_png": summary(
            [(c["wall_ms"] - c["image_encode_ms"]) / d["pipeline_ms"] for c, d in zip(cj, df, strict=True)]
        ),
        "png_accept": summary([c["wall_ms"] / d["total_ms"] for c, d in zip(cp, df, strict=True)]),
        "compute": summary([c["compute_sum_ms"] / d["pipeline_ms"] for c, d in zip(cj, df, strict=True)]),
    }
    summ["pixels"] = {k: summary(v) for k, v in diffs.items()}
    threads_desc = (
        f"{args.threads} (set with --threads)"
        if args.threads
        else f"torch default ({torch.get_num_threads()} in the bench; each service process likewise)"
    )
    results: dict[str, Any] = {
        "benchmark": "split_overhead",
        "started_at": started_at.isoformat(),
        "elapsed_s": time.monotonic() - started,
        "machine": machine_info(),
        "environment": {
            "loadavg_start": load0,
            "loadavg_end": load1,
            "load1_during": summary([r["load1"] for recs in records.values() for r in recs]),
            "wait_quiet_s": waited_s,
            "cpu_steal_pct": steal_pct,
            "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "GOMP_"))},
        },
        "settings": {
            "model": "sd15 preset (temp dir)" if not args.model else args.model,
            "prompt": PROMPT,
            "seed": SEED,
            "steps": args.steps,
            "size": args.size,
            "guidance_scale": args.guidance_scale,
            "device": str(device),
            "dtype": dtype_name,
            "iterations": args.iterations,
            "warmup": args.warmup,
            "threads": args.threads,
            "threads_desc": threads_desc,
            "probes": args.probes,
            "section": f"threads{args.threads}" if args.threads else "default",
            "title": (
                f"`--threads {args.threads}`: {args.threads} torch thread(s) in every process"
                if args.threads
                else "Default settings (`make bench`): torch's own thread count in every process"
            ),
            "embedding_cache": args.embedding_cache,
            "png_compress_level": PNG_COMPRESS_LEVEL,
            "ready_s": ready_s,
        },
        "summary": summ,
        "wire": wire_rows,
        "records": records,
        "pixel_diffs": diffs,
    }
    out_path.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(markdown(results))
    print()
    for line in targets(results):
        print(f"- {line}")
    log(f"wrote {out_path.relative_to(REPO) if out_path.is_relative_to(REPO) else out_path}")
    if args.write_docs:
        write_docs(results)
    log(f"done in {results['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
