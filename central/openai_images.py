"""OpenAI's Images API on central (SPEC §12): ``POST /v1/images/generations`` and ``POST /v1/images/edits``, as
the official ``openai`` Python package calls them, mapped onto the native tasks.

* A generation is a ``Txt2ImgRequest``; an edit is an ``InpaintRequest`` (mask from the ``mask`` file's alpha,
  or the image's own alpha) or, for an opaque image without a mask, an ``Img2ImgRequest``. Both run
  ``Orchestrator.generate`` exactly as the native routes do, so the same seed gives the same pixels.
* OpenAI has no seed: ``seed`` (and a few other native fields, see ``NATIVE_EXTRAS``) may come as extra body
  fields (``extra_body={"seed": 5}``); the seeds used come back as the extra field ``seeds`` and ``X-Seed``.
* ``stream: true`` answers Server-Sent Events: ``partial_images`` (0-3) previews of the latents as
  ``image_generation.partial_image`` (``image_edit.partial_image``), then one ``.completed`` per image.
* Failures on these routes use OpenAI's error object ``{"error": {"message", "type", "param", "code"}}`` and
  OpenAI's statuses (an invalid value is 400 here, not 422), so the client raises ``BadRequestError`` & co.

``docs/compat.md`` lists every OpenAI field and what Triptych does with it.
"""

from __future__ import annotations

import asyncio
import io
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import numpy as np
import orjson
import PIL.Image
import PIL.ImageOps
import pybase64
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.types import Receive, Scope, Send

from central.images import bounded, decode_image, encode_images
from central.pipeline import Generation, Orchestrator, unet_variants
from central.requests import generation_slots, json_object, validated
from shared.errors import (
    InvalidValue,
    MalformedRequest,
    NotFound,
    TriptychError,
    UnsupportedMediaType,
    validation_error,
)
from shared.protocol import Img2ImgRequest, InpaintRequest, Txt2ImgRequest
from shared.serving.http import read_body, unless_disconnected
from shared.settings import Settings

GENERATIONS, EDITS = "/v1/images/generations", "/v1/images/edits"

#: OpenAI's own model names: they select Triptych's default UNet (base; an edit: the inpainting variant if hosted).
OPENAI_MODEL_PREFIXES = ("gpt-image", "dall-e", "chatgpt-image")
#: Native Triptych fields an OpenAI request may carry as extra body fields (``extra_body=``).
NATIVE_EXTRAS = ("seed", "negative_prompt", "num_inference_steps", "guidance_scale", "scheduler", "loras")
#: Native field -> the OpenAI field a client sent it as (so an error names what the client wrote).
OPENAI_PARAM = {"num_images": "n", "width": "size", "height": "size", "mask_image": "mask"}
QUALITIES = ("low", "medium", "high", "xhigh", "max", "auto")
SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX×]\s*(\d{1,6})\s*$")
MAX_EDIT_IMAGES = 16  # OpenAI takes up to 16 images; Triptych uses the first


class ImageParams(BaseModel):
    """The fields of an OpenAI images request (generations and edits), plus the native extras. An unknown
    field is refused (400 "Unknown parameter"), as OpenAI does."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    n: int | None = None
    size: str | None = None
    response_format: str | None = None
    output_format: str | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    stream: bool | None = None
    partial_images: int | None = Field(default=None, ge=0, le=3)
    background: str | None = None
    quality: str | None = None
    style: str | None = None
    moderation: str | None = None
    user: str | None = None
    safety_identifier: str | None = None
    input_fidelity: str | None = None
    complexity: str | None = None
    frame_count: int | None = None
    frame_duration_ms: int | None = None
    # Triptych's own fields (extra_body)
    seed: int | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    loras: Any = None
    strength: float | None = None


# ------------------------------------------------------------------------------------------------- errors
def openai_error(status: int, message: str, *, param: str | None, code: str | None, type_: str | None = None,
                 headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    if type_ is None:
        type_ = "invalid_request_error" if status < 500 else "server_error"
        if status == 429:
            type_ = "rate_limit_error"
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def error_body(exc: TriptychError) -> tuple[int, dict[str, Any]]:
    """A Triptych error as OpenAI's status and error object (an invalid value is 400 at OpenAI, not 422)."""
    status = 400 if exc.status == 422 else exc.status
    param = OPENAI_PARAM.get(exc.param or "", exc.param)
    type_ = "invalid_request_error" if status < 500 else "server_error"
    if status == 429:
        type_ = "rate_limit_error"
    code = getattr(exc, "openai_code", None) or exc.type
    return status, {"error": {"message": exc.message, "type": type_, "param": param, "code": code}}


