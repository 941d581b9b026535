"""HAR 1.2 in and out.

In: entries are streamed with ijson (``log.entries.item``), so a 1 GB HAR never sits in
memory whole, and each becomes a mitmproxy flow for the recorder's own row builder.
mitmproxy's ``io/har.py`` does a similar conversion but loads the whole file, drops the
timings (connect/send/wait/receive) and the caller's address, and turns failed entries
into responses with status 0; here those are kept: a failed entry (status 0, Chrome's and
mitmproxy's ``_error``) becomes a flow with an error, as the live proxy would record it.

Out: :func:`har_entry` turns a stored hop (already redacted by the recorder) into a HAR
entry; ``_export.py`` adds hoptrace's analysis as ``_hoptrace``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, BinaryIO
from urllib.parse import parse_qsl, urlsplit

import ijson
from mitmproxy import connection, http
from mitmproxy.flow import Error

from hoptrace._errors import ImportFileError
from hoptrace._format import url_without_secrets
from hoptrace._stored import header_pairs

HAR_VERSIONS = ("1.1", "1.2")
# Deeper nesting than this is no HAR (an entry needs ~5 levels).
MAX_DEPTH = 64
# A HAR duration above this (ms) is not a duration: ~11.6 days.
_MAX_MS = 1e9
# A version worth quoting back in an error; anything else in its place may be a secret.
_VERSION = re.compile(r"[0-9][0-9.]{0,9}")
_HOST_PORT = re.compile(r"^\[?([0-9A-Za-z.:_-]+?)\]?:(\d{1,5})$")
# Header names HTTP/2 and /3 exports carry as pseudo-headers (":authority", ":path", ...).
_PSEUDO = ":"
# A flow's metadata key for the body sizes the HAR states, which the row keeps over the
# length of a body the HAR left out or replaced.
SIZES = "hoptrace_har_sizes"
# ...and for the service a HAR hoptrace exported names (``_hoptrace.service``).
SERVICE = "hoptrace_service"
# ...and for what the import should say about an entry it recorded differently from what it stated.
NOTE = "hoptrace_har_note"


class Entries:
    """The entries of a HAR file as mitmproxy flows, streamed; :attr:`version` once read."""

    def __init__(self, fileobj: BinaryIO, name: str, digest: str) -> None:
        # Not use_float: with it, ijson's C backend refuses a whole file over one integer past
        # 2**63 ("integer overflow"); without it, numbers come as int or Decimal, whatever their size.
        self._events = ijson.basic_parse(fileobj, use_float=False)
        self._fileobj = fileobj
        self._name = name
        self._digest = digest
        self.version: str | None = None
        self.creator: str | None = None
        self.entry: str | None = None  # the entry route, in a HAR hoptrace exported
        self.skipped = 0  # entries that are no HTTP exchange (data:, blob:)
        self.notes: list[str] = []  # one line per entry left out for an unusable field

    def __iter__(self) -> Iterator[http.HTTPFlow]:
        try:
            yield from self._flows()
        except ImportFileError:
            raise
        except ijson.JSONError:
            # ijson's message quotes the text around the error, which may be a header's token.
            raise ImportFileError(f"{self._name}: not valid JSON before byte {self._fileobj.tell()}") from None
        except UnicodeDecodeError as exc:
            raise ImportFileError(f"{self._name}: not UTF-8 ({exc.reason})") from None
        except (ValueError, RecursionError) as exc:
            raise ImportFileError(f"{self._name}: not a readable HAR file ({type(exc).__name__})") from None
        if self.version is None:
            raise ImportFileError(f"{self._name}: not a HAR file (no log.version)")
        if self.version not in HAR_VERSIONS:
            shown = f" {self.version!r}" if _VERSION.fullmatch(self.version) else ""
            raise ImportFileError(f"{self._name}: HAR version{shown} is not supported (1.1 or 1.2)")

    def _flows(self) -> Iterator[http.HTTPFlow]:
        # ijson.parse builds a dotted prefix for every event, O(depth) each: a hostile file
        # of 50,000 nested arrays took 42 s. basic_parse and a bounded stack of our own
        # keep every event O(1), and a nesting limit stops the bomb early.
        levels: list[list] = []  # [name, key of the current member], outermost first
        builder: ijson.ObjectBuilder | None = None
        depth = index = 0
        seen_entries = False
        for event, value in self._events:
            if event == "number" and not isinstance(value, int):
                value = float(value)  # a Decimal; past float's range it is inf, which no field takes
            if builder is not None:
                if event in ("start_map", "start_array"):
                    depth += 1
                    if depth > MAX_DEPTH:
                        raise ImportFileError(f"{self._name}: entry {index + 1} is nested deeper than {MAX_DEPTH} levels")
                elif event in ("end_map", "end_array"):
                    if depth == 0:  # the end of log.entries
                        builder = None
                        levels.pop()
                        continue
                    depth -= 1
                builder.event(event, value)
                if depth == 0 and event not in ("start_map", "start_array", "map_key"):  # an item is complete
                    index += 1
                    flow = self._flow(builder.value, index)
                    builder = ijson.ObjectBuilder()
                    if flow is not None:
                        yield flow
            elif event == "map_key":
                levels[-1][1] = value
            elif event in ("start_map", "start_array"):
                levels.append([_member(levels), None if event == "start_map" else "item"])
                if len(levels) > MAX_DEPTH:
                    raise ImportFileError(f"{self._name}: nested deeper than {MAX_DEPTH} levels; not a HAR file")
                if event == "start_array" and _path(levels) == "log.entries":
                    builder, seen_entries = ijson.ObjectBuilder(), True
            elif event in ("end_map", "end_array"):
                levels.pop()
            elif isinstance(value, str):
                self._header_field(f"{_path(levels)}.{_member(levels)}", value)
        if not seen_entries:
            raise ImportFileError(f"{self._name}: not a HAR file (no log.entries array)")

    def _header_field(self, path: str, value: str) -> None:
        if path == "log.version":
            self.version = value
        elif path == "log.creator.name":
            self.creator = value
        elif path == "log._hoptrace.entry":
            self.entry = value

    def _flow(self, entry: object, index: int) -> http.HTTPFlow | None:
        try:
            flow = entry_flow(entry, f"{self._digest[:16]}-{index}", connect_overlaps=self.creator == "mitmproxy")
            if note := flow.metadata.pop(NOTE, None):
                self.notes.append(f"{self._name}: entry {index}: {note}")
            return flow
        except _Skip:
            self.skipped += 1
            return None
        except _Unusable as exc:
            self.notes.append(f"{self._name}: entry {index}: {exc}; skipped")
            return None
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise ImportFileError(f"{self._name}: entry {index}: {_describe(exc)}") from None


def _member(levels: list[list]) -> str:
    """The name of the value about to start: the current map key, or ``item`` in an array."""
    return str(levels[-1][1]) if levels else ""


def _path(levels: list[list]) -> str:
    """Dotted path of the innermost open container, as ijson writes prefixes (``log.entries``)."""
    return ".".join(level[0] for level in levels[1:])


class _Skip(Exception):
    """An entry that is not an HTTP exchange (data:, blob:, chrome-extension: URLs)."""


def entry_flow(entry: Any, flow_id: str, *, connect_overlaps: bool = False) -> http.HTTPFlow:
    """One HAR entry as the mitmproxy flow the live proxy would have seen.

    ``connect_overlaps``: the file's ``connect`` is not a phase before ``send`` (see :func:`_timeline`).
    """
    _need(isinstance(entry, dict), "an entry is not an object")
    request, response = entry["request"], entry.get("response")
    _need(isinstance(request, dict), "request is not an object")
    url = _text(request["url"], "request.url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _Bad(f"request.url {url_without_secrets(url)[:80]!r} is not a URL") from None
    if parts.scheme not in ("http", "https"):
        raise _Skip
    _need(bool(parts.hostname), f"request.url {url_without_secrets(url)[:80]!r} has no host")
    started = _started(entry["startedDateTime"])
    times = _timeline(started, entry.get("timings") or {}, entry.get("time"), connect_overlaps)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    req = http.Request(
        parts.hostname, port or (443 if parts.scheme == "https" else 80),
        _text(request["method"], "request.method").encode(), parts.scheme.encode(),
        b"", path.encode("utf-8", "surrogateescape"), _http_version(request.get("httpVersion")),
        _headers(request.get("headers"), "request.headers"), b"", None, started, times["request_end"],
    )  # fmt: skip
    _set_body(req, _post_data(request.get("postData")), None)
    client = connection.Client(
        peername=_address(entry.get("connection")), sockname=("0.0.0.0", 0), timestamp_start=started
    )  # fmt: skip
    server = connection.Server(address=(parts.hostname, req.port))
    server.timestamp_start, server.timestamp_tcp_setup = times["connect"], times["connected"]
    flow = http.HTTPFlow(client, server)
    flow.id = flow_id
    flow.request = req
    stated = response.get("status") if isinstance(response, dict) else None
    status = _status(stated)
    if status is None:
        flow.error = Error(_error_text(entry, response), times["ended"])
        if stated not in (None, 0, -1):
            flow.metadata[NOTE] = "response.status is not an HTTP status; recorded as a hop without a response"
    else:
        flow.response = http.Response(
            _http_version(response.get("httpVersion")), status,
            _text(response.get("statusText", ""), "response.statusText").encode("utf-8", "surrogateescape"),
            _headers(response.get("headers"), "response.headers"), b"", None,
            times["response_start"], times["ended"],
        )  # fmt: skip
        content = response.get("content") or {}
        _need(isinstance(content, dict), "response.content is not an object")
        _set_body(flow.response, content.get("text"), content.get("encoding"))
        if error := (response.get("_error") or entry.get("_error")):
            flow.error = Error(str(error), times["ended"])
    hint = entry.get("_hoptrace")
    if isinstance(hint, dict) and isinstance(hint.get("service"), str) and hint["service"]:
        flow.metadata[SERVICE] = hint["service"]
    flow.metadata[SIZES] = (_size(request.get("bodySize")), _size(response.get("bodySize")) if flow.response else None)
    return flow


class _Bad(ValueError):
    """A field of an entry that cannot be read; the message is ours and quotes no secret."""


class _Unusable(_Bad):
    """A time no hop can carry (not finite, or no duration): the entry is left out, the rest imported."""


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise _Bad(message)


def _text(value: object, where: str) -> str:
    _need(isinstance(value, str), f"{where} is not a string")
    return value


def _started(value: object) -> float:
    text = _text(value, "startedDateTime")
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise _Bad("startedDateTime is not an ISO 8601 time") from None
    if moment.tzinfo is None:  # HAR requires an offset; a file without one is taken as UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _timeline(started: float, timings: object, total: object, connect_overlaps: bool) -> dict[str, float | None]:
    """HAR's sequential phases (blocked, dns, connect incl. ssl, send, wait, receive) as times.

    A phase of -1 (or absent) did not apply. When ``timings`` says nothing, ``time`` is
    all wait, so the hop still ends when the entry did. mitmproxy's ``savehar`` measures
    ``connect`` on the upstream connection, which opens either before the request (eager,
    and then only the first flow on it reports it) or inside ``wait`` (lazy), never
    between the request's start and its ``send``: with ``connect_overlaps`` it is left out
    of the timeline, and its start unknown (counting it would push every end, and so the
    nesting of hops that the parent links rest on, later by the connect time).
    """
    _need(isinstance(timings, dict), "timings is not an object")
    phase = {name: _ms(timings.get(name), f"timings.{name}") for name in ("blocked", "dns", "connect", "send", "wait", "receive")}
    total_ms = _ms(total, "time")
    if not any(phase.values()) and total_ms:
        phase["wait"] = total_ms
    at = started + (phase["blocked"] + phase["dns"]) / 1000
    fresh = isinstance(timings.get("connect"), int | float) and timings["connect"] >= 0 and not connect_overlaps
    connect = at if fresh else None
    at += phase["connect"] / 1000 if fresh else 0.0
    connected = at if fresh else None
    request_end = at = at + phase["send"] / 1000
    response_start = at = at + phase["wait"] / 1000
    return {
        "connect": connect, "connected": connected, "request_end": request_end,
        "response_start": response_start, "ended": at + phase["receive"] / 1000,
    }  # fmt: skip


def _ms(value: object, where: str) -> float:
    if value is None:
        return 0.0
    _need(not isinstance(value, bool) and isinstance(value, int | float), f"{where} is not a number")
    if not -_MAX_MS <= value <= _MAX_MS:  # also NaN and inf, and ints past float's range
        raise _Unusable(f"{where} {value!r} is not a duration in ms")
    return max(float(value), 0.0)  # -1: the phase did not apply


def _http_version(value: object) -> bytes:
    text = value.strip().upper() if isinstance(value, str) else ""
    if text in ("H2", "HTTP/2", "HTTP/2.0"):
        return b"HTTP/2"
    if text in ("H3", "HTTP/3", "HTTP/3.0") or text.startswith("H3-"):
        return b"HTTP/3"
    return text.encode() if text in ("HTTP/1.0", "HTTP/1.1") else b"HTTP/1.1"


def _headers(value: object, where: str) -> http.Headers:
    if value is None:
        return http.Headers()
    _need(isinstance(value, list), f"{where} is not a list")
    fields = []
    for header in value:
        if isinstance(header, dict):
            name, content = header.get("name"), header.get("value")
        else:
            _need(isinstance(header, list) and len(header) == 2, f"{where}: a header is neither {{name, value}} nor [name, value]")
            name, content = header
        _need(isinstance(name, str) and isinstance(content, str), f"{where}: a header name or value is not a string")
        if name and not name.startswith(_PSEUDO):
            fields.append((name.encode("utf-8", "surrogateescape"), content.encode("utf-8", "surrogateescape")))
    return http.Headers(fields)


def _post_data(value: object) -> str | None:
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("text"), str):
        return value["text"]
    params = value.get("params")
    if isinstance(params, list):
        pairs = [(p.get("name"), p.get("value") or "") for p in params if isinstance(p, dict)]
        return "&".join(f"{n}={v}" for n, v in pairs if isinstance(n, str) and isinstance(v, str))
    return None


def _set_body(message: http.Message, text: object, encoding: object) -> None:
    """The body as it went over the wire: HAR text is decoded, so encode it per Content-Encoding."""
    if not isinstance(text, str) or not text:
        return
    if encoding == "base64":
        try:
            data = base64.b64decode(text, validate=False)
        except ValueError:
            data = text.encode("utf-8", "surrogateescape")
    else:
        data = text.encode("utf-8", "surrogateescape")
    try:
        message.content = data
    except ValueError:  # an encoding mitmproxy cannot apply: keep the bytes as they are
        message.raw_content = data


def _status(value: object) -> int | None:
    """An HTTP status as HAR writers give it: an int, an integral float (``200.0``)
    or a string of ASCII digits (``"200"``); None for anything else."""
    if isinstance(value, float) and value.is_integer() or isinstance(value, str) and value.isascii() and value.isdecimal():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 999:
        return None
    return value


def _size(value: object) -> int | None:
    """A body size in bytes; None (unknown) for anything else, including what SQLite's INTEGER cannot hold."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 63:
        return None
    return value


