"""The three stage services over HTTP (SPEC §5, §6, §7): health, readiness, info, good msgpack round trips, and
every kind of hostile or invalid body answered with the one error envelope and the right status, after which
the service still serves good requests."""

from __future__ import annotations

import math
import pickle
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from shared import wire
from shared.settings import Settings
from tests.helpers import assert_envelope

# ------------------------------------------------------------------------------------------------ helpers


def post_msgpack(client: TestClient, path: str, body: bytes, **headers: str) -> Any:
    return client.post(path, content=body, headers={"content-type": wire.CONTENT_TYPE, **headers})


def tensor_ext(dtype: str, shape: list[int], data: bytes) -> msgpack.ExtType:
    """A tensor ext value built by hand from the documented layout (so it may lie)."""
    name = dtype.encode("ascii")
    header = bytes([len(name)]) + name + bytes([len(shape)]) + b"".join(struct.pack("<Q", d) for d in shape)
    return msgpack.ExtType(wire.TENSOR_EXT_TYPE, header + data)


def pack(message: Any) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


# ------------------------------------------------------------------------------------------------ stages
def _embeds(width: int = 32, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 77, width, generator=torch.Generator().manual_seed(0))


def good_encode() -> dict[str, Any]:
    return {"prompt": ["a red fox in the snow"]}


def good_denoise() -> dict[str, Any]:
    return {
        "prompt_embeds": _embeds(),
        "negative_prompt_embeds": _embeds() * 0,
        "height": 64,
        "width": 64,
        "num_inference_steps": 2,
        "seeds": [0],
    }


def good_decode() -> dict[str, Any]:
    return {"latents": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))}


@dataclass(frozen=True)
class Stage:
    name: str
    path: str
    good: Callable[[], dict[str, Any]]
    tensor_field: str  # where a hostile tensor goes
    required_field: str
    wrong_type: tuple[str, Any]

    def build(self, settings: Settings, runtime: Any = None) -> FastAPI:
        if self.name == "text_encoder":
            from text_encoder.app import build_app
        elif self.name == "diffusion_unet":
            from diffusion_unet.app import build_app  # type: ignore[assignment]
        else:
            from vae_decoder.app import build_app  # type: ignore[assignment]
        return build_app(settings, runtime)

    def runtime_class(self) -> Any:
        if self.name == "text_encoder":
            from text_encoder.runtime import TextEncoderRuntime

            return TextEncoderRuntime
        if self.name == "diffusion_unet":
            from diffusion_unet.runtime import UNetRuntime

            return UNetRuntime
        from vae_decoder.runtime import VaeRuntime

        return VaeRuntime


STAGES = {
    "text_encoder": Stage("text_encoder", "/v1/encode", good_encode, "prompt", "prompt", ("prompt", 5)),
    "diffusion_unet": Stage(
        "diffusion_unet", "/v1/denoise", good_denoise, "prompt_embeds", "height", ("height", "sixty-four")
    ),
    "vae_decoder": Stage("vae_decoder", "/v1/decode", good_decode, "latents", "latents", ("latents", "pixels")),
}
STAGE_NAMES = list(STAGES)


@pytest.fixture(scope="module")
def clients(
    settings: Settings, te_runtime: Any, unet_runtime: Any, vae_runtime: Any
) -> Iterator[dict[str, TestClient]]:
    runtimes = {"text_encoder": te_runtime, "diffusion_unet": unet_runtime, "vae_decoder": vae_runtime}
    apps = {name: STAGES[name].build(settings, runtimes[name]) for name in STAGE_NAMES}
    with (
        TestClient(apps["text_encoder"], raise_server_exceptions=False) as te,
        TestClient(apps["diffusion_unet"], raise_server_exceptions=False) as unet,
        TestClient(apps["vae_decoder"], raise_server_exceptions=False) as vae,
    ):
        yield {"text_encoder": te, "diffusion_unet": unet, "vae_decoder": vae}


def check_good(stage: Stage, client: TestClient) -> dict[str, Any]:
    """A good request succeeds; returns the decoded response message."""
    response = post_msgpack(client, stage.path, wire.encode(stage.good()))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].split(";")[0] == wire.CONTENT_TYPE
    message = wire.decode(response.content)
    assert isinstance(message, dict)
    return message


# ------------------------------------------------------------------------------------ health, ready, info
@pytest.mark.parametrize("name", STAGE_NAMES)
def test_health_and_ready(clients: dict[str, TestClient], name: str) -> None:
    client = clients[name]
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"


