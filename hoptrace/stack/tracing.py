"""Trace-context propagation between the stack's services: a ground truth for trace trees.

In ``traceparent`` mode every outgoing call gets a W3C ``traceparent`` with the incoming
trace id and a fresh span id, and a ``tracestate`` entry ``hoptrace=<parent span id>``
naming the span of the request being served. The parent is not part of ``traceparent``
itself; carrying it in ``tracestate`` (a legal vendor entry) lets a recorder rebuild the
exact call tree from the traffic alone. In ``x-request-id`` mode the one id is forwarded
unchanged. A service that receives no context starts one, as a tracing SDK would; in the
normal flow only the gateway does.
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
TRACERESPONSE = "traceresponse"
REQUEST_ID = "X-Request-ID"
TRACESTATE_KEY = "hoptrace"

_TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,200}$")
_MAX_TRACESTATE_ENTRIES = 32  # W3C limit


@dataclass(frozen=True)
class TraceContext:
    """The context of one request a service is serving.

    ``trace_id`` is the W3C trace id or the request id; ``span_id`` (traceparent mode only)
    is the span this request was sent as, hence the parent of every call it causes.
    """

    mode: str
    trace_id: str = ""
    span_id: str = ""
    flags: str = "01"
    foreign_state: tuple[str, ...] = ()

    @classmethod
    def from_headers(cls, mode: str, headers: Mapping[str, str]) -> TraceContext:
        """Continue the context in ``headers``, or start a new one if it is absent or invalid."""
        if mode == "traceparent":
            match = _TRACEPARENT_RE.match(headers.get(TRACEPARENT, "").strip())
            if match and set(match[1]) != {"0"} and set(match[2]) != {"0"}:
                return cls(mode, match[1], match[2], match[3], _foreign_entries(headers))
            return cls(mode, secrets.token_hex(16), secrets.token_hex(8))
        if mode == "x-request-id":
            request_id = headers.get(REQUEST_ID, "").strip()
            return cls(mode, request_id if _REQUEST_ID_RE.match(request_id) else uuid.uuid4().hex)
        return cls(mode)

    def outgoing_headers(self) -> dict[str, str]:
        """Headers for one outgoing call; in traceparent mode each call is a new span."""
        if self.mode == "traceparent":
            state = (f"{TRACESTATE_KEY}={self.span_id}", *self.foreign_state)
            return {
                TRACEPARENT: f"00-{self.trace_id}-{secrets.token_hex(8)}-{self.flags}",
                TRACESTATE: ",".join(state[:_MAX_TRACESTATE_ENTRIES]),
            }
        if self.mode == "x-request-id":
            return {REQUEST_ID: self.trace_id}
        return {}

    def response_headers(self) -> dict[str, str]:
        """Headers echoing the context to the caller, so the client's own hop joins the trace."""
        if self.mode == "traceparent":
            return {TRACERESPONSE: f"00-{self.trace_id}-{self.span_id}-{self.flags}"}
        if self.mode == "x-request-id":
            return {REQUEST_ID: self.trace_id}
        return {}


def _foreign_entries(headers: Mapping[str, str]) -> tuple[str, ...]:
    """Other vendors' tracestate entries, kept (W3C asks to) after our updated one."""
    entries = (entry.strip() for entry in headers.get(TRACESTATE, "").split(","))
    return tuple(entry for entry in entries if entry and not entry.startswith(f"{TRACESTATE_KEY}="))
