"""The web page at ``/`` (SPEC §11, §13), in a real browser against a real central.

Chromium is Debian's package (``apt-get install -y chromium``; ``.ci/run`` installs it as root), driven by
Playwright's Python API (``pip install -e '.[dev]'``) through ``executable_path``: no ``playwright install``,
no browser download. Each test gets a fresh profile (``--user-data-dir``). A screenshot of the page after a
generation is kept at ``tests/artifacts/webpage.png``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from central.app import build_app
from central.web import install_web
from shared.settings import Settings
from tests.conftest import REPO, free_port_block

ARTIFACTS = REPO / "tests" / "artifacts"
KEY = "page-test-key-4f1c"
PROMPT = "a lighthouse at dusk"
# Without the networking flags, Chromium stalls on a closed network (component updates, sync, QUIC probes).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# `triptych serve central`, with the page installed on the app if build_app does not install it itself.
LAUNCHER = """
import sys
import central.cli as cli
from central.web import install_web

build = cli.build_service_app

def with_page(*args, **kwargs):
    app = build(*args, **kwargs)
    if not any(getattr(route, "path", None) == "/" for route in app.routes):
        install_web(app)
    return app

cli.build_service_app = with_page
sys.exit(cli.main(sys.argv[1:]))
"""


@contextmanager
def page_app(**settings: Any) -> Iterator[TestClient]:
    """central's app with the page; no stage runs (nothing here needs one)."""
    app = build_app(Settings(device="cpu", **settings))
    if not any(getattr(route, "path", None) == "/" for route in app.routes):
        install_web(app)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        yield client


# ================================================================================================ HTTP only
def test_the_page_and_its_files_are_served_without_a_key_but_the_api_is_not() -> None:
    with page_app(api_keys=KEY) as client:
        check_page_served_without_a_key(client)


def check_page_served_without_a_key(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-cache"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<progress id="progress"' in page.text
    head = client.head("/")
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(page.content)
    for name, media in (("app.js", "javascript"), ("style.css", "text/css")):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200 and media in asset.headers["content-type"]
        assert asset.headers["cache-control"] == "no-cache" and asset.headers["etag"]
        assert client.get(f"/static/{name}", headers={"If-None-Match": asset.headers["etag"]}).status_code == 304
        assert client.head(f"/static/{name}").status_code == 200
    assert client.get("/static/missing.js").status_code == 404
    assert client.get("/static/%2e%2e/web.py").status_code == 404
    # The API still needs the key; writing methods on the page's paths too; the schema leaves the page out.
    assert client.get("/v1/jobs").status_code == 401
    assert client.post("/", json={}).status_code == 401
    assert client.get("/v1/schedulers", headers={"Authorization": "Bearer nope"}).status_code == 401
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith("/static") for p in paths)


def test_the_origin_check_still_applies_to_posts() -> None:
    with page_app() as client:
        refused = client.post("/v1/txt2img", json={"prompt": "x"}, headers={"Origin": "https://evil.example"})
        assert refused.status_code == 403
        assert refused.json()["error"]["type"] == "forbidden"
        assert client.get("/", headers={"Origin": "https://evil.example"}).status_code == 200


# ================================================================================================ in a browser
def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no Chromium: install Debian's package (`apt-get install -y chromium`; .ci/run does it as root)")
    return found


def playwright_api() -> Any:
    import importlib
    import importlib.util

    if importlib.util.find_spec("playwright") is None:
        pytest.skip("Playwright is not installed: `.venv/bin/pip install -e '.[dev]'`")
    return importlib.import_module("playwright.sync_api")


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    sync_api = playwright_api()
    binary = chromium_binary()
    with sync_api.sync_playwright() as pw:
        yield pw, binary


@pytest.fixture
def page(playwright: tuple[Any, str], tmp_path: Path) -> Iterator[Any]:
    pw, binary = playwright
    context = pw.chromium.launch_persistent_context(
        str(tmp_path / "profile"), executable_path=binary, headless=True, args=CHROMIUM_ARGS
    )
    context.set_default_timeout(30_000)
    try:
        page = context.pages[0] if context.pages else context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        # A CSP violation is only a console message ("Refused to ..."); a 401 is logged there too, and expected.
        page.on("console", lambda msg: errors.append(msg.text) if "Refused to" in msg.text else None)
        yield page
        assert not errors, f"JavaScript errors on the page: {errors}"
    finally:
        context.close()


