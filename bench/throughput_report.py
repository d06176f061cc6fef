"""The throughput benchmark's verdict: the per-level summary, the markdown section and the targets of issue 5.

Raw runs stay in the JSON; what a reader of ``docs/benchmarks.md`` needs is a median per level with its
spread, tail latencies pooled across repetitions, and each target stated with its number and met / NOT met.
Rendering is kept apart from measuring so that a saved results file can be re-rendered without a rerun.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.common import percentile, stats
from bench.throughput_load import HealthPoller
from bench.wire_codec import wire_table


# ----------------------------------------------------------------------------------------------- summary
def summarise(
    levels: list[int],
    names: list[str],
    requests: dict[int, int],
    runs: dict[str, list[dict[str, Any]]],
    diffusers_runs: list[dict[str, Any]],
    health: dict[str, list[HealthPoller]],
) -> dict[str, Any]:
    """Medians across repetitions per level and server, diffusers' baseline, and ``/healthz`` at saturation."""
    d_ips = [r["images_per_s"] for r in diffusers_runs]
    d_summary = {
        "images_per_s": float(np.median(d_ips)),
        "ips_min": min(d_ips),
        "ips_max": max(d_ips),
        "latency": stats([x for r in diffusers_runs for x in r["latencies_ms"]]),
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
                    "requests_per_rep": requests[c],
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
    return {"diffusers": d_summary, "levels": levels_summary, "healthz": health_summary}


# ----------------------------------------------------------------------------------------------- markdown
def f1(x: float) -> str:
    """A number with the precision its size deserves (1,234 / 12.3 / 1.23)."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def markdown(res: dict[str, Any]) -> str:
    """The results section for ``docs/benchmarks.md``: setting, tables and targets."""
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


# ----------------------------------------------------------------------------------------------- targets
def targets(res: dict[str, Any]) -> list[str]:
    """Issue 5's targets, each with the measured number and met / NOT met."""
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
