"""FastAPI app of the UNet stage: `POST /v1/denoise`, `GET /v1/schedulers`, health, readiness and info."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI

from diffusion_unet.runtime import UNetRuntime
from shared.serving.app import build_stage_app
from shared.settings import Settings, get_settings


def build_app(settings: Settings | None = None, runtime: UNetRuntime | None = None) -> FastAPI:
    """The UNet app. Pass `runtime` to serve one already loaded (tests, embedded mode)."""
    owns_runtime = runtime is None
    unet = runtime or UNetRuntime(settings or get_settings())
    router = APIRouter(tags=["diffusion_unet"])

    @router.get("/v1/schedulers", summary="Schedulers the UNet (or variant `model`) can use, with A1111 aliases")
    async def list_schedulers(model: str | None = None) -> list[dict[str, Any]]:
        unet.check_ready()
        return unet.scheduler_catalogue(model)

    return build_stage_app(unet, title="Triptych UNet", routes=router, owns_runtime=owns_runtime, settings=settings)
