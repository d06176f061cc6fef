"""FastAPI app of the text encoder stage: `POST /v1/encode` plus the health, readiness and info routes."""

from __future__ import annotations

from fastapi import FastAPI

from shared.serving.app import build_stage_app
from shared.settings import Settings, get_settings
from text_encoder.runtime import TextEncoderRuntime


def build_app(settings: Settings | None = None, runtime: TextEncoderRuntime | None = None) -> FastAPI:
    """The text encoder app. Pass `runtime` to serve one already loaded (tests, embedded mode)."""
    owns_runtime = runtime is None
    runtime = runtime or TextEncoderRuntime(settings or get_settings())
    return build_stage_app(runtime, title="Triptych text encoder", owns_runtime=owns_runtime, settings=settings)
