"""central: the public REST API. Chains the three stages through typed clients (HTTP or in-process)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

import orjson
import pybase64
from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from central.a1111 import install_a1111
from central.clients import (
    HopObserver,
    HttpTransport,
    LocalStage,
    LocalTransport,
    TextEncoderClient,
    Transport,
    UNetClient,
    VaeClient,
)
from central.images import MEDIA_TYPES, encode_images
from central.jobs import install_jobs, start_jobs, stop_jobs
from central.openai_images import install_openai
from central.pipeline import Generation, Orchestrator
from central.replicas import ReplicaTransport, stage_transport
from central.requests import generation_slots, read_task_request, takes_files
from central.web import install_web
from shared import __version__, wire
from shared.errors import (
    InvalidValue,
    StageUnavailable,
    TriptychError,
    install_error_handlers,
)
from shared.protocol import (
    Img2ImgRequest,
    InpaintRequest,
    OutpaintRequest,
    Txt2ImgRequest,
    Txt2ImgResponse,
)
from shared.serving.http import BodyTimeout, install_connection_cap, unless_disconnected
from shared.serving.middleware import install_observability
from shared.serving.security import install_access, parse_keys, split_list
from shared.settings import Settings, get_settings

STAGE_NAMES = ("text_encoder", "diffusion_unet", "vae_decoder")
log = logging.getLogger("triptych.central")
T = TypeVar("T", bound=BaseModel)

FORMAT_OF_MEDIA = {v: k for k, v in MEDIA_TYPES.items()}


def http_orchestrator(settings: Settings) -> Orchestrator:
    """Clients for three stage services at the configured URLs (each one replica or several, see
    ``central.replicas``), each hop with its operation's timeout."""
    limits = wire.Limits(max_body_bytes=settings.max_body_bytes)  # a stage's reply is bounded like a request
    return Orchestrator(
        TextEncoderClient(stage_transport("text_encoder", settings.text_encoder_url, settings, limits=limits)),
        UNetClient(stage_transport("diffusion_unet", settings.diffusion_unet_url, settings, limits=limits)),
        VaeClient(stage_transport("vae_decoder", settings.vae_decoder_url, settings, limits=limits)),
        settings,
    )


def observe_hops(orchestrator: Orchestrator, observer: HopObserver) -> None:
    """Record every HTTP hop of ``orchestrator`` that nobody records yet with ``observer``."""
    for client in (orchestrator.text_encoder, orchestrator.unet, orchestrator.vae):
        if isinstance(client.transport, HttpTransport | ReplicaTransport) and client.transport.on_hop is None:
            client.transport.on_hop = observer


def mixed_orchestrator(settings: Settings, local: set[str]) -> Orchestrator:
    """Stages named in ``local`` run in this process (loaded here); the others over HTTP.

    ``local`` uses the operation names ``encode``, ``denoise``, ``decode`` (what the CLI's --local-stages takes).
    """
    from diffusion_unet.runtime import UNetRuntime
    from text_encoder.runtime import TextEncoderRuntime
    from vae_decoder.runtime import VaeRuntime

    remote = http_orchestrator(settings)
    transports: dict[str, Transport] = {
        "encode": remote.text_encoder.transport,
        "denoise": remote.unet.transport,
        "decode": remote.vae.transport,
    }
    runtimes: dict[str, Callable[[Settings], LocalStage]] = {
        "encode": TextEncoderRuntime,
        "denoise": UNetRuntime,
        "decode": VaeRuntime,
    }
    for op, cls in runtimes.items():
        if op in local:
            transports[op] = LocalTransport(cls(settings), owned=True)
    return Orchestrator(
        TextEncoderClient(transports["encode"]),
        UNetClient(transports["denoise"]),
        VaeClient(transports["decode"]),
        settings,
    )


async def load_local_runtimes(orchestrator: Orchestrator) -> None:
    """Load every in-process stage's model, one after another.

    Not concurrently: transformers' and diffusers' lazy module imports race when two threads trigger them
    at once ("cannot import name 'PreTrainedModel'").
    """
    for client in (orchestrator.text_encoder, orchestrator.unet, orchestrator.vae):
        if isinstance(client.transport, LocalTransport) and not client.transport.runtime.ready:
            await client.transport.runtime.load_async()


