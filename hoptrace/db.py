"""The trace database: its schema (defined and migrated with sqlite-utils), opening it to write, opening untrusted files to read.

One SQLite file holds any number of captures. Times are UNIX seconds (REAL) on
the proxy's clock; the one exception is ``hops.server_date``, the upstream's own
``Date`` header as it was sent, kept for clock-skew analysis.

``PRAGMA user_version`` holds :data:`SCHEMA_VERSION`. :func:`open_for_writing` (the
recorder) and :func:`open_for_saving` (``hoptrace analyze --save``) bring an older file up
to it, one step of :data:`MIGRATIONS` per version; readers accept every version up to it
and refuse a newer one.

The recorder writes :data:`TABLES`; ``hoptrace analyze --save`` writes
:data:`ANALYSIS_TABLES` (the findings and each hop's place in its request), which the
report and the web view reuse while the file has not changed since.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import sys
from contextlib import closing
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from hoptrace import _hop_columns as hop_columns
from hoptrace._errors import TraceFileError

if TYPE_CHECKING:
    import sqlite_utils

SCHEMA_VERSION = 5
ANALYSIS_SCHEMA = 3
"""The version that added the tables of a saved analysis: an older file has none."""

# Each table: {column: (type, description)} in column order. The descriptions are the
# schema's documentation: Datasette shows them (see `metadata`), the README lists them.
COLUMNS: dict[str, dict[str, tuple[type, str]]] = {
    "captures": {
        "id": (int, "capture number"),
        "started_at": (float, "when the proxy started recording"),
        "ended_at": (float, "when it stopped cleanly; NULL after a crash or SIGKILL, or while it still records"),
        "routes": (str, 'JSON: [{"name", "upstream", "listen_port"}]'),
        "entry": (str, "route where client requests enter"),
        "hoptrace_version": (str, "hoptrace that recorded it"),
        "mitmproxy_version": (str, "mitmproxy that recorded it"),
        "hops_seen": (int, "requestheaders events: every request the proxy saw"),
        "hops_recorded": (int, "rows written to hops"),
        "hops_dropped": (int, "hops the recorder could not write"),
        "addon_errors": (int, "flows recorded without their details because they could not be read"),
        "write_errors": (int, "failed writes"),
        "bodies_stored": (int, "1 when request and response bodies were stored (redacted)"),
        "source": (str, "what recorded it: 'hoptrace proxy' | 'mitmdump -s' (schema 2)"),
        "otlp_endpoint": (str, "--otlp-endpoint's traces URL, without user, password or query; NULL: not streamed (schema 4)"),
        "otlp_spans_sent": (int, "spans the OTLP receiver accepted; NULL with otlp_endpoint set: the count is unknown (schema 4)"),
        "otlp_spans_dropped": (int, "spans dropped (queue full, refused twice); NULL with otlp_endpoint set: the stream died (schema 4)"),
    },
    "hops": {
        "id": (int, "hop number, in the order the recorder wrote them"),
        "capture_id": (int, "the capture it belongs to"),
        "flow_id": (str, "mitmproxy's flow id"),
        "service": (str, "route (listener) name the flow arrived on"),
        "client_addr": (str, "caller's address"),
        "method": (str, "HTTP method"),
        "scheme": (str, "http or https"),
        "host": (str, "Host the caller asked for"),
        "port": (int, "port the caller asked for"),
        "path": (str, "request path, without the query string"),
        "query": (str, "query string, redacted"),
        "http_version": (str, "HTTP version"),
        "status": (int, "response status; NULL when no response arrived"),
        "reason": (str, "response reason phrase"),
        "error": (str, "mitmproxy's error message, if any"),
        "error_kind": (str, "refused | timeout | reset | truncated | aborted | shutdown | other"),
        "failed": (int, "1 when error is set, whatever the status"),
        "request_size": (int, "request body bytes"),
        "response_size": (int, "response body bytes"),
        "request_content_type": (str, "request Content-Type"),
        "response_content_type": (str, "response Content-Type"),
        "started_at": (float, "request headers received"),
        "request_end_at": (float, "request body received"),
        "connect_at": (float, "upstream connection started (NULL if reused)"),
        "connected_at": (float, "upstream TCP set up"),
        "response_start_at": (float, "response headers received"),
        "ended_at": (float, "response end, or the error's time"),
        "duration_ms": (float, "ended_at - started_at, in milliseconds"),
        "trace_id": (str, "propagated trace id, as sent"),
        "span_id": (str, "the caller's span id for this call"),
        "parent_span_id": (str, "the parent span id, when the header carries one"),
        "trace_source": (str, "traceparent | b3 | x-b3 | x-request-id | x-correlation-id"),
        "request_id": (str, "X-Request-ID"),
        "correlation_id": (str, "X-Correlation-ID"),
        "server_date": (str, "upstream Date header, as sent"),
        "server_date_ts": (float, "the same, parsed (whole seconds)"),
        "request_headers": (str, "JSON [[name, value], ...], redacted"),
        "response_headers": (str, "JSON [[name, value], ...], redacted"),
        "request_body": (str, "only with hoptrace_store_bodies, redacted"),
        "response_body": (str, "only with hoptrace_store_bodies, redacted"),
        "client_conn_id": (str, "mitmproxy's client connection id (schema 2)"),
        "stream_id": (int, "HTTP/2 stream id when known, else NULL (schema 2)"),
    },
    "tokens": {
        "fingerprint": (str, "keyed hash of the token; the key never reaches the file"),
        "capture_id": (int, "the capture that first saw it"),
        "kind": (str, "jwt | jwe | opaque"),
        "length": (int, "characters in the token"),
        "alg": (str, "JWT header alg"),
        "kid": (str, "JWT header kid"),
        "typ": (str, "JWT header typ"),
        "iss": (str, "issuer claim"),
        "sub": (str, "subject claim"),
        "aud": (str, "audience claim (JSON when a list)"),
        "jti": (str, "token id claim"),
        "iat": (float, "issued at (UNIX seconds, the issuer's clock)"),
        "nbf": (float, "not before"),
        "exp": (float, "expires at"),
        "claims": (str, "JSON of the payload, no signature"),
        "error": (str, "why decoding failed or a claim was dropped"),
        "first_seen_at": (float, "when the proxy first saw it"),
        "verdict": (str, "its signature against the key sets (JWKS) the capture served so far: valid | invalid | unknown_kid | unverifiable (schema 2)"),
    },
    "hop_tokens": {
        "hop_id": (int, "the hop"),
        "fingerprint": (str, "the token"),
        "role": (str, "presented | validated | issued"),
        "location": (str, "e.g. header:authorization, body:token, response-body:access_token"),
    },
}

# Schema 3: the tables of the analysis saved by `hoptrace analyze --save` (hoptrace/analyzer/_saved.py), in the same
# form. Apart from COLUMNS, whose tables every trace file has and every reader of the recording reads.
ANALYSIS_COLUMNS: dict[str, dict[str, tuple[type, str]]] = {
    "analysis": {
        "id": (int, "always 1: the file holds one saved analysis, replaced whole by the next --save"),
        "format": (int, "version of these analysis tables' layout"),
        "hoptrace_version": (str, "hoptrace that made the analysis"),
        "kinds": (str, "the finding kinds its detectors looked for, comma-separated"),
        "config": (str, "JSON: the analyzer options that change findings (thresholds, --audience, ...)"),
        "saved_at": (float, "when it was saved (UNIX seconds)"),
        "hops": (int, "hops in the file it is current for: rows of hops with id <= max_hop_id when saved"),
        "max_hop_id": (int, "the largest hop id it analysed; a hop recorded after it makes the analysis stale"),
        "captures": (int, "captures in the file when saved"),
        "captures_open": (int, "of them, captures without ended_at (still recording, or crashed) when saved"),
        "findings": (int, "rows of findings"),
    },
    "analysis_hops": {
        "hop_id": (int, "the hop"),
        "request": (int, "id of the hop where its request entered (the root of its tree)"),
        "parent_id": (int, "the hop that made this call; NULL for a request, or an orphan"),
        "link": (str, "how the parent was found: root | header | token | connection | nesting | ambiguous | orphan"),
        "link_confidence": (float, "how sure the link is, 0-1"),
        "link_candidates": (int, "unrelated hops the parent was chosen among (1 when sure)"),
        "depth": (int, "calls between the request and this hop (request 0)"),
    },
    "findings": {
        "id": (int, "finding number: errors first, then by time"),
        "kind": (str, "expired_mid_flow, duplicate_validation, clock_skew, ... (README: Findings)"),
        "severity": (str, "error | warning | info"),
        "request": (int, "id of the request (root hop) it is about; NULL for a finding about a whole service"),
        "service": (str, "the service it is about"),
        "caller": (str, "the service that made the call ('client' for a request)"),
        "callee": (str, "the service the call arrived at"),
        "endpoint": (str, "method and templated path"),
        "message": (str, "one line naming the actor, with the numbers"),
        "evidence": (str, "JSON: the kind-specific details (unknown numbers as null)"),
        "at": (float, "when it happened (UNIX seconds)"),
    },
    "finding_hops": {
        "finding_id": (int, "the finding"),
        "position": (int, "order of the hop in the finding's evidence (0 first)"),
        "hop_id": (int, "a hop the finding involves"),
    },
}

TABLE_DOCS = {
    "captures": "One row per run of the proxy, with its counters.",
    "hops": "One row per HTTP exchange the proxy relayed (a flow).",
    "tokens": "One row per distinct token: decoded claims, never the token or its signature.",
    "hop_tokens": "Which token each hop presented, had validated, or was issued.",
    "analysis": "What the saved analysis (hoptrace analyze --save) is current for: hop bound, captures, options, versions.",
    "analysis_hops": "Each hop's request, parent and how the link was made, as the saved analysis rebuilt them.",
    "findings": "The saved analysis's findings, errors first.",
    "finding_hops": "The hops each saved finding involves, in its order.",
}

# How each table is created: sqlite-utils' `Table.create` arguments besides the columns.
_CREATE: dict[str, dict] = {
    "captures": {
        "pk": "id",
        "not_null": ["started_at", "routes", "hoptrace_version", "mitmproxy_version",
                     "hops_seen", "hops_recorded", "hops_dropped", "addon_errors", "write_errors", "bodies_stored"],
        "defaults": dict.fromkeys(
            ("hops_seen", "hops_recorded", "hops_dropped", "addon_errors", "write_errors", "bodies_stored"), 0
        ),
    },
    "hops": {
        "pk": "id",
        "not_null": ["capture_id", "flow_id", "service", "failed", "started_at", "ended_at", "duration_ms"],
        "foreign_keys": [("capture_id", "captures", "id")],
    },
    "tokens": {
        "pk": "fingerprint",
        "not_null": ["capture_id", "kind", "length", "first_seen_at"],
        "foreign_keys": [("capture_id", "captures", "id")],
    },
    "hop_tokens": {
        "pk": ("hop_id", "fingerprint", "role", "location"),
        "not_null": ["hop_id", "fingerprint", "role", "location"],
        "foreign_keys": [("hop_id", "hops", "id"), ("fingerprint", "tokens", "fingerprint")],
    },
    "analysis": {
        "pk": "id",
        "not_null": ["format", "hoptrace_version", "kinds", "config", "saved_at", "hops", "captures", "captures_open",
                     "findings"],
    },
    "analysis_hops": {
        "pk": "hop_id",
        "not_null": ["request", "link", "link_confidence", "link_candidates", "depth"],
        "foreign_keys": [("hop_id", "hops", "id"), ("request", "hops", "id"), ("parent_id", "hops", "id")],
    },
    "findings": {
        "pk": "id",
        "not_null": ["kind", "severity", "message", "evidence"],
        "foreign_keys": [("request", "hops", "id")],
    },
    "finding_hops": {
        "pk": ("finding_id", "position"),
        "not_null": ["hop_id"],
        "foreign_keys": [("finding_id", "findings", "id"), ("hop_id", "hops", "id")],
    },
}  # fmt: skip

_INDEXES = (
    ("hops", ("capture_id", "started_at"), "hops_capture_started"),
    ("hops", ("trace_id",), "hops_trace"),
    ("tokens", ("sub",), "tokens_sub"),
    ("hop_tokens", ("fingerprint",), "hop_tokens_fingerprint"),
    ("analysis_hops", ("request",), "analysis_hops_request"),
    ("finding_hops", ("hop_id",), "finding_hops_hop"),
)


def _iso(column: str) -> str:
    # strftime gives NULL for a value it cannot read as a time: no error in a view.
    return f"strftime('%Y-%m-%dT%H:%M:%fZ', {column}, 'unixepoch')"


# Views for people reading the file with sqlite3, Datasette or sqlite-utils; hoptrace reads the tables.
VIEWS = {
    "hops_readable": f"""SELECT h.id, h.capture_id, h.service, h.method, h.path, h.status, h.error_kind, h.failed,
  {_iso('h.started_at')} AS started, {_iso('h.ended_at')} AS ended, h.duration_ms,
  h.trace_id, h.span_id, h.client_conn_id, h.stream_id,
  t.fingerprint AS token_fingerprint, t.sub AS token_sub, {_iso('t.exp')} AS token_exp,
  round(t.exp - h.started_at, 3) AS token_remaining_s,
  a.request, a.parent_id, a.link, a.link_confidence, a.depth
