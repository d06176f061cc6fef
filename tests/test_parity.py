"""Parity with diffusers: Triptych's split stages must give StableDiffusionPipeline's exact pixels (SPEC §8)."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from central.app import build_app
from shared.protocol import DecodeRequest, DenoiseRequest, EncodeRequest
from tests.conftest import reference_images
from tests.helpers import local_orchestrator, max_diff

# (prompt, negative_prompt, seed, num_images, guidance_scale, steps, scheduler)
CASES = [
    pytest.param("a red fox in the snow", None, 0, 1, 7.5, 4, None, id="default"),
    pytest.param("a red fox in the snow", None, 1234, 1, 7.5, 4, None, id="other-seed"),
    pytest.param("a lighthouse at dusk", "blurry, low quality", 7, 1, 5.0, 3, None, id="negative-prompt"),
    pytest.param("two cats", None, 42, 2, 7.5, 3, None, id="num_images=2"),
    pytest.param("no guidance", None, 3, 2, 1.0, 3, None, id="guidance_scale=1.0"),
    pytest.param("ancestral", None, 11, 2, 7.5, 3, "EulerAncestralDiscreteScheduler", id="euler-a"),
    pytest.param("dpm", "ugly", 5, 1, 6.0, 3, "DPMSolverMultistepScheduler", id="dpm++"),
    pytest.param("ddim", None, 8, 1, 7.5, 3, "DDIMScheduler", id="ddim"),
]


def decode_png(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG" and image.mode == "RGB"
    return np.asarray(image)


@pytest.fixture(scope="module")
def central_local(settings, te_runtime, unet_runtime, vae_runtime):  # type: ignore[no-untyped-def]
    orchestrator = local_orchestrator(settings, te_runtime, unet_runtime, vae_runtime)
    with TestClient(build_app(settings, orchestrator=orchestrator)) as client:
        yield client


def test_encode_matches_pipeline_encode_prompt(te_runtime, sd_pipeline) -> None:  # type: ignore[no-untyped-def]
    ours = te_runtime.encode(EncodeRequest(prompt=["a cat", "a dog"], negative_prompt=["ugly", ""]))
    ref_pos, ref_neg = sd_pipeline.encode_prompt(["a cat", "a dog"], "cpu", 1, True, negative_prompt=["ugly", ""])
    assert torch.equal(ours.prompt_embeds, ref_pos)
    assert torch.equal(ours.negative_prompt_embeds, ref_neg)


def test_encode_without_guidance_sends_no_negative(te_runtime) -> None:  # type: ignore[no-untyped-def]
    out = te_runtime.encode(EncodeRequest(prompt=["a cat"], do_classifier_free_guidance=False))
    assert out.negative_prompt_embeds is None


@pytest.mark.parametrize(("prompt", "negative", "seed", "n", "guidance", "steps", "scheduler"), CASES)
def test_central_matches_diffusers_pixel_for_pixel(
    central_local, sd_pipeline, prompt, negative, seed, n, guidance, steps, scheduler
) -> None:  # type: ignore[no-untyped-def]
    body = {
        "prompt": prompt,
        "negative_prompt": negative,
        "seed": seed,
        "num_images": n,
        "guidance_scale": guidance,
        "num_inference_steps": steps,
        "scheduler": scheduler,
    }
    r = central_local.post("/v1/txt2img", json={k: v for k, v in body.items() if v is not None})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["seeds"] == [seed + i for i in range(n)]
    ours = np.stack([decode_png(b) for b in data["images"]])
    ref = reference_images(
        sd_pipeline,
        prompt=prompt,
        seed=seed,
        num_images=n,
        scheduler=scheduler,
        negative_prompt=negative,
        guidance_scale=guidance,
        num_inference_steps=steps,
    )
    assert max_diff(ours, ref) == 0


def test_stage_calls_match_pipeline_latents(te_runtime, unet_runtime, vae_runtime, sd_pipeline) -> None:  # type: ignore[no-untyped-def]
    """Each hop on its own: final latents equal the pipeline's output_type="latent"."""
    enc = te_runtime.encode(EncodeRequest(prompt=["a boat"]))
    den = unet_runtime.denoise(
        DenoiseRequest(
            prompt_embeds=enc.prompt_embeds,
            negative_prompt_embeds=enc.negative_prompt_embeds,
            num_images_per_prompt=2,
            height=64,
            width=64,
            num_inference_steps=3,
            seeds=[9, 10],
        )
    )
    gens = [torch.Generator("cpu").manual_seed(s) for s in (9, 10)]
    ref = sd_pipeline("a boat", num_images_per_prompt=2, num_inference_steps=3, generator=gens, output_type="latent")
    assert torch.equal(den.latents, ref.images)
    images = vae_runtime.decode(DecodeRequest(latents=den.latents)).images
    assert images.dtype == torch.uint8 and tuple(images.shape) == (2, 64, 64, 3)


def test_image_i_uses_seed_plus_i(central_local) -> None:  # type: ignore[no-untyped-def]
    """The second image of seed s is the first image of seed s+1: users can reproduce any one image."""
    both = central_local.post(
        "/v1/txt2img", json={"prompt": "p", "seed": 100, "num_images": 2, "num_inference_steps": 2}
    ).json()
    second = central_local.post("/v1/txt2img", json={"prompt": "p", "seed": 101, "num_inference_steps": 2}).json()
    assert both["seeds"] == [100, 101]
    assert max_diff(decode_png(both["images"][1]), decode_png(second["images"][0])) == 0
    assert max_diff(decode_png(both["images"][0]), decode_png(second["images"][0])) > 0


def test_four_processes_over_http_match_diffusers(served_all, sd_pipeline) -> None:  # type: ignore[no-untyped-def]
    """The whole topology as separate processes (what `make run` starts) returns diffusers' pixels."""
    body = {
        "prompt": "a castle on a hill",
        "negative_prompt": "fog",
        "seed": 31,
        "num_images": 2,
        "num_inference_steps": 4,
        "guidance_scale": 6.5,
    }
    r = httpx.post(f"{served_all}/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    ours = np.stack([decode_png(b) for b in r.json()["images"]])
    ref = reference_images(
        sd_pipeline,
        prompt=body["prompt"],
        seed=31,
        num_images=2,
        negative_prompt="fog",
        guidance_scale=6.5,
        num_inference_steps=4,
    )
    assert max_diff(ours, ref) == 0

    # The README's curl: `Accept: image/png` gives the PNG itself.
    r = httpx.post(
        f"{served_all}/v1/txt2img",
        json={"prompt": "a fox", "seed": 42, "num_inference_steps": 3},
        headers={"Accept": "image/png"},
        timeout=120,
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-seed"] == "42"
    ours = np.asarray(Image.open(io.BytesIO(r.content)))
    ref = reference_images(sd_pipeline, prompt="a fox", seed=42, num_inference_steps=3)[0]
    assert max_diff(ours, ref) == 0
