"""Reading a trace DB into DataFrames: read-only, one consistent snapshot, fast at a million hops.

Python's sqlite3 makes one object per value, which costs more than everything the
analysis does with the value afterwards (pandas ``read_sql`` of 1M x 16 columns:
6.7 s). So each column comes out of SQLite as *one* string built inside SQLite:
numbers through ``group_concat`` (times as integer microseconds, exact) parsed by
``np.fromstring``, text through ``json_group_array`` parsed by ``json.loads``.
All aggregates of one query see the rows in the same order, so the columns align;
every query also returns the ids, so queries on other connections align too.

The token sightings and the hops, in id ranges of ``_CHUNK`` rows, are read by a
thread per core, each read on a read-only connection of its own (SQLite works with
the GIL released). They read the hops with ``id <=`` the largest id the first
connection saw: the recorder only appends, committing hops with their token
sightings, so that bound is one consistent snapshot even while the proxy writes.
After the reads a thread checks the file's structure (:func:`hoptrace.db.check_structure`)
while the main one puts together what they read; nothing leaves :func:`load` before
the check passed.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from hoptrace._errors import TraceFileError
from hoptrace.analyzer._traces import in_start_order
from hoptrace.db import HOP_COLUMNS, check_structure, open_for_reading

# Hop columns the analysis reads; `extra_columns` adds others (e.g. "reason", or "all").
CORE_HOP_COLUMNS = (
    "capture_id", "service", "method", "path", "status", "error", "error_kind", "failed",
    "started_at", "response_start_at", "ended_at", "trace_id", "span_id", "parent_span_id",
    "trace_source", "server_date_ts", "client_conn_id",
)  # fmt: skip
# Newer than some trace files: read only where the file has them.
_OPTIONAL_COLUMNS = ("client_conn_id",)
# Read only when some hop has a trace id (the hops_trace index answers that at once).
_TRACE_COLUMNS = ("trace_id", "span_id", "parent_span_id", "trace_source")
_HEAVY = ("request_headers", "response_headers", "request_body", "response_body")
_INT_COLUMNS = {"id", "capture_id", "port", "status", "failed", "request_size", "response_size"}
_TIME_COLUMNS = {"started_at", "request_end_at", "connect_at", "connected_at", "response_start_at", "ended_at"}
_REAL_COLUMNS = {"duration_ms"}
# Whole seconds (an HTTP Date): read without the multiplication and rounding of times.
_SECOND_COLUMNS = {"server_date_ts"}
# Set on few hops (errors): read for those hops only, not as one value per hop.
_SPARSE_COLUMNS = ("error", "error_kind")
# Few distinct values: Categorical, so that grouping and comparing them costs integer work.
# The path too: ids make it vary, but far less than once per hop, and the analysis works per distinct path.
_CATEGORICAL = {
    "service",
    "method",
    "path",
    "scheme",
    "http_version",
    "error_kind",
    "request_content_type",
    "response_content_type",
}
# NULL travels through group_concat as this value (group_concat would drop a NULL).
_NULL = -9223372036854775807
# Rows per aggregate query: keeps each concatenated string far below SQLite's 1 GB cap.
_CHUNK = 200_000


@dataclass
class Tables:
    """The four tables of a trace DB, as DataFrames, before any analysis."""

    captures: pd.DataFrame  # indexed by id
    hops: pd.DataFrame  # indexed by id, sorted by started_at
    tokens: pd.DataFrame  # indexed by fingerprint
    hop_tokens: pd.DataFrame  # hop_id, fingerprint, role, location
    notes: list[str] = field(default_factory=list)


def load(
    path: str | Path,
    *,
    since: float | None = None,
    until: float | None = None,
    extra_columns: tuple[str, ...] | str = (),
) -> Tables:
    """Read a trace DB, treating it as untrusted; works while the proxy is still writing.

    With ``since``/``until`` (UNIX seconds) only hops that may belong to a request
    started in that window are read: those overlapping it, up to the end of the last
    request that started in it. ``extra_columns`` names hop columns beyond
    :data:`CORE_HOP_COLUMNS`, or is ``"all"``. Raises :class:`TraceFileError`, and
    ``ValueError`` for an unknown column name.
    """
    columns = _hop_columns(extra_columns)
    try:
        conn = open_for_reading(path, check=False)  # _read checks the structure, alongside its reads
        try:
            _lenient(conn)
            conn.execute("BEGIN")  # captures, tokens and the id bound from one snapshot
            return _read(conn, Path(path), columns, since, until)
        except sqlite3.DatabaseError as exc:
            check_structure(conn, path)  # a corrupt file is the likely cause: then say that
            raise TraceFileError(f"{path}: cannot read the trace database ({exc})") from None
        finally:
            conn.close()
    except TraceFileError as exc:
        # A path, or an error SQLite reports, can span lines: keep one.
        raise TraceFileError(" ".join(str(exc).split())) from None


def _lenient(conn: sqlite3.Connection) -> None:
    # A hostile file may hold invalid UTF-8: decode it with replacement characters.
    conn.text_factory = lambda raw: raw.decode("utf-8", "replace")


def _hop_columns(extra: tuple[str, ...] | str) -> tuple[str, ...]:
    if extra == "all":
        extra = tuple(c for c in HOP_COLUMNS if c not in _HEAVY)
    unknown = [c for c in extra if c not in HOP_COLUMNS]
    if unknown:
        raise ValueError(f"unknown hop column {unknown[0]!r} (columns: {', '.join(HOP_COLUMNS)})")
    return tuple(dict.fromkeys((*CORE_HOP_COLUMNS, *(c for c in extra if c != "id"))))


def _read(conn, path: Path, columns: tuple[str, ...], since, until) -> Tables:
    captures = _read_captures(conn)
    tokens = _read_tokens(conn)
    last_id = conn.execute("SELECT max(id) FROM hops").fetchone()[0]
    where, params = _window(conn, since, until)
    traced = conn.execute("SELECT 1 FROM hops WHERE trace_id IS NOT NULL LIMIT 1").fetchone() is not None
    if not traced:
        columns = tuple(c for c in columns if c not in _TRACE_COLUMNS)
    present = {row[1] for row in conn.execute("PRAGMA table_info(hops)")}
    columns = tuple(c for c in columns if c in present or c not in _OPTIONAL_COLUMNS)
    # One capture in the whole table (the hops_capture_started index answers at once): no column to read.
    low, high = conn.execute("SELECT min(capture_id), max(capture_id) FROM hops").fetchone()
    single_capture = isinstance(low, int) and low == high
    hop_columns = tuple(c for c in columns if not (single_capture and c == "capture_id"))
    bounds = _chunk_bounds(conn, last_id) if last_id is not None else []
    # The longest read first, so that the chunks of hops even out the threads' ends.
    reads: list[Callable[[sqlite3.Connection], object]] = [partial(_read_hop_tokens, last_id=last_id)]
    if traced:
        entries = tuple(captures["entry"].dropna().unique())
        reads.append(partial(_read_root_traces, entries=entries, last_id=last_id, where=where, params=params))
    first_chunk = len(reads)
    reads += [partial(_read_hop_columns, columns=hop_columns, lo=lo, hi=hi, where=where, params=params) for lo, hi in bounds]
    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        running = [pool.submit(_run_read, path, read) for read in reads]
        with _checking(pool, path):
            parts = [future.result() for future in running]
            hops = _join_hops(hop_columns, parts[first_chunk:])
            if single_capture:
                hops["capture_id"] = np.full(len(hops), low, np.int64)
            hops = hops[list(dict.fromkeys((*columns, *_TRACE_COLUMNS)))]
            if traced:
                _add_root_traces(hops, parts[1])
            return _tables(captures, hops, tokens, parts[0])


@contextmanager
def _checking(pool: ThreadPoolExecutor, path: Path):
    """:func:`hoptrace.db.check_structure` queued after the reads already in ``pool``, and
    running while the body puts together what they read (at 1M hops: 1.5 s of CPU that
    would come first, on the core the reads leave idle once they end).

    Its verdict comes before the body's result or error, so what a corrupt file reads as is never seen.
    """
    checked = pool.submit(_run_read, path, partial(check_structure, path=path))
    try:
        yield
    finally:
        checked.result()  # TraceFileError for a corrupt file, in place of what the body returned or raised


def _tables(captures: pd.DataFrame, hops: pd.DataFrame, tokens: pd.DataFrame, hop_tokens: pd.DataFrame) -> Tables:
    """The tables as read, cleaned: hops without times dropped, durations and failures derived."""
    notes: list[str] = []
    bad = ~(np.isfinite(hops["started_at"]) & np.isfinite(hops["ended_at"]))
    if bad.any():
        notes.append(f"{int(bad.sum())} hops without a valid start or end time were ignored")
        hops = hops[~bad]
    backwards = hops["ended_at"] < hops["started_at"]
    if backwards.any():
        notes.append(f"{int(backwards.sum())} hops ending before they started were given zero duration")
        hops.loc[backwards, "ended_at"] = hops.loc[backwards, "started_at"]
    hops["duration_ms"] = (hops["ended_at"] - hops["started_at"]) * 1000.0
    # An error with a status (a 200 whose body broke off) is a failure all the same.
    hops["failed"] = ((hops["failed"] != 0) | hops["error"].notna()).astype("int64")
    hops = in_start_order(hops)

    hop_tokens = hop_tokens[hop_tokens["hop_id"].isin(hops.index)].reset_index(drop=True)
    unknown = ~hop_tokens["fingerprint"].isin(tokens.index)
    if unknown.any():
        # A sighting whose token row the file lacks: keep it, as a token with no claims.
        extra = pd.DataFrame(index=pd.Index(hop_tokens.loc[unknown, "fingerprint"].unique(), name="fingerprint"))
        extra["kind"] = "opaque"
        tokens = pd.concat([tokens, extra])
    return Tables(captures=captures, hops=hops, tokens=tokens, hop_tokens=hop_tokens, notes=notes)


def _window(conn, since, until) -> tuple[str, tuple]:
    if since is None and until is None:
        return "", ()
    lo = -1.7e308 if since is None else float(since)
    hi = 1.7e308 if until is None else float(until)
    # Every hop of a request that started in the window ends by the last such request's end.
    last_end = conn.execute("SELECT max(ended_at) FROM hops WHERE started_at >= ? AND started_at <= ?", (lo, hi)).fetchone()[0]
    if last_end is None:
        return " AND 0", ()
    return " AND ended_at >= ? AND started_at <= ?", (lo, float(last_end))


def _run_read(path: Path, read: Callable[[sqlite3.Connection], object]):
    """``read`` on a read-only connection of its own."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        conn.execute("PRAGMA trusted_schema = OFF")
        conn.execute("PRAGMA busy_timeout = 5000")
        _lenient(conn)
        return read(conn)
    finally:
        conn.close()


