"""The orchestrator: the diffusers Stable Diffusion pipelines with each numbered step behind a stage client.

One request is at most four hops, one per stage task: (VAE-encode the init image,) encode the prompt,
denoise (the whole loop, in the UNet service), decode. Text-to-image, image-to-image, inpainting and
outpainting differ only in what conditions the denoise call.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from starlette.concurrency import run_in_threadpool

from central import controlnet
from central.clients import Progress, TextEncoderClient, UNetClient, VaeClient
from central.images import check_size_multiple, decode_image, decode_mask
from shared import schedulers
from shared.errors import InvalidValue, PayloadTooLarge, StageBadResponse, StageUnavailable
from shared.protocol import (
    ControlNetConditioning,
    DecodeRequest,
    DenoiseRequest,
    EncodeImageRequest,
    EncodeRequest,
    ImageConditioning,
    Img2ImgRequest,
    InpaintRequest,
    MaskConditioning,
    OutpaintRequest,
    StageInfo,
    Txt2ImgRequest,
)
from shared.settings import Settings

AnyTaskRequest = Txt2ImgRequest | Img2ImgRequest | InpaintRequest | OutpaintRequest
INPAINTING_VARIANT = "inpainting"


def unet_variants(unet: StageInfo) -> dict[str, dict[str, Any]]:
    """Every UNet the service hosts, by name ("base" first), each with its own config."""
    base = {k: v for k, v in unet.config.items() if k != "variants"}
    return {"base": base, **unet.config.get("variants", {})}


def compatibility_problems(te: StageInfo, unet: StageInfo, vae: StageInfo) -> list[str]:
    """Every way the three stages disagree (SPEC §5), for every hosted UNet, naming the dimension and values."""
    t, v = te.config, vae.config
    problems = []

    def check(what: str, left: str, lv: Any, right: str, rv: Any) -> None:
        if lv != rv:
            problems.append(f"{what}: {left} is {lv} but {right} is {rv}")

    for name, u in unet_variants(unet).items():
        who = "diffusion_unet" if name == "base" else f"diffusion_unet variant {name!r}"
        check("embedding width", "text_encoder hidden_size", t.get("hidden_size"),
              f"{who} cross_attention_dim", u.get("cross_attention_dim"))  # fmt: skip
        check("latent channels", f"{who} out_channels", u.get("out_channels"),
              "vae_decoder latent_channels", v.get("latent_channels"))  # fmt: skip
        check("vae scale factor", f"{who} vae_scale_factor", u.get("vae_scale_factor"),
              "vae_decoder vae_scale_factor", v.get("vae_scale_factor"))  # fmt: skip
        in_ch, out_ch = u.get("in_channels"), u.get("out_channels")
        if isinstance(out_ch, int) and in_ch not in (out_ch, 2 * out_ch + 1):
            problems.append(f"input channels: {who} in_channels is {in_ch}; expected {out_ch} or {2 * out_ch + 1}")
    # A LoRA name is one file for both stages that apply it: the same name with other bytes would give each
    # stage a different LoRA (a name only one stage has is refused with 404 by the other, at request time).
    te_loras, unet_loras = _lora_catalog(te), _lora_catalog(unet)
    for name in sorted(te_loras.keys() & unet_loras.keys()):
        check(f"LoRA {name!r}", "text_encoder fingerprint", te_loras[name]["fingerprint"],
              "diffusion_unet fingerprint", unet_loras[name]["fingerprint"])  # fmt: skip
    return problems


def _lora_catalog(info: StageInfo) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in info.config.get("adapters", {}).get("loras", [])}


def models_catalog(te: StageInfo, unet: StageInfo, vae: StageInfo) -> dict[str, Any]:
    """``GET /v1/models``: what a request can name, each with its fingerprint, from the stages' infos."""
    variants = unet_variants(unet)

    def unet_entry(name: str, config: dict[str, Any], source: str) -> dict[str, Any]:
        return {
            "name": name,
            "source": source,
            "fingerprint": config.get("fingerprint"),
            "inpainting": config.get("in_channels") != config.get("out_channels"),
            "default_scheduler": config.get("default_scheduler"),
        }

    base = unet_entry("base", variants["base"], unet.model.id)
    base["fingerprint"] = unet.model.fingerprint
    base["components"] = {
        "text_encoder": {"source": te.model.id, "fingerprint": te.model.fingerprint},
        "diffusion_unet": {"source": unet.model.id, "fingerprint": unet.model.fingerprint},
        "vae_decoder": {"source": vae.model.id, "fingerprint": vae.model.fingerprint},
    }
    te_loras, unet_loras = _lora_catalog(te), _lora_catalog(unet)
    loras = []
    for name in sorted(te_loras.keys() | unet_loras.keys()):
        entry = unet_loras.get(name) or te_loras[name]
        stages = [
            stage for stage, found in (("text_encoder", te_loras), ("diffusion_unet", unet_loras)) if name in found
        ]
        loras.append({"name": name, "fingerprint": entry["fingerprint"], "bytes": entry["bytes"], "stages": stages})
    return {
        "base": base,
        "variants": [
            unet_entry(name, config, str(config.get("source", "")))
            for name, config in variants.items()
            if name != "base"
        ],
        "loras": loras,
        "embeddings": [
            {"name": token, "fingerprint": fp} for token, fp in sorted(te.config.get("embeddings", {}).items())
        ],
        "controlnets": list(unet.config.get("adapters", {}).get("controlnets", [])),
    }


