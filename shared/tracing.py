"""Request IDs and W3C trace context: what each request carries across every hop between services.

A server keeps the request it is serving in a contextvar (``serving.middleware`` sets it); a client reads
``outgoing_headers()`` to send the same request ID and trace on, with the server's span as the parent.
"""

from __future__ import annotations

import re
import secrets
import uuid
from contextvars import ContextVar, Token
from dataclasses import dataclass

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


@dataclass(frozen=True)
class RequestContext:
    """One request's identity: the caller's request ID and trace, and this service's span within it."""

    request_id: str
    trace_id: str
    span_id: str
    parent_span_id: str | None
    flags: str = "01"
    tracestate: str | None = None

    @property
    def traceparent(self) -> str:
        """The W3C header for calls made while serving this request: this span is their parent."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def headers(self) -> dict[str, str]:
        headers = {"X-Request-ID": self.request_id, "traceparent": self.traceparent}
        if self.tracestate:
            headers["tracestate"] = self.tracestate
        return headers


_current: ContextVar[RequestContext | None] = ContextVar("triptych_request", default=None)


def current_context() -> RequestContext | None:
    """The request being served by this task, if any."""
    return _current.get()


def enter(ctx: RequestContext) -> Token[RequestContext | None]:
    """Make ``ctx`` the current request (``leave(token)`` ends it)."""
    return _current.set(ctx)


def leave(token: Token[RequestContext | None]) -> None:
    _current.reset(token)


def outgoing_headers() -> dict[str, str]:
    """Headers that carry the current request ID and trace to the next hop (empty outside a request)."""
    ctx = _current.get()
    return ctx.headers() if ctx else {}


def parse_traceparent(value: str | None) -> tuple[str, str, str] | None:
    """``(trace_id, parent_span_id, flags)`` from a W3C ``traceparent``, or None if it is not a valid one."""
    if not value:
        return None
    match = _TRACEPARENT.match(value.strip().lower())
    if not match:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    # Version ff is forbidden; version 00 has nothing after the flags; all-zero ids are invalid.
    if version == "ff" or (version == "00" and rest) or set(trace_id) == {"0"} or set(parent_id) == {"0"}:
        return None
    return trace_id, parent_id, flags


def context_from_headers(headers: dict[str, str]) -> RequestContext:
    """Continue the caller's request ID and trace when they are well-formed; start new ones otherwise."""
    request_id = headers.get(REQUEST_ID_HEADER, "")
    if not _REQUEST_ID.match(request_id):
        request_id = uuid.uuid4().hex
    parsed = parse_traceparent(headers.get("traceparent"))
    if parsed:
        trace_id, parent, flags = parsed
        tracestate = headers.get("tracestate") or None
    else:
        trace_id, parent, flags, tracestate = secrets.token_hex(16), None, "01", None
    return RequestContext(request_id, trace_id, secrets.token_hex(8), parent, flags, tracestate)