# Response headers that give a client request its trace id, best first.
_RESPONSE_RANK = {"traceresponse": 0, "x-request-id": 1, "x-correlation-id": 2}
# LIKE (case-insensitive, nothing parsed) keeps the JSON work to the hops whose headers name one:
# at 1M hops, half of them propagating traceparent, 1.7 s of the load.
_NAMES_A_RESPONSE_HEADER = " OR ".join(f"h.response_headers LIKE '%{name}%'" for name in _RESPONSE_RANK)


def _read_root_traces(conn, entries: tuple[str, ...], last_id: int, where: str, params: tuple) -> list[tuple]:
    """Trace ids that client requests got only in their response (W3C traceresponse, an echoed X-Request-ID).

    A client usually sends no trace context: the entry service starts the trace and
    says so in its answer. Without this, the entry hop would be the one hop of its
    request outside the trace. JSON is read by SQLite, for entry hops without a trace id.
    """
    if not entries:
        return []
    marks = ", ".join("?" * len(entries))
    # One row, one JSON string: a row per hop would take the GIL back for every row, and
    # wait for it each time behind the threads parsing the hop columns (1.2 s alone, 2.8 s among them).
    rows = conn.execute(
        "SELECT json_group_array(json_array(h.id, lower(json_extract(j.value, '$[0]')), json_extract(j.value, '$[1]')))"
        " FROM hops h, json_each(CASE WHEN json_valid(h.response_headers) THEN h.response_headers ELSE '[]' END) j"
        f" WHERE h.id <= ? AND h.trace_id IS NULL AND h.service IN ({marks}){where}"
        f" AND ({_NAMES_A_RESPONSE_HEADER})"
        " AND j.type = 'array' AND lower(json_extract(j.value, '$[0]')) IN ('traceresponse', 'x-request-id', 'x-correlation-id')",
        (last_id, *entries, *params),
    ).fetchone()[0]
    return [tuple(row) for row in json.loads(rows)]


