"""Progress and previews (issue 13): what reporting every step, and a preview every N steps, costs the UNet batch.

The UNet runtime in this process (no HTTP: the events' transport is not what differs), a closed loop of
``--concurrency`` clients, three interleaved scenarios per repetition:

- ``silent``: nobody listens (the sync endpoints);
- ``progress``: a listener per request gets ``{"step", "steps"}`` after every step (a job without previews);
- ``previews``: the same plus a ``preview`` (linear latent -> RGB, ``latent_preview``) every
  ``--preview-every`` steps (1 by default: the worst case; central's default is 5).

The listener only hands the event over, as central's does (``loop.call_soon_threadsafe``). Central then
encodes each preview as a JPEG on its own event loop, off the UNet's thread; that cost is measured apart.
``python -m bench.previews --help`` lists the knobs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import log, setup_torch, stats, write_record
from bench.machine import Counters, machine_info, steal_pct, wait_for_quiet

SCENARIOS = ("silent", "progress", "previews")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.previews", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="sd15", help="create_tiny preset of the model (sd15: SD-1.5 payloads)")
    p.add_argument("--size", type=int, default=256, help="image width and height in pixels (256)")
    p.add_argument("--steps", type=int, default=10, help="num_inference_steps per request (10)")
    p.add_argument("--preview-every", type=int, default=1, help="a preview every N steps (1)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--requests", type=int, default=8, help="requests per scenario and repetition (8)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--max-wait-quiet", type=float, default=120, help="seconds to wait for a quiet machine (120)")
    return p.parse_args(argv)


def run_scenario(unet: Any, requests: list[Any], concurrency: int, listen: bool) -> dict[str, Any]:
    from shared.operations import DENOISE

    events: list[dict[str, Any]] = []
    latencies: list[float] = []

    def one(req: Any) -> None:
        t0 = time.perf_counter()
        unet.submit(DENOISE, req, events.append if listen else None).result()
        latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, requests))
    makespan = time.perf_counter() - start
    previews = [e["preview"] for e in events if "preview" in e]
    return {
        "images_per_s": len(requests) / makespan,
        "latency_s": stats(latencies),
        "progress_events": len(events),
        "previews": len(previews),
        "preview_shape": list(previews[0].shape) if previews else None,
        "_previews": previews[:4],
    }


def jpeg_cost_us(previews: list[Any], repeats: int = 50) -> float:
    """Microseconds to encode one preview as central does (``central.jobs.preview_jpeg``)."""
    from central.jobs import preview_jpeg

    t0 = time.perf_counter()
    for _ in range(repeats):
        for p in previews:
            preview_jpeg(p)
    return (time.perf_counter() - t0) / (repeats * len(previews)) * 1e6


def preview_cost_us(side: int, repeats: int = 200) -> float:
    """Microseconds for one ``latent_preview`` of one image's latents (what the UNet thread spends per preview)."""
    import torch

    from diffusion_unet.previews import latent_preview

    latents = torch.randn(1, 4, side, side)
    t0 = time.perf_counter()
    for _ in range(repeats):
        latent_preview(latents)
    return (time.perf_counter() - t0) / repeats * 1e6


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_torch(args.threads)
    from diffusion_unet.runtime import UNetRuntime
    from shared.protocol import DenoiseRequest, EncodeRequest
    from shared.serving.models import create_tiny
    from shared.settings import Settings
    from text_encoder.runtime import TextEncoderRuntime

    quiet = wait_for_quiet(args.max_wait_quiet)
    with tempfile.TemporaryDirectory(prefix="triptych-preview-bench-") as tmp:
        model = create_tiny(Path(tmp) / "model", preset=args.preset)
        settings = Settings(model=str(model), max_batch_size=args.concurrency, cpu_threads=args.threads)
        te, unet = TextEncoderRuntime(settings), UNetRuntime(settings)
        for rt in (te, unet):
            asyncio.run(rt.load_async())
        e = te.encode(EncodeRequest(prompt=["a lighthouse at dusk"], negative_prompt=[""]))
        embeds = {"prompt_embeds": e.prompt_embeds, "negative_prompt_embeds": e.negative_prompt_embeds}

        def requests(scenario: str, rep: int) -> list[Any]:
            every = args.preview_every if scenario == "previews" else 0
            size = {"height": args.size, "width": args.size, "num_inference_steps": args.steps}
            return [
                DenoiseRequest(**embeds, **size, seeds=[1000 * rep + i], preview_every=every)
                for i in range(args.requests)
            ]

        log(f"warm-up: {args.preset} at {args.size}px, {args.steps} steps")
        run_scenario(unet, requests("silent", 99), args.concurrency, listen=False)
        results: dict[str, list[dict[str, Any]]] = {s: [] for s in SCENARIOS}
        c0 = Counters.read()
        for rep in range(args.reps):
            for scenario in SCENARIOS:
                result = run_scenario(unet, requests(scenario, rep), args.concurrency, listen=scenario != "silent")
                log(f"rep {rep + 1}/{args.reps} {scenario}: {result['images_per_s']:.3f} images/s, "
                    f"{result['progress_events']} events, {result['previews']} previews")  # fmt: skip
                results[scenario].append(result)
        c1 = Counters.read()
        sample = results["previews"][0].pop("_previews")
        jpeg_us = jpeg_cost_us(sample) if sample else None
        latent_side = args.size // unet.vae_scale_factor
        preview_us = preview_cost_us(latent_side)
        sd15_preview_us = preview_cost_us(64)  # SD-1.5 at 512 px: 4 x 64 x 64 latents
        for runs in results.values():
            for r in runs:
                r.pop("_previews", None)
        te.close()
        unet.close()

    summary = {
        s: {
            "images_per_s_median": stats([r["images_per_s"] for r in runs])["p50"],
            "images_per_s_all": [round(r["images_per_s"], 3) for r in runs],
            "latency_p50_s": stats([r["latency_s"]["p50"] for r in runs])["p50"],
            "progress_events": runs[0]["progress_events"],
            "previews": runs[0]["previews"],
        }
        for s, runs in results.items()
    }
    record = {
        "benchmark": "previews",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "args": vars(args),
        "machine": machine_info(),
        "quiet": quiet,
        "steal_pct": steal_pct(c0, c1),
        "preview_shape": results["previews"][0]["preview_shape"],
        "jpeg_us_per_preview": jpeg_us,
        "preview_us": preview_us,
        "sd15_512_preview_us": sd15_preview_us,
        "summary": summary,
        "runs": results,
    }
    out = write_record("previews", record)
    print(markdown(record))
    log(f"wrote {out}")
    return 0


