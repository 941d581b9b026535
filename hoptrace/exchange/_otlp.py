"""OTLP/JSON: one span per hop, one ``ExportTraceServiceRequest`` per request, one request a line.

The messages are the OpenTelemetry project's own protobuf classes (``opentelemetry-proto``);
:func:`to_otlp_json` applies the OTLP JSON encoding's differences from protobuf's JSON
mapping: trace and span ids as hex (protobuf writes bytes as base64), enums as integers,
lowerCamelCase names; 64-bit integers (the nanosecond times) stay decimal strings.
:func:`from_otlp_json` is its inverse, for readers and tests.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans, Span, Status

from hoptrace import __version__

_ID_FIELDS = ("traceId", "spanId", "parentSpanId")
_HEX32 = frozenset("0123456789abcdef")


def span_id(capture: object, hop_id: int) -> bytes:
    """8 bytes, the same for the same hop of the same capture (its :func:`capture_key`) in every export."""
    return hashlib.sha256(f"hoptrace-span:{capture}:{hop_id}".encode()).digest()[:8]


def describe_capture(capture_id: object, source: str | None) -> tuple[str, dict]:
    """A capture's key (what its span and trace ids derive from) and its span attributes.

    The key is its id in the file; for a shard of ``hoptrace proxy --workers N``, the capture
    uuid the shards share and the worker's number (every shard numbers its hops from 1, and
    its capture id is its own file's).
    """
    attributes: dict = {"hoptrace.capture.id": capture_id}
    if source and source.startswith("hoptrace proxy --workers"):
        from hoptrace.proxy.workers import parse_worker_source

        if parsed := parse_worker_source(source):
            _, capture, worker = parsed
            attributes.update({"hoptrace.capture.uuid": capture, "hoptrace.worker": worker})
            return f"{capture}/w{worker}", attributes
    return str(capture_id), attributes


class SpanIds:
    """Span and trace ids of hops, numbered as in the file they were read from.

    ``sources`` maps capture ids to their ``captures.source``: a shard's hops then get ids
    from the shared capture uuid and the worker (see :func:`describe_capture`), so two
    shards' hop 1 differ, and exporting a shard later gives the ids its stream sent.
    """

    def __init__(self, sources: Mapping[int, str | None] | None = None) -> None:
        # Ids as Python values (a frame's index holds numpy ones), whatever their type in the file.
        plain = {(c.item() if hasattr(c, "item") else c): source for c, source in (sources or {}).items()}
        self.captures = {capture: describe_capture(capture, source) for capture, source in plain.items()}

    @classmethod
    def of_captures(cls, captures) -> SpanIds:
        """From an analysis's captures frame (indexed by id)."""
        sources = dict(captures["source"]) if "source" in captures.columns else dict.fromkeys(captures.index)
        return cls({capture: source if isinstance(source, str) else None for capture, source in sources.items()})

    def locate(self, hop_id: int, capture_id: object) -> tuple[tuple[str, dict], int]:
        """The hop's capture (key, attributes) and the hop's id in the file its capture recorded."""
        return self.captures.get(capture_id) or describe_capture(capture_id, None), hop_id

    def span(self, hop_id: int, capture_id: int) -> bytes:
        (key, _), own = self.locate(hop_id, capture_id)
        return span_id(key, own)

    def trace(self, hops: list[dict]) -> bytes:
        """The services' own W3C trace id when they propagated one, else 16 bytes derived from the request's root hop."""
        for hop in hops:
            candidate = (hop["trace_id"] or "").lower()
            if hop["trace_source"] == "traceparent" and len(candidate) == 32 and set(candidate) <= _HEX32 and candidate.strip("0"):
                return bytes.fromhex(candidate)
        (key, _), root = self.locate(hops[0]["trace"], hops[0]["capture_id"])
        return hashlib.sha256(f"hoptrace-trace:{key}:{root}".encode()).digest()[:16]

    def attributes(self, hop: dict) -> dict:
        """The hop's own id and its capture's attributes."""
        (_, capture), own = self.locate(hop["id"], hop["capture_id"])
        return {"hoptrace.hop.id": own, **capture}


def requests(hops: Iterable[dict]) -> Iterator[list[dict]]:
    """Hops grouped by request (the analysis' ``trace``), each request in start order."""
    by_trace: dict[int, list[dict]] = {}
    for hop in hops:
        by_trace.setdefault(hop["trace"], []).append(hop)
    yield from by_trace.values()


