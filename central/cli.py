"""The ``triptych`` command: serve a service (or all four), generate an image, make a tiny model."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shared.serving.launcher import SettingsError, add_settings_flags, apply_flags, run_service
from shared.settings import DEFAULT_PORTS, Settings

SERVICES = ("central", "text-encoder", "diffusion-unet", "vae-decoder")
LOCAL_STAGES = ("encode", "denoise", "decode")

log = logging.getLogger("triptych.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triptych", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run one service, or all four as processes")
    serve.add_argument("service", choices=[*SERVICES, "all"])
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, help="default: 8000 central, 8001-8003 the stages; for `all` the base")
    serve.add_argument("--embedded", action="store_true", help="central only: run the stages in-process")
    add_settings_flags(serve)
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="text to image from the command line")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", required=True, type=Path, help="image file to write (.png/.jpg/.webp)")
    gen.add_argument("--url", default="http://127.0.0.1:8000", help="central's URL (when no stage is local)")
    gen.add_argument(
        "--local-stages",
        default="",
        help="comma-separated stages to run on this machine: encode,denoise,decode; the rest are called at "
        "their stage URLs",
    )
    gen.add_argument("--negative-prompt")
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--steps", type=int, default=50, dest="num_inference_steps")
    gen.add_argument("--guidance-scale", type=float, default=7.5)
    gen.add_argument("--scheduler")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for central")
    gen.add_argument(
        "--api-key", default=os.environ.get("TRIPTYCH_API_KEY"), help="central's API key (env TRIPTYCH_API_KEY)"
    )
    add_settings_flags(gen)
    gen.set_defaults(func=cmd_generate)

    jobs = sub.add_parser("jobs", help="central's jobs: list, show, cancel")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    for name, text in (("list", "recent jobs, newest first"), ("show", "one job"), ("cancel", "cancel a job")):
        j = jsub.add_parser(name, help=text)
        if name != "list":
            j.add_argument("id")
        else:
            j.add_argument("--limit", type=int, default=20)
        j.add_argument("--url", default="http://127.0.0.1:8000", help="central's URL")
        j.add_argument("--api-key", default=os.environ.get("TRIPTYCH_API_KEY"), help="env TRIPTYCH_API_KEY")
        j.set_defaults(func=cmd_jobs)

    models = sub.add_parser("models", help="model utilities")
    msub = models.add_subparsers(dest="models_command", required=True)
    tiny = msub.add_parser("create-tiny", help="write a random-weight SD-1.x-shaped model directory")
    tiny.add_argument("path", type=Path)
    tiny.add_argument("--inpainting", action="store_true", help="a 9-channel inpainting UNet")
    tiny.add_argument(
        "--preset",
        default="tiny",
        choices=["tiny", "sd15", "diffusers-tiny"],
        help="tiny: 64px, for tests; sd15: SD-1.5-sized payloads (768-wide text, 512px); diffusers-tiny: the "
        "sizes of diffusers' own pipeline tests (a VAE that downsamples by 2)",
    )
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_create_tiny)
    convert = msub.add_parser(
        "convert",
        help="convert a single-file SD 1.x checkpoint (.safetensors, original LDM/A1111 layout) to a diffusers "
        "directory, offline",
    )
    convert.add_argument(
        "checkpoint", type=Path, metavar="CHECKPOINT", help="the .safetensors file (pickle formats are refused)"
    )
    convert.add_argument(
        "out_dir", type=Path, metavar="OUT_DIR", help="the diffusers directory to write (TRIPTYCH_MODEL=OUT_DIR)"
    )
    convert.add_argument(
        "--config",
        type=Path,
        metavar="DIR",
        help="a diffusers SD 1.x directory of the same architecture; only its configs and tokenizer are read. "
        "Default: a built-in create-tiny preset, when the checkpoint's shapes are exactly one's",
    )
    convert.add_argument("--force", action="store_true", help="replace OUT_DIR when it exists and is not empty")
    convert.set_defaults(func=cmd_convert)
    return parser


# ---------------------------------------------------------------------------------------------- serve
def build_service_app(service: str, settings: Settings, *, embedded: bool = False) -> Any:
    if service == "central":
        from central.app import build_app

        return build_app(settings, embedded=embedded)
    if service == "text-encoder":
        from text_encoder.app import build_app as te_app

        return te_app(settings)
    if service == "diffusion-unet":
        from diffusion_unet.app import build_app as unet_app

        return unet_app(settings)
    from vae_decoder.app import build_app as vae_app

    return vae_app(settings)


def cmd_serve(args: argparse.Namespace) -> int:
    service = args.service.replace("-", "_")
    settings = apply_flags(args, service="triptych" if service == "all" else service)
    if args.service == "all":
        return serve_all(settings, args.host, args.port or DEFAULT_PORTS["central"])
    if args.embedded and args.service != "central":
        print("--embedded applies to `serve central` only", file=sys.stderr)
        return 2
    app = build_service_app(args.service, settings, embedded=args.embedded)
    return run_service(service, app, settings, host=args.host, port=args.port)


def service_commands(host: str, ports: dict[str, int]) -> list[tuple[str, list[str], dict[str, str]]]:
    """``serve all``'s four processes: (name, command, environment additions). Only central listens on
    ``host``; the stages listen on 127.0.0.1 whatever ``host`` is (SPEC §13), and central reaches them there."""
    stage_urls = {
        "TRIPTYCH_TEXT_ENCODER_URL": f"http://127.0.0.1:{ports['text-encoder']}",
        "TRIPTYCH_DIFFUSION_UNET_URL": f"http://127.0.0.1:{ports['diffusion-unet']}",
        "TRIPTYCH_VAE_DECODER_URL": f"http://127.0.0.1:{ports['vae-decoder']}",
    }
    out = []
    for name in SERVICES:
        module = "central" if name == "central" else name.replace("-", "_")
        bind = host if name == "central" else "127.0.0.1"
        out.append((name, [sys.executable, "-m", module, "--host", bind, "--port", str(ports[name])], stage_urls))
    return out


def serve_all(settings: Settings, host: str, base_port: int) -> int:
    """Start the four services as processes (the compose topology without Docker) and supervise them.

    If one exits, the others are stopped and its name and exit code are printed. Ctrl-C (or SIGTERM) stops
    all four gracefully: central first, so that the requests it is finishing can still reach the stages.
    """
    from shared.serving.models import resolve_model

    # Make the default model once here, so the four processes do not each wait on the lock.
    resolve_model(settings)
    ports = {name: base_port + i for i, name in enumerate(SERVICES)}
    env = dict(os.environ)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for name, cmd, extra in reversed(service_commands(host, ports)):  # stages first, central last
        # Own process group: a terminal's Ctrl-C reaches only this supervisor, which stops them in order.
        procs[name] = subprocess.Popen(cmd, env={**env, **extra}, process_group=0)

    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    url = f"http://{host}:{ports['central']}"
    announced = False
    failed: tuple[str, int] | None = None
    while not stopping:
        for name, proc in procs.items():
            code = proc.poll()
            if code is not None:
                failed = (name, code)
                break
        if failed:
            break
        if not announced and _is_ready(url):
            announced = True
            print(_ready_banner(url), flush=True)
        time.sleep(0.5)

    if failed:
        print(f"triptych: {failed[0]} exited with code {failed[1]}; stopping the other services", file=sys.stderr)
    # Each drains for up to drain_timeout_s after SIGTERM; past that (and a margin), kill it.
    wait_s = settings.drain_timeout_s + 10
    _terminate([procs["central"]], wait_s)
    _terminate([p for name, p in procs.items() if name != "central"], wait_s)
    return 1 if failed else 0


def _terminate(procs: list[subprocess.Popen[bytes]], wait_s: float) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + wait_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _is_ready(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _ready_banner(url: str) -> str:
    return (
        f"\nTriptych is ready at {url}  (API docs: {url}/docs)\n"
        f"Open {url}/ in a browser to generate and watch images form, or try:\n"
        f"  curl -s {url}/v1/txt2img -H 'Content-Type: application/json' -H 'Accept: image/png' \\\n"
        '    -d \'{"prompt": "a watercolor fox", "num_inference_steps": 20, "seed": 42}\' -o fox.png\n'
        "Ctrl-C stops all four services.\n"
    )


# ---------------------------------------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> int:
    from shared.errors import TriptychError
    from shared.protocol import Txt2ImgRequest

    settings = apply_flags(args)
    fmt = {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(args.output.suffix.lower(), "png")
    request = Txt2ImgRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        width=args.width,
        height=args.height,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        scheduler=args.scheduler,
        seed=args.seed,
        output_format=fmt,  # type: ignore[arg-type]
    )
    local = {s.strip() for s in args.local_stages.split(",") if s.strip()}
    unknown = local - set(LOCAL_STAGES)
    if unknown:
        print(f"unknown --local-stages {sorted(unknown)}; choose from {', '.join(LOCAL_STAGES)}", file=sys.stderr)
        return 2
    try:
        if local:
            data, seed = asyncio.run(_generate_mixed(settings, request, local))
        else:
            data, seed = _generate_remote(args.url, request, args.timeout, args.api_key)
    except TriptychError as exc:
        print(f"error ({exc.type}): {exc.message}", file=sys.stderr)
        return 1
    args.output.write_bytes(data)
    print(f"wrote {args.output} (seed {seed})")
    return 0


def _generate_remote(url: str, request: Any, timeout_s: float, api_key: str | None) -> tuple[bytes, int]:
    """Submit a job to central, show its progress (the UNet's steps, on stderr) and fetch its image."""
    from central.jobs_client import JobsClient
    from shared.errors import TriptychError

    with JobsClient(url, api_key=api_key, timeout_s=timeout_s) as client:
        job = client.submit("txt2img", request.model_dump(exclude_none=True))
        done = client.follow(job["id"])
        if done["status"] != "succeeded":
            error = done.get("error") or {}
            raise TriptychError(f"job {done['id']} {done['status']}: {error.get('message', 'no reason given')}")
        return client.image(done["id"]), int(done["output"]["seeds"][0])


def cmd_jobs(args: argparse.Namespace) -> int:
    """``triptych jobs list|show|cancel``: one line per job, or the job as JSON."""
    import json

    from central.jobs_client import JobsClient
    from shared.errors import TriptychError

    try:
        with JobsClient(args.url, api_key=args.api_key) as client:
            if args.jobs_command == "list":
                for job in client.list(args.limit):
                    progress = job["progress"]
                    prompt = str(job["request"].get("prompt", ""))[:50]
                    print(f"{job['id']}  {job['status']:<9}  {progress['step']:>4}/{progress['steps']:<4}  "
                          f"{job['created_at']}  {job['task']}  {prompt!r}")  # fmt: skip
            elif args.jobs_command == "show":
                job = client.get(args.id)
                if job.get("output"):
                    job["output"].pop("images", None)  # the files are at image_urls
                print(json.dumps(job, indent=2))
            else:
                job = client.cancel(args.id)
                print(f"{job['id']}  {job['status']}")
    except TriptychError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    return 0


async def _generate_mixed(settings: Settings, request: Any, local: set[str]) -> tuple[bytes, int]:
    from central.app import encode_images, load_local_runtimes, mixed_orchestrator

    orchestrator = mixed_orchestrator(settings, local)
    try:
        await load_local_runtimes(orchestrator)
        generation = await orchestrator.txt2img(request)
    finally:
        await orchestrator.aclose()
    return encode_images(generation.images, request.output_format)[0], generation.seeds[0]


# ---------------------------------------------------------------------------------------------- models
def cmd_create_tiny(args: argparse.Namespace) -> int:
    from shared.serving.models import create_tiny

    path = create_tiny(args.path, preset=args.preset, inpainting=args.inpainting, seed=args.seed)
    print(f"wrote a random-weight {args.preset} model to {path}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from central.convert import ConversionError, convert_checkpoint

    try:
        converted = convert_checkpoint(args.checkpoint, args.out_dir, config=args.config, force=args.force)
    except ConversionError as exc:
        print(f"triptych: {exc}", file=sys.stderr)
        return 2
    print(converted.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SettingsError as exc:
        print(f"triptych: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