def start_central(tiny_model: Path, tmp: Path, **extra: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port_block(1)
    log = tmp / "central.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIPTYCH_")}
    env.update(
        TRIPTYCH_MODEL=str(tiny_model),
        TRIPTYCH_DEVICE="cpu",
        TRIPTYCH_CACHE_DIR=str(tmp / "cache"),
        TRIPTYCH_JOBS_PREVIEW_EVERY="1",  # a preview at every step: even a 4-step job shows some
        **extra,
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                LAUNCHER,
                "serve",
                "central",
                "--embedded",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {extra['TRIPTYCH_API_KEYS']}"} if "TRIPTYCH_API_KEYS" in extra else {}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"central exited with {proc.returncode}\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", headers=headers, timeout=2).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop(proc)
    raise AssertionError(f"central was not ready in 180 s\n{log.read_text(errors='replace')[-3000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def central(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    playwright_api(), chromium_binary()  # no browser: no need for a server either
    proc, url, _ = start_central(tiny_model, tmp_path_factory.mktemp("central"))
    try:
        yield url
    finally:
        stop(proc)


def jobs(url: str, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    response = httpx.get(f"{url}/v1/jobs?limit=50", headers=headers or {}, timeout=10)
    assert response.status_code == 200, response.text
    return list(response.json()["jobs"])


def wait_until(predicate: Callable[[], Any], what: str, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def generate(page: Any, *, prompt: str, steps: int, size: int = 64, seed: str = "") -> None:
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_label("Width").fill(str(size))
    page.get_by_label("Height").fill(str(size))
    page.get_by_label("Steps").fill(str(steps))
    page.get_by_label("Seed").fill(seed)
    page.get_by_role("button", name="Generate").click()


def wait_for_result(page: Any, steps: int) -> None:
    from playwright.sync_api import expect

    bar = page.get_by_role("progressbar", name="Progress")
    expect(bar).to_have_js_property("max", steps)
    expect(bar).to_have_js_property("value", steps)
    result = page.get_by_role("img", name=re.compile(r"^Result image 1"))
    expect(result).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=result.element_handle())
    expect(page.get_by_role("status")).to_have_text("Done.")


def test_generate_watch_progress_browse_the_gallery_and_rerun_with_the_same_seed(central: str, page: Any) -> None:
    from playwright.sync_api import expect

    page.goto(central)
    expect(page).to_have_title("Triptych")
    sampler = page.get_by_label("Sampler")
    expect(sampler.locator("option[value='DDIM']")).to_have_count(1)  # loaded from /v1/schedulers
    sampler.select_option("DDIM")

    generate(page, prompt=PROMPT, steps=4)
    wait_for_result(page, 4)
    expect(page.get_by_role("img", name=re.compile(r"^Preview at step \d+"))).to_be_visible()
    result = page.get_by_role("img", name=re.compile(r"^Result image 1"))
    assert result.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [64, 64]

    (first,) = jobs(central)
    assert first["status"] == "succeeded"
    seed = first["output"]["parameters"]["seed"]
    assert first["output"]["parameters"]["scheduler"] == "DDIM"

    # The gallery shows the job with its thumbnail; clicking it shows the parameters, seed included.
    gallery = page.get_by_role("list", name="Recent jobs")
    item = gallery.get_by_role("button").filter(has_text=PROMPT)
    expect(item).to_have_count(1)
    thumbnail = item.locator("img")
    expect(thumbnail).to_have_attribute("src", re.compile(r"^blob:"))
    page.wait_for_function("img => img.complete && img.naturalWidth === 64", arg=thumbnail.element_handle())
    item.click()
    details = page.get_by_role("region", name=f"Job {first['id']}")
    expect(details).to_be_visible()
    expect(details.get_by_text("seed", exact=True)).to_be_visible()
    expect(details.locator("dd[data-param='seed']")).to_have_text(str(seed))
    expect(details.locator("dd[data-param='num_inference_steps']")).to_have_text("4")
    expect(details.get_by_role("img", name=re.compile(rf"^Image 1 of job {first['id']}"))).to_be_visible()

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webpage.png"), full_page=True)

    # Re-run: a new job with every resolved value of the first, seed included -> the same image.
    details.get_by_role("button", name="Re-run with the same seed").click()
    rerun = wait_until(lambda: [j for j in jobs(central) if j["id"] != first["id"]], "the re-run job")[0]
    expect(page.get_by_text(f"Job {rerun['id']}: succeeded")).to_be_visible()
    wait_for_result(page, 4)
    rerun = httpx.get(f"{central}/v1/jobs/{rerun['id']}", timeout=10).json()
    assert rerun["status"] == "succeeded"
    assert rerun["output"]["parameters"]["seed"] == seed
    assert rerun["request"]["seed"] == seed
    for name in ("prompt", "width", "height", "num_inference_steps", "guidance_scale", "scheduler"):
        assert rerun["output"]["parameters"][name] == first["output"]["parameters"][name], name
    same = [httpx.get(f"{central}{job['image_urls'][0]}", timeout=10).content for job in (first, rerun)]
    assert same[0] == same[1]
    expect(gallery.get_by_role("button").filter(has_text=PROMPT)).to_have_count(2)


def test_cancel_a_running_job(central: str, page: Any) -> None:
    from playwright.sync_api import expect

    page.goto(central)
    generate(page, prompt="a very slow painting", steps=400)
    bar = page.get_by_role("progressbar", name="Progress")
    expect(bar).to_have_js_property("max", 400)
    page.wait_for_function("() => document.getElementById('progress').value >= 1")
    page.get_by_role("button", name="Cancel", exact=True).click()
    expect(page.get_by_role("status")).to_have_text("The job was canceled.")
    job = next(j for j in jobs(central) if j["request"]["prompt"] == "a very slow painting")
    assert job["status"] == "canceled"
    assert job["progress"]["step"] < 400
    expect(page.get_by_role("button", name="Cancel", exact=True)).to_be_disabled()


def test_with_api_keys_the_page_asks_for_the_key_once_then_works(tiny_model: Path, tmp_path: Path, page: Any) -> None:
    from playwright.sync_api import expect

    proc, url, _ = start_central(tiny_model, tmp_path, TRIPTYCH_API_KEYS=KEY)
    try:
        assert httpx.get(f"{url}/", timeout=10).status_code == 200
        assert httpx.get(f"{url}/static/app.js", timeout=10).status_code == 200
        assert httpx.get(f"{url}/v1/jobs", timeout=10).status_code == 401
        refused: list[str] = []
        page.on("response", lambda r: refused.append(r.url) if r.status == 401 else None)

        page.goto(url)
        dialog = page.get_by_role("dialog", name="API key needed")
        expect(dialog).to_be_visible()
        dialog.get_by_label("API key").fill(KEY)
        dialog.get_by_role("button", name="Save key").click()
        expect(dialog).to_be_hidden()
        expect(page.get_by_label("Sampler").locator("option[value='DDIM']")).to_have_count(1)

        generate(page, prompt=PROMPT, steps=3, seed="1234")
        wait_for_result(page, 3)
        (job,) = jobs(url, {"Authorization": f"Bearer {KEY}"})
        assert job["status"] == "succeeded" and job["output"]["parameters"]["seed"] == 1234
        assert len(refused) == 1, refused  # one request refused before the key, none after

        page.reload()  # the key is kept for the session: no second question
        expect(page.get_by_role("list", name="Recent jobs").get_by_role("button")).to_have_count(1)
        expect(page.get_by_role("dialog", name="API key needed")).to_be_hidden()
        assert len(refused) == 1, refused
    finally:
        stop(proc)


def test_events_resume_with_last_event_id_after_a_dropped_stream(central: str, page: Any) -> None:
    """The first events request ends early (CRLF lines, a `retry:` field, no terminal event): the page
    reconnects with `Last-Event-ID` and finishes from the real stream."""
    from playwright.sync_api import expect

    seen: list[dict[str, str]] = []

    def events(route: Any) -> None:
        seen.append(route.request.headers)
        if len(seen) == 1:
            body = (
                ": comment\r\nretry: 50\r\n\r\n"
                "id: 1\r\nevent: queued\r\ndata: {}\r\n\r\n"
                'id: 2\r\nevent: progress\r\ndata: {"step": 0,\r\ndata:  "steps": 2}\r\n\r\n'
            )
            route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)
        else:
            route.continue_()

    page.route(re.compile(r".*/v1/jobs/[^/]+/events$"), events)
    page.goto(central)
    generate(page, prompt="a resumed stream", steps=2)
    wait_for_result(page, 2)
    assert len(seen) >= 2
    assert "last-event-id" not in seen[0]
    assert seen[1]["last-event-id"] == "2"
    expect(page.get_by_role("status")).to_have_text("Done.")


def test_a_failed_job_is_announced(central: str, page: Any) -> None:
    from playwright.sync_api import expect

    page.goto(central)
    generate(page, prompt="a wrong size", steps=2, size=60)  # not a multiple of 8: the job fails when it runs
    status = page.get_by_role("status")
    expect(status).to_contain_text(re.compile(r"(failed|Not submitted).*(width|height|8)"))
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