def request_message(hops: list[dict], tokens: dict[str, dict], ids: SpanIds | None = None) -> ExportTraceServiceRequest:
    """One request's hops as spans, grouped by service (the resource's ``service.name``).

    Every message is built where it ends up (``add()``): one built apart and passed in is
    copied (a span 42-45 µs in all, against 32 built in place)."""
    ids = ids or SpanIds()
    tid = ids.trace(hops)
    root = hops[0]
    root_failed = bool(root["failed"]) or (root["status"] or 0) >= 400
    message = ExportTraceServiceRequest()
    by_service: dict[str, ScopeSpans] = {}
    for hop in hops:
        if (scope_spans := by_service.get(hop["service"])) is None:
            resource_spans = message.resource_spans.add()
            _add_attributes(resource_spans.resource.attributes, {"service.name": hop["service"]})
            scope_spans = by_service[hop["service"]] = resource_spans.scope_spans.add()
            scope_spans.scope.name, scope_spans.scope.version = "hoptrace", __version__
        _add_span(scope_spans.spans, hop, tid, ids, tokens, root_failed)
    return message


def _add_span(spans, hop: dict, tid: bytes, ids: SpanIds, tokens: dict[str, dict], root_failed: bool) -> None:
    span = spans.add(
        trace_id=tid,
        span_id=ids.span(hop["id"], hop["capture_id"]),
        name=hop["endpoint"] or f"{hop['method']} {hop['path']}",
        kind=Span.SPAN_KIND_SERVER,
        start_time_unix_nano=_nanos(hop["started_at"]),
        end_time_unix_nano=_nanos(max(hop["ended_at"], hop["started_at"])),
    )
    _add_span_attributes(span, {**_hop_attributes(hop, tokens), **ids.attributes(hop)})
    if hop["parent_id"] is not None:
        # The analysis links hops within one capture: the parent's capture is the hop's.
        span.parent_span_id = ids.span(hop["parent_id"], hop["capture_id"])
    status = hop["status"] or 0
    if hop["failed"] or status >= 500 or 400 <= status < 500 and root_failed:
        span.status.code, span.status.message = Status.STATUS_CODE_ERROR, hop["error"] or f"HTTP {status}"
    for finding in hop["findings"]:
        event = span.events.add(time_unix_nano=_nanos(finding["at"] if isinstance(finding["at"], int | float) else hop["started_at"]))
        event.name = finding["kind"]  # assigned: add(name=None) would quietly leave it empty
        _add_attributes(event.attributes, {"hoptrace.finding.severity": finding["severity"], "hoptrace.finding.message": finding["message"]})


def _hop_attributes(hop: dict, tokens: dict[str, dict]) -> dict:
    client_host, _, client_port = (hop["client_addr"] or "").rpartition(":")
    attributes = {
        "http.request.method": hop["method"],
        "url.path": hop["path"],
        "url.query": hop["query"],  # as stored: redacted
        "url.scheme": hop["scheme"],
        "server.address": hop["host"],
        "server.port": hop["port"],
        "http.response.status_code": hop["status"],
        "network.protocol.version": (hop["http_version"] or "").removeprefix("HTTP/") or None,
        "client.address": client_host or None,
        "client.port": int(client_port) if client_port.isdecimal() and int(client_port) < 65536 else None,
        "error.type": hop["error_kind"] if hop["failed"] else None,
        "http.route": (hop["endpoint"] or "").partition(" ")[2] or None,
        "hoptrace.link": hop["link"],
        "hoptrace.link.candidates": hop["link_candidates"],
        "hoptrace.link.confidence": hop["link_confidence"],  # the analysis's own, 0-1
        "hoptrace.propagated.trace_id": hop["trace_id"],
        "hoptrace.propagated.span_id": hop["span_id"],
    }
    fp = hop["token_fp"]
    if fp and fp in tokens:
        token = tokens[fp]
        attributes.update({
            "enduser.id": token.get("sub"),
            "hoptrace.token.fingerprint": fp,
            "hoptrace.token.kind": token.get("kind"),
            "hoptrace.token.iss": token.get("iss"),
            "hoptrace.token.iat": token.get("iat"),
            "hoptrace.token.exp": token.get("exp"),
            "hoptrace.token.remaining_s": hop["remaining_s"],
        })  # fmt: skip
    return attributes


