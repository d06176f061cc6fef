"""The wire codec's cost per SD-1.5 payload, measured alone, and its table in both benchmarks' reports.

The split's overhead is mostly serialisation and transport; an end-to-end number cannot say how much of it is
the codec. Timing ``wire.encode``/``decode`` on the exact tensors one 512x512 CFG request sends over the wire
isolates that share, and both benchmarks print the same table so the figures can be compared across runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

# The SD-1.5 payloads that cross the wire on one 512x512 request with classifier-free guidance.
WIRE_PAYLOADS: list[tuple[str, tuple[int, ...], str]] = [
    ("embeddings (prompt + negative)", (2, 77, 768), "float32"),
    ("embeddings (prompt + negative)", (2, 77, 768), "float16"),
    ("latents", (1, 4, 64, 64), "float32"),
    ("latents", (1, 4, 64, 64), "float16"),
    ("images", (1, 512, 512, 3), "uint8"),
]


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
