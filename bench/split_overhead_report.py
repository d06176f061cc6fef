"""The split-overhead benchmark's verdict: the summary, the markdown table, the targets and the docs section.

The raw iterations stay in the JSON; ``docs/benchmarks.md`` gets medians and p90s, one row per component of the
latency, so a regression shows where it comes from, and the two SPEC §9 targets with met / NOT met. Each
configuration (default threads, ``--threads N``) owns a marked section of the docs page, rewritten in place,
so results are recorded by the script that measured them rather than copied by hand.
"""

from __future__ import annotations

from typing import Any

from bench.common import REPO, log, summary
from bench.split_overhead_runs import SEED
from bench.wire_codec import wire_table

DOCS = REPO / "docs" / "benchmarks.md"


# ----------------------------------------------------------------------------------------------- summary
def summarise(records: dict[str, list[dict[str, Any]]], diffs: dict[str, list[float]]) -> dict[str, Any]:
    """Median/p90 of every numeric field per kind of run, the paired latency ratios and the pixel differences."""
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
    return summ


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


def targets(results: dict[str, Any]) -> list[str]:
    s = results["summary"]
    ratio = s["ratio"]["with_png"]["median"]
    over = s["central_json"]["overhead_ms"]["median"]
    return [
        f"latency ratio ≤ 1.05: median {ratio:.3f} → {'met' if ratio <= 1.05 else 'NOT met'}",
        f"orchestration overhead ≤ 15 ms: median {over:.1f} ms → {'met' if over <= 15 else 'NOT met'}",
    ]


# ----------------------------------------------------------------------------------------------- docs
def markers(section: str) -> tuple[str, str]:
    """The comments around one configuration's results in docs/benchmarks.md (one section per --threads)."""
    return (
        f"<!-- split_overhead:{section}:begin (written by `python -m bench.split_overhead --write-docs`) -->",
        f"<!-- split_overhead:{section}:end -->",
    )


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
