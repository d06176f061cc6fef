"""Pydantic models for every boundary: central's JSON API and the three stages' msgpack APIs.

Field names follow diffusers (``prompt_embeds``, ``num_inference_steps``, ``guidance_scale``, ...). Stage
messages carry tensors as ``torch.Tensor`` values; ``shared.wire`` turns them into bytes. Each model owns
its cross-field checks, so a transport (HTTP or in-process) only has to call ``model_validate``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, model_validator

API_VERSION = "v1"
MAX_SEED = 2**63 - 1
MAX_PROMPTS = 64


def _tensor(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"expected a tensor (msgpack ext type 1), got {type(value).__name__}")
    return value


Tensor = Annotated[torch.Tensor, PlainValidator(_tensor)]


class WireModel(BaseModel):
    """Base for stage messages: tensors allowed, unknown fields refused (a typo must not pass silently)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


def _check_float(t: torch.Tensor, name: str, ndim: int) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"`{name}` must be float32, float16 or bfloat16, got {str(t.dtype).removeprefix('torch.')}")
    if t.dim() != ndim:
        raise ValueError(f"`{name}` must have {ndim} dimensions, got shape {list(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"`{name}` is empty (shape {list(t.shape)})")


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
class EncodeRequest(WireModel):
    """Prompts to embed, as ``StableDiffusionPipeline.encode_prompt`` would."""

    prompt: list[Annotated[str, Field(max_length=8192)]] = Field(min_length=1, max_length=MAX_PROMPTS)
    negative_prompt: list[Annotated[str, Field(max_length=8192)]] | None = None
    do_classifier_free_guidance: bool = True

    @model_validator(mode="after")
    def _check(self) -> EncodeRequest:
        if self.negative_prompt is not None and len(self.negative_prompt) != len(self.prompt):
            raise ValueError(
                f"`negative_prompt` has {len(self.negative_prompt)} entries but `prompt` has {len(self.prompt)}"
            )
        return self


class EncodeResponse(WireModel):
    """``prompt_embeds`` (P, L, D); ``negative_prompt_embeds`` too when guidance is on."""

    prompt_embeds: Tensor
    negative_prompt_embeds: Tensor | None = None
    encode_ms: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> EncodeResponse:
        _check_float(self.prompt_embeds, "prompt_embeds", 3)
        if self.negative_prompt_embeds is not None and self.negative_prompt_embeds.shape != self.prompt_embeds.shape:
            raise ValueError("`negative_prompt_embeds` and `prompt_embeds` differ in shape")
        return self


# ----------------------------------------------------------------------------------------- UNet
class DenoiseRequest(WireModel):
    """Everything the denoise loop needs: embeddings, size, steps, guidance, scheduler and noise.

    Image ``i`` starts from noise drawn with ``torch.Generator("cpu").manual_seed(seeds[i])`` (SPEC §8);
    ``latents`` replaces that noise when given. Prompt ``p``'s embeddings serve images
    ``p * num_images_per_prompt`` up to ``(p + 1) * num_images_per_prompt - 1``.
    """

    prompt_embeds: Tensor
    negative_prompt_embeds: Tensor | None = None
    num_images_per_prompt: int = Field(default=1, ge=1, le=64)
    height: int = Field(ge=8, le=8192)
    width: int = Field(ge=8, le=8192)
    num_inference_steps: int = Field(default=50, ge=1, le=1000)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=100.0, allow_inf_nan=False)
    eta: float = Field(default=0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    scheduler: str | None = Field(default=None, max_length=128)
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] | None = Field(default=None, max_length=4096)
    latents: Tensor | None = None
    model: str | None = Field(default=None, max_length=128)

    @property
    def batch_size(self) -> int:
        return int(self.prompt_embeds.shape[0]) * self.num_images_per_prompt

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    @model_validator(mode="after")
    def _check(self) -> DenoiseRequest:
        _check_float(self.prompt_embeds, "prompt_embeds", 3)
        if self.do_classifier_free_guidance:
            if self.negative_prompt_embeds is None:
                raise ValueError("`negative_prompt_embeds` is required when `guidance_scale` > 1")
            if self.negative_prompt_embeds.shape != self.prompt_embeds.shape:
                raise ValueError(
                    f"`negative_prompt_embeds` has shape {list(self.negative_prompt_embeds.shape)} but "
                    f"`prompt_embeds` has {list(self.prompt_embeds.shape)}"
                )
        if (self.seeds is None) == (self.latents is None):
            raise ValueError("give exactly one of `seeds` and `latents`")
        if self.seeds is not None and len(self.seeds) != self.batch_size:
            raise ValueError(f"`seeds` has {len(self.seeds)} entries; the batch has {self.batch_size} images")
        if self.latents is not None:
            _check_float(self.latents, "latents", 4)
            if self.latents.shape[0] != self.batch_size:
                raise ValueError(f"`latents` has {self.latents.shape[0]} images; the batch has {self.batch_size}")
        return self


class DenoiseResponse(WireModel):
    latents: Tensor
    scheduler: str
    denoise_ms: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> DenoiseResponse:
        _check_float(self.latents, "latents", 4)
        return self


# ----------------------------------------------------------------------------------------- VAE
class DecodeRequest(WireModel):
    """Final latents (B, C, h, w), *unscaled* (the VAE stage divides by its own scaling factor)."""

    latents: Tensor

    @model_validator(mode="after")
    def _check(self) -> DecodeRequest:
        _check_float(self.latents, "latents", 4)
        return self


class DecodeResponse(WireModel):
    """Images as ``uint8`` (B, H, W, 3), exactly what ``output_type="pil"`` would hold."""

    images: Tensor
    decode_ms: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> DecodeResponse:
        t = self.images
        if t.dtype != torch.uint8 or t.dim() != 4 or t.shape[-1] != 3:
            raise ValueError(f"`images` must be uint8 (B, H, W, 3), got {t.dtype} {list(t.shape)}")
        return self


# ----------------------------------------------------------------------------------------- central
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


class Timings(BaseModel):
    encode_ms: float
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