_TRACERESPONSE = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}", re.IGNORECASE)


def _add_root_traces(hops: pd.DataFrame, rows: list[tuple]) -> None:
    """Set the trace id (and span id) of entry hops from what their responses said."""
    found: dict[int, tuple[str, str | None, str]] = {}
    # Worst source first, so that a hop's best one (traceresponse) is written last.
    for hop_id, name, value in sorted(rows, key=lambda row: _RESPONSE_RANK.get(row[1], 9), reverse=True):
        if not isinstance(value, str) or not value.strip():
            continue
        if name != "traceresponse":
            found[hop_id] = (value.strip()[:200], None, name)
        elif match := _TRACERESPONSE.match(value.strip()):
            found[hop_id] = (match[1].lower(), match[2].lower(), "traceresponse")
    if not found:
        return
    ids = pd.Index(list(found))
    ids = ids[ids.isin(hops.index)]
    values = [found[i] for i in ids]
    hops.loc[ids, "trace_id"] = [v[0] for v in values]
    hops.loc[ids, "span_id"] = [v[1] for v in values]
    if "trace_source" in hops:
        hops.loc[ids, "trace_source"] = [v[2] for v in values]


def _read_captures(conn) -> pd.DataFrame:
    cur = conn.execute("SELECT * FROM captures ORDER BY id")
    names = [d[0] for d in cur.description]
    frame = pd.DataFrame.from_records(cur.fetchall(), columns=names)
    for name in ("started_at", "ended_at"):
        frame[name] = pd.to_numeric(frame[name], errors="coerce").astype("float64")
    frame["id"] = pd.to_numeric(frame["id"], errors="coerce")
    frame["entry"] = frame["entry"].map(lambda v: v if isinstance(v, str) else None)
    return frame.dropna(subset=["id"]).astype({"id": "int64"}).set_index("id")


