"""What was recorded about a hop, for the report's expandable hop rows.

:func:`hop_details` reads, for the few hops a report shows, the columns the analysis
does not load (redacted headers and query, the connection timestamps) and the decoded
tokens (header fields and claims, never a raw token or signature: the recorder stores
none) through the one read-only opener, :func:`hoptrace.db.open_for_reading`.
:func:`timings` splits a hop's time by its timestamps; :func:`curl_line` rebuilds a
redacted ``curl`` command. All pure but the read.
"""

from __future__ import annotations

import re
import shlex
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hoptrace._errors import TraceFileError
from hoptrace._format import as_float, clean
from hoptrace._stored import header_pairs, json_object

DETAIL_COLUMNS = (
    "id", "scheme", "host", "port", "path", "query", "http_version", "method", "status", "reason", "error",
    "started_at", "request_end_at", "connect_at", "connected_at", "response_start_at", "ended_at",
    "request_headers", "response_headers",
)  # fmt: skip
TOKEN_COLUMNS = ("fingerprint", "kind", "alg", "kid", "typ", "exp", "claims", "error")
# A JWT-shaped value (three base64url segments): never shown, even if a header kept one.
JWT = re.compile(r"\beyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*")
SECRET_HEADERS = re.compile(r"authorization|cookie|token|secret|key|password|session", re.I)
MAX_HEADERS = 60
CHUNK = 500  # hop ids per query: well under SQLite's bound-parameter limit


@dataclass
class HopDetail:
    """One hop as its detail panel shows it."""

    hop: dict[str, Any]  # DETAIL_COLUMNS
    request_headers: list[tuple[str, str]] = field(default_factory=list)
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    tokens: list[dict[str, Any]] = field(default_factory=list)  # TOKEN_COLUMNS + role, location, claims decoded


def hop_details(db: str | Path | None, hop_ids: list[int]) -> dict[int, HopDetail]:
    """The details of ``hop_ids`` read from ``db`` ({} without a readable DB: the report then shows less)."""
    if db is None or not hop_ids or not Path(db).is_file():
        return {}
    from hoptrace.db import open_for_reading

    try:
        conn = open_for_reading(db, check=False)  # the analysis already checked this file
    except TraceFileError:
        return {}
    conn.row_factory = sqlite3.Row
    try:
        out: dict[int, HopDetail] = {}
        ids = sorted({int(i) for i in hop_ids})
        for k in range(0, len(ids), CHUNK):
            _read_chunk(conn, ids[k : k + CHUNK], out)
        return out
    except sqlite3.Error:
        return {}
    finally:
        conn.close()


def _read_chunk(conn: sqlite3.Connection, ids: list[int], out: dict[int, HopDetail]) -> None:
    marks = ",".join("?" * len(ids))
    for row in conn.execute(f"SELECT {', '.join(DETAIL_COLUMNS)} FROM hops WHERE id IN ({marks})", ids):
        hop = dict(row)
        out[int(hop["id"])] = HopDetail(hop, _headers(hop.pop("request_headers")), _headers(hop.pop("response_headers")))
    columns = ", ".join(f"t.{c}" for c in TOKEN_COLUMNS)
    query = (f"SELECT h.hop_id, h.role, h.location, {columns} FROM hop_tokens h JOIN tokens t "
             f"ON t.fingerprint = h.fingerprint WHERE h.hop_id IN ({marks}) ORDER BY h.hop_id, h.role")  # fmt: skip
    for row in conn.execute(query, ids):
        token = dict(row)
        token["claims"] = json_object(token["claims"])
        if int(token["hop_id"]) in out:
            out[int(token["hop_id"])].tokens.append(token)


def _headers(text: Any) -> list[tuple[str, str]]:
    """``[[name, value], ...]`` JSON as pairs (anything else: none), values scrubbed of JWT shapes."""
    return [(clean(n, 100), scrub(v)) for n, v in header_pairs(text)[:MAX_HEADERS]]


def scrub(value: Any, limit: int = 300) -> str:
    """DB text for a detail panel: control characters replaced, any JWT-shaped value replaced."""
    return JWT.sub("[token]", clean(value, limit))


def timings(hop: dict[str, Any]) -> list[tuple[str, float | None]]:
    """(phase, ms) of a hop by the proxy's timestamps: connect (None on a reused connection),
    send (request received), wait (until the first response byte), receive (until the end)."""
    t = {k: as_float(hop.get(k)) for k in ("started_at", "request_end_at", "connect_at", "connected_at",
                                           "response_start_at", "ended_at")}  # fmt: skip

    def span(a: str | float | None, b: str) -> float | None:
        lo = t.get(a) if isinstance(a, str) else a
        hi = t[b]
        return None if lo is None or hi is None else max(hi - lo, 0.0) * 1000.0

    sent = t["request_end_at"] or t["started_at"]
    waited_from = max(x for x in (sent, t["connected_at"], t["started_at"]) if x is not None) if sent else None
    return [
        ("connect", span("connect_at", "connected_at")),
        ("send", span("started_at", "request_end_at")),
        ("wait", span(waited_from, "response_start_at")),
        ("receive", span("response_start_at", "ended_at")),
    ]


def curl_line(hop: dict[str, Any], headers: list[tuple[str, str]]) -> str:
    """A ``curl`` command repeating the hop, secrets replaced by shell variables to fill in."""
    host = clean(hop.get("host"), 200) or "HOST"
    port = hop.get("port")
    scheme = clean(hop.get("scheme"), 10) or "http"
    query = clean(hop.get("query"), 1000)
    url = f"{scheme}://{host}{'' if port in (None, '') else f':{port}'}{clean(hop.get('path'), 1000) or '/'}"
    parts = [shlex.quote(p) for p in ("curl", "-X", clean(hop.get("method"), 12) or "GET", url + (f"?{query}" if query else ""))]
    for name, value in headers:
        if name.lower() in ("host", "content-length"):
            continue
        if SECRET_HEADERS.search(name):  # to fill in by hand: "$VAR" expands in double quotes only
            safe = re.sub(r"[^\w-]", "_", name)
            var = "Bearer $TOKEN" if safe.lower() == "authorization" else "$" + safe.upper().replace("-", "_")
            parts += ["-H", f'"{safe}: {var}"']
        else:
            parts += ["-H", shlex.quote(f"{name}: {value}")]
    return " ".join(parts)
