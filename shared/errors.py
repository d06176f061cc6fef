"""One error envelope for every service: ``{"error": {"type", "message", "param"}}``.

Exception tree (each maps to one HTTP status)::

    TriptychError                      500 internal_error   (never raised for client input)
    ├── NumericalError                 500 numerical_error  (a model produced NaN/inf: never a black 200)
    ├── MalformedRequest               400 malformed_request
    ├── NotFound                       404 not_found
    ├── RequestTimeout                 408 request_timeout   (a body that does not arrive in time)
    ├── PayloadTooLarge                413 payload_too_large
    ├── UnsupportedMediaType           415 unsupported_media_type
    ├── InvalidValue                   422 invalid_value     (names the field in ``param``)
    ├── Overloaded                     429 overloaded        (sets Retry-After)
    ├── StageBadResponse               502 bad_gateway
    ├── StageUnavailable               503 unavailable
    │   └── StageRefused               503 unavailable       (the stage took no work: safe to send elsewhere)
    └── StageTimeout                   504 timeout

``install_error_handlers(app)`` makes FastAPI answer every failure with the envelope: ours, FastAPI's
validation errors, Starlette's 404/405, and (as a last resort, without a traceback) anything else.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("triptych.errors")


class TriptychError(Exception):
    """Base class: an error with an HTTP status, a stable ``type`` string and an optional ``param``."""

    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}

    def envelope(self) -> dict[str, Any]:
        return error_envelope(self.type, self.message, self.param)


class NumericalError(TriptychError):
    """A model's output has NaN or infinite values (the classic: SD's VAE overflowing in float16). The request
    fails rather than returning a black or noise image with 200."""

    status, type = 500, "numerical_error"


class MalformedRequest(TriptychError):
    status, type = 400, "malformed_request"


class NotFound(TriptychError):
    status, type = 404, "not_found"


class RequestTimeout(TriptychError):
    status, type = 408, "request_timeout"


class PayloadTooLarge(TriptychError):
    status, type = 413, "payload_too_large"


class UnsupportedMediaType(TriptychError):
    status, type = 415, "unsupported_media_type"


class InvalidValue(TriptychError):
    status, type = 422, "invalid_value"


class Overloaded(TriptychError):
    status, type = 429, "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1, param: str | None = None):
        super().__init__(message, param=param, headers={"Retry-After": str(retry_after_s)})


class StageBadResponse(TriptychError):
    status, type = 502, "bad_gateway"


class StageUnavailable(TriptychError):
    status, type = 503, "unavailable"


class StageRefused(StageUnavailable):
    """The stage did not take the request: no connection could be made, or it answered 503 before admitting
    it (loading, draining). Nothing was computed, so another replica may be asked (``central.replicas``)."""


class StageTimeout(TriptychError):
    status, type = 504, "timeout"


class UpstreamClientError(TriptychError):
    """A stage refused our request with a 4xx: relay its status and envelope to the caller unchanged."""

    def __init__(self, status: int, type_: str, message: str, param: str | None, headers: dict[str, str]):
        super().__init__(message, param=param, headers=headers)
        self.status = status
        self.type = type_


def error_envelope(type_: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message, "param": param}}


def error_response(exc: TriptychError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content=exc.envelope(), headers=exc.headers or None)


def _param_from_loc(loc: tuple[Any, ...] | list[Any]) -> str | None:
    # FastAPI prefixes locations with "body"/"query"; the user's field name is what follows.
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def validation_error(errors: list[Any]) -> InvalidValue:
    """Turn pydantic/FastAPI error dicts into one InvalidValue naming the first bad field."""
    first = errors[0] if errors else {}
    param = _param_from_loc(first.get("loc", ()))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if param:
        msg = f"`{param}`: {msg}"
        if "input" in first and not isinstance(first["input"], (dict, list, bytes)):
            shown = repr(first["input"])
            msg += f" (got {shown[:100] + '…' if len(shown) > 100 else shown})"
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return InvalidValue(msg, param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every failure into the envelope."""

    @app.exception_handler(TriptychError)
    async def _triptych(_: Request, exc: TriptychError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        # A body that is not JSON at all is a malformed request, not an invalid value.
        if errors and errors[0].get("type") == "json_invalid":
            return error_response(MalformedRequest("request body is not valid JSON"))
        return error_response(validation_error(errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        types = {404: "not_found", 405: "method_not_allowed", 400: "malformed_request"}
        return JSONResponse(
            status_code=exc.status_code,
            content=error_envelope(types.get(exc.status_code, "http_error"), str(exc.detail)),
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Logged with the traceback for the operator; the client gets no internals.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(status_code=500, content=error_envelope("internal_error", "internal server error"))