INFO_CONFIG_KEYS = {
    "text_encoder": {"hidden_size"},
    "diffusion_unet": {"cross_attention_dim", "in_channels", "out_channels", "sample_size", "vae_scale_factor"},
    "vae_decoder": {"latent_channels", "vae_scale_factor", "scaling_factor", "sample_size"},
}


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_info_has_spec_keys(clients: dict[str, TestClient], name: str) -> None:
    response = clients[name].get("/v1/info")
    assert response.status_code == 200, response.text
    info = response.json()
    assert {"stage", "model", "config", "device", "dtype", "version"} <= set(info)
    assert info["stage"] == name
    assert set(info["model"]) >= {"id", "fingerprint"}
    assert info["model"]["id"] and info["model"]["fingerprint"]
    assert INFO_CONFIG_KEYS[name] <= set(info["config"]), info["config"]
    assert info["device"] == "cpu"
    assert info["dtype"] == "float32"
    assert isinstance(info["version"], str) and info["version"]


def test_infos_agree_with_each_other(clients: dict[str, TestClient]) -> None:
    te, unet, vae = (clients[n].get("/v1/info").json()["config"] for n in STAGE_NAMES)
    assert te["hidden_size"] == unet["cross_attention_dim"] == 32
    assert unet["out_channels"] == vae["latent_channels"] == 4
    assert unet["vae_scale_factor"] == vae["vae_scale_factor"] == 8
    assert unet["sample_size"] * unet["vae_scale_factor"] == vae["sample_size"] == 64
    assert math.isclose(vae["scaling_factor"], 0.18215)


# ------------------------------------------------------------------------------------------- round trips
def test_encode_round_trip(clients: dict[str, TestClient]) -> None:
    body = wire.encode({"prompt": ["a cat", "a dog"], "negative_prompt": ["ugly", ""]})
    message = wire.decode(post_msgpack(clients["text_encoder"], "/v1/encode", body).content)
    pos, neg = message["prompt_embeds"], message["negative_prompt_embeds"]
    assert pos.dtype == neg.dtype == torch.float32
    assert pos.shape == neg.shape == (2, 77, 32)
    assert torch.isfinite(pos).all() and not torch.equal(pos, neg)

    single = check_good(STAGES["text_encoder"], clients["text_encoder"])
    assert single["prompt_embeds"].shape == (1, 77, 32)
    assert single["prompt_embeds"].dtype == torch.float32

    no_cfg = wire.decode(
        post_msgpack(
            clients["text_encoder"],
            "/v1/encode",
            wire.encode({"prompt": ["a cat"], "do_classifier_free_guidance": False}),
        ).content
    )
    assert "negative_prompt_embeds" not in no_cfg
    assert no_cfg["prompt_embeds"].shape == (1, 77, 32)


def test_denoise_round_trip_is_deterministic(clients: dict[str, TestClient]) -> None:
    stage = STAGES["diffusion_unet"]
    first = check_good(stage, clients["diffusion_unet"])
    again = check_good(stage, clients["diffusion_unet"])
    assert first["latents"].dtype == torch.float32
    assert first["latents"].shape == (1, 4, 8, 8)
    assert first["scheduler"] == "PNDMScheduler"
    assert torch.equal(first["latents"], again["latents"])

    two = good_denoise() | {"num_images_per_prompt": 2, "seeds": [5, 6], "scheduler": "DDIMScheduler"}
    out = wire.decode(post_msgpack(clients["diffusion_unet"], "/v1/denoise", wire.encode(two)).content)
    assert out["latents"].shape == (2, 4, 8, 8)
    assert out["scheduler"] == "DDIMScheduler"

    from_latents = good_denoise()
    del from_latents["seeds"]
    from_latents["latents"] = torch.randn(1, 4, 8, 8)
    response = post_msgpack(clients["diffusion_unet"], "/v1/denoise", wire.encode(from_latents))
    assert response.status_code == 200, response.text
    assert wire.decode(response.content)["latents"].shape == (1, 4, 8, 8)


