"""The VAE stage: latents in, uint8 pixels out; and, for img2img/inpaint, images in, latent moments out."""

from __future__ import annotations

import threading
import time
from typing import Any

import PIL.Image
import torch

from shared.batching import MicroBatcher, Work
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
        # Decodes run on the batcher's thread, image encodes on request threads: one at a time on the VAE.
        self._model_lock = threading.Lock()
        self.decode_batcher = self.own_batcher(
            MicroBatcher(
                "vae-decode",
                self._decode_many,
                key=lambda r: (tuple(r.latents.shape[1:]), r.latents.dtype),
                size=lambda r: int(r.latents.shape[0]),
                max_items=self.settings.max_batch_size,
                start=self.start_model_loop,
            )
        )

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

    def decode(self, request: DecodeRequest) -> DecodeResponse:
        """``latents`` (B, C, h, w) as the UNet returns them -> ``uint8`` images (B, 8h, 8w, 3).

        Concurrent decodes of equal latent shape are micro-batched into one VAE forward.
        """
        self._check_latents(request)
        if self.settings.batching and self.ready:
            return self.decode_batcher.run(request)
        return self._decode_many([request])[0]

    def submit(self, op: str, message: Any, cancel: threading.Event) -> Work | None:
        if op == "decode" and self.settings.batching and self.ready:
            self._check_latents(message)
            return self.decode_batcher.submit(message)
        return None

    def _check_latents(self, request: DecodeRequest) -> None:
        channels = self.vae.config.latent_channels
        if request.latents.shape[1] != channels:
            raise InvalidValue(
                f"`latents` have {request.latents.shape[1]} channels but this VAE takes {channels}", param="latents"
            )

    @torch.inference_mode()
    def _decode_many(self, requests: list[DecodeRequest]) -> list[DecodeResponse]:
        with self._model_lock:
            return self._decode_locked(requests)

    def _decode_locked(self, requests: list[DecodeRequest]) -> list[DecodeResponse]:
        start = time.perf_counter()
        latents = torch.cat([r.latents for r in requests]).to(self.device, self.dtype)
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        # What output_type="pil" does: the processor's float HWC array, then numpy_to_pil's rounding.
        pixels = self.image_processor.postprocess(image, output_type="np")
        # C order here, on the model thread: the processor's HWC array is a view of CHW memory, and gathering
        # it later (to send it) cost 0.8 ms on the event loop for a 512x512 image.
        images = torch.from_numpy((pixels * 255).round().astype("uint8", order="C"))
        elapsed = (time.perf_counter() - start) * 1000
        parts = images.split([int(r.latents.shape[0]) for r in requests])
        return [DecodeResponse(images=part, decode_ms=elapsed) for part in parts]

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
        with self._model_lock:
            return self._encode_image_locked(request, height, width)

    def _encode_image_locked(self, request: EncodeImageRequest, height: int, width: int) -> EncodeImageResponse:
        images = request.images
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

    def stats(self) -> dict[str, tuple[str, str, float]]:
        b = self.decode_batcher
        return {
            **super().stats(),
            "vae_decode_batches": ("counter", "VAE decode forwards", b.batches),
            "vae_largest_decode_batch": ("gauge", "Most requests decoded in one forward", b.largest_batch),
        }
