"""central's public REST API (SPEC §4, §5, §7): txt2img over in-process stages, output formats, determinism,
the error envelope for bad requests, how stage failures map to statuses, and readiness / compatibility."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgpack
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from central.app import build_app
from central.clients import (
    HttpReply,
    HttpTransport,
    LocalTransport,
    TextEncoderClient,
    Transport,
    UNetClient,
    VaeClient,
)
from central.pipeline import Orchestrator, compatibility_problems
from shared import wire
from shared.errors import error_envelope
from shared.protocol import StageInfo
from shared.settings import Settings
from tests.helpers import asgi_exchange, assert_envelope

STEPS = 2
STAGE_NAMES = ["text_encoder", "diffusion_unet", "vae_decoder"]
OPS = {"text_encoder": "encode", "diffusion_unet": "denoise", "vae_decoder": "decode"}


# ------------------------------------------------------------------------------------------------ helpers


def image_of(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    image.load()
    return image


def pixels(b64: str) -> np.ndarray:
    return np.asarray(image_of(b64))


def txt2img(client: TestClient, **fields: Any) -> Any:
    body = {"prompt": "a red fox in the snow", "num_inference_steps": STEPS, **fields}
    return client.post("/v1/txt2img", json=body)


def ok(client: TestClient, **fields: Any) -> dict[str, Any]:
    response = txt2img(client, **fields)
    assert response.status_code == 200, response.text[:600]
    result: dict[str, Any] = response.json()
    return result


def local_transports(te: Any, unet: Any, vae: Any) -> dict[str, Transport]:
    return {
        "text_encoder": LocalTransport(te),
        "diffusion_unet": LocalTransport(unet),
        "vae_decoder": LocalTransport(vae),
    }


def orchestrator(settings: Settings, transports: dict[str, Transport]) -> Orchestrator:
    return Orchestrator(
        TextEncoderClient(transports["text_encoder"]),
        UNetClient(transports["diffusion_unet"]),
        VaeClient(transports["vae_decoder"]),
        settings,
    )


@pytest.fixture(scope="module")
def runtimes(te_runtime: Any, unet_runtime: Any, vae_runtime: Any) -> dict[str, Any]:
    return {"text_encoder": te_runtime, "diffusion_unet": unet_runtime, "vae_decoder": vae_runtime}


@pytest.fixture(scope="module")
def client(settings: Settings, runtimes: dict[str, Any]) -> Iterator[TestClient]:
    orch = orchestrator(settings, local_transports(*runtimes.values()))
    with TestClient(build_app(settings, orchestrator=orch), raise_server_exceptions=False) as c:
        yield c


# ------------------------------------------------------------------------------------------------ txt2img
def test_txt2img_json_response(client: TestClient) -> None:
    result = ok(client, seed=1234, num_images=2)
    assert set(result) >= {"images", "seeds", "parameters", "timings"}
    assert len(result["images"]) == 2
    for b64 in result["images"]:
        image = image_of(b64)
        assert image.format == "PNG"
        assert image.mode == "RGB"
        assert image.size == (64, 64)
    assert result["seeds"] == [1234, 1235]
    params = result["parameters"]
    assert params["width"] == params["height"] == 64
    assert params["num_inference_steps"] == STEPS
    assert params["guidance_scale"] == 7.5
    assert params["scheduler"] == "PNDMScheduler"
    assert params["seed"] == 1234
    assert params["num_images"] == 2
    assert params["output_format"] == "png"
    assert "negative_prompt" in params and params["negative_prompt"] is None
    assert params["model"] == "base"
    assert params["prompt"] == "a red fox in the snow"
    timings = result["timings"]
    for key in ("encode_ms", "denoise_ms", "decode_ms", "total_ms"):
        assert isinstance(timings[key], float) and timings[key] >= 0, timings
    assert timings["total_ms"] >= timings["denoise_ms"]
    assert not np.array_equal(pixels(result["images"][0]), pixels(result["images"][1]))


def test_txt2img_resolves_every_given_value(client: TestClient) -> None:
    result = ok(
        client,
        seed=5,
        negative_prompt="blurry",
        width=48,
        height=32,
        guidance_scale=3.0,
        scheduler="DDIMScheduler",
        output_format="png",
    )
    params = result["parameters"]
    assert (params["width"], params["height"]) == (48, 32)
    assert params["negative_prompt"] == "blurry"
    assert params["guidance_scale"] == 3.0
    assert params["scheduler"] == "DDIMScheduler"
    assert image_of(result["images"][0]).size == (48, 32)


def test_accept_png_returns_the_file_with_headers(client: TestClient) -> None:
    response = client.post(
        "/v1/txt2img",
        json={"prompt": "a cat", "num_inference_steps": STEPS, "seed": 77},
        headers={"accept": "image/png"},
    )
    assert response.status_code == 200, response.text[:600]
    assert response.headers["content-type"] == "image/png"
    assert response.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert response.headers["x-seed"] == "77"
    timing = response.headers["server-timing"]
    for name in ("encode", "denoise", "decode", "total"):
        assert f"{name};dur=" in timing, timing
    image = Image.open(io.BytesIO(response.content))
    assert image.size == (64, 64) and image.mode == "RGB"
    # The same pixels as the JSON response for the same request.
    same = ok(client, prompt="a cat", seed=77)
    assert np.array_equal(np.asarray(image), pixels(same["images"][0]))


@pytest.mark.parametrize(
    ("fmt", "magic", "pil_format"),
    [("jpeg", b"\xff\xd8\xff", "JPEG"), ("webp", b"RIFF", "WEBP"), ("png", b"\x89PNG", "PNG")],
)
def test_output_formats(client: TestClient, fmt: str, magic: bytes, pil_format: str) -> None:
    result = ok(client, seed=3, output_format=fmt)
    raw = base64.b64decode(result["images"][0])
    assert raw.startswith(magic)
    image = image_of(result["images"][0])
    assert image.format == pil_format
    assert image.size == (64, 64)
    assert result["parameters"]["output_format"] == fmt

    response = client.post(
        "/v1/txt2img",
        json={"prompt": "a cat", "num_inference_steps": STEPS, "seed": 3},
        headers={"accept": f"image/{fmt}"},
    )
    assert response.status_code == 200, response.text[:600]
    assert response.headers["content-type"] == f"image/{fmt}"
    assert response.content.startswith(magic)
    assert Image.open(io.BytesIO(response.content)).format == pil_format


def test_same_seed_same_images(client: TestClient) -> None:
    a = ok(client, seed=42, num_images=2)
    b = ok(client, seed=42, num_images=2)
    for x, y in zip(a["images"], b["images"], strict=True):
        assert np.array_equal(pixels(x), pixels(y))
    # Image i of seed s is image 0 of seed s + i: the same noise, so the same picture up to batching's float
    # reordering (SPEC §8: within 2/255 when batched).
    second = ok(client, seed=43)
    diff = np.abs(pixels(a["images"][1]).astype(np.int16) - pixels(second["images"][0]).astype(np.int16))
    assert diff.max() <= 2, diff.max()
    other = ok(client, seed=44)
    assert not np.array_equal(pixels(a["images"][0]), pixels(other["images"][0]))


def test_no_seed_returns_a_seed_that_reproduces(client: TestClient) -> None:
    first = ok(client)
    seed = first["parameters"]["seed"]
    assert isinstance(seed, int) and 0 <= seed <= 2**63 - 1
    assert first["seeds"] == [seed]
    again = ok(client, seed=seed)
    assert np.array_equal(pixels(first["images"][0]), pixels(again["images"][0]))


def test_info_lists_every_stage(client: TestClient) -> None:
    response = client.get("/v1/info")
    assert response.status_code == 200
    stages = response.json()["stages"]
    assert set(stages) == set(STAGE_NAMES)
    for name, info in stages.items():
        assert info["stage"] == name
        assert {"model", "config", "device", "dtype", "version"} <= set(info)


# ------------------------------------------------------------------------------------------------ errors
def _post_raw(client: TestClient, body: bytes, content_type: str | None = "application/json", **headers: str) -> Any:
    if content_type:
        headers["content-type"] = content_type
    return client.post("/v1/txt2img", content=body, headers=headers)


def _json(**fields: Any) -> bytes:
    return json.dumps({"prompt": "a cat", "num_inference_steps": STEPS, **fields}).encode()


# name -> (body, content type, status, param or ... for "any")
BAD_REQUESTS: dict[str, tuple[bytes, str | None, int, Any]] = {
    "malformed-json": (b'{"prompt": "a cat",', "application/json", 400, ...),
    "not-json-at-all": (b"\x00\xff garbage", "application/json", 400, ...),
    "empty-body": (b"", "application/json", 400, ...),
    "invalid-utf8": (b'{"prompt": "\xff\xfe"}', "application/json", 400, ...),
    "content-type-text": (_json(), "text/plain", 415, ...),
    "content-type-msgpack": (msgpack.packb({"prompt": "a cat"}), "application/msgpack", 415, ...),
    "content-type-form": (b"prompt=a+cat", "application/x-www-form-urlencoded", 415, ...),
    "content-type-missing": (_json(), None, 415, ...),
    "missing-prompt": (json.dumps({"num_inference_steps": STEPS}).encode(), "application/json", 422, "prompt"),
    "empty-prompt": (_json(prompt=""), "application/json", 422, "prompt"),
    "prompt-not-a-string": (_json(prompt=["a", "b"]), "application/json", 422, "prompt"),
    "width-not-multiple-of-8": (_json(width=65), "application/json", 422, "width"),
    "height-not-multiple-of-8": (_json(height=100), "application/json", 422, "height"),
    "width-too-large": (_json(width=1 << 20), "application/json", 422, "width"),
    "width-zero": (_json(width=0), "application/json", 422, "width"),
    "width-a-string": (_json(width="wide"), "application/json", 422, "width"),
    "steps-zero": (_json(num_inference_steps=0), "application/json", 422, "num_inference_steps"),
    "steps-too-many": (_json(num_inference_steps=10**6), "application/json", 422, "num_inference_steps"),
    "num-images-zero": (_json(num_images=0), "application/json", 422, "num_images"),
    "num-images-over-max": (_json(num_images=9), "application/json", 422, "num_images"),
    "guidance-negative": (_json(guidance_scale=-1), "application/json", 422, "guidance_scale"),
    "guidance-nan": (b'{"prompt": "a cat", "guidance_scale": NaN}', "application/json", ..., ...),
    "seed-negative": (_json(seed=-1), "application/json", 422, "seed"),
    "seed-too-large": (_json(seed=2**64), "application/json", 422, "seed"),
    "seed-plus-images-overflows": (_json(seed=2**63 - 1, num_images=2), "application/json", 422, "seed"),
    "unknown-field": (_json(sampler="euler"), "application/json", 422, "sampler"),
    "unknown-scheduler": (_json(scheduler="FooScheduler"), "application/json", 422, "scheduler"),
    "unknown-output-format": (_json(output_format="gif"), "application/json", 422, "output_format"),
    "unknown-model-variant": (_json(model="no-such-variant"), "application/json", 422, "model"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_the_envelope(client: TestClient, case: str) -> None:
    body, content_type, status, param = BAD_REQUESTS[case]
    response = _post_raw(client, body, content_type)
    if status is ...:  # NaN is either not JSON (400) or an invalid value (422); never a 500
        assert response.status_code in (400, 422)
        assert_envelope(response, response.status_code)
    else:
        err = assert_envelope(response, status, param=param)
        if status == 415:
            assert "application/json" in err["message"]
        if param is not ... and status == 422:
            assert param in err["message"], err
    ok(client, seed=1)


@pytest.mark.parametrize("body", [b"[1, 2]", b'"a cat"', b"null", b"42", b"true"])
def test_non_object_json(client: TestClient, body: bytes) -> None:
    response = _post_raw(client, body)
    assert response.status_code in (400, 422), response.text
    assert_envelope(response, response.status_code)
    ok(client, seed=1)


def test_unknown_scheduler_message_lists_the_choices(client: TestClient) -> None:
    err = assert_envelope(txt2img(client, scheduler="FooScheduler"), 422, param="scheduler")
    assert "PNDMScheduler" in err["message"] and "DDIMScheduler" in err["message"]


def test_num_images_over_max_names_the_range(client: TestClient) -> None:
    err = assert_envelope(txt2img(client, num_images=9), 422, param="num_images")
    assert "8" in err["message"]


def test_accept_png_with_several_images_is_422(client: TestClient) -> None:
    response = client.post(
        "/v1/txt2img",
        json={"prompt": "a cat", "num_inference_steps": STEPS, "num_images": 2},
        headers={"accept": "image/png"},
    )
    assert_envelope(response, 422, param="num_images")
    ok(client, seed=1)


def test_validation_message_does_not_echo_huge_input(client: TestClient) -> None:
    """An over-long prompt is refused with a short message, not with the whole input echoed back."""
    err = assert_envelope(txt2img(client, prompt="x" * 20000), 422, param="prompt")
    assert len(err["message"]) < 1024, f"{len(err['message'])} characters"


def test_unknown_path_and_method(client: TestClient) -> None:
    assert_envelope(client.get("/v1/nothing-here"), 404, type_="not_found")
    assert_envelope(client.get("/v1/txt2img"), 405)
    assert_envelope(client.post("/healthz"), 405)


def test_oversized_json_body_is_413(settings: Settings, runtimes: dict[str, Any]) -> None:
    small = settings.model_copy(update={"max_json_body_bytes": 512})
    orch = orchestrator(small, local_transports(*runtimes.values()))
    with TestClient(build_app(small, orchestrator=orch), raise_server_exceptions=False) as c:
        big = json.dumps({"prompt": "x" * 2000, "num_inference_steps": STEPS}).encode()
        assert_envelope(_post_raw(c, big), 413, type_="payload_too_large")

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while the body streams in
            yield big[:400]
            yield big[400:]

        response = c.post("/v1/txt2img", content=chunks(), headers={"content-type": "application/json"})
        assert_envelope(response, 413, type_="payload_too_large")
        declared = _post_raw(c, b"{}", **{"content-length": str(10**9)})
        assert_envelope(declared, 413, type_="payload_too_large")
        ok(c, seed=1)


# ------------------------------------------------------------------------------ stages behind HttpTransport
Failure = Callable[[], HttpReply]


class StageDouble:
    """An ``HttpTransport`` exchange: the real stage app over ASGI, except for scripted failures."""

    def __init__(self, app: Any) -> None:
        self.forward = asgi_exchange(app)
        self.failures: list[Failure] = []
        self.info_failure: Failure | None = None
        self.info_patch: dict[str, Any] = {}
        self.calls: list[str] = []

    async def __call__(
        self, method: str, url: str, body: bytes | None, headers: dict[str, str], timeout_s: float
    ) -> HttpReply:
        path = urlsplit(url).path
        self.calls.append(path)
        if path == "/v1/info":
            if self.info_failure is not None:
                return self.info_failure()
            if self.info_patch:
                reply = await self.forward(method, url, body, headers, timeout_s)
                info = json.loads(reply.body)
                info["config"] = {**info["config"], **self.info_patch}
                return HttpReply(200, {"content-type": "application/json"}, json.dumps(info).encode())
        elif self.failures:
            return self.failures.pop(0)()
        return await self.forward(method, url, body, headers, timeout_s)


def stage_app(name: str, settings: Settings, runtime: Any) -> Any:
    if name == "text_encoder":
        from text_encoder.app import build_app as build
    elif name == "diffusion_unet":
        from diffusion_unet.app import build_app as build  # type: ignore[assignment]
    else:
        from vae_decoder.app import build_app as build  # type: ignore[assignment]
    return build(settings, runtime)


def http_transport(name: str, double: StageDouble) -> HttpTransport:
    timeouts = Settings(encode_timeout_s=30.0, denoise_timeout_s=30.0, decode_timeout_s=30.0)
    return HttpTransport(name, f"http://{name}.test", timeouts, exchange=double)


@pytest.fixture
def central_with_double(
    settings: Settings, runtimes: dict[str, Any]
) -> Iterator[Callable[[str], tuple[TestClient, StageDouble]]]:
    """``make(stage)``: central whose ``stage`` is reached over HttpTransport (a StageDouble); the rest local."""
    opened: list[TestClient] = []

    def make(name: str) -> tuple[TestClient, StageDouble]:
        double = StageDouble(stage_app(name, settings, runtimes[name]))
        transports = local_transports(*runtimes.values())
        transports[name] = http_transport(name, double)
        c = TestClient(
            build_app(settings, orchestrator=orchestrator(settings, transports)), raise_server_exceptions=False
        )
        c.__enter__()
        opened.append(c)
        return c, double

    yield make
    for c in opened:
        c.__exit__(None, None, None)


def test_all_stages_over_http_match_in_process(
    settings: Settings, runtimes: dict[str, Any], client: TestClient
) -> None:
    """The msgpack wire changes nothing: central over three HTTP stages gives the in-process pixels."""
    doubles = {name: StageDouble(stage_app(name, settings, runtimes[name])) for name in STAGE_NAMES}
    transports: dict[str, Transport] = {name: http_transport(name, d) for name, d in doubles.items()}
    with TestClient(build_app(settings, orchestrator=orchestrator(settings, transports))) as remote:
        assert remote.get("/readyz").status_code == 200
        over_http = ok(remote, seed=9, num_images=2, negative_prompt="ugly")
    local = ok(client, seed=9, num_images=2, negative_prompt="ugly")
    for a, b in zip(over_http["images"], local["images"], strict=True):
        assert np.array_equal(pixels(a), pixels(b))
    for name, double in doubles.items():
        assert double.calls.count(f"/v1/{OPS[name]}") == 1, double.calls  # one hop per stage per request


def _raise(exc: BaseException) -> Failure:
    """What aiohttp raises when the network fails (the same exception classes, made here)."""

    def fail() -> HttpReply:
        raise exc

    return fail


def _respond(
    status: int,
    *,
    json_body: Any = ...,
    text: str | None = None,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Failure:
    hdrs = {k.lower(): v for k, v in (headers or {}).items()}
    if json_body is not ...:
        body, hdrs["content-type"] = json.dumps(json_body).encode(), "application/json"
    elif text is not None:
        body = text.encode()
        hdrs.setdefault("content-type", "text/plain; charset=utf-8")
    else:
        body = content or b""
    return lambda: HttpReply(status, hdrs, body)


REFUSED = aiohttp.ClientConnectorError(
    SimpleNamespace(host="stage.test", port=8001, ssl=False),  # type: ignore[arg-type]
    ConnectionRefusedError(111, "Connection refused"),
)
MSGPACK = {"content-type": wire.CONTENT_TYPE}
# name -> (failure, expected status, expected type, expected param or ...)
STAGE_FAILURES: dict[str, tuple[Failure, int, str, Any]] = {
    "connect-error": (_raise(REFUSED), 503, "unavailable", ...),
    "connect-timeout": (_raise(aiohttp.ConnectionTimeoutError("Connection timeout")), 503, "unavailable", ...),
    "server-disconnected": (_raise(aiohttp.ServerDisconnectedError()), 503, "unavailable", ...),
    "payload-cut-short": (
        _raise(aiohttp.ClientPayloadError("Response payload is not completed")),
        503,
        "unavailable",
        ...,
    ),
    "read-timeout": (_raise(aiohttp.SocketTimeoutError("Timeout on reading data from socket")), 504, "timeout", ...),
    "total-timeout": (_raise(TimeoutError()), 504, "timeout", ...),
    "500-envelope": (_respond(500, json_body=error_envelope("internal_error", "boom")), 502, "bad_gateway", ...),
    "500-html": (_respond(500, text="<html>oops</html>"), 502, "bad_gateway", ...),
    "200-garbage-msgpack": (_respond(200, content=b"\xc1garbage", headers=MSGPACK), 502, "bad_gateway", ...),
    "200-json": (_respond(200, json_body={"prompt_embeds": 1}), 502, "bad_gateway", ...),
    "200-wrong-message": (_respond(200, content=wire.encode({"what": 1}), headers=MSGPACK), 502, "bad_gateway", ...),
    "400-from-stage": (
        _respond(400, json_body=error_envelope("malformed_request", "bad body")),
        502,
        "bad_gateway",
        ...,
    ),
    "422-relayed": (
        _respond(422, json_body=error_envelope("invalid_value", "`height` is wrong", "height")),
        422,
        "invalid_value",
        "height",
    ),
    "429-relayed": (
        _respond(429, json_body=error_envelope("overloaded", "busy"), headers={"Retry-After": "7"}),
        429,
        "overloaded",
        ...,
    ),
    "503-from-stage": (_respond(503, json_body=error_envelope("unavailable", "loading")), 503, "unavailable", ...),
    "504-from-stage": (_respond(504, json_body=error_envelope("timeout", "slow")), 504, "timeout", ...),
}


@pytest.mark.parametrize("case", list(STAGE_FAILURES))
@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_stage_failure_mapping(central_with_double: Any, stage: str, case: str) -> None:
    failure, status, type_, param = STAGE_FAILURES[case]
    c, double = central_with_double(stage)
    double.failures.append(failure)
    response = txt2img(c, seed=1, num_inference_steps=1)
    err = assert_envelope(response, status, type_=type_, param=param)
    if status in (502, 503, 504):
        assert stage in err["message"], err
    if status == 429:
        assert response.headers.get("retry-after") == "7"
    assert not double.failures, "the failing stage was never called"
    # The failure was one request's: central still serves the next one.
    assert txt2img(c, seed=1, num_inference_steps=1).status_code == 200
    assert c.get("/healthz").status_code == 200


# A well-formed message of the wrong shape: the stage answered wrongly (502), the user sent nothing wrong.
WRONG_SHAPES = {
    "text_encoder": {"prompt_embeds": torch.zeros(1, 77, 64), "negative_prompt_embeds": torch.zeros(1, 77, 64)},
    "diffusion_unet": {"latents": torch.zeros(1, 3, 8, 8), "scheduler": "PNDMScheduler"},
    "vae_decoder": {"images": torch.zeros(1, 32, 32, 3, dtype=torch.uint8)},
}


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_stage_answer_of_the_wrong_shape_is_502(central_with_double: Any, stage: str) -> None:
    c, double = central_with_double(stage)
    double.failures.append(_respond(200, content=wire.encode(WRONG_SHAPES[stage]), headers=MSGPACK))
    err = assert_envelope(txt2img(c, seed=1, num_inference_steps=1), 502, type_="bad_gateway")
    assert stage in err["message"], err
    assert txt2img(c, seed=1, num_inference_steps=1).status_code == 200


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_stage_429_without_envelope_keeps_retry_after(central_with_double: Any, stage: str) -> None:
    """An overloaded stage (or the proxy in front of it) answering a bare 429 still means "retry later"."""
    c, double = central_with_double(stage)
    double.failures.append(_respond(429, text="Too Many Requests", headers={"Retry-After": "3"}))
    response = txt2img(c, seed=1, num_inference_steps=1)
    assert_envelope(response, 429, type_="overloaded")
    assert response.headers.get("retry-after") == "3"


# ------------------------------------------------------------------------------------------------ readiness
def test_readyz_when_compatible(client: TestClient, runtimes: dict[str, Any]) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert body["stages"] == {name: rt.fingerprint for name, rt in runtimes.items()}
    assert client.get("/healthz").json()["status"] == "ok"


@pytest.mark.parametrize(
    ("stage", "patch", "words"),
    [
        ("diffusion_unet", {"cross_attention_dim": 64}, ("embedding width", "cross_attention_dim", "64", "32")),
        ("text_encoder", {"hidden_size": 768}, ("embedding width", "hidden_size", "768")),
        ("vae_decoder", {"latent_channels": 16}, ("latent channels", "latent_channels", "16")),
        ("diffusion_unet", {"out_channels": 8}, ("latent channels", "out_channels", "8")),
        ("vae_decoder", {"vae_scale_factor": 4}, ("vae scale factor", "4", "8")),
    ],
)
def test_readyz_names_the_incompatible_dimension(
    central_with_double: Any, stage: str, patch: dict[str, Any], words: tuple[str, ...]
) -> None:
    c, double = central_with_double(stage)
    assert c.get("/readyz").status_code == 200
    double.info_patch = patch
    err = assert_envelope(c.get("/readyz"), 503, type_="unavailable")
    for word in words:
        assert word in err["message"], err
    assert c.get("/healthz").status_code == 200
    # Generating refuses too once the incompatibility is known, with the same reason.
    err = assert_envelope(txt2img(c, seed=1), 503, type_="unavailable")
    assert words[0] in err["message"]
    # And it recovers when the stage agrees again.
    double.info_patch = {}
    assert c.get("/readyz").status_code == 200
    assert txt2img(c, seed=1, num_inference_steps=1).status_code == 200


def test_incompatible_at_start_refuses_generation(settings: Settings, runtimes: dict[str, Any]) -> None:
    double = StageDouble(stage_app("diffusion_unet", settings, runtimes["diffusion_unet"]))
    double.info_patch = {"cross_attention_dim": 64}
    transports = local_transports(*runtimes.values())
    transports["diffusion_unet"] = http_transport("diffusion_unet", double)
    with TestClient(build_app(settings, orchestrator=orchestrator(settings, transports))) as c:
        assert c.get("/healthz").status_code == 200
        err = assert_envelope(txt2img(c, seed=1), 503, type_="unavailable")
        assert "cross_attention_dim" in err["message"]
        assert "/v1/denoise" not in double.calls


@pytest.mark.parametrize(
    ("name", "failure"),
    [
        ("unreachable", _raise(REFUSED)),
        ("loading", _respond(503, json_body=error_envelope("unavailable", "model is loading"))),
        ("info-times-out", _raise(aiohttp.SocketTimeoutError("Timeout on reading data from socket"))),
        ("info-garbage", _respond(200, text="not json")),
        ("info-wrong-shape", _respond(200, json_body={"stage": "diffusion_unet"})),
    ],
)
@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_readyz_is_503_when_a_stage_is_not_ready(
    central_with_double: Any, stage: str, name: str, failure: Failure
) -> None:
    """SPEC §4: /readyz is 503 with the reason whenever a stage is not reachable, loaded and compatible."""
    c, double = central_with_double(stage)
    double.info_failure = failure
    err = assert_envelope(c.get("/readyz"), 503)
    assert stage in err["message"], err
    assert c.get("/healthz").status_code == 200
    info = c.get("/v1/info")
    assert info.status_code == 200
    assert "error" in info.json()["stages"][stage]
    double.info_failure = None
    assert c.get("/readyz").status_code == 200


# --------------------------------------------------------------------------------- compatibility_problems
@pytest.fixture(scope="module")
def infos(runtimes: dict[str, Any]) -> tuple[StageInfo, StageInfo, StageInfo]:
    te, unet, vae = (rt.info() for rt in runtimes.values())
    return te, unet, vae


def _with(info: StageInfo, **config: Any) -> StageInfo:
    return info.model_copy(update={"config": {**info.config, **config}})


def test_compatibility_problems_none_when_compatible(infos: tuple[StageInfo, StageInfo, StageInfo]) -> None:
    assert compatibility_problems(*infos) == []


@pytest.mark.parametrize(
    ("which", "change", "words"),
    [
        (0, {"hidden_size": 768}, ("embedding width", "hidden_size", "768", "cross_attention_dim", "32")),
        (1, {"cross_attention_dim": 1024}, ("embedding width", "1024", "32")),
        (1, {"out_channels": 9}, ("latent channels", "out_channels", "9", "latent_channels", "4")),
        (2, {"latent_channels": 16}, ("latent channels", "16", "4")),
        (1, {"vae_scale_factor": 16}, ("vae scale factor", "16", "8")),
        (2, {"vae_scale_factor": 4}, ("vae scale factor", "4", "8")),
    ],
)
def test_compatibility_problems_names_the_dimension(
    infos: tuple[StageInfo, StageInfo, StageInfo], which: int, change: dict[str, Any], words: tuple[str, ...]
) -> None:
    changed = list(infos)
    changed[which] = _with(infos[which], **change)
    problems = compatibility_problems(*changed)
    assert problems
    assert any(all(word in problem for word in words) for problem in problems), problems


def test_compatibility_problems_lists_every_mismatch(infos: tuple[StageInfo, StageInfo, StageInfo]) -> None:
    te, unet, vae = infos
    problems = compatibility_problems(
        _with(te, hidden_size=768), unet, _with(vae, latent_channels=16, vae_scale_factor=4)
    )
    assert len(problems) == 3
    assert [p.split(":")[0] for p in problems] == ["embedding width", "latent channels", "vae scale factor"]


def test_compatibility_problems_missing_keys_are_a_mismatch(infos: tuple[StageInfo, StageInfo, StageInfo]) -> None:
    te, unet, vae = infos
    bare = te.model_copy(update={"config": {}})
    assert any("embedding width" in p for p in compatibility_problems(bare, unet, vae))


def test_an_inpainting_unet_is_still_compatible(infos: tuple[StageInfo, StageInfo, StageInfo]) -> None:
    """in_channels 9 (inpainting) is fine: what the VAE must match is the UNet's output channels."""
    te, unet, vae = infos
    assert compatibility_problems(te, _with(unet, in_channels=9), vae) == []


# ------------------------------------------------------------------------------------------- concurrency
def test_healthz_answers_while_a_generation_computes(
    client: TestClient, runtimes: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The denoise loop runs off the event loop: /healthz and /readyz answer while it is still computing."""
    unet = runtimes["diffusion_unet"]
    started, release = threading.Event(), threading.Event()
    real_prepare = unet.batcher._prepare

    def slow_prepare(request: Any) -> Any:  # on the UNet's model thread, where the batcher admits the job
        started.set()
        release.wait(60)  # held here until the health checks below have answered
        return real_prepare(request)

    monkeypatch.setattr(unet.batcher, "_prepare", slow_prepare)
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.append(txt2img(client, seed=1, num_inference_steps=30)))
    worker.start()
    try:
        assert started.wait(30), "the generation never reached the UNet"
        health = client.get("/healthz")
        ready = client.get("/readyz")
        assert worker.is_alive() and not results, "the generation finished before the health checks"
        assert health.status_code == 200
        assert ready.status_code == 200
    finally:
        release.set()
        worker.join(60)
    assert results and results[0].status_code == 200, results