FROM hops h
LEFT JOIN tokens t ON t.fingerprint = (
  SELECT ht.fingerprint FROM hop_tokens ht
  WHERE ht.hop_id = h.id AND ht.role IN ('presented', 'validated')
  ORDER BY ht.role = 'validated' DESC, ht.location = 'header:authorization' DESC, ht.location, ht.fingerprint LIMIT 1
)
LEFT JOIN analysis_hops a ON a.hop_id = h.id""",
    "tokens_readable": f"""SELECT fingerprint, capture_id, kind, alg, iss, sub, aud,
  {_iso('iat')} AS iat, {_iso('nbf')} AS nbf, {_iso('exp')} AS exp, round(exp - iat, 3) AS lifetime_s,
  {_iso('first_seen_at')} AS first_seen, error
FROM tokens""",
    "findings_readable": f"""SELECT f.id, f.kind, f.severity, f.request, f.service, f.caller, f.callee, f.endpoint, f.message,
  {_iso('f.at')} AS at, f.evidence,
  (SELECT json_group_array(fh.hop_id) FROM (SELECT hop_id FROM finding_hops WHERE finding_id = f.id ORDER BY position) fh) AS hop_ids
FROM findings f""",
    "finding_hops_readable": f"""SELECT fh.finding_id, f.kind, f.severity, fh.position, fh.hop_id, h.service, h.method, h.path, h.status,
  {_iso('h.started_at')} AS started, h.duration_ms, a.request, a.parent_id, a.link