def _address(value: object) -> tuple[str, int] | None:
    """HAR's ``connection`` when it is an address (hoptrace writes the caller's host:port)."""
    if isinstance(value, str) and (match := _HOST_PORT.match(value.strip())) and not match[1].isdigit():
        return match[1], int(match[2])
    return None


def _error_text(entry: dict, response: object) -> str:
    error = (response.get("_error") if isinstance(response, dict) else None) or entry.get("_error")
    return str(error) if error else "no response (HAR status 0)"


def _describe(exc: Exception) -> str:
    """Our own messages as they are; a foreign one only by its type, as it may quote the entry."""
    if isinstance(exc, KeyError):
        return f"required field {exc.args[0]!r} is missing"
    if isinstance(exc, _Bad):
        return _first_line(exc)
    return f"cannot be read ({type(exc).__name__})"


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__


def file_digest(fileobj: BinaryIO) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    while chunk := fileobj.read(1 << 20):
        digest.update(chunk)
    fileobj.seek(0)
    return digest.hexdigest()


def query_pairs(query: str | None) -> list[dict[str, str]]:
    return [{"name": name, "value": value} for name, value in parse_qsl(query or "", keep_blank_values=True)]


# -- out ---------------------------------------------------------------------------

# What HAR requires where hoptrace kept no value: never a guess at the secret.
PLACEHOLDER = "[redacted]"


