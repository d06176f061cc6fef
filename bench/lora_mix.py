"""LoRA mixed batches (issue 10): UNet throughput when concurrent requests carry different LoRAs.

vLLM-Omni's step-level diffusion batching puts requests with different LoRAs in separate batches. Triptych
runs them in one UNet forward (``LoraStore.rows``). This benchmark measures what that is worth, in one
process, on the UNet runtime itself (the text encoder runs once per LoRA set beforehand; HTTP, VAE and PNG
are not what differs between the scenarios, so they are left out):

- ``none``: no LoRA (the base UNet, batched);
- ``one``: every request carries the same LoRA (``set_adapters`` path, one shared forward per step);
- ``four-mixed``: request *i* carries LoRA *i* mod 4, mixing on (the default);
- ``four-separate``: the same requests with ``TRIPTYCH_LORA_MIXED_BATCHES=false`` (one forward per LoRA set
  per step: vLLM-Omni's way).

A closed loop of ``--concurrency`` clients (8) sends ``--requests`` requests per scenario and repetition;
images/s = requests / makespan. Scenarios are interleaved within each repetition, so drift on a shared VM
hits them alike. The LoRAs are random PEFT LoRAs (rank ``--rank``, on the attention projections) saved with
diffusers, as users download them. ``python -m bench.lora_mix --help`` lists the knobs.
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

LORAS = ("ink", "pastel", "chalk", "neon")
SCENARIOS = ("none", "one", "four-mixed", "four-separate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.lora_mix", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="sd15", help="create_tiny preset of the model (sd15: SD-1.5 payloads)")
    p.add_argument("--size", type=int, default=256, help="image width and height in pixels (256)")
    p.add_argument("--steps", type=int, default=10, help="num_inference_steps per request (10)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=16, help="requests per scenario and repetition (16)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (16)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--max-wait-quiet", type=float, default=120, help="seconds to wait for a quiet machine (120)")
    return p.parse_args(argv)


def make_loras(model: Path, out: Path, rank: int) -> None:
    """One random UNet LoRA per name in ``LORAS``, built with PEFT, saved with diffusers."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    for seed, name in enumerate(LORAS):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
        targets = ["to_q", "to_k", "to_v", "to_out.0"]
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False))
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(str(out), weight_name=f"{name}.safetensors", unet_lora_layers=layers)


def lora_sets(scenario: str, n: int) -> list[list[dict[str, Any]]]:
    if scenario == "none":
        return [[] for _ in range(n)]
    if scenario == "one":
        return [[{"name": LORAS[0], "weight": 1.0}] for _ in range(n)]
    return [[{"name": LORAS[i % len(LORAS)], "weight": 1.0}] for i in range(n)]


