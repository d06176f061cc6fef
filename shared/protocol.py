"""Pydantic models for every boundary: central's JSON API and the three stages' msgpack APIs.

Field names follow diffusers (``prompt_embeds``, ``num_inference_steps``, ``guidance_scale``, ...). Stage
messages carry tensors as ``torch.Tensor`` values; ``shared.wire`` turns them into bytes. Each model owns
its cross-field checks, so a transport (HTTP or in-process) only has to call ``model_validate``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError, model_validator

from shared import wire
from shared.errors import InvalidValue, MalformedRequest, PayloadTooLarge, validation_error

API_VERSION = "v1"
MAX_SEED = 2**63 - 1
MAX_PROMPTS = 64


def _tensor(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"expected a tensor (msgpack ext type 1), got {type(value).__name__}")
    return value


Tensor = Annotated[torch.Tensor, PlainValidator(_tensor)]


def _invalid(message: str) -> InvalidValue:
    """A cross-field error as a 422 naming the first field the message mentions."""
    named = re.search(r"`(\w+)`", message)
    return InvalidValue(message, param=named.group(1) if named else None)


M = TypeVar("M", bound=BaseModel)


def parse_message(body: bytes, model: type[M], limits: wire.Limits = wire.DEFAULT_LIMITS) -> M:
    """msgpack bytes -> a validated ``model``; every failure is a 400, 413 or 422 (``TriptychError``)."""
    try:
        message = wire.decode(body, limits)
    except wire.WireError as exc:
        raise (PayloadTooLarge if exc.too_large else MalformedRequest)(str(exc)) from None
    if not isinstance(message, dict):
        raise MalformedRequest(f"message must be a msgpack map, got {type(message).__name__}")
    try:
        return model.model_validate(message)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False)) from None


class WireModel(BaseModel):
    """Base for stage messages: tensors allowed, unknown fields refused (a typo must not pass silently)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class StageRequest(WireModel):
    """A request to a stage operation. ``batch_size`` (images, or prompts for the text encoder) and
    ``denoising_steps`` feed the stages' metrics."""

    @property
    def batch_size(self) -> int:
        raise NotImplementedError

    @property
    def denoising_steps(self) -> int:
        """Denoising iterations the request runs (0 for every stage but the UNet)."""
        return 0