@dataclass
class Generation:
    """What one request produced: uint8 images (B, H, W, 3) and everything needed to reproduce them."""

    images: torch.Tensor
    seeds: list[int]
    parameters: dict[str, Any]
    timings_ms: dict[str, float]
    compute_ms: dict[str, float]


@dataclass
class Conditioning:
    """An init image (and mask) prepared exactly as the diffusers pipelines preprocess them."""

    image: np.ndarray  # uint8 (1, H, W, 3) at the output size
    mask: np.ndarray | None  # uint8 (1, 1, H, W), 0/1, 1 = repaint
    strength: float


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

    async def models(self) -> dict[str, Any]:
        """``GET /v1/models``: base, variants, LoRAs, embeddings and ControlNets with their fingerprints."""
        return models_catalog(*await self.check())

    async def schedulers(self, model: str | None = None) -> list[dict[str, Any]]:
        """``GET /v1/schedulers``: the catalogue for the chosen UNet (default the base one)."""
        _, unet_info, _ = await self.infos()
        variant = self._variant(unet_info, model)
        return schedulers.catalogue(variant["schedulers"], variant.get("scheduler_config"))

    # ------------------------------------------------------------------ parameters
    @staticmethod
    def _variant(unet: StageInfo, model: str | None) -> dict[str, Any]:
        variants = unet_variants(unet)
        key = model or "base"
        if key not in variants:
            raise InvalidValue(f"`model` {model!r} is not hosted; available: {', '.join(variants)}", param="model")
        return variants[key]

    def _resolve(
        self, req: AnyTaskRequest, variant: dict[str, Any], model: str | None, size: tuple[int, int] | None
    ) -> dict[str, Any]:
        """Fill defaults the way the diffusers pipelines do and check every value's range."""
        s = self.settings
        vsf = int(variant["vae_scale_factor"])
        native = int(variant["sample_size"]) * vsf
        width, height = size or (req.width or native, req.height or native)
        for name, value in (("height", height), ("width", width)):
            if value > s.max_side:
                raise InvalidValue(f"`{name}` is {value}; at most {s.max_side} is allowed", param=name)
        check_size_multiple(width, height, vsf)
        if req.num_inference_steps > s.max_inference_steps:
            raise InvalidValue(
                f"`num_inference_steps` is {req.num_inference_steps}; allowed 1..{s.max_inference_steps}",
                param="num_inference_steps",
            )
        if req.num_images > s.max_num_images:
            raise InvalidValue(f"`num_images` is {req.num_images}; allowed 1..{s.max_num_images}", param="num_images")
        scheduler = req.scheduler or str(variant["default_scheduler"])
        scheduler_class, _ = schedulers.resolve(scheduler, list(variant["schedulers"]))
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
            "scheduler_class": scheduler_class,
            "seed": seed,
            "num_images": req.num_images,
            "output_format": req.output_format,
            "model": model or "base",
            "loras": [lora.model_dump() for lora in req.loras],
            "controlnets": [spec.parameters() for spec in req.controlnets],
        }

    # ------------------------------------------------------------------ image preprocessing
    def _read_image(self, data: str | bytes, param: str) -> PIL.Image.Image:
        s = self.settings
        return decode_image(data, param=param, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels)

    def _prepare(self, req: AnyTaskRequest, vsf: int) -> tuple[Conditioning, tuple[int, int], dict[str, Any]]:
        """Decode, size and preprocess the init image and mask (CPU work: call it off the event loop)."""
        s = self.settings
        extra: dict[str, Any] = {}
        assert isinstance(req, (Img2ImgRequest, InpaintRequest, OutpaintRequest))
        image = self._read_image(req.image, "image")
        mask_image: PIL.Image.Image | None = None
        if isinstance(req, OutpaintRequest):
            # The canvas's size is checked before it is built: 4096 on each side would be 1 GB per request.
            cw, ch = image.width + req.left + req.right, image.height + req.top + req.bottom
            if cw * ch > s.max_image_pixels or max(cw, ch) > s.max_side:
                raise PayloadTooLarge(
                    f"the outpainted canvas would be {cw}x{ch}; at most {s.max_side} a side and "
                    f"{s.max_image_pixels} pixels are allowed (TRIPTYCH_MAX_SIDE, TRIPTYCH_MAX_IMAGE_PIXELS)",
                    param="image",
                )
            image, mask_image = outpaint_canvas(image, req.left, req.right, req.top, req.bottom)
            extra = {"left": req.left, "right": req.right, "top": req.top, "bottom": req.bottom}
            for side, size, extent in (("left", image.width, "width"), ("top", image.height, "height")):
                if size % vsf:
                    raise InvalidValue(
                        f"the outpainted canvas is {image.width}x{image.height}; its {extent} has to be divisible by "
                        f"{vsf}: change `{side}` or `{'right' if side == 'left' else 'bottom'}`",
                        param=side,
                    )
        elif isinstance(req, InpaintRequest):
            mask_image = decode_mask(req.mask_image, param="mask_image", max_bytes=s.max_image_bytes,
                                     max_pixels=s.max_image_pixels, size=image.size)  # fmt: skip
        processor = VaeImageProcessor(vae_scale_factor=vsf)
        if isinstance(req, OutpaintRequest):
            width, height = image.width, image.height
        else:
            # Unset sides follow the image, rounded down to a multiple of the factor as
            # StableDiffusionImg2ImgPipeline does (the inpaint pipeline would default to the model's native
            # size; a user inpainting a photo expects its own size back).
            default_h, default_w = processor.get_default_height_width(image)
            width, height = req.width or default_w, req.height or default_h
        if width < vsf or height < vsf:
            raise InvalidValue(f"`image` is {image.width}x{image.height}; the smallest size is {vsf}", param="image")
        resized = processor.resize(image, height, width)
        pixels = np.asarray(resized, dtype=np.uint8)[None].copy()
        mask = None
        if mask_image is not None:
            mask_processor = VaeImageProcessor(
                vae_scale_factor=vsf, do_normalize=False, do_binarize=True, do_convert_grayscale=True
            )
            condition = mask_processor.preprocess(mask_image, height=height, width=width)
            mask = condition.to(torch.uint8).numpy()
        extra["strength"] = req.strength
        return Conditioning(image=pixels, mask=mask, strength=req.strength), (width, height), extra

    # ------------------------------------------------------------------ the pipeline
    async def txt2img(self, req: Txt2ImgRequest) -> Generation:
        return await self.generate(req)

    async def generate(
        self, req: AnyTaskRequest, *, on_progress: Progress | None = None, preview_every: int = 0
    ) -> Generation:
        """Run one request of any task: the diffusers pipeline's steps, one stage hop each. ``on_progress`` gets
        the denoise loop's events (``{"step", "steps"}`` after every step, plus a ``preview`` uint8 tensor
        (B, h, w, 3) every ``preview_every`` steps) as the UNet streams them."""
        start = time.perf_counter()
        # A stage last found unreachable is probed first: fail in milliseconds, not after the denoise.
        await asyncio.gather(*(c.ensure_up() for c in (self.text_encoder, self.unet, self.vae)))
        _, unet_info, vae_info = await self.infos()
        model = req.model
        if model is None and isinstance(req, (InpaintRequest, OutpaintRequest)):
            # Like keras-sd-serving: an inpainting UNet when one is hosted, else the base UNet with blending.
            model = INPAINTING_VARIANT if INPAINTING_VARIANT in unet_variants(unet_info) else None
        variant = self._variant(unet_info, model)
        conditioning: Conditioning | None = None
        size: tuple[int, int] | None = None
        extra: dict[str, Any] = {}
        if isinstance(req, (Img2ImgRequest, InpaintRequest, OutpaintRequest)):
            conditioning, size, extra = await run_in_threadpool(self._prepare, req, int(variant["vae_scale_factor"]))
        control_images: list[PIL.Image.Image] = []
        if req.controlnets:
            # StableDiffusionControlNetPipeline's output takes the control image's size unless told otherwise.
            lim = self.settings
            control_images = await run_in_threadpool(
                controlnet.control_images,
                req.controlnets,
                max_bytes=lim.max_image_bytes,
                max_pixels=lim.max_image_pixels,
            )
            if size is None:  # img2img: the init image's size, and the control images are resized to it
                vsf = int(variant["vae_scale_factor"])
                size = controlnet.default_size(control_images[0], req.width, req.height, vsf)
        p = {**self._resolve(req, variant, model, size), **extra}
        control: list[ControlNetConditioning] = []
        if req.controlnets:
            control = await run_in_threadpool(
                controlnet.conditionings, req.controlnets, control_images, p["width"], p["height"],
                int(variant["vae_scale_factor"]),
            )  # fmt: skip
        seeds = [p["seed"] + i for i in range(p["num_images"])]
        cfg = p["guidance_scale"] > 1.0
        hops: dict[str, float] = {}
        compute: dict[str, float] = {}
        image: ImageConditioning | None = None
        mask: MaskConditioning | None = None

        # 4 (img2img/inpaint). VAE-encode the init image: posterior moments; the UNet samples them in order.
        if conditioning is not None:
            t0 = time.perf_counter()
            enc_img = await self.vae.encode_image(
                EncodeImageRequest(
                    images=torch.from_numpy(conditioning.image),
                    mask=None if conditioning.mask is None else torch.from_numpy(conditioning.mask),
                )
            )
            hops["encode_image_ms"] = (time.perf_counter() - t0) * 1000
            compute["encode_image"] = enc_img.encode_ms
            image = ImageConditioning(
                latent_mean=enc_img.latent_mean,
                latent_std=enc_img.latent_std,
                strength=conditioning.strength,
                scaling_factor=float(vae_info.config["scaling_factor"]),
            )
            if conditioning.mask is not None:
                if enc_img.masked_latent_mean is None or enc_img.masked_latent_std is None:
                    raise StageBadResponse("vae_decoder returned no masked-image moments for a mask")
                mask = MaskConditioning(
                    mask=torch.from_numpy(conditioning.mask),
                    masked_latent_mean=enc_img.masked_latent_mean,
                    masked_latent_std=enc_img.masked_latent_std,
                )

        # 3. Encode input prompt
        t0 = time.perf_counter()
        enc = await self.text_encoder.encode(
            EncodeRequest(
                prompt=[p["prompt"]],
                negative_prompt=None if p["negative_prompt"] is None else [p["negative_prompt"]],
                do_classifier_free_guidance=cfg,
                loras=req.loras,
            )
        )
        hops["encode_ms"] = (time.perf_counter() - t0) * 1000
        compute["encode"] = enc.encode_ms
        width = int(variant["cross_attention_dim"])
        if enc.prompt_embeds.shape[0] != 1 or enc.prompt_embeds.shape[-1] != width:
            raise StageBadResponse(
                f"text_encoder returned embeddings of shape {list(enc.prompt_embeds.shape)}; expected [1, L, {width}]"
            )

        # 5-7. Timesteps, initial latents and the denoising loop, all inside the UNet service
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
                model=model,
                image=image,
                mask=mask,
                loras=req.loras,
                controlnets=control,
                preview_every=preview_every if on_progress is not None else 0,
            ),
            on_progress,
        )
        hops["denoise_ms"] = (time.perf_counter() - t0) * 1000
        compute["denoise"] = den.denoise_ms
        vsf = int(variant["vae_scale_factor"])
        want = (p["num_images"], int(variant["out_channels"]), p["height"] // vsf, p["width"] // vsf)
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
                f"vae_decoder returned images of shape {list(dec.images.shape)}, expected {list(expected)}"
            )
        hops["pipeline_ms"] = (time.perf_counter() - start) * 1000
        return Generation(images=dec.images, seeds=seeds, parameters=p, timings_ms=hops, compute_ms=compute)


def outpaint_canvas(
    image: PIL.Image.Image, left: int, right: int, top: int, bottom: int
) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """The image on a larger canvas (new border filled by repeating the edge pixels) and its mask (white =
    the new border to paint). Repeating edges keeps colours continuous for `strength` < 1 and for 4-channel
    UNets, whose unmasked latents seed the border."""
    if left + right + top + bottom == 0:
        raise InvalidValue("give at least one of `left`, `right`, `top`, `bottom` (pixels to add)", param="left")
    pixels = np.asarray(image.convert("RGB"))
    canvas = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    mask[top : top + pixels.shape[0], left : left + pixels.shape[1]] = 0
    return PIL.Image.fromarray(canvas), PIL.Image.fromarray(mask, mode="L")