FROM finding_hops fh
JOIN findings f ON f.id = fh.finding_id
LEFT JOIN hops h ON h.id = fh.hop_id
LEFT JOIN analysis_hops a ON a.hop_id = fh.hop_id""",
    # `current`: no hop was recorded, and no capture started or ended, since the analysis was saved.
    "analysis_readable": f"""SELECT a.hoptrace_version, {_iso('a.saved_at')} AS saved, a.hops, a.max_hop_id,
  a.captures, a.captures_open, a.findings, a.config,
  (a.hops = (SELECT count(*) FROM hops) AND a.max_hop_id IS (SELECT max(id) FROM hops)
   AND a.captures = (SELECT count(*) FROM captures)
   AND a.captures_open = (SELECT count(*) FROM captures WHERE ended_at IS NULL)) AS current
FROM analysis a""",
}
VIEW_DOCS = {
    "hops_readable": "Hops with ISO-8601 UTC times, the token each carried as the analysis picks it (the one it had"
    " validated, else its Authorization header's, else any presented): its subject, expiry, and life left at the hop;"
    " once an analysis is saved, their request, parent and link.",
    "tokens_readable": "Tokens with ISO-8601 UTC iat, nbf, exp and their lifetime.",
    "findings_readable": "The saved findings with an ISO-8601 UTC time and the ids of their hops (a JSON array).",
    "finding_hops_readable": "One row per hop of each saved finding: the hop's service, endpoint, status, time and link.",
    "analysis_readable": "The saved analysis: when, for how many hops, with which options, and whether it is still current.",
}

# Column order is the order the recorder inserts in; COLUMNS keeps them in step (a test checks).
HOP_COLUMNS = (
    "id", "capture_id", "flow_id", "service", "client_addr", "method", "scheme",
    "host", "port", "path", "query", "http_version", "status", "reason", "error",
    "error_kind", "failed", "request_size", "response_size", "request_content_type",
    "response_content_type", "started_at", "request_end_at", "connect_at",
    "connected_at", "response_start_at", "ended_at", "duration_ms", "trace_id",
    "span_id", "parent_span_id", "trace_source", "request_id", "correlation_id",
    "server_date", "server_date_ts", "request_headers", "response_headers",
    "request_body", "response_body", "client_conn_id", "stream_id",
)  # fmt: skip

TOKEN_COLUMNS = (
    "fingerprint", "capture_id", "kind", "length", "alg", "kid", "typ", "iss",
    "sub", "aud", "jti", "iat", "nbf", "exp", "claims", "error", "first_seen_at",
    "verdict",
)  # fmt: skip

HOP_TOKEN_COLUMNS = ("hop_id", "fingerprint", "role", "location")

TABLES = ("captures", "hops", "tokens", "hop_tokens")
"""The tables the recorder writes: a file without them is not a trace DB."""
ANALYSIS_TABLES = ("analysis", "analysis_hops", "findings", "finding_hops")
"""Schema 3: the tables ``hoptrace analyze --save`` writes (empty until it runs; absent from older files)."""


# What SQLite raises for a damaged or hostile file. Python decodes SQLite's error messages as
# UTF-8, so a message quoting damaged schema text raises UnicodeDecodeError in its place.
SQLITE_ERRORS = (sqlite3.DatabaseError, UnicodeDecodeError)


def _columns(table: str) -> dict[str, tuple[type, str]]:
    return COLUMNS[table] if table in COLUMNS else ANALYSIS_COLUMNS[table]


def _create_tables(db: sqlite_utils.Database) -> None:
    """The current schema, in one step: what a new file gets."""
    for name in (*TABLES, *ANALYSIS_TABLES):
        columns = {column: kind for column, (kind, _) in _columns(name).items()}
        db[name].create(columns, **_CREATE[name], if_not_exists=True)
    for table, columns, index_name in _INDEXES:
        db[table].create_index(columns, index_name=index_name, if_not_exists=True)
    _create_hop_columns(db)


def _create_hop_columns(db: sqlite_utils.Database) -> None:
    """The batches' Arrow columns (:mod:`hoptrace._hop_columns`), and the triggers that drop a batch's once its rows change."""
    hop_columns.create(db.execute)


def _create_views(db: sqlite_utils.Database) -> None:
    for name, sql in VIEWS.items():
        db.create_view(name, sql, replace=True)


# The nullable columns each schema version added at the end of its tables (an older file lacks
# them; readers take them as NULL).
_ADDED_IN = {
    2: {"hops": ("client_conn_id", "stream_id"), "captures": ("source",), "tokens": ("verdict",)},
    4: {"captures": ("otlp_endpoint", "otlp_spans_sent", "otlp_spans_dropped")},
}
# Every column a version after 1 added, per table, in the order they were added.
ADDED_COLUMNS = {
    table: tuple(column for added in _ADDED_IN.values() for column in added.get(table, ()))
    for table in dict.fromkeys(table for added in _ADDED_IN.values() for table in added)
}


def _add_columns(db: sqlite_utils.Database, version: int) -> None:
    """The columns schema ``version`` added: nullable, at the end of their tables, so ALTER TABLE ADD COLUMN, no copy of the rows."""
    for table, columns in _ADDED_IN[version].items():
        for column in columns:  # a table the file lacks is made whole by _create_tables
            if db[table].exists() and column not in db[table].columns_dict:
                db[table].add_column(column, COLUMNS[table][column][0])


def _v1_to_v2(db: sqlite_utils.Database) -> None:
    """Schema 2: which client connection (and HTTP/2 stream) a hop came on; what recorded a capture; a token's signature verdict."""
    _add_columns(db, 2)


