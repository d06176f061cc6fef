"""Starting a service process: settings from flags and environment, logging, the allocator, uvicorn.

Each stage's ``python -m <stage>`` and the ``triptych serve`` command (``central.cli``) end here, so a stage
package needs nothing from central to run.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import sys
from collections.abc import Callable

from fastapi import FastAPI
from pydantic import ValidationError

from shared.serving.logs import configure_logging
from shared.serving.server import serve
from shared.settings import DEFAULT_PORTS, Settings

# Every Settings field is a flag too: --text-encoder-url <-> TRIPTYCH_TEXT_ENCODER_URL, and so on.
FLAG_ENV = {name: f"TRIPTYCH_{name.upper()}" for name in Settings.model_fields}

log = logging.getLogger("triptych.launcher")


class SettingsError(Exception):
    """A setting (flag or environment variable) has an invalid value."""


def add_settings_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("settings (each also read from its TRIPTYCH_* environment variable)")
    for name, field in Settings.model_fields.items():
        default = "unset" if field.default is None else field.default
        help_text = f"{field.description + ' ' if field.description else ''}({FLAG_ENV[name]}; default {default})"
        group.add_argument("--" + name.replace("_", "-"), dest=name, help=help_text.replace("%", "%%"))


def apply_flags(args: argparse.Namespace, *, service: str = "") -> Settings:
    """Flags win over the environment; the result is exported so child processes see the same values. Also
    configures logging for the process (``log_level``, ``log_format``)."""
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
    configure_logging(settings.log_level, settings.log_format, service=service)
    return settings


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


def run_service(service: str, app: FastAPI, settings: Settings, *, host: str, port: int | None) -> int:
    """Serve ``app`` (SIGTERM/SIGINT: /readyz and new work get 503, in-flight requests finish up to the drain
    timeout, exit 0)."""
    if tune_allocator(settings.malloc_mmap_threshold_bytes):
        log.debug("malloc mmap threshold: %d bytes", settings.malloc_mmap_threshold_bytes)
    serve(app, host=host, port=port or DEFAULT_PORTS[service])
    return 0


def service_parser(service: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {service}", description=f"Run the Triptych {service} service.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help=f"default: {DEFAULT_PORTS[service]}")
    add_settings_flags(parser)
    return parser


def stage_main(service: str, build_app: Callable[[Settings], FastAPI], argv: list[str] | None = None) -> int:
    """``python -m <stage> [--host] [--port] [--<setting> ...]``: the same as ``triptych serve <stage>``."""
    args = service_parser(service).parse_args(argv)
    try:
        settings = apply_flags(args, service=service)
    except SettingsError as exc:
        print(f"triptych: {exc}", file=sys.stderr)
        return 2
    return run_service(service, build_app(settings), settings, host=args.host, port=args.port)
