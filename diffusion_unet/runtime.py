"""The UNet stage: UNets (the base and named variants) and the whole denoise loop.

``runtime -> batcher -> denoise``: the runtime loads the UNets and checks requests against them, the
continuous batcher (``batcher.py``) runs the jobs step by step on the model thread, and ``denoise.py`` holds
the loop itself (per-task preparation and one step).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin

from diffusion_unet.batcher import ContinuousBatcher
from diffusion_unet.controlnets import ControlNetStore, ControlNetUse, control_image, parse_controlnets
from diffusion_unet.denoise import DenoiseJob, UNetVariant, prepare_job, step
from diffusion_unet.previews import latent_preview, tiny_vae_preview
from shared import schedulers
from shared.errors import InvalidValue
from shared.operations import DENOISE, Operation
from shared.protocol import DenoiseRequest, DenoiseResponse
from shared.serving.adapters import AdapterRoot
from shared.serving.batching import Batcher
from shared.serving.loras import LoraStore, lora_set
from shared.serving.models import fingerprint, load_component, public_model_id, vae_scale_factor
from shared.serving.runtime import StageRuntime
from shared.settings import parse_named_paths

log = logging.getLogger("triptych.unet")

BASE = "base"


class _SchedulerConfig(ConfigMixin):
    """Reads ``scheduler/scheduler_config.json`` with diffusers' own loader (local dir or hub id)."""

    config_name = "scheduler_config.json"  # type: ignore[assignment]


def parse_variants(spec: str) -> dict[str, str]:
    """``"inpainting=/models/x,anime=/models/y"`` -> ``{"inpainting": "/models/x", "anime": "/models/y"}``."""
    return parse_named_paths(spec, "TRIPTYCH_UNET_VARIANTS", lambda name: name != BASE)


def _scheduler_config(model: str) -> dict[str, Any]:
    return dict(_SchedulerConfig.load_config(model, subfolder="scheduler"))  # type: ignore[arg-type]


