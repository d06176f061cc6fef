"""ControlNet per request (SPEC §10) across the split, against ``StableDiffusionControlNetPipeline``.

The ControlNets are made here from the tiny model's own UNet (``ControlNetModel.from_unet``, as ControlNet
training starts), with the convolutions that a fresh ControlNet has zeroed (its residual outputs and the control
image embedding's last layer) filled with random weights: a zero-initialised ControlNet adds nothing, and a
test with one would prove nothing. The embedding's other layers get larger weights too, so that the control
image itself, not only the ControlNet, changes the result. They are saved with ``save_pretrained``, the format
users download.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from fastapi.testclient import TestClient

from central.app import build_app
from diffusion_unet.runtime import UNetRuntime
from shared.serving.models import create_tiny
from shared.settings import Settings
from tests.helpers import (
    assert_envelope,
    counted_forwards,
    decode_all,
    gens,
    latent_pixels,
    local_orchestrator,
    max_diff,
    pipeline_pixels,
    png_b64,
    step_together,
    wire_orchestrator,
)

PROMPT = {"prompt": "a lighthouse", "negative_prompt": "fog", "num_inference_steps": 4}


def make_controlnet(model: Path, out: Path, seed: int, *, embedding: tuple[int, ...] = (8, 8, 16, 16)) -> Path:
    """A ControlNet for ``model``'s UNet, its zero-initialised convolutions randomised, saved to ``out``.
    ``embedding``'s length sets how much the control image is downsampled (2 ** (len - 1): the VAE's factor)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding)
    embedding_convs = [m for m in controlnet.controlnet_cond_embedding.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:  # zero-initialised
            torch.nn.init.normal_(conv.weight, std=0.3)
            torch.nn.init.normal_(conv.bias, std=0.1)
        # The last of these is zero-initialised too; the others get weights large enough that the control
        # image, not only the ControlNet's biases, changes the output.
        for conv in embedding_convs:
            torch.nn.init.normal_(conv.weight, std=0.2)
            torch.nn.init.normal_(conv.bias, std=0.1)
    controlnet.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def controlnet_dirs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("controlnets")
    dirs = {
        "edges": make_controlnet(tiny_model, root / "edges", seed=1),
        "blobs": make_controlnet(tiny_model, root / "blobs", seed=2),
        "third": make_controlnet(tiny_model, root / "third", seed=3),
    }
    # A ControlNet made for another architecture (diffusers' test sizes: other widths, a VAE factor of 2).
    other = create_tiny(tmp_path_factory.mktemp("other") / "m", preset="diffusers-tiny")
    dirs["foreign"] = make_controlnet(other, root / "foreign", seed=4, embedding=(16, 32))
    # A ControlNet whose config fits but whose weights file is not valid safetensors.
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((dirs["edges"] / "config.json").read_text())
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"\xff" * 64)
    dirs["broken"] = broken
    return dirs


@pytest.fixture(scope="module")
def cn_settings(settings: Settings, controlnet_dirs: dict[str, Path]) -> Settings:
    spec = ",".join(f"{name}={path}" for name, path in controlnet_dirs.items())
    return settings.model_copy(update={"controlnets": spec, "controlnet_cache_size": 2})


@pytest.fixture(scope="module")
def stages(cn_settings: Settings, te_runtime: Any, vae_runtime: Any) -> Iterator[dict[str, Any]]:
    unet = UNetRuntime(cn_settings)
    unet.load()
    # Through the stages' real apps and the msgpack codec: the control images cross the wire as between services.
    orch = wire_orchestrator(cn_settings, te_runtime, unet, vae_runtime)
    with TestClient(build_app(cn_settings, orchestrator=orch)) as client:
        yield {"client": client, "unet": unet}
    unet.close()