def wanted_image_format(accept: str) -> str | None:
    """The image format the Accept header asks for, if it names one exactly (not */*)."""
    for part in accept.split(","):
        media = part.split(";")[0].strip().lower()
        if media in FORMAT_OF_MEDIA:
            return FORMAT_OF_MEDIA[media]
    return None


def server_timing(timings: dict[str, float]) -> str:
    return ", ".join(f"{k.removesuffix('_ms')};dur={v:.1f}" for k, v in timings.items())


async def get_orchestrator(request: Request) -> Orchestrator:
    orchestrator: Orchestrator = request.app.state.orchestrator
    return orchestrator


OrchestratorDep = Annotated[Orchestrator, Depends(get_orchestrator)]


#: Where the request bodies' nested models are documented (``_with_request_models``).
COMPONENTS = "#/components/schemas/{model}"


def _request_body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """The request body of a task route (read by hand, so FastAPI cannot document it): JSON, and multipart for
    the tasks that take files. Nested models are referenced under ``components/schemas``; pydantic's own
    ``$defs`` would be refs that do not resolve inside an OpenAPI document."""
    schema = model.model_json_schema(ref_template=COMPONENTS)
    schema.pop("$defs", None)
    content: dict[str, Any] = {"application/json": {"schema": schema}}
    if takes_files(model):
        content["multipart/form-data"] = {"schema": schema}
    return {"requestBody": {"required": True, "content": content}}


