"""The VAE stage: latents in, uint8 pixels out; and, for img2img/inpaint, images in, latent moments out."""

from __future__ import annotations

import time
from typing import Any

import PIL.Image
import torch

from shared.errors import InvalidValue
from shared.models import fingerprint, load_component
from shared.protocol import DecodeRequest, DecodeResponse, EncodeImageRequest, EncodeImageResponse
from shared.runtime import StageRuntime


class VaeRuntime(StageRuntime):
    """Decodes final latents to images as the pipeline's ``vae.decode`` + ``image_processor.postprocess``."""

    stage = "vae_decoder"

    def _load(self, model: str) -> None:
        from diffusers import AutoencoderKL
        from diffusers.image_processor import VaeImageProcessor

        vae = load_component(AutoencoderKL, model, "vae")
        self.fingerprint = fingerprint(vae)
        # No requires_grad_(False): it changes which CPU kernels run (1e-6 off, 1/255 in pixels), and parity with
        # the pipeline, which leaves it on, is the contract. inference_mode already keeps autograd out.
        self.vae = self.place(vae)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def _warm_up(self) -> None:
        self.decode(DecodeRequest(latents=torch.zeros(1, self.vae.config.latent_channels, 8, 8)))

    def config(self) -> dict[str, Any]:
        cfg = self.vae.config
        return {
            "latent_channels": cfg.latent_channels,
            "vae_scale_factor": self.vae_scale_factor,
            "scaling_factor": cfg.scaling_factor,
            "sample_size": cfg.sample_size,
        }

    @torch.inference_mode()
    def decode(self, request: DecodeRequest) -> DecodeResponse:
        """``latents`` (B, C, h, w) as the UNet returns them -> ``uint8`` images (B, 8h, 8w, 3)."""
        latents = request.latents
        channels = self.vae.config.latent_channels
        if latents.shape[1] != channels:
            raise InvalidValue(
                f"`latents` have {latents.shape[1]} channels but this VAE takes {channels}", param="latents"
            )
        start = time.perf_counter()
        latents = latents.to(self.device, self.dtype)
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        # What output_type="pil" does: the processor's float HWC array, then numpy_to_pil's rounding.
        pixels = self.image_processor.postprocess(image, output_type="np")
        images = torch.from_numpy((pixels * 255).round().astype("uint8"))
        return DecodeResponse(images=images, decode_ms=(time.perf_counter() - start) * 1000)

    @torch.inference_mode()
    def encode_image(self, request: EncodeImageRequest) -> EncodeImageResponse:
        """uint8 images (B, H, W, 3) -> the VAE posterior's mean and std (B, C, H/8, W/8), one image at a time
        as the img2img/inpaint pipelines encode them. With a mask, also the moments of the masked image."""
        images = request.images
        height, width = int(images.shape[1]), int(images.shape[2])
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise InvalidValue(
                f"`images` height and width have to be divisible by {self.vae_scale_factor} but are "
                f"{height} and {width}.",
                param="images",
            )
        start = time.perf_counter()
        # The pipelines' own preprocessing: PIL -> float in [-1, 1]. The size is already final, so no resize.
        pil = [PIL.Image.fromarray(images[i].numpy()) for i in range(images.shape[0])]
        pixels = self.image_processor.preprocess(pil).to(self.device, self.dtype)
        means, stds = self._moments(pixels)
        out: dict[str, Any] = {"latent_mean": means, "latent_std": stds}
        if request.mask is not None:
            condition = request.mask.to(self.device, torch.float32)
            masked = (pixels.float() * (condition < 0.5)).to(self.dtype)
            out["masked_latent_mean"], out["masked_latent_std"] = self._moments(masked)
        if request.seeds is not None:
            samples = []
            for i, seed in enumerate(request.seeds):
                dist = self.vae.encode(pixels[i : i + 1]).latent_dist
                samples.append(dist.sample(torch.Generator("cpu").manual_seed(seed)))
            out["latents"] = self.vae.config.scaling_factor * torch.cat(samples)
        return EncodeImageResponse(**out, encode_ms=(time.perf_counter() - start) * 1000)

    def _moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        means, stds = [], []
        for i in range(pixels.shape[0]):
            dist = self.vae.encode(pixels[i : i + 1]).latent_dist
            means.append(dist.mean.contiguous())
            stds.append(dist.std.contiguous())
        return torch.cat(means), torch.cat(stds)
