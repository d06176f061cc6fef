"""Parity with diffusers that does not depend on the machine the tests happen to run on.

oneDNN picks convolution kernels by CPU, memory layout and thread count, so a divergence can hide on one
machine and show on another: on some CPUs diffusers' VAE encoder returns its posterior moments channels-last,
the pipeline's init latents are then channels-last, and a UNet fed the same values in C order runs other
kernels (1/255 off). These tests force the layouts and thread counts other machines produce, and serve a
model whose VAE downsamples by 2 (diffusers' own test sizes) next to the 8x tiny model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from central.app import build_app
from shared import wire
from shared.serving.models import create_tiny
from shared.settings import Settings
from tests.helpers import (
    decode_all,
    gens,
    load_runtimes,
    local_orchestrator,
    max_diff,
    pipeline_pixels,
    png_b64,
    wire_orchestrator,
)


def pipelines(model: Path | str, variant_unet: Any = None) -> dict[str, Any]:
    """diffusers' own txt2img / img2img / inpaint pipelines on one set of components."""
    import diffusers

    base = diffusers.StableDiffusionPipeline.from_pretrained(str(model))
    out = {"txt2img": base}
    out["img2img"] = diffusers.StableDiffusionImg2ImgPipeline(**base.components)
    out["inpaint"] = diffusers.StableDiffusionInpaintPipeline(**base.components)
    if variant_unet is not None:
        out["inpaint9"] = diffusers.StableDiffusionInpaintPipeline(**{**base.components, "unet": variant_unet})
    for pipe in out.values():
        pipe.set_progress_bar_config(disable=True)
    return out


def force_moments_layout(layout: torch.memory_format, *vaes: Any) -> list[Any]:
    """Make each VAE's encoder return its posterior moments in ``layout``. Which one a CPU gives depends on
    oneDNN's choices (the pipelines' preprocessed image is itself channels-last in memory): force each."""
    return [
        vae.quant_conv.register_forward_hook(lambda m, i, out: out.contiguous(memory_format=layout)) for vae in vaes
    ]


def reference(pipes: dict[str, Any], task: str, image: Any, mask: Any, seed: int, n: int) -> np.ndarray:
    kwargs: dict[str, Any] = {"num_inference_steps": 4, "num_images_per_prompt": n, "generator": gens(seed, n)}
    if task == "img2img":
        out = pipes["img2img"]("a painting", image=image, strength=0.7, **kwargs)
    else:
        out = pipes[task]("a painting", image=image, mask_image=mask, height=64, width=64, strength=0.8, **kwargs)
    return pipeline_pixels(out)


def request(task: str, image: Any, mask: Any, seed: int, n: int) -> dict[str, Any]:
    body = {"prompt": "a painting", "image": png_b64(image), "seed": seed, "num_images": n, "num_inference_steps": 4}
    if task == "img2img":
        return {**body, "strength": 0.7}
    return {**body, "mask_image": png_b64(mask), "strength": 0.8}


# ------------------------------------------------------------------------------------------- layout, threads
@pytest.fixture(scope="module", params=[1, 3], ids=["1-thread", "3-threads"])
def threaded(request: pytest.FixtureRequest, settings: Settings, tiny_model: Path) -> Iterator[dict[str, Any]]:
    """Runtimes computing with ``n`` torch threads, and diffusers' pipelines run with ``n`` too."""
    n = request.param
    before = torch.get_num_threads()
    runtimes = load_runtimes(settings.model_copy(update={"cpu_threads": n}))
    torch.set_num_threads(n)  # this thread's (the reference pipelines') own OpenMP pool
    try:
        yield {"threads": n, "settings": settings, "pipes": pipelines(tiny_model), **runtimes}
    finally:
        torch.set_num_threads(before)
        for rt in (runtimes["te"], runtimes["unet"], runtimes["vae"]):
            rt.close()