@pytest.fixture(scope="module")
def control() -> dict[str, PIL.Image.Image]:
    """Two control maps (64x64): rings, and bars; and a photo-like picture for the Canny preprocessor (80x48,
    so the resize to the output size is exercised too)."""
    y, x = np.mgrid[0:64, 0:64]
    rings = ((np.hypot(x - 32, y - 32) // 6) % 2 * 255).astype(np.uint8)
    bars = ((x // 8) % 2 * 255).astype(np.uint8)
    yy, xx = np.mgrid[0:48, 0:80]
    disc = ((xx - 50) ** 2 + (yy - 20) ** 2 < 200) * 200
    photo = np.stack([xx * 3, yy * 5, disc], axis=-1).clip(0, 255).astype(np.uint8)
    gray = [PIL.Image.fromarray(np.stack([a] * 3, axis=-1)) for a in (rings, bars)]
    return {"rings": gray[0], "bars": gray[1], "photo": PIL.Image.fromarray(photo)}


_modules: dict[str, Any] = {}


def controlnet_module(path: Path) -> Any:
    from diffusers import ControlNetModel

    if str(path) not in _modules:
        _modules[str(path)] = ControlNetModel.from_pretrained(str(path))
    return _modules[str(path)]


def reference(
    sd_pipeline: Any, dirs: list[Path], images: list[PIL.Image.Image], seed: int = 5, n: int = 1, **kw: Any
) -> np.ndarray:
    """diffusers: ``StableDiffusionControlNetPipeline`` on the same components (a list of ControlNets makes it a
    ``MultiControlNetModel``)."""
    from diffusers import StableDiffusionControlNetPipeline

    nets = [controlnet_module(d) for d in dirs]
    components = {k: v for k, v in sd_pipeline.components.items() if k != "image_encoder"}
    pipe = StableDiffusionControlNetPipeline(
        **components, controlnet=nets[0] if len(nets) == 1 else nets, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    image = images[0] if len(images) == 1 else images
    return pipeline_pixels(pipe(**PROMPT, image=image, num_images_per_prompt=n, generator=gens(seed, n), **kw))


def body(controlnets: list[dict[str, Any]], seed: int = 5, **extra: Any) -> dict[str, Any]:
    return {**PROMPT, "seed": seed, "controlnets": controlnets, **extra}


def cn(name: str, image: PIL.Image.Image, **extra: Any) -> dict[str, Any]:
    return {"name": name, "image": png_b64(image), **extra}


def test_one_controlnet_is_the_controlnet_pipeline(
    stages: dict[str, Any], sd_pipeline: Any, controlnet_dirs: dict[str, Path], control: dict[str, Any]
) -> None:
    r = stages["client"].post("/v1/txt2img", json=body([cn("edges", control["rings"], scale=0.8)]))
    ours = decode_all(r)
    assert r.json()["parameters"]["controlnets"] == [
        {"name": "edges", "scale": 0.8, "start": 0.0, "end": 1.0, "preprocessor": "none"}
    ]
    ref = reference(sd_pipeline, [controlnet_dirs["edges"]], [control["rings"]], controlnet_conditioning_scale=0.8)
    assert max_diff(ours, ref) == 0
    plain = pipeline_pixels(sd_pipeline(**PROMPT, generator=gens(5, 1)))
    assert max_diff(ours, plain) > 16  # the ControlNet really changed the image


@pytest.mark.parametrize(
    "nets",
    [
        [("edges", "rings", {"scale": 0.7, "end": 0.5}), ("blobs", "bars", {"scale": 1.3, "start": 0.25})],
        [("edges", "rings", {}), ("edges", "bars", {"scale": 0.5}), ("third", "rings", {"start": 0.5})],
    ],
    ids=["two-with-windows", "one-twice-and-a-third"],
)
def test_several_controlnets_are_the_multi_controlnet_pipeline(
    stages: dict[str, Any], sd_pipeline: Any, controlnet_dirs: dict[str, Path], control: dict[str, Any], nets: Any
) -> None:
    """Scales and start/end windows per ControlNet (with 4 steps, each window switches a ControlNet off for some
    steps), and the same ControlNet twice with two images, against ``MultiControlNetModel``; two images per
    request (the control image repeated per image, as ``prepare_image`` does)."""
    specs = [{"scale": 1.0, "start": 0.0, "end": 1.0, **extra} for _, _, extra in nets]
    controlnets = [cn(n, control[i], **x) for (n, i, _), x in zip(nets, specs, strict=True)]
    r = stages["client"].post("/v1/txt2img", json=body(controlnets, num_images=2))
    ref = reference(
        sd_pipeline,
        [controlnet_dirs[n] for n, _, _ in nets],
        [control[i] for _, i, _ in nets],
        n=2,
        controlnet_conditioning_scale=[x["scale"] for x in specs],
        control_guidance_start=[x["start"] for x in specs],
        control_guidance_end=[x["end"] for x in specs],
    )
    assert max_diff(decode_all(r), ref) == 0
    assert stages["unet"].controlnets.loaded <= 2


def canny_by_hand(image: PIL.Image.Image, low: int, high: int) -> PIL.Image.Image:
    """diffusers' ControlNet guide, verbatim."""
    import cv2

    edges = cv2.Canny(np.array(image), low, high)
    edges = edges[:, :, None]
    return PIL.Image.fromarray(np.concatenate([edges, edges, edges], axis=2))


@pytest.mark.parametrize(("size", "strength"), [((64, 64), 0.75), ((72, 56), 0.5)])
def test_img2img_with_a_controlnet_is_the_controlnet_img2img_pipeline(
    stages: dict[str, Any],
    sd_pipeline: Any,
    controlnet_dirs: dict[str, Path],
    control: dict[str, Any],
    init_image: Any,
    size: tuple[int, int],
    strength: float,
) -> None:
    """``/v1/img2img`` with ControlNets = ``StableDiffusionControlNetImg2ImgPipeline`` at the init image's size
    (the control images resized to it), bit for bit."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    image, rings, bars = init_image.resize(size), control["rings"], control["bars"]
    nets = [cn("edges", rings, scale=0.9, end=0.8), cn("blobs", bars, scale=0.6)]
    request = {**body(nets, seed=3), "image": png_b64(image), "strength": strength}
    ours = decode_all(stages["client"].post("/v1/img2img", json=request))
    components = {k: v for k, v in sd_pipeline.components.items() if k != "image_encoder"}
    modules = [controlnet_module(controlnet_dirs[name]) for name in ("edges", "blobs")]
    pipe = StableDiffusionControlNetImg2ImgPipeline(**components, controlnet=modules, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(**PROMPT, image=image, control_image=[rings, bars], strength=strength, height=size[1],
               width=size[0], controlnet_conditioning_scale=[0.9, 0.6], control_guidance_start=[0.0, 0.0],
               control_guidance_end=[0.8, 1.0], generator=gens(3, 1))  # fmt: skip
    assert max_diff(ours, pipeline_pixels(ref)) == 0
    plain = {**request, "controlnets": []}
    assert max_diff(ours, decode_all(stages["client"].post("/v1/img2img", json=plain))) > 2


@pytest.fixture(scope="module")
def inpaint_stages(
    cn_settings: Settings, te_runtime: Any, vae_runtime: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A UNet service hosting a 9-channel inpainting variant beside the base UNet, with the same ControlNets."""
    inpaint_model = create_tiny(tmp_path_factory.mktemp("inpaint") / "m", inpainting=True, seed=3)
    unet = UNetRuntime(cn_settings.model_copy(update={"unet_variants": f"inpainting={inpaint_model}"}))
    unet.load()
    orch = wire_orchestrator(cn_settings, te_runtime, unet, vae_runtime)
    with TestClient(build_app(cn_settings, orchestrator=orch)) as client:
        yield {"client": client, "unet": unet}
    unet.close()


@pytest.mark.parametrize(("model", "strength"), [("base", 0.8), ("inpainting", 1.0), ("inpainting", 0.7)])
def test_inpaint_with_a_controlnet_is_the_controlnet_inpaint_pipeline(
    stages: dict[str, Any],
    inpaint_stages: dict[str, Any],
    sd_pipeline: Any,
    controlnet_dirs: dict[str, Path],
    control: dict[str, Any],
    init_image: Any,
    mask_image: Any,
    model: str,
    strength: float,
) -> None:
    """``/v1/inpaint`` with a ControlNet = ``StableDiffusionControlNetInpaintPipeline``, bit for bit: with the
    base (4-channel) UNet, which blends the known region back, and with a 9-channel inpainting UNet, whose
    ControlNet sees the latents without the mask channels."""
    from diffusers import StableDiffusionControlNetInpaintPipeline

    client, unet = (stages["client"], None) if model == "base" else (inpaint_stages["client"], inpaint_stages["unet"])
    nets = [cn("edges", control["rings"], scale=0.8, start=0.2)]
    request = {**body(nets, seed=4, model=model), "image": png_b64(init_image), "mask_image": png_b64(mask_image),
               "strength": strength}  # fmt: skip
    r = client.post("/v1/inpaint", json=request)
    ours = decode_all(r)
    components = {k: v for k, v in sd_pipeline.components.items() if k != "image_encoder"}
    if unet is not None:
        components["unet"] = unet.variants["inpainting"].unet
    pipe = StableDiffusionControlNetInpaintPipeline(
        **components, controlnet=controlnet_module(controlnet_dirs["edges"]), requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(**PROMPT, image=init_image, mask_image=mask_image, control_image=control["rings"], height=64,
               width=64, strength=strength, controlnet_conditioning_scale=0.8, control_guidance_start=0.2,
               control_guidance_end=1.0, generator=gens(4, 1))  # fmt: skip
    assert max_diff(ours, pipeline_pixels(ref)) == 0
    plain = decode_all(client.post("/v1/inpaint", json={**request, "controlnets": []}))
    assert max_diff(ours, plain) > 2


def test_canny_preprocessor_is_cv2_canny_then_the_pipeline(
    stages: dict[str, Any], sd_pipeline: Any, controlnet_dirs: dict[str, Path], control: dict[str, Any]
) -> None:
    """An 80x48 photo through ``preprocessor: canny``; without width/height the output takes the control image's
    size, as the pipeline's does."""
    spec = cn("edges", control["photo"], preprocessor="canny", low_threshold=50, high_threshold=150)
    r = stages["client"].post("/v1/txt2img", json=body([spec], seed=7))
    ours = decode_all(r)
    assert ours.shape == (1, 48, 80, 3)
    assert r.json()["parameters"]["controlnets"][0] == {
        "name": "edges", "scale": 1.0, "start": 0.0, "end": 1.0, "preprocessor": "canny",
        "low_threshold": 50, "high_threshold": 150,
    }  # fmt: skip
    edges = canny_by_hand(control["photo"], 50, 150)
    assert np.asarray(edges).max() == 255  # the photo has edges
    assert max_diff(ours, reference(sd_pipeline, [controlnet_dirs["edges"]], [edges], seed=7)) == 0


def test_multipart_upload_with_a_controlnet_image_file(
    stages: dict[str, Any], sd_pipeline: Any, controlnet_dirs: dict[str, Path], control: dict[str, Any]
) -> None:
    """Form fields, ``controlnets`` as JSON text, and the control image as the file ``controlnet_image_0``; here
    resized from 80x48 to the requested 64x64. The ControlNet stops half-way: the last steps run without any."""
    buf = io.BytesIO()
    control["photo"].save(buf, format="PNG")
    fields = {k: str(v) for k, v in body([], seed=3, width=64, height=64).items() if k != "controlnets"}
    fields["controlnets"] = '[{"name": "blobs", "scale": 0.9, "end": 0.5}]'
    files = {"controlnet_image_0": ("map.png", buf.getvalue(), "image/png")}
    ours = decode_all(stages["client"].post("/v1/txt2img", data=fields, files=files))
    ref = reference(
        sd_pipeline, [controlnet_dirs["blobs"]], [control["photo"]], seed=3, height=64, width=64,
        controlnet_conditioning_scale=0.9, control_guidance_end=0.5,
    )  # fmt: skip
    assert max_diff(ours, ref) == 0


# ------------------------------------------------------------------------------------------------ batching
def _denoise_requests(te: Any, sets: list[list[tuple[str, str, float]]], steps: list[int], control: Any) -> list[Any]:
    from shared.protocol import DenoiseRequest, EncodeRequest

    e = te.encode(EncodeRequest(prompt=["a lighthouse"], negative_prompt=["fog"]))
    embeds = {"prompt_embeds": e.prompt_embeds, "negative_prompt_embeds": e.negative_prompt_embeds}
    reqs = []
    for i, (nets, n_steps) in enumerate(zip(sets, steps, strict=True)):
        specs = [
            {"name": name, "image": torch.from_numpy(np.asarray(control[image])[None].copy()), "scale": scale}
            for name, image, scale in nets
        ]
        reqs.append(
            DenoiseRequest(
                **embeds, height=64, width=64, num_inference_steps=n_steps, seeds=[11 + i], controlnets=specs
            )
        )
    return reqs


MIXED = [[("edges", "rings", 1.0)], [], [("blobs", "bars", 0.8)], [("edges", "bars", 0.6), ("blobs", "rings", 1.2)]]


def test_different_controlnets_share_one_forward_each_within_two_levels_of_alone(
    stages: dict[str, Any], te_runtime: Any, vae_runtime: Any, control: dict[str, Any]
) -> None:
    """A ControlNet job, a plain one, one with another ControlNet and one with both, different step counts: each
    step is one UNet forward for all of them, and each image is within 2/255 of that request alone (SPEC §8)."""

    unet = stages["unet"]
    reqs = _denoise_requests(te_runtime, MIXED, [4, 3, 4, 2], control)
    alone = [step_together(unet, [r])[0].latents for r in reqs]
    with counted_forwards(unet.variants["base"].unet) as calls:
        jobs = step_together(unet, reqs)
    together = [j.latents for j in jobs]
    # One forward per step of the longest job; the first ones carry 4 requests x 2 guidance rows.
    assert calls == {"n": max(len(j.timesteps) for j in jobs), "rows": 8}

    def pixels(latents: torch.Tensor) -> np.ndarray:
        return latent_pixels(vae_runtime, latents)

    for nets, a, b in zip(MIXED, alone, together, strict=True):
        assert int(np.abs(pixels(a) - pixels(b)).max()) <= 2, nets
    # Each row really got its own ControlNets: alone, those requests differ from the same seed without them.
    plain = _denoise_requests(te_runtime, [[]] * 4, [4, 3, 4, 2], control)
    for nets, req, ours in zip(MIXED, plain, together, strict=True):
        if nets:
            assert int(np.abs(pixels(step_together(unet, [req])[0].latents) - pixels(ours)).max()) > 2, nets


def test_concurrent_requests_with_different_controlnets_each_within_two_levels(
    stages: dict[str, Any], sd_pipeline: Any, controlnet_dirs: dict[str, Path], control: dict[str, Any]
) -> None:
    """Through central and the UNet's batcher: concurrent requests with a ControlNet, none and another one, each
    against diffusers alone (SPEC §8)."""
    from concurrent.futures import ThreadPoolExecutor

    client = stages["client"]
    sets = [[("edges", "rings")], [], [("blobs", "bars")]]
    bodies = [body([cn(n, control[i]) for n, i in nets], seed=9) for nets in sets]
    with ThreadPoolExecutor(3) as pool:
        results = [
            decode_all(f.result(timeout=120)) for f in [pool.submit(client.post, "/v1/txt2img", json=b) for b in bodies]
        ]
    for nets, ours in zip(sets, results, strict=True):
        if nets:
            ref = reference(sd_pipeline, [controlnet_dirs[n] for n, _ in nets], [control[i] for _, i in nets], seed=9)
        else:
            ref = pipeline_pixels(sd_pipeline(**PROMPT, generator=gens(9, 1)))
        assert max_diff(ours, ref) <= 2, nets


# ------------------------------------------------------------------------------------------------ hostile input
def test_hostile_controlnet_requests_are_4xx_and_leave_nothing_behind(
    stages: dict[str, Any], sd_pipeline: Any, control: dict[str, Any]
) -> None:
    client = stages["client"]
    rings = control["rings"]

    def post(nets: list[dict[str, Any]], **extra: Any) -> Any:
        return client.post("/v1/txt2img", json=body(nets, **extra))

    err = assert_envelope(post([cn("nope", rings)]), 404, param="controlnets")
    assert "available: blobs, broken, edges, foreign, third" in err["message"]
    assert_envelope(post([cn("../edges", rings)]), 422, param="controlnets.0.name")
    assert_envelope(post([cn("edges", rings, start=0.6, end=0.6)]), 422, param="controlnets.0")
    assert_envelope(post([cn("edges", rings, end=1.5)]), 422, param="controlnets.0.end")
    assert_envelope(post([cn("edges", rings, scale=float("1e9"))]), 422, param="controlnets.0.scale")
    assert_envelope(post([cn("edges", rings)] * 5), 422, param="controlnets")
    assert_envelope(post([{"name": "edges"}]), 422, param="controlnets.0.image")
    assert_envelope(post([{"name": "edges", "image": "not base64!"}]), 422, param="controlnets.0.image")
    assert_envelope(post([cn("edges", rings, preprocessor="depth")]), 422, param="controlnets.0.preprocessor")
    assert_envelope(post([cn("edges", rings, low_threshold=90, high_threshold=10)]), 422, param="controlnets.0")
    assert_envelope(post([cn("edges", rings, sneaky=1)]), 422, param="controlnets.0.sneaky")
    err = assert_envelope(post([cn("foreign", rings)]), 422, param="controlnets")
    assert "foreign" in err["message"] and "does not fit" in err["message"]
    err = assert_envelope(post([cn("broken", rings)]), 422)
    assert "'broken' is not a valid safetensors file" in err["message"]
    # A control image too small to size the output by.
    err = assert_envelope(post([cn("edges", rings.resize((4, 4)))]), 422, param="controlnets.0.image")
    # Multipart: a control image file without its entry, or with an image in JSON too.
    fields = {"prompt": "a lighthouse", "num_inference_steps": "2", "controlnets": '[{"name": "edges"}]'}
    png = {"controlnet_image_1": ("a.png", io.BytesIO(), "image/png")}
    assert_envelope(client.post("/v1/txt2img", data=fields, files=png), 422, param="controlnet_image_1")
    both = {**fields, "controlnets": f'[{{"name": "edges", "image": "{png_b64(rings)}"}}]'}
    png = {"controlnet_image_0": ("a.png", io.BytesIO(b"x"), "image/png")}
    assert_envelope(client.post("/v1/txt2img", data=both, files=png), 422, param="controlnet_image_0")
    png = {"controlnet_image_0": ("a.png", io.BytesIO(b"x"), "image/png")}
    assert_envelope(
        client.post("/v1/txt2img", data={**fields, "controlnets": "[{"}, files=png), 422, param="controlnets"
    )
    # Nothing was left behind: the next plain request is plain diffusers.
    ours = decode_all(post([]))
    assert max_diff(ours, pipeline_pixels(sd_pipeline(**PROMPT, generator=gens(5, 1)))) == 0


def test_the_unet_stage_refuses_bad_controlnet_conditioning(stages: dict[str, Any], te_runtime: Any) -> None:
    """Straight to ``/v1/denoise`` (msgpack): an image of another size or dtype, a ControlNet on an image task."""
    from diffusion_unet.app import build_app as unet_app
    from shared import wire
    from shared.protocol import EncodeRequest

    e = te_runtime.encode(EncodeRequest(prompt=["a lighthouse"], do_classifier_free_guidance=False))
    good = {"prompt_embeds": e.prompt_embeds, "height": 64, "width": 64, "num_inference_steps": 2,
            "guidance_scale": 1.0, "seeds": [1]}  # fmt: skip
    image = torch.zeros(1, 64, 64, 3, dtype=torch.uint8)
    with TestClient(unet_app(None, stages["unet"])) as client:

        def post(**message: Any) -> Any:
            return client.post("/v1/denoise", content=wire.encode({**good, **message}),
                               headers={"content-type": wire.CONTENT_TYPE})  # fmt: skip

        assert post(controlnets=[{"name": "edges", "image": image}]).status_code == 200
        err = assert_envelope(post(controlnets=[{"name": "edges", "image": image[:, :32]}]), 422)
        assert err["param"] == "controlnets.0.image" and "64" in err["message"]
        assert_envelope(post(controlnets=[{"name": "edges", "image": image.float()}]), 422, param="controlnets.0")
        assert_envelope(post(controlnets=[{"name": "edges"}]), 422, param="controlnets.0.image")
        assert_envelope(post(controlnets=[{"name": "nope", "image": image}]), 404, param="controlnets")
        latents = torch.zeros(1, 4, 8, 8)
        conditioning = {"latent_mean": latents, "latent_std": latents, "strength": 0.5, "scaling_factor": 0.18}
        small = {"name": "edges", "image": image[:, :32, :32]}  # an image task's control image: same checks
        err = assert_envelope(post(controlnets=[small], image=conditioning, guidance_scale=1.0), 422)
        assert err["param"] == "controlnets.0.image"
    info = stages["client"].get("/v1/info").json()["stages"]["diffusion_unet"]["config"]
    assert info["controlnets"] == ["blobs", "broken", "edges", "foreign", "third"]


def test_no_controlnets_configured_is_404(
    settings: Settings, te_runtime: Any, unet_runtime: Any, vae_runtime: Any, control: dict[str, Any]
) -> None:
    orch = local_orchestrator(settings, te_runtime, unet_runtime, vae_runtime)
    with TestClient(build_app(settings, orchestrator=orch)) as client:
        err = assert_envelope(client.post("/v1/txt2img", json=body([cn("edges", control["rings"])])), 404)
    assert err["param"] == "controlnets" and "no ControlNets are configured" in err["message"]


def test_controlnet_settings_are_checked_at_start(tmp_path: Path, controlnet_dirs: dict[str, Path]) -> None:
    """``TRIPTYCH_CONTROLNETS`` parsing, and directories that cannot serve: no config, or pickle weights only."""
    from diffusion_unet.controlnets import ControlNetStore, parse_controlnets

    assert parse_controlnets(" a=/x , b=/y,") == {"a": "/x", "b": "/y"}
    for bad in ("a", "a=", "=x", "a=/x,a=/y", "../a=/x"):
        with pytest.raises(ValueError):
            parse_controlnets(bad)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((controlnet_dirs["edges"] / "config.json").read_text())
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not opened")
    for source in (tmp_path, pickled):
        with pytest.raises(ValueError, match=r"never loaded|no config\.json"):
            ControlNetStore({"x": str(source)}, lambda m: m, capacity=1)


def test_v1_models_lists_the_controlnets_with_the_fingerprint_of_their_weights(
    stages: dict[str, Any], controlnet_dirs: dict[str, Path]
) -> None:
    import hashlib

    listed = {c["name"]: c for c in stages["client"].get("/v1/models").json()["controlnets"]}
    assert sorted(listed) == sorted(controlnet_dirs)
    for name, path in controlnet_dirs.items():
        data = (path / "diffusion_pytorch_model.safetensors").read_bytes()
        assert listed[name] == {"name": name, "fingerprint": hashlib.sha256(data).hexdigest()[:16], "bytes": len(data)}
