"""SPEC §13 (issue 11, items 1-2): API keys at central, the stage token, browser origins and Host names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from central.app import build_app
from central.cli import service_commands
from shared import wire
from shared.serving.security import parse_keys
from shared.settings import Settings
from tests.helpers import assert_envelope, local_orchestrator, wire_orchestrator
from vae_decoder.app import build_app as vae_app

BODY = {"prompt": "a lighthouse", "seed": 1, "num_inference_steps": 2}


@pytest.fixture()
def keyed(settings: Settings, te_runtime: Any, unet_runtime: Any, vae_runtime: Any) -> Iterator[TestClient]:
    locked = Settings.model_validate({**settings.model_dump(), "api_keys": "first-key,second-key"})
    orch = local_orchestrator(locked, te_runtime, unet_runtime, vae_runtime)
    with TestClient(build_app(locked, orchestrator=orch)) as client:
        yield client


def test_api_keys_guard_every_route_but_probes_metrics_and_docs(keyed: TestClient) -> None:
    """Before: no authentication anywhere; anyone who reached central could generate."""
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "Basic first-key"},
                    {"Authorization": "Bearer first-key-and-more"}):  # fmt: skip
        r = keyed.post("/v1/txt2img", json=BODY, headers=headers)
        err = assert_envelope(r, 401, type_="unauthorized")
        assert r.headers["www-authenticate"] == "Bearer" and "first-key" not in err["message"]
        assert_envelope(keyed.get("/v1/info", headers=headers), 401)
        assert_envelope(keyed.get("/v1/models", headers=headers), 401)
    for key in ("first-key", "second-key"):
        assert keyed.post("/v1/txt2img", json=BODY, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
        assert keyed.get(path).status_code == 200, path


def test_keys_from_a_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# rotated 2026-12\nalpha\n\n  beta  \n")
    assert parse_keys(f"@{keys}") == ["alpha", "beta"]
    assert parse_keys(" a , b ,") == ["a", "b"] and parse_keys("") == []
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    for bad in (f"@{empty}", f"@{tmp_path / 'missing'}"):
        with pytest.raises(ValueError, match="TRIPTYCH_API_KEYS file"):
            parse_keys(bad)


def test_the_stage_token_guards_a_stage_and_central_sends_it(
    settings: Settings, te_runtime: Any, unet_runtime: Any, vae_runtime: Any
) -> None:
    """Before: anyone who reached a stage could POST to the UNet or the VAE."""
    tokened = Settings.model_validate({**settings.model_dump(), "stage_token": "s3cret"})
    latents = {"latents": torch.randn(1, 4, 8, 8)}
    with TestClient(vae_app(tokened, vae_runtime)) as vae:
        headers = {"content-type": wire.CONTENT_TYPE}
        err = assert_envelope(vae.post("/v1/decode", content=wire.encode(latents), headers=headers), 401)
        assert "TRIPTYCH_STAGE_TOKEN" in err["message"]
        auth = {**headers, "authorization": "Bearer s3cret"}
        assert vae.post("/v1/decode", content=wire.encode(latents), headers=auth).status_code == 200
        assert vae.get("/healthz").status_code == 200 and vae.get("/metrics").status_code == 200
        assert_envelope(vae.get("/v1/info"), 401)
    # Central with the same token calls the stages' real apps through the wire: served.
    with TestClient(build_app(tokened, orchestrator=wire_orchestrator(tokened, te_runtime, unet_runtime,
                                                                       vae_runtime))) as client:  # fmt: skip
        assert client.post("/v1/txt2img", json=BODY).status_code == 200
    # Central without it (stages with it): the stages refuse, and central says a stage answered wrongly.
    stages = wire_orchestrator(tokened, te_runtime, unet_runtime, vae_runtime)
    for client_ in (stages.text_encoder, stages.unet, stages.vae):
        client_.transport._token = ""
    with TestClient(build_app(settings, orchestrator=stages)) as client:
        assert_envelope(client.get("/readyz"), 503)


@pytest.fixture()
def central(settings: Settings, te_runtime: Any, unet_runtime: Any, vae_runtime: Any) -> Iterator[TestClient]:
    open_ = Settings.model_validate({**settings.model_dump(), "cors_origins": "https://app.example"})
    with TestClient(build_app(open_, orchestrator=local_orchestrator(open_, te_runtime, unet_runtime,
                                                                       vae_runtime))) as client:  # fmt: skip
        yield client


def test_cross_origin_posts_are_refused_unless_allowed(central: TestClient) -> None:
    """Before: a multipart POST from any web page started a generation on a visitor's local server."""
    form = {"prompt": "x", "num_inference_steps": "2"}
    err = assert_envelope(central.post("/v1/txt2img", data=form, headers={"Origin": "https://evil.example"}), 403)
    assert err["type"] == "forbidden" and "TRIPTYCH_CORS_ORIGINS" in err["message"]
    # The page's own origin, and no Origin at all (curl, SDKs), pass.
    assert central.post("/v1/txt2img", json=BODY, headers={"Origin": "http://testserver"}).status_code == 200
    assert central.post("/v1/txt2img", json=BODY).status_code == 200
    # An allowed origin passes, with CORS headers and a preflight answer.
    r = central.post("/v1/txt2img", json=BODY, headers={"Origin": "https://app.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
    pre = central.options("/v1/txt2img", headers=preflight)
    assert pre.status_code == 200 and "POST" in pre.headers["access-control-allow-methods"]
    # Reading is not refused (a GET changes nothing), but gets no CORS header for a foreign origin.
    r = central.get("/v1/schedulers", headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_hosts_outside_the_allow_list_are_refused(
    settings: Settings, te_runtime: Any, unet_runtime: Any, vae_runtime: Any
) -> None:
    """DNS rebinding: an attacker's name resolving to 127.0.0.1 makes its page 'same origin'."""
    hosts = Settings.model_validate({**settings.model_dump(), "allowed_hosts": "localhost,127.0.0.1"})
    orch = local_orchestrator(hosts, te_runtime, unet_runtime, vae_runtime)
    with TestClient(build_app(hosts, orchestrator=orch), base_url="http://localhost:8000") as client:
        assert client.post("/v1/txt2img", json=BODY).status_code == 200
        rebound = {"Host": "rebind.evil.example:8000", "Origin": "http://rebind.evil.example:8000"}
        assert_envelope(client.post("/v1/txt2img", json=BODY, headers=rebound), 400, type_="malformed_request")
        assert client.get("/healthz", headers={"Host": "127.0.0.1:8000"}).status_code == 200


def test_serve_all_binds_the_stages_to_loopback() -> None:
    ports = {"central": 8000, "text-encoder": 8001, "diffusion-unet": 8002, "vae-decoder": 8003}
    commands = {name: (cmd, env) for name, cmd, env in service_commands("0.0.0.0", ports)}
    for name, (cmd, env) in commands.items():
        bind = cmd[cmd.index("--host") + 1]
        assert bind == ("0.0.0.0" if name == "central" else "127.0.0.1"), (name, cmd)
        assert cmd[cmd.index("--port") + 1] == str(ports[name])
        assert all(url.startswith("http://127.0.0.1:") for url in env.values())
