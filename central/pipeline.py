"""The orchestrator: StableDiffusionPipeline.__call__ with each numbered step behind a stage client."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import Any

import torch

from central.clients import TextEncoderClient, UNetClient, VaeClient
from shared.errors import InvalidValue, StageBadResponse, StageUnavailable
from shared.protocol import (
    DecodeRequest,
    DenoiseRequest,
    EncodeRequest,
    StageInfo,
    Txt2ImgRequest,
)
from shared.settings import Settings


def compatibility_problems(te: StageInfo, unet: StageInfo, vae: StageInfo) -> list[str]:
    """Every way the three stages disagree (SPEC §5), each naming the dimension and both values."""
    t, u, v = te.config, unet.config, vae.config
    problems = []

    def check(what: str, left: str, lv: Any, right: str, rv: Any) -> None:
        if lv != rv:
            problems.append(f"{what}: {left} is {lv} but {right} is {rv}")

    check(
        "embedding width",
        "text_encoder hidden_size",
        t.get("hidden_size"),
        "diffusion_unet cross_attention_dim",
        u.get("cross_attention_dim"),
    )
    check(
        "latent channels",
        "diffusion_unet out_channels",
        u.get("out_channels"),
        "vae_decoder latent_channels",
        v.get("latent_channels"),
    )
    check(
        "vae scale factor",
        "diffusion_unet vae_scale_factor",
        u.get("vae_scale_factor"),
        "vae_decoder vae_scale_factor",
        v.get("vae_scale_factor"),
    )
    return problems


@dataclass
class Generation:
    """What one request produced: uint8 images (B, H, W, 3) and everything needed to reproduce them."""

    images: torch.Tensor
    seeds: list[int]
    parameters: dict[str, Any]
    timings_ms: dict[str, float]
    compute_ms: dict[str, float]


class Orchestrator:
    """Chains text encoder -> UNet -> VAE. One hop per stage per request; the loop stays in the UNet."""

    def __init__(self, text_encoder: TextEncoderClient, unet: UNetClient, vae: VaeClient, settings: Settings):
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.settings = settings
        self._infos: tuple[StageInfo, StageInfo, StageInfo] | None = None

    async def stage_infos(self) -> tuple[StageInfo, StageInfo, StageInfo]:
        te, un, va = await asyncio.gather(self.text_encoder.info(), self.unet.info(), self.vae.info())
        return te, un, va

    async def check(self) -> tuple[StageInfo, StageInfo, StageInfo]:
        """Fetch every stage's info and verify they agree; raises StageUnavailable naming the mismatch."""
        infos = await self.stage_infos()
        problems = compatibility_problems(*infos)
        if problems:
            self._infos = None
            raise StageUnavailable("stages are incompatible: " + "; ".join(problems))
        self._infos = infos
        return infos

    async def infos(self) -> tuple[StageInfo, StageInfo, StageInfo]:
        """The last compatible set of stage infos, checked again when none is known yet."""
        return self._infos or await self.check()

    async def aclose(self) -> None:
        await asyncio.gather(self.text_encoder.aclose(), self.unet.aclose(), self.vae.aclose())

    # ------------------------------------------------------------------ txt2img
    def _resolve(self, req: Txt2ImgRequest, unet: StageInfo) -> dict[str, Any]:
        """Fill defaults the way StableDiffusionPipeline.__call__ does and check every value's range."""
        s = self.settings
        vsf = int(unet.config["vae_scale_factor"])
        native = int(unet.config["sample_size"]) * vsf
        height = req.height or native
        width = req.width or native
        for name, value in (("height", height), ("width", width)):
            if value > s.max_side:
                raise InvalidValue(f"`{name}` is {value}; at most {s.max_side} is allowed", param=name)
        if height % vsf or width % vsf:
            raise InvalidValue(
                f"`height` and `width` have to be divisible by {vsf} but are {height} and {width}.",
                param="height" if height % vsf else "width",
            )
        if req.num_inference_steps > s.max_inference_steps:
            raise InvalidValue(
                f"`num_inference_steps` is {req.num_inference_steps}; allowed 1..{s.max_inference_steps}",
                param="num_inference_steps",
            )
        if req.num_images > s.max_num_images:
            raise InvalidValue(f"`num_images` is {req.num_images}; allowed 1..{s.max_num_images}", param="num_images")
        scheduler = req.scheduler or str(unet.config["default_scheduler"])
        known = unet.config.get("schedulers", [])
        if known and scheduler not in known:
            raise InvalidValue(
                f"`scheduler` {scheduler!r} is not compatible with this model; choose one of: {', '.join(known)}",
                param="scheduler",
            )
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        if seed + req.num_images - 1 > 2**63 - 1:
            raise InvalidValue("`seed` + `num_images` - 1 must fit in 63 bits", param="seed")
        return {
            "prompt": req.prompt,
            "negative_prompt": req.negative_prompt,
            "width": width,
            "height": height,
            "num_inference_steps": req.num_inference_steps,
            "guidance_scale": req.guidance_scale,
            "scheduler": scheduler,
            "seed": seed,
            "num_images": req.num_images,
            "output_format": req.output_format,
            "model": req.model or "base",
        }

    async def txt2img(self, req: Txt2ImgRequest) -> Generation:
        start = time.perf_counter()
        _, unet_info, _ = await self.infos()
        p = self._resolve(req, unet_info)
        seeds = [p["seed"] + i for i in range(p["num_images"])]
        cfg = p["guidance_scale"] > 1.0
        hops: dict[str, float] = {}
        compute: dict[str, float] = {}

        # 3. Encode input prompt
        t0 = time.perf_counter()
        enc = await self.text_encoder.encode(
            EncodeRequest(
                prompt=[p["prompt"]],
                negative_prompt=None if p["negative_prompt"] is None else [p["negative_prompt"]],
                do_classifier_free_guidance=cfg,
            )
        )
        hops["encode_ms"] = (time.perf_counter() - t0) * 1000
        compute["encode"] = enc.encode_ms
        width = int(unet_info.config["cross_attention_dim"])
        if enc.prompt_embeds.shape[0] != 1 or enc.prompt_embeds.shape[-1] != width:
            raise StageBadResponse(
                f"text_encoder returned embeddings of shape {list(enc.prompt_embeds.shape)}; expected [1, L, {width}]"
            )

        # 4-7. Timesteps, initial noise and the denoising loop, all inside the UNet service
        t0 = time.perf_counter()
        den = await self.unet.denoise(
            DenoiseRequest(
                prompt_embeds=enc.prompt_embeds,
                negative_prompt_embeds=enc.negative_prompt_embeds if cfg else None,
                num_images_per_prompt=p["num_images"],
                height=p["height"],
                width=p["width"],
                num_inference_steps=p["num_inference_steps"],
                guidance_scale=p["guidance_scale"],
                scheduler=p["scheduler"],
                seeds=seeds,
                model=req.model,
            )
        )
        hops["denoise_ms"] = (time.perf_counter() - t0) * 1000
        compute["denoise"] = den.denoise_ms
        vsf = int(unet_info.config["vae_scale_factor"])
        want = (p["num_images"], int(unet_info.config["out_channels"]), p["height"] // vsf, p["width"] // vsf)
        if tuple(den.latents.shape) != want:
            raise StageBadResponse(
                f"diffusion_unet returned latents of shape {list(den.latents.shape)}, expected {list(want)}"
            )

        # 8. Decode latents to pixels
        t0 = time.perf_counter()
        dec = await self.vae.decode(DecodeRequest(latents=den.latents))
        hops["decode_ms"] = (time.perf_counter() - t0) * 1000
        compute["decode"] = dec.decode_ms

        expected = (p["num_images"], p["height"], p["width"], 3)
        if tuple(dec.images.shape) != expected:
            raise StageBadResponse(
                f"vae_decoder returned images of shape {list(dec.images.shape)}, expected {expected}"
            )
        hops["pipeline_ms"] = (time.perf_counter() - start) * 1000
        return Generation(images=dec.images, seeds=seeds, parameters=p, timings_ms=hops, compute_ms=compute)
