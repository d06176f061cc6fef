"""FastAPI app of the VAE stage: `POST /v1/decode`, `POST /v1/encode-image`, health, readiness and info."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from shared.protocol import DecodeRequest, EncodeImageRequest
from shared.settings import Settings, get_settings
from shared.stage_app import build_stage_app, message_route
from vae_decoder.runtime import VaeRuntime


def build_app(settings: Settings | None = None, runtime: VaeRuntime | None = None) -> FastAPI:
    """The VAE decoder app. Pass `runtime` to serve one already loaded (tests, embedded mode)."""
    owns_runtime = runtime is None
    runtime = runtime or VaeRuntime(settings or get_settings())
    router = APIRouter(tags=["vae_decoder"])
    message_route(router, "/v1/decode", DecodeRequest, "decode", summary="Latents to uint8 images (B, H, W, 3)")
    message_route(
        router,
        "/v1/encode-image",
        EncodeImageRequest,
        "encode_image",
        summary="uint8 images (and mask) to the VAE posterior's moments (img2img / inpaint)",
    )
    return build_stage_app(runtime, router, title="Triptych VAE decoder", owns_runtime=owns_runtime, settings=settings)
