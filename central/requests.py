"""Reading a task request (txt2img, img2img, inpaint, outpaint) from an HTTP body: JSON, or multipart with
the images as files. Shared by the sync task routes and ``POST /v1/jobs``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TypeVar

import orjson
from fastapi import FastAPI, Request
from pydantic import BaseModel, ValidationError

from central.controlnet import attach_form_images
from central.images import read_form
from shared.errors import InvalidValue, MalformedRequest, Overloaded, UnsupportedMediaType, validation_error
from shared.protocol import MAX_CONTROLNETS, Img2ImgRequest, InpaintRequest, OutpaintRequest, Txt2ImgRequest
from shared.serving.http import read_body
from shared.settings import Settings

T = TypeVar("T", bound=BaseModel)


#: The task models by name (``POST /v1/jobs`` names its task).
TASKS: dict[str, type[Txt2ImgRequest]] = {
    "txt2img": Txt2ImgRequest,
    "img2img": Img2ImgRequest,
    "inpaint": InpaintRequest,
    "outpaint": OutpaintRequest,
}


async def read_form_data(request: Request, settings: Settings) -> dict[str, Any]:
    """A multipart task body as a dict: form fields, image files as bytes, JSON list fields parsed, each
    ``controlnet_image_<i>`` file moved into its ControlNet entry."""
    images = 2 + MAX_CONTROLNETS  # image, mask_image, controlnet_image_<i>
    fields, files = await read_form(
        request, max_bytes=images * settings.max_image_bytes + settings.max_json_body_bytes, max_files=images
    )
    data: dict[str, Any] = {**fields, **files}
    for name in ("loras", "controlnets"):
        if isinstance(data.get(name), str):  # a list in a form field: JSON text
            try:
                data[name] = orjson.loads(data[name])
            except orjson.JSONDecodeError:
                raise InvalidValue(f"`{name}` must be a JSON list in a form field", param=name) from None
    attach_form_images(data)
    return data


def validated(model: type[T], data: dict[str, Any]) -> T:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False)) from None


def _media(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def json_object(body: bytes) -> dict[str, Any]:
    """A JSON body that must be an object (400 otherwise)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedRequest(f"request body is not a JSON object: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedRequest("request body is not a JSON object")
    return data


async def _json_body(request: Request, settings: Settings) -> bytes:
    body = await read_body(request, settings.max_json_body_bytes)
    if not body:
        raise MalformedRequest("request body is empty; send a JSON object with at least `prompt`")
    return body


async def read_task_request(request: Request, settings: Settings, model: type[T]) -> T:
    """A task request from a JSON body, or (image tasks) from multipart/form-data with images as files."""
    content_type = _media(request)
    files = takes_files(model)
    if files and content_type == "multipart/form-data":
        return validated(model, await read_form_data(request, settings))
    if content_type != "application/json":
        allowed = "application/json or multipart/form-data" if files else "application/json"
        raise UnsupportedMediaType(f"Content-Type must be {allowed}, got {content_type or 'none'}")
    return validated_json(model, await _json_body(request, settings))


def validated_json(model: type[T], body: bytes) -> T:
    """A JSON body as ``model``: 400 when it is not a JSON object, 422 naming the field otherwise."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if errors and (errors[0].get("type") in ("json_invalid", "json_type") or not errors[0].get("loc")):
            raise MalformedRequest(f"request body is not a JSON object: {errors[0].get('msg')}") from None
        raise validation_error(errors) from None


async def read_job_request(request: Request, settings: Settings) -> tuple[str, Txt2ImgRequest, int | None]:
    """``POST /v1/jobs``: ``{"task": ..., that task's fields, "preview_every"?}`` as JSON, or multipart with a
    ``task`` field. Returns the task, its request and the job's own preview interval (None: the default)."""
    content_type = _media(request)
    if content_type == "multipart/form-data":
        data = await read_form_data(request, settings)
    elif content_type == "application/json":
        data = json_object(await _json_body(request, settings))
    else:
        raise UnsupportedMediaType(
            f"Content-Type must be application/json or multipart/form-data, got {content_type or 'none'}"
        )
    task = data.pop("task", "txt2img")
    if task not in TASKS:
        raise InvalidValue(f"`task` must be one of {', '.join(TASKS)}, got {str(task)[:40]!r}", param="task")
    every = data.pop("preview_every", None)
    if every is not None:
        try:
            every = int(every)
        except (TypeError, ValueError):
            every = -1
        if not 0 <= every <= 1000:
            raise InvalidValue("`preview_every` must be 0 (no previews) to 1000 steps", param="preview_every")
    return task, validated(TASKS[task], data), every


def takes_files(model: type[BaseModel]) -> bool:
    """Image tasks, and any task with ControlNets (their control images), also take multipart/form-data."""
    return "image" in model.model_fields or "controlnets" in model.model_fields


class GenerationSlots:
    """Central's own bound (issue 11): at most ``limit`` generations in flight over every generating route
    (native, jobs excepted, A1111, OpenAI); past it a request gets 429 at once instead of waiting, unbounded,
    for a connection to a stage. Counted on the event loop: no lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def acquire(self) -> None:
        """Take a slot, or raise 429 (``Overloaded``); every ``acquire`` needs one ``release``."""
        if self.in_flight >= self.limit:
            raise Overloaded(
                f"central is at capacity: {self.in_flight} generations in flight (max_queue={self.limit}); retry later",
                retry_after_s=1,
            )
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()


def generation_slots(app: FastAPI, settings: Settings) -> GenerationSlots:
    """The app's ``GenerationSlots`` (made on first use, sized by ``TRIPTYCH_MAX_QUEUE``)."""
    slots: GenerationSlots | None = getattr(app.state, "generation_slots", None)
    if slots is None:
        slots = app.state.generation_slots = GenerationSlots(settings.max_queue)
    return slots
