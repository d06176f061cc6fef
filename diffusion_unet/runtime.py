"""The UNet stage: UNets (the base and named variants) and the whole denoise loop.

One ``denoise`` call runs steps 4-7 of the diffusers pipelines — timesteps, initial latents, the loop with
classifier-free guidance — for text-to-image, image-to-image and inpainting. Which one follows from the
request's conditioning; how inpainting works follows from the UNet's ``in_channels`` (9: the mask and
masked image are UNet inputs; 4: the known region is blended back after every step), as in diffusers.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.utils.torch_utils import randn_tensor

from shared import schedulers
from shared.batching import Work
from shared.errors import InvalidValue
from shared.models import fingerprint, load_component
from shared.protocol import DenoiseRequest, DenoiseResponse
from shared.runtime import StageRuntime, cancel_requested, cancel_token

log = logging.getLogger("triptych.unet")

BASE = "base"
VAE_SCALE_FACTOR = 8  # SD 1.x/2.x; central checks it against the VAE's own value.


class _SchedulerConfig(ConfigMixin):
    """Reads ``scheduler/scheduler_config.json`` with diffusers' own loader (local dir or hub id)."""

    config_name = "scheduler_config.json"  # type: ignore[assignment]


@dataclass
class UNetVariant:
    """One hosted UNet with the scheduler configuration it was trained with."""

    name: str
    source: str
    unet: Any
    scheduler_config: dict[str, Any]
    default_scheduler: str
    compatible_schedulers: list[str]
    fingerprint: str

    def config(self) -> dict[str, Any]:
        cfg = self.unet.config
        return {
            "cross_attention_dim": cfg.cross_attention_dim,
            "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels,
            "sample_size": cfg.sample_size,
            "vae_scale_factor": VAE_SCALE_FACTOR,
            "default_scheduler": self.default_scheduler,
            "schedulers": self.compatible_schedulers,
            "scheduler_config": {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")},
            "fingerprint": self.fingerprint,
        }


def parse_variants(spec: str) -> dict[str, str]:
    """``"inpainting=/models/x,anime=/models/y"`` -> ``{"inpainting": "/models/x", "anime": "/models/y"}``."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"TRIPTYCH_UNET_VARIANTS entry {item!r} is not name=path")
        if name == BASE or name in out:
            raise ValueError(f"UNet variant name {name!r} is reserved or repeated")
        out[name] = path
    return out


def _sample(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator, scaling: float) -> torch.Tensor:
    """``DiagonalGaussianDistribution.sample`` followed by the pipelines' scaling, from sent moments."""
    noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return scaling * (mean + std * noise)


class JobCancelled(Exception):
    """The request that owned a denoise job went away; its batch slot was freed."""


@dataclass
class DenoiseJob:
    """One request's denoising state between steps: its own scheduler, timesteps, latents and generators."""

    variant: UNetVariant
    scheduler: Any
    timesteps: torch.Tensor
    prompt_embeds: torch.Tensor  # one row per image (and per guidance branch)
    latents: torch.Tensor
    guidance_scale: float | None  # None: no classifier-free guidance
    step_kwargs: dict[str, Any]
    mask: torch.Tensor | None
    masked_latents: torch.Tensor | None
    image_latents: torch.Tensor | None
    noise: torch.Tensor | None
    started: float
    index: int = 0

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    @property
    def key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can share one UNet forward. Adapters or ControlNet would join this key."""
        return (self.variant.name, tuple(self.latents.shape[1:]), tuple(self.prompt_embeds.shape[1:]))

    @property
    def rows(self) -> int:
        return int(self.prompt_embeds.shape[0])

    @property
    def nine_channel(self) -> bool:
        cfg = self.variant.unet.config
        return self.mask is not None and cfg.in_channels != cfg.out_channels

    def model_input(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.timesteps[self.index]
        x = torch.cat([self.latents] * 2) if self.guidance_scale is not None else self.latents
        x = self.scheduler.scale_model_input(x, t)
        if self.nine_channel:
            assert self.mask is not None and self.masked_latents is not None
            x = torch.cat([x, self.mask, self.masked_latents], dim=1)
        return x, t

    def advance(self, noise_pred: torch.Tensor) -> None:
        i, t = self.index, self.timesteps[self.index]
        if self.guidance_scale is not None:
            noise_uncond, noise_text = noise_pred.chunk(2)
            noise_pred = noise_uncond + self.guidance_scale * (noise_text - noise_uncond)
        self.latents = self.scheduler.step(noise_pred, t, self.latents, **self.step_kwargs, return_dict=False)[0]
        if self.mask is not None and not self.nine_channel:
            # 4-channel inpainting: put the (re-noised) known region back after every step.
            assert self.image_latents is not None and self.noise is not None
            known = self.image_latents
            init_mask = self.mask.chunk(2)[0] if self.guidance_scale is not None else self.mask
            if i < len(self.timesteps) - 1:
                known = self.scheduler.add_noise(known, self.noise, torch.tensor([self.timesteps[i + 1]]))
            self.latents = (1 - init_mask) * known + init_mask * self.latents
        self.index += 1

    def result(self) -> DenoiseResponse:
        return DenoiseResponse(
            latents=self.latents,
            scheduler=type(self.scheduler).__name__,
            denoise_ms=(time.perf_counter() - self.started) * 1000,
        )


class UNetRuntime(StageRuntime):
    """Hosts the base UNet and any configured variants; ``denoise`` runs the whole loop for one request."""

    stage = "diffusion_unet"

    def _load(self, model: str) -> None:
        from diffusers import UNet2DConditionModel

        base_unet = load_component(UNet2DConditionModel, model, "unet")
        base_scheduler: dict[str, Any] = dict(_SchedulerConfig.load_config(model, subfolder="scheduler"))  # type: ignore[arg-type]
        self.variants: dict[str, UNetVariant] = {BASE: self._load_variant(BASE, model, base_unet, base_scheduler)}
        for name, path in parse_variants(self.settings.unet_variants).items():
            local = Path(path)
            if (local / "unet").is_dir() or not local.exists():
                unet = load_component(UNet2DConditionModel, path, "unet")
                config = base_scheduler
                if (local / "scheduler").is_dir():
                    config = dict(_SchedulerConfig.load_config(path, subfolder="scheduler"))  # type: ignore[arg-type]
            else:  # a bare UNet folder: config.json + weights
                unet = UNet2DConditionModel.from_pretrained(path)
                config = base_scheduler
            self.variants[name] = self._load_variant(name, path, unet, config)
            log.info("UNet variant %r loaded from %s (in_channels=%d)", name, path, unet.config.in_channels)
        self.fingerprint = self.variants[BASE].fingerprint
        from diffusion_unet.batcher import ContinuousBatcher

        self.batcher = self.own_batcher(ContinuousBatcher(self, max_batch_size=self.settings.max_batch_size))

    def _load_variant(self, name: str, source: str, unet: Any, scheduler_config: dict[str, Any]) -> UNetVariant:
        default = str(scheduler_config["_class_name"])
        return UNetVariant(
            name=name,
            source=source,
            # Fingerprint before the dtype cast: the same weights served in fp16 keep their fingerprint.
            fingerprint=fingerprint(unet, {k: v for k, v in scheduler_config.items() if k != "_diffusers_version"}),
            unet=self._compiled(self.place(unet)),
            scheduler_config=scheduler_config,
            default_scheduler=default,
            compatible_schedulers=schedulers.usable_compatibles(default, scheduler_config),
        )

    def _compiled(self, unet: Any) -> Any:
        if not self.settings.compile:
            return unet
        # Each new batch shape recompiles once; warm-up compiles the batch-of-one shape before readiness.
        log.info("torch.compile on the UNet: the first request of each batch shape is slow")
        return torch.compile(unet)

    def _warm_up(self) -> None:
        for variant in self.variants.values():
            cfg = variant.unet.config
            if cfg.in_channels != cfg.out_channels:
                continue  # inpainting UNets need conditioning; their first request warms them
            size = cfg.sample_size * VAE_SCALE_FACTOR
            embeds = torch.zeros(1, 77, cfg.cross_attention_dim, dtype=self.dtype)
            self.denoise(
                DenoiseRequest(
                    prompt_embeds=embeds,
                    height=size,
                    width=size,
                    num_inference_steps=1,
                    guidance_scale=1.0,
                    seeds=[0],
                    model=None if variant.name == BASE else variant.name,
                )
            )

    def stats(self) -> dict[str, tuple[str, str, float]]:
        b = self.batcher
        return {
            **super().stats(),
            "unet_forwards": ("counter", "UNet forward passes run by the batcher", b.forwards),
            "unet_batch_images": ("gauge", "Images in the running batch", b.active_images),
            "unet_largest_batch_images": ("gauge", "Most images that shared one UNet forward", b.largest_batch),
        }

    def config(self) -> dict[str, Any]:
        base = self.variants[BASE].config()
        base["variants"] = {name: v.config() for name, v in self.variants.items() if name != BASE}
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

    # ------------------------------------------------------------------ checks
    def _check(self, req: DenoiseRequest, variant: UNetVariant) -> None:
        cfg = variant.unet.config
        vsf = VAE_SCALE_FACTOR
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
        latent_hw = (req.height // vsf, req.width // vsf)
        if req.task == "inpaint":
            if cfg.in_channels not in (cfg.out_channels, 2 * cfg.out_channels + 1):
                raise InvalidValue(f"UNet {variant.name!r} has {cfg.in_channels} input channels", param="model")
            if tuple(req.mask.shape[2:]) != (req.height, req.width):  # type: ignore[union-attr]
                raise InvalidValue(f"`mask` must be {req.height}x{req.width} pixels", param="mask")
        elif cfg.in_channels != cfg.out_channels:
            raise InvalidValue(
                f"UNet {variant.name!r} takes {cfg.in_channels} input channels (an inpainting UNet); "
                f"{req.task} needs one with {cfg.out_channels}",
                param="model",
            )
        for name in ("image_latent_mean", "masked_image_latent_mean"):
            t = getattr(req, name)
            if t is not None and tuple(t.shape[1:]) != (cfg.out_channels, *latent_hw):
                raise InvalidValue(
                    f"`{name}` must have shape [1, {cfg.out_channels}, {latent_hw[0]}, {latent_hw[1]}], got "
                    f"{list(t.shape)}",
                    param=name,
                )
        if req.latents is not None:
            want = (req.batch_size, cfg.out_channels, *latent_hw)
            if tuple(req.latents.shape) != want:
                raise InvalidValue(
                    f"`latents` must have shape {list(want)}, got {list(req.latents.shape)}", param="latents"
                )

    # ------------------------------------------------------------------ the loop
    def submit(self, op: str, message: Any, cancel: threading.Event) -> Work | None:
        if op == "denoise" and self.settings.batching and self.ready:
            return self.batcher.submit(message, cancel)
        return None

    @torch.inference_mode()
    def denoise(self, req: DenoiseRequest) -> DenoiseResponse:
        """Denoise to final latents exactly as StableDiffusion{,Img2Img,Inpaint}Pipeline would.

        With batching on, the job joins the continuous batcher (other requests share each UNet forward);
        otherwise it runs its whole loop here.
        """
        if self.settings.batching and self.ready:
            return self.batcher.run(req, cancel_token())
        job = self.prepare(req)
        while not job.done:
            if cancel_requested():
                raise JobCancelled("the caller went away")
            self.step([job])
        return job.result()

    def prepare(self, req: DenoiseRequest) -> DenoiseJob:
        """Steps 3-6: embeddings, timesteps, initial latents, step kwargs. Raises InvalidValue on bad input."""
        variant = self.variant(req.model)
        self._check(req, variant)
        start = time.perf_counter()
        unet = variant.unet
        scheduler = self.make_scheduler(variant, req.scheduler, req.seeds)
        device, dtype, n, batch = self.device, self.dtype, req.num_images_per_prompt, req.batch_size
        cfg = req.do_classifier_free_guidance

        # 3. Embeddings: one row per image, negatives first (the order diffusers concatenates them in).
        def per_image(e: torch.Tensor) -> torch.Tensor:
            return e.to(device, dtype).repeat_interleave(n, dim=0)

        prompt_embeds = per_image(req.prompt_embeds)
        if cfg:
            assert req.negative_prompt_embeds is not None
            prompt_embeds = torch.cat([per_image(req.negative_prompt_embeds), prompt_embeds])

        # 4. Timesteps; image conditioning starts part-way in, at `strength`.
        scheduler.set_timesteps(req.num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        if req.strength is not None:
            steps = req.num_inference_steps
            t_start = max(steps - min(int(steps * req.strength), steps), 0)
            timesteps = scheduler.timesteps[t_start * scheduler.order :]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(t_start * scheduler.order)
            if steps - t_start < 1:
                raise InvalidValue(
                    f"`strength` {req.strength} with {steps} steps leaves no denoising step; raise either",
                    param="strength",
                )
        latent_timestep = timesteps[:1].repeat(batch)

        # 5. Initial latents: image i draws from its own CPU generator in the pipelines' order.
        generators = [torch.Generator("cpu").manual_seed(s) for s in req.seeds] if req.seeds is not None else None
        shape = (batch, unet.config.out_channels, req.height // VAE_SCALE_FACTOR, req.width // VAE_SCALE_FACTOR)
        mask = masked_latents = image_latents = noise = None
        if req.task == "txt2img":
            if generators is not None:
                latents = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
            else:
                assert req.latents is not None
                latents = req.latents.to(device, dtype)
            latents = latents * scheduler.init_noise_sigma
        elif req.task == "img2img":
            assert generators is not None and req.scaling_factor is not None
            mean, std = req.image_latent_mean.to(device), req.image_latent_std.to(device)  # type: ignore[union-attr]
            image_latents = torch.cat([_sample(mean, std, g, req.scaling_factor) for g in generators]).to(dtype)
            noise = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
            latents = scheduler.add_noise(image_latents, noise, latent_timestep)
        else:
            latents, noise, image_latents, mask, masked_latents = self._inpaint_latents(
                req, variant, scheduler, generators, shape, latent_timestep
            )

        # 6. Extra step kwargs (eta for DDIM; generators for ancestral / SDE samplers).
        step_params = set(inspect.signature(scheduler.step).parameters)
        step_kwargs: dict[str, Any] = {}
        if "eta" in step_params:
            step_kwargs["eta"] = req.eta
        if "generator" in step_params:
            step_kwargs["generator"] = generators
        return DenoiseJob(
            variant=variant,
            scheduler=scheduler,
            timesteps=timesteps,
            prompt_embeds=prompt_embeds,
            latents=latents,
            guidance_scale=req.guidance_scale if cfg else None,
            step_kwargs=step_kwargs,
            mask=mask,
            masked_latents=masked_latents,
            image_latents=image_latents,
            noise=noise,
            started=start,
        )

    def step(self, jobs: list[DenoiseJob]) -> None:
        """7. One denoising step for every job in ``jobs`` (same variant, latent and embedding shapes) with a
        single UNet forward. A lone job takes exactly the pipeline's path (a scalar timestep), so a request
        served alone stays bit-identical to diffusers; batched, each row carries its own timestep."""
        inputs = [job.model_input() for job in jobs]
        unet = jobs[0].variant.unet
        if len(jobs) == 1:
            (x, t), job = inputs[0], jobs[0]
            noise_pred = unet(x, t, encoder_hidden_states=job.prompt_embeds, return_dict=False)[0]
            job.advance(noise_pred)
            return
        x = torch.cat([x for x, _ in inputs])
        t = torch.cat([t.reshape(1).to(x.device).expand(xi.shape[0]) for xi, t in inputs])
        embeds = torch.cat([job.prompt_embeds for job in jobs])
        noise_pred = unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0]
        for job, part in zip(jobs, noise_pred.split([xi.shape[0] for xi, _ in inputs]), strict=True):
            job.advance(part)

    def _inpaint_latents(
        self,
        req: DenoiseRequest,
        variant: UNetVariant,
        scheduler: Any,
        generators: list[torch.Generator] | None,
        shape: tuple[int, int, int, int],
        latent_timestep: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """StableDiffusionInpaintPipeline's prepare_latents + prepare_mask_latents, draw for draw.

        The pipeline encodes the single init image once with ``generator[0]`` (then repeats it), draws the
        noise from every generator, and encodes the masked image with ``generator[0]`` again, for 4- and
        9-channel UNets alike; an SDE/ancestral scheduler then continues from those generator states.
        """
        assert generators is not None and req.scaling_factor is not None and req.mask is not None
        device, dtype, batch = self.device, self.dtype, req.batch_size
        four_channel = variant.unet.config.in_channels == variant.unet.config.out_channels
        is_strength_max = req.strength == 1.0
        image_latents = None
        if four_channel or not is_strength_max:
            mean, std = req.image_latent_mean.to(device), req.image_latent_std.to(device)  # type: ignore[union-attr]
            image_latents = _sample(mean, std, generators[0], req.scaling_factor).to(dtype).repeat(batch, 1, 1, 1)
        noise = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
        if is_strength_max:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(image_latents, noise, latent_timestep)

        mask = torch.nn.functional.interpolate(req.mask.to(device, torch.float32), size=shape[2:]).to(dtype)
        m_mean = req.masked_image_latent_mean.to(device)  # type: ignore[union-attr]
        m_std = req.masked_image_latent_std.to(device)  # type: ignore[union-attr]
        masked = _sample(m_mean, m_std, generators[0], req.scaling_factor).to(dtype)
        mask = mask.repeat(batch, 1, 1, 1)
        masked = masked.repeat(batch, 1, 1, 1)
        if req.do_classifier_free_guidance:
            mask = torch.cat([mask] * 2)
            masked = torch.cat([masked] * 2)
        return latents, noise, image_latents, mask, masked