def from_triptych(exc: TriptychError) -> JSONResponse:
    status, body = error_body(exc)
    return JSONResponse(body, status_code=status, headers=exc.headers or None)


def unsupported(message: str, param: str) -> InvalidValue:
    exc = InvalidValue(message, param=param)
    exc.openai_code = "unsupported_value"  # type: ignore[attr-defined]
    return exc


# ------------------------------------------------------------------------------------------------- reading
def _media(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _params(data: dict[str, Any]) -> ImageParams:
    try:
        return ImageParams.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first: dict[str, Any] = dict(errors[0]) if errors else {}
        if first.get("type") == "extra_forbidden":
            name = str(first.get("loc", ("?",))[0])
            exc2 = InvalidValue(f"Unknown parameter: '{name}'.", param=name)
            exc2.openai_code = "unknown_parameter"  # type: ignore[attr-defined]
            raise exc2 from None
        if first.get("type") == "missing":
            name = str(first.get("loc", ("?",))[0])
            raise InvalidValue(f"Missing required parameter: '{name}'.", param=name) from None
        raise validation_error(errors) from None


async def read_json(request: Request, settings: Settings) -> dict[str, Any]:
    if _media(request) != "application/json":
        raise UnsupportedMediaType(f"Content-Type must be application/json, got {_media(request) or 'none'}")
    return json_object(await read_body(request, settings.max_json_body_bytes))


async def read_multipart(request: Request, settings: Settings) -> tuple[dict[str, str], dict[str, list[bytes]]]:
    """An edit's multipart body: text fields and files (``image`` / ``image[]`` may repeat), within limits."""
    if _media(request) != "multipart/form-data":
        raise UnsupportedMediaType(f"Content-Type must be multipart/form-data, got {_media(request) or 'none'}")
    max_bytes = 4 * settings.max_image_bytes + settings.max_json_body_bytes
    limited = bounded(request, max_bytes)
    try:
        form = await limited.form(
            max_files=MAX_EDIT_IMAGES + 2, max_fields=64, max_part_size=settings.max_json_body_bytes
        )
    except (HTTPException, MultiPartException) as exc:
        detail = str(exc.detail if isinstance(exc, HTTPException) else exc.message)
        raise MalformedRequest(f"malformed multipart body: {detail}") from None
    fields: dict[str, str] = {}
    files: dict[str, list[bytes]] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.setdefault(name.removesuffix("[]"), []).append(await value.read())
            elif name in fields:
                raise InvalidValue(f"`{name}` was given more than once.", param=name)
            else:
                fields[name] = value
    finally:
        await form.close()
    return fields, files


# ------------------------------------------------------------------------------------------------- mapping
def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size.strip().lower() == "auto":
        return None, None
    match = SIZE.match(size)
    if not match:
        raise InvalidValue(f"Invalid value: '{size[:40]}'. `size` must be 'auto' or 'WIDTHxHEIGHT'.", param="size")
    return int(match.group(1)), int(match.group(2))


def check_options(p: ImageParams) -> str:
    """Refuse what Triptych cannot do; returns the output format."""
    if p.response_format not in (None, "b64_json"):
        raise unsupported(
            f"`response_format` {p.response_format!r} is not supported: Triptych returns images as b64_json only",
            "response_format",
        )
    fmt = (p.output_format or "png").lower()
    if fmt not in ("png", "jpeg", "webp"):
        raise unsupported(
            f"`output_format` {p.output_format!r} is not supported; use png, jpeg or webp", "output_format"
        )
    if p.background not in (None, "auto", "opaque"):
        raise unsupported(
            f"`background` {p.background!r} is not supported: Triptych's images are opaque (use auto or opaque)",
            "background",
        )
    return fmt


def native_fields(p: ImageParams, fmt: str) -> dict[str, Any]:
    width, height = parse_size(p.size)
    data: dict[str, Any] = {"prompt": p.prompt, "output_format": fmt, "model": None}
    if p.n is not None:
        data["num_images"] = p.n
    if width is not None:
        data.update(width=width, height=height)
    for name in NATIVE_EXTRAS:
        value = getattr(p, name)
        if value is not None:
            data[name] = value
    if isinstance(data.get("loras"), str):  # multipart: a JSON list in a form field
        try:
            data["loras"] = orjson.loads(data["loras"])
        except orjson.JSONDecodeError:
            raise InvalidValue("`loras` must be a JSON list", param="loras") from None
    return data


async def resolve_model(orch: Orchestrator, model: str | None) -> str | None:
    """OpenAI's ``model``: a Triptych UNet variant (``base`` or a variant name); OpenAI's own model names and
    no model mean the default. Anything else is 404 ``model_not_found``."""
    if not model or model.lower().startswith(OPENAI_MODEL_PREFIXES):
        return None
    _, unet_info, _ = await orch.infos()
    variants = unet_variants(unet_info)
    if model not in variants:
        exc = NotFound(
            f"The model '{model[:128]}' does not exist; available: {', '.join(variants)} "
            f"(or an OpenAI model name for the default)",
            param="model",
        )
        exc.openai_code = "model_not_found"  # type: ignore[attr-defined]
        raise exc
    return model


def _open_rgba(raw: bytes, param: str) -> PIL.Image.Image | None:
    """The image's alpha as a mode "L" image (after its EXIF orientation), or None when it has none. Called
    only on bytes ``decode_image`` has accepted (format and pixel count checked)."""
    try:
        with PIL.Image.open(io.BytesIO(raw)) as opened:
            opened.load()
            im: PIL.Image.Image = PIL.ImageOps.exif_transpose(opened) or opened
            if "A" not in im.getbands() and "transparency" not in im.info:
                return None
            return im.convert("RGBA").getchannel("A")
    except Exception as exc:  # any decoder failure is the client's file
        raise InvalidValue(f"the image's alpha channel cannot be read ({type(exc).__name__})", param=param) from None


def _png(image: PIL.Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def edit_mask(settings: Settings, image: bytes, mask: bytes | None) -> bytes | None:
    """Triptych's mask (white = repaint) from OpenAI's: repaint where the mask's alpha is 0; without a mask,
    where the image's own alpha is 0. None: the image is opaque and there is no mask (an img2img edit)."""
    limits = {"max_bytes": settings.max_image_bytes, "max_pixels": settings.max_image_pixels}
    picture = decode_image(image, param="image", **limits)
    if mask is None:
        alpha = _open_rgba(image, "image")
        if alpha is None or min(alpha.getextrema()) != 0:  # type: ignore[type-var]
            return None
    else:
        decode_image(mask, param="mask", **limits)
        alpha = _open_rgba(mask, "mask")
        if alpha is None:
            raise InvalidValue(
                "`mask` must be a PNG with an alpha channel: its fully transparent pixels (alpha 0) are repainted",
                param="mask",
            )
        if alpha.size != picture.size:
            raise InvalidValue(
                f"`mask` is {alpha.width}x{alpha.height} but the image is {picture.width}x{picture.height}; "
                "they must be the same size",
                param="mask",
            )
    return _png(alpha.point(lambda a: 255 if a == 0 else 0, mode="L"))


# ------------------------------------------------------------------------------------------------- output
def encode(images: torch.Tensor, fmt: str, compression: int | None) -> list[str]:
    if compression is None or fmt == "png":
        files = encode_images(images, fmt)
    else:
        files = []
        for array in images.numpy():
            buf = io.BytesIO()
            PIL.Image.fromarray(array).save(buf, format=fmt.upper(), quality=compression)
            files.append(buf.getvalue())
    return [pybase64.b64encode(f).decode("ascii") for f in files]


def encode_partial(preview: torch.Tensor, size: tuple[int, int], fmt: str) -> str:
    """The first image of a latent preview (1/8 of the output's size), enlarged to the output's size."""
    image = PIL.Image.fromarray(preview[0].numpy()).resize(size, PIL.Image.Resampling.BILINEAR)
    return encode(torch.from_numpy(np.asarray(image)[None].copy()), fmt, None)[0]


def usage() -> dict[str, Any]:
    """Triptych counts no tokens: OpenAI's usage object, all zero (the client requires it in stream events)."""
    return {
        "input_tokens": 0,
        "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
        "output_tokens": 0,
        "total_tokens": 0,
    }


class _Cleanup(StreamingResponse):
    """A streaming response that runs ``on_close`` however it ends (finished, client gone, server stopping)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], **kw: Any) -> None:
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


# ------------------------------------------------------------------------------------------------- routes
def install_openai(app: FastAPI, settings: Settings) -> None:
    """Register ``POST /v1/images/generations`` and ``POST /v1/images/edits`` on central's ``app``."""
    slots = generation_slots(app, settings)  # the native routes' bound; a stream holds its slot until it ends

    async def run(
        request: Request, p: ImageParams, req: Txt2ImgRequest, fmt: str, kind: Literal["image_generation", "image_edit"]
    ) -> Response:
        orch: Orchestrator = request.app.state.orchestrator
        slots.acquire()
        streaming = False
        try:
            if p.stream:
                response = await stream(request, orch, p, req, fmt, kind)
                streaming = isinstance(response, _Cleanup)
                return response
            gen = await unless_disconnected(request, orch.generate(req))
            if gen is None:
                return Response(status_code=499)
            images = await run_in_threadpool(encode, gen.images, fmt, p.output_compression)
            body = {
                "created": int(time.time()),
                "data": [{"b64_json": b} for b in images],
                "background": "opaque",
                "output_format": fmt,
                "size": f"{gen.parameters['width']}x{gen.parameters['height']}",
                "usage": usage(),
                "seeds": gen.seeds,
            }
            return Response(orjson.dumps(body), media_type="application/json", headers={"X-Seed": str(gen.seeds[0])})
        finally:
            if not streaming:
                slots.release()

    async def stream(
        request: Request,
        orch: Orchestrator,
        p: ImageParams,
        req: Txt2ImgRequest,
        fmt: str,
        kind: Literal["image_generation", "image_edit"],
    ) -> Response:
        """SSE: ``partial_images`` previews spread over the steps, then one ``completed`` per image. The
        response starts only once the first step is done, so a bad request still gets its 4xx status."""
        wanted = p.partial_images or 0
        steps = req.num_inference_steps
        every = max(1, steps // (wanted + 1))
        quality = p.quality if p.quality in QUALITIES else "auto"
        queue: asyncio.Queue[tuple[int, torch.Tensor] | None] = asyncio.Queue()
        started = asyncio.Event()
        sent = [0]

        def on_progress(event: dict[str, Any]) -> None:
            started.set()
            preview = event.get("preview")
            step = int(event.get("step", 0))
            if isinstance(preview, torch.Tensor) and preview.ndim == 4 and sent[0] < wanted and step < steps:
                sent[0] += 1
                queue.put_nowait((step, preview))

        task = asyncio.ensure_future(orch.generate(req, on_progress=on_progress, preview_every=every if wanted else 0))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        waiter = asyncio.ensure_future(started.wait())
        try:
            while not (task.done() or started.is_set()):
                await asyncio.wait({task, waiter}, timeout=0.5)
                if not (task.done() or started.is_set()) and await request.is_disconnected():
                    task.cancel()
                    return Response(status_code=499)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            waiter.cancel()
        failure = task.exception() if task.done() else None
        if failure is not None:
            raise failure
        _, unet_info, _ = await orch.infos()
        vsf = int(unet_variants(unet_info)["base"]["vae_scale_factor"])

        def common(size: str) -> dict[str, Any]:
            return {"background": "opaque", "created_at": int(time.time()), "output_format": fmt,
                    "quality": quality, "size": size}  # fmt: skip

        async def events() -> AsyncIterator[bytes]:
            index = 0
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():  # the client hung up: stop the generation
                        task.cancel()
                        return
                    continue
                if item is None:
                    break
                _, preview = item
                # The preview is the latent grid: the output's size divided by the VAE scale factor.
                height, width = int(preview.shape[1]) * vsf, int(preview.shape[2]) * vsf
                b64 = await run_in_threadpool(encode_partial, preview, (width, height), fmt)
                data = {"type": f"{kind}.partial_image", "b64_json": b64, "partial_image_index": index,
                        **common(f"{width}x{height}")}  # fmt: skip
                yield sse(f"{kind}.partial_image", data)
                index += 1
            exc = task.exception()
            if exc is not None:
                if isinstance(exc, TriptychError):
                    _, body = error_body(exc)
                else:
                    body = {"error": {"message": "internal server error", "type": "server_error", "param": None,
                                      "code": "internal_error"}}  # fmt: skip
                yield sse("error", body)
                return
            gen: Generation = task.result()
            images = await run_in_threadpool(encode, gen.images, fmt, p.output_compression)
            size = f"{gen.parameters['width']}x{gen.parameters['height']}"
            for i, b64 in enumerate(images):
                data = {"type": f"{kind}.completed", "b64_json": b64, **common(size), "usage": usage(),
                        "seed": gen.seeds[i]}  # fmt: skip
                yield sse(f"{kind}.completed", data)

        def close() -> None:
            if not task.done():
                task.cancel()
            slots.release()

        return _Cleanup(
            events(),
            close,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Seed": str(req.seed)},
        )

    async def generations(request: Request) -> Response:
        try:
            p = _params(await read_json(request, settings))
            fmt = check_options(p)
            data = native_fields(p, fmt)
            data["model"] = await resolve_model(request.app.state.orchestrator, p.model)
            if p.strength is not None:
                raise InvalidValue("Unknown parameter: 'strength' (only edits take it).", param="strength")
            if data.get("seed") is None:
                data["seed"] = _random_seed()
            req = validated(Txt2ImgRequest, data)
            return await run(request, p, req, fmt, "image_generation")
        except TriptychError as exc:
            return from_triptych(exc)

    async def edits(request: Request) -> Response:
        try:
            fields, files = await read_multipart(request, settings)
            images = files.pop("image", [])
            mask = files.pop("mask", [None])[0]
            if files:
                name = next(iter(files))
                raise unsupported(f"`{name}` is not supported by Triptych", name)
            if not images:
                raise InvalidValue("Missing required parameter: 'image'.", param="image")
            p = _params(dict(fields))
            fmt = check_options(p)
            data = native_fields(p, fmt)
            data["model"] = await resolve_model(request.app.state.orchestrator, p.model)
            if data.get("seed") is None:
                data["seed"] = _random_seed()
            if p.strength is not None:
                data["strength"] = p.strength
            image = images[0]
            triptych_mask = await run_in_threadpool(edit_mask, settings, image, mask)
            req: Txt2ImgRequest
            if triptych_mask is None:
                req = validated(Img2ImgRequest, {**data, "image": image})
            else:
                req = validated(InpaintRequest, {**data, "image": image, "mask_image": triptych_mask})
            return await run(request, p, req, fmt, "image_edit")
        except TriptychError as exc:
            return from_triptych(exc)

    errors = {
        400: {"description": "OpenAI's error object: {error: {message, type, param, code}}"},
        404: {"description": "`model` is not hosted (code model_not_found)"},
    }
    app.add_api_route(
        GENERATIONS,
        generations,
        methods=["POST"],
        summary="OpenAI images: generate (as the `openai` package calls it)",
        responses=errors,  # type: ignore[arg-type]
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _schema()}}}},
    )
    app.add_api_route(
        EDITS,
        edits,
        methods=["POST"],
        summary="OpenAI images: edit (multipart `image`/`image[]`, `mask` PNG whose alpha 0 = repaint)",
        responses=errors,  # type: ignore[arg-type]
        openapi_extra={
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _schema(edit=True)}}}
        },
    )


def _random_seed() -> int:
    return secrets.randbelow(2**31)


def _schema(edit: bool = False) -> dict[str, Any]:
    schema = ImageParams.model_json_schema()
    schema.pop("$defs", None)
    if edit:
        props = schema.setdefault("properties", {})
        props["image"] = {"type": "string", "format": "binary", "description": "Also `image[]` (several: first used)."}
        props["mask"] = {"type": "string", "format": "binary", "description": "PNG; alpha 0 = repaint."}
        schema["required"] = ["prompt", "image"]
    return schema
