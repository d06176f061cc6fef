"""AUTOMATIC1111's web API (``/sdapi/v1``) and the ControlNet extension's routes on central (SPEC §12).

Every A1111 generation is translated into one of central's own task requests (``Txt2ImgRequest``,
``Img2ImgRequest``, ``InpaintRequest``) and run by ``Orchestrator.generate``, the code path of ``/v1/txt2img``
and friends: for the same effective parameters the pixels are those of the native endpoints.

Translation (``docs/compat.md`` has the table of every field):

* ``sampler_name`` (or ``sampler_index``) + ``scheduler`` → one scheduler alias of ``shared.schedulers``:
  A1111 ≥ 1.9 names the sampler ("DPM++ 2M") and the noise schedule ("karras") apart; ``automatic`` takes the
  sampler's own default schedule as A1111 does (Karras for "DPM++ 2M", "DPM++ SDE"); legacy names
  ("DPM++ 2M Karras") still work. Schedules diffusers cannot express through our aliases are a 422.
* ``seed`` -1 → a random seed, reported in ``info.seed`` / ``all_seeds``; image *i* uses ``seed + i`` as
  A1111's ``all_seeds`` does. ``batch_size`` × ``n_iter`` images in one generation, bounded by
  ``TRIPTYCH_MAX_NUM_IMAGES`` (422 past it).
* ``<lora:name:weight>`` tags are cut out of the prompt (as A1111's extra-networks parser does) into ``loras``.
* ``mask`` makes img2img an inpaint (white = repaint, as ours); ``inpainting_mask_invert`` is honoured.
* ``alwayson_scripts.ControlNet.args`` units → ``controlnets``.
* Everything else that would change the image and is not implemented is ignored, and named in
  ``info.warnings``; a few that cannot be ignored (``script_name``) are a 422. Errors use Triptych's envelope
  with a non-200 status, which is what A1111 clients check.

Scope: A1111's progress, interrupt, skip and options are global to the server. Here they belong to a *scope*,
the caller's API key (a SHA-256 digest of it) when ``TRIPTYCH_API_KEYS`` is set, else the client's address:
``webuiapi`` sends nothing that names a job or a client, so that is all there is to go on. ``/progress`` shows
the scope's running generation, ``/interrupt`` and ``/skip`` stop only the scope's generations, and ``POST
/options`` ``sd_model_checkpoint`` chooses the UNet variant for the scope's later requests (in memory: a
restart forgets it). An interrupted generation answers 200 with no images and ``info.interrupted: true``
(A1111 returns the partly denoised images; the split pipeline stops the UNet and decodes nothing).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pybase64
import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from central.images import encode_images
from central.jobs import json_response, owner_of
from central.pipeline import Generation, Orchestrator
from central.requests import generation_slots, json_object, validated_json
from shared import schedulers
from shared.errors import (
    InvalidValue,
    MalformedRequest,
    NotFound,
    TriptychError,
    UnsupportedMediaType,
    validation_error,
)
from shared.protocol import (
    MAX_SEED,
    ControlNetSpec,
    Img2ImgRequest,
    InpaintRequest,
    LoraSpec,
    Txt2ImgRequest,
)
from shared.serving.http import read_body, unless_disconnected
from shared.settings import Settings

log = logging.getLogger("triptych.a1111")

PREFIX = "/sdapi/v1"
#: Scopes remembered (options, progress); the least recently seen is forgotten past it.
MAX_SCOPES = 1024

# ------------------------------------------------------------------------------------------ samplers
#: A1111 ≥ 1.9's default schedule per sampler (``sd_samplers_kdiffusion.samplers_k_diffusion`` options).
DEFAULT_SCHEDULE = {
    "DPM++ 2M": "karras",
    "DPM++ SDE": "karras",
    "DPM++ 2M SDE": "exponential",
}
#: A1111 schedules we can express (``uniform`` is k-diffusion's plain sigmas: the aliases without Karras).
SCHEDULES = {
    "automatic": "Automatic",
    "uniform": "Uniform",
    "karras": "Karras",
}
#: A1111 schedules that exist but that we cannot express (a 422 names the supported ones).
OTHER_SCHEDULES = ("exponential", "polyexponential", "sgm_uniform", "kl_optimal", "align_your_steps", "simple",
                   "normal", "ddim", "beta")  # fmt: skip
ANCESTRAL = {"EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler"}
KARRAS = " karras"


def _norm(name: str) -> str:
    return " ".join(name.split()).casefold()


def sampler_alias(sampler: str | None, schedule: str | None, compatible: list[str]) -> tuple[str | None, list[str]]:
    """A1111's sampler + schedule → a scheduler name ``shared.schedulers.resolve`` takes, and warnings.

    ``None`` sampler: the model's own scheduler. A diffusers class name passes through (schedule automatic)."""
    warnings: list[str] = []
    schedule = _norm(schedule or "automatic")
    if schedule not in SCHEDULES:
        known = ", ".join(SCHEDULES)
        what = "is not supported" if schedule in OTHER_SCHEDULES else "is not a known schedule"
        raise InvalidValue(f"`scheduler` {schedule!r} {what}; use one of {known}", param="scheduler")
    if not sampler or not sampler.strip():
        return None, warnings
    if sampler in compatible:
        if schedule != "automatic":
            raise InvalidValue(
                f"`scheduler` {schedule!r} with a diffusers class name; name an A1111 sampler, or use automatic",
                param="scheduler",
            )
        return sampler, warnings
    name = " ".join(sampler.split())
    legacy_karras = _norm(name).endswith(KARRAS)
    base = name[: -len(KARRAS)] if legacy_karras else name
    by_norm = {_norm(a.name): a.name for a in schedulers.ALIASES}
    canonical = by_norm.get(_norm(base))
    if canonical is None:
        raise InvalidValue(
            f"`sampler_name` {sampler!r} is not supported; GET {PREFIX}/samplers lists the ones that are",
            param="sampler_name",
        )
    if schedule == "automatic":
        effective = "karras" if legacy_karras else DEFAULT_SCHEDULE.get(canonical, "uniform")
        if effective not in SCHEDULES:
            warnings.append(
                f"scheduler automatic is {effective} for {canonical} in A1111; Triptych cannot build that schedule "
                f"and uses uniform sigmas"
            )
            effective = "uniform"
    else:
        effective = schedule
    alias = canonical + " Karras" if effective == "karras" else canonical
    if _norm(alias) not in by_norm:
        raise InvalidValue(
            f"`scheduler` karras is not available for sampler {canonical!r}; use uniform or automatic",
            param="scheduler",
        )
    return by_norm[_norm(alias)], warnings


