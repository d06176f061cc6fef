"""The denoise loop as data: one request's state between steps (``DenoiseJob``), how each task prepares it,
and one step for a group of jobs.

This is steps 4-7 of the diffusers pipelines — timesteps, initial latents, the loop with classifier-free
guidance — cut so that a batcher can run the steps of several requests together. Which task a request is
follows from its conditioning (none, ``image``, ``image`` + ``mask``); how inpainting works follows from the
UNet's ``in_channels`` (9: the mask and masked image are UNet inputs; 4: the known region is blended back
after every step), as in diffusers. Nothing here knows of HTTP, batching or the runtime.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from diffusion_unet import controlnets
from diffusion_unet.controlnets import ControlNetUse, RowGroup
from shared.errors import InvalidValue, NumericalError
from shared.protocol import DenoiseRequest, DenoiseResponse, ImageConditioning, MaskConditioning, finite
from shared.serving.loras import LoraSet, LoraStore, lora_set
from shared.serving.models import public_model_id


class JobCancelled(Exception):
    """The request that owned a denoise job went away; its batch slot was freed."""


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
    vae_scale_factor: int
    loras: LoraStore

    @property
    def inpainting(self) -> bool:
        """A 9-channel inpainting UNet: latents, mask and masked-image latents are its input."""
        cfg = self.unet.config
        return bool(cfg.in_channels != cfg.out_channels)

    def config(self) -> dict[str, Any]:
        cfg = self.unet.config
        return {
            "source": public_model_id(self.source),
            "cross_attention_dim": cfg.cross_attention_dim,
            "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels,
            "sample_size": cfg.sample_size,
            "vae_scale_factor": self.vae_scale_factor,
            "default_scheduler": self.default_scheduler,
            "schedulers": self.compatible_schedulers,
            "scheduler_config": {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")},
            "fingerprint": self.fingerprint,
        }


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
    started: float
    inpaint: InpaintState | None = None
    loras: LoraSet = ()
    #: The LoRAs a job sharing this one's forward must have too: () when its set can be mixed with others
    #: (``LoraStore.rows``), the set itself when not (a DoRA LoRA, or mixing turned off).
    lora_key: LoraSet = ()
    #: Its ControlNets (``StableDiffusionControlNetPipeline``); jobs with different ones share forwards.
    controlnets: tuple[ControlNetUse, ...] = ()
    index: int = 0
    #: ``num_inference_steps`` as the pipelines' progress bar counts them (img2img: after ``strength``), and
    #: how many of them are done: a scheduler of order 2 takes two iterations a step, PNDM one extra at the
    #: start, and the progress a client sees follows diffusers', not the iterations.
    steps: int = 0
    progress: int = 0

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    @property
    def key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can share one UNet forward: same variant, latent size, embedding shape and
        ``lora_key``. Mixable LoRA sets are not part of it: a forward runs each job's rows under its own set; nor
        are ControlNets: each runs on the rows of the jobs that use it (``controlnets.mixed``)."""
        return (self.variant.name, tuple(self.latents.shape[1:]), tuple(self.prompt_embeds.shape[1:]), self.lora_key)

    @property
    def rows(self) -> int:
        return int(self.prompt_embeds.shape[0])

    def model_input(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The UNet's input at this step, its timestep, and the ControlNets' input: the scaled latents (for a
        9-channel inpainting UNet, without the mask and masked-image channels, as the ControlNet inpaint
        pipeline feeds it)."""
        t = self.timesteps[self.index]
        x = torch.cat([self.latents] * 2) if self.guidance_scale is not None else self.latents
        x = control = self.scheduler.scale_model_input(x, t)
        if self.inpaint is not None and self.variant.inpainting:
            x = torch.cat([x, self.inpaint.mask, self.inpaint.masked_latents], dim=1)
        return x, t, control

    def advance(self, noise_pred: torch.Tensor) -> None:
        i, t = self.index, self.timesteps[self.index]
        if self.guidance_scale is not None:
            noise_uncond, noise_text = noise_pred.chunk(2)
            noise_pred = noise_uncond + self.guidance_scale * (noise_text - noise_uncond)
        self.latents = self.scheduler.step(noise_pred, t, self.latents, **self.step_kwargs, return_dict=False)[0]
        state = self.inpaint
        if state is not None and not self.variant.inpainting:
            # 4-channel inpainting: put the (re-noised) known region back after every step.
            known = state.image_latents
            assert known is not None  # prepare_mask_latents always samples them for a 4-channel UNet
            init_mask = state.mask.chunk(2)[0] if self.guidance_scale is not None else state.mask
            if i < len(self.timesteps) - 1:
                known = self.scheduler.add_noise(known, state.noise, torch.tensor([self.timesteps[i + 1]]))
            self.latents = (1 - init_mask) * known + init_mask * self.latents
        self.index += 1
        order = self.scheduler.order
        warmup = len(self.timesteps) - self.steps * order
        if i == len(self.timesteps) - 1 or (i + 1 > warmup and (i + 1) % order == 0):  # the pipelines' update
            self.progress += 1

    def result(self) -> DenoiseResponse:
        if not finite(self.latents):
            raise NumericalError(
                f"UNet {self.variant.name!r} produced NaN or infinite latents (dtype {self.latents.dtype}); in "
                "float16 try TRIPTYCH_DTYPE=float32"
            )
        return DenoiseResponse(
            latents=self.latents,
            scheduler=type(self.scheduler).__name__,
            denoise_ms=(time.perf_counter() - self.started) * 1000,
        )


@dataclass
class InpaintState:
    """What inpainting adds to a job: the latent-size mask and masked-image latents (UNet inputs of a 9-channel
    UNet; both repeated per guidance branch), and the image latents and noise a 4-channel UNet blends with."""

    mask: torch.Tensor
    masked_latents: torch.Tensor
    image_latents: torch.Tensor | None
    noise: torch.Tensor


def _sample(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator, scaling: float) -> torch.Tensor:
    """``DiagonalGaussianDistribution.sample`` followed by the pipelines' scaling, from sent moments."""
    noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return scaling * (mean + std * noise)


def prepare_job(
    req: DenoiseRequest,
    variant: UNetVariant,
    scheduler: Any,
    device: torch.device,
    dtype: torch.dtype,
    started: float | None = None,
) -> DenoiseJob:
    """Steps 3-6 for one request: embeddings, timesteps, initial latents (per task), step kwargs. ``started``
    (default: now) is when the request's compute began, for ``denoise_ms``."""
    start = time.perf_counter() if started is None else started
    n, batch = req.num_images_per_prompt, req.batch_size

    # 3. Embeddings: one row per image, negatives first (the order diffusers concatenates them in).
    def per_image(e: torch.Tensor) -> torch.Tensor:
        return e.to(device, dtype).repeat_interleave(n, dim=0)

    prompt_embeds = per_image(req.prompt_embeds)
    if req.do_classifier_free_guidance and req.negative_prompt_embeds is not None:
        prompt_embeds = torch.cat([per_image(req.negative_prompt_embeds), prompt_embeds])

    # 4. Timesteps; image conditioning starts part-way in, at `strength`.
    scheduler.set_timesteps(req.num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    if req.image is not None:
        timesteps = _strength_timesteps(scheduler, req.num_inference_steps, req.image.strength)
    latent_timestep = timesteps[:1].repeat(batch)

    # 5. Initial latents: image i draws from its own CPU generator in the pipelines' order.
    generators = [torch.Generator("cpu").manual_seed(s) for s in req.seeds] if req.seeds is not None else None
    vsf = variant.vae_scale_factor
    shape = (batch, variant.unet.config.out_channels, req.height // vsf, req.width // vsf)
    inpaint = None
    if req.image is None:
        latents = prepare_latents(req, scheduler, generators, shape, device, dtype)
    elif req.mask is None:
        assert generators is not None  # the request model refuses `latents` with image conditioning
        latents = prepare_image_latents(req.image, scheduler, generators, shape, latent_timestep, device, dtype)
    else:
        assert generators is not None
        latents, inpaint = prepare_mask_latents(
            req.image, req.mask, variant, scheduler, generators, shape, latent_timestep,
            req.do_classifier_free_guidance, device, dtype,
        )  # fmt: skip

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
        guidance_scale=req.guidance_scale if req.do_classifier_free_guidance else None,
        step_kwargs=step_kwargs,
        started=start,
        inpaint=inpaint,
        loras=lora_set(req.loras),
        steps=_progress_steps(req),
    )


def _progress_steps(req: DenoiseRequest) -> int:
    """The step count the pipelines' progress bar shows: ``num_inference_steps``, or for image conditioning
    what ``get_timesteps`` leaves of it after ``strength``."""
    n = req.num_inference_steps
    return n if req.image is None else min(int(n * req.image.strength), n)


def _strength_timesteps(scheduler: Any, steps: int, strength: float) -> torch.Tensor:
    """The img2img / inpaint pipelines' ``get_timesteps``: skip the first ``1 - strength`` of the schedule."""
    t_start = max(steps - min(int(steps * strength), steps), 0)
    if steps - t_start < 1:
        raise InvalidValue(f"`strength` {strength} with {steps} steps leaves no denoising step; raise either",
                           param="strength")  # fmt: skip
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    timesteps: torch.Tensor = scheduler.timesteps[t_start * scheduler.order :]
    return timesteps


def prepare_latents(
    req: DenoiseRequest,
    scheduler: Any,
    generators: list[torch.Generator] | None,
    shape: tuple[int, int, int, int],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Text-to-image: noise from the request's generators (or its own ``latents``), scaled by the scheduler."""
    if generators is not None:
        latents = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
    else:
        assert req.latents is not None  # the request model asks for exactly one of seeds and latents
        latents = req.latents.to(device, dtype)
    return latents * scheduler.init_noise_sigma


def prepare_image_latents(
    image: ImageConditioning,
    scheduler: Any,
    generators: list[torch.Generator],
    shape: tuple[int, int, int, int],
    latent_timestep: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Image-to-image (StableDiffusionImg2ImgPipeline.prepare_latents): image ``i`` is sampled from the init
    image's moments with generator ``i``, then noised to the first timestep with noise from every generator."""
    mean, std = image.latent_mean.to(device), image.latent_std.to(device)
    image_latents = torch.cat([_sample(mean, std, g, image.scaling_factor) for g in generators]).to(dtype)
    noise = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
    latents: torch.Tensor = scheduler.add_noise(image_latents, noise, latent_timestep)
    return latents


def prepare_mask_latents(
    image: ImageConditioning,
    mask: MaskConditioning,
    variant: UNetVariant,
    scheduler: Any,
    generators: list[torch.Generator],
    shape: tuple[int, int, int, int],
    latent_timestep: torch.Tensor,
    guided: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, InpaintState]:
    """StableDiffusionInpaintPipeline's prepare_latents + prepare_mask_latents, draw for draw.

    The pipeline encodes the single init image once with ``generator[0]`` (then repeats it), draws the
    noise from every generator, and encodes the masked image with ``generator[0]`` again, for 4- and
    9-channel UNets alike; an SDE/ancestral scheduler then continues from those generator states.
    """
    batch = shape[0]
    is_strength_max = image.strength == 1.0
    image_latents = None
    if not variant.inpainting or not is_strength_max:
        mean, std = image.latent_mean.to(device), image.latent_std.to(device)
        image_latents = _sample(mean, std, generators[0], image.scaling_factor).to(dtype).repeat(batch, 1, 1, 1)
    noise = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
    if is_strength_max:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image_latents, noise, latent_timestep)

    pixel_mask = torch.nn.functional.interpolate(mask.mask.to(device, torch.float32), size=shape[2:]).to(dtype)
    m_mean, m_std = mask.masked_latent_mean.to(device), mask.masked_latent_std.to(device)
    masked = _sample(m_mean, m_std, generators[0], image.scaling_factor).to(dtype)
    latent_mask = pixel_mask.repeat(batch, 1, 1, 1)
    masked = masked.repeat(batch, 1, 1, 1)
    if guided:
        latent_mask = torch.cat([latent_mask] * 2)
        masked = torch.cat([masked] * 2)
    return latents, InpaintState(mask=latent_mask, masked_latents=masked, image_latents=image_latents, noise=noise)


def step(jobs: list[DenoiseJob]) -> None:
    """7. One denoising step for every job in ``jobs`` (same variant, latent and embedding shapes) with a
    single UNet forward. A lone job takes exactly the pipeline's path (a scalar timestep, ``set_adapters`` for
    its LoRAs, its ControlNets as ``StableDiffusionControlNetPipeline`` runs them), so a request served alone
    stays bit-identical to diffusers; batched, each row carries its own timestep, and jobs with different LoRA
    sets or ControlNets each get theirs on their own rows."""
    loras = jobs[0].variant.loras
    inputs = [job.model_input() for job in jobs]
    unet = jobs[0].variant.unet
    if len(jobs) == 1:
        (x, t, xc), job = inputs[0], jobs[0]
        loras.activate(job.loras)
        control = controlnets.alone(job.controlnets, job.index, len(job.timesteps), xc, t, job.prompt_embeds)
        noise_pred = unet(x, t, encoder_hidden_states=job.prompt_embeds, **control, return_dict=False)[0]
        job.advance(noise_pred)
        return
    x = torch.cat([x for x, _, _ in inputs])
    t = torch.cat([t.reshape(1).to(x.device).expand(xi.shape[0]) for xi, t, _ in inputs])
    embeds = torch.cat([job.prompt_embeds for job in jobs])
    # ControlNets run outside any LoRA hooks: a LoRA applies to the UNet only, as with pipe.load_lora_weights.
    groups = [
        RowGroup(xi.shape[0], job.controlnets, job.index, len(job.timesteps))
        for job, (xi, _, _) in zip(jobs, inputs, strict=True)
    ]
    # The ControlNets' input is the UNet's, less a 9-channel inpainting UNet's mask and masked-image channels.
    xc = x if all(c is xi for xi, _, c in inputs) else torch.cat([c for _, _, c in inputs])
    control = controlnets.mixed(groups, xc, t, embeds)
    if len({job.loras for job in jobs}) == 1:
        loras.activate(jobs[0].loras)
        noise_pred = unet(x, t, encoder_hidden_states=embeds, **control, return_dict=False)[0]
    else:
        with loras.rows([(xi.shape[0], job.loras) for job, (xi, _, _) in zip(jobs, inputs, strict=True)]):
            noise_pred = unet(x, t, encoder_hidden_states=embeds, **control, return_dict=False)[0]
    for job, part in zip(jobs, noise_pred.split([xi.shape[0] for xi, _, _ in inputs]), strict=True):
        job.advance(part)
