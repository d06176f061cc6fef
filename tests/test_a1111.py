"""A1111's ``/sdapi/v1`` on central (SPEC §12), driven by the real ``webuiapi`` client against a real server.

Every generation is compared with central's own endpoint for the same effective parameters: the A1111 route
is a translation, so the pixels must be equal, not merely close.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import requests
import webuiapi
from pydantic import SecretStr

from central.a1111 import install_a1111
from central.app import build_app
from diffusion_unet.runtime import UNetRuntime
from shared.serving.models import create_tiny
from shared.settings import Settings
from tests.helpers import assert_envelope, local_orchestrator, png_b64, serving_in_thread
from tests.test_controlnet import make_controlnet
from tests.test_loras import make_lora
from text_encoder.runtime import TextEncoderRuntime

KEY_A, KEY_B = "a1111-key-a", "a1111-key-b"
SMALL = {"width": 64, "height": 64, "steps": 3, "cfg_scale": 7.0}


@pytest.fixture(scope="module")
def a1111_settings(settings: Settings, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("a1111")
    loras = root / "loras"
    loras.mkdir()
    make_lora(tiny_model, loras, "ink", seed=1)
    fine = create_tiny(root / "fine", seed=7)  # a "fine-tuned" UNet variant: other weights, same shapes
    edges = make_controlnet(tiny_model, root / "edges", seed=1)
    return settings.model_copy(
        update={
            "lora_dir": loras,
            "unet_variants": f"fine={fine}",
            "controlnets": f"edges={edges}",
            "api_keys": SecretStr(f"{KEY_A},{KEY_B}"),
        }
    )


@pytest.fixture(scope="module")
def server(a1111_settings: Settings, vae_runtime: Any) -> Iterator[dict[str, Any]]:
    te, unet = TextEncoderRuntime(a1111_settings), UNetRuntime(a1111_settings)
    for rt in (te, unet):
        asyncio.run(rt.load_async())
    app = build_app(a1111_settings, orchestrator=local_orchestrator(a1111_settings, te, unet, vae_runtime))
    if not any(getattr(r, "path", "") == "/sdapi/v1/txt2img" for r in app.routes):
        install_a1111(app, a1111_settings)
    try:
        with serving_in_thread(app) as port:
            yield {"url": f"http://127.0.0.1:{port}", "port": port, "unet": unet}
    finally:
        te.close()
        unet.close()


def client(server: dict[str, Any], key: str = KEY_A) -> webuiapi.WebUIApi:
    """The unmodified client; the API key goes on its ``requests`` session (webuiapi has no key option)."""
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server["port"])
    api.session.headers["Authorization"] = f"Bearer {key}"
    api.check_extensions()
    return api


def native(server: dict[str, Any], path: str, body: dict[str, Any], key: str = KEY_A) -> np.ndarray:
    r = requests.post(f"{server['url']}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    assert r.status_code == 200, r.text
    return np.stack([np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(b)))) for b in r.json()["images"]])


def pixels(result: webuiapi.WebUIApiResult) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB")) for im in result.images])


def native_body(prompt: str, seed: int, scheduler: str, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "seed": seed, "scheduler": scheduler, "width": 64, "height": 64,
            "num_inference_steps": 3, "guidance_scale": 7.0, **extra}  # fmt: skip


# ------------------------------------------------------------------------------------------ generation parity
def test_txt2img_equals_the_native_endpoint(server: dict[str, Any]) -> None:
    api = client(server)
    result = api.txt2img(prompt="a red barn", negative_prompt="fog", seed=11, batch_size=2, n_iter=2,
                         sampler_name="Euler a", **SMALL)  # fmt: skip
    assert isinstance(result.info, dict), result.info  # `info` is a JSON string the client parses
    assert result.info["all_seeds"] == [11, 12, 13, 14] and result.info["seed"] == 11
    assert result.info["warnings"] == [], result.info["warnings"]  # webuiapi's defaults are all honoured
    assert result.parameters["prompt"] == "a red barn" and result.parameters["n_iter"] == 2
    want = native(server, "/v1/txt2img", native_body("a red barn", 11, "Euler a", negative_prompt="fog", num_images=4))
    assert np.array_equal(pixels(result), want)
    assert all(not str(b).startswith("data:") for b in result.json["images"])  # raw base64, as A1111


@pytest.mark.parametrize(
    ("sampler", "schedule", "ours"),
    [
        ("DPM++ 2M", "karras", "DPM++ 2M Karras"),
        ("DPM++ 2M", "automatic", "DPM++ 2M Karras"),  # A1111 ≥ 1.9: automatic is Karras for DPM++ 2M
        ("DPM++ 2M", "uniform", "DPM++ 2M"),
        ("DPM++ 2M Karras", "automatic", "DPM++ 2M Karras"),  # the pre-1.9 name
        ("Euler", "automatic", "EulerDiscreteScheduler"),
    ],
)
def test_sampler_and_schedule_map_onto_one_scheduler(server: dict[str, Any], sampler: str, schedule: str,
                                                     ours: str) -> None:  # fmt: skip
    result = client(server).txt2img(prompt="a kite", seed=3, sampler_name=sampler, scheduler=schedule, **SMALL)
    assert np.array_equal(pixels(result), native(server, "/v1/txt2img", native_body("a kite", 3, ours)))
    if sampler.startswith("DPM++ 2M"):  # the schedule matters: Karras and uniform sigmas give other pixels
        other = "DPM++ 2M" if ours.endswith("Karras") else "DPM++ 2M Karras"
        assert not np.array_equal(pixels(result), native(server, "/v1/txt2img", native_body("a kite", 3, other)))


def test_random_seed_is_reported_and_reproduces(server: dict[str, Any]) -> None:
    api = client(server)
    first = api.txt2img(prompt="a fox", seed=-1, sampler_name="Euler", **SMALL)
    seed = first.info["seed"]
    assert isinstance(seed, int) and seed >= 0 and first.info["all_seeds"] == [seed]
    again = api.txt2img(prompt="a fox", seed=seed, sampler_name="Euler", **SMALL)
    assert np.array_equal(pixels(first), pixels(again))
    assert np.array_equal(pixels(first), native(server, "/v1/txt2img", native_body("a fox", seed, "Euler")))


def test_img2img_and_inpaint_equal_the_native_endpoints(
    server: dict[str, Any], init_image: PIL.Image.Image, mask_image: PIL.Image.Image
) -> None:
    api = client(server)
    plain = api.img2img(images=[init_image], prompt="a boat", seed=5, denoising_strength=0.6,
                        sampler_name="Euler", **SMALL)  # fmt: skip
    want = native(server, "/v1/img2img",
                  native_body("a boat", 5, "Euler", image=png_b64(init_image), strength=0.6))  # fmt: skip
    assert np.array_equal(pixels(plain), want)

    inpainted = api.img2img(images=[init_image], mask_image=mask_image, prompt="a boat", seed=5,
                            denoising_strength=0.75, sampler_name="Euler", **SMALL)  # fmt: skip
    body = native_body("a boat", 5, "Euler", image=png_b64(init_image), mask_image=png_b64(mask_image), strength=0.75)
    want = native(server, "/v1/inpaint", body)
    assert np.array_equal(pixels(inpainted), want)
    # webuiapi's defaults ask for what is not implemented: named, not silently dropped.
    warned = " ".join(inpainted.info["warnings"])
    assert "inpainting_fill" in warned and "inpaint_full_res" in warned and "mask_blur" in warned
    # inpainting_mask_invert repaints the black part: the inverted mask, inverted again, is the same request.
    inverted = PIL.Image.fromarray(255 - np.asarray(mask_image))
    flipped = api.img2img(images=[init_image], mask_image=inverted, inpainting_mask_invert=1, prompt="a boat",
                          seed=5, denoising_strength=0.75, sampler_name="Euler", **SMALL)  # fmt: skip
    assert np.array_equal(pixels(flipped), want)


def test_lora_prompt_tags_equal_native_loras(server: dict[str, Any]) -> None:
    api = client(server)
    tagged = api.txt2img(prompt="a lighthouse <lora:ink:0.7>", seed=9, sampler_name="Euler", **SMALL)
    body = native_body("a lighthouse ", 9, "Euler", loras=[{"name": "ink", "weight": 0.7}])
    assert np.array_equal(pixels(tagged), native(server, "/v1/txt2img", body))
    assert tagged.info["extra_generation_params"]["Lora"] == {"ink": 0.7}
    with pytest.raises(RuntimeError) as err:  # webuiapi raises on anything but 200
        api.txt2img(prompt="x <lora:nope:1>", seed=1, **SMALL)
    assert err.value.args[0] == 404 and "ink" in err.value.args[1]


# ------------------------------------------------------------------------------------------ progress and interrupt
@contextlib.contextmanager
def slow_unet(unet_runtime: Any, seconds: float) -> Iterator[None]:
    """Every UNet forward of this module's runtime takes ``seconds`` longer: a generation long enough to watch."""
    hook = unet_runtime.variants["base"].unet.register_forward_pre_hook(lambda *_: time.sleep(seconds))
    try:
        yield
    finally:
        hook.remove()


