"""img2img, inpaint (4- and 9-channel UNets), outpaint and the scheduler catalogue, against diffusers' pipelines."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from central.app import build_app
from central.pipeline import outpaint_canvas
from diffusion_unet.runtime import UNetRuntime
from shared.serving.models import create_tiny
from shared.settings import Settings
from tests.helpers import decode_all, gens, local_orchestrator, max_diff, pipeline_pixels, png_b64


@pytest.fixture(scope="module")
def inpaint_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny(tmp_path_factory.mktemp("inpaint") / "tiny-inpaint", inpainting=True, seed=3)


@pytest.fixture(scope="module")
def unet_with_variant(settings: Settings, inpaint_model: Path):  # type: ignore[no-untyped-def]
    rt = UNetRuntime(settings.model_copy(update={"unet_variants": f"inpainting={inpaint_model}"}))
    rt.load()
    yield rt
    rt.close()


def _client(settings, te, unet, vae) -> TestClient:  # type: ignore[no-untyped-def]
    return TestClient(build_app(settings, orchestrator=local_orchestrator(settings, te, unet, vae)))


@pytest.fixture(scope="module")
def central_base(settings, te_runtime, unet_runtime, vae_runtime):  # type: ignore[no-untyped-def]
    with _client(settings, te_runtime, unet_runtime, vae_runtime) as client:
        yield client


@pytest.fixture(scope="module")
def central_variant(settings, te_runtime, unet_with_variant, vae_runtime):  # type: ignore[no-untyped-def]
    with _client(settings, te_runtime, unet_with_variant, vae_runtime) as client:
        yield client


@pytest.fixture(scope="module")
def img2img_pipe(sd_pipeline):  # type: ignore[no-untyped-def]
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**sd_pipeline.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inpaint_pipe(sd_pipeline, unet=None, scheduler: str | None = None):  # type: ignore[no-untyped-def]
    import diffusers

    components = dict(sd_pipeline.components)
    if unet is not None:
        components["unet"] = unet
    if scheduler:
        components["scheduler"] = getattr(diffusers, scheduler).from_config(sd_pipeline.scheduler.config)
    pipe = diffusers.StableDiffusionInpaintPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------- img2img
@pytest.mark.parametrize(("size", "strength", "n", "seed"), [((64, 64), 0.6, 2, 4), ((70, 66), 0.8, 1, 9)])
def test_img2img_matches_diffusers(central_base, img2img_pipe, init_image, size, strength, n, seed) -> None:  # type: ignore[no-untyped-def]
    image = init_image.resize(size)
    body = {"prompt": "a painting", "image": png_b64(image), "strength": strength, "num_images": n, "seed": seed,
            "num_inference_steps": 5}  # fmt: skip
    ours = decode_all(central_base.post("/v1/img2img", json=body))
    ref = img2img_pipe("a painting", image=image, strength=strength, num_inference_steps=5,
                       num_images_per_prompt=n, generator=gens(seed, n), output_type="pil")  # fmt: skip
    # 70x66 comes back 64x64: the image's size rounded down to a multiple of 8, as diffusers does.
    assert ours.shape == (n, 64, 64, 3)
    assert max_diff(ours, pipeline_pixels(ref)) == 0


def test_img2img_multipart_upload_over_real_http(served_all, img2img_pipe, init_image) -> None:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    init_image.save(buf, format="PNG")
    r = httpx.post(
        f"{served_all}/v1/img2img",
        data={"prompt": "a painting", "strength": "0.7", "seed": "21", "num_inference_steps": "4"},
        files={"image": ("in.png", buf.getvalue(), "image/png")},
        timeout=120,
    )
    ours = decode_all(r)
    assert r.json()["parameters"]["strength"] == 0.7
    ref = img2img_pipe("a painting", image=init_image, strength=0.7, num_inference_steps=4, generator=gens(21, 1))
    assert max_diff(ours, pipeline_pixels(ref)) == 0


# ------------------------------------------------------------------------------------------- inpaint
@pytest.mark.parametrize(
    ("strength", "n", "scheduler"),
    [(1.0, 2, None), (0.75, 1, None), (1.0, 2, "EulerAncestralDiscreteScheduler")],
)
def test_inpaint_four_channel_blending_matches_diffusers(
    central_base, sd_pipeline, init_image, mask_image, strength, n, scheduler
) -> None:  # type: ignore[no-untyped-def]
    body = {"prompt": "a red door", "image": png_b64(init_image), "mask_image": png_b64(mask_image),
            "strength": strength, "num_images": n, "seed": 13, "num_inference_steps": 4,
            "scheduler": scheduler}  # fmt: skip
    r = central_base.post("/v1/inpaint", json={k: v for k, v in body.items() if v is not None})
    ours = decode_all(r)
    assert r.json()["parameters"]["model"] == "base"
    pipe = inpaint_pipe(sd_pipeline, scheduler=scheduler)
    ref = pipe("a red door", image=init_image, mask_image=mask_image, height=64, width=64, strength=strength,
               num_inference_steps=4, num_images_per_prompt=n, generator=gens(13, n))  # fmt: skip
    assert max_diff(ours, pipeline_pixels(ref)) == 0


@pytest.mark.parametrize(("strength", "n"), [(1.0, 2), (0.8, 1)])
def test_inpaint_nine_channel_variant_matches_diffusers(
    central_variant, unet_with_variant, sd_pipeline, init_image, mask_image, strength, n
) -> None:  # type: ignore[no-untyped-def]
    body = {"prompt": "a red door", "image": png_b64(init_image), "mask_image": png_b64(mask_image),
            "strength": strength, "num_images": n, "seed": 2, "num_inference_steps": 4}  # fmt: skip
    r = central_variant.post("/v1/inpaint", json=body)
    ours = decode_all(r)
    assert r.json()["parameters"]["model"] == "inpainting"  # chosen because the UNet service hosts it
    pipe = inpaint_pipe(sd_pipeline, unet=unet_with_variant.variants["inpainting"].unet)
    assert pipe.unet.config.in_channels == 9
    ref = pipe("a red door", image=init_image, mask_image=mask_image, height=64, width=64, strength=strength,
               num_inference_steps=4, num_images_per_prompt=n, generator=gens(2, n))  # fmt: skip
    assert max_diff(ours, pipeline_pixels(ref)) == 0


def test_outpaint_is_inpaint_on_the_built_canvas(central_variant, unet_with_variant, sd_pipeline, init_image) -> None:  # type: ignore[no-untyped-def]
    small = init_image.resize((48, 40))
    body = {"prompt": "a wide view", "image": png_b64(small), "left": 8, "right": 8, "top": 16, "bottom": 8,
            "seed": 6, "num_inference_steps": 4}  # fmt: skip
    r = central_variant.post("/v1/outpaint", json=body)
    ours = decode_all(r)
    assert ours.shape == (1, 64, 64, 3)
    canvas, mask = outpaint_canvas(small, 8, 8, 16, 8)
    assert np.asarray(mask)[16:56, 8:56].max() == 0 and np.asarray(mask)[:16].min() == 255
    assert np.array_equal(np.asarray(canvas)[16:56, 8:56], np.asarray(small))
    pipe = inpaint_pipe(sd_pipeline, unet=unet_with_variant.variants["inpainting"].unet)
    ref = pipe("a wide view", image=canvas, mask_image=mask, height=64, width=64, num_inference_steps=4,
               generator=gens(6, 1))  # fmt: skip
    assert max_diff(ours, pipeline_pixels(ref)) == 0


def test_variants_are_listed_and_selectable(central_variant, unet_with_variant) -> None:  # type: ignore[no-untyped-def]
    info = central_variant.get("/v1/info").json()["stages"]["diffusion_unet"]
    assert info["config"]["variants"]["inpainting"]["in_channels"] == 9
    assert central_variant.get("/readyz").status_code == 200
    # A 9-channel UNet cannot do text-to-image; an unknown variant is named.
    r = central_variant.post("/v1/txt2img", json={"prompt": "x", "model": "inpainting", "num_inference_steps": 1})
    assert r.status_code == 422 and r.json()["error"]["param"] == "model"
    r = central_variant.post("/v1/txt2img", json={"prompt": "x", "model": "nope", "num_inference_steps": 1})
    assert r.status_code == 422 and "inpainting" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------------------- input checks
@pytest.mark.parametrize(
    ("path", "fields", "param", "status"),
    [
        ("/v1/img2img", {"image": "bm90IGFuIGltYWdl"}, "image", 422),  # base64 of "not an image"
        ("/v1/img2img", {"image": ""}, "image", 422),
        ("/v1/img2img", {"strength": 0}, "strength", 422),
        ("/v1/inpaint", {"mask_image": "@small-mask"}, "mask_image", 422),  # mask and image sizes differ
        ("/v1/outpaint", {"left": 0}, "left", 422),  # nothing to extend
        ("/v1/outpaint", {"left": 3}, "left", 422),  # canvas not a multiple of 8
        ("/v1/img2img", {"width": 60}, "width", 422),
    ],
)
def test_bad_image_requests_are_422(central_base, init_image, mask_image, path, fields, param, status) -> None:  # type: ignore[no-untyped-def]
    body = {"prompt": "x", "image": png_b64(init_image), "num_inference_steps": 2}
    if path == "/v1/inpaint":
        body["mask_image"] = png_b64(mask_image)
    for key, value in fields.items():
        body[key] = png_b64(mask_image.resize((32, 32))) if value == "@small-mask" else value
    r = central_base.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
    assert central_base.post("/v1/txt2img", json={"prompt": "ok", "num_inference_steps": 1}).status_code == 200


def test_decompression_bomb_is_413(central_base) -> None:  # type: ignore[no-untyped-def]
    """A small PNG that declares 20000x20000 pixels is refused from its header, not decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b"")
    r = central_base.post("/v1/img2img", json={"prompt": "x", "image": base64.b64encode(png).decode()})
    assert r.status_code == 413 and r.json()["error"]["param"] == "image"