def _v2_to_v3(db: sqlite_utils.Database) -> None:
    """Schema 3: the tables of a saved analysis (``hoptrace analyze --save``), empty; new tables, no row copied.

    The views that read them (``hops_readable`` gains the request, parent and link) are made again after the steps.
    """
    for name in ANALYSIS_TABLES:
        columns = {column: kind for column, (kind, _) in ANALYSIS_COLUMNS[name].items()}
        db[name].create(columns, **_CREATE[name], if_not_exists=True)


def _v3_to_v4(db: sqlite_utils.Database) -> None:
    """Schema 4: what ``hoptrace proxy --otlp-endpoint`` streamed: the receiver, spans sent and dropped, on the capture row."""
    _add_columns(db, 4)


def _v4_to_v5(db: sqlite_utils.Database) -> None:
    """Schema 5: each batch's analysis columns in Arrow (``hop_columns``), written from then on; the hops written before are read as rows."""
    _create_hop_columns(db)


# MIGRATIONS[v - 1] takes a file from version v to v + 1. A step that reorders, retypes or
# drops columns uses Table.transform (a copy of the table in the same transaction).
MIGRATIONS = (_v1_to_v2, _v2_to_v3, _v3_to_v4, _v4_to_v5)


@cache
def _schema_sql() -> str:
    with closing(sqlite3.connect(":memory:", isolation_level=None)) as conn:
        migrate(conn, 0)
        rows = conn.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY type = 'view', rowid").fetchall()
    return "".join(f"{sql};\n" for (sql,) in rows)


