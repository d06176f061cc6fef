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
8. wire codec µs per SD-1.5-sized payload (``bench.wire_codec.bench_wire``).

It prints the machine, the settings and a markdown section to stdout and writes JSON (and the services' logs)
to ``bench/results/``. ``python -m bench.throughput --help`` lists the knobs.

This module is the entry point and the order of the run; the load generator (``bench.throughput_load``), the
scenarios (``bench.throughput_scenarios``) and the report (``bench.throughput_report``) live apart, and what the
split-overhead benchmark shares with this one lives in modules neither benchmark owns.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.common import REPO, RESULTS_DIR, load_pipeline, log, setup_torch
from bench.machine import Counters, foreign_cpu_s, foreign_serve_count, machine_info, omp_env, steal_pct, wait_for_quiet
from bench.services import Server, free_port_blocks, service_env, started, stop, unet_metrics_sync, wait_ready
from bench.throughput_report import markdown, summarise, targets
from bench.throughput_scenarios import (
    SweepPlan,
    add_inprocess_encode,
    cache_hit_miss_each,
    concurrency_sweep,
    make_clip_l_text_encoder,
    short_under_long_each,
    unet_forwards_per_image,
    warm_up,
)
from bench.wire_codec import bench_wire


# ----------------------------------------------------------------------------------------------- cli
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


# ----------------------------------------------------------------------------------------------- set-up
def service_extra(args: argparse.Namespace) -> dict[str, str]:
    """The environment every service gets beyond the model: the batch cap and thread count, when asked."""
    extra: dict[str, str] = {}
    if args.max_batch_size:
        extra["TRIPTYCH_MAX_BATCH_SIZE"] = str(args.max_batch_size)
    if args.cpu_threads:
        extra["TRIPTYCH_CPU_THREADS"] = str(args.cpu_threads)
    return extra


def prepare_models(args: argparse.Namespace, tmp: Path) -> tuple[str, str, dict[str, str]]:
    """The served model (path or name) and its description, and the text-encoder-only models by label."""
    from shared.serving.models import create_tiny

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
    return model, model_desc, cache_models


def start_services(
    stack: ExitStack,
    names: list[str],
    model: str,
    cache_models: dict[str, str],
    tmp: Path,
    extra: dict[str, str],
    stamp: str,
) -> tuple[dict[str, Server], dict[str, Server]]:
    """A ``serve all`` tree per name (``batching_off`` with batching disabled) and a ``serve text-encoder`` per
    cache model, all at once, each stopped when ``stack`` closes; not waited for."""
    bases = free_port_blocks(len(names) + len(cache_models), 4)
    servers: dict[str, Server] = {}
    for name, base in zip(names, bases, strict=False):
        env = service_env(model, tmp, {**extra, **({"TRIPTYCH_BATCHING": "false"} if name == "batching_off" else {})})
        cmd = [sys.executable, "-m", "central.cli", "serve", "all", "--host", "127.0.0.1", "--port", str(base)]
        lp = RESULTS_DIR / f"throughput-{stamp}.{name}.services.log"
        servers[name] = stack.enter_context(started(name, cmd, env, base, lp))
    te_servers: dict[str, Server] = {}
    for (label, path), base in zip(cache_models.items(), bases[len(names) :], strict=True):
        env = service_env(path, tmp, extra)
        cmd = [sys.executable, "-m", "central.cli", "serve", "text-encoder", "--host", "127.0.0.1",
               "--port", str(base)]  # fmt: skip
        slug = "sd15" if label.startswith("sd15") else "clip_l"
        lp = RESULTS_DIR / f"throughput-{stamp}.text_encoder_{slug}.log"
        te_servers[label] = stack.enter_context(started(label, cmd, env, base, lp))
    return servers, te_servers


def wait_all_ready(servers: dict[str, Server], timeout_s: float) -> dict[str, float]:
    """Seconds each server took to become ready, by name."""
    ready = {name: wait_ready(s.url, timeout_s, s.log_path, s.proc) for name, s in servers.items()}
    log(f"all ready ({', '.join(f'{k} {v:.0f} s' for k, v in ready.items())})")
    return ready


def sweep_plan(args: argparse.Namespace, levels: list[int], unet_iters: int) -> SweepPlan:
    """The concurrency sweep as asked on the command line."""
    return SweepPlan(
        levels=levels,
        requests={c: args.requests or max(8, 2 * c) for c in levels},
        steps=args.steps,
        guidance=args.guidance_scale,
        diffusers_requests=args.diffusers_requests,
        reps=args.reps,
        min_reps=args.min_reps,
        time_budget_s=args.time_budget,
        health_interval_ms=args.health_interval_ms,
        unet_iters=unet_iters,
    )


def text_encoder_urls(
    args: argparse.Namespace, servers: dict[str, Server], te_servers: dict[str, Server]
) -> dict[str, str]:
    """The text encoders of the cache test by label: the served model's (in the batching-on tree) first."""
    te_urls = {
        "tiny model (32 wide, 2 layers)" if not args.model else "the model": servers["batching_on"].text_encoder_url
    }
    te_urls.update({label: s.url for label, s in te_servers.items()})
    return te_urls


# ----------------------------------------------------------------------------------------------- record
def environment_record(
    quiet: dict[str, Any], foreign_seen: list[int], start: Counters, end: Counters
) -> dict[str, Any]:
    """How quiet the machine was before and during the run."""
    return {
        "quiet": quiet,
        "foreign_serve_max": max(foreign_seen) if foreign_seen else 0,
        "foreign_serve_seen": foreign_seen,
        "loadavg_start": start.load,
        "loadavg_end": end.load,
        "cpu_steal_pct": steal_pct(start, end),
        "foreign_cpu_s": foreign_cpu_s(start, end),
        "omp_env": omp_env(),
    }


def settings_record(
    args: argparse.Namespace,
    defaults: Any,
    model_desc: str,
    plan: SweepPlan,
    reps_done: int,
    ready: dict[str, float],
) -> dict[str, Any]:
    """Everything that was asked for and every service default that applied."""
    req_desc = (
        ", ".join(f"{plan.requests[c]} at {c}" for c in plan.levels)
        + f"; diffusers {args.diffusers_requests} sequential"
    )
    return {
        "model": args.model or "tiny (temp dir)",
        "model_desc": model_desc,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "levels": plan.levels,
        "requests_per_level": plan.requests,
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
        "unet_forwards_per_image": plan.unet_iters,
        "short_steps": args.short_steps,
        "long_steps": args.long_steps,
        "sul_trials": args.sul_trials,
        "sul_delay_ms": args.sul_delay_ms,
        "health_interval_ms": args.health_interval_ms,
        "ready_s": ready,
    }


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Run the whole benchmark once; the exit status (0) for ``sys.exit``."""
    args = parse_args(argv)
    command = "python -m bench.throughput" + (
        "" if not (argv or sys.argv[1:]) else " " + " ".join(argv or sys.argv[1:])
    )

    # 1. Wait for a quiet machine; note the clocks and CPU counters the run is judged against.
    quiet = wait_for_quiet(args.wait_quiet)
    started_t = time.monotonic()
    started_at = dt.datetime.now(dt.UTC).replace(microsecond=0)
    counters_start = Counters.read()
    levels = [int(x) for x in args.levels.split(",")]

    # 2. Torch in this process, where the results go, the services' settings.
    setup_torch(args.cpu_threads)
    import torch

    from shared.settings import Settings

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    out_path = args.out or RESULTS_DIR / f"throughput-{stamp}.json"
    defaults = Settings()
    extra = service_extra(args)

    # 3. The wire codec on its own, before anything else runs.
    wire_rows: list[dict[str, Any]] = []
    if not args.no_wire:
        log("wire codec micro-benchmark")
        wire_rows = bench_wire(min_time_s=0.05, repeats=5)

    with tempfile.TemporaryDirectory(prefix="triptych-throughput-") as tmp_s, ExitStack() as stack:
        tmp = Path(tmp_s)
        # 4. The models: the one served end to end, and text-encoder-only ones for the cache test.
        model, model_desc, cache_models = prepare_models(args, tmp)

        # 5. Every service at once (start-up is not measured), diffusers in this process, then readiness.
        names = ["batching_on"] + ([] if args.no_batching_off else ["batching_off"])
        servers, te_servers = start_services(stack, names, model, cache_models, tmp, extra, stamp)
        own_roots = [s.proc.pid for s in (*servers.values(), *te_servers.values())]
        pipe = load_pipeline(model, torch.float32)
        plan = sweep_plan(args, levels, unet_forwards_per_image(pipe, args.steps))
        ready = wait_all_ready({**servers, **te_servers}, args.ready_timeout)

        # 6. The text-encoder cache first, while everything else is idle; then free those services' CPU.
        te_urls = text_encoder_urls(args, servers, te_servers)
        cache = cache_hit_miss_each(te_urls, args.cache_n)
        for s in list(te_servers.values()):  # free their memory and CPU before the sweep
            stop(s.proc)
        add_inprocess_encode(cache, {next(iter(te_urls)): model, **cache_models})

        # 7. The concurrency sweep, after a warm-up.
        warm_up(plan, pipe, servers)
        sweep = concurrency_sweep(plan, pipe, servers, own_roots, started_t)

        # 8. A short request under a long one, on each server.
        sul = short_under_long_each(
            servers, args.long_steps, args.short_steps, args.sul_trials, args.sul_delay_ms / 1000
        )
        final_metrics = {name: unet_metrics_sync(s) for name, s in servers.items()}
        foreign_seen = [*sweep.foreign_seen, foreign_serve_count(own_roots)]
        log("stopping the services")

    # 9. Summarise, write the JSON and print the markdown.
    environment = environment_record(quiet, foreign_seen, counters_start, Counters.read())
    results: dict[str, Any] = {
        "benchmark": "throughput",
        "command": command,
        "started_at": started_at.isoformat(),
        "elapsed_s": time.monotonic() - started_t,
        "machine": machine_info(),
        "environment": environment,
        "settings": settings_record(args, defaults, model_desc, plan, sweep.reps_done, ready),
        "summary": summarise(levels, names, plan.requests, sweep.runs, sweep.diffusers_runs, sweep.health),
        "short_under_long": sul,
        "cache": cache,
        "wire": wire_rows,
        "unet_metrics_end": final_metrics,
        "runs": sweep.runs,
        "diffusers_runs": sweep.diffusers_runs,
    }
    results["targets"] = targets(results)
    out_path.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    print(markdown(results))
    log(f"wrote {out_path.relative_to(REPO) if out_path.is_relative_to(REPO) else out_path}")
    log(f"done in {results['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
