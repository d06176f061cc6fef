"""central's web page (SPEC §11): ``GET /`` and its three files under ``/static/``.

No framework and no build step: ``central/static/`` holds the HTML, one script and one style sheet, shipped in
the wheel as package data. The page talks to the public API like any client (``/v1/jobs``, its SSE events,
``/v1/schedulers``), sending ``Authorization: Bearer <key>`` itself when the server wants a key (SPEC §13): so
the page and its files are served without one (``shared.serving.security`` leaves ``GET``/``HEAD`` of these
paths open), and nothing here reads or returns data of any job.

Caching: ``Cache-Control: no-cache`` everywhere, with an ``ETag``: a browser keeps its copy but asks each time
(a cheap 304), so a new version of the page is never mixed with an old script.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.staticfiles import PathLike, StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE_PATH = "/"
STATIC_PREFIX = "/static/"
CACHE_CONTROL = "no-cache"
# The page runs only its own script and style sheet and talks only to this server; images come from here
# (``/v1/jobs/{id}/images/{i}``) or are previews it decodes (``data:``), or object URLs (``blob:``).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Cache-Control": CACHE_CONTROL,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class _PageFiles(StaticFiles):
    """StaticFiles (GET and HEAD, ``ETag``/``Last-Modified``, 304) with this page's headers; no directory
    listings, no ``index.html`` lookup."""

    def file_response(
        self, full_path: PathLike, stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(SECURITY_HEADERS)
        return response


def install_web(app: FastAPI) -> None:
    """Serve the page at ``/`` and its files under ``/static/``, both left out of the OpenAPI schema."""
    index = STATIC_DIR / "index.html"
    files = _PageFiles(directory=STATIC_DIR, check_dir=True)

    async def page(request: Request) -> Response:
        body = index.read_bytes()  # small, and read each time so an edited page shows without a restart
        headers = {**SECURITY_HEADERS, "Content-Security-Policy": CONTENT_SECURITY_POLICY}
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(body))
            return Response(status_code=200, media_type="text/html; charset=utf-8", headers=headers)
        return Response(body, media_type="text/html; charset=utf-8", headers=headers)

    app.add_api_route(PAGE_PATH, page, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount(STATIC_PREFIX.rstrip("/"), files, name="static")