def test_decode_round_trip(clients: dict[str, TestClient]) -> None:
    message = check_good(STAGES["vae_decoder"], clients["vae_decoder"])
    images = message["images"]
    assert images.dtype == torch.uint8
    assert images.shape == (2, 64, 64, 3)
    # bf16 and fp16 latents are accepted too (cast to the stage's dtype).
    half = {"latents": good_decode()["latents"][:1].to(torch.bfloat16)}
    response = post_msgpack(clients["vae_decoder"], "/v1/decode", wire.encode(half))
    assert response.status_code == 200, response.text
    assert wire.decode(response.content)["images"].shape == (1, 64, 64, 3)


# ------------------------------------------------------------------------------------- hostile bodies
def _bodies(stage: Stage) -> dict[str, tuple[bytes, int, str]]:
    """name -> (body, expected status, expected error type); all sent as application/msgpack."""
    good = stage.good()
    huge = tensor_ext("float32", [2**40, 2**40, 2**20], b"")
    lying = tensor_ext("float32", [1, 77, 32], b"\x00" * 16)
    return {
        "empty": (b"", 400, "malformed_request"),
        "garbage": (b"this is not msgpack \xc1\xff\x00", 400, "malformed_request"),
        "never-used-byte": (b"\xc1", 400, "malformed_request"),
        "truncated": (wire.encode(good)[:-7], 400, "malformed_request"),
        "trailing-bytes": (wire.encode(good) + b"\x00", 400, "malformed_request"),
        "pickle": (pickle.dumps(good), 400, "malformed_request"),
        "pickle-of-tensor": (pickle.dumps(torch.zeros(2)), 400, "malformed_request"),
        "lying-tensor-header": (pack({**wire_map(good), stage.tensor_field: lying}), 400, "malformed_request"),
        "unknown-dtype": (
            pack({**wire_map(good), stage.tensor_field: tensor_ext("complex64", [1], b"\x00" * 8)}),
            400,
            "malformed_request",
        ),
        "unknown-ext-type": (pack({stage.tensor_field: msgpack.ExtType(7, b"abc")}), 400, "malformed_request"),
        "astronomical-shape": (pack({**wire_map(good), stage.tensor_field: huge}), 413, "payload_too_large"),
        "too-many-dims": (
            pack({stage.tensor_field: tensor_ext("uint8", [1] * 40, b"\x00")}),
            400,
            "malformed_request",
        ),
        "huge-declared-map": (b"\xdf\x7f\xff\xff\xff", 413, "payload_too_large"),
        "deep-nesting": (b"\x91" * 5000 + b"\x00", 400, "malformed_request"),
        "array-not-map": (wire.encode([good]), 400, "malformed_request"),
        "scalar-not-map": (wire.encode(42), 400, "malformed_request"),
        "int-map-key": (pack({1: "x"}), 400, "malformed_request"),
        "bin-map-key": (b"\x81\xc4\x01k\x01", 400, "malformed_request"),
    }


def wire_map(message: dict[str, Any]) -> dict[str, Any]:
    """A message with its tensors turned into ext values, so msgpack.packb can mix in hand-made exts."""
    return {k: wire.tensor_to_ext(v) if isinstance(v, torch.Tensor) else v for k, v in message.items()}


HOSTILE_CASES = list(_bodies(STAGES["text_encoder"]))


@pytest.mark.parametrize("case", HOSTILE_CASES)
@pytest.mark.parametrize("name", STAGE_NAMES)
def test_hostile_body(clients: dict[str, TestClient], name: str, case: str) -> None:
    stage, client = STAGES[name], clients[name]
    body, status, type_ = _bodies(stage)[case]
    assert_envelope(post_msgpack(client, stage.path, body), status, type_=type_)
    check_good(stage, client)


