"""Row building: flow snapshots in, the rows of `hops`, `tokens` and `hop_tokens` out.

Runs in the writer thread or the row process; only :func:`read_flow` (a flow's snapshot,
or its bare row) runs on mitmproxy's event loop, when the recorder submits the flow.
Nothing here raises on what a flow carries: a snapshot that cannot become a full
row becomes a *bare* row (what could be read, and why the rest could not), counted
as an addon error. :func:`clean` is the one choke point every value passes just
before insert (see ``_store.py``): text valid UTF-8, numbers finite or NULL.

Public for importers (HAR, flow files): :func:`build_rows` on ``(service, snapshot)``
items, where :func:`hoptrace.addons._hop.snapshot` copies a mitmproxy flow.
"""

from __future__ import annotations

import logging
import math
import time
from typing import NamedTuple

from hoptrace.addons import _hop, _redact
from hoptrace.addons._hop import escape_undecodable, snapshot, snapshot_row
from hoptrace.addons._signatures import KEY_SETS
from hoptrace.addons._tokens import TokenInfo, decode, fingerprint
from hoptrace.db import HOP_COLUMNS, TOKEN_COLUMNS

logger = logging.getLogger("hoptrace")

# Every hop column after the four the writer fills itself: id, capture_id, flow_id, service.
_HOP_FIELDS = HOP_COLUMNS[4:]
# SQLite's INTEGER is a signed 64-bit number; a larger Python int fails the whole insert.
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


class HopRows(NamedTuple):
    """One hop's rows: its `hops` row (without id), the tokens first seen on it, its links."""

    hop: tuple
    tokens: list[tuple]
    links: list[tuple]  # (fingerprint, role, location); the hop id is given at insert


class Built(NamedTuple):
    """A batch of snapshots as rows, and how many of them had to become bare rows."""

    hops: list[HopRows]
    addon_errors: int


def build_rows(
    items: list[tuple[str, tuple | dict]], key: bytes, store_bodies: bool, capture_id: int, known: set[str] | frozenset = frozenset()
) -> Built:
    """Snapshots in, rows out; tokens whose fingerprint is in ``known`` are not repeated.

    An item is (service, snapshot), or (service, row dict) for a flow already reduced
    to a bare row (see :func:`bare_row_of_flow`). No state but the arguments, and the key
    sets (JWKS) served so far in the capture, that each new JWT's signature is checked
    against (:mod:`hoptrace.addons._signatures`).
    """
    built: list[HopRows] = []
    errors = 0
    new_tokens: set[str] = set()
    for service, snap in items:
        try:
            rows = _hop_rows(service, snap, key, store_bodies, capture_id, known, new_tokens)
        except Exception as exc:  # hostile input we did not foresee must not lose the hop
            errors += 1
            logger.warning("hoptrace: could not read flow %s (%r); recorded without details", _flow_id(snap), exc)
            rows = HopRows(bare_hop(capture_id, service, _bare_of_snapshot(snap, exc)), [], [])
        built.append(rows)
    return Built(built, errors)


def _hop_rows(service, snap, key, store_bodies, capture_id, known, new_tokens: set[str]) -> HopRows:
    if isinstance(snap, dict):
        return HopRows(bare_hop(capture_id, service, snap), [], [])
    row, sightings = snapshot_row(snap, key, store_bodies)
    KEY_SETS.learn(capture_id, _jwks_text(snap, row))
    tokens, links, linked = [], [], set()
    for sighting in sightings:
        fp = fingerprint(key, sighting.token)
        if fp not in known and fp not in new_tokens:
            info = decode(sighting.token)
            verdict = KEY_SETS.verdict(capture_id, sighting.token, info)
            tokens.append(_token_row(fp, capture_id, info, row["started_at"], verdict))
        link = (fp, sighting.role, sighting.location)
        if link not in linked:
            linked.add(link)
            links.append(link)
    hop = (capture_id, row["flow_id"], service, *(row[name] for name in _HOP_FIELDS))
    new_tokens.update(token[0] for token in tokens)  # only once the whole hop was read
    return HopRows(hop, tokens, links)


def _jwks_text(snap: tuple, row: dict) -> str | None:
    """The response body of a successful JSON answer that may be a key set (it names "keys"), else None."""
    raw = snap[_hop._RESP_BODY] if snap[_hop._HAS_RESPONSE] else None
    if row["status"] != 200 or not raw or b'"keys"' not in raw or "json" not in (row["response_content_type"] or ""):
        return None
    return _hop._body_text(raw, _hop._lookup(_hop._fields(snap[_hop._RESP_FIELDS])))


