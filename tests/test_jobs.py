"""Jobs (SPEC §11, issue 13): submit, progress from inside the UNet loop, previews, cancel, durability."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import PIL.Image
import pytest
from fastapi.testclient import TestClient

from central.app import build_app
from shared.settings import Settings
from tests.conftest import free_port_block, spawn_triptych, wait_ready
from tests.helpers import assert_envelope, local_orchestrator, max_diff
from tests.test_jobstore import redis_url  # noqa: F401 - the real redis-server fixture

pytestmark = pytest.mark.timeout(300)

BODY = {"prompt": "a lantern in fog", "seed": 21, "num_inference_steps": 6}


def sse(text: str) -> list[tuple[int, str, Any]]:
    """(id, event, data) of every event in a Server-Sent Events body."""
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if fields:
            out.append((int(fields["id"]), fields["event"], orjson.loads(fields["data"])))
    return out


def pixels(images: list[str]) -> np.ndarray:
    return np.stack([np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(b)))) for b in images])


def jobs_settings(settings: Settings, tmp: Path, **extra: Any) -> Settings:
    return settings.model_copy(
        update={"jobs_db": tmp / "jobs.sqlite3", "jobs_dir": tmp / "results", "jobs_preview_every": 2, **extra}
    )


@pytest.fixture
def jobs_app(
    settings: Settings, te_runtime: Any, unet_runtime: Any, vae_runtime: Any, tmp_path: Path
) -> Iterator[TestClient]:
    s = jobs_settings(settings, tmp_path)
    app = build_app(s, orchestrator=local_orchestrator(s, te_runtime, unet_runtime, vae_runtime))
    with TestClient(app) as client:
        yield client


def wait_done(client: Any, job_id: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']}"
        time.sleep(0.05)


def test_a_job_streams_every_step_and_previews_and_equals_the_sync_endpoint(jobs_app: TestClient) -> None:
    submitted = jobs_app.post("/v1/jobs", json={"task": "txt2img", **BODY})
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    assert submitted.json()["urls"]["events"] == f"/v1/jobs/{job_id}/events"
    # Subscribing after the job is done still gives every event from the first (nothing missed).
    job = wait_done(jobs_app, job_id)
    events = sse(jobs_app.get(f"/v1/jobs/{job_id}/events").text)
    names = [name for _, name, _ in events]
    assert names[0] == "queued" and names[1] == "started" and names[-1] == "succeeded"
    progress = [data for _, name, data in events if name == "progress"]
    assert [p["step"] for p in progress] == [1, 2, 3, 4, 5, 6] and {p["steps"] for p in progress} == {6}
    previews = [data for _, name, data in events if name == "preview"]
    assert [p["step"] for p in previews] == [2, 4]  # every jobs_preview_every steps, none at the end
    assert all(p["image"].startswith("/9j/") for p in previews)  # base64 JPEG
    assert [i for i, _, _ in events] == list(range(1, len(events) + 1))
    # Last-Event-ID resumes after the event it names.
    resumed = sse(jobs_app.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "5"}).text)
    assert [i for i, _, _ in resumed] == list(range(6, len(events) + 1))

    sync = jobs_app.post("/v1/txt2img", json=BODY).json()
    assert job["status"] == "succeeded" and job["progress"] == {"step": 6, "steps": 6}
    assert job["output"]["images"] == sync["images"] and job["output"]["seeds"] == sync["seeds"]
    image = jobs_app.get(job["image_urls"][0])
    assert image.headers["content-type"] == "image/png"
    assert image.content == base64.b64decode(sync["images"][0])
    assert job["request"]["prompt"] == BODY["prompt"] and job["timings"]["running_ms"] > 0
    listed = jobs_app.get("/v1/jobs").json()["jobs"]
    assert listed[0]["id"] == job_id


def test_a_job_without_a_seed_gets_one_fixed_at_submit(jobs_app: TestClient) -> None:
    job_id = jobs_app.post("/v1/jobs", json={"prompt": "x", "num_inference_steps": 2}).json()["id"]
    job = wait_done(jobs_app, job_id)
    assert isinstance(job["request"]["seed"], int)
    assert job["output"]["seeds"] == [job["request"]["seed"]]


def test_the_same_idempotency_key_returns_the_same_job(jobs_app: TestClient) -> None:
    first = jobs_app.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": "order-17"})
    again = jobs_app.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": "order-17"})
    other = jobs_app.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": "order-18"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"] != other.json()["id"]
    wait_done(jobs_app, first.json()["id"])
    wait_done(jobs_app, other.json()["id"])


def test_cancel_stops_the_job_in_the_unet_within_a_step_and_spares_the_others(
    jobs_app: TestClient, unet_runtime: Any
) -> None:
    """Cancel frees the job's batch slot before the next step; a job batched with it goes on to the end."""
    batcher = unet_runtime.batcher
    long = jobs_app.post("/v1/jobs", json={**BODY, "num_inference_steps": 400}).json()["id"]
    other = jobs_app.post("/v1/jobs", json={**BODY, "num_inference_steps": 30}).json()["id"]
    deadline = time.monotonic() + 60
    while jobs_app.get(f"/v1/jobs/{long}").json()["progress"]["step"] < 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    cancelled = jobs_app.post(f"/v1/jobs/{long}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    job = wait_done(jobs_app, long)
    assert job["status"] == "canceled"
    stopped_at = job["progress"]["step"]
    survivor = wait_done(jobs_app, other)
    assert survivor["status"] == "succeeded", survivor["error"]
    # The UNet dropped it: nothing of it is left in the batch, and it never got near its 400 steps.
    assert batcher.active_images == 0
    assert stopped_at < 400
    names = [name for _, name, _ in sse(jobs_app.get(f"/v1/jobs/{long}/events").text)]
    assert names[-1] == "canceled"
    again = jobs_app.post(f"/v1/jobs/{long}/cancel")
    assert_envelope(again, 409, type_="conflict")


def test_job_errors_use_the_envelope(jobs_app: TestClient) -> None:
    assert_envelope(jobs_app.get("/v1/jobs/0123456789abcdef"), 404, type_="not_found")
    assert_envelope(jobs_app.post("/v1/jobs/0123456789abcdef/cancel"), 404)
    assert_envelope(jobs_app.post("/v1/jobs", json={"task": "paint", **BODY}), 422, param="task")
    assert_envelope(jobs_app.post("/v1/jobs", json={**BODY, "num_inference_steps": 0}), 422)
    assert_envelope(jobs_app.post("/v1/jobs", content=b"{", headers={"content-type": "application/json"}), 400)
    assert_envelope(jobs_app.post("/v1/jobs", content=b"x", headers={"content-type": "text/plain"}), 415)


def test_past_the_queue_bound_a_job_is_refused_with_429(
    settings: Settings, te_runtime: Any, unet_runtime: Any, vae_runtime: Any, tmp_path: Path
) -> None:
    s = jobs_settings(settings, tmp_path, jobs_max_queued=1)
    app = build_app(s, orchestrator=local_orchestrator(s, te_runtime, unet_runtime, vae_runtime))
    with TestClient(app) as client:
        first = client.post("/v1/jobs", json={**BODY, "num_inference_steps": 200}).json()["id"]
        refused = client.post("/v1/jobs", json=BODY)
        client.post(f"/v1/jobs/{first}/cancel")
        wait_done(client, first)
        accepted = client.post("/v1/jobs", json=BODY)
    err = assert_envelope(refused, 429, type_="overloaded")
    assert "TRIPTYCH_JOBS_MAX_QUEUED" in err["message"] and refused.headers["retry-after"]
    assert accepted.status_code == 202


def test_progress_crosses_the_wire_from_the_unet_service(served_all: str) -> None:
    """Four processes: the UNet's streamed answer (msgpack frames) reaches central over HTTP as it is made."""
    with httpx.Client(base_url=served_all, timeout=60) as client:
        job = wait_done(client, client.post("/v1/jobs", json={**BODY, "num_inference_steps": 11}).json()["id"])
        events = sse(client.get(f"/v1/jobs/{job['id']}/events").text)
        sync = client.post("/v1/txt2img", json={**BODY, "num_inference_steps": 11}).json()
    assert job["status"] == "succeeded", job["error"]
    assert [d["step"] for _, n, d in events if n == "progress"] == list(range(1, 12))
    assert [d["step"] for _, n, d in events if n == "preview"] == [5, 10]  # TRIPTYCH_JOBS_PREVIEW_EVERY: 5
    assert job["output"]["images"] == sync["images"]


def test_the_runner_works_on_the_redis_store(
    settings: Settings,
    te_runtime: Any,
    unet_runtime: Any,
    vae_runtime: Any,
    tmp_path: Path,
    redis_url: str,  # noqa: F811 - the fixture imported above
) -> None:
    s = jobs_settings(settings, tmp_path, jobs_url=redis_url)
    app = build_app(s, orchestrator=local_orchestrator(s, te_runtime, unet_runtime, vae_runtime))
    with TestClient(app) as client:
        job = wait_done(client, client.post("/v1/jobs", json=BODY).json()["id"])
        sync = client.post("/v1/txt2img", json=BODY).json()
        events = sse(client.get(f"/v1/jobs/{job['id']}/events").text)
    assert job["status"] == "succeeded" and job["output"]["images"] == sync["images"]
    assert [d["step"] for _, n, d in events if n == "progress"] == [1, 2, 3, 4, 5, 6]


def test_kill_9_of_central_loses_no_job(tiny_model: Path, tmp_path: Path) -> None:
    """Six jobs queued or running, central SIGKILLed, started again: every job finishes (the interrupted ones
    re-queued and run again), none is stuck or lost, and each has the sync endpoint's pixels for its seed."""
    port = free_port_block(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIPTYCH_")}
    env.update(TRIPTYCH_MODEL=str(tiny_model), TRIPTYCH_DEVICE="cpu", TRIPTYCH_LOG_LEVEL="WARNING",
               TRIPTYCH_CACHE_DIR=str(tmp_path / "cache"), TRIPTYCH_JOBS_CONCURRENCY="2")  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    cmd = ["serve", "central", "--embedded", "--port", str(port)]
    bodies = [{**BODY, "seed": 100 + i, "num_inference_steps": 150 + 10 * i} for i in range(6)]

    proc = spawn_triptych(cmd, env, tmp_path / "first.log")
    try:
        wait_ready(url, proc)
        ids = [httpx.post(f"{url}/v1/jobs", json=b, timeout=30).json()["id"] for b in bodies]
        deadline = time.monotonic() + 120
        while httpx.get(f"{url}/v1/jobs/{ids[0]}", timeout=30).json()["progress"]["step"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        before = {i: httpx.get(f"{url}/v1/jobs/{i}", timeout=30).json()["status"] for i in ids}
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "running" in before.values() and "queued" in before.values()

    proc = spawn_triptych(cmd, env, tmp_path / "second.log")
    try:
        wait_ready(url, proc)
        with httpx.Client(base_url=url, timeout=60) as client:
            finished = [wait_done(client, i, timeout_s=240) for i in ids]
            sync = [client.post("/v1/txt2img", json=b).json() for b in bodies]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert [j["status"] for j in finished] == ["succeeded"] * 6, [j["error"] for j in finished]
    for job, expected in zip(finished, sync, strict=True):
        # Two jobs run at once share UNet forwards: SPEC §8's bound for batched requests, not bit equality.
        assert max_diff(pixels(job["output"]["images"]), pixels(expected["images"])) <= 2
    # The interrupted ones ran twice (a running job may have finished between the snapshot and the kill).
    attempts = [j["attempts"] for j in finished]
    assert 2 in attempts and set(attempts) <= {1, 2}, attempts


def test_jobs_cli_lists_shows_and_cancels(served_all: str) -> None:
    import json
    import sys

    from tests.conftest import REPO

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "central.cli", "jobs", *args, "--url", served_all]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)

    with httpx.Client(base_url=served_all, timeout=60) as client:
        done = wait_done(client, client.post("/v1/jobs", json={**BODY, "prompt": "cli listing"}).json()["id"])
        long = client.post("/v1/jobs", json={**BODY, "num_inference_steps": 400}).json()["id"]
        listed = cli("list")
        shown = cli("show", done["id"])
        cancelled = cli("cancel", long)
        again = cli("cancel", done["id"])
        final = wait_done(client, long)
    assert listed.returncode == 0 and done["id"] in listed.stdout and "'cli listing'" in listed.stdout
    assert shown.returncode == 0 and json.loads(shown.stdout)["output"]["seeds"] == done["output"]["seeds"]
    assert cancelled.returncode == 0 and final["status"] == "canceled"
    assert again.returncode == 1 and "409 conflict" in again.stderr


def test_cancel_frees_the_batch_slot_before_the_next_step(jobs_app: TestClient, unet_runtime: Any) -> None:
    """Once the cancel is answered, the UNet runs at most the step it was in: its forwards stop."""
    batcher = unet_runtime.batcher
    job_id = jobs_app.post("/v1/jobs", json={**BODY, "num_inference_steps": 400}).json()["id"]
    deadline = time.monotonic() + 60
    while jobs_app.get(f"/v1/jobs/{job_id}").json()["progress"]["step"] < 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert jobs_app.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    forwards = batcher.forwards
    job = wait_done(jobs_app, job_id)
    time.sleep(0.2)  # any step still coming would have run by now
    assert job["status"] == "canceled"
    assert batcher.forwards - forwards <= 1 and batcher.active_images == 0


def test_previews_come_from_a_tiny_vae_when_one_is_configured(
    settings: Settings, te_runtime: Any, vae_runtime: Any, tmp_path: Path
) -> None:
    """TRIPTYCH_PREVIEW_DECODER: diffusers' AutoencoderTiny (TAESD) decodes the previews (twice the latent grid
    for this tiny one) instead of the linear approximation (the latent grid itself); a job can ask for its own
    preview interval."""
    from diffusers import AutoencoderTiny

    from diffusion_unet.runtime import UNetRuntime

    tiny_vae = tmp_path / "taesd"
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(tiny_vae)  # fmt: skip
    s = jobs_settings(settings, tmp_path, preview_decoder=str(tiny_vae))
    unet = UNetRuntime(s)
    unet.load()
    try:
        app = build_app(s, orchestrator=local_orchestrator(s, te_runtime, unet, vae_runtime))
        with TestClient(app) as client:
            job = wait_done(client, client.post("/v1/jobs", json={**BODY, "preview_every": 3}).json()["id"])
            events = sse(client.get(f"/v1/jobs/{job['id']}/events").text)
            bad = client.post("/v1/jobs", json={**BODY, "preview_every": -1})
    finally:
        unet.close()
    assert job["status"] == "succeeded" and job["request"]["preview_every"] == 3
    previews = [d for _, n, d in events if n == "preview"]
    assert [p["step"] for p in previews] == [3]
    image = PIL.Image.open(io.BytesIO(base64.b64decode(previews[0]["image"])))
    latent_side = job["output"]["parameters"]["width"] // unet.vae_scale_factor
    assert image.format == "JPEG" and image.size == (2 * latent_side, 2 * latent_side)
    assert_envelope(bad, 422, param="preview_every")


def test_a_job_waits_for_a_stage_that_is_restarting(
    settings: Settings, te_runtime: Any, vae_runtime: Any, tiny_model: Path, tmp_path: Path
) -> None:
    """Submitted while the UNet service is down (a restart, a scale-up from zero): the job waits, with
    `waiting` events, runs once the UNet is up, and gives the sync endpoint's pixels; it does not fail."""
    from central.clients import HttpTransport, LocalTransport, TextEncoderClient, UNetClient, VaeClient
    from central.pipeline import Orchestrator

    port = free_port_block(1)
    s = jobs_settings(settings, tmp_path, jobs_stage_wait_s=240.0, diffusion_unet_url=f"http://127.0.0.1:{port}")
    unet = UNetClient(HttpTransport("diffusion_unet", s.diffusion_unet_url, s))  # a service, down for now
    orch = Orchestrator(TextEncoderClient(LocalTransport(te_runtime)), unet, VaeClient(LocalTransport(vae_runtime)), s)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIPTYCH_")}
    env.update(TRIPTYCH_MODEL=str(tiny_model), TRIPTYCH_DEVICE="cpu", TRIPTYCH_LOG_LEVEL="WARNING")
    proc: subprocess.Popen[bytes] | None = None
    try:
        with TestClient(build_app(s, orchestrator=orch)) as client:
            job_id = client.post("/v1/jobs", json=BODY).json()["id"]
            deadline = time.monotonic() + 60
            while not any(n == "waiting" for _, n, _ in sse_so_far(client, job_id)):
                assert time.monotonic() < deadline, "no waiting event"
                time.sleep(0.1)
            assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
            proc = spawn_triptych(["serve", "diffusion-unet", "--port", str(port)], env, tmp_path / "unet.log")
            wait_ready(f"http://127.0.0.1:{port}", proc)
            job = wait_done(client, job_id, timeout_s=240)
            sync = client.post("/v1/txt2img", json=BODY).json()
            events = [n for _, n, _ in sse(client.get(f"/v1/jobs/{job_id}/events").text)]
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(timeout=30)
    assert job["status"] == "succeeded", job["error"]
    assert job["output"]["images"] == sync["images"]
    assert events[-1] == "succeeded" and "waiting" in events


def sse_so_far(client: TestClient, job_id: str) -> list[tuple[int, str, Any]]:
    """The events of a running job up to now (the stream itself stays open until the job ends)."""
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] in ("queued", "running"), job
    store = client.app.state.jobs.store  # type: ignore[attr-defined]
    events = client.portal.call(store.events, job_id, 0)  # type: ignore[union-attr]
    return [(e.id, e.event, e.data) for e in events]