class UNetRuntime(StageRuntime):
    """Hosts the base UNet and any configured variants; ``DENOISE`` runs the whole loop for one request."""

    stage = "diffusion_unet"

    def _load(self, model: str) -> None:
        from diffusers import UNet2DConditionModel

        # The latent grid is the image size over the model's VAE factor (SD: 8, diffusers' tiny test models: 2).
        self.vae_scale_factor = vae_scale_factor(model)
        self._lora_root = AdapterRoot(self.settings.lora_dir, kind="LoRA", param="loras")
        self._lora_root.catalog()  # hash the LoRA files now, not in the first /v1/info a readiness probe sends
        # Configs only, read now so a request for a ControlNet that does not fit is refused before queueing.
        self.controlnets = ControlNetStore(
            parse_controlnets(self.settings.controlnets), self.place, capacity=self.settings.controlnet_cache_size
        )
        base_unet = load_component(UNet2DConditionModel, model, "unet")
        base_scheduler = _scheduler_config(model)
        self.variants: dict[str, UNetVariant] = {BASE: self._load_variant(BASE, model, base_unet, base_scheduler)}
        for name, path in parse_variants(self.settings.unet_variants).items():
            local = Path(path)
            if (local / "unet").is_dir() or not local.exists():
                unet = load_component(UNet2DConditionModel, path, "unet")
                config = _scheduler_config(path) if (local / "scheduler").is_dir() else base_scheduler
            else:  # a bare UNet folder: config.json + weights
                unet = UNet2DConditionModel.from_pretrained(path)
                config = base_scheduler
            self.variants[name] = self._load_variant(name, path, unet, config)
            log.info("UNet variant %r loaded from %s (in_channels=%d)", name, path, unet.config.in_channels)
        self.fingerprint = self.variants[BASE].fingerprint
        self.preview_decoder: Any = None
        if self.settings.preview_decoder:
            from diffusers import AutoencoderTiny

            self.preview_decoder = self.place(AutoencoderTiny.from_pretrained(self.settings.preview_decoder)).eval()
            log.info("job previews from the tiny VAE at %s", public_model_id(self.settings.preview_decoder))

    def preview(self, latents: torch.Tensor) -> torch.Tensor | None:
        """A job's preview of ``latents``: the tiny VAE's decode when one is configured, else the linear
        latent -> RGB approximation (``diffusion_unet.previews``)."""
        if self.preview_decoder is not None:
            return tiny_vae_preview(self.preview_decoder, latents)
        return latent_preview(latents)

    def _load_variant(self, name: str, source: str, unet: Any, scheduler_config: dict[str, Any]) -> UNetVariant:
        default = str(scheduler_config["_class_name"])
        # Fingerprint before the dtype cast: the same weights served in fp16 keep their fingerprint.
        config_fingerprint = fingerprint(unet, {k: v for k, v in scheduler_config.items() if k != "_diffusers_version"})
        placed = self.place(unet)
        loras = LoraStore(self._lora_root, placed, "unet", capacity=self.settings.lora_cache_size)
        return UNetVariant(
            name=name,
            source=source,
            fingerprint=config_fingerprint,
            unet=self._compiled(placed),
            scheduler_config=scheduler_config,
            default_scheduler=default,
            compatible_schedulers=schedulers.usable_compatibles(default, scheduler_config),
            vae_scale_factor=self.vae_scale_factor,
            loras=loras,
        )

    def _compiled(self, unet: Any) -> Any:
        if not self.settings.compile:
            return unet
        # Each new batch shape recompiles once; warm-up compiles the batch-of-one shape before readiness.
        log.info("torch.compile on the UNet: the first request of each batch shape is slow")
        return torch.compile(unet)

    def _make_batchers(self) -> dict[Operation[Any, Any], Batcher[Any, Any]]:
        self.batcher = ContinuousBatcher(
            self.worker,
            self.prepare,
            max_images=self.max_batch,
            check=self.check,
            ready=self._loras_ready,
            preview=self.preview,
        )
        return {DENOISE: self.batcher}

    def _loras_ready(self, req: DenoiseRequest) -> bool:
        """Whether the request's LoRAs are loaded or read (not still on a reader thread): admit it then."""
        return self.variants[req.model or BASE].loras.ready(lora_set(req.loras))

    def _wake_batcher(self) -> None:
        """A LoRA read finished (on a reader thread): the batcher may admit the requests that waited for it."""
        with self.worker.cond:
            self.worker.cond.notify()

    def _warm_up(self) -> None:
        for variant in self.variants.values():
            if variant.inpainting:
                continue  # inpainting UNets need conditioning; their first request warms them
            cfg = variant.unet.config
            size = cfg.sample_size * self.vae_scale_factor
            embeds = torch.zeros(1, 77, cfg.cross_attention_dim, dtype=self.dtype)
            request = DenoiseRequest(
                prompt_embeds=embeds,
                height=size,
                width=size,
                num_inference_steps=1,
                guidance_scale=1.0,
                seeds=[0],
                model=None if variant.name == BASE else variant.name,
            )
            with torch.inference_mode():
                job = self.prepare(request)
                step([job])

    def stats(self) -> dict[str, tuple[str, str, float]]:
        b = self.batcher
        return {
            **super().stats(),
            "unet_forwards": ("counter", "UNet forward passes run by the batcher", b.forwards),
            "unet_batch_images": ("gauge", "Images in the running batch", b.active_images),
            "unet_largest_batch_images": ("gauge", "Most images that shared one UNet forward", b.largest_batch),
            "lora_loaded": ("gauge", "LoRAs loaded in the UNets", sum(v.loras.loaded for v in self.variants.values())),
            "lora_parameter_bytes": (
                "gauge",
                "Bytes of LoRA parameters loaded (fp32)",
                sum(v.loras.parameter_bytes for v in self.variants.values()),
            ),
            "controlnet_loaded": ("gauge", "ControlNets loaded in the UNet service", self.controlnets.loaded),
            "controlnet_parameter_bytes": (
                "gauge",
                "Bytes of ControlNet parameters loaded",
                self.controlnets.parameter_bytes,
            ),
        }

    def config(self) -> dict[str, Any]:
        base = self.variants[BASE].config()
        base["variants"] = {name: v.config() for name, v in self.variants.items() if name != BASE}
        base["loras"] = self._lora_root.names()
        base["controlnets"] = self.controlnets.names()
        base["adapters"] = {"loras": self._lora_root.catalog(), "controlnets": self.controlnets.catalog()}
        return base

    def variant(self, name: str | None) -> UNetVariant:
        key = name or BASE
        if key not in self.variants:
            raise InvalidValue(
                f"`model` {name!r} is not hosted by this UNet service; available: {', '.join(self.variants)}",
                param="model",
            )
        return self.variants[key]

    def make_scheduler(self, variant: UNetVariant, name: str | None, seeds: list[int] | None = None) -> Any:
        """A new scheduler (class name or A1111 alias; default the variant's own) for one request."""
        return schedulers.build(
            name or variant.default_scheduler, variant.compatible_schedulers, variant.scheduler_config, seeds
        )

    def scheduler_catalogue(self, model: str | None = None) -> list[dict[str, Any]]:
        """``GET /v1/schedulers``: every scheduler the variant can use, with A1111 aliases."""
        variant = self.variant(model)
        return schedulers.catalogue(variant.compatible_schedulers, variant.scheduler_config)

    # ------------------------------------------------------------------ requests
    def denoise(self, request: DenoiseRequest) -> DenoiseResponse:
        """``DENOISE`` through the batcher, blocking this thread until the final latents are ready."""
        return self.run(DENOISE, request)

    def check(self, req: DenoiseRequest) -> None:
        """Refuse (422) what this UNet cannot take, before the request waits for a batch slot."""
        side = "height" if req.height > req.width else "width"
        self.check_bounds(req.batch_size, req.height, req.width, param="num_images_per_prompt", size_param=side)
        variant = self.variant(req.model)
        cfg = variant.unet.config
        vsf = self.vae_scale_factor
        if req.height % vsf or req.width % vsf:
            raise InvalidValue(
                f"`height` and `width` have to be divisible by {vsf} but are {req.height} and {req.width}.",
                param="height" if req.height % vsf else "width",
            )
        if req.prompt_embeds.shape[-1] != cfg.cross_attention_dim:
            raise InvalidValue(
                f"`prompt_embeds` are {req.prompt_embeds.shape[-1]} wide but UNet {variant.name!r} has "
                f"cross_attention_dim {cfg.cross_attention_dim}",
                param="prompt_embeds",
            )
        train_steps = int(variant.scheduler_config.get("num_train_timesteps", 1000))
        if req.num_inference_steps >= train_steps:
            raise InvalidValue(
                f"`num_inference_steps` is {req.num_inference_steps}; this model was trained with {train_steps} "
                f"timesteps, so at most {train_steps - 1} are allowed",
                param="num_inference_steps",
            )
        schedulers.resolve(req.scheduler or variant.default_scheduler, variant.compatible_schedulers)
        variant.loras.check(lora_set(req.loras), on_ready=self._wake_batcher)
        latent_hw = (req.height // vsf, req.width // vsf)
        if req.mask is not None:
            if cfg.in_channels not in (cfg.out_channels, 2 * cfg.out_channels + 1):
                raise InvalidValue(f"UNet {variant.name!r} has {cfg.in_channels} input channels", param="model")
            if tuple(req.mask.mask.shape[2:]) != (req.height, req.width):
                raise InvalidValue(f"`mask` must be {req.height}x{req.width} pixels", param="mask")
            self._check_latent_shape("mask.masked_latent_mean", req.mask.masked_latent_mean, cfg.out_channels,
                                     latent_hw)  # fmt: skip
        elif variant.inpainting:
            raise InvalidValue(
                f"UNet {variant.name!r} takes {cfg.in_channels} input channels (an inpainting UNet); "
                f"{req.task} needs one with {cfg.out_channels}",
                param="model",
            )
        if req.image is not None:
            self._check_latent_shape("image.latent_mean", req.image.latent_mean, cfg.out_channels, latent_hw)
        if req.latents is not None:
            want = (req.batch_size, cfg.out_channels, *latent_hw)
            if tuple(req.latents.shape) != want:
                raise InvalidValue(
                    f"`latents` must have shape {list(want)}, got {list(req.latents.shape)}", param="latents"
                )
        self._check_controlnets(req, variant)

    def _check_controlnets(self, req: DenoiseRequest, variant: UNetVariant) -> None:
        if not req.controlnets:
            return
        for i, c in enumerate(req.controlnets):
            self.controlnets.check(c.name, variant.name, variant.unet, self.vae_scale_factor)
            if tuple(c.image.shape) != (1, req.height, req.width, 3):
                raise InvalidValue(
                    f"`controlnets.{i}.image` must be (1, {req.height}, {req.width}, 3) pixels (the request's "
                    f"height x width), got {list(c.image.shape)}",
                    param=f"controlnets.{i}.image",
                )

    @staticmethod
    def _check_latent_shape(name: str, t: torch.Tensor, channels: int, latent_hw: tuple[int, int]) -> None:
        if tuple(t.shape[1:]) != (channels, *latent_hw):
            raise InvalidValue(
                f"`{name}` must have shape [1, {channels}, {latent_hw[0]}, {latent_hw[1]}], got {list(t.shape)}",
                param=name,
            )

    def prepare(self, req: DenoiseRequest) -> DenoiseJob:
        """A request's denoise job: its variant, a fresh scheduler, and the task's initial latents."""
        started = time.perf_counter()  # building the scheduler (~2 ms) is part of the request's compute
        variant = self.variant(req.model)
        scheduler = self.make_scheduler(variant, req.scheduler, req.seeds)
        job = prepare_job(req, variant, scheduler, self.device, self.dtype, started)
        variant.loras.load(job.loras)  # here, so a LoRA that does not fit fails this request, not its batch
        # Loaded here too (on the model thread, outside any forward); the job keeps the modules it uses.
        job.controlnets = tuple(
            ControlNetUse(
                name=c.name,
                module=self.controlnets.get(c.name),
                image=control_image(c.image, req.batch_size, req.do_classifier_free_guidance, self.device, self.dtype),
                scale=c.scale,
                start=c.start,
                end=c.end,
            )
            for c in req.controlnets
        )
        if not (self.settings.lora_mixed_batches and variant.loras.mixable(job.loras)):
            job.lora_key = job.loras
        return job
