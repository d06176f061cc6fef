"""Shared fixtures: one tiny random-weight model per session, loaded runtimes, apps and real processes."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import PIL.Image
import pytest
import torch

from shared.serving.models import create_tiny
from shared.settings import Settings

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Tests that run the launcher's ``apply_flags`` configure the process's logging; put it back after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    named = {name: logging.getLogger(name).level for name in ("httpx", "httpcore", "uvicorn.access", "uvicorn.error")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in named.items():
        logging.getLogger(name).setLevel(old)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD-1.x-shaped model directory (64x64 images), written once per session."""
    return create_tiny(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def init_image() -> PIL.Image.Image:
    """A smooth, structured 64x64 picture (gradients + a disc), so resizing and masking have real content."""
    y, x = np.mgrid[0:64, 0:64]
    disc = ((x - 40) ** 2 + (y - 24) ** 2 < 150).astype(np.float64)
    rgb = np.stack([x * 4, y * 4, 255 * disc], axis=-1).clip(0, 255).astype(np.uint8)
    return PIL.Image.fromarray(rgb)


@pytest.fixture(scope="session")
def mask_image() -> PIL.Image.Image:
    """White (repaint) on a 32x32 block of the 64x64 picture."""
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 8:40] = 255
    return PIL.Image.fromarray(mask, mode="L")


@pytest.fixture(scope="session")
def settings(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(model=str(tiny_model), cache_dir=tmp_path_factory.mktemp("cache"), device="cpu")


@pytest.fixture(scope="session")
def te_runtime(settings: Settings):  # type: ignore[no-untyped-def]
    from text_encoder.runtime import TextEncoderRuntime

    rt = TextEncoderRuntime(settings)
    rt.load()
    yield rt
    rt.close()


@pytest.fixture(scope="session")
def unet_runtime(settings: Settings):  # type: ignore[no-untyped-def]
    from diffusion_unet.runtime import UNetRuntime

    rt = UNetRuntime(settings)
    rt.load()
    yield rt
    rt.close()


@pytest.fixture(scope="session")
def vae_runtime(settings: Settings):  # type: ignore[no-untyped-def]
    from vae_decoder.runtime import VaeRuntime

    rt = VaeRuntime(settings)
    rt.load()
    yield rt
    rt.close()


@pytest.fixture(scope="session")
def sd_pipeline(tiny_model: Path):  # type: ignore[no-untyped-def]
    """diffusers' own pipeline on the same directory: the reference every parity test compares with."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_images(
    pipe, *, prompt: str, seed: int, num_images: int = 1, scheduler: str | None = None, **kwargs
) -> np.ndarray:  # type: ignore[no-untyped-def]
    """uint8 (B, H, W, 3) from StableDiffusionPipeline with one CPU generator per image (SPEC §8)."""
    import diffusers

    base_config = pipe.scheduler.config
    original = pipe.scheduler
    if scheduler:
        extra = {}
        if "noise_sampler_seed" in getattr(diffusers, scheduler).__init__.__code__.co_varnames:
            extra["noise_sampler_seed"] = [seed + i for i in range(num_images)]
        pipe.scheduler = getattr(diffusers, scheduler).from_config(base_config, **extra)
    try:
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)]
        out = pipe(prompt, num_images_per_prompt=num_images, generator=generators, output_type="pil", **kwargs)
    finally:
        pipe.scheduler = original
    return np.stack([np.asarray(im) for im in out.images])


def free_port_block(n: int = 4) -> int:
    """A base port with ``n`` consecutive free ports after it (best effort, loopback only)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free block of ports")


def spawn_triptych(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """``python -m central.cli *args`` from the repository, stdout and stderr into ``log_path``."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "central.cli", *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`triptych serve all` exited early with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} was not ready within {timeout_s} s")


@pytest.fixture(scope="session")
def served_all(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The four services as separate processes (`triptych serve all`) on free loopback ports."""
    base = free_port_block()
    log_path = tmp_path_factory.mktemp("serve-all") / "serve-all.log"
    # Only our own settings: a TRIPTYCH_* variable left by the caller's shell must not change the services.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIPTYCH_")}
    env.update(
        TRIPTYCH_MODEL=str(tiny_model), TRIPTYCH_DEVICE="cpu", TRIPTYCH_DTYPE="float32", TRIPTYCH_LOG_LEVEL="WARNING"
    )
    env["TRIPTYCH_CACHE_DIR"] = str(log_path.parent / "cache")  # its job store too
    proc = spawn_triptych(["serve", "all", "--host", "127.0.0.1", "--port", str(base)], env, log_path)
    url = f"http://127.0.0.1:{base}"
    try:
        wait_ready(url, proc)
        yield url
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n--- serve all log ---\n{log_path.read_text(errors='replace')[-4000:]}") from None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
