"""The trace database: schema, opening for writing, opening untrusted files for reading.

One SQLite file holds any number of captures. Times are UNIX seconds (REAL) on
the proxy's clock; the one exception is ``hops.server_date``, the upstream's own
``Date`` header as it was sent, kept for clock-skew analysis.

``PRAGMA user_version`` holds :data:`SCHEMA_VERSION`; readers refuse a newer one.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from hoptrace._errors import TraceFileError

SCHEMA_VERSION = 1

# Column order here is the order the recorder inserts in; keep them in step.
SCHEMA = """
CREATE TABLE IF NOT EXISTS captures (
    id                INTEGER PRIMARY KEY,
    started_at        REAL NOT NULL,
    ended_at          REAL,
    routes            TEXT NOT NULL,   -- JSON: [{"name", "upstream", "listen_port"}]
    entry             TEXT,            -- route where client requests enter
    hoptrace_version  TEXT NOT NULL,
    mitmproxy_version TEXT NOT NULL,
    hops_seen         INTEGER NOT NULL DEFAULT 0,  -- requestheaders events
    hops_recorded     INTEGER NOT NULL DEFAULT 0,
    hops_dropped      INTEGER NOT NULL DEFAULT 0,
    addon_errors      INTEGER NOT NULL DEFAULT 0,
    write_errors      INTEGER NOT NULL DEFAULT 0,
    bodies_stored     INTEGER NOT NULL DEFAULT 0,
    source            TEXT             -- 'hoptrace proxy' | 'mitmdump -s'
);

CREATE TABLE IF NOT EXISTS hops (
    id                    INTEGER PRIMARY KEY,
    capture_id            INTEGER NOT NULL REFERENCES captures(id),
    flow_id               TEXT NOT NULL,
    service               TEXT NOT NULL,   -- route (listener) name the flow arrived on
    client_addr           TEXT,
    method                TEXT,
    scheme                TEXT,
    host                  TEXT,
    port                  INTEGER,
    path                  TEXT,            -- without the query string
    query                 TEXT,            -- redacted
    http_version          TEXT,
    status                INTEGER,         -- NULL when no response arrived
    reason                TEXT,
    error                 TEXT,            -- mitmproxy's error message, if any
    error_kind            TEXT,            -- refused | timeout | reset | truncated | aborted | shutdown | other
    failed                INTEGER NOT NULL,  -- 1 when error is set, whatever the status
    request_size          INTEGER,
    response_size         INTEGER,
    request_content_type  TEXT,
    response_content_type TEXT,
    started_at            REAL NOT NULL,   -- request headers received
    request_end_at        REAL,
    connect_at            REAL,            -- upstream connection started (NULL if reused)
    connected_at          REAL,            -- upstream TCP set up
    response_start_at     REAL,
    ended_at              REAL NOT NULL,   -- response end, or the error's time
    duration_ms           REAL NOT NULL,
    trace_id              TEXT,
    span_id               TEXT,
    parent_span_id        TEXT,
    trace_source          TEXT,            -- traceparent | b3 | x-b3 | x-request-id | x-correlation-id
    request_id            TEXT,
    correlation_id        TEXT,
    server_date           TEXT,            -- upstream Date header, as sent
    server_date_ts        REAL,            -- the same, parsed (whole seconds)
    request_headers       TEXT,            -- JSON [[name, value], ...], redacted
    response_headers      TEXT,
    request_body          TEXT,            -- only with hoptrace_store_bodies, redacted
    response_body         TEXT,
    client_conn_id        TEXT,            -- mitmproxy's client connection id
    stream_id             INTEGER          -- HTTP/2 stream id when known, else NULL
);
CREATE INDEX IF NOT EXISTS hops_capture_started ON hops (capture_id, started_at);
CREATE INDEX IF NOT EXISTS hops_trace ON hops (trace_id);

CREATE TABLE IF NOT EXISTS tokens (
    fingerprint   TEXT PRIMARY KEY,  -- keyed hash; the key never reaches the file
    capture_id    INTEGER NOT NULL REFERENCES captures(id),
    kind          TEXT NOT NULL,     -- jwt | jwe | opaque
    length        INTEGER NOT NULL,
    alg           TEXT,
    kid           TEXT,
    typ           TEXT,
    iss           TEXT,
    sub           TEXT,
    aud           TEXT,
    jti           TEXT,
    iat           REAL,
    nbf           REAL,
    exp           REAL,
    claims        TEXT,              -- JSON of the payload, no signature
    error         TEXT,              -- why decoding failed or a claim was dropped
    first_seen_at REAL NOT NULL,
    verdict       TEXT               -- signature against the JWKS served so far: valid | invalid | unknown_kid | unverifiable
);
CREATE INDEX IF NOT EXISTS tokens_sub ON tokens (sub);