def samplers_body(compatible: list[str]) -> list[dict[str, Any]]:
    """``GET /sdapi/v1/samplers``: A1111 ≥ 1.9 shape, one entry per sampler (the Karras variants are a schedule)."""
    allowed = set(compatible)
    out = []
    for alias in schedulers.ALIASES:
        if alias.cls not in allowed or _norm(alias.name).endswith(KARRAS):
            continue
        options = {"scheduler": DEFAULT_SCHEDULE[alias.name]} if alias.name in DEFAULT_SCHEDULE else {}
        out.append({"name": alias.name, "aliases": [alias.cls], "options": options})
    return out


def schedulers_body() -> list[dict[str, Any]]:
    return [
        {"name": name, "label": label, "aliases": None, "default_rho": 7.0 if name == "karras" else -1.0,
         "need_inner_model": False}
        for name, label in SCHEDULES.items()
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------ prompts
#: A1111's extra-network tag ``<kind:name[:arg...]>`` (``modules.extra_networks.re_extra_net``).
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


def parse_extra_networks(prompt: str) -> tuple[str, list[LoraSpec], list[str]]:
    """Cut ``<lora:name[:weight[:unet_weight]]>`` tags out of ``prompt`` (replaced by nothing, as A1111 does):
    the prompt left, the LoRAs, warnings. Other extra networks (hypernetworks) are cut out with a warning."""
    loras: dict[str, float] = {}
    warnings: list[str] = []

    def cut(match: re.Match[str]) -> str:
        kind, args = match.group(1).lower(), match.group(2).split(":")
        if kind not in ("lora", "lyco"):
            warnings.append(f"<{kind}:...> is not supported and was removed from the prompt")
            return ""
        name = args[0].strip()
        weight = 1.0
        if len(args) > 1 and args[1].strip():
            try:
                weight = float(args[1])
            except ValueError:
                raise InvalidValue(f"`prompt`: <lora:{name}:{args[1]}> has a weight that is not a number",
                                   param="prompt") from None  # fmt: skip
        if len(args) > 2 and args[2].strip() and args[2].strip() != args[1].strip():
            warnings.append(f"<lora:{name}>: a separate UNet weight is not supported; {weight} applies to both")
        loras[name] = loras.get(name, 0.0) + weight  # the same LoRA twice: A1111 adds its weights too
        return ""

    rest = EXTRA_NETWORK.sub(cut, prompt)
    specs = []
    for name, weight in loras.items():
        try:
            specs.append(LoraSpec(name=name, weight=weight))
        except ValidationError as exc:
            raise InvalidValue(f"`prompt`: <lora:{name}:{weight}>: {exc.errors()[0]['msg']}", param="prompt") from None
    return rest, specs, warnings


# ------------------------------------------------------------------------------------------ request models
class A1111Txt2Img(BaseModel):
    """The fields of A1111's ``StableDiffusionTxt2ImgProcessingAPI`` that Triptych reads; the others are kept
    (``extra="allow"``) and checked by ``_ignored``."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(default="", max_length=8192)
    negative_prompt: str | None = Field(default="", max_length=8192)
    styles: list[str] | None = None
    seed: int | None = Field(default=-1, ge=-1, le=MAX_SEED)
    subseed: int | None = -1
    subseed_strength: float | None = 0.0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = Field(default=None, max_length=128)
    sampler_index: str | None = Field(default=None, max_length=128)
    scheduler: str | None = Field(default=None, max_length=64)
    batch_size: int = Field(default=1, ge=1, le=64)
    n_iter: int = Field(default=1, ge=1, le=64)
    steps: int = Field(default=50, ge=1)
    cfg_scale: float = Field(default=7.0, ge=0.0, le=100.0, allow_inf_nan=False)
    width: int = Field(default=512, ge=0)
    height: int = Field(default=512, ge=0)
    restore_faces: bool | None = None
    tiling: bool | None = None
    eta: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] | None = None
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] | None = None
    enable_hr: bool = False
    refiner_checkpoint: str | None = None


class A1111Img2Img(A1111Txt2Img):
    init_images: list[str] | None = None
    mask: str | None = None
    denoising_strength: float = Field(default=0.75, ge=0.0, le=1.0, allow_inf_nan=False)
    resize_mode: int = 0
    mask_blur: int | None = None
    mask_blur_x: int | None = None
    mask_blur_y: int | None = None
    inpainting_fill: int = 0
    inpaint_full_res: bool | int = True
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    include_init_images: bool = False


#: Fields that change nothing in Triptych and need no warning (bookkeeping, or what the mapped ones imply).
QUIET = {
    "do_not_save_samples", "do_not_save_grid", "override_settings_restore_afterwards", "script_args",
    "sampler_index", "denoising_strength", "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler",
    "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name",
    "hr_scheduler", "hr_prompt", "hr_negative_prompt", "image_cfg_scale", "inpaint_full_res_padding",
    "disable_extra_networks", "comments", "infotext", "force_task_id", "refiner_switch_at", "user",
    "latent_mask", "firstpass_image", "sampler", "do_not_reload_embeddings", "save_images", "send_images",
}  # fmt: skip

#: (field, value that means "off") for the fields we ignore: a warning when a request sets anything else.
OFF: tuple[tuple[str, Any], ...] = (
    ("styles", ([], None)),
    ("subseed_strength", (0, 0.0, None)),
    ("seed_resize_from_h", (-1, 0, None)),
    ("seed_resize_from_w", (-1, 0, None)),
    ("restore_faces", (False, None)),
    ("tiling", (False, None)),
    ("s_churn", (0, 0.0, None)),
    ("s_tmin", (0, 0.0, None)),
    ("s_tmax", (0, 0.0, None, float("inf"))),
    ("s_noise", (1, 1.0, None)),
    ("enable_hr", (False,)),
    ("refiner_checkpoint", (None, "", "None")),
    ("initial_noise_multiplier", (1, 1.0, None)),
    ("include_init_images", (False,)),
)


@dataclass
class Translated:
    """An A1111 request as one of ours, plus what the A1111 answer needs."""

    req: Txt2ImgRequest
    warnings: list[str]
    a1111: A1111Txt2Img
    sampler_name: str | None
    scheduler: str


# ------------------------------------------------------------------------------------------ scopes
@dataclass
class Run:
    """One running A1111 generation of a scope: what ``/progress`` shows and ``/interrupt`` stops."""

    task: asyncio.Task[Generation] | None = None
    started: float = field(default_factory=time.monotonic)
    timestamp: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y%m%d%H%M%S"))
    step: int = 0
    steps: int = 0
    preview: torch.Tensor | None = None
    interrupted: bool = False
    skipped: bool = False


@dataclass
class Scope:
    checkpoint: str | None = None  # a UNet variant's name; None: the base UNet
    runs: list[Run] = field(default_factory=list)


class Scopes:
    """Per-scope state, the least recently used forgotten past ``MAX_SCOPES`` (idle ones only)."""

    def __init__(self) -> None:
        self._scopes: OrderedDict[str, Scope] = OrderedDict()

    def get(self, key: str) -> Scope:
        scope = self._scopes.get(key)
        if scope is None:
            scope = self._scopes[key] = Scope()
            while len(self._scopes) > MAX_SCOPES:
                oldest, old = next(iter(self._scopes.items()))
                if old.runs:
                    break
                del self._scopes[oldest]
        self._scopes.move_to_end(key)
        return scope


# ------------------------------------------------------------------------------------------ helpers
def short_hash(fingerprint: str | None) -> str:
    return (fingerprint or "")[:10]


def title(entry: dict[str, Any]) -> str:
    """A1111's checkpoint title: ``name [shorthash]``."""
    fp = short_hash(entry.get("fingerprint"))
    return f"{entry['name']} [{fp}]" if fp else str(entry["name"])


def _strip_hash(name: str) -> str:
    return re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", name.strip())


def png_b64(array: Any) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return pybase64.b64encode(buf.getvalue()).decode("ascii")


def invert_mask(data: str) -> str:
    """A base64 (or data: URL) mask, inverted, as base64 PNG (``inpainting_mask_invert``)."""
    raw = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        image = Image.open(io.BytesIO(pybase64.b64decode(raw, validate=False)))
        image.load()
    except Exception:
        raise InvalidValue("`mask` is not a PNG, JPEG or WEBP image in base64", param="mask") from None
    out = io.BytesIO()
    ImageOps.invert(image.convert("L")).save(out, format="PNG")
    return pybase64.b64encode(out.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------------------ the routes
def install_a1111(app: FastAPI, settings: Settings) -> None:
    """A1111's ``/sdapi/v1`` routes and the ControlNet extension's ``/controlnet/*`` routes on central."""
    keyed = bool(settings.api_keys.get_secret_value())
    scopes = Scopes()
    app.state.a1111_scopes = scopes

    def orch_of(request: Request) -> Orchestrator:
        orchestrator: Orchestrator = request.app.state.orchestrator
        return orchestrator

    def scope_of(request: Request) -> Scope:
        return scopes.get(owner_of(request, keyed))

    async def body_of(request: Request, model: type[A1111Txt2Img]) -> A1111Txt2Img:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise UnsupportedMediaType(f"Content-Type must be application/json, got {content_type or 'none'}")
        # Images arrive as base64 in the JSON body: up to two images and ControlNet units.
        raw = await read_body(request, settings.max_json_body_bytes + 6 * settings.max_image_bytes)
        if not raw:
            raise MalformedRequest("request body is empty; send a JSON object")
        return validated_json(model, raw)

    async def variants(orch: Orchestrator) -> dict[str, dict[str, Any]]:
        catalog = await orch.models()
        return {"base": catalog["base"], **{v["name"]: v for v in catalog["variants"]}}

    async def checkpoint_named(orch: Orchestrator, name: str, param: str) -> str:
        """A variant's name from what A1111 clients send: its title ``name [hash]``, its name, any case."""
        found = await variants(orch)
        wanted = _strip_hash(str(name)).casefold()
        for key, entry in found.items():
            if wanted in (key.casefold(), title(entry).casefold(), _strip_hash(title(entry)).casefold()):
                return key
        raise InvalidValue(
            f"`{param}` {str(name)[:100]!r} is not hosted; available: {', '.join(title(e) for e in found.values())}",
            param=param,
        )

    async def controlnet_specs(
        orch: Orchestrator, scripts: dict[str, Any] | None, init_image: str | None, warnings: list[str]
    ) -> list[ControlNetSpec]:
        if not scripts:
            return []
        for name, script in scripts.items():
            if name.casefold() == "controlnet":
                continue
            args = script.get("args") if isinstance(script, dict) else None
            if isinstance(args, list) and args and args[0] not in (False, None, {}):
                warnings.append(f"alwayson_scripts.{name} is not supported and was ignored")
        unit_lists = [s for n, s in scripts.items() if n.casefold() == "controlnet"]
        if not unit_lists:
            return []
        args = unit_lists[0].get("args", []) if isinstance(unit_lists[0], dict) else []
        if not isinstance(args, list):
            raise InvalidValue("`alwayson_scripts.ControlNet.args` must be a list of units", param="alwayson_scripts")
        hosted = {c["name"] for c in (await orch.models())["controlnets"]}
        specs = []
        for i, unit in enumerate(args):
            param = f"alwayson_scripts.ControlNet.args.{i}"
            if not isinstance(unit, dict) or not unit.get("enabled", True):
                continue
            model = _strip_hash(str(unit.get("model") or "None"))
            if model in ("None", ""):
                continue
            if model not in hosted:
                raise NotFound(
                    f"`{param}.model` {model[:100]!r} is not hosted; available: {', '.join(sorted(hosted)) or 'none'}",
                    param=f"{param}.model",
                )
            module = str(unit.get("module") or "none").casefold()
            if module not in ("none", "canny"):
                raise InvalidValue(f"`{param}.module` {module[:60]!r} is not supported; use none or canny",
                                   param=f"{param}.module")  # fmt: skip
            image = unit.get("image") or unit.get("input_image")
            if isinstance(image, dict):  # the extension's {"image": ..., "mask": ...}
                image = image.get("image")
            if not image:
                if init_image is None:
                    raise InvalidValue(f"`{param}.image` is required in txt2img", param=f"{param}.image")
                image = init_image
            for key, off in (("resize_mode", ("Just Resize", "Resize and Fill", "Crop and Resize", 0, 1, 2, None)),
                             ("control_mode", ("Balanced", 0, None)), ("pixel_perfect", (False, None)),
                             ("mask", (None, ""))):  # fmt: skip
                if unit.get(key, None) not in off:
                    warnings.append(f"{param}.{key} {unit.get(key)!r} is not supported and was ignored")
            try:
                extra: dict[str, Any] = {}
                if module == "canny":
                    extra = {"low_threshold": int(unit.get("threshold_a") or 100),
                             "high_threshold": int(unit.get("threshold_b") or 200)}  # fmt: skip
                specs.append(
                    ControlNetSpec(
                        name=model,
                        image=image,
                        scale=float(unit.get("weight", 1.0)),
                        start=float(unit.get("guidance_start", 0.0)),
                        end=float(unit.get("guidance_end", 1.0)),
                        preprocessor=module,  # type: ignore[arg-type]
                        **extra,
                    )
                )
            except (ValidationError, TypeError, ValueError) as exc:
                errors = exc.errors(include_url=False) if isinstance(exc, ValidationError) else []
                msg = str(errors[0].get("msg")) if errors else str(exc)
                raise InvalidValue(f"`{param}`: {msg}", param=param) from None
        return specs

    async def translate(request: Request, orch: Orchestrator, a: A1111Txt2Img, scope: Scope) -> Translated:
        warnings: list[str] = []
        data = a.model_dump()
        extras = a.model_extra or {}
        for key, off in OFF:
            value = data.get(key, extras.get(key))
            if key in data and value not in off:
                warnings.append(f"{key} {value!r} is not supported and was ignored")
        for key, value in extras.items():
            if key not in QUIET and value not in (None, False, 0, "", [], {}):
                warnings.append(f"{key} is not supported and was ignored")
        if a.script_name not in (None, "", "None"):
            raise InvalidValue(f"`script_name` {a.script_name[:60]!r}: scripts are not supported", param="script_name")
        # The UNet: override_settings.sd_model_checkpoint, else the scope's choice (POST /options).
        model = scope.checkpoint
        overrides = dict(a.override_settings or {})
        if "sd_model_checkpoint" in overrides:
            model = await checkpoint_named(orch, overrides.pop("sd_model_checkpoint"), "override_settings")
        for key in overrides:
            warnings.append(f"override_settings.{key} is not supported and was ignored")
        compatible = [entry["name"] for entry in await orch.schedulers(model if model != "base" else None)]
        sampler = a.sampler_name or a.sampler_index
        scheduler, more = sampler_alias(sampler, a.scheduler, compatible)
        warnings += more
        if scheduler is not None:
            cls, _ = schedulers.resolve(scheduler, compatible)
            eta = a.eta
            if eta is not None:
                if cls in ANCESTRAL and eta != 1.0:
                    warnings.append(f"eta {eta} is not supported; ancestral samplers run with eta 1")
                elif cls == "DDIMScheduler" and eta != 0.0:
                    warnings.append(f"eta {eta} is not supported; DDIM runs with eta 0, as the native endpoints")
        prompt, loras, more = parse_extra_networks(a.prompt)
        warnings += more
        seed = a.seed if a.seed is not None and a.seed >= 0 else secrets.randbelow(2**31)
        init: str | None = None
        if isinstance(a, A1111Img2Img):
            if not a.init_images:
                raise InvalidValue("`init_images` needs one image", param="init_images")
            init = a.init_images[0]  # raw base64 or a data: URL: our decoder takes both
            if len(a.init_images) > 1:
                warnings.append("init_images: only the first image is used")
        controlnets = await controlnet_specs(orch, a.alwayson_scripts, init, warnings)
        fields: dict[str, Any] = {
            "prompt": prompt or "-",  # replaced below: an empty prompt is valid in A1111 (and in diffusers)
            "negative_prompt": a.negative_prompt or None,
            "width": a.width or None,
            "height": a.height or None,
            "num_inference_steps": a.steps,
            "guidance_scale": a.cfg_scale,
            "scheduler": scheduler,
            "seed": seed,
            "num_images": a.batch_size * a.n_iter,
            "model": None if model in (None, "base") else model,
            "loras": loras,
            "controlnets": controlnets,
        }
        task: type[Txt2ImgRequest] = Txt2ImgRequest
        if isinstance(a, A1111Img2Img):
            fields["image"] = init
            fields["strength"] = a.denoising_strength
            if a.denoising_strength <= 0.0:
                raise InvalidValue("`denoising_strength` must be above 0", param="denoising_strength")
            if a.resize_mode not in (0,):
                warnings.append(f"resize_mode {a.resize_mode} is not supported; the image was resized to fit (0)")
            if a.mask:
                task = InpaintRequest
                fields["mask_image"] = (
                    await run_in_threadpool(invert_mask, a.mask) if a.inpainting_mask_invert else a.mask
                )
                if a.inpainting_fill != 1:
                    warnings.append(
                        f"inpainting_fill {a.inpainting_fill} is not supported; the masked area starts from the "
                        "original image (1, as diffusers' inpaint pipeline)"
                    )
                if a.inpaint_full_res:
                    warnings.append("inpaint_full_res (only masked) is not supported; the whole picture is inpainted")
                blur = [b for b in (a.mask_blur, a.mask_blur_x, a.mask_blur_y) if b]
                if blur:
                    warnings.append(f"mask_blur {blur[0]} is not supported; the mask is used as sent")
            else:
                task = Img2ImgRequest
        try:
            req = task.model_validate(fields)
        except ValidationError as exc:
            raise validation_error(exc.errors(include_url=False)) from None
        if not prompt:
            req = req.model_copy(update={"prompt": prompt})
        return Translated(req, warnings, a, sampler, _norm(a.scheduler or "automatic"))

    def info_of(t: Translated, gen: Generation | None, seed: int, interrupted: bool, model: str) -> dict[str, Any]:
        p = gen.parameters if gen is not None else {}
        n = t.req.num_images
        seeds = gen.seeds if gen is not None else [seed + i for i in range(n)]
        a = t.a1111
        negative = a.negative_prompt or ""
        return {
            "prompt": a.prompt,
            "all_prompts": [a.prompt] * n,
            "negative_prompt": negative,
            "all_negative_prompts": [negative] * n,
            "seed": seeds[0],
            "all_seeds": seeds,
            "subseed": -1,
            "all_subseeds": [-1] * n,
            "subseed_strength": 0,
            "width": p.get("width", t.req.width),
            "height": p.get("height", t.req.height),
            "sampler_name": t.sampler_name,
            "scheduler": t.scheduler,
            "cfg_scale": t.req.guidance_scale,
            "steps": t.req.num_inference_steps,
            "batch_size": a.batch_size,
            "n_iter": a.n_iter,
            "restore_faces": False,
            "sd_model_name": model,
            "denoising_strength": getattr(t.req, "strength", None),
            "extra_generation_params": {
                "Lora": {spec.name: spec.weight for spec in t.req.loras},
                "Triptych scheduler": p.get("scheduler_class"),
            },
            "index_of_first_image": 0,
            "infotexts": [],
            "styles": [],
            "job_timestamp": datetime.now(UTC).strftime("%Y%m%d%H%M%S"),
            "clip_skip": 1,
            "is_using_inpainting_conditioning": False,
            "interrupted": interrupted,
            "warnings": t.warnings,
            "triptych": {k: v for k, v in p.items() if k not in ("controlnets",)} if p else None,
        }

    slots = generation_slots(app, settings)  # the native routes' bound

    async def generate(request: Request, model: type[A1111Txt2Img]) -> Response:
        with slots.admitted():
            return await _generate(request, orch_of(request), model)

    async def _generate(request: Request, orch: Orchestrator, model: type[A1111Txt2Img]) -> Response:
        a = await body_of(request, model)
        scope = scope_of(request)
        t = await translate(request, orch, a, scope)
        run = Run()

        def on_progress(event: dict[str, Any]) -> None:
            run.step, run.steps = int(event["step"]), int(event["steps"])
            preview = event.get("preview")
            if isinstance(preview, torch.Tensor) and preview.ndim == 4:
                run.preview = preview

        run.task = asyncio.ensure_future(
            orch.generate(t.req, on_progress=on_progress, preview_every=settings.jobs_preview_every)
        )
        scope.runs.append(run)

        async def wait() -> Generation | None:
            assert run.task is not None
            try:
                return await asyncio.shield(run.task)
            except asyncio.CancelledError:
                if run.interrupted and run.task.done():
                    return None
                run.task.cancel()  # the caller went away, or the server stops
                raise
            except TriptychError:
                if run.interrupted:  # however the stopped hop ended, an interrupt is an interrupt
                    return None
                raise

        try:
            waited = asyncio.ensure_future(wait())
            gen = await unless_disconnected(request, waited)
            if gen is None and not run.interrupted:
                return Response(status_code=499)
        finally:
            if run in scope.runs:
                scope.runs.remove(run)
        model_name = t.req.model or "base"
        if gen is None:
            info = info_of(t, None, t.req.seed or 0, True, model_name)
            return a1111_response([], a, info)
        images = await run_in_threadpool(encode_images, gen.images, "png") if a.send_images else []
        info = info_of(t, gen, gen.seeds[0], False, str(gen.parameters.get("model", model_name)))
        return a1111_response([pybase64.b64encode(f).decode("ascii") for f in images], a, info)

    def a1111_response(images: list[str], a: A1111Txt2Img, info: dict[str, Any]) -> Response:
        parameters = a.model_dump()
        for key in ("init_images", "mask"):
            if key in parameters:
                parameters[key] = None
        scripts = parameters.get("alwayson_scripts") or {}
        for script in scripts.values():  # ControlNet images: not echoed back
            for unit in script.get("args", []) if isinstance(script, dict) else []:
                if isinstance(unit, dict) and "image" in unit:
                    unit["image"] = None
        return json_response({"images": images, "parameters": parameters, "info": json.dumps(info)})

    @app.post(f"{PREFIX}/txt2img", summary="A1111: text to image", tags=["A1111"])
    async def txt2img(request: Request) -> Response:
        return await generate(request, A1111Txt2Img)

    @app.post(f"{PREFIX}/img2img", summary="A1111: image to image; with `mask`, inpainting", tags=["A1111"])
    async def img2img(request: Request) -> Response:
        return await generate(request, A1111Img2Img)

    @app.get(f"{PREFIX}/progress", summary="A1111: the caller's running generation (scoped)", tags=["A1111"])
    async def progress(request: Request, skip_current_image: bool = False) -> Response:
        scope = scope_of(request)
        run = scope.runs[0] if scope.runs else None
        state = {
            "skipped": bool(run and run.skipped),
            "interrupted": bool(run and run.interrupted),
            "stopping_generation": False,
            "job": f"triptych-{run.timestamp}" if run else "",
            "job_count": len(scope.runs),
            "job_timestamp": run.timestamp if run else "0",
            "job_no": 0,
            "sampling_step": run.step if run else 0,
            "sampling_steps": run.steps if run else 0,
        }
        if run is None or run.steps == 0:
            body: dict[str, Any] = {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
                                    "textinfo": "Waiting..." if run else None}  # fmt: skip
            return json_response(body)
        fraction = min(1.0, run.step / run.steps)
        elapsed = time.monotonic() - run.started
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        image = None
        if run.preview is not None and not skip_current_image:
            image = await run_in_threadpool(png_b64, run.preview[0].numpy())
        return json_response({"progress": fraction, "eta_relative": eta, "state": state, "current_image": image,
                              "textinfo": f"step {run.step}/{run.steps}"})  # fmt: skip

    async def optional_object(request: Request) -> dict[str, Any]:
        """A body that may be absent (webuiapi's bodyless POSTs: no Content-Type, no bytes); when there is one it
        must be a JSON object, as every other POST route of central wants."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type and content_type != "application/json":
            raise UnsupportedMediaType(f"Content-Type must be application/json (or no body), got {content_type}")
        raw = await read_body(request, settings.max_json_body_bytes)
        if not content_type and not raw.strip():
            return {}
        return json_object(raw)

    async def stop(request: Request, *, skip: bool) -> Response:
        await optional_object(request)
        for run in scope_of(request).runs:
            if run.task is not None and not run.task.done():
                run.interrupted = True
                run.skipped = skip
                run.task.cancel()  # the UNet drops the job before its next step
        return json_response({})

    @app.post(f"{PREFIX}/interrupt", summary="A1111: stop the caller's generations (scoped)", tags=["A1111"])
    async def interrupt(request: Request) -> Response:
        return await stop(request, skip=False)

    @app.post(f"{PREFIX}/skip", summary="A1111: as interrupt (one generation holds the whole batch)", tags=["A1111"])
    async def skip(request: Request) -> Response:
        return await stop(request, skip=True)

    @app.get(f"{PREFIX}/sd-models", summary="A1111: the base UNet and its variants", tags=["A1111"])
    async def sd_models(request: Request) -> Response:
        found = await variants(orch_of(request))
        return json_response([
            {"title": title(e), "model_name": name, "hash": short_hash(e.get("fingerprint")),
             "sha256": e.get("fingerprint"), "filename": name, "config": None}
            for name, e in found.items()
        ])  # fmt: skip

    @app.get(f"{PREFIX}/options", summary="A1111: options; sd_model_checkpoint is the caller's", tags=["A1111"])
    async def get_options(request: Request) -> Response:
        found = await variants(orch_of(request))
        chosen = found.get(scope_of(request).checkpoint or "base", found["base"])
        return json_response({
            "sd_model_checkpoint": title(chosen),
            "sd_checkpoint_hash": chosen.get("fingerprint"),
            "samples_format": "png",
            "eta_ddim": 0.0,
            "eta_ancestral": 1.0,
            "CLIP_stop_at_last_layers": 1,
            "sd_vae": "Automatic",
            "show_progress_every_n_steps": settings.jobs_preview_every,
            "live_previews_enable": True,
            "live_previews_image_format": "png",
        })  # fmt: skip

    @app.post(f"{PREFIX}/options", summary="A1111: set sd_model_checkpoint for the caller", tags=["A1111"])
    async def set_options(request: Request) -> Response:
        data = await optional_object(request)
        if data.get("sd_model_checkpoint") is not None:
            name = await checkpoint_named(orch_of(request), data["sd_model_checkpoint"], "sd_model_checkpoint")
            scope_of(request).checkpoint = name
        return json_response(None)

    @app.get(f"{PREFIX}/samplers", summary="A1111: samplers (diffusers schedulers by A1111 name)", tags=["A1111"])
    async def samplers(request: Request) -> Response:
        entries = await orch_of(request).schedulers()
        return json_response(samplers_body([e["name"] for e in entries]))

    @app.get(f"{PREFIX}/schedulers", summary="A1111 ≥ 1.9: noise schedules", tags=["A1111"])
    async def schedules() -> Response:
        return json_response(schedulers_body())

    @app.get(f"{PREFIX}/loras", summary="A1111: LoRAs for <lora:name:weight> tags", tags=["A1111"])
    async def loras(request: Request) -> Response:
        catalog = await orch_of(request).models()
        return json_response([
            {"name": e["name"], "alias": e["name"], "path": f"{e['name']}.safetensors",
             "metadata": {"fingerprint": e["fingerprint"], "stages": e["stages"]}}
            for e in catalog["loras"]
        ])  # fmt: skip

    @app.get(f"{PREFIX}/embeddings", summary="A1111: textual-inversion embeddings", tags=["A1111"])
    async def embeddings(request: Request) -> Response:
        te, _, _ = await orch_of(request).infos()
        width = te.config.get("hidden_size")
        loaded = {token: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": width,
                          "vectors": None, "fingerprint": fp}
                  for token, fp in sorted(te.config.get("embeddings", {}).items())}  # fmt: skip
        skipped = {token: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                           "vectors": None, "reason": why}
                   for token, why in sorted(te.config.get("embeddings_skipped", {}).items())}  # fmt: skip
        return json_response({"loaded": loaded, "skipped": skipped})

    @app.get(f"{PREFIX}/scripts", summary="A1111: scripts (the ControlNet extension when ControlNets are hosted)",
             tags=["A1111"])  # fmt: skip
    async def scripts(request: Request) -> Response:
        catalog = await orch_of(request).models()
        # "controlnet m2m" is what webuiapi looks for to know the extension is there.
        names = ["controlnet", "controlnet m2m"] if catalog["controlnets"] else []
        return json_response({"txt2img": names, "img2img": names})

    @app.get("/controlnet/model_list", summary="ControlNet extension: the ControlNets", tags=["A1111"])
    async def controlnet_models(request: Request) -> Response:
        catalog = await orch_of(request).models()
        return json_response({"model_list": [title(e) for e in catalog["controlnets"]]})

    @app.get("/controlnet/module_list", summary="ControlNet extension: the preprocessors", tags=["A1111"])
    async def controlnet_modules() -> Response:
        return json_response({"module_list": ["none", "canny"], "module_detail": {
            "none": {"model_free": False, "sliders": []},
            "canny": {"model_free": False, "sliders": [
                {"name": "Canny Low Threshold", "value": 100, "min": 1, "max": 255},
                {"name": "Canny High Threshold", "value": 200, "min": 1, "max": 255}]},
        }})  # fmt: skip

    @app.get("/controlnet/version", summary="ControlNet extension: API version", tags=["A1111"])
    async def controlnet_version() -> Response:
        return json_response({"version": 2})
