"""Turn one finished mitmproxy flow into a hop row and the tokens it carried.

Only :func:`snapshot`, a copy of the flow's values, runs on mitmproxy's event loop;
:func:`snapshot_row` runs in the recorder's row process or writer thread. Everything
read from the flow is treated as hostile: sizes are capped, compressed bodies are
inflated only up to a cap, JSON that does not parse is skipped, and a token that does
not decode is recorded with an error.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from functools import lru_cache
from urllib.parse import parse_qsl

from hoptrace.addons import _redact
from hoptrace.addons._tokens import find_jwts, is_jwt

# Bodies larger than this are not searched for tokens (nor stored when bodies are).
BODY_SCAN_CAP = 64 * 1024
# Token-bearing names in cookies, headers and JSON fields.
_TOKEN_NAME = re.compile(r"token|jwt|session|(?:^|[-_])sid(?:$|[-_])|access|auth", re.I)
_NOT_TOKEN_SCHEMES = frozenset({"basic", "digest", "negotiate", "ntlm"})
_MIN_TOKEN_LENGTH = 16
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}", re.I)


@dataclass(frozen=True, slots=True)
class Sighting:
    """A raw token as found on a hop. Lives only in memory, on its way to a fingerprint."""

    token: str
    role: str  # presented | validated | issued
    location: str


# What a snapshot holds, by position: plain bytes/str/numbers/tuples only, so that
# `marshal` can hand it to the row-building process (see _rowprocess.py).
(
    _FLOW_ID, _CLIENT, _METHOD, _SCHEME, _HOST, _PORT, _PATH, _HTTP_VERSION,
    _REQ_FIELDS, _REQ_BODY, _REQ_SIZE, _REQ_START, _REQ_END,
    _HAS_RESPONSE, _STATUS, _REASON, _RESP_FIELDS, _RESP_BODY, _RESP_SIZE, _RESP_START, _RESP_END,
    _ERROR, _ERROR_AT, _SERVER_START, _SERVER_TCP, _CLIENT_CONN_ID, _CUT,
) = range(27)  # fmt: skip
# Set by hoptrace on a flow it cut itself: (error_kind, why). The recorder's
# shutdown sets "shutdown", the upstream-timeout watchdog "timeout"; either
# describes the hop better than the connection error mitmproxy then reports.
CUT_BY_HOPTRACE = "hoptrace_cut"
# Bodies longer than this are not copied into a snapshot: an identity body over
# BODY_SCAN_CAP is never read, and a compressed one this long inflates past it.
_SNAPSHOT_BODY_CAP = 2 * BODY_SCAN_CAP


def snapshot(flow) -> tuple:
    """Everything :func:`snapshot_row` needs from a finished flow, copied out of it cheaply."""
    request, response, error, server = flow.request, flow.response, flow.error, flow.server_conn
    raw = request.raw_content
    peer = flow.client_conn.peername
    if response is not None:
        response_raw = response.raw_content
        response_part = (
            True, response.status_code, response.reason, response.headers.fields,
            response_raw if response_raw is not None and len(response_raw) <= _SNAPSHOT_BODY_CAP else None,
            len(response_raw) if response_raw is not None else None,
            response.timestamp_start, response.timestamp_end,
        )  # fmt: skip
    else:
        response_part = (False, None, None, (), None, None, None, None)
    return (
        flow.id, f"{peer[0]}:{peer[1]}" if peer else None,
        request.method, request.scheme, request.host, request.port, request.path, request.http_version,
        request.headers.fields, raw if raw is not None and len(raw) <= _SNAPSHOT_BODY_CAP else None,
        len(raw) if raw is not None else None, request.timestamp_start, request.timestamp_end,
        *response_part,
        error.msg if error is not None else None, error.timestamp if error is not None else None,
        server.timestamp_start, server.timestamp_tcp_setup,
        flow.client_conn.id, flow.metadata.get(CUT_BY_HOPTRACE),
    )  # fmt: skip


def snapshot_row(snap: tuple, key: bytes, store_bodies: bool) -> tuple[dict, list[Sighting]]:
    """The `hops` columns a :func:`snapshot` fills (ids and service are the writer's), and its tokens."""
    # A fragment never leaves a browser: a client that sent one anyway (it may hold a token) has it left out.
    path, _, query_string = snap[_PATH].partition("#")[0].partition("?")
    request_fields = _fields(snap[_REQ_FIELDS])
    request_headers = _lookup(request_fields)
    has_response = snap[_HAS_RESPONSE]
    response_fields = _fields(snap[_RESP_FIELDS]) if has_response else []
    response_headers = _lookup(response_fields)
    error, kind = _error(snap)
    sightings = _request_tokens(request_fields, query_string)
    request_type = request_headers.get("content-type")
    request_text = _body_text(snap[_REQ_BODY], request_headers)
    sightings += _body_tokens(request_text, request_type or "", "validated", "body")
    response_text = None
    response_type = response_headers.get("content-type")
    if has_response:
        response_text = _body_text(snap[_RESP_BODY], response_headers)
        sightings += _response_tokens(response_fields)
        sightings += _body_tokens(response_text, response_type or "", "issued", "response-body")

    started = snap[_REQ_START]
    ended = _first_time(snap[_RESP_END], snap[_ERROR_AT], snap[_RESP_START], snap[_REQ_END], started)
    # A reused upstream connection was set up for an earlier flow: its connect
    # time says nothing about this one.
    server_start = snap[_SERVER_START]
    fresh_connection = server_start is not None and server_start >= started
    server_date = response_headers.get("date")
    row = {
        "flow_id": snap[_FLOW_ID],
        "client_addr": snap[_CLIENT],
        "method": snap[_METHOD],
        "scheme": snap[_SCHEME],
        "host": snap[_HOST],
        "port": snap[_PORT],
        # A JWT in a path: a magic link's or a revocation's (/verify/eyJ...).
        "path": _redact.scrub_jwts(key, path),
        "query": _redacted_query(key, query_string) or None,
        "http_version": snap[_HTTP_VERSION],
        "status": snap[_STATUS],
        "reason": snap[_REASON],
        "error": error,
        "error_kind": kind,
        "failed": int(error is not None),
        "request_size": snap[_REQ_SIZE],
        "response_size": snap[_RESP_SIZE],
        "request_content_type": request_type,
        "response_content_type": response_type,
        "started_at": started,
        "request_end_at": snap[_REQ_END],
        "connect_at": server_start if fresh_connection else None,
        "connected_at": snap[_SERVER_TCP] if fresh_connection else None,
        "response_start_at": snap[_RESP_START],
        "ended_at": ended,
        "duration_ms": (ended - started) * 1000.0,
        **trace_context(request_headers),
        "server_date": server_date,
        "server_date_ts": _http_date(server_date),
        "request_headers": json.dumps(_redacted_headers(key, request_fields)),
        "response_headers": json.dumps(_redacted_headers(key, response_fields)) if has_response else None,
        "request_body": _stored_body(key, request_text, request_type) if store_bodies else None,
        "response_body": _stored_body(key, response_text, response_type) if store_bodies else None,
        "client_conn_id": snap[_CLIENT_CONN_ID],
        # mitmproxy (11, 12) does not put the HTTP/2 stream id on the flow.
        "stream_id": None,
    }
    return row, sightings


def _error(snap: tuple) -> tuple[str | None, str | None]:
    """The hop's error message and its kind; a cut hoptrace made itself says so first."""
    error = snap[_ERROR]
    if snap[_CUT] is not None:
        kind, why = snap[_CUT]
        return (f"{why} ({error})" if error else why), kind
    return error, error_kind(error) if error is not None else None


def error_kind(message: str) -> str:
    """A coarse class of mitmproxy's error message, for grouping.

    refused: no upstream connection; timeout; truncated: the upstream closed part-way
    through its response (mitmproxy says "unexpected server response: b'HTTP/1.1 2..."
    for a cut head, "...without sending complete message body" for a cut body);
    reset: it closed without answering; aborted: the client went away.
    """
    text = message.lower()
    if "refused" in text or "connect" in text and "fail" in text:
        return "refused"
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if "complete message body" in text or "incomplete" in text or "truncated" in text or "unexpected server response" in text:
        return "truncated"
    if "reset" in text or "closed" in text or "broken pipe" in text:
        return "reset"
    if "client disconnected" in text or "killed" in text:
        return "aborted"
    return "other"


def trace_context(headers) -> dict:
    """Trace ids as the caller sent them: W3C traceparent, B3 (single or multi), request ids.

    ``headers``: anything with ``get(lowercase_name)`` (mitmproxy's Headers, or :func:`_lookup`'s dict).
    """
    context = {"trace_id": None, "span_id": None, "parent_span_id": None, "trace_source": None}
    if match := _TRACEPARENT.match(headers.get("traceparent", "")):
        context.update(trace_id=match[1].lower(), span_id=match[2].lower(), trace_source="traceparent")
    elif b3 := headers.get("b3"):
        parts = b3.split("-")
        if len(parts) >= 2:
            context.update(trace_id=parts[0].lower(), span_id=parts[1].lower(), trace_source="b3")
            if len(parts) >= 4:
                context["parent_span_id"] = parts[3].lower()
    elif trace_id := headers.get("x-b3-traceid"):
        context.update(
            trace_id=trace_id.lower(),
            span_id=(headers.get("x-b3-spanid") or "").lower() or None,
            parent_span_id=(headers.get("x-b3-parentspanid") or "").lower() or None,
            trace_source="x-b3",
        )
    request_id = headers.get("x-request-id")
    correlation_id = headers.get("x-correlation-id")
    if context["trace_id"] is None and (request_id or correlation_id):
        # A request id propagated unchanged through the stack groups a request as
        # well as a trace id does.
        context.update(
            trace_id=request_id or correlation_id,
            trace_source="x-request-id" if request_id else "x-correlation-id",
        )
    context.update(request_id=request_id, correlation_id=correlation_id)
    return context


def _fields(raw_fields) -> list[tuple[str, str]]:
    """Header fields as text: names as Latin-1, values as UTF-8 with any byte that is not UTF-8 (a Latin-1
    ``é`` sent raw) as ``\\xNN``, as every other text column spells it, so that a header reads the same in
    the file, its HAR and its Parquet (a lone surrogate came out of them as three different things)."""
    return [(name.decode("latin-1"), _text(value)) for name, value in raw_fields]


def _text(value: bytes) -> str:
    text = value.decode("utf-8", "surrogateescape")
    return text if text.isascii() else escape_undecodable(text)


def escape_undecodable(text: str) -> str:
    """Bytes that were not UTF-8 (surrogateescape'd to U+DC80-U+DCFF) as ``\\xNN``; other lone surrogates as U+FFFD."""
    out = []
    for char in text:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append("\ufffd")
        else:
            out.append(char)
    return "".join(out)


def _lookup(fields: list[tuple[str, str]]) -> dict[str, str]:
    """Lowercase name -> value, repeated headers folded with ", " (what mitmproxy's Headers.get returns).

    One pass over the fields instead of a scan of them per lookup.
    """
    folded: dict[str, str] = {}
    for name, value in fields:
        lower = name.lower()
        folded[lower] = f"{folded[lower]}, {value}" if lower in folded else value
    return folded


def _request_tokens(fields: list[tuple[str, str]], query_string: str) -> list[Sighting]:
    found = []
    for name, value in fields:
        lower = name.lower()
        if lower in ("authorization", "proxy-authorization"):
            scheme, _, credentials = value.strip().partition(" ")
            if credentials and scheme.lower() not in _NOT_TOKEN_SCHEMES:
                found.append(Sighting(credentials.strip(), "presented", f"header:{lower}"))
        elif lower == "cookie":
            found += _cookie_tokens(value, "presented", "cookie")
        else:
            found += _header_tokens(lower, value, "presented", "header")
    return found + list(_query_tokens(query_string))


@lru_cache(maxsize=1024)
def _query_tokens(query_string: str) -> tuple[Sighting, ...]:
    # Cached like the header lines: a path's query string often repeats from hop to hop.
    pairs = parse_qsl(query_string, keep_blank_values=True) if query_string else []
    return tuple(Sighting(value, "presented", f"query:{name}") for name, value in pairs if _looks_like_token(name, value))


def _response_tokens(fields: list[tuple[str, str]]) -> list[Sighting]:
    found = []
    for name, value in fields:
        lower = name.lower()
        if lower == "set-cookie":
            found += _cookie_tokens(value.partition(";")[0], "issued", "set-cookie")
        else:
            found += _header_tokens(lower, value, "issued", "response-header")
    return found


def _header_tokens(name: str, value: str, role: str, where: str) -> list[Sighting]:
    if _token_name(name) and _looks_like_token(name, value):
        return [Sighting(value.strip(), role, f"{where}:{name}")]
    return [Sighting(match, role, f"{where}:{name}") for match in find_jwts(value)]


def _cookie_tokens(header: str, role: str, where: str) -> list[Sighting]:
    found = []
    for pair in header.split(";"):
        name, _, value = pair.strip().partition("=")
        if _looks_like_token(name, value):
            found.append(Sighting(value, role, f"{where}:{name}"))
    return found


def _looks_like_token(name: str, value: str) -> bool:
    if len(value) < _MIN_TOKEN_LENGTH or " " in value.strip():
        return False
    return _token_name(name) or value.startswith("eyJ") or is_jwt(value)


@lru_cache(maxsize=1024)
def _token_name(name: str) -> bool:
    # The same few header and cookie names come back on every hop: match each once.
    return bool(_TOKEN_NAME.search(name))


def _redacted_headers(key: bytes, fields: list[tuple[str, str]]) -> list[list[str]]:
    """:func:`_redact.headers`, remembering recent answers: most header lines repeat from hop to hop."""
    return [[name, _redacted_header(key, name, value)] for name, value in fields]


@lru_cache(maxsize=4096)
def _redacted_header(key: bytes, name: str, value: str) -> str:
    return _redact.header_value(key, name, value)


@lru_cache(maxsize=1024)
def _redacted_query(key: bytes, query_string: str) -> str:
    return _redact.query(key, query_string)


def _body_tokens(text: str | None, content_type: str, role: str, where: str) -> list[Sighting]:
    if not text:
        return []
    raw_type, content_type = content_type, content_type.lower()
    if "json" in content_type:
        try:
            document = json.loads(text)
        except (ValueError, RecursionError):
            return []
        return [Sighting(value, role, f"{where}:{name}") for name, value in _json_string_fields(document)]
    if "x-www-form-urlencoded" in content_type:
        pairs = parse_qsl(text, keep_blank_values=True)
    elif "multipart/form-data" in content_type:
        pairs = [(name, value) for _, name, value in _redact.multipart_fields(text, raw_type) or ()]
    else:
        return []
    return [Sighting(value, role, f"{where}:{name}") for name, value in pairs if _looks_like_token(name, value)]


def _json_string_fields(document: object, depth: int = 0):
    """Token-named string fields of a JSON document, a few levels deep ({"data": {"token": ...}})."""
    if depth > 3 or not isinstance(document, dict):
        return
    for name, value in document.items():
        if isinstance(value, str):
            if _looks_like_token(str(name), value):
                yield str(name), value
        elif isinstance(value, dict):
            yield from _json_string_fields(value, depth + 1)


def _body_text(raw: bytes | None, headers: dict[str, str]) -> str | None:
    """The body as text, inflated up to BODY_SCAN_CAP: never decompress without a cap."""
    if not raw:
        return None
    encoding = headers.get("content-encoding", "identity").lower().strip()
    if encoding in ("", "identity"):
        data = raw if len(raw) <= BODY_SCAN_CAP else None
    elif encoding in ("gzip", "deflate", "x-gzip"):
        try:
            # wbits 47: zlib or gzip header, detected.
            data = zlib.decompressobj(47).decompress(raw, BODY_SCAN_CAP + 1)
        except zlib.error:
            return None
        if len(data) > BODY_SCAN_CAP:
            data = None
    else:
        data = None  # br, zstd, ...: not worth a decoder on the recording path
    return data.decode("utf-8", "replace") if data is not None else None


def _stored_body(key: bytes, text: str | None, content_type: str | None) -> str | None:
    if text is None:
        return None
    raw_type, content_type = content_type or "", (content_type or "").lower()
    if "x-www-form-urlencoded" in content_type:
        return _redact.query(key, text)
    if "multipart/form-data" in content_type:
        return _redact.multipart(key, text, raw_type)
    try:
        return json.dumps(_redact.json_body(key, json.loads(text)))
    except (ValueError, RecursionError):
        return _redact.scrub_jwts(key, text)


def _first_time(*times: float | None) -> float:
    return next(t for t in times if t is not None)


def _http_date(value: str | None) -> float | None:
    if not value:
        return None
    # Date has a one-second resolution: consecutive hops mostly repeat the last one.
    global _last_date
    if _last_date[0] == value:
        return _last_date[1]
    try:
        parsed = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        parsed = None
    _last_date = (value, parsed)
    return parsed


_last_date: tuple[str | None, float | None] = (None, None)