@cache
def empty_file() -> bytes:
    """The bytes of an empty trace DB of the current schema, for a file to fill at once: writing them
    takes about a millisecond, where running the schema's DDL on a new file costs ~40 ms (each
    statement its own transaction, each synced)."""
    with closing(sqlite3.connect(":memory:", isolation_level=None)) as conn:
        conn.executescript(_schema_sql())
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return conn.serialize()


def __getattr__(name: str) -> str:
    # SCHEMA, the DDL of the current schema as SQLite stores it: for test fixtures and benchmarks
    # that build a file with ``executescript`` (then set ``PRAGMA user_version``). Made on first
    # use: sqlite-utils imports pandas (0.3 s, 40 MB), which the recorder's row process never needs.
    if name == "SCHEMA":
        return _schema_sql()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_for_writing(path: str | Path) -> sqlite3.Connection:
    """Open (creating if needed) a trace DB for the recorder: WAL, NORMAL sync, schema current.

    A new file gets the current schema; an older one is migrated in one transaction.
    WAL + synchronous=NORMAL keeps every committed batch through a process crash at
    ~15 µs a commit (against ~690 µs with the rollback journal), and lets
    `hoptrace analyze` read while the recorder writes.
    """
    path = Path(path)
    try:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 5000")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        existing = _table_names(conn)
        if existing and not existing & set(TABLES):
            raise TraceFileError(f"{path}: not a hoptrace trace database (tables: {', '.join(sorted(existing))})")
        _refuse_newer(path, version)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        if version < SCHEMA_VERSION or not set(TABLES) <= existing:
            migrate(conn, max(version, 1) if existing else 0)
        hop_columns.ensure_triggers(conn)  # a client's rebuild of a table drops them
    except SQLITE_ERRORS as exc:
        raise TraceFileError(f"{path}: cannot open for writing: {_reason(exc)}") from None
    return conn


