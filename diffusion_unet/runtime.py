"""The UNet stage: the UNet and the whole denoise loop, with a scheduler built fresh for every request."""

from __future__ import annotations

import inspect
import time
from typing import Any

import diffusers
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.utils.torch_utils import randn_tensor

from shared.errors import InvalidValue
from shared.models import fingerprint, load_component
from shared.protocol import DenoiseRequest, DenoiseResponse
from shared.runtime import StageRuntime


class _SchedulerConfig(ConfigMixin):
    """Reads ``scheduler/scheduler_config.json`` with diffusers' own loader (local dir or hub id)."""

    config_name = "scheduler_config.json"  # type: ignore[assignment]


class UNetRuntime(StageRuntime):
    """Runs steps 4-7 of ``StableDiffusionPipeline.__call__``: timesteps, noise, the loop, guidance."""

    stage = "diffusion_unet"

    def _load(self, model: str) -> None:
        from diffusers import UNet2DConditionModel

        unet = load_component(UNet2DConditionModel, model, "unet")
        # Only the scheduler's config is kept: schedulers hold per-run state, so each request gets its own.
        self.scheduler_config: dict[str, Any] = dict(_SchedulerConfig.load_config(model, subfolder="scheduler"))  # type: ignore[arg-type]
        config = self.scheduler_config
        self.default_scheduler = str(config["_class_name"])
        self.fingerprint = fingerprint(unet, {k: v for k, v in config.items() if k != "_diffusers_version"})
        self.unet = unet.to(self.device, self.dtype).eval()
        self.vae_scale_factor = 8  # SD 1.x/2.x; central checks this against the VAE's own value.
        self.compatible_schedulers = self._compatibles()

    def _compatibles(self) -> list[str]:
        """The model's scheduler and every diffusers scheduler it declares compatible."""
        base = getattr(diffusers, self.default_scheduler).from_config(self.scheduler_config)
        # diffusers exports placeholders for schedulers whose optional backend is missing; leave those out.
        usable = {cls.__name__ for cls in base.compatibles if "dummy" not in cls.__module__}
        return sorted({self.default_scheduler} | usable)

    def _warm_up(self) -> None:
        cfg = self.unet.config
        embeds = torch.zeros(1, 77, cfg.cross_attention_dim, dtype=self.dtype)
        size = cfg.sample_size * self.vae_scale_factor
        self.denoise(
            DenoiseRequest(
                prompt_embeds=embeds, height=size, width=size, num_inference_steps=1, guidance_scale=1.0, seeds=[0]
            )
        )

    def config(self) -> dict[str, Any]:
        cfg = self.unet.config
        return {
            "cross_attention_dim": cfg.cross_attention_dim,
            "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels,
            "sample_size": cfg.sample_size,
            "vae_scale_factor": self.vae_scale_factor,
            "default_scheduler": self.default_scheduler,
            "schedulers": self.compatible_schedulers,
        }

    # ------------------------------------------------------------------ scheduler
    def make_scheduler(self, name: str | None, seeds: list[int] | None = None) -> Any:
        """A new scheduler of class ``name`` (default: the model's own) from the model's scheduler config.

        SDE schedulers that sample Brownian noise from a seed of their own get the request's seeds, one per
        image, so their results are reproducible too.
        """
        name = name or self.default_scheduler
        if name not in self.compatible_schedulers:
            raise InvalidValue(
                f"`scheduler` {name!r} is not a scheduler compatible with this model; "
                f"choose one of: {', '.join(self.compatible_schedulers)}",
                param="scheduler",
            )
        cls = getattr(diffusers, name)
        extra: dict[str, Any] = {}
        if seeds is not None and "noise_sampler_seed" in inspect.signature(cls.__init__).parameters:
            extra["noise_sampler_seed"] = list(seeds)
        return cls.from_config(self.scheduler_config, **extra)

    # ------------------------------------------------------------------ the loop
    def _check(self, req: DenoiseRequest) -> None:
        cfg = self.unet.config
        if req.model not in (None, "", "base"):
            raise InvalidValue(f"`model` {req.model!r} is not hosted here; available: base", param="model")
        if req.height % self.vae_scale_factor or req.width % self.vae_scale_factor:
            raise InvalidValue(
                f"`height` and `width` have to be divisible by {self.vae_scale_factor} but are "
                f"{req.height} and {req.width}.",
                param="height" if req.height % self.vae_scale_factor else "width",
            )
        if req.prompt_embeds.shape[-1] != cfg.cross_attention_dim:
            raise InvalidValue(
                f"`prompt_embeds` are {req.prompt_embeds.shape[-1]} wide but the UNet's cross-attention dim is "
                f"{cfg.cross_attention_dim}",
                param="prompt_embeds",
            )
        if cfg.in_channels != cfg.out_channels:
            raise InvalidValue(
                f"this UNet takes {cfg.in_channels} input channels (an inpainting UNet); text-to-image needs "
                f"{cfg.out_channels}",
                param="model",
            )
        if req.latents is not None:
            want = (
                req.batch_size,
                cfg.in_channels,
                req.height // self.vae_scale_factor,
                req.width // self.vae_scale_factor,
            )
            if tuple(req.latents.shape) != want:
                raise InvalidValue(
                    f"`latents` must have shape {list(want)}, got {list(req.latents.shape)}", param="latents"
                )

    @torch.inference_mode()
    def denoise(self, req: DenoiseRequest) -> DenoiseResponse:
        """Denoise from seeded noise (or given latents) to final latents, as the pipeline does."""
        self._check(req)
        start = time.perf_counter()
        scheduler = self.make_scheduler(req.scheduler, req.seeds)
        device, dtype, n = self.device, self.dtype, req.num_images_per_prompt

        # 3. Embeddings: one row per image, negatives first (the order diffusers concatenates them in).
        def per_image(e: torch.Tensor) -> torch.Tensor:
            return e.to(device, dtype).repeat_interleave(n, dim=0)

        prompt_embeds = per_image(req.prompt_embeds)
        if req.do_classifier_free_guidance:
            assert req.negative_prompt_embeds is not None
            prompt_embeds = torch.cat([per_image(req.negative_prompt_embeds), prompt_embeds])

        # 4. Timesteps
        scheduler.set_timesteps(req.num_inference_steps, device=device)
        timesteps = scheduler.timesteps

        # 5. Initial noise: image i from its own CPU generator, exactly like a list of generators in diffusers.
        generators = None
        if req.seeds is not None:
            generators = [torch.Generator("cpu").manual_seed(s) for s in req.seeds]
            shape = (
                req.batch_size,
                self.unet.config.in_channels,
                req.height // self.vae_scale_factor,
                req.width // self.vae_scale_factor,
            )
            latents = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
        else:
            assert req.latents is not None
            latents = req.latents.to(device, dtype)
        latents = latents * scheduler.init_noise_sigma

        # 6. Extra step kwargs (eta for DDIM; generators for ancestral / SDE samplers).
        step_params = set(inspect.signature(scheduler.step).parameters)
        step_kwargs: dict[str, Any] = {}
        if "eta" in step_params:
            step_kwargs["eta"] = req.eta
        if "generator" in step_params:
            step_kwargs["generator"] = generators

        # 7. Denoising loop
        cfg = req.do_classifier_free_guidance
        for t in timesteps:
            model_input = torch.cat([latents] * 2) if cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise_pred = self.unet(model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
            if cfg:
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + req.guidance_scale * (noise_text - noise_uncond)
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]

        return DenoiseResponse(
            latents=latents,
            scheduler=type(scheduler).__name__,
            denoise_ms=(time.perf_counter() - start) * 1000,
        )
