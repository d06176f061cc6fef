"""Logs: one JSON object per line where logs are collected (containers, ``--log-format json``), one short
human line per event at a terminal (``make run``).

``TRIPTYCH_LOG_FORMAT=auto`` (the default) picks text when stderr is a terminal and JSON otherwise. Access
lines (``triptych.access``) of probes and introspection GETs (``/healthz``, ``/readyz``, ``/metrics``,
``/v1/info``: what orchestrators and central's readiness check call every few seconds) are DEBUG.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any, Literal

from shared.tracing import current_context

LogFormat = Literal["auto", "json", "text"]

access_log = logging.getLogger("triptych.access")
# Libraries that log every request they make at INFO: their lines say nothing our own do not.
_CHATTY = ("httpx", "httpcore", "uvicorn.access")
# Hugging Face libraries print progress bars while loading and warnings such as "modules that should be kept
# in float32: []" through handlers of their own; read by them at import time.
_HF_QUIET = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the record's ``fields`` and the request IDs."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update(getattr(record, "fields", {}))
        ctx = current_context()
        if ctx is not None:
            data.setdefault("request_id", ctx.request_id)
            data.setdefault("trace_id", ctx.trace_id)
        if record.exc_info and record.exc_info[0] is not None:
            data["exception"] = record.exc_info[0].__name__
        return json.dumps(data, default=str)


class TextFormatter(logging.Formatter):
    """``14:02:03 INFO  central   GET /v1/txt2img 200 812.3 ms  rid=1a2b3c4d``: short, aligned, one line.

    The traceback of a logged exception follows on the next lines, as Python prints it."""

    def __init__(self, service: str = "") -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        fields = getattr(record, "fields", None)
        if record.name == access_log.name and fields:
            text = (
                f"{fields.get('method')} {fields.get('path')} {fields.get('status')} "
                f"{fields.get('duration_ms', 0):.1f} ms  rid={str(fields.get('request_id', ''))[:8]}"
            )
            service = str(fields.get("service", self.service))
        else:
            text = record.getMessage()
            service = self.service or record.name
        line = f"{when} {record.levelname:<7} {service:<14} {text}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _quiet_hugging_face() -> None:
    """Errors only from transformers / diffusers, no progress bars: in this process (if they are imported
    already) and in the processes it starts (``serve all``), which read the environment when they import."""
    for name, value in _HF_QUIET.items():
        os.environ.setdefault(name, value)
    for module in ("transformers", "diffusers"):
        if module in sys.modules:
            hf_logging = __import__(f"{module}.utils.logging", fromlist=["logging"])
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()


def resolve_format(fmt: LogFormat, stream: Any = None) -> Literal["json", "text"]:
    """``auto`` -> text at a terminal, JSON otherwise."""
    if fmt != "auto":
        return fmt
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def configure_logging(level: str, fmt: LogFormat = "auto", *, service: str = "") -> Literal["json", "text"]:
    """Route every logger of the process to stderr in one format; returns the format chosen. Call once, from
    the launcher (never at import: a library user configures logging themselves)."""
    chosen = resolve_format(fmt)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter(service))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    if root.level > logging.DEBUG:
        _quiet_hugging_face()
    if chosen == "text":
        # uvicorn's start-up chatter (process id, "Waiting for application startup", ...) four times over;
        # each service logs its own "ready" line instead.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    return chosen