def open_for_saving(path: str | Path, doing: str = "save the analysis") -> sqlite3.Connection:
    """Open an existing trace DB to write a saved analysis into it (or, ``doing`` says what, a closed capture's
    late counts), upgrading an older schema in one transaction.

    Unlike :func:`open_for_writing` it leaves the journal mode as it is (a finished capture stays one
    self-contained file) and creates nothing: a missing file, a file this user cannot write, one in a
    folder where SQLite cannot create its journal, or one that is not a trace DB raise
    :class:`TraceFileError` in one line.
    """
    path = _existing_file(path)
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, isolation_level=None)
    except SQLITE_ERRORS as exc:
        raise TraceFileError(f"{path}: cannot open for writing: {_reason(exc)}") from None
    try:
        conn.execute("PRAGMA busy_timeout = 5000")  # the recorder's batches hold the write lock for milliseconds
        if conn.execute("PRAGMA query_only").fetchone()[0] or not os.access(path, os.W_OK):
            raise TraceFileError(f"{path}: cannot {doing}: the file is read-only for this user")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        _refuse_newer(path, version)
        missing = set(TABLES) - _table_names(conn)
        if missing:
            raise TraceFileError(f"{path}: not a hoptrace trace database (missing tables: {', '.join(sorted(missing))})")
        if version < SCHEMA_VERSION or not set(ANALYSIS_TABLES) <= _table_names(conn):
            migrate(conn, max(version, 1))
    except SQLITE_ERRORS as exc:
        conn.close()
        raise TraceFileError(f"{path}: cannot {doing}: {_reason(exc)}") from None
    except TraceFileError:
        conn.close()
        raise
    return conn