def har_entry(hop: dict) -> dict:
    """A stored hop (see ``_select.Selection.hops``) as a HAR 1.2 entry with ``_hoptrace``."""
    started, ended = hop["started_at"], hop["ended_at"]
    timings = har_timings(hop)
    url = f"{hop['scheme'] or 'http'}://{_host_port(hop)}{hop['path'] or '/'}" + (f"?{hop['query']}" if hop["query"] else "")
    entry: dict[str, Any] = {
        "startedDateTime": datetime.fromtimestamp(started, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "time": round(sum(v for v in timings.values() if v != -1), 3),
        "request": _har_request(hop, url),
        "response": _har_response(hop),
        "cache": {},
        "timings": timings,
        "_hoptrace": _analysis_fields(hop),
    }
    if hop["client_addr"]:
        entry["connection"] = hop["client_addr"]
    if _is_ip(hop["host"]):
        entry["serverIPAddress"] = hop["host"]
    if ended < started:  # an untrusted file: keep the entry valid, say why it is odd
        entry["comment"] = "ended before it started in the trace file"
    return entry


def har_timings(hop: dict) -> dict[str, float]:
    """connect/send/wait/receive (ms) from the proxy's timestamps, summing to the hop's duration.

    The proxy connects upstream after the request headers arrived (lazily), so the
    connect time is part of the wait for the response: it is taken out of ``wait``.
    """
    started, ended = hop["started_at"], hop["ended_at"]
    request_end = _clamp(hop["request_end_at"], started, ended) if hop["request_end_at"] is not None else started
    response_start = _clamp(hop["response_start_at"], request_end, ended) if hop["response_start_at"] is not None else ended
    connect = -1.0
    if hop["connect_at"] is not None and hop["connected_at"] is not None:
        connect = max(0.0, min(hop["connected_at"] - hop["connect_at"], response_start - request_end)) * 1000
    return {
        "blocked": -1, "dns": -1, "connect": round(connect, 3), "ssl": -1,
        "send": round((request_end - started) * 1000, 3),
        "wait": round(max(0.0, (response_start - request_end) * 1000 - max(connect, 0.0)), 3),
        "receive": round((ended - response_start) * 1000, 3),
    }  # fmt: skip


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), max(low, high))