@pytest.mark.parametrize("transport", ["wire", "local"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_image_tasks_match_diffusers_whatever_the_vae_layout(
    threaded: dict[str, Any], init_image: Any, mask_image: Any, transport: str, layout: str, task: str
) -> None:
    pipes, vae_rt = threaded["pipes"], threaded["vae"]
    make = wire_orchestrator if transport == "wire" else local_orchestrator
    orch = make(threaded["settings"], threaded["te"], threaded["unet"], vae_rt)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    hooks = force_moments_layout(memory_format, vae_rt.vae, pipes["txt2img"].vae)
    try:
        # The forced layout really is what both VAEs now produce for the image as the pipelines preprocess it.
        probe = pipes["img2img"].image_processor.preprocess(init_image)
        for vae in (vae_rt.vae, pipes["txt2img"].vae):
            with torch.inference_mode():
                mean = vae.encode(probe).latent_dist.mean
            assert wire.dim_order(mean) == ((0, 2, 3, 1) if layout == "channels_last" else (0, 1, 2, 3)), mean.stride()
        with TestClient(build_app(threaded["settings"], orchestrator=orch)) as client:
            ours = decode_all(client.post(f"/v1/{task}", json=request(task, init_image, mask_image, 7, 2)))
        ref = reference(pipes, task, init_image, mask_image, 7, 2)
    finally:
        for hook in hooks:
            hook.remove()
    assert max_diff(ours, ref) == 0


def test_txt2img_matches_diffusers_at_any_thread_count(threaded: dict[str, Any]) -> None:
    orch = wire_orchestrator(threaded["settings"], threaded["te"], threaded["unet"], threaded["vae"])
    body = {"prompt": "a harbour", "negative_prompt": "fog", "seed": 9, "num_images": 2, "num_inference_steps": 4}
    with TestClient(build_app(threaded["settings"], orchestrator=orch)) as client:
        ours = decode_all(client.post("/v1/txt2img", json=body))
    pipe = threaded["pipes"]["txt2img"]
    ref = pipe("a harbour", negative_prompt="fog", num_inference_steps=4, num_images_per_prompt=2, generator=gens(9, 2))
    assert max_diff(ours, pipeline_pixels(ref)) == 0


@pytest.fixture(scope="module")
def adapter_files(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.test_controlnet import make_controlnet
    from tests.test_loras import make_lora

    loras = tmp_path_factory.mktemp("loras")
    make_lora(tiny_model, loras, "ink", seed=1)
    make_lora(tiny_model, loras, "convs", seed=2, text_encoder=False, targets=("conv1", "conv2"))
    return {"loras": loras, "edges": make_controlnet(tiny_model, tmp_path_factory.mktemp("cn") / "edges", seed=1)}


@pytest.mark.parametrize("threads", [1, 3])
def test_loras_and_a_controlnet_match_diffusers_at_any_thread_count(
    settings: Settings, tiny_model: Path, adapter_files: dict[str, Path], threads: int
) -> None:
    """Two weighted LoRAs (one on the resnets' convolutions) and a ControlNet in one request, with the stages
    and the pipeline computing on 1 or 3 threads: still bit-identical to the ControlNet pipeline with the
    LoRAs loaded by ``pipe.load_lora_weights``."""
    import diffusers
    import PIL.Image

    from tests.test_controlnet import controlnet_module

    update = {"cpu_threads": threads, "lora_dir": adapter_files["loras"],
              "controlnets": f"edges={adapter_files['edges']}"}  # fmt: skip
    adapted = settings.model_copy(update=update)
    runtimes = load_runtimes(adapted)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    y, x = np.mgrid[0:64, 0:64]
    rings = PIL.Image.fromarray(np.stack([((np.hypot(x - 32, y - 32) // 6) % 2 * 255).astype(np.uint8)] * 3, -1))
    try:
        orch = wire_orchestrator(adapted, runtimes["te"], runtimes["unet"], runtimes["vae"])
        body = {"prompt": "a harbour", "negative_prompt": "fog", "seed": 4, "num_inference_steps": 4,
                "loras": [{"name": "ink", "weight": 0.7}, {"name": "convs", "weight": 1.1}],
                "controlnets": [{"name": "edges", "image": png_b64(rings), "scale": 0.8}]}  # fmt: skip
        with TestClient(build_app(adapted, orchestrator=orch)) as client:
            ours = decode_all(client.post("/v1/txt2img", json=body))
        base = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_model))
        components = {k: v for k, v in base.components.items() if k != "image_encoder"}
        pipe = diffusers.StableDiffusionControlNetPipeline(
            **components, controlnet=controlnet_module(adapter_files["edges"]), requires_safety_checker=False
        )
        pipe.set_progress_bar_config(disable=True)
        for name in ("ink", "convs"):
            pipe.load_lora_weights(str(adapter_files["loras"] / f"{name}.safetensors"), adapter_name=name)
        pipe.set_adapters(["ink", "convs"], [0.7, 1.1])
        ref = pipe("a harbour", negative_prompt="fog", image=rings, num_inference_steps=4,
                   controlnet_conditioning_scale=0.8, generator=gens(4, 1))  # fmt: skip
    finally:
        torch.set_num_threads(before)
        for rt in runtimes.values():
            rt.close()
    assert max_diff(ours, pipeline_pixels(ref)) == 0


def test_txt2img_with_channels_last_modules_matches_diffusers(settings: Settings, tiny_model: Path) -> None:
    """TRIPTYCH_CHANNELS_LAST (the CUDA default) against a pipeline whose UNet and VAE are channels-last too:
    whatever layout the latents come out of the UNet in, they must reach the VAE in it."""
    cl = load_runtimes(settings.model_copy(update={"channels_last": True}))
    pipe = pipelines(tiny_model)["txt2img"]
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    try:
        orch = wire_orchestrator(settings, cl["te"], cl["unet"], cl["vae"])
        with TestClient(build_app(settings, orchestrator=orch)) as client:
            ours = decode_all(client.post("/v1/txt2img", json={"prompt": "a harbour", "seed": 3, "num_images": 2,
                                                           "num_inference_steps": 4}))  # fmt: skip
        ref = pipeline_pixels(pipe("a harbour", num_inference_steps=4, num_images_per_prompt=2, generator=gens(3, 2)))
    finally:
        for rt in cl.values():
            rt.close()
    assert max_diff(ours, ref) == 0


# ------------------------------------------------------------------------------------------- VAE factor 2
@pytest.fixture(scope="module")
def factor2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """diffusers' test-sized model (VAE factor 2, 32x32 latents for 64x64 images) with a 9-channel
    inpainting variant, served through the wire."""
    root = tmp_path_factory.mktemp("factor2")
    model = create_tiny(root / "base", preset="diffusers-tiny")
    inpainting = create_tiny(root / "inpainting", preset="diffusers-tiny", inpainting=True, seed=1)
    settings = Settings(
        model=str(model), cache_dir=root / "cache", device="cpu", unet_variants=f"inpainting={inpainting}"
    )
    runtimes = load_runtimes(settings)
    orch = wire_orchestrator(settings, runtimes["te"], runtimes["unet"], runtimes["vae"])
    pipes = pipelines(model, variant_unet=runtimes["unet"].variants["inpainting"].unet)
    with TestClient(build_app(settings, orchestrator=orch)) as client:
        yield {"client": client, "pipes": pipes, **runtimes}
    for rt in runtimes.values():
        rt.close()


def test_a_vae_that_downsamples_by_two_is_served(factor2: dict[str, Any]) -> None:
    client = factor2["client"]
    assert client.get("/readyz").status_code == 200, client.get("/readyz").text
    stages = client.get("/v1/info").json()["stages"]
    assert stages["diffusion_unet"]["config"]["vae_scale_factor"] == 2
    assert stages["vae_decoder"]["config"]["vae_scale_factor"] == 2
    # The default size is the UNet's native one: 32 latents x 2.
    body = {"prompt": "a lighthouse", "seed": 11, "num_inference_steps": 3}
    r = client.post("/v1/txt2img", json=body)
    ours = decode_all(r)
    assert r.json()["parameters"]["width"] == r.json()["parameters"]["height"] == 64
    ref = factor2["pipes"]["txt2img"]("a lighthouse", num_inference_steps=3, generator=gens(11, 1))
    assert max_diff(ours, pipeline_pixels(ref)) == 0
    # Sizes are multiples of 2 now, not of 8: 66x62 is a valid request.
    r = client.post("/v1/txt2img", json={**body, "width": 66, "height": 62})
    assert decode_all(r).shape == (1, 62, 66, 3)
    r = client.post("/v1/txt2img", json={**body, "width": 65})
    assert r.status_code == 422 and r.json()["error"]["param"] == "width"


@pytest.mark.parametrize("task", ["img2img", "inpaint", "inpaint9"])
def test_image_tasks_with_a_vae_that_downsamples_by_two(
    factor2: dict[str, Any], init_image: Any, mask_image: Any, task: str
) -> None:
    body = request("img2img" if task == "img2img" else "inpaint", init_image, mask_image, 5, 1)
    body["model"] = "inpainting" if task == "inpaint9" else "base"
    r = factor2["client"].post(f"/v1/{'img2img' if task == 'img2img' else 'inpaint'}", json=body)
    ours = decode_all(r)
    assert r.json()["parameters"]["model"] == body["model"]
    assert max_diff(ours, reference(factor2["pipes"], task, init_image, mask_image, 5, 1)) == 0
