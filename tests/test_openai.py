"""OpenAI's Images API on central (SPEC §12), driven by the official ``openai`` package over real HTTP: the
same pixels as the native routes for the same seed, streaming with partial images, edits with an alpha mask,
and OpenAI's error object on these routes."""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import PIL.Image
import pytest
from pydantic import SecretStr

from central.app import build_app
from central.openai_images import GENERATIONS, install_openai
from shared.settings import Settings
from tests.helpers import decode_all, png_b64

STEPS = 4
PROMPT = "a red fox in the snow"


@contextlib.contextmanager
def serving(settings: Settings, te: Any, unet: Any, vae: Any) -> Iterator[str]:
    """central (in-process stages) under uvicorn in a thread, with the OpenAI routes; yields its base URL."""
    from tests.helpers import local_orchestrator, serving_in_thread

    app = build_app(settings, orchestrator=local_orchestrator(settings, te, unet, vae))
    if not any(getattr(r, "path", "") == GENERATIONS for r in app.routes):
        install_openai(app, settings)
    with serving_in_thread(app) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def url(settings, te_runtime, unet_runtime, vae_runtime) -> Iterator[str]:  # type: ignore[no-untyped-def]
    with serving(settings, te_runtime, unet_runtime, vae_runtime) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def native(url: str, path: str, **body: Any) -> np.ndarray:
    r = httpx.post(f"{url}{path}", json={"prompt": PROMPT, "num_inference_steps": STEPS, **body}, timeout=120)
    return decode_all(r)


def png_bytes(image: PIL.Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def openai_mask(mask: PIL.Image.Image) -> bytes:
    """Triptych's mask (white = repaint) as OpenAI's: a PNG whose alpha is 0 where to repaint."""
    rgba = PIL.Image.new("RGBA", mask.size, (0, 0, 0, 255))
    rgba.putalpha(PIL.Image.fromarray(255 - np.asarray(mask.convert("L"))))
    return png_bytes(rgba)


def assert_openai_error(exc: openai.APIStatusError, status: int, param: str | None) -> dict[str, Any]:
    assert exc.status_code == status, (exc.status_code, exc.body)
    assert isinstance(exc.body, dict), exc.body  # the client hands over the `error` object itself
    assert set(exc.body) == {"message", "type", "param", "code"}, exc.body
    assert exc.body["param"] == param, exc.body
    assert exc.body["message"] and isinstance(exc.body["code"], str), exc.body
    assert "Traceback" not in exc.body["message"] and "/work/" not in exc.body["message"]
    return exc.body


# ------------------------------------------------------------------------------------------------- generate
def test_generate_equals_native_txt2img(client: openai.OpenAI, url: str) -> None:
    raw = client.images.with_raw_response.generate(
        prompt=PROMPT, size="64x64", extra_body={"seed": 5, "num_inference_steps": STEPS}
    )
    assert raw.headers["x-seed"] == "5"
    result = raw.parse()
    assert result.data is not None and len(result.data) == 1
    assert result.data[0].b64_json and result.data[0].url is None
    assert result.output_format == "png" and result.size == "64x64"
    assert result.model_extra and result.model_extra["seeds"] == [5]
    got = pixels(result.data[0].b64_json)
    assert np.array_equal(got, native(url, "/v1/txt2img", seed=5, width=64, height=64)[0])
    # An OpenAI model name means the default (base) UNet; size "auto" the native size.
    again = client.images.generate(
        prompt=PROMPT, model="gpt-image-1", size="auto", extra_body={"seed": 5, "num_inference_steps": STEPS}
    )
    assert again.data and np.array_equal(pixels(again.data[0].b64_json or ""), got)


def test_generate_n_and_jpeg(client: openai.OpenAI, url: str) -> None:
    result = client.images.generate(prompt=PROMPT, n=2, extra_body={"seed": 11, "num_inference_steps": STEPS})
    assert result.data and len(result.data) == 2 and result.model_extra and result.model_extra["seeds"] == [11, 12]
    expected = native(url, "/v1/txt2img", seed=11, num_images=2)
    for i, image in enumerate(result.data):
        assert np.array_equal(pixels(image.b64_json or ""), expected[i])
    jpeg = client.images.generate(
        prompt=PROMPT, output_format="jpeg", output_compression=80, extra_body={"seed": 11, "num_inference_steps": 2}
    )
    assert jpeg.output_format == "jpeg" and jpeg.data
    assert base64.b64decode(jpeg.data[0].b64_json or "")[:2] == b"\xff\xd8"


def test_generate_streams_partial_images_then_the_same_image(client: openai.OpenAI, url: str) -> None:
    stream = client.images.generate(
        prompt=PROMPT, stream=True, partial_images=2, size="64x64", extra_body={"seed": 5, "num_inference_steps": STEPS}
    )
    events = list(stream)
    types = [e.type for e in events]
    assert types == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], types
    assert [e.partial_image_index for e in events[:2]] == [0, 1]  # type: ignore[union-attr]
    for e in events:
        assert e.output_format == "png" and e.size == "64x64" and e.created_at > 0
        assert pixels(e.b64_json).shape == (64, 64, 3)
    final = events[-1]
    assert final.usage.total_tokens == 0  # type: ignore[union-attr]
    assert np.array_equal(pixels(final.b64_json), native(url, "/v1/txt2img", seed=5)[0])
    # partial_images 0 (the default): only the final images, one `completed` each.
    plain = client.images.generate(prompt=PROMPT, n=2, stream=True, extra_body={"seed": 3, "num_inference_steps": 1})
    finals = list(plain)
    assert [e.type for e in finals] == ["image_generation.completed"] * 2
    assert [e.model_extra["seed"] for e in finals if e.model_extra] == [3, 4]