def migrate(conn: sqlite3.Connection, version: int) -> None:
    """Bring a file at schema ``version`` (0: empty) to :data:`SCHEMA_VERSION`, in one transaction."""
    import sqlite_utils  # here, not at the top: it imports pandas (see SCHEMA)

    db = sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)
    with db.atomic():
        for name in VIEWS:  # a view naming a table would stop a step from rebuilding it; made again below
            db.execute(f"DROP VIEW IF EXISTS {name}")
        for step in MIGRATIONS[max(version, 1) - 1 :] if version else ():
            step(db)
        _create_tables(db)  # a new file; and a table an older one lacks
        _create_views(db)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


class ReadConnection(sqlite3.Connection):
    """A read-only connection that knows the URI it was opened with, so that other threads can open their own alike."""

    uri: str


def ids_are_rowids(table_info: list[tuple]) -> bool:
    """Whether a table's ``id`` is its rowid, from its ``PRAGMA table_info`` rows: a single-column INTEGER
    PRIMARY KEY, whose every value is a unique whole number. A hostile or damaged file may lack the key,
    and then hold ids of any type, repeated."""
    keys = [row for row in table_info if row[5]]  # (cid, name, type, notnull, default, pk)
    return len(keys) == 1 and keys[0][1] == "id" and str(keys[0][2]).upper() == "INTEGER"


def open_for_reading(path: str | Path, *, check: bool = True) -> ReadConnection:
    """Open a trace DB read-only, treating it as untrusted (it may come from a bug report).

    Raises :class:`TraceFileError` for a missing file, a file that is not SQLite,
    a corrupt one, one without hoptrace's tables, or one of a newer schema.
    Works while the proxy is still writing (WAL readers do not block the writer), and on a
    read-only copy in a folder the reader cannot write (see :func:`reading_uri`).

    ``check=False`` leaves out :func:`check_structure`, a pass over every page of the
    file, for a caller that runs it itself alongside its reads and trusts nothing it
    read until it passed.
    """
    path = _existing_file(path)
    try:
        conn = connect_read_only(reading_uri(path))
        if check:
            check_structure(conn, path)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        missing = set(TABLES) - _table_names(conn)
    except SQLITE_ERRORS as exc:
        raise TraceFileError(f"{path}: not a readable SQLite database ({_reason(exc)})") from None
    if version > SCHEMA_VERSION or missing:
        conn.close()
    _refuse_newer(path, version)
    if missing:
        raise TraceFileError(f"{path}: not a hoptrace trace database (missing tables: {', '.join(sorted(missing))})")
    return conn