@pytest.mark.parametrize(
    "content_type", ["application/json", "text/plain", None, "application/x-msgpack", "multipart/form-data"]
)
@pytest.mark.parametrize("name", STAGE_NAMES)
def test_wrong_content_type_is_415(clients: dict[str, TestClient], name: str, content_type: str | None) -> None:
    stage, client = STAGES[name], clients[name]
    body = b'{"prompt": ["a cat"]}' if content_type == "application/json" else wire.encode(stage.good())
    headers = {"content-type": content_type} if content_type else {}
    response = client.post(stage.path, content=body, headers=headers)
    if content_type is None:
        assert "content-type" not in response.request.headers
    assert_envelope(response, 415, type_="unsupported_media_type")
    check_good(stage, client)


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_content_type_with_parameters_is_accepted(clients: dict[str, TestClient], name: str) -> None:
    stage = STAGES[name]
    response = clients[name].post(
        stage.path, content=wire.encode(stage.good()), headers={"content-type": "Application/MsgPack; charset=binary"}
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_declared_content_length_over_limit_is_413(clients: dict[str, TestClient], name: str) -> None:
    """A Content-Length above the limit is refused before the body is read."""
    stage, client = STAGES[name], clients[name]
    declared = str(256 * 1024 * 1024 + 1)
    response = client.post(
        stage.path, content=b"\x80", headers={"content-type": wire.CONTENT_TYPE, "content-length": declared}
    )
    assert_envelope(response, 413, type_="payload_too_large")
    response = client.post(
        stage.path, content=b"\x80", headers={"content-type": wire.CONTENT_TYPE, "content-length": "lots"}
    )
    assert_envelope(response, 400, type_="malformed_request")
    check_good(stage, client)


@pytest.fixture(scope="module")
def small_limit_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"max_body_bytes": 4096})


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_body_over_configured_limit_is_413(small_limit_settings: Settings, name: str) -> None:
    """An app that owns its runtime, built with a small ``max_body_bytes``: bodies above it get 413."""
    stage = STAGES[name]
    with TestClient(stage.build(small_limit_settings), raise_server_exceptions=False) as client:
        wait_ready(client)
        big = wire.encode({**stage.good(), "padding": "x" * 8000})
        assert_envelope(post_msgpack(client, stage.path, big), 413, type_="payload_too_large")

        # Without a Content-Length (chunked), the limit still holds while the body streams in.
        def chunks() -> Iterator[bytes]:
            yield big[:3000]
            yield big[3000:]

        response = client.post(stage.path, content=chunks(), headers={"content-type": wire.CONTENT_TYPE})
        assert_envelope(response, 413, type_="payload_too_large")
        if name != "diffusion_unet":  # a good denoise body (two 77x32 fp32 tensors) is above 4 KiB
            check_good(stage, client)


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_build_app_honours_settings_with_a_given_runtime(
    small_limit_settings: Settings, clients: dict[str, TestClient], name: str
) -> None:
    """``build_app(settings, runtime)``: the limits come from ``settings``, not silently from the runtime's."""
    stage = STAGES[name]
    runtime = clients[name].app.state.runtime  # type: ignore[attr-defined]
    with TestClient(stage.build(small_limit_settings, runtime), raise_server_exceptions=False) as client:
        big = wire.encode({**stage.good(), "padding": "x" * 8000})
        assert_envelope(post_msgpack(client, stage.path, big), 413, type_="payload_too_large")


# ---------------------------------------------------------------------------------- validation (422)
def _without(message: dict[str, Any], field: str) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k != field}


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_missing_required_field_is_422_naming_it(clients: dict[str, TestClient], name: str) -> None:
    stage, client = STAGES[name], clients[name]
    body = wire.encode(_without(stage.good(), stage.required_field))
    err = assert_envelope(
        post_msgpack(client, stage.path, body), 422, type_="invalid_value", param=stage.required_field
    )
    assert stage.required_field in err["message"]
    check_good(stage, client)


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_wrong_type_is_422_naming_the_field(clients: dict[str, TestClient], name: str) -> None:
    stage, client = STAGES[name], clients[name]
    field, value = stage.wrong_type
    body = wire.encode(stage.good() | {field: value})
    assert_envelope(post_msgpack(client, stage.path, body), 422, type_="invalid_value", param=field)
    check_good(stage, client)


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_unknown_field_is_422_naming_it(clients: dict[str, TestClient], name: str) -> None:
    stage, client = STAGES[name], clients[name]
    body = wire.encode(stage.good() | {"promtp_typo": 1})
    err = assert_envelope(post_msgpack(client, stage.path, body), 422, type_="invalid_value", param="promtp_typo")
    assert "promtp_typo" in err["message"]
    check_good(stage, client)


def _denoise(**changes: Any) -> dict[str, Any]:
    message = good_denoise() | changes
    return {k: v for k, v in message.items() if v is not None}


