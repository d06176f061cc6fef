"""FastAPI app of the text encoder stage: `POST /v1/encode` plus the health, readiness and info routes."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from shared.protocol import EncodeRequest
from shared.settings import Settings, get_settings
from shared.stage_app import build_stage_app, message_route
from text_encoder.runtime import TextEncoderRuntime


def build_app(settings: Settings | None = None, runtime: TextEncoderRuntime | None = None) -> FastAPI:
    """The text encoder app. Pass `runtime` to serve one already loaded (tests, embedded mode)."""
    owns_runtime = runtime is None
    runtime = runtime or TextEncoderRuntime(settings or get_settings())
    router = APIRouter(tags=["text_encoder"])
    message_route(
        router,
        "/v1/encode",
        EncodeRequest,
        "encode",
        summary="Prompts to prompt_embeds (and negative_prompt_embeds)",
    )
    return build_stage_app(runtime, router, title="Triptych text encoder", owns_runtime=owns_runtime, settings=settings)
