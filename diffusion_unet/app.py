"""FastAPI app of the UNet stage: `POST /v1/denoise`, `GET /v1/schedulers`, health, readiness and info."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request

from diffusion_unet.runtime import UNetRuntime
from shared.protocol import DenoiseRequest
from shared.settings import Settings, get_settings
from shared.stage_app import build_stage_app, get_runtime, message_route


def build_app(settings: Settings | None = None, runtime: UNetRuntime | None = None) -> FastAPI:
    """The UNet app. Pass `runtime` to serve one already loaded (tests, embedded mode)."""
    owns_runtime = runtime is None
    runtime = runtime or UNetRuntime(settings or get_settings())
    router = APIRouter(tags=["diffusion_unet"])
    message_route(
        router,
        "/v1/denoise",
        DenoiseRequest,
        "denoise",
        summary="Embeddings and seeds to final latents (the whole denoise loop)",
    )

    @router.get("/v1/schedulers", summary="Schedulers the UNet (or variant `model`) can use, with A1111 aliases")
    async def list_schedulers(request: Request, model: str | None = None) -> list[dict[str, Any]]:
        rt = get_runtime(request)
        assert isinstance(rt, UNetRuntime)
        return rt.scheduler_catalogue(model)

    return build_stage_app(runtime, router, title="Triptych UNet", owns_runtime=owns_runtime, settings=settings)
