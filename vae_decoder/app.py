"""FastAPI app of the VAE stage: `POST /v1/decode`, `POST /v1/encode-image`, health, readiness and info."""

from __future__ import annotations

from fastapi import FastAPI

from shared.serving.app import build_stage_app
from shared.settings import Settings, get_settings
from vae_decoder.runtime import VaeRuntime


def build_app(settings: Settings | None = None, runtime: VaeRuntime | None = None) -> FastAPI:
    """The VAE decoder app. Pass `runtime` to serve one already loaded (tests, embedded mode)."""
    owns_runtime = runtime is None
    runtime = runtime or VaeRuntime(settings or get_settings())
    return build_stage_app(runtime, title="Triptych VAE decoder", owns_runtime=owns_runtime, settings=settings)