def _add_attributes(attributes, values: dict) -> None:
    """``values`` (None left out) added to a repeated ``KeyValue`` field. Filled in place: building a
    ``KeyValue`` and an ``AnyValue`` per attribute and copying them in cost 2.6 times as much, and a
    span has ~25 (the streaming process builds one per hop)."""
    for key, value in values.items():
        if value is None:
            continue
        any_value = attributes.add(key=key).value
        if isinstance(value, bool):
            any_value.bool_value = value
        elif isinstance(value, int):
            any_value.int_value = value
        elif isinstance(value, float):
            any_value.double_value = value
        else:
            any_value.string_value = str(value)


# Attributes whose value is new on almost every hop: added directly, never kept.
_PER_HOP = frozenset({
    "hoptrace.hop.id", "hoptrace.token.remaining_s", "hoptrace.propagated.trace_id",
    "hoptrace.propagated.span_id", "client.port", "url.query",
})  # fmt: skip
# What is kept: short strings, ints, bools, and floats other than 0 and NaN (0.0 and -0.0 are
# equal keys but two doubles; NaN is never equal to itself, so it would only fill the cache).
# A path or a claim may be as long as a request line or a token (tens of KiB): 16k kept
# encodings of such values would hold a gigabyte.
_KEPT_MAX_CHARS = 256


def _add_span_attributes(span: Span, values: dict) -> None:
    """:func:`_add_attributes` for a span: recurring values from kept encodings, in one parse.

    Serialized protobuf messages concatenated parse as the messages merged, and merging
    appends to a repeated field: so the encodings of spans holding one attribute each, merged
    into the span, add their attributes in order. Most values recur from hop to hop (method,
    route, server, token claims, capture): their encoding is kept. The others (new on every hop,
    long, or of no kept type) are added after them, directly, in their order (32 → 26-28 µs a
    span; the streaming process builds one per hop)."""
    kept = {key: value for key, value in values.items() if key not in _PER_HOP and _keepable(value)}
    span.MergeFromString(b"".join(_encoded_kept(key, value) for key, value in kept.items()))
    _add_attributes(span.attributes, {key: value for key, value in values.items() if key not in kept})


def _keepable(value: object) -> bool:
    kind = type(value)
    if kind is str:
        return len(value) <= _KEPT_MAX_CHARS
    if kind is float:
        return value != 0 and not math.isnan(value)
    return kind is int or kind is bool


# typed: True, 1 and 1.0 are equal keys but different attributes (bool, int, double).
@functools.lru_cache(maxsize=16_384, typed=True)
def _encoded_kept(key: str, value: object) -> bytes:
    """A span holding the one attribute, serialized."""
    span = Span()
    _add_attributes(span.attributes, {key: value})
    return span.SerializeToString()


def _nanos(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


def to_otlp_json(message: ExportTraceServiceRequest) -> str:
    """One line of OTLP/JSON (ids hex, enums integers)."""
    document = json_format.MessageToDict(message, use_integers_for_enums=True)
    _convert_ids(document, lambda text: base64.b64decode(text).hex())
    return json.dumps(document, separators=(",", ":"), allow_nan=False)


def from_otlp_json(line: str) -> ExportTraceServiceRequest:
    """The inverse of :func:`to_otlp_json`: hex ids back to protobuf's base64, then ``json_format.Parse``."""
    document = json.loads(line)
    _convert_ids(document, lambda text: base64.b64encode(bytes.fromhex(text)).decode())
    return json_format.ParseDict(document, ExportTraceServiceRequest())


def _convert_ids(node: object, convert) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_FIELDS and isinstance(value, str):
                node[key] = convert(value)
            else:
                _convert_ids(value, convert)
    elif isinstance(node, list):
        for item in node:
            _convert_ids(item, convert)


def write_otlp(hops: Iterable[dict], tokens: dict[str, dict], out, ids: SpanIds | None = None) -> tuple[int, int]:
    """Write one line per request; returns (requests, spans)."""
    lines = spans = 0
    for request in requests(hops):
        out.write(to_otlp_json(request_message(request, tokens, ids)).encode() + b"\n")
        lines += 1
        spans += len(request)
    return lines, spans