# name -> (message, expected param or ... for "any", words the message must contain)
DENOISE_INVALID: dict[str, tuple[dict[str, Any], Any, tuple[str, ...]]] = {
    "height-not-multiple-of-8": (_denoise(height=60), "height", ("divisible by 8",)),
    "width-not-multiple-of-8": (_denoise(width=70), "width", ("divisible by 8",)),
    "height-too-small": (_denoise(height=0), "height", ()),
    "height-too-large": (_denoise(height=10**9), "height", ()),
    "embedding-width": (
        _denoise(prompt_embeds=_embeds(16), negative_prompt_embeds=_embeds(16)),
        "prompt_embeds",
        ("32",),
    ),
    "embeddings-2d": (_denoise(prompt_embeds=torch.zeros(77, 32)), "prompt_embeds", ("prompt_embeds",)),
    "embeddings-int": (
        _denoise(prompt_embeds=torch.zeros(1, 77, 32, dtype=torch.int64)),
        "prompt_embeds",
        ("float",),
    ),
    "embeddings-empty": (_denoise(prompt_embeds=torch.zeros(0, 77, 32)), "prompt_embeds", ("empty",)),
    "negative-shape-mismatch": (_denoise(negative_prompt_embeds=_embeds(32, 2)), ..., ("negative_prompt_embeds",)),
    "negative-missing-with-guidance": (_denoise(negative_prompt_embeds=None), ..., ("negative_prompt_embeds",)),
    "both-seeds-and-latents": (_denoise(latents=torch.zeros(1, 4, 8, 8)), ..., ("seeds", "latents")),
    "neither-seeds-nor-latents": (_denoise(seeds=None), ..., ("seeds", "latents")),
    "seeds-count-mismatch": (_denoise(seeds=[1, 2, 3]), ..., ("seeds",)),
    "seed-negative": (_denoise(seeds=[-1]), "seeds.0", ()),
    "seed-too-large": (_denoise(seeds=[2**64 - 1]), "seeds.0", ()),
    "latents-wrong-shape": (_denoise(seeds=None, latents=torch.zeros(1, 4, 16, 16)), "latents", ("latents",)),
    "unknown-scheduler": (_denoise(scheduler="FooScheduler"), "scheduler", ("PNDMScheduler", "DDIMScheduler")),
    "scheduler-not-a-class-name": (_denoise(scheduler="__class__"), "scheduler", ("PNDMScheduler",)),
    "guidance-nan": (_denoise(guidance_scale=float("nan")), "guidance_scale", ()),
    "guidance-inf": (_denoise(guidance_scale=float("inf")), "guidance_scale", ()),
    "guidance-negative": (_denoise(guidance_scale=-1.0), "guidance_scale", ()),
    "steps-zero": (_denoise(num_inference_steps=0), "num_inference_steps", ()),
    "steps-too-many": (_denoise(num_inference_steps=10**6), "num_inference_steps", ()),
    "eta-nan": (_denoise(eta=float("nan")), "eta", ()),
    "unknown-variant": (_denoise(model="no-such-variant"), "model", ("base",)),
}


@pytest.mark.parametrize("case", list(DENOISE_INVALID))
def test_denoise_invalid_values_are_422(clients: dict[str, TestClient], case: str) -> None:
    message, param, words = DENOISE_INVALID[case]
    client = clients["diffusion_unet"]
    err = assert_envelope(post_msgpack(client, "/v1/denoise", wire.encode(message)), 422, type_="invalid_value")
    if param is not ...:
        assert err["param"] == param, err
    for word in words:
        assert word in err["message"], err
    check_good(STAGES["diffusion_unet"], client)


DECODE_INVALID: dict[str, tuple[dict[str, Any], Any]] = {
    "wrong-latent-channels": ({"latents": torch.zeros(1, 3, 8, 8)}, "latents"),
    "latents-3d": ({"latents": torch.zeros(4, 8, 8)}, "latents"),
    "latents-uint8": ({"latents": torch.zeros(1, 4, 8, 8, dtype=torch.uint8)}, "latents"),
    "latents-empty": ({"latents": torch.zeros(0, 4, 8, 8)}, "latents"),
}


@pytest.mark.parametrize("case", list(DECODE_INVALID))
def test_decode_invalid_values_are_422(clients: dict[str, TestClient], case: str) -> None:
    message, param = DECODE_INVALID[case]
    client = clients["vae_decoder"]
    err = assert_envelope(post_msgpack(client, "/v1/decode", wire.encode(message)), 422, type_="invalid_value")
    assert err["param"] == param, err
    assert "latents" in err["message"]
    check_good(STAGES["vae_decoder"], client)