# ------------------------------------------------------------------------------------------------- edit
def test_edit_with_alpha_mask_equals_native_inpaint(client: openai.OpenAI, url: str, init_image, mask_image) -> None:  # type: ignore[no-untyped-def]
    expected = native(url, "/v1/inpaint", seed=7, image=png_b64(init_image), mask_image=png_b64(mask_image))[0]
    image = png_bytes(init_image)
    result = client.images.edit(
        image=image, mask=openai_mask(mask_image), prompt=PROMPT, extra_body={"seed": 7, "num_inference_steps": STEPS}
    )
    assert result.data and result.size == "64x64"
    assert np.array_equal(pixels(result.data[0].b64_json or ""), expected)
    # Several images (`image[]`): the first is edited.
    other = png_bytes(PIL.Image.new("RGB", (64, 64), (9, 200, 30)))
    several = client.images.edit(
        image=[image, ("b.png", other, "image/png")],
        mask=openai_mask(mask_image),
        prompt=PROMPT,
        extra_body={"seed": 7, "num_inference_steps": STEPS},
    )
    assert several.data and np.array_equal(pixels(several.data[0].b64_json or ""), expected)
    # No mask: the image's own transparent pixels are repainted.
    holes = init_image.convert("RGBA")
    holes.putalpha(PIL.Image.fromarray(255 - np.asarray(mask_image)))
    own = client.images.edit(
        image=png_bytes(holes), prompt=PROMPT, extra_body={"seed": 7, "num_inference_steps": STEPS}
    )
    same = native(url, "/v1/inpaint", seed=7, image=png_b64(holes), mask_image=png_b64(mask_image))[0]
    assert own.data and np.array_equal(pixels(own.data[0].b64_json or ""), same)
    # An opaque image without a mask: image-to-image.
    img2img = client.images.edit(image=image, prompt=PROMPT, extra_body={"seed": 7, "num_inference_steps": STEPS})
    reference = native(url, "/v1/img2img", seed=7, image=png_b64(init_image))[0]
    assert img2img.data and np.array_equal(pixels(img2img.data[0].b64_json or ""), reference)


def test_edit_streams(client: openai.OpenAI, url: str, init_image, mask_image) -> None:  # type: ignore[no-untyped-def]
    stream = client.images.edit(
        image=png_bytes(init_image),
        mask=openai_mask(mask_image),
        prompt=PROMPT,
        stream=True,
        partial_images=1,
        extra_body={"seed": 7, "num_inference_steps": STEPS},
    )
    events = list(stream)
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    expected = native(url, "/v1/inpaint", seed=7, image=png_b64(init_image), mask_image=png_b64(mask_image))[0]
    assert np.array_equal(pixels(events[-1].b64_json), expected)


# ------------------------------------------------------------------------------------------------- errors
def test_errors_are_openai_shaped(client: openai.OpenAI, init_image, mask_image) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.NotFoundError) as not_found:
        client.images.generate(prompt=PROMPT, model="no-such-unet")
    assert assert_openai_error(not_found.value, 404, "model")["code"] == "model_not_found"
    bad: list[tuple[dict[str, Any], str]] = [
        ({"size": "65x64"}, "size"),  # not a multiple of the VAE scale factor
        ({"size": "huge"}, "size"),
        ({"size": "100000x64"}, "size"),
        ({"response_format": "url"}, "response_format"),
        ({"output_format": "gif"}, "output_format"),
        ({"n": 0}, "n"),
        ({"extra_body": {"wat": 1}}, "wat"),
        ({"stream": True, "size": "65x64"}, "size"),  # a stream that cannot start: still a 400
    ]
    for kwargs, param in bad:
        with pytest.raises(openai.BadRequestError) as exc:
            client.images.generate(prompt=PROMPT, **kwargs)
        assert_openai_error(exc.value, 400, param)
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.edit(image=png_bytes(init_image), mask=png_bytes(PIL.Image.new("RGBA", (32, 32))), prompt="p")
    assert_openai_error(exc.value, 400, "mask")
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.edit(image=png_bytes(init_image), mask=png_bytes(mask_image), prompt="p")  # no alpha
    assert_openai_error(exc.value, 400, "mask")
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.edit(image=b"not an image", prompt="p")
    assert_openai_error(exc.value, 400, "image")


def test_api_keys_use_the_bearer_openai_sends(settings, te_runtime, unet_runtime, vae_runtime) -> None:  # type: ignore[no-untyped-def]
    keyed = settings.model_copy(update={"api_keys": SecretStr("sekrit")})
    with serving(keyed, te_runtime, unet_runtime, vae_runtime) as base:
        ok = openai.OpenAI(base_url=f"{base}/v1", api_key="sekrit", max_retries=0)
        result = ok.images.generate(prompt=PROMPT, extra_body={"seed": 1, "num_inference_steps": 1})
        assert result.data and result.data[0].b64_json
        wrong = openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.images.generate(prompt=PROMPT)
