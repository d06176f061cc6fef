"""Every stage operation, declared once: which stage serves it, its path, its message types, its timeout.

The stage's route, central's client call and the stage runtime's dispatch are all derived from these
declarations, so the three cannot drift apart::

    stage app      message_route(router, ENCODE)         POST /v1/encode, EncodeRequest in, EncodeResponse out
    central        transport.call(ENCODE, request)       same path, timeout settings.encode_timeout_s
    stage runtime  runtime.execute(ENCODE, request)      the runtime's batcher for ENCODE

A new operation (an adapter upload, say) is one more declaration here plus a batcher in its stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from shared.protocol import (
    DecodeRequest,
    DecodeResponse,
    DenoiseRequest,
    DenoiseResponse,
    EncodeImageRequest,
    EncodeImageResponse,
    EncodeRequest,
    EncodeResponse,
    StageRequest,
    WireModel,
)
from shared.settings import Settings

StageName = Literal["text_encoder", "diffusion_unet", "vae_decoder"]
STAGES: tuple[StageName, ...] = ("text_encoder", "diffusion_unet", "vae_decoder")

Req = TypeVar("Req", bound=StageRequest)
Resp = TypeVar("Resp", bound=WireModel)


@dataclass(frozen=True, eq=False)
class Operation(Generic[Req, Resp]):
    """One msgpack request/response call a stage serves at ``POST path``."""

    stage: StageName
    name: str
    path: str
    request: type[Req]
    response: type[Resp]
    timeout: Callable[[Settings], float]
    summary: str

    def __repr__(self) -> str:
        return f"Operation({self.stage}.{self.name} {self.path})"


ENCODE: Operation[EncodeRequest, EncodeResponse] = Operation(
    "text_encoder",
    "encode",
    "/v1/encode",
    EncodeRequest,
    EncodeResponse,
    lambda s: s.encode_timeout_s,
    "Prompts to prompt_embeds (and negative_prompt_embeds)",
)
DENOISE: Operation[DenoiseRequest, DenoiseResponse] = Operation(
    "diffusion_unet",
    "denoise",
    "/v1/denoise",
    DenoiseRequest,
    DenoiseResponse,
    lambda s: s.denoise_timeout_s,
    "Embeddings and seeds to final latents (the whole denoise loop)",
)
DECODE: Operation[DecodeRequest, DecodeResponse] = Operation(
    "vae_decoder",
    "decode",
    "/v1/decode",
    DecodeRequest,
    DecodeResponse,
    lambda s: s.decode_timeout_s,
    "Latents to uint8 images (B, H, W, 3)",
)
ENCODE_IMAGE: Operation[EncodeImageRequest, EncodeImageResponse] = Operation(
    "vae_decoder",
    "encode_image",
    "/v1/encode-image",
    EncodeImageRequest,
    EncodeImageResponse,
    lambda s: s.decode_timeout_s,
    "uint8 images (and mask) to the VAE posterior's moments (img2img / inpaint)",
)

#: Each stage's operations, in the order its API documents them.
OPERATIONS: dict[StageName, tuple[Operation[Any, Any], ...]] = {
    "text_encoder": (ENCODE,),
    "diffusion_unet": (DENOISE,),
    "vae_decoder": (DECODE, ENCODE_IMAGE),
}