ENCODE_INVALID: dict[str, tuple[dict[str, Any], Any, tuple[str, ...]]] = {
    "negative-prompt-length-mismatch": (
        {"prompt": ["a", "b"], "negative_prompt": ["x"]},
        ...,
        ("negative_prompt", "prompt"),
    ),
    "no-prompts": ({"prompt": []}, "prompt", ()),
    "prompt-not-a-list": ({"prompt": "a cat"}, "prompt", ()),
    "prompt-item-not-str": ({"prompt": ["ok", 3]}, "prompt.1", ()),
    "too-many-prompts": ({"prompt": ["x"] * 65}, "prompt", ()),
    "prompt-too-long": ({"prompt": ["x" * 9000]}, "prompt.0", ()),
    "cfg-not-bool": ({"prompt": ["x"], "do_classifier_free_guidance": "maybe"}, "do_classifier_free_guidance", ()),
}


@pytest.mark.parametrize("case", list(ENCODE_INVALID))
def test_encode_invalid_values_are_422(clients: dict[str, TestClient], case: str) -> None:
    message, param, words = ENCODE_INVALID[case]
    client = clients["text_encoder"]
    err = assert_envelope(post_msgpack(client, "/v1/encode", wire.encode(message)), 422, type_="invalid_value")
    if param is not ...:
        assert err["param"] == param, err
    for word in words:
        assert word in err["message"], err
    check_good(STAGES["text_encoder"], client)


# ---------------------------------------------------------------------------------- routing errors
@pytest.mark.parametrize("name", STAGE_NAMES)
def test_unknown_path_and_wrong_method_use_the_envelope(clients: dict[str, TestClient], name: str) -> None:
    stage, client = STAGES[name], clients[name]
    assert_envelope(client.get("/v1/no-such-thing"), 404, type_="not_found")
    assert_envelope(post_msgpack(client, "/v2/encode", wire.encode(stage.good())), 404)
    assert_envelope(client.get(stage.path), 405)
    assert_envelope(client.delete(stage.path), 405)
    assert_envelope(client.post("/healthz"), 405)
    check_good(stage, client)


# ---------------------------------------------------------------------------------- readiness
def wait_ready(client: TestClient, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"not ready within {timeout_s} s: {client.get('/readyz').text}")


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_not_ready_while_loading(settings: Settings, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """While the background load runs, /healthz is 200 and /readyz, /v1/info and the POST route are 503."""
    stage = STAGES[name]
    cls = stage.runtime_class()
    runtime = cls(settings)
    started, release = threading.Event(), threading.Event()
    real_load = runtime.load

    def blocked_load() -> None:
        started.set()
        if not release.wait(60):
            raise RuntimeError("test never released the load")
        real_load()

    monkeypatch.setattr(runtime, "load", blocked_load)
    try:
        with TestClient(stage.build(settings, runtime), raise_server_exceptions=False) as client:
            assert started.wait(30), "the lifespan did not start loading the model"
            assert client.get("/healthz").status_code == 200
            for response in (
                client.get("/readyz"),
                client.get("/v1/info"),
                post_msgpack(client, stage.path, wire.encode(stage.good())),
                # Even a hostile body gets the 503, not a 500.
                post_msgpack(client, stage.path, b"\xc1"),
            ):
                err = assert_envelope(response, 503, type_="unavailable")
                assert "loading" in err["message"]
                assert response.headers.get("retry-after")
            assert client.get("/healthz").status_code == 200
            release.set()
            wait_ready(client)
            check_good(stage, client)
    finally:
        release.set()
        runtime.close()


def test_failed_load_is_503_without_server_paths(settings: Settings, tmp_path: Any) -> None:
    """A model that cannot load keeps /readyz at 503 with the envelope; the message names no server path."""
    from text_encoder.runtime import TextEncoderRuntime

    missing = tmp_path / "no-such-model"
    bad = settings.model_copy(update={"model": str(missing)})
    runtime = TextEncoderRuntime(bad)
    try:
        with TestClient(STAGES["text_encoder"].build(bad, runtime), raise_server_exceptions=False) as client:
            deadline = time.monotonic() + 30
            while runtime._load_error is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.get("/healthz").status_code == 200
            for response in (client.get("/readyz"), post_msgpack(client, "/v1/encode", wire.encode(good_encode()))):
                err = assert_envelope(response, 503, type_="unavailable")
                assert "fail" in err["message"]
                assert str(tmp_path) not in response.text, f"server path leaked: {response.text}"
    finally:
        runtime.close()