def _token_row(fp: str, capture_id: int, info: TokenInfo, seen_at: float, verdict: str | None = None) -> tuple:
    values = {"fingerprint": fp, "capture_id": capture_id, "first_seen_at": seen_at, "verdict": verdict}
    return tuple(values[name] if name in values else getattr(info, name) for name in TOKEN_COLUMNS)


# -- bare rows: the little that can be said of a flow that would not parse ------------


def bare_hop(capture_id: int, service: str, row: dict) -> tuple:
    return (capture_id, row["flow_id"], service, *(row.get(name) for name in _HOP_FIELDS))


def bare_row_of_flow(flow, reason: BaseException | str) -> dict:
    """A bare row from a live mitmproxy flow that :func:`snapshot` could not copy."""
    request = getattr(flow, "request", None)
    return _bare(
        _get(flow, "id", "unknown"), _get(request, "method"), _get(request, "path", ""), _get(request, "timestamp_start"), reason
    )


def _bare_of_snapshot(snap, reason: BaseException) -> dict:
    if isinstance(snap, dict):
        return {**snap, "error": f"{snap.get('error')}; {reason!r}"}
    get = lambda i: snap[i] if isinstance(snap, tuple) and len(snap) > i else None  # noqa: E731
    return _bare(get(_hop._FLOW_ID) or "unknown", get(_hop._METHOD), get(_hop._PATH), get(_hop._REQ_START), reason)


def _bare(flow_id, method, path, started, reason: BaseException | str) -> dict:
    started = _seconds(started)
    path = path if isinstance(path, str) else repr(path)
    row = dict.fromkeys(HOP_COLUMNS)
    row.update(
        flow_id="unknown" if flow_id is None else str(flow_id),
        method=method,
        # No key here: a JWT in the path is replaced by a bare "[redacted]"; query and fragment are left out.
        path=_redact.scrub_jwts(None, path.partition("#")[0].partition("?")[0]),
        error=f"hoptrace could not read this flow: {reason!r}"[:500],
        error_kind="other",
        failed=1,
        started_at=started,
        ended_at=started,
        duration_ms=0.0,
    )
    return row


def _seconds(value: object) -> float:
    """A time that SQLite and every reader take: the value if it is a finite number, else now."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            return time.time()
        if math.isfinite(value):
            return value
    return time.time()


def _get(obj, name: str, default=None):
    try:
        return getattr(obj, name, default)
    except Exception:  # a property of a broken flow may raise anything
        return default


def _flow_id(snap) -> object:
    if isinstance(snap, dict):
        return snap.get("flow_id")
    return snap[_hop._FLOW_ID] if isinstance(snap, tuple) and snap else "?"


def snapshots(batch: list[tuple[str, object]]) -> tuple[list[tuple[str, tuple | dict]], int]:
    """(service, flow) pairs → (service, snapshot) items, and how many flows became bare rows."""
    items = [(service, read_flow(flow)) for service, flow in batch]
    return items, sum(isinstance(snap, dict) for _, snap in items)


def read_flow(flow) -> tuple | dict:
    """The flow's :func:`snapshot`, or, for a flow shape we did not foresee, its bare row (a dict): never raises."""
    try:
        return snapshot(flow)
    except Exception as exc:  # a flow that cannot be read must still become a row
        logger.warning("hoptrace: could not read flow %s (%r); recorded without details", _get(flow, "id", "?"), exc)
        return bare_row_of_flow(flow, exc)


# -- the choke point: what SQLite (and every reader) can take ------------------------


def clean_row(row: tuple) -> tuple:
    """Every value of a row as SQLite takes it: valid UTF-8 text, finite numbers, 64-bit integers."""
    return tuple(map(clean, row))


def clean(value: object) -> object:
    kind = type(value)
    if kind is str:
        return value if value.isascii() or _encodable(value) else escape_undecodable(value)
    if value is None or kind is float and math.isfinite(value):
        return value
    if kind is int:
        return value if _INT64_MIN <= value <= _INT64_MAX else None
    if kind is float:
        return None  # NaN, ±inf
    if kind is bool:
        return int(value)
    if isinstance(value, bytes | bytearray):
        return escape_undecodable(bytes(value).decode("utf-8", "surrogateescape"))
    for base in (int, float, str):  # subclasses (IntEnum, ...): their plain value
        if isinstance(value, base):
            return clean(base(value))
    return escape_undecodable(repr(value))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


__all__ = ["Built", "HopRows", "bare_row_of_flow", "build_rows", "clean", "clean_row", "read_flow", "snapshots"]