def _expr(column: str) -> str:
    # Anything but a number where a number belongs (text, a blob) reads as NULL.
    if column in _TIME_COLUMNS:
        # Whole microseconds: exact, and parsed without a Python object per value. Adding
        # 0.5 before the truncating CAST rounds (times are positive) without round()'s call.
        return _numeric(column, f"CAST({column} * 1e6 + 0.5 AS INTEGER)")
    if column in _REAL_COLUMNS:
        return _numeric(column, f"CAST({column} * 1e3 + 0.5 AS INTEGER)")
    if column in _INT_COLUMNS or column in _SECOND_COLUMNS:
        return _numeric(column, f"CAST({column} AS INTEGER)")
    # CAST: a BLOB where text belongs would make json_group_array fail.
    return f"json_group_array(CAST({column} AS TEXT))"


def _numeric(column: str, value: str) -> str:
    return f"group_concat(CASE typeof({column}) WHEN 'integer' THEN {value} WHEN 'real' THEN {value} ELSE {_NULL} END, ',')"


def _read_hop_columns(conn, columns: tuple[str, ...], lo: int, hi: int, where: str, params: tuple) -> dict | None:
    """The hops with ``lo < id <= hi``: per column, an int array (numbers) or a list (text); None if none."""
    sparse = [c for c in columns if c in _SPARSE_COLUMNS]
    names = ("id", *(c for c in columns if c not in sparse))
    exprs = [_expr(c) for c in names]
    if sparse:
        # The ids of the few hops that have a value: NULLs are left out of group_concat.
        exprs.append(f"group_concat(CASE WHEN {' OR '.join(f'{c} IS NOT NULL' for c in sparse)} THEN id END, ',')")
    select = f"SELECT {', '.join(exprs)} FROM hops NOT INDEXED WHERE id > ? AND id <= ?"
    row = conn.execute(select + where, (lo, hi, *params)).fetchone()
    if row[0] is None:
        return None
    out = {name: _ints(text) if _is_numeric(name) else json.loads(text) for name, text in zip(names, row)}
    if sparse:
        out.update(_sparse(conn, sparse, out["id"], row[-1]))
    return out