CREATE TABLE IF NOT EXISTS hop_tokens (
    hop_id      INTEGER NOT NULL REFERENCES hops(id),
    fingerprint TEXT NOT NULL REFERENCES tokens(fingerprint),
    role        TEXT NOT NULL,       -- presented | validated | issued
    location    TEXT NOT NULL,       -- e.g. header:authorization, body:token, response-body:access_token
    PRIMARY KEY (hop_id, fingerprint, role, location)
);
CREATE INDEX IF NOT EXISTS hop_tokens_fingerprint ON hop_tokens (fingerprint);
"""

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


def open_for_writing(path: str | Path) -> sqlite3.Connection:
    """Open (creating if needed) a trace DB for the recorder: WAL, NORMAL sync, schema applied.

    WAL + synchronous=NORMAL keeps every committed batch through a process crash
    at ~15 µs a commit (FIELD_NOTES), and lets `hoptrace analyze` read while we write.
    """
    path = Path(path)
    try:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 5000")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        existing = _table_names(conn)
        if existing and not existing & set(TABLES):
            raise TraceFileError(f"{path}: not a hoptrace trace database (tables: {', '.join(sorted(existing))})")
        if version > SCHEMA_VERSION:
            raise TraceFileError(f"{path}: schema version {version} is newer than this hoptrace ({SCHEMA_VERSION}); upgrade hoptrace")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(SCHEMA)
        _add_new_columns(conn)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except sqlite3.DatabaseError as exc:
        raise TraceFileError(f"{path}: cannot open for writing: {exc}") from None
    return conn


def open_for_reading(path: str | Path, *, check: bool = True) -> sqlite3.Connection:
    """Open a trace DB read-only, treating it as untrusted (it may come from a bug report).

    Raises :class:`TraceFileError` for a missing file, a file that is not SQLite,
    a corrupt one, one without hoptrace's tables, or one of a newer schema.
    Works while the proxy is still writing (WAL readers do not block the writer).

    ``check=False`` leaves out :func:`check_structure`, a pass over every page of the
    file, for a caller that runs it itself alongside its reads and trusts nothing it
    read until it passed.
    """
    path = Path(path)
    if not path.exists():
        raise TraceFileError(f"{path}: no such file")
    if path.is_dir():
        raise TraceFileError(f"{path}: is a directory, not a trace database")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        conn.execute("PRAGMA trusted_schema = OFF")
        conn.execute("PRAGMA busy_timeout = 5000")
        if check:
            check_structure(conn, path)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        missing = set(TABLES) - _table_names(conn)
    except sqlite3.DatabaseError as exc:
        raise TraceFileError(f"{path}: not a readable SQLite database ({exc})") from None
    if version > SCHEMA_VERSION:
        conn.close()
        raise TraceFileError(f"{path}: schema version {version} is newer than this hoptrace ({SCHEMA_VERSION}); upgrade hoptrace")
    if missing:
        conn.close()
        raise TraceFileError(f"{path}: not a hoptrace trace database (missing tables: {', '.join(sorted(missing))})")
    return conn


def check_structure(conn: sqlite3.Connection, path: str | Path) -> None:
    """Raise :class:`TraceFileError` unless ``PRAGMA quick_check`` finds every b-tree of the file sound.

    SQLite reports most damage as an error when it meets it, but a broken b-tree can
    also read as rows missing or out of place; this rules that out. It reads every
    page: 1.3 s for a million hops.
    """
    try:
        problem = conn.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise TraceFileError(f"{path}: not a readable SQLite database ({exc})") from None
    if problem != "ok":
        raise TraceFileError(f"{path}: database is corrupt ({' '.join(str(problem).split())[:200]})")


def _add_new_columns(conn: sqlite3.Connection) -> None:
    """Columns added at the end of a table since its file was made: CREATE IF NOT EXISTS leaves
    an existing table as it was, and the recorder writes every column of the definition."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(tokens)")}
    if "verdict" not in have:
        conn.execute("ALTER TABLE tokens ADD COLUMN verdict TEXT")


def _table_names(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
