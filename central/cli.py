"""The ``triptych`` command: serve a service (or all four), generate an image, make a tiny model."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shared.settings import DEFAULT_PORTS, Settings

SERVICES = ("central", "text-encoder", "diffusion-unet", "vae-decoder")
LOCAL_STAGES = ("encode", "denoise", "decode")

# Every Settings field is a flag too: --text-encoder-url <-> TRIPTYCH_TEXT_ENCODER_URL, and so on.
FLAG_ENV = {name: f"TRIPTYCH_{name.upper()}" for name in Settings.model_fields}


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("settings (each also read from its TRIPTYCH_* environment variable)")
    for name, field in Settings.model_fields.items():
        default = "unset" if field.default is None else field.default
        help_text = f"{field.description + ' ' if field.description else ''}({FLAG_ENV[name]}; default {default})"
        group.add_argument("--" + name.replace("_", "-"), dest=name, help=help_text.replace("%", "%%"))


class SettingsError(Exception):
    """A setting (flag or environment variable) has an invalid value."""


def _apply_flags(args: argparse.Namespace) -> Settings:
    """Flags win over the environment; the result is exported so child processes see the same values."""
    for flag, env in FLAG_ENV.items():
        value = getattr(args, flag, None)
        if value is not None:
            os.environ[env] = str(value)
    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first.get("loc") else "?"
        raise SettingsError(
            f"invalid setting --{name.replace('_', '-')} / {FLAG_ENV.get(name, name)}: {first['msg']}"
        ) from None
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triptych", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run one service, or all four as processes")
    serve.add_argument("service", choices=[*SERVICES, "all"])
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, help="default: 8000 central, 8001-8003 the stages; for `all` the base")
    serve.add_argument("--embedded", action="store_true", help="central only: run the stages in-process")
    _add_settings_flags(serve)
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
    _add_settings_flags(gen)
    gen.set_defaults(func=cmd_generate)

    models = sub.add_parser("models", help="model utilities")
    msub = models.add_subparsers(dest="models_command", required=True)
    tiny = msub.add_parser("create-tiny", help="write a random-weight SD-1.x-shaped model directory")
    tiny.add_argument("path", type=Path)
    tiny.add_argument("--inpainting", action="store_true", help="a 9-channel inpainting UNet")
    tiny.add_argument(
        "--preset",
        default="tiny",
        choices=["tiny", "sd15"],
        help="tiny: 64px, for tests; sd15: SD-1.5-sized payloads (768-wide text, 512px)",
    )
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_create_tiny)
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


def tune_allocator(threshold_bytes: int) -> bool:
    """Serve big transient buffers (request and reply bodies, msgpack, base64, PNG) from the heap.

    glibc hands out blocks above its mmap threshold (128 KiB, raised only as big blocks are freed) as fresh
    mappings, and every page of a fresh mapping faults on first touch: on the benchmark VM that made packing
    one 786 KB image reply take 1.5 ms instead of 0.12. A fixed threshold (and a trim threshold above it,
    so the heap top is not returned and re-faulted on every request) keeps those pages mapped. Returns whether
    it applied (glibc only; elsewhere it is a no-op)."""
    if threshold_bytes <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, for one)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, threshold_bytes)) and bool(
        libc.mallopt(m_trim_threshold, 2 * threshold_bytes)
    )


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _apply_flags(args)
    if args.service == "all":
        return serve_all(settings, args.host, args.port or DEFAULT_PORTS["central"])
    if args.embedded and args.service != "central":
        print("--embedded applies to `serve central` only", file=sys.stderr)
        return 2
    from shared.observability import serve

    if tune_allocator(settings.malloc_mmap_threshold_bytes):
        logging.getLogger("triptych.cli").debug("malloc mmap threshold: %d bytes", settings.malloc_mmap_threshold_bytes)

    port = args.port or DEFAULT_PORTS[args.service.replace("-", "_")]
    app = build_service_app(args.service, settings, embedded=args.embedded)
    # SIGTERM/SIGINT: /readyz and new work get 503, in-flight requests finish (up to the drain timeout), exit 0.
    serve(app, host=args.host, port=port, log_level=settings.log_level)
    return 0


def serve_all(settings: Settings, host: str, base_port: int) -> int:
    """Start the four services as processes (the compose topology without Docker) and supervise them.

    If one exits, the others are stopped and its name and exit code are printed. Ctrl-C (or SIGTERM) stops
    all four gracefully: central first, so that the requests it is finishing can still reach the stages.
    """
    from shared.models import resolve_model

    # Make the default model once here, so the four processes do not each wait on the lock.
    resolve_model(settings)
    ports = {name: base_port + i for i, name in enumerate(SERVICES)}
    env = dict(os.environ)
    env["TRIPTYCH_TEXT_ENCODER_URL"] = f"http://{host}:{ports['text-encoder']}"
    env["TRIPTYCH_DIFFUSION_UNET_URL"] = f"http://{host}:{ports['diffusion-unet']}"
    env["TRIPTYCH_VAE_DECODER_URL"] = f"http://{host}:{ports['vae-decoder']}"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for name in reversed(SERVICES):  # stages first, central last
        cmd = [sys.executable, "-m", "central.cli", "serve", name, "--host", host, "--port", str(ports[name])]
        # Own process group: a terminal's Ctrl-C reaches only this supervisor, which stops them in order.
        procs[name] = subprocess.Popen(cmd, env=env, process_group=0)

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
        "Try:\n"
        f"  curl -s {url}/v1/txt2img -H 'Content-Type: application/json' -H 'Accept: image/png' \\\n"
        '    -d \'{"prompt": "a watercolor fox", "num_inference_steps": 20, "seed": 42}\' -o fox.png\n'
        "Ctrl-C stops all four services.\n"
    )


# ---------------------------------------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> int:
    from shared.errors import TriptychError
    from shared.protocol import Txt2ImgRequest

    settings = _apply_flags(args)
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
            data, seed = _generate_remote(args.url, request, args.timeout)
    except TriptychError as exc:
        print(f"error ({exc.type}): {exc.message}", file=sys.stderr)
        return 1
    args.output.write_bytes(data)
    print(f"wrote {args.output} (seed {seed})")
    return 0


def _generate_remote(url: str, request: Any, timeout_s: float) -> tuple[bytes, int]:
    import httpx

    from shared.errors import StageUnavailable, TriptychError

    media = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}[request.output_format]
    try:
        r = httpx.post(
            f"{url.rstrip('/')}/v1/txt2img",
            json=request.model_dump(exclude_none=True),
            headers={"Accept": media},
            timeout=timeout_s,
        )
    except httpx.HTTPError as exc:
        raise StageUnavailable(f"cannot reach central at {url}: {exc}") from None
    if r.status_code != 200:
        try:
            err = r.json()["error"]
            raise TriptychError(f"{r.status_code} {err['type']}: {err['message']}")
        except (ValueError, KeyError, TypeError):
            raise TriptychError(f"central answered HTTP {r.status_code}") from None
    return r.content, int(r.headers.get("x-seed", "0"))


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
    from shared.models import create_tiny

    path = create_tiny(args.path, preset=args.preset, inpainting=args.inpainting, seed=args.seed)
    print(f"wrote a random-weight {args.preset} model to {path}")
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
