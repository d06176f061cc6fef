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

This module is the entry point and the order of the run; the three ways to serve a request
(``bench.split_overhead_runs``) and the report (``bench.split_overhead_report``) live apart, and what the
throughput benchmark shares with this one lives in modules neither benchmark owns.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import PNG_COMPRESS_LEVEL, PROMPT, REPO, RESULTS_DIR, load_pipeline, log, setup_torch, summary
from bench.machine import Counters, machine_info, omp_env, steal_pct, wait_low_load
from bench.services import served, wait_ready
from bench.split_overhead_report import markdown, summarise, targets, write_docs
from bench.split_overhead_runs import SEED, Client, overhead_probes, paired_iterations
from bench.wire_codec import bench_wire


# ----------------------------------------------------------------------------------------------- cli
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


# ----------------------------------------------------------------------------------------------- record
def request_json(args: argparse.Namespace) -> dict[str, Any]:
    """The one request every iteration sends (central) or runs (diffusers)."""
    return {
        "prompt": PROMPT,
        "seed": SEED,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "width": args.size,
        "height": args.size,
        "output_format": "png",
    }


def settings_record(
    args: argparse.Namespace, device: str, dtype_name: str, bench_threads: int, ready_s: float
) -> dict[str, Any]:
    """Everything that was asked for, and the docs section and title this configuration writes."""
    threads_desc = (
        f"{args.threads} (set with --threads)"
        if args.threads
        else f"torch default ({bench_threads} in the bench; each service process likewise)"
    )
    return {
        "model": "sd15 preset (temp dir)" if not args.model else args.model,
        "prompt": PROMPT,
        "seed": SEED,
        "steps": args.steps,
        "size": args.size,
        "guidance_scale": args.guidance_scale,
        "device": device,
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
    }


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Run the whole benchmark once; the exit status (0) for ``sys.exit``."""
    args = parse_args(argv)

    # 1. Wait for a quiet machine, if asked; note the clocks and CPU counters the run is judged against.
    waited_s = wait_low_load(args.wait_quiet) if args.wait_quiet else 0.0
    started = time.monotonic()
    started_at = dt.datetime.now(dt.UTC).replace(microsecond=0)
    counters_start = Counters.read()

    # 2. Torch in this process, the device and dtype both sides use, where the results go.
    setup_torch(args.threads)
    import torch

    from shared.serving.models import create_tiny, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    out_path = args.out or RESULTS_DIR / f"split_overhead-{stamp}.json"

    # 3. The wire codec on its own, before anything else runs.
    wire_rows: list[dict[str, Any]] = []
    if not args.no_wire:
        log("wire codec micro-benchmark")
        wire_rows = bench_wire()

    with tempfile.TemporaryDirectory(prefix="triptych-bench-") as tmp:
        # 4. The model both sides load.
        if args.model:
            model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
        else:
            log("creating the sd15-preset random-weight model")
            model = str(create_tiny(Path(tmp) / "sd15", preset="sd15"))

        # 5. Triptych's services and diffusers in this process, then central's readiness.
        log_path = RESULTS_DIR / f"split_overhead-{stamp}.services.log"
        with served(model, str(device), dtype_name, args.threads, args.embedding_cache, log_path) as url:
            pipe = load_pipeline(model, dtype, device)
            ready_s = wait_ready(url, args.ready_timeout, log_path)
            log(f"central ready after {ready_s:.1f} s")

            # 6. The paired iterations, then the one-step overhead probes.
            request = request_json(args)
            with contextlib.closing(Client(url)) as client:
                records, diffs = paired_iterations(
                    client,
                    pipe,
                    json.dumps(request).encode(),
                    args.steps,
                    args.size,
                    args.guidance_scale,
                    args.warmup,
                    args.iterations,
                )
                records["probe"] = overhead_probes(client, request, args.probes)

    # 7. Summarise, write the JSON, print the table and the targets, and the docs section if asked.
    counters_end = Counters.read()
    results: dict[str, Any] = {
        "benchmark": "split_overhead",
        "started_at": started_at.isoformat(),
        "elapsed_s": time.monotonic() - started,
        "machine": machine_info(),
        "environment": {
            "loadavg_start": counters_start.load,
            "loadavg_end": counters_end.load,
            "load1_during": summary([r["load1"] for recs in records.values() for r in recs]),
            "wait_quiet_s": waited_s,
            "cpu_steal_pct": steal_pct(counters_start, counters_end),
            "omp_env": omp_env(),
        },
        "settings": settings_record(args, str(device), dtype_name, torch.get_num_threads(), ready_s),
        "summary": summarise(records, diffs),
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
