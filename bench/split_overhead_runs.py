"""The split-overhead benchmark's three ways to serve one request, run side by side on the same inputs.

The claim under test is that splitting Stable Diffusion into services costs little over running the pipeline
in-process. That holds only if each iteration runs the same prompt, seed, steps and guidance through central
(JSON reply and ``image/png`` reply) and through ``StableDiffusionPipeline``, in an order rotated so no side
always runs on a warmer machine, and if central's reply is broken down into stage compute, transport and
central's own work, so the overhead is measured rather than inferred. The pixels are compared too: a fast split
that draws a different image would prove nothing.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from bench.common import PNG_COMPRESS_LEVEL, PROMPT, log, percentile
from bench.machine import loadavg

SEED = 42


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


# ----------------------------------------------------------------------------------------------- iterations
def paired_iterations(
    client: Client, pipe: Any, body: bytes, steps: int, size: int, guidance: float, warmup: int, iterations: int
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[float]]]:
    """``warmup`` then ``iterations`` rounds of the three ways, order rotated each round; the measured records
    by kind (with an empty ``probe`` list for ``overhead_probes``) and the pixel differences to diffusers."""
    records: dict[str, list[dict[str, Any]]] = {
        "central_json": [],
        "central_png": [],
        "diffusers": [],
        "probe": [],
    }
    diffs: dict[str, list[float]] = {"json_vs_diffusers": [], "png_vs_diffusers": []}
    runners: dict[str, Callable[[], tuple[dict[str, Any], np.ndarray]]] = {
        "central_json": lambda: run_central_json(client, body),
        "central_png": lambda: run_central_png(client, body),
        "diffusers": lambda: run_diffusers(pipe, steps, size, guidance),
    }
    kinds = list(runners)
    total = warmup + iterations
    for i in range(total):
        warm = i < warmup
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
            f"{label} {i + 1 if warm else i + 1 - warmup}/{warmup if warm else iterations}:"
            f" central json {this['central_json']['wall_ms']:.0f} ms"
            f" (overhead {this['central_json']['overhead_ms']:.1f} ms),"
            f" image/png {this['central_png']['wall_ms']:.0f} ms,"
            f" diffusers {dif['pipeline_ms']:.0f} + {dif['png_encode_ms']:.0f} ms;"
            f" max pixel diff json/png vs diffusers {d_json}/{d_png}"
        )
    return records, diffs


def overhead_probes(client: Client, request: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """``n`` one-step central requests (after one unrecorded), each a sample of the orchestration overhead.

    The overhead does not depend on the step count (the loop stays inside the UNet stage and the payloads are
    the same), so short requests measure it many times at little cost.
    """
    if not n:
        return []
    probe_body = json.dumps({**request, "num_inference_steps": 1}).encode()
    run_central_json(client, probe_body)
    probes: list[dict[str, Any]] = []
    for _ in range(n):
        rec, _ = run_central_json(client, probe_body)
        rec["load1"] = (loadavg() or [float("nan")])[0]
        probes.append(rec)
    med = percentile([r["overhead_ms"] for r in probes], 50)
    log(f"{n} one-step overhead probes: median overhead {med:.1f} ms")
    return probes
