"""FastAPI app of the UNet stage: `POST /v1/denoise` plus the health, readiness and info routes."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from diffusion_unet.runtime import UNetRuntime
from shared.protocol import DenoiseRequest
from shared.settings import Settings, get_settings
from shared.stage_app import build_stage_app, message_route


def build_app(settings: Settings | None = None, runtime: UNetRuntime | None = None) -> FastAPI:
    """The UNet app. Pass `runtime` to serve one already loaded (tests, embedded mode)."""
    owns_runtime = runtime is None
    runtime = runtime or UNetRuntime(settings or get_settings())
    router = APIRouter(tags=["diffusion_unet"])
    message_route(
        router,
        "/v1/denoise",
        DenoiseRequest,
        UNetRuntime.denoise,
        summary="Embeddings and seeds to final latents (the whole denoise loop)",
    )
    return build_stage_app(runtime, router, title="Triptych UNet", owns_runtime=owns_runtime, settings=settings)
