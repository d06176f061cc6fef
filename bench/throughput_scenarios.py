"""The throughput benchmark's measurements, one function per scenario, each comparable with its own baseline.

- the concurrency sweep: images/s and latency of each server at each concurrency level, against plain
  ``diffusers`` serving the same kind of requests one after another (the baseline a user would otherwise run);
- a short request sent while a long one is denoising, against the same short request alone: what continuous
  batching promises a 4-step caller stuck behind a 50-step one;
- the text encoder's embedding cache, a miss against a hit on the same stage, and against the same encoder run
  in this process.

They live apart from the CLI so that ``main`` reads as the order of the run, and apart from the load generator
so that what is measured (repetitions, rotation, warm-ups, time budget) is visible in one place.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import PNG_COMPRESS_LEVEL, log, percentile, stats
from bench.machine import foreign_serve_count
from bench.services import Server, prom_value, unet_metric, unet_metrics_sync
from bench.throughput_load import HealthPoller, closed_loop, post_txt2img, request_body


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


def unet_forwards_per_image(pipe: Any, steps: int) -> int:
    """UNet forwards per image: len(timesteps), which for PNDM (SD-1.5's default) is steps + 1."""
    probe = type(pipe.scheduler).from_config(pipe.scheduler.config)
    probe.set_timesteps(steps)
    return len(probe.timesteps)


# ----------------------------------------------------------------------------------------------- sweep
@dataclass
class SweepPlan:
    """What the concurrency sweep sends, how often, and within what time."""

    levels: list[int]
    requests: dict[int, int]  # per level and repetition
    steps: int
    guidance: float
    diffusers_requests: int
    reps: int
    min_reps: int
    time_budget_s: float
    health_interval_ms: int
    unet_iters: int

    def bodies(self, level_i: int, rep: int, n: int) -> list[dict[str, Any]]:
        """``n`` requests whose seeds differ from every other level's and repetition's."""
        return [request_body(i, self.steps, self.guidance, 100_000 * (rep + 1) + 1000 * level_i) for i in range(n)]


@dataclass
class Sweep:
    """The sweep's raw runs, per server and for diffusers, and who else was serving while it ran."""

    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    diffusers_runs: list[dict[str, Any]] = field(default_factory=list)
    health: dict[str, list[HealthPoller]] = field(default_factory=dict)
    reps_done: int = 0
    foreign_seen: list[int] = field(default_factory=list)


def warm_up(plan: SweepPlan, pipe: Any, servers: dict[str, Server]) -> None:
    """Every server at the highest level once; diffusers twice."""
    log("warm-up")
    diffusers_sequential(pipe, plan.bodies(99, 99, 2))
    top = max(plan.levels)
    for name, s in servers.items():  # batch shapes up to the cap; unbatched servers need no more than a few
        n_warm = top if name == "batching_on" else min(4, top)
        asyncio.run(closed_loop(s.url, plan.bodies(98, 98, n_warm), n_warm))


def concurrency_sweep(
    plan: SweepPlan, pipe: Any, servers: dict[str, Server], own_roots: list[int], started_t: float
) -> Sweep:
    """Per repetition: diffusers sequential, then every level on every server (order rotated each time).

    The health poller runs during the highest level only (saturation). ``started_t`` is the run's start
    (``time.monotonic()``), against which ``plan.time_budget_s`` is kept.
    """
    names = list(servers)
    top = max(plan.levels)
    sweep = Sweep(health={name: [] for name in servers})
    rep_time_s = 0.0
    for rep in range(plan.reps):
        # Keep the whole run within --time-budget: after the minimum, skip repetitions that would not fit
        # (the short-under-long test and shutdown still follow: about 45 s).
        rep_start = time.monotonic()
        if rep >= plan.min_reps and rep_time_s and (rep_start - started_t) + rep_time_s + 45 > plan.time_budget_s:
            log(f"skipping repetitions {rep + 1}-{plan.reps}: past --time-budget {plan.time_budget_s:g} s")
            break
        sweep.foreign_seen.append(foreign_serve_count(own_roots))
        r = diffusers_sequential(pipe, plan.bodies(0, rep, plan.diffusers_requests))
        sweep.diffusers_runs.append(r)
        log(f"rep {rep + 1}/{plan.reps}: diffusers sequential {r['images_per_s']:.2f} images/s")
        for li, c in enumerate(plan.levels):
            order = names[(rep + li) % len(names) :] + names[: (rep + li) % len(names)]
            for name in order:
                s = servers[name]
                before = unet_metrics_sync(s)
                if c == top:
                    poller = HealthPoller({"central": s.url, "diffusion_unet": s.unet_url},
                                          plan.health_interval_ms / 1000)  # fmt: skip
                    with poller:
                        r = asyncio.run(closed_loop(s.url, plan.bodies(li + 1, rep, plan.requests[c]), c))
                    sweep.health[name].append(poller)
                else:
                    r = asyncio.run(closed_loop(s.url, plan.bodies(li + 1, rep, plan.requests[c]), c))
                after = unet_metrics_sync(s)
                fw = after["triptych_unet_forwards"] - before["triptych_unet_forwards"]
                r["unet_forwards"] = fw
                r["images_per_forward"] = (r["ok"] * plan.unet_iters / fw) if fw else None
                r["server"], r["rep"] = name, rep
                sweep.runs.setdefault(name, []).append(r)
                log(
                    f"rep {rep + 1}/{plan.reps}: {name} c={c}: {r['images_per_s']:.2f} images/s, "
                    f"p50 {percentile(r['latencies_ms'], 50):.0f} ms"
                    + (f", {r['images_per_forward']:.2f} images/forward" if r["images_per_forward"] else "")
                    + (f", errors {r['errors']}" if r["errors"] else "")
                )
        sweep.foreign_seen.append(foreign_serve_count(own_roots))
        sweep.reps_done += 1
        rep_time_s = max(rep_time_s, time.monotonic() - rep_start)
    return sweep


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


def short_under_long_each(
    servers: dict[str, Server], steps_long: int, steps_short: int, trials: int, delay_s: float
) -> dict[str, Any]:
    """``short_under_long`` on every server in turn, by server name."""
    sul: dict[str, Any] = {}
    for name, s in servers.items():
        log(f"{steps_short}-step under {steps_long}-step: {name}")
        sul[name] = asyncio.run(short_under_long(s, steps_long, steps_short, trials, delay_s))
        log(f"  ratio p50 {sul[name]['ratio_p50']:.2f}×, max {sul[name]['ratio_max']:.2f}×")
    return sul


# ----------------------------------------------------------------------------------------------- cache
def random_prompt(rng: random.Random) -> str:
    """4-8 random words. At most 64 letters: the test models' byte-level tokenizer makes a token of every
    letter, and a prompt past 75 tokens would be encoded as two chunks (a long prompt), not one."""
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8))) for _ in range(rng.randint(4, 8))]
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


def cache_hit_miss_each(te_urls: dict[str, str], n: int) -> dict[str, Any]:
    """``cache_hit_miss`` on every text encoder in turn, by label; a failure is recorded and the rest go on."""
    cache: dict[str, Any] = {}
    for i, (label, url) in enumerate(te_urls.items()):
        log(f"text-encoder cache: {label}")
        try:
            cache[label] = cache_hit_miss(url, n, seed=i)
        except Exception as exc:  # report and go on
            cache[label] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"  {json.dumps({k: v for k, v in cache[label].items() if k.startswith(('ratio', 'error'))})}")
    return cache


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


def add_inprocess_encode(cache: dict[str, Any], te_models: dict[str, str]) -> None:
    """Add the in-process reference (``inprocess_ms``) to each text encoder whose cache test succeeded."""
    for label, path in te_models.items():
        if "error" not in cache[label]:
            cache[label]["inprocess_ms"] = inprocess_encode_ms(path, 5, seed=99)


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