def _existing_file(path: str | Path) -> Path:
    """``path`` when it names a file this user can reach, else :class:`TraceFileError` saying why."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise TraceFileError(f"{path}: no such file") from None
    except OSError as exc:  # a folder on the way this user may not enter (EACCES), a name too long, a loop
        raise TraceFileError(f"{path}: cannot reach the file: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise TraceFileError(f"{path}: is a directory, not a trace database")
    if not stat.S_ISREG(mode):  # a fifo would block the open forever; a device is no database
        raise TraceFileError(f"{path}: not a regular file (a fifo, device or socket), not a trace database")
    return path


def connect_read_only(uri: str) -> ReadConnection:
    """A connection for untrusted data: read-only, no schema-defined code trusted, invalid UTF-8 decoded with U+FFFD."""
    conn = sqlite3.connect(uri, uri=True, factory=ReadConnection, check_same_thread=False)
    conn.uri = uri
    # trusted_schema=OFF: views and triggers of a hostile file cannot call functions with side effects.
    conn.execute("PRAGMA trusted_schema = OFF")
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.text_factory = lambda raw: raw.decode("utf-8", "replace")
    return conn


def reading_uri(path: Path) -> str:
    """The URI that opens ``path`` read-only without needing write access anywhere.

    SQLite facts this relies on: a database in WAL mode (byte 18 of its header is 2) is read
    through its ``-shm`` index; a read-only connection uses an existing ``-shm`` or creates
    one, which needs write access to the folder, and fails otherwise ("attempt to write a
    readonly database", "unable to open database file"). ``immutable=1`` reads the main
    file alone, with no ``-shm`` and no locks, ignoring any ``-wal``: right when no ``-wal``
    holds frames (every commit is in the main file: a closed capture), wrong otherwise (the
    commits in the ``-wal`` would be missed), and then the file cannot be read in place.
    """
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        probe = sqlite3.connect(uri, uri=True)
        try:
            probe.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return uri
        finally:
            probe.close()
    except sqlite3.OperationalError:
        if not _is_wal(path):
            raise
    wal = Path(f"{path}-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise TraceFileError(
            f"{path}: in WAL mode with commits still in {wal.name}, and this folder cannot be written"
            " (SQLite needs a -shm file beside it); copy both files to a folder you can write, or open"
            " it once where it was recorded"
        )
    return f"{uri}&immutable=1"


def _is_wal(path: Path) -> bool:
    try:
        with path.open("rb") as file:
            header = file.read(20)
    except OSError:
        return False
    return header.startswith(b"SQLite format 3\x00") and header[18:20] == b"\x02\x02"


def check_structure(conn: sqlite3.Connection, path: str | Path) -> None:
    """Raise :class:`TraceFileError` unless ``PRAGMA quick_check`` finds every b-tree of the file sound.

    SQLite reports most damage as an error when it meets it, but a broken b-tree can
    also read as rows missing or out of place; this rules that out. It reads every
    page: 1.3 s for a million hops.
    """
    try:
        problem = conn.execute("PRAGMA quick_check").fetchone()[0]
    except SQLITE_ERRORS as exc:
        raise TraceFileError(f"{path}: not a readable SQLite database ({_reason(exc)})") from None
    if problem != "ok":
        raise TraceFileError(f"{path}: database is corrupt ({' '.join(str(problem).split())[:200]})")


def _reason(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "its schema is damaged: SQLite's message about it is not even text"
    return str(exc)


def _refuse_newer(path: Path, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise TraceFileError(f"{path}: schema version {version} is newer than this hoptrace ({SCHEMA_VERSION}); upgrade hoptrace")


def table_columns(conn: sqlite3.Connection, table: str, schema: str = "main") -> list[str]:
    """The columns ``schema.table`` has, in order (none when it has no such table): a file of an
    older schema, or a hostile one, may lack any. Rows as tuples, whatever the connection's factory."""
    cursor = conn.cursor()
    cursor.row_factory = None
    return [row[1] for row in cursor.execute(f"PRAGMA {schema}.table_info({table})")]


def shared_columns(conn: sqlite3.Connection, table: str, attached: str) -> list[str]:
    """The columns of ``table`` that this file and the ``attached`` one both have, in this one's order:
    what a copy from one into the other can name."""
    theirs = set(table_columns(conn, table, attached))
    return [name for name in table_columns(conn, table) if name in theirs]


def _table_names(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def metadata(database: str = "traces") -> dict:
    """Datasette metadata for a trace file named ``database`` (its file name without .db):
    a description of every table, view and column."""
    tables = {
        name: {"description": TABLE_DOCS[name], "columns": {c: doc for c, (_, doc) in _columns(name).items()}}
        for name in (*TABLES, *ANALYSIS_TABLES)
    }
    tables[hop_columns.TABLE] = {"description": hop_columns.DESCRIPTION, "columns": hop_columns.COLUMN_DOCS}
    tables.update({name: {"description": VIEW_DOCS[name]} for name in VIEWS})
    return {"databases": {database: {"tables": tables}}}


if __name__ == "__main__":  # python -m hoptrace.db [DATABASE_NAME] > metadata.json
    print(json.dumps(metadata(*sys.argv[1:2]), indent=2))
