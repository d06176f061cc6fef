"""The real topology: four processes on loopback, hostile bodies, mixed local/remote stages, the CLI."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from central.app import build_app, http_orchestrator
from central.clients import LocalTransport, TextEncoderClient
from central.pipeline import Orchestrator
from shared import wire
from shared.serving.models import create_tiny
from shared.settings import Settings
from tests.conftest import REPO, reference_images

GOOD = {"prompt": "a quiet harbour", "seed": 5, "num_inference_steps": 2}


def stage_urls(base_url: str) -> dict[str, str]:
    port = int(base_url.rsplit(":", 1)[1])
    return {
        "central": base_url,
        "text_encoder": f"http://127.0.0.1:{port + 1}",
        "diffusion_unet": f"http://127.0.0.1:{port + 2}",
        "vae_decoder": f"http://127.0.0.1:{port + 3}",
    }


HOSTILE = [
    pytest.param(b"\xc1\xc1\xc1 not msgpack", 400, id="garbage"),
    pytest.param(pickle.dumps({"prompt": ["x"]}), 400, id="pickle"),
    pytest.param(b"\x91" * 3000, 400, id="deep-nesting"),
    pytest.param(wire.encode([1, 2, 3]), 400, id="array-not-map"),
    # A tensor ext whose header declares 2**40 x 2**40 float32 in a few bytes.
    pytest.param(
        msgpack.packb(
            {"latents": msgpack.ExtType(1, b"\x07float32\x02" + (2**40).to_bytes(8, "little") * 2 + b"\x00")}
        ),
        413,
        id="lying-huge-shape",
    ),
]


@pytest.mark.parametrize(("body", "status"), HOSTILE)
def test_hostile_bodies_to_every_stage_process(served_all, body: bytes, status: int) -> None:  # type: ignore[no-untyped-def]
    urls = stage_urls(served_all)
    for stage, path in (
        ("text_encoder", "/v1/encode"),
        ("diffusion_unet", "/v1/denoise"),
        ("vae_decoder", "/v1/decode"),
    ):
        r = httpx.post(urls[stage] + path, content=body, headers={"content-type": wire.CONTENT_TYPE}, timeout=30)
        assert r.status_code == status, (stage, r.text)
        err = r.json()["error"]
        assert set(err) == {"type", "message", "param"}
        assert "Traceback" not in r.text and "site-packages" not in r.text
    # Central gets the same bytes as a JSON body, then a good request: nothing was taken down.
    r = httpx.post(f"{served_all}/v1/txt2img", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert httpx.post(f"{served_all}/v1/txt2img", json=GOOD, timeout=60).status_code == 200


def test_oversized_body_is_refused_before_reading(served_all) -> None:  # type: ignore[no-untyped-def]
    """A request declaring 1 TiB gets 413 from its headers alone; the stage never waits for the body."""
    port = int(stage_urls(served_all)["diffusion_unet"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/denoise HTTP/1.1\r\nHost: x\r\nContent-Type: application/msgpack\r\n"
            b"Content-Length: 1099511627776\r\n\r\n\x80"
        )
        reply = b""
        while b'"}}' not in reply and b"null}}" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    text = reply.decode("latin-1")
    assert text.startswith("HTTP/1.1 413"), text[:200]
    assert '"payload_too_large"' in text


def test_generate_cli_with_local_encode_and_decode(served_all, sd_pipeline, tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """keras-sd-serving's "one endpoint, two local": encoder and VAE here, only the UNet remote."""
    urls = stage_urls(served_all)
    out = tmp_path / "out.png"
    cmd = [
        sys.executable,
        "-m",
        "central.cli",
        "generate",
        "a quiet harbour",
        "-o",
        str(out),
        "--seed",
        "5",
        "--steps",
        "2",
        "--local-stages",
        "encode,decode",
        "--model",
        str(tiny_model),
        "--diffusion-unet-url",
        urls["diffusion_unet"],
        # Unreachable on purpose: the local stages must not need their services.
        "--text-encoder-url",
        "http://127.0.0.1:9",
        "--vae-decoder-url",
        "http://127.0.0.1:9",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIPTYCH_")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "seed 5" in proc.stdout
    ours = np.asarray(Image.open(out))
    ref = reference_images(sd_pipeline, prompt="a quiet harbour", seed=5, num_inference_steps=2)[0]
    assert np.array_equal(ours, ref)


def test_generate_cli_remote_writes_the_png(served_all, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "remote.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "central.cli",
            "generate",
            "a fox",
            "-o",
            str(out),
            "--url",
            served_all,
            "--seed",
            "42",
            "--steps",
            "2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Image.open(out).format == "PNG"
    # It ran as a job and showed the UNet's steps as they happened: a progress bar on stderr.
    assert "2/2" in proc.stderr and "step" in proc.stderr
    sync = httpx.post(f"{served_all}/v1/txt2img", json={"prompt": "a fox", "seed": 42, "num_inference_steps": 2},
                      headers={"Accept": "image/png"}, timeout=60)  # fmt: skip
    assert out.read_bytes() == sync.content


def test_readyz_names_the_incompatible_dimension(served_all, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A 768-wide text encoder in front of a 32-wide UNet: central is not ready and says why."""
    from text_encoder.runtime import TextEncoderRuntime

    wide = create_tiny(tmp_path / "wide", preset="sd15")
    urls = stage_urls(served_all)
    settings = Settings(
        model=str(wide), device="cpu", diffusion_unet_url=urls["diffusion_unet"], vae_decoder_url=urls["vae_decoder"]
    )
    te = TextEncoderRuntime(settings)
    te.load()
    remote = http_orchestrator(settings)
    orchestrator = Orchestrator(TextEncoderClient(LocalTransport(te)), remote.unet, remote.vae, settings)
    with TestClient(build_app(settings, orchestrator=orchestrator)) as client:
        r = client.get("/readyz")
        assert r.status_code == 503
        message = r.json()["error"]["message"]
        assert "embedding width" in message and "768" in message and "32" in message
        r = client.post("/v1/txt2img", json=GOOD)
        assert r.status_code == 503
    te.close()


def test_central_reports_a_stage_that_is_down(tiny_model) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(
        model=str(tiny_model),
        text_encoder_url="http://127.0.0.1:9",
        diffusion_unet_url="http://127.0.0.1:9",
        vae_decoder_url="http://127.0.0.1:9",
    )
    with TestClient(build_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable"
        r = client.post("/v1/txt2img", json=GOOD)
        assert r.status_code == 503
        assert "unreachable" in r.json()["error"]["message"]


ALLOCATOR_PROBE = """
import ctypes, sys
from shared.serving.launcher import tune_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = tune_allocator(int(sys.argv[1]))
before = libc.mallinfo2().hblks  # mappings made so far (imports)
block = bytearray(4 * 1024 * 1024)  # a 4 MiB buffer, like a request body
print(applied, libc.mallinfo2().hblks - before)
"""


@pytest.mark.parametrize(("threshold", "applied", "mmapped"), [(64 * 1024 * 1024, True, 0), (0, False, 1)])
def test_serve_keeps_big_buffers_on_the_heap(threshold: int, applied: bool, mmapped: int) -> None:
    """`triptych serve` raises glibc's mmap threshold (TRIPTYCH_MALLOC_MMAP_THRESHOLD_BYTES): a 4 MiB buffer
    then comes from the heap instead of a fresh mapping whose pages fault on first touch; 0 leaves glibc's."""
    out = subprocess.run(
        [sys.executable, "-c", ALLOCATOR_PROBE, str(threshold)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(applied), str(mmapped)]
