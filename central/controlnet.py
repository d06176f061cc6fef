"""Control images for ControlNet requests (SPEC §10): decode, preprocess, resize, as the diffusers pipeline would.

``StableDiffusionControlNetPipeline`` takes a control image (a PIL image of edges, depth, pose, ...) and
resizes it to ``height`` x ``width`` with its control image processor
(``VaeImageProcessor(do_convert_rgb=True, do_normalize=False)``). Central does that part and sends the resized
``uint8`` pixels; the UNet service scales them to [0, 1] exactly as that processor does (``ControlNetConditioning``).

Preprocessors turn a photo into the map a ControlNet was trained on, before the resize:

* ``none``: the image already is the control map.
* ``canny``: OpenCV's Canny edge detector with ``low_threshold`` / ``high_threshold``, the edges copied to three
  channels, as diffusers' ControlNet guide does (``cv2.Canny(np.array(image), low, high)``).

Others (depth, normal maps, OpenPose, line art, segmentation) need models of their own (``controlnet_aux``);
they are later work. A client can run them itself and send the map with ``preprocessor: "none"``.

Decoding, preprocessing and resizing are CPU work: call :func:`control_images` and :func:`conditionings` off the
event loop.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

from central.images import decode_image
from shared.errors import InvalidValue
from shared.protocol import MAX_CONTROLNETS, ControlNetConditioning, ControlNetSpec

#: Multipart: the control image of ``controlnets[i]`` is the file field ``controlnet_image_<i>``.
FILE_FIELD = re.compile(r"^controlnet_image_(0|[1-9][0-9]?)$")


def canny(image: PIL.Image.Image, low_threshold: int, high_threshold: int) -> PIL.Image.Image:
    """Canny edges of an RGB image as a 3-channel RGB image (white edges on black), as diffusers' guide makes
    them for ``lllyasviel/sd-controlnet-canny``."""
    import cv2  # OpenCV is only needed by this preprocessor

    edges = cv2.Canny(np.array(image), low_threshold, high_threshold)
    edges = edges[:, :, None]
    return PIL.Image.fromarray(np.concatenate([edges, edges, edges], axis=2))


def control_pixels(image: PIL.Image.Image, width: int, height: int, vae_scale_factor: int) -> np.ndarray:
    """The pipeline's control image processor up to its ``pil_to_numpy``: resize (Lanczos) to ``width`` x
    ``height``, then RGB; uint8 (1, H, W, 3)."""
    processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor, do_convert_rgb=True, do_normalize=False)
    resized = processor.convert_to_rgb(processor.resize(image, height, width))
    return np.asarray(resized, dtype=np.uint8)[None].copy()


def control_images(specs: list[ControlNetSpec], *, max_bytes: int, max_pixels: int) -> list[PIL.Image.Image]:
    """Each ControlNet's control image decoded (``decode_image``'s limits and formats) and preprocessed, at its
    own size."""
    out = []
    for i, spec in enumerate(specs):
        image = decode_image(spec.image, param=f"controlnets.{i}.image", max_bytes=max_bytes, max_pixels=max_pixels)
        if spec.preprocessor == "canny":
            image = canny(image, spec.low_threshold, spec.high_threshold)
        out.append(image)
    return out


def default_size(
    image: PIL.Image.Image, width: int | None, height: int | None, vae_scale_factor: int
) -> tuple[int, int]:
    """``(width, height)``: the request's, else the first control image's rounded down to a multiple of the VAE
    factor, as ``StableDiffusionControlNetPipeline`` sizes its output when called without them."""
    processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor)
    default_h, default_w = processor.get_default_height_width(image)
    if (width is None and default_w < vae_scale_factor) or (height is None and default_h < vae_scale_factor):
        raise InvalidValue(
            f"`controlnets.0.image` is {image.width}x{image.height}; without `width` and `height` the output takes "
            f"its size, and the smallest is {vae_scale_factor}",
            param="controlnets.0.image",
        )
    return width or default_w, height or default_h


def conditionings(
    specs: list[ControlNetSpec], images: list[PIL.Image.Image], width: int, height: int, vae_scale_factor: int
) -> list[ControlNetConditioning]:
    """The UNet's ControlNet conditioning: each control image resized to the output size."""
    return [
        ControlNetConditioning(
            name=spec.name,
            image=torch.from_numpy(control_pixels(image, width, height, vae_scale_factor)),
            scale=spec.scale,
            start=spec.start,
            end=spec.end,
        )
        for spec, image in zip(specs, images, strict=True)
    ]


def attach_form_images(data: dict[str, Any]) -> None:
    """Multipart: move each ``controlnet_image_<i>`` file into ``data["controlnets"][i]["image"]`` (``controlnets``
    already parsed from its JSON form field). A file without its entry, or an entry with an image both ways, is
    a 422 naming the field."""
    files = {int(m.group(1)): (key, data.pop(key)) for key in list(data) if (m := FILE_FIELD.match(key))}
    if not files:
        return
    specs = data.get("controlnets")
    if not isinstance(specs, list):
        first = files[min(files)][0]
        raise InvalidValue(f"`{first}` needs a `controlnets` form field (a JSON list) to belong to", param=first)
    for i, (key, content) in sorted(files.items()):
        if i >= min(len(specs), MAX_CONTROLNETS) or not isinstance(specs[i], dict):
            raise InvalidValue(f"`{key}` has no entry `controlnets[{i}]` to belong to", param=key)
        if "image" in specs[i]:
            raise InvalidValue(f"`controlnets[{i}]` has an `image` and a `{key}` file; send one", param=key)
        specs[i]["image"] = content