# ------------------------------------------------------------------------------------------- schedulers
def test_scheduler_catalogue_and_aliases(central_base, sd_pipeline) -> None:  # type: ignore[no-untyped-def]
    catalogue = central_base.get("/v1/schedulers").json()
    by_name = {entry["name"]: entry for entry in catalogue}
    assert "Euler a" in by_name["EulerAncestralDiscreteScheduler"]["aliases"]
    assert "DPM++ 2M Karras" in by_name["DPMSolverMultistepScheduler"]["aliases"]

    by_alias = central_base.post("/v1/txt2img", json={"prompt": "p", "seed": 1, "num_inference_steps": 3,
                                                      "scheduler": "euler A"})  # fmt: skip
    by_class = central_base.post("/v1/txt2img", json={"prompt": "p", "seed": 1, "num_inference_steps": 3,
                                                      "scheduler": "EulerAncestralDiscreteScheduler"})  # fmt: skip
    assert max_diff(decode_all(by_alias), decode_all(by_class)) == 0
    assert by_alias.json()["parameters"]["scheduler_class"] == "EulerAncestralDiscreteScheduler"

    r = central_base.post("/v1/txt2img", json={"prompt": "p", "scheduler": "DPM fast"})
    assert r.status_code == 422 and "Euler a" in r.json()["error"]["message"]


def test_variant_from_a_bare_unet_folder(settings, inpaint_model, unet_with_variant) -> None:  # type: ignore[no-untyped-def]
    """TRIPTYCH_UNET_VARIANTS takes a model directory or a bare UNet folder; both load the same weights."""
    rt = UNetRuntime(settings.model_copy(update={"unet_variants": f"inp={inpaint_model / 'unet'}"}))
    rt.load()
    assert rt.variants["inp"].unet.config.in_channels == 9
    assert rt.variants["inp"].fingerprint == unet_with_variant.variants["inpainting"].fingerprint
    assert rt.info().config["variants"]["inp"]["fingerprint"] == rt.variants["inp"].fingerprint
    rt.close()


@pytest.mark.parametrize("spec", ["inpainting", "=/x", "base=/x", "a=/x,a=/y"])
def test_bad_variant_specs_are_refused(spec: str) -> None:
    from diffusion_unet.runtime import parse_variants

    with pytest.raises(ValueError, match=r"TRIPTYCH_UNET_VARIANTS|reserved or repeated"):
        parse_variants(spec)
    assert parse_variants(" a=/x , b=/y ") == {"a": "/x", "b": "/y"}