def run_scenario(unet: Any, requests: list[Any], concurrency: int) -> dict[str, Any]:
    """A closed loop of ``concurrency`` clients over ``requests``; images/s, latencies and UNet forwards."""
    batcher = unet.batcher
    forwards0, batcher.largest_batch = batcher.forwards, 0
    latencies: list[float] = []

    def one(req: Any) -> None:
        t0 = time.perf_counter()
        unet.denoise(req)
        latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, requests))
    makespan = time.perf_counter() - start
    return {
        "images_per_s": len(requests) / makespan,
        "makespan_s": makespan,
        "latency_s": stats(latencies),
        "forwards": batcher.forwards - forwards0,
        "largest_batch": batcher.largest_batch,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_torch(args.threads)
    from diffusion_unet.runtime import UNetRuntime
    from shared.protocol import DenoiseRequest, EncodeRequest
    from shared.serving.models import create_tiny
    from shared.settings import Settings
    from text_encoder.runtime import TextEncoderRuntime

    quiet = wait_for_quiet(args.max_wait_quiet)
    with tempfile.TemporaryDirectory(prefix="triptych-lora-bench-") as tmp:
        model = create_tiny(Path(tmp) / "model", preset=args.preset)
        lora_dir = Path(tmp) / "loras"
        lora_dir.mkdir()
        make_loras(model, lora_dir, args.rank)
        base = Settings(model=str(model), lora_dir=lora_dir, lora_cache_size=len(LORAS),
                        max_batch_size=args.concurrency, cpu_threads=args.threads)  # fmt: skip
        te = TextEncoderRuntime(base)
        runtimes = {
            "mixed": UNetRuntime(base),
            "separate": UNetRuntime(base.model_copy(update={"lora_mixed_batches": False})),
        }
        for rt in (te, *runtimes.values()):
            asyncio.run(rt.load_async())

        def requests(scenario: str, rep: int) -> list[Any]:
            out = []
            for i, loras in enumerate(lora_sets(scenario, args.requests)):
                e = te.encode(EncodeRequest(prompt=[f"a fox, number {i}"], negative_prompt=[""], loras=loras))
                embeds = {"prompt_embeds": e.prompt_embeds, "negative_prompt_embeds": e.negative_prompt_embeds}
                out.append(DenoiseRequest(**embeds, height=args.size, width=args.size, num_inference_steps=args.steps,
                                          seeds=[1000 * rep + i], loras=loras))  # fmt: skip
            return out

        log(f"warm-up: every LoRA loaded in both UNets, {args.preset} at {args.size}px")
        for rt in runtimes.values():
            run_scenario(rt, requests("four-mixed", len(LORAS)), len(LORAS))
        results: dict[str, list[dict[str, Any]]] = {s: [] for s in SCENARIOS}
        c0 = Counters.read()
        for rep in range(args.reps):
            for scenario in SCENARIOS:
                rt = runtimes["separate" if scenario == "four-separate" else "mixed"]
                result = run_scenario(rt, requests(scenario, rep), args.concurrency)
                log(f"rep {rep + 1}/{args.reps} {scenario}: {result['images_per_s']:.2f} images/s, "
                    f"{result['forwards']} forwards, largest batch {result['largest_batch']}")  # fmt: skip
                results[scenario].append(result)
        c1 = Counters.read()
        te.close()
        for rt in runtimes.values():
            rt.close()

    summary = {
        s: {
            "images_per_s_median": stats([r["images_per_s"] for r in runs])["p50"],
            "images_per_s_all": [round(r["images_per_s"], 3) for r in runs],
            "latency_p50_s": stats([r["latency_s"]["p50"] for r in runs])["p50"],
            "forwards_median": stats([float(r["forwards"]) for r in runs])["p50"],
            "largest_batch": max(r["largest_batch"] for r in runs),
        }
        for s, runs in results.items()
    }
    record = {
        "benchmark": "lora_mix",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "args": vars(args),
        "machine": machine_info(),
        "quiet": quiet,
        "steal_pct": steal_pct(c0, c1),
        "summary": summary,
        "runs": results,
    }
    out = write_record("lora_mix", record)
    print(markdown(record))
    log(f"wrote {out}")
    return 0


def markdown(record: dict[str, Any]) -> str:
    a, s = record["args"], record["summary"]
    one = s["one"]["images_per_s_median"]
    lines = [
        f"### LoRA mixed batches ({a['preset']} preset, {a['size']}px, {a['steps']} steps, concurrency "
        f"{a['concurrency']}, {a['requests']} requests × {a['reps']} reps, rank-{a['rank']} LoRAs)",
        "",
        "| scenario | images/s (median) | vs one LoRA | per rep | UNet forwards (median) | largest batch | p50 latency "
        "s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in SCENARIOS:
        r = s[name]
        lines.append(
            f"| {name} | {r['images_per_s_median']:.2f} | {r['images_per_s_median'] / one:.2f}× | "
            f"{', '.join(f'{v:.2f}' for v in r['images_per_s_all'])} | {r['forwards_median']:.0f} | "
            f"{r['largest_batch']} | {r['latency_p50_s']:.2f} |"
        )
    steal = record["steal_pct"]
    lines += ["", f"CPU steal during the run: {'n/a' if steal is None else f'{steal:.1f} %'}."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