def _host_port(hop: dict) -> str:
    host = hop["host"] or "unknown.invalid"
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{hop['port']}" if hop["port"] else host


def _is_ip(host: str | None) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host or "")
    except ValueError:
        return False
    return True


def _header_list(stored: str | None) -> list[dict[str, str]]:
    return [{"name": name, "value": str(value)} for name, value in header_pairs(stored)]


def _har_request(hop: dict, url: str) -> dict:
    request = {
        "method": hop["method"] or "GET",
        "url": url,
        "httpVersion": hop["http_version"] or "HTTP/1.1",
        "cookies": [],  # the Cookie header is stored redacted whole: no name or value to list
        "headers": _header_list(hop["request_headers"]),
        "queryString": query_pairs(hop["query"]),
        "headersSize": -1,
        "bodySize": hop["request_size"] if hop["request_size"] is not None else -1,
    }
    if hop["request_size"] or hop["request_body"]:
        request["postData"] = {"mimeType": hop["request_content_type"] or "", "text": hop["request_body"] or PLACEHOLDER}
    return request


def _har_response(hop: dict) -> dict:
    content: dict[str, Any] = {"size": hop["response_size"] or 0, "mimeType": hop["response_content_type"] or "x-unknown"}
    if hop["response_body"]:
        content["text"] = hop["response_body"]
    elif hop["response_size"]:
        content["comment"] = "body not stored by hoptrace"
    headers = _header_list(hop["response_headers"])
    response: dict[str, Any] = {
        "status": hop["status"] or 0,
        "statusText": hop["reason"] or "",
        "httpVersion": hop["http_version"] or "" if hop["status"] else "",
        "cookies": [],
        "headers": headers,
        "content": content,
        "redirectURL": next((h["value"] for h in headers if h["name"].lower() == "location"), ""),
        "headersSize": -1,
        "bodySize": hop["response_size"] if hop["response_size"] is not None else -1,
    }
    if hop["error"]:
        response["_error"] = hop["error"]
    return response


