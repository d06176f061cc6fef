"""What both benchmarks take as given, so that their numbers are comparable and neither imports the other.

Both measure Triptych against the same in-process ``diffusers`` baseline: the same prompt, the same PNG settings
as central, the same statistics, the same results folder and the same progress log on stderr. Keeping those here
means a change to one (say, central's PNG compression level) cannot silently apply to one benchmark only.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"

PROMPT = "a watercolor painting of a red fox in the snow"
PNG_COMPRESS_LEVEL = 1  # what central.app.encode_images uses for PNG


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- statistics
def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); with few samples p90 sits near the maximum."""
    return float(np.percentile(np.asarray(values, dtype=float), q))


def stats(values: list[float]) -> dict[str, float]:
    """The tail-latency profile the throughput benchmark reports (p50/p95/p99); ``{"n": 0}`` when empty."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "min": min(values),
        "max": max(values),
        "mean": float(np.mean(values)),
    }


def summary(values: list[float]) -> dict[str, float]:
    """The median/p90 profile the split-overhead benchmark reports for its paired iterations."""
    return {
        "median": percentile(values, 50),
        "p90": percentile(values, 90),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


# ----------------------------------------------------------------------------------------------- diffusers
def setup_torch(threads: int | None) -> None:
    """Set the bench process's torch threads (when asked) and silence diffusers' progress bars."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()


def load_pipeline(model: str, dtype: Any, device: Any = None) -> Any:
    """``StableDiffusionPipeline`` on ``model`` in this process (moved to ``device`` when given), no progress bar."""
    from diffusers import StableDiffusionPipeline

    log("loading StableDiffusionPipeline in the bench process")
    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older ones lack it
        warnings.simplefilter("ignore", FutureWarning)
        pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
        if device is not None:
            pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_record(name: str, record: dict[str, Any]) -> Path:
    """Save a benchmark's results as ``bench/results/<name>-<UTC time>.json``; returns the path."""
    import datetime as dt
    import json

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"{name}-{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(record, indent=2))
    return out