def markdown(record: dict[str, Any]) -> str:
    a, s = record["args"], record["summary"]
    silent = s["silent"]["images_per_s_median"]
    lines = [
        f"### Progress and previews ({a['preset']} preset, {a['size']}px, {a['steps']} steps, concurrency "
        f"{a['concurrency']}, {a['requests']} requests × {a['reps']} reps, a preview every {a['preview_every']} "
        "step(s))",
        "",
        "| scenario | images/s (median) | vs silent | per rep | p50 latency s | events per rep | previews per rep |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in SCENARIOS:
        r = s[name]
        lines.append(
            f"| {name} | {r['images_per_s_median']:.3f} | {r['images_per_s_median'] / silent:.3f}× | "
            f"{', '.join(f'{v:.3f}' for v in r['images_per_s_all'])} | {r['latency_p50_s']:.2f} | "
            f"{r['progress_events']} | {r['previews']} |"
        )
    steal = record["steal_pct"]
    jpeg = record["jpeg_us_per_preview"]
    lines += [
        "",
        f"A preview is uint8 {record['preview_shape']}: computing it takes the UNet thread "
        f"{record['preview_us']:.0f} µs ({record['sd15_512_preview_us']:.0f} µs for SD-1.5's 4×64×64 latents at "
        f"512 px); central encodes it as a JPEG in {'n/a' if jpeg is None else f'{jpeg:.0f} µs'}, on its event "
        "loop, not the UNet's thread. "
        f"CPU steal during the run: {'n/a' if steal is None else f'{steal:.1f} %'}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
