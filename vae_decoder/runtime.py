"""The VAE stage: latents in, uint8 pixels out; and, for img2img/inpaint, images in, latent moments out."""

from __future__ import annotations

import time
from typing import Any

import PIL.Image
import torch

from shared.errors import InvalidValue, NumericalError
from shared.operations import DECODE, ENCODE_IMAGE, Operation
from shared.protocol import DecodeRequest, DecodeResponse, EncodeImageRequest, EncodeImageResponse, finite
from shared.serving.batching import Batcher, MicroBatcher
from shared.serving.models import fingerprint, load_component
from shared.serving.runtime import StageRuntime


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

    def _make_batchers(self) -> dict[Operation[Any, Any], Batcher[Any, Any]]:
        self.decode_batcher = MicroBatcher(
            "vae-decode",
            self.worker,
            self.decode_batch,
            key=lambda r: (tuple(r.latents.shape[1:]), r.latents.dtype),
            size=lambda r: int(r.latents.shape[0]),
            max_items=self.max_batch,
            check=self._check_latents,
        )
        # The pipelines encode init images one at a time (each with its own generator): nothing to share.
        self.encode_image_batcher = MicroBatcher(
            "vae-encode-image", self.worker, self.encode_image_batch, max_items=1, check=self._check_images
        )
        return {DECODE: self.decode_batcher, ENCODE_IMAGE: self.encode_image_batcher}

    def _warm_up(self) -> None:
        self.decode_batch([DecodeRequest(latents=torch.zeros(1, self.vae.config.latent_channels, 8, 8))])

    def config(self) -> dict[str, Any]:
        cfg = self.vae.config
        return {
            "latent_channels": cfg.latent_channels,
            "vae_scale_factor": self.vae_scale_factor,
            "scaling_factor": cfg.scaling_factor,
            "sample_size": cfg.sample_size,
        }

    def decode(self, request: DecodeRequest) -> DecodeResponse:
        """``DECODE`` through the batcher, blocking this thread until it is done."""
        return self.run(DECODE, request)

    def encode_image(self, request: EncodeImageRequest) -> EncodeImageResponse:
        """``ENCODE_IMAGE`` through the batcher, blocking this thread until it is done."""
        return self.run(ENCODE_IMAGE, request)

    def _check_latents(self, request: DecodeRequest) -> None:
        b, _, h, w = request.latents.shape
        self.check_bounds(int(b), int(h) * self.vae_scale_factor, int(w) * self.vae_scale_factor, param="latents")
        channels = self.vae.config.latent_channels
        if request.latents.shape[1] != channels:
            raise InvalidValue(
                f"`latents` have {request.latents.shape[1]} channels but this VAE takes {channels}", param="latents"
            )

    def _check_images(self, request: EncodeImageRequest) -> None:
        height, width = int(request.images.shape[1]), int(request.images.shape[2])
        self.check_bounds(int(request.images.shape[0]), height, width, param="images")
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise InvalidValue(
                f"`images` height and width have to be divisible by {self.vae_scale_factor} but are "
                f"{height} and {width}.",
                param="images",
            )

    @torch.inference_mode()
    def decode_batch(self, requests: list[DecodeRequest]) -> list[DecodeResponse]:
        """Latents (B, C, h, w) as the UNet returns them -> ``uint8`` images (B, h * factor, w * factor, 3),
        as the pipeline's ``vae.decode`` + ``image_processor.postprocess`` + ``numpy_to_pil``; all requests in
        one VAE forward."""
        start = time.perf_counter()
        # Each request's latents as the UNet sent them, layout included (SPEC §8): a lone request is decoded
        # from exactly the tensor the pipeline would decode.
        latents = requests[0].latents if len(requests) == 1 else torch.cat([r.latents for r in requests])
        latents = latents.to(self.device, self.dtype)
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        if not finite(image):  # float16 SD VAEs overflow: a black image must not be a 200
            raise NumericalError(
                f"the VAE decoded NaN or infinite pixels (dtype {self.dtype}); SD's VAE overflows in float16: serve "
                "the VAE in float32 (TRIPTYCH_DTYPE=float32) or use an fp16-fixed VAE"
            )
        # What output_type="pil" does: the processor's float HWC array, then numpy_to_pil's rounding.
        pixels = self.image_processor.postprocess(image, output_type="np")
        # C order here, on the model thread: the processor's HWC array is a view of CHW memory, and gathering
        # it later (to send it) cost 0.8 ms on the event loop for a 512x512 image.
        images = torch.from_numpy((pixels * 255).round().astype("uint8", order="C"))
        elapsed = (time.perf_counter() - start) * 1000
        parts = images.split([int(r.latents.shape[0]) for r in requests])
        return [DecodeResponse(images=part, decode_ms=elapsed) for part in parts]

    @torch.inference_mode()
    def encode_image_batch(self, requests: list[EncodeImageRequest]) -> list[EncodeImageResponse]:
        """uint8 images (B, H, W, 3) -> the VAE posterior's mean and std (B, C, H/f, W/f), one image at a time
        as the img2img/inpaint pipelines encode them. With a mask, also the moments of the masked image."""
        return [self._encode_image(request) for request in requests]

    def _encode_image(self, request: EncodeImageRequest) -> EncodeImageResponse:
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
        """Each image's posterior mean and std, in the memory layout the VAE produced them in: the UNet samples
        init latents from them, and on CPUs where the VAE answers channels-last the pipeline's init latents,
        and so the UNet's first input, are channels-last too (the wire keeps the layout)."""
        if pixels.shape[0] == 1:
            dist = self.vae.encode(pixels).latent_dist
            return dist.mean, dist.std
        dists = [self.vae.encode(pixels[i : i + 1]).latent_dist for i in range(pixels.shape[0])]
        return torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])

    def stats(self) -> dict[str, tuple[str, str, float]]:
        b = self.decode_batcher
        return {
            **super().stats(),
            "vae_decode_batches": ("counter", "VAE decode forwards", b.batches),
            "vae_largest_decode_batch": ("gauge", "Most requests decoded in one forward", b.largest_batch),
        }
