"""Who may call a service (SPEC §13): bearer keys, browser origins and the Host header, checked first.

``install_access(app, ...)`` adds one pure-ASGI guard in front of the app (and, when origins are allowed,
Starlette's CORS middleware in front of that, for their preflights and response headers):

* **Keys.** With keys configured (central: ``TRIPTYCH_API_KEYS``; a stage: ``TRIPTYCH_STAGE_TOKEN``, which
  central sends), every request but the open paths needs ``Authorization: Bearer <key>`` -> 401 envelope with
  ``WWW-Authenticate: Bearer``. Keys are compared with ``hmac.compare_digest`` against every key, so the
  time taken does not tell which key, or how much of one, matched. Open: ``/healthz``, ``/readyz``,
  ``/metrics`` (probes and scrapers carry no key), the API docs pages (the schema, not data or compute) and
  central's web page with its files (``GET``/``HEAD`` of ``/`` and ``/static/...``: it asks for the key).
* **Origins.** A browser sends ``Origin`` with every cross-site POST, including a plain HTML form, which needs
  no preflight: so any web page a user visits could make their local server generate. A state-changing
  request whose ``Origin`` is neither the server's own (same origin) nor in ``TRIPTYCH_CORS_ORIGINS`` -> 403.
* **Host.** With ``TRIPTYCH_ALLOWED_HOSTS`` set, a request for another host name -> 400: DNS rebinding makes
  an attacker's name resolve to 127.0.0.1, and its pages are then "same origin" with the local server.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from shared.errors import error_envelope
from shared.serving.middleware import PROBE_PATHS, scope_headers

#: The docs pages and their files: served without a key (``fastapi-offline`` mounts its files under the last).
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
DOCS_PREFIX = "/static-offline-docs/"
#: central's web page and its files (``central/web.py``): GET/HEAD without a key; the page sends the key itself.
PAGE_PATH, PAGE_PREFIX = "/", "/static/"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def parse_keys(value: str) -> list[str]:
    """``TRIPTYCH_API_KEYS``: comma-separated keys, or ``@/path/file`` with one key per line (``#`` comments).
    Raises ValueError for an unreadable file or a file without keys (a typo must not open the service)."""
    value = value.strip()
    if not value.startswith("@"):
        return [key.strip() for key in value.split(",") if key.strip()]
    path = Path(value[1:])
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"TRIPTYCH_API_KEYS file {str(path)!r} cannot be read ({type(exc).__name__})") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ValueError(f"TRIPTYCH_API_KEYS file {str(path)!r} holds no key")
    return keys


def split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


class AccessGuard:
    """Keys, origins and Host, in that order of cheapness, before any route runs."""

    def __init__(
        self, app: ASGIApp, *, keys: Iterable[str], origins: Iterable[str], hosts: Iterable[str], who: str
    ) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]
        self.origins = frozenset(origin.rstrip("/") for origin in origins)
        self.hosts = frozenset(host.lower() for host in hosts)
        self.who = who

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope_headers(scope)
        refusal = self._refusal(scope, headers)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, type_, message, extra = refusal
        await JSONResponse(error_envelope(type_, message), status_code=status, headers=extra)(scope, receive, send)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str, str, dict[str, str]] | None:
        path, method = scope["path"], scope["method"]
        host = headers.get("host", "")
        if self.hosts and host.rsplit(":", 1)[0].strip("[]").lower() not in self.hosts:
            return 400, "malformed_request", f"the Host {host[:100]!r} is not served here (TRIPTYCH_ALLOWED_HOSTS)", {}
        origin = headers.get("origin")
        if origin is not None and method not in SAFE_METHODS:
            own = f"{scope.get('scheme', 'http')}://{host}"
            if origin.rstrip("/") != own and origin.rstrip("/") not in self.origins:
                return (
                    403,
                    "forbidden",
                    (f"cross-origin request from {origin[:100]!r} refused; allow it with TRIPTYCH_CORS_ORIGINS"),
                    {},
                )
        page = (
            self.who == "central" and method in ("GET", "HEAD") and (path == PAGE_PATH or path.startswith(PAGE_PREFIX))
        )
        open_path = path in PROBE_PATHS or path in DOCS_PATHS or path.startswith(DOCS_PREFIX) or page
        if self.keys and not open_path:
            if method == "OPTIONS" and origin is not None:
                return None  # a CORS preflight carries no credentials; the request that follows does
            scheme, _, given = headers.get("authorization", "").partition(" ")
            matched = False
            for key in self.keys:  # every key, every time: no early exit to time
                matched |= hmac.compare_digest(given.strip().encode(), key)
            if scheme.lower() != "bearer" or not matched:
                what = "an API key" if self.who == "central" else "the stage token (TRIPTYCH_STAGE_TOKEN)"
                return (
                    401,
                    "unauthorized",
                    f"{self.who} needs {what}: send Authorization: Bearer <key>",
                    {"WWW-Authenticate": "Bearer"},
                )
        return None


def install_access(
    app: FastAPI, *, keys: Iterable[str], origins: Iterable[str] = (), hosts: Iterable[str] = (), who: str
) -> None:
    """Put the guard (and CORS for ``origins``) in front of ``app``. Call it last: the last middleware added
    runs first."""
    origins = list(origins)
    app.add_middleware(AccessGuard, keys=list(keys), origins=origins, hosts=list(hosts), who=who)
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "Retry-After", "Server-Timing"],
        )
