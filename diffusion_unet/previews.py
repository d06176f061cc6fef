"""Previews of the latents while they are denoised: what a person watching a job sees form.

The default is the linear latent -> RGB approximation ComfyUI publishes for SD 1.x (``latent_formats.SD15``):
each pixel's colour is a fixed 4x3 mix of the four latent channels, one matmul on the (h, w) latent grid, so
a preview costs microseconds next to a UNet step. It is 1/8 of the image's size (the latent grid); central
turns it into a small JPEG. Latents with another channel count get no preview.
"""

from __future__ import annotations

import torch

# Rows: latent channels 0-3; columns: R, G, B (ComfyUI comfy/latent_formats.py, class SD15).
SD15_LATENT_RGB_FACTORS = torch.tensor(
    [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ]
)


def latent_preview(latents: torch.Tensor) -> torch.Tensor | None:
    """uint8 (B, h, w, 3) from latents (B, 4, h, w) (the scheduler's current sample), or None for latents that
    are not SD 1.x-shaped."""
    if latents.ndim != 4 or latents.shape[1] != SD15_LATENT_RGB_FACTORS.shape[0]:
        return None
    rgb = latents.detach().float().cpu().permute(0, 2, 3, 1) @ SD15_LATENT_RGB_FACTORS
    return ((rgb + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8).contiguous()


def tiny_vae_preview(decoder: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) from a tiny VAE (diffusers ``AutoencoderTiny``, TAESD): closer to the final image than
    the linear approximation, at the cost of a small decoder forward. TAESD decodes the UNet's latents as they
    are (its scaling factor is 1) into [-1, 1]."""
    param = next(decoder.parameters())
    images = decoder.decode(latents.to(param.device, param.dtype)).sample  # type: ignore[operator]
    return ((images.float().cpu().permute(0, 2, 3, 1) + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8).contiguous()