def _sparse(conn, columns: list[str], ids: np.ndarray, having: str | None) -> dict:
    """Columns set on few hops, by id: a lookup of those hops rather than a value per hop."""
    found = _ints(having) if having else np.zeros(0, np.int64)
    rows = conn.execute(
        f"SELECT id, {', '.join(f'CAST({c} AS TEXT)' for c in columns)} FROM hops WHERE id IN (SELECT value FROM json_each(?))",
        (json.dumps(found.tolist()),),
    ).fetchall()
    at = pd.Index(ids).get_indexer([row[0] for row in rows])
    out = {}
    for i, name in enumerate(columns, 1):
        values = np.full(len(ids), None, dtype=object)
        values[at] = [row[i] for row in rows]
        out[name] = values
    return out


def _join_hops(columns: tuple[str, ...], chunks: list[dict | None]) -> pd.DataFrame:
    """The hops DataFrame from the id ranges' columns (in id order)."""
    chunks = [chunk for chunk in chunks if chunk is not None]
    frame = pd.DataFrame({name: _column(name, [chunk[name] for chunk in chunks]) for name in ("id", *columns)})
    frame = frame.set_index("id")
    for name in _TRACE_COLUMNS:
        if name not in frame:
            frame[name] = pd.Series(np.nan, index=frame.index, dtype="str")
    return frame


def _chunk_bounds(conn, last_id: int) -> list[tuple[int, int]]:
    """Id ranges of about ``_CHUNK`` hops each: rowid range scans, no sort.

    ``last_id`` is the snapshot's largest id, so every hop of it counts: a bare
    ``count(*)`` SQLite answers from the smallest index (10 ms at 1M hops, where
    ``WHERE id <= ?`` walks the whole table: 0.3 s before any thread can start). The
    ranges cover every id whatever the count says; an index that disagrees with its
    table (a hostile file) only changes how many hops a range holds.
    """
    first = conn.execute("SELECT min(id) FROM hops").fetchone()[0]
    count = conn.execute("SELECT count(*) FROM hops").fetchone()[0]
    if count == 0:
        return []
    if last_id - first + 1 == count:  # the recorder's ids are dense: ranges by arithmetic
        return [(lo, min(lo + _CHUNK, last_id)) for lo in range(first - 1, last_id, _CHUNK)]
    bounds, lo = [], first - 1
    while lo < last_id:
        hi = conn.execute("SELECT id FROM hops WHERE id > ? ORDER BY id LIMIT 1 OFFSET ?", (lo, _CHUNK - 1)).fetchone()
        hi = last_id if hi is None else min(hi[0], last_id)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def _is_numeric(name: str) -> bool:
    return name in _INT_COLUMNS or name in _TIME_COLUMNS or name in _REAL_COLUMNS or name in _SECOND_COLUMNS