def _float_tensor(ndim: int) -> Callable[[Any], torch.Tensor]:
    """A tensor field that must be float32/float16/bfloat16 with ``ndim`` dimensions and some elements.

    Checked per field so a 422 names the field (``param``); cross-field checks raise InvalidValue directly.
    """

    def check(value: Any) -> torch.Tensor:
        t = _tensor(value)
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"must be float32, float16 or bfloat16, got {str(t.dtype).removeprefix('torch.')}")
        if t.dim() != ndim:
            raise ValueError(f"must have {ndim} dimensions, got shape {list(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"is empty (shape {list(t.shape)})")
        if not finite(t):
            raise ValueError("has NaN or infinite values")
        return t

    return check


def finite(t: torch.Tensor) -> bool:
    """Whether every value of a float tensor is finite (one pass; embeddings and latents are small)."""
    return bool(torch.isfinite(t).all())


Embeds = Annotated[torch.Tensor, PlainValidator(_float_tensor(3))]
Latents = Annotated[torch.Tensor, PlainValidator(_float_tensor(4))]


# ----------------------------------------------------------------------------------------- adapters
MAX_LORAS = 8
#: What an adapter name (a file stem) may be, SPEC §10: no separators, no "..", no leading dot.
ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class LoraSpec(BaseModel):
    """One LoRA of a request: a file stem in ``TRIPTYCH_LORA_DIR`` and its weight (``set_adapters``' weight)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=ADAPTER_NAME, description="The file's stem.")
    weight: float = Field(default=1.0, ge=-10.0, le=10.0, allow_inf_nan=False)


Loras = Annotated[list[LoraSpec], Field(max_length=MAX_LORAS)]


def _unique_loras(loras: list[LoraSpec]) -> None:
    names = [lora.name for lora in loras]
    if len(set(names)) != len(names):
        raise _invalid(f"`loras` names a LoRA more than once: {names}")


MAX_CONTROLNETS = 4


def _check_window(start: float, end: float) -> None:
    """``control_guidance_start`` / ``_end`` as ``StableDiffusionControlNetPipeline.check_inputs`` wants them.
    A ValueError, so the 422 names the ControlNet's place in the list (``controlnets.1``)."""
    if start >= end:
        raise ValueError(f"start ({start}) must be smaller than end ({end})")


# ----------------------------------------------------------------------------------------- stage info
class ModelRef(BaseModel):
    id: str
    fingerprint: str


class StageInfo(BaseModel):
    """What a stage reports at ``GET /v1/info``; ``config`` holds what other stages must agree with."""

    stage: Literal["text_encoder", "diffusion_unet", "vae_decoder"]
    model: ModelRef
    config: dict[str, Any]
    device: str
    dtype: str
    version: str
    api_version: str = API_VERSION
    random_weights: bool = False


# ----------------------------------------------------------------------------------------- text encoder
class EncodeRequest(StageRequest):
    """Prompts to embed, as ``StableDiffusionPipeline.encode_prompt`` would."""

    prompt: list[Annotated[str, Field(max_length=8192)]] = Field(min_length=1, max_length=MAX_PROMPTS)
    negative_prompt: list[Annotated[str, Field(max_length=8192)]] | None = None
    do_classifier_free_guidance: bool = True
    loras: Loras = Field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return len(self.prompt)

    @model_validator(mode="after")
    def _check(self) -> EncodeRequest:
        _unique_loras(self.loras)
        if self.negative_prompt is not None and len(self.negative_prompt) != len(self.prompt):
            raise _invalid(
                f"`negative_prompt` has {len(self.negative_prompt)} entries but `prompt` has {len(self.prompt)}"
            )
        return self


class EncodeResponse(WireModel):
    """``prompt_embeds`` (P, L, D); ``negative_prompt_embeds`` too when guidance is on."""

    prompt_embeds: Embeds
    negative_prompt_embeds: Embeds | None = None
    encode_ms: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> EncodeResponse:
        if self.negative_prompt_embeds is not None and self.negative_prompt_embeds.shape != self.prompt_embeds.shape:
            raise _invalid("`negative_prompt_embeds` and `prompt_embeds` differ in shape")
        return self


# ----------------------------------------------------------------------------------------- UNet
class ImageConditioning(WireModel):
    """The init image of img2img and inpainting, as the VAE posterior's moments (unscaled, shape
    (1, C, h, w)), so the UNet draws every sample from the request's generators in exactly the pipeline's
    order; ``scaling_factor`` is the VAE's, applied to the samples as the pipelines do."""

    latent_mean: Latents
    latent_std: Latents
    strength: float = Field(gt=0.0, le=1.0, allow_inf_nan=False)
    scaling_factor: float = Field(gt=0.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _check(self) -> ImageConditioning:
        if self.latent_mean.shape != self.latent_std.shape or self.latent_mean.shape[0] != 1:
            raise _invalid(
                f"`latent_mean` and `latent_std` must both have shape (1, C, h, w), got "
                f"{list(self.latent_mean.shape)} and {list(self.latent_std.shape)}"
            )
        return self


class MaskConditioning(WireModel):
    """Inpainting: the pixel mask (uint8 (1, 1, H, W), 1 = repaint) and the moments of the masked image
    (``image * (mask < 0.5)``), as ``EncodeImageResponse`` returns them."""

    mask: Tensor
    masked_latent_mean: Latents
    masked_latent_std: Latents

    @model_validator(mode="after")
    def _check(self) -> MaskConditioning:
        m = self.mask
        if m.dtype != torch.uint8 or m.dim() != 4 or tuple(m.shape[:2]) != (1, 1):
            raise _invalid(f"`mask` must be uint8 (1, 1, H, W), got {str(m.dtype).removeprefix('torch.')} "
                           f"{list(m.shape)}")  # fmt: skip
        if self.masked_latent_mean.shape != self.masked_latent_std.shape or self.masked_latent_mean.shape[0] != 1:
            raise _invalid("`masked_latent_mean` and `masked_latent_std` must both have shape (1, C, h, w)")
        return self


class ControlNetConditioning(WireModel):
    """One ControlNet of a denoise request (``StableDiffusionControlNetPipeline``, SPEC §10): a name from
    ``TRIPTYCH_CONTROLNETS``; the control image as ``uint8`` RGB pixels (1, H, W, 3) at the request's
    ``height`` x ``width`` (the pixels the pipeline's control image processor holds after resizing; the UNet
    scales them to [0, 1] as that processor does); ``scale`` (``controlnet_conditioning_scale``) and the
    fraction of the steps it acts on, ``start`` to ``end`` (``control_guidance_start`` / ``_end``)."""

    name: str = Field(pattern=ADAPTER_NAME)
    image: Tensor
    scale: float = Field(default=1.0, ge=0.0, le=10.0, allow_inf_nan=False)
    start: float = Field(default=0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    end: float = Field(default=1.0, ge=0.0, le=1.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _check(self) -> ControlNetConditioning:
        _check_window(self.start, self.end)
        t = self.image
        if t.dtype != torch.uint8 or t.dim() != 4 or t.shape[0] != 1 or t.shape[-1] != 3 or t.numel() == 0:
            raise ValueError(f"image must be uint8 (1, H, W, 3), got {str(t.dtype).removeprefix('torch.')} "
                             f"{list(t.shape)}")  # fmt: skip
        return self


class DenoiseRequest(StageRequest):
    """Everything the denoise loop needs: embeddings, size, steps, guidance, scheduler and noise.

    Image ``i`` starts from noise drawn with ``torch.Generator("cpu").manual_seed(seeds[i])`` (SPEC §8);
    ``latents`` replaces that noise when given. Prompt ``p``'s embeddings serve images
    ``p * num_images_per_prompt`` up to ``(p + 1) * num_images_per_prompt - 1``. The task follows from the
    conditioning: none is text-to-image, ``image`` image-to-image, ``image`` and ``mask`` inpainting.
    """

    prompt_embeds: Embeds
    negative_prompt_embeds: Embeds | None = None
    num_images_per_prompt: int = Field(default=1, ge=1, le=64)
    height: int = Field(ge=1, le=8192)
    width: int = Field(ge=1, le=8192)
    num_inference_steps: int = Field(default=50, ge=1, le=1000)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=100.0, allow_inf_nan=False)
    eta: float = Field(default=0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    scheduler: str | None = Field(default=None, max_length=128)
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] | None = Field(default=None, max_length=4096)
    latents: Latents | None = None
    model: str | None = Field(default=None, max_length=128)
    image: ImageConditioning | None = None
    mask: MaskConditioning | None = None
    loras: Loras = Field(default_factory=list)
    controlnets: list[ControlNetConditioning] = Field(default_factory=list, max_length=MAX_CONTROLNETS)
    #: With a streamed answer (``wire.STREAM_CONTENT_TYPE``): a preview of the latents every N steps (0: none).
    preview_every: int = Field(default=0, ge=0, le=1000)

    @property
    def task(self) -> Literal["txt2img", "img2img", "inpaint"]:
        if self.mask is not None:
            return "inpaint"
        return "img2img" if self.image is not None else "txt2img"

    @property
    def batch_size(self) -> int:
        return int(self.prompt_embeds.shape[0]) * self.num_images_per_prompt

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def denoising_steps(self) -> int:
        """``num_inference_steps``, cut by ``strength`` as the img2img / inpaint pipelines do."""
        steps = self.num_inference_steps
        return steps if self.image is None else min(int(steps * self.image.strength), steps)

    @model_validator(mode="after")
    def _check(self) -> DenoiseRequest:
        _unique_loras(self.loras)
        if self.do_classifier_free_guidance:
            if self.negative_prompt_embeds is None:
                raise _invalid("`negative_prompt_embeds` is required when `guidance_scale` > 1")
            if self.negative_prompt_embeds.shape != self.prompt_embeds.shape:
                raise _invalid(
                    f"`negative_prompt_embeds` has shape {list(self.negative_prompt_embeds.shape)} but "
                    f"`prompt_embeds` has {list(self.prompt_embeds.shape)}"
                )
        if (self.seeds is None) == (self.latents is None):
            raise _invalid("give exactly one of `seeds` and `latents`")
        if self.seeds is not None and len(self.seeds) != self.batch_size:
            raise _invalid(f"`seeds` has {len(self.seeds)} entries; the batch has {self.batch_size} images")
        if self.latents is not None and self.latents.shape[0] != self.batch_size:
            raise _invalid(f"`latents` has {self.latents.shape[0]} images; the batch has {self.batch_size}")
        if self.mask is not None and self.image is None:
            raise _invalid("`mask` conditioning needs `image` conditioning (the init image's moments)")
        if self.image is not None and self.latents is not None:
            raise _invalid("`latents` cannot be combined with `image` conditioning; send `seeds`")
        return self


class DenoiseResponse(WireModel):
    latents: Latents
    scheduler: str
    denoise_ms: float = 0.0


# ----------------------------------------------------------------------------------------- VAE
class DecodeRequest(StageRequest):
    """Final latents (B, C, h, w), *unscaled* (the VAE stage divides by its own scaling factor)."""

    latents: Latents

    @property
    def batch_size(self) -> int:
        return int(self.latents.shape[0])


class EncodeImageRequest(StageRequest):
    """Images to encode, uint8 (B, H, W, 3) at their final size; ``mask`` (1, 1, H, W) uint8 0/1 adds the
    moments of ``image * (mask < 0.5)`` as the inpaint pipeline computes them. With ``seeds`` the stage also
    samples latents (scaled by the VAE's scaling factor), image ``i`` with generator ``seeds[i]``."""

    images: Tensor
    mask: Tensor | None = None
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] | None = Field(default=None, max_length=4096)

    @property
    def batch_size(self) -> int:
        return int(self.images.shape[0])

    @model_validator(mode="after")
    def _check(self) -> EncodeImageRequest:
        t = self.images
        if t.dtype != torch.uint8 or t.dim() != 4 or t.shape[-1] != 3 or t.numel() == 0:
            raise _invalid(f"`images` must be uint8 (B, H, W, 3), got {t.dtype} {list(t.shape)}")
        if self.mask is not None:
            m = self.mask
            if m.dtype != torch.uint8 or tuple(m.shape) != (1, 1, t.shape[1], t.shape[2]):
                raise _invalid(f"`mask` must be uint8 (1, 1, {t.shape[1]}, {t.shape[2]}), got {list(m.shape)}")
        if self.seeds is not None and len(self.seeds) != t.shape[0]:
            raise _invalid(f"`seeds` has {len(self.seeds)} entries for {t.shape[0]} images")
        return self


class EncodeImageResponse(WireModel):
    """The VAE posterior's ``latent_mean`` / ``latent_std`` (B, C, h, w), unscaled; ``masked_*`` with a mask;
    ``latents`` (scaled samples) when seeds were given."""

    latent_mean: Tensor
    latent_std: Tensor
    masked_latent_mean: Tensor | None = None
    masked_latent_std: Tensor | None = None
    latents: Tensor | None = None
    encode_ms: float = 0.0


class DecodeResponse(WireModel):
    """Images as ``uint8`` (B, H, W, 3), exactly what ``output_type="pil"`` would hold."""

    images: Tensor
    decode_ms: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> DecodeResponse:
        t = self.images
        if t.dtype != torch.uint8 or t.dim() != 4 or t.shape[-1] != 3:
            raise _invalid(f"`images` must be uint8 (B, H, W, 3), got {t.dtype} {list(t.shape)}")
        return self


# ----------------------------------------------------------------------------------------- central
ImageInput = Annotated[
    str | bytes,
    Field(description="PNG, JPEG or WEBP: base64 (optionally a data: URL) in JSON, or a file in multipart."),
]


class ControlNetSpec(BaseModel):
    """One ControlNet of a task request (SPEC §10), as ``StableDiffusionControlNetPipeline`` takes it: the
    control ``image``, ``scale`` (``controlnet_conditioning_scale``), ``start`` / ``end``
    (``control_guidance_start`` / ``_end``), and how central turns the image into the ControlNet's input."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=ADAPTER_NAME, description="A ControlNet of TRIPTYCH_CONTROLNETS.")
    image: ImageInput = Field(description="The control image; in multipart, the file `controlnet_image_<i>`.")
    scale: float = Field(default=1.0, ge=0.0, le=10.0, allow_inf_nan=False)
    start: float = Field(default=0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    end: float = Field(default=1.0, ge=0.0, le=1.0, allow_inf_nan=False)
    preprocessor: Literal["none", "canny"] = Field(
        default="none", description="none: the image is the control map; canny: OpenCV Canny edges of it."
    )
    low_threshold: int = Field(default=100, ge=0, le=2048, description="canny: cv2.Canny's first threshold.")
    high_threshold: int = Field(default=200, ge=0, le=2048, description="canny: cv2.Canny's second threshold.")

    @model_validator(mode="after")
    def _check(self) -> ControlNetSpec:
        _check_window(self.start, self.end)
        if self.low_threshold > self.high_threshold:
            raise ValueError(f"low_threshold ({self.low_threshold}) is above high_threshold ({self.high_threshold})")
        return self

    def parameters(self) -> dict[str, Any]:
        """What the response's ``parameters`` report: everything but the image."""
        out = self.model_dump(exclude={"image"})
        if self.preprocessor != "canny":
            del out["low_threshold"], out["high_threshold"]
        return out


class Txt2ImgRequest(BaseModel):
    """``POST /v1/txt2img``. Unset fields take ``StableDiffusionPipeline.__call__``'s defaults."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=8192, description="What to draw.")
    negative_prompt: str | None = Field(default=None, max_length=8192)
    width: int | None = Field(default=None, ge=8, description="Pixels; default: the model's native size.")
    height: int | None = Field(default=None, ge=8, description="Pixels; default: the model's native size.")
    num_inference_steps: int = Field(default=50, ge=1)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=100.0, allow_inf_nan=False)
    scheduler: str | None = Field(default=None, max_length=128, description="Diffusers class name.")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Image i uses seed + i.")
    num_images: int = Field(default=1, ge=1)
    output_format: Literal["png", "jpeg", "webp"] = "png"
    model: str | None = Field(default=None, max_length=128, description="UNet variant; default the base UNet.")
    loras: Loras = Field(
        default_factory=list, description="LoRAs from TRIPTYCH_LORA_DIR with weights, applied together."
    )
    controlnets: list[ControlNetSpec] = Field(
        default_factory=list,
        max_length=MAX_CONTROLNETS,
        description="ControlNets with their control images, applied together (text-to-image only).",
    )

    @model_validator(mode="after")
    def _check_loras(self) -> Txt2ImgRequest:
        _unique_loras(self.loras)
        return self


class Img2ImgRequest(Txt2ImgRequest):
    """``POST /v1/img2img``: StableDiffusionImg2ImgPipeline. Without width/height the output follows the image
    (rounded down to a multiple of 8, as diffusers does); with them the image is resized first."""

    image: ImageInput
    strength: float = Field(default=0.8, gt=0.0, le=1.0, allow_inf_nan=False)


class InpaintRequest(Txt2ImgRequest):
    """``POST /v1/inpaint``: StableDiffusionInpaintPipeline. White in ``mask_image`` is repainted."""

    image: ImageInput
    mask_image: ImageInput
    strength: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)


class OutpaintRequest(Txt2ImgRequest):
    """``POST /v1/outpaint``: extends the image by ``left``/``right``/``top``/``bottom`` pixels and inpaints
    the new border (the canvas is filled by repeating the edge pixels; the mask is white on the border)."""

    image: ImageInput
    left: int = Field(default=0, ge=0, le=4096)
    right: int = Field(default=0, ge=0, le=4096)
    top: int = Field(default=0, ge=0, le=4096)
    bottom: int = Field(default=0, ge=0, le=4096)
    strength: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)


class Timings(BaseModel):
    encode_ms: float
    encode_image_ms: float | None = Field(default=None, description="VAE-encoding the init image (image tasks).")
    denoise_ms: float
    decode_ms: float
    image_encode_ms: float
    total_ms: float
    compute_ms: dict[str, float] = Field(description="Each stage's own compute time, without transport.")


class Txt2ImgResponse(BaseModel):
    images: list[str] = Field(description="Base64-encoded images in `output_format`.")
    seeds: list[int]
    parameters: dict[str, Any]
    timings: Timings