def _with_request_models(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Add the task bodies' nested models to the app's OpenAPI ``components/schemas``."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                for name, definition in model.model_json_schema(ref_template=COMPONENTS).get("$defs", {}).items():
                    schemas.setdefault(name, definition)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_app(
    settings: Settings | None = None,
    *,
    orchestrator: Orchestrator | None = None,
    embedded: bool = False,
) -> FastAPI:
    """central's app. ``embedded`` runs the three stages in this process instead of calling services."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        orch = orchestrator
        if orch is None:
            if embedded:
                orch = mixed_orchestrator(settings, {"encode", "denoise", "decode"})
            else:
                orch = http_orchestrator(settings)
        observe_hops(orch, app.state.metrics.observe_hop)
        app.state.orchestrator = orch
        await load_local_runtimes(orch)
        try:
            await orch.check()
            log.info("stages are reachable and compatible")
        except TriptychError as exc:
            # Stages may start after central; /readyz keeps reporting until they agree.
            urls = ", ".join(f"{stage} {getattr(settings, f'{stage}_url')}" for stage in STAGE_NAMES)
            log.info("waiting for the stages (%s): %s", urls, exc.message)
        await start_jobs(app, settings, orch)
        try:
            yield
        finally:
            await stop_jobs(app)
            await orch.aclose()

    app = FastAPIOffline(
        title="Triptych",
        version=__version__,
        description="Stable Diffusion as three stage services behind one REST endpoint.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    install_observability(app, service="central", drain_timeout_s=settings.drain_timeout_s)
    app.add_middleware(BodyTimeout, timeout_s=settings.body_timeout_s)
    install_access(app, keys=parse_keys(settings.api_keys.get_secret_value()), who="central",
                   origins=split_list(settings.cors_origins), hosts=split_list(settings.allowed_hosts))  # fmt: skip
    install_connection_cap(app, settings.max_connections)

    install_jobs(app, settings)
    install_web(app)
    install_a1111(app, settings)

    @app.get("/healthz", summary="Process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": "central"}

    @app.get("/readyz", summary="All stages reachable, loaded and mutually compatible")
    async def readyz(orch: OrchestratorDep) -> dict[str, Any]:
        try:
            infos = await orch.check()
        except TriptychError as exc:
            # Not ready, whatever the cause: a slow or garbled stage is still "not ready" to a probe.
            raise StageUnavailable(exc.message) from None
        return {"status": "ready", "stages": {i.stage: i.model.fingerprint for i in infos}}

    @app.get("/v1/info", summary="central's version and every stage's info")
    async def info(orch: OrchestratorDep) -> dict[str, Any]:
        stages: dict[str, Any] = {}
        clients = {"text_encoder": orch.text_encoder, "diffusion_unet": orch.unet, "vae_decoder": orch.vae}
        results = await asyncio.gather(*(c.info() for c in clients.values()), return_exceptions=True)
        for name, result in zip(clients, results, strict=True):
            if isinstance(result, TriptychError):
                stages[name] = result.envelope()
            elif isinstance(result, BaseException):
                raise result
            else:
                stages[name] = result.model_dump()
        return {"service": "central", "version": __version__, "stages": stages}

    @app.get("/v1/models", summary="Models a request can name: base, UNet variants, LoRAs, embeddings, ControlNets")
    async def list_models(orch: OrchestratorDep) -> dict[str, Any]:
        return await orch.models()

    @app.get("/v1/schedulers", summary="Schedulers the UNet can use: diffusers class names and A1111 aliases")
    async def list_schedulers(orch: OrchestratorDep, model: str | None = None) -> list[dict[str, Any]]:
        return await orch.schedulers(model)

    slots = generation_slots(app, settings)  # shared with the A1111 and OpenAI routes

    def _task_endpoint(model: type[Txt2ImgRequest]) -> Any:
        async def endpoint(request: Request, orch: OrchestratorDep) -> Response:
            with slots.admitted():
                return await generate(request, orch, model)

        endpoint.__name__ = model.__name__.removesuffix("Request").lower()
        return endpoint

    async def generate(request: Request, orch: Orchestrator, model: type[Txt2ImgRequest]) -> Response:
        """One generation: read and check the request, run it, render the images."""
        start = time.perf_counter()
        req = await read_task_request(request, settings, model)
        as_file = wanted_image_format(request.headers.get("accept", ""))
        if as_file and req.num_images != 1:
            raise InvalidValue(
                f"`Accept: {MEDIA_TYPES[as_file]}` returns one image, but `num_images` is {req.num_images}; "
                "ask for application/json to get several",
                param="num_images",
            )
        # A client that hangs up cancels its generation: the hop in progress is abandoned, and the stage
        # working on it notices the closed connection and stops (the UNet before its next step).
        gen = await unless_disconnected(request, orch.generate(req))
        if gen is None:
            return Response(status_code=499)
        return await render(gen, as_file or req.output_format, bool(as_file), start)

    tasks: dict[str, tuple[type[Txt2ImgRequest], str]] = {
        "/v1/txt2img": (Txt2ImgRequest, "Text to image"),
        "/v1/img2img": (Img2ImgRequest, "Image to image (StableDiffusionImg2ImgPipeline)"),
        "/v1/inpaint": (InpaintRequest, "Inpainting (StableDiffusionInpaintPipeline)"),
        "/v1/outpaint": (OutpaintRequest, "Outpainting: extend the canvas, then inpaint the border"),
    }
    _with_request_models(app, [model for model, _ in tasks.values()])
    for path, (model, summary) in tasks.items():
        app.add_api_route(
            path,
            _task_endpoint(model),
            methods=["POST"],
            summary=summary,
            response_model=Txt2ImgResponse,
            openapi_extra=_request_body_doc(model),
            responses={200: {"content": {m: {} for m in MEDIA_TYPES.values()}}},
        )

    # OpenAI's images API (SPEC §12): shares the task routes' in-flight bound.
    install_openai(app, settings)

    async def render(gen: Generation, fmt: str, as_file: bool, start: float) -> Response:
        t0 = time.perf_counter()
        files = await run_in_threadpool(encode_images, gen.images, fmt)
        image_ms = (time.perf_counter() - t0) * 1000
        timings = {
            **({"encode_image_ms": gen.timings_ms["encode_image_ms"]} if "encode_image_ms" in gen.timings_ms else {}),
            "encode_ms": gen.timings_ms["encode_ms"],
            "denoise_ms": gen.timings_ms["denoise_ms"],
            "decode_ms": gen.timings_ms["decode_ms"],
            "image_encode_ms": image_ms,
            "total_ms": (time.perf_counter() - start) * 1000,
        }
        if as_file:
            return Response(
                content=files[0],
                media_type=MEDIA_TYPES[fmt],
                headers={"X-Seed": str(gen.seeds[0]), "Server-Timing": server_timing(timings)},
            )
        body = Txt2ImgResponse(
            images=[pybase64.b64encode(f).decode("ascii") for f in files],
            seeds=gen.seeds,
            parameters={**gen.parameters, "output_format": fmt},
            timings={**timings, "compute_ms": gen.compute_ms},  # type: ignore[arg-type]
        )
        # orjson: json.dumps took 6 ms to render one 640 KB base64 PNG on the benchmark machine, orjson 0.1 ms.
        return Response(
            orjson.dumps(body.model_dump()),
            media_type="application/json",
            headers={"Server-Timing": server_timing(timings)},
        )

    return app
