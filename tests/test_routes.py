"""Every route of every service, enumerated from the apps themselves: a GET answers 200, a POST with a
body that is not a valid message answers a 4xx envelope. A route added without a thought for its errors
(the UNet's /v1/schedulers once answered 500 to every call) fails here."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from central.app import build_app as central_app
from diffusion_unet.app import build_app as unet_app
from shared.settings import Settings
from tests.helpers import assert_envelope, local_orchestrator
from text_encoder.app import build_app as te_app
from vae_decoder.app import build_app as vae_app

A1111_GETS = ("progress", "sd-models", "options", "samplers", "schedulers", "loras", "embeddings", "scripts")

# What each service serves (besides /metrics and FastAPI's /docs, /redoc, /openapi.json). Adding a route
# means adding it here, next to the tests of what it does.
ROUTES = {
    "central": {
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/v1/info"),
        ("GET", "/v1/models"),
        ("GET", "/v1/schedulers"),
        ("POST", "/v1/txt2img"),
        ("POST", "/v1/img2img"),
        ("POST", "/v1/inpaint"),
        ("POST", "/v1/outpaint"),
        # jobs (tests/test_jobs.py)
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/{job_id}"),
        ("GET", "/v1/jobs/{job_id}/images/{index}"),
        ("GET", "/v1/jobs/{job_id}/events"),
        ("POST", "/v1/jobs/{job_id}/cancel"),
        # OpenAI images (tests/test_openai.py)
        ("POST", "/v1/images/generations"),
        ("POST", "/v1/images/edits"),
        # A1111 (tests/test_a1111.py)
        *{("GET", f"/sdapi/v1/{p}") for p in A1111_GETS},
        *{("POST", f"/sdapi/v1/{p}") for p in ("txt2img", "img2img", "options", "interrupt", "skip")},
        *{("GET", f"/controlnet/{p}") for p in ("model_list", "module_list", "version")},
    },
    "text_encoder": {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/v1/info"), ("POST", "/v1/encode")},
    "diffusion_unet": {
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/v1/info"),
        ("GET", "/v1/schedulers"),
        ("POST", "/v1/denoise"),
    },
    "vae_decoder": {
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/v1/info"),
        ("POST", "/v1/decode"),
        ("POST", "/v1/encode-image"),
    },
}
FRAMEWORK = {"/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
# Routes that answer in OpenAI's error shape ({"message", "type", "param", "code"}), as the openai client expects.
OPENAI = {"/v1/images/generations", "/v1/images/edits"}
# POSTs that take no body (their own tests cover them): cancel a job (404 for an unknown one), A1111's
# interrupt and skip (webuiapi sends them empty, without a Content-Type).
BODYLESS = {"/v1/jobs/{job_id}/cancel", "/sdapi/v1/interrupt", "/sdapi/v1/skip"}


@pytest.fixture(scope="module")
def clients(
    settings: Settings, te_runtime: Any, unet_runtime: Any, vae_runtime: Any
) -> Iterator[dict[str, TestClient]]:
    apps = {
        "central": central_app(
            settings, orchestrator=local_orchestrator(settings, te_runtime, unet_runtime, vae_runtime)
        ),
        "text_encoder": te_app(settings, te_runtime),
        "diffusion_unet": unet_app(settings, unet_runtime),
        "vae_decoder": vae_app(settings, vae_runtime),
    }
    with (
        TestClient(apps["central"]) as central,
        TestClient(apps["text_encoder"]) as te,
        TestClient(apps["diffusion_unet"]) as unet,
        TestClient(apps["vae_decoder"]) as vae,
    ):
        yield {"central": central, "text_encoder": te, "diffusion_unet": unet, "vae_decoder": vae}


def routes_of(client: TestClient) -> set[tuple[str, str]]:
    """Every (method, path) the app documents in its OpenAPI schema: all its routes but /metrics."""
    paths = client.get("/openapi.json").json()["paths"]
    return {(method.upper(), path) for path, ops in paths.items() for method in ops}


@pytest.mark.parametrize("service", list(ROUTES))
def test_every_route_is_known(clients: dict[str, TestClient], service: str) -> None:
    assert routes_of(clients[service]) == ROUTES[service]


@pytest.mark.parametrize("service", list(ROUTES))
def test_every_get_route_answers(clients: dict[str, TestClient], service: str) -> None:
    client = clients[service]
    for method, path in sorted(ROUTES[service]):
        if method == "GET" and "{" not in path:  # routes of one resource (a job) are tested with one
            r = client.get(path)
            assert r.status_code == 200, (service, path, r.status_code, r.text[:300])
    for path in sorted(FRAMEWORK - {"/docs/oauth2-redirect"}):
        assert client.get(path).status_code == 200, (service, path)


@pytest.mark.parametrize("service", list(ROUTES))
def test_every_post_route_refuses_a_bad_body_with_a_4xx_envelope(clients: dict[str, TestClient], service: str) -> None:
    client = clients[service]
    for method, path in sorted(ROUTES[service]):
        if method != "POST" or path in BODYLESS:
            continue
        content_type = "application/json" if service == "central" else "application/msgpack"
        for body in (b"", b"\xc1", b"[1, 2"):
            r = client.post(path, content=body, headers={"content-type": content_type})
            assert 400 <= r.status_code < 500, (service, path, body, r.status_code, r.text[:300])
            check_error(r, path, r.status_code)
        r = client.post(path, content=b"x", headers={"content-type": "text/plain"})
        check_error(r, path, 415)


def check_error(r: Any, path: str, status: int) -> None:
    """Our envelope, or on the OpenAI routes OpenAI's error object (a 4xx, as its client maps them)."""
    if path not in OPENAI:
        assert_envelope(r, status)
        return
    assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:300])
    assert {"message", "type", "param", "code"} <= set(r.json()["error"]), r.text[:300]


def test_models_is_503_while_a_stage_is_down(settings: Settings) -> None:
    """``/v1/models`` reads the stages' infos: with the stages unreachable it is the SPEC's 503, not a 500."""
    from central.app import http_orchestrator

    down = settings.model_copy(
        update={f"{s}_url": "http://127.0.0.1:9" for s in ("text_encoder", "diffusion_unet", "vae_decoder")}
    )
    orch = http_orchestrator(down)
    with TestClient(central_app(down, orchestrator=orch)) as client:
        assert_envelope(client.get("/v1/models"), 503)


@pytest.mark.parametrize("service", ["central", "diffusion_unet"])
def test_schedulers_of_a_named_unet(clients: dict[str, TestClient], service: str) -> None:
    client = clients[service]
    base = client.get("/v1/schedulers").json()
    assert {"name", "aliases", "options"} <= set(base[0])
    assert client.get("/v1/schedulers", params={"model": "base"}).json() == base
    err = assert_envelope(client.get("/v1/schedulers", params={"model": "nope"}), 422, param="model")
    assert "base" in err["message"]


@pytest.mark.parametrize("service", list(ROUTES))
def test_docs_pages_load_nothing_from_the_internet(clients: dict[str, TestClient], service: str) -> None:
    """Before: /docs and /redoc loaded Swagger UI and ReDoc from a CDN, blank in an air-gapped cluster. Every
    script, style sheet and icon they reference is now served by the service itself."""
    import re

    client = clients[service]
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: ["']([^"']+)["']""", html)
        urls = [u for pair in assets for u in pair if u]
        assert urls and not [u for u in urls if "://" in u or u.startswith("//")], (page, urls)
        for url in urls:
            r = client.get(url)
            assert r.status_code == 200 and r.content, (page, url)