def _analysis_fields(hop: dict) -> dict:
    token = None
    if hop["token_fp"] not in (None, "nan", "None"):
        token = {"fingerprint": hop["token_fp"], "sub": _str_or_none(hop["token_sub"]), "exp": hop["token_exp"], "remaining_s": hop["remaining_s"]}
    return {
        "hop_id": hop["id"],
        "capture_id": hop["capture_id"],
        "service": hop["service"],
        "request": hop["trace"],
        "trace_id": hop["trace_id"],
        "parent_hop": hop["parent_id"],
        "link": hop["link"],
        "link_candidates": hop["link_candidates"],
        "error_kind": hop["error_kind"],
        "token": token,
        "findings": [{k: f[k] for k in ("kind", "severity", "message")} for f in hop["findings"]],
    }


def _str_or_none(value: object) -> str | None:
    return None if value in (None, "nan", "None") else str(value)


def write_har(hops: Iterator[dict], out: BinaryIO, *, version: str, entry: str | None) -> int:
    """Stream a HAR 1.2 document, one entry at a time; returns the number of entries."""
    head = {"version": "1.2", "creator": {"name": "hoptrace", "version": version}, "pages": []}
    if entry:
        head["_hoptrace"] = {"entry": entry}
    out.write(json.dumps({"log": head})[:-2].encode() + b', "entries": [\n')
    count = 0
    for hop in hops:
        out.write((",\n" if count else "").encode() + json.dumps(har_entry(hop), ensure_ascii=True, allow_nan=False).encode())
        count += 1
    out.write(b"\n]}}\n")
    return count