def _column(name: str, chunks: list) -> np.ndarray | pd.Series | pd.api.extensions.ExtensionArray:
    """One hop column from its parts as :func:`_read_hop_columns` parsed them."""
    if _is_numeric(name):
        values = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
        null = values == _NULL
        if name in ("id", "capture_id", "failed"):
            return np.where(null, -1 if name != "failed" else 0, values)
        if name in _INT_COLUMNS:
            array = pd.array(values, dtype="Int64")
            array[null] = pd.NA
            return array
        scale = 1e6 if name in _TIME_COLUMNS else 1e3 if name in _REAL_COLUMNS else 1.0
        return np.where(null, np.nan, values / scale)
    items = np.concatenate([np.asarray(chunk, dtype=object) for chunk in chunks]) if chunks else np.zeros(0, object)
    return _strings(items, categorical=name in _CATEGORICAL)


def _ints(text: str) -> np.ndarray:
    return np.fromstring(text, dtype=np.int64, sep=",")


def _strings(items: list, categorical: bool = False) -> pd.api.extensions.ExtensionArray:
    """A str array whose equal values share one object (1M copies of "gateway" are 50 MB),
    or a Categorical (categories sorted) for the columns with few distinct values."""
    codes, uniques = pd.factorize(np.asarray(items, dtype=object))
    if not categorical:
        return pd.array(uniques, dtype="str").take(codes, allow_fill=True)
    order = np.argsort(uniques.astype(str), kind="stable")
    rank = np.empty(len(order) + 1, np.int64)
    rank[order] = np.arange(len(order))
    rank[-1] = -1  # code -1 (NULL) stays -1
    return pd.Categorical.from_codes(rank[codes], pd.Index(uniques[order], dtype="str"))


def _read_hop_tokens(conn, last_id: int) -> pd.DataFrame:
    row = conn.execute(
        "SELECT group_concat(ifnull(CAST(hop_id AS INTEGER), ?), ','),"
        " json_group_array(CAST(fingerprint AS TEXT)), json_group_array(CAST(role AS TEXT)),"
        " json_group_array(CAST(location AS TEXT)) FROM hop_tokens WHERE hop_id <= ?",
        (_NULL, last_id),
    ).fetchone()
    return _read_hop_tokens_rows(row if row[0] is not None else [])


def _read_hop_tokens_rows(row) -> pd.DataFrame:
    names = ("hop_id", "fingerprint", "role", "location")
    if not row:
        return pd.DataFrame({n: pd.Series(dtype="int64" if n == "hop_id" else "str") for n in names})
    frame = pd.DataFrame({
        "hop_id": _ints(row[0]), **{n: _strings(json.loads(text), categorical=True) for n, text in zip(names[1:], row[1:])},
    })  # fmt: skip
    return frame[frame["fingerprint"].notna().to_numpy() & frame["role"].notna().to_numpy()]


def _read_tokens(conn) -> pd.DataFrame:
    cur = conn.execute("SELECT * FROM tokens")
    names = [d[0] for d in cur.description]
    frame = pd.DataFrame.from_records(cur.fetchall(), columns=names)
    for name in ("iat", "nbf", "exp", "first_seen_at"):
        frame[name] = pd.to_numeric(frame[name], errors="coerce").astype("float64")
    if "verdict" not in frame:  # a file from before signatures were checked
        frame["verdict"] = None
    for name in ("kind", "sub", "iss", "aud", "alg", "kid", "typ", "jti", "error", "verdict"):
        frame[name] = frame[name].map(lambda v: v if isinstance(v, str) else None).astype("str")
    frame = frame[frame["fingerprint"].map(lambda v: isinstance(v, str)).astype(bool)]
    return frame.drop_duplicates("fingerprint").set_index("fingerprint")