def wait_for(predicate: Any, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_progress_shows_previews_and_interrupt_is_scoped(server: dict[str, Any]) -> None:
    api_a, api_b = client(server, KEY_A), client(server, KEY_B)
    assert api_a.get_progress()["state"]["job_count"] == 0
    with slow_unet(server["unet"], 0.05), ThreadPoolExecutor(1) as pool:
        running = pool.submit(api_a.txt2img, prompt="a long one", seed=1, sampler_name="Euler", width=64, height=64,
                              steps=200)  # fmt: skip
        seen = wait_for(lambda: (p := api_a.get_progress())["progress"] > 0 and p["current_image"] and p)
        assert 0 < seen["progress"] < 1 and seen["eta_relative"] > 0
        assert seen["state"]["job_count"] == 1 and seen["state"]["sampling_steps"] == 200
        assert PIL.Image.open(io.BytesIO(base64.b64decode(seen["current_image"]))).format == "PNG"
        assert api_a.session.get(f"{api_a.baseurl}/progress?skip_current_image=true").json()["current_image"] is None
        # Another key sees nothing of it and cannot stop it.
        assert api_b.get_progress()["state"]["job_count"] == 0
        assert api_b.interrupt() == {}
        time.sleep(0.3)
        assert not running.done()
        step = api_a.get_progress()["state"]["sampling_step"]
        assert api_a.interrupt() == {}
        result = running.result(timeout=30)
    assert result.images == [] and result.info["interrupted"] is True
    assert step < 200
    assert api_a.get_progress()["state"]["job_count"] == 0


# ------------------------------------------------------------------------------------------ catalogues and options
def test_models_loras_embeddings_samplers_schedulers(server: dict[str, Any]) -> None:
    api = client(server)
    models = api.get_sd_models()
    assert [m["model_name"] for m in models] == ["base", "fine"]
    assert all(m["title"].startswith(m["model_name"] + " [") for m in models)
    assert [lora["name"] for lora in api.get_loras()] == ["ink"]
    assert set(api.get_embeddings()) == {"loaded", "skipped"}
    names = api.util_get_sampler_names()
    assert "DPM++ 2M" in names and "Euler a" in names and "DPM++ 2M Karras" not in names
    assert {"automatic", "karras", "uniform"} <= set(api.util_get_scheduler_names())
    assert [m.split(" [")[0] for m in api.controlnet_model_list()] == ["edges"]
    assert {"none", "canny"} <= set(api.controlnet_module_list())
    assert api.has_controlnet  # webuiapi found the extension through /sdapi/v1/scripts


def test_sd_model_checkpoint_is_per_scope(server: dict[str, Any]) -> None:
    api_a, api_b = client(server, KEY_A), client(server, KEY_B)
    try:
        api_a.util_set_model("fine")  # webuiapi's helper: lower-cases, finds the closest title, POSTs options
        assert api_a.util_get_current_model().startswith("fine [")
        assert api_b.util_get_current_model().startswith("base [")
        a = api_a.txt2img(prompt="a tree", seed=4, sampler_name="Euler", **SMALL)
        b = api_b.txt2img(prompt="a tree", seed=4, sampler_name="Euler", **SMALL)
        assert np.array_equal(pixels(a), native(server, "/v1/txt2img", native_body("a tree", 4, "Euler", model="fine")))
        assert np.array_equal(pixels(b), native(server, "/v1/txt2img", native_body("a tree", 4, "Euler")))
        assert not np.array_equal(pixels(a), pixels(b))
        r = api_a.session.post(f"{api_a.baseurl}/options", json={"sd_model_checkpoint": "nope"})
        assert_envelope(r, 422, param="sd_model_checkpoint")
    finally:
        api_a.set_options({"sd_model_checkpoint": "base"})


# ------------------------------------------------------------------------------------------ never a 500
@pytest.mark.parametrize(
    ("extra", "status", "warned"),
    [
        ({"enable_hr": True, "hr_scale": 2}, 200, "enable_hr"),
        ({"restore_faces": True, "tiling": True, "styles": ["x"]}, 200, "restore_faces"),
        ({"subseed_strength": 0.5, "s_churn": 1.0}, 200, "subseed_strength"),
        ({"override_settings": {"CLIP_stop_at_last_layers": 2}}, 200, "override_settings"),
        ({"alwayson_scripts": {"ADetailer": {"args": [True, {}]}}}, 200, "ADetailer"),
        ({"sampler_name": "DDIM", "eta": 1.0}, 200, "eta"),
        ({"some_future_field": 3}, 200, "some_future_field"),
        ({"script_name": "x/y/z plot"}, 422, None),
        ({"sampler_name": "DPM fast"}, 422, None),
        ({"scheduler": "exponential"}, 422, None),
        ({"seed": -5}, 422, None),
        ({"batch_size": 4, "n_iter": 4}, 422, None),
        ({"steps": "many"}, 422, None),
        ({"alwayson_scripts": {"ControlNet": {"args": [{"model": "nope", "image": "x"}]}}}, 404, None),
        ({"alwayson_scripts": {"ControlNet": {"args": {"x": 1}}}}, 422, None),
        (
            {
                "alwayson_scripts": {
                    "ControlNet": {
                        "args": [{"model": "edges", "image": "eA==", "module": "canny", "threshold_a": "low"}]
                    }
                }
            },
            422,
            None,
        ),
        ({"alwayson_scripts": {"ControlNet": {"args": [{"model": "edges", "module": "depth"}]}}}, 422, None),
        ({"alwayson_scripts": {"ControlNet": {"args": [{"model": "edges"}]}}}, 422, None),  # no image in txt2img
        ({"alwayson_scripts": {"ControlNet": "on", "Other": {"args": {"a": 1}}}}, 200, None),
        ({"prompt": "<lora::1>"}, 422, None),
        ({"prompt": "<lora:ink:heavy>"}, 422, None),
        ({"prompt": "<hypernet:x:1> a cat"}, 200, "hypernet"),
        ({"override_settings": {"sd_model_checkpoint": 5}}, 422, None),
        ({"sampler_name": "Euler", "scheduler": "karras"}, 422, None),
        ({"prompt": ""}, 200, None),
    ],
)
def test_unsupported_fields_warn_or_refuse_never_500(
    server: dict[str, Any], extra: dict[str, Any], status: int, warned: str | None
) -> None:
    body = {"prompt": "a cat", "seed": 1, "width": 64, "height": 64, "steps": 2, **extra}
    r = requests.post(f"{server['url']}/sdapi/v1/txt2img", json=body, headers={"Authorization": f"Bearer {KEY_A}"},
                      timeout=60)  # fmt: skip
    if status != 200:
        assert_envelope(r, status)
        return
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    if warned is not None:
        assert any(warned in w for w in info["warnings"]), info["warnings"]


def test_malformed_and_image_errors_are_4xx(server: dict[str, Any]) -> None:
    url, auth = f"{server['url']}/sdapi/v1", {"Authorization": f"Bearer {KEY_A}"}
    assert_envelope(requests.post(f"{url}/txt2img", data=b"{", headers={**auth, "Content-Type": "application/json"}),
                    400)  # fmt: skip
    assert_envelope(requests.post(f"{url}/img2img", json={"prompt": "x"}, headers=auth), 422, param="init_images")
    r = requests.post(f"{url}/img2img", json={"prompt": "x", "init_images": ["bm90IGFuIGltYWdl"], "steps": 2},
                      headers=auth)  # fmt: skip
    assert r.status_code in (400, 413, 422), r.text
    r = requests.post(f"{url}/img2img", json={"prompt": "x", "init_images": ["aGk="], "mask": "aGk=",
                                              "inpainting_mask_invert": 1}, headers=auth)  # fmt: skip
    assert r.status_code in (400, 422), r.text
    assert requests.post(f"{url}/txt2img", json={"prompt": "x"}).status_code == 401  # keys are required


# ------------------------------------------------------------------------------------------ ControlNet extension
def test_controlnet_units_equal_native_controlnets(server: dict[str, Any], init_image: PIL.Image.Image) -> None:
    api = client(server)
    model = api.controlnet_model_list()[0]  # "edges [hash]", as the extension names its models
    unit = webuiapi.ControlNetUnit(image=init_image, module="none", model=model, weight=0.8, guidance_end=0.5)
    result = api.txt2img(prompt="a bridge", seed=2, sampler_name="Euler", controlnet_units=[unit], **SMALL)
    spec = {"name": "edges", "image": png_b64(init_image), "scale": 0.8, "start": 0.0, "end": 0.5}
    want = native(server, "/v1/txt2img", native_body("a bridge", 2, "Euler", controlnets=[spec]))
    assert np.array_equal(pixels(result), want)
    plain = native(server, "/v1/txt2img", native_body("a bridge", 2, "Euler"))
    assert not np.array_equal(want, plain)  # the ControlNet really acted

    canny = webuiapi.ControlNetUnit(image=init_image, module="canny", model=model, threshold_a=50, threshold_b=150)
    result = api.txt2img(prompt="a bridge", seed=2, sampler_name="Euler", controlnet_units=[canny], **SMALL)
    spec = {"name": "edges", "image": png_b64(init_image), "preprocessor": "canny", "low_threshold": 50,
            "high_threshold": 150}  # fmt: skip
    assert np.array_equal(pixels(result), native(server, "/v1/txt2img",
                                                 native_body("a bridge", 2, "Euler", controlnets=[spec])))  # fmt: skip
    # The next call without units sends `{"ControlNet": {"args": []}}` (webuiapi saw the extension): no ControlNet.
    assert np.array_equal(pixels(api.txt2img(prompt="a bridge", seed=2, sampler_name="Euler", **SMALL)), plain)


def test_every_post_route_refuses_a_bad_body_but_takes_none_where_webuiapi_sends_none(server: dict[str, Any]) -> None:
    """central's rule for every POST route (tests/test_routes.py), and webuiapi's bodyless interrupt / skip."""
    url, auth = server["url"], {"Authorization": f"Bearer {KEY_A}"}
    paths = ["/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/options", "/sdapi/v1/interrupt", "/sdapi/v1/skip"]
    for path in paths:
        for body in (b"", b"\xc1", b"[1, 2"):
            r = requests.post(url + path, data=body, headers={**auth, "Content-Type": "application/json"})
            assert_envelope(r, r.status_code)
            assert 400 <= r.status_code < 500, (path, body, r.status_code)
        assert_envelope(requests.post(url + path, data=b"x", headers={**auth, "Content-Type": "text/plain"}), 415)
    for path in ("/sdapi/v1/interrupt", "/sdapi/v1/skip"):
        assert requests.post(url + path, headers=auth).json() == {}  # no body, no Content-Type: as webuiapi sends
