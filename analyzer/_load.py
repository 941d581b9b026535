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
the check passed, unless the caller takes the verdict on itself (``checks``: then nothing
leaves the caller's block before it).

From :data:`ARROW_MIN_HOPS` hops on, the hop columns and the token sightings are read
instead by a child process through Arrow's ADBC driver (:mod:`hoptrace.analyzer._arrow_child`:
why a child, and what it costs), one query per id range with the same SQL per value
(:func:`_value`), so that both ways give equal frames; each id range is made into its frame
columns as it arrives, while the child reads the next ones (at 1M hops: four loads of each
version alternating, medians 4.55 → 3.84 s). When the child cannot read the file, the reads
above take over.

Before any of that, the hops the recorder's row process wrote come from the Arrow columns it stored
with each batch (:mod:`hoptrace._hop_columns`): decoded, then made into the same parts as a read
gives (:func:`_batch_parts`, :func:`_stored_value`), so that every way gives equal frames. Only the
hops no batch covers are read as rows (at 1M hops: load 4.4-5.5 → 1.5-2.3 s). A time window, a
column the batches lack, or ``reader="sqlite"`` reads every hop as rows.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal, Self

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from hoptrace import _hop_columns as batch_columns
from hoptrace._errors import TraceFileError
from hoptrace._memory import give_back
from hoptrace.analyzer._arrays import taken
from hoptrace.analyzer._arrow_child import ArrowReadError, read_tables, sql_literal
from hoptrace.analyzer._traces import in_start_order
from hoptrace.db import (
    ADDED_COLUMNS,
    COLUMNS,
    HOP_COLUMNS,
    SQLITE_ERRORS,
    check_structure,
    connect_read_only,
    ids_are_rowids,
    open_for_reading,
)

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
# From this many hops on, "auto" reads them through Arrow: below, the child process's start
# (~0.35 s) costs more than its reads save (at 1M hops: load 9.3 -> 7.6 s, 15.3 -> 12.2 s of CPU).
ARROW_MIN_HOPS = 200_000


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
    reader: Literal["auto", "arrow", "sqlite"] = "auto",
    checks: ExitStack | None = None,
) -> Tables:
    """Read a trace DB, treating it as untrusted; works while the proxy is still writing.

    With ``since``/``until`` (UNIX seconds) only hops that may belong to a request
    started in that window are read: those overlapping it, up to the end of the last
    request that started in it. ``extra_columns`` names hop columns beyond
    :data:`CORE_HOP_COLUMNS`, or is ``"all"``. ``reader`` picks how the hops are read:
    through Arrow in a child process (``"auto"`` does from :data:`ARROW_MIN_HOPS` hops on)
    or through ``sqlite3`` in this one, in both cases from the batches' stored Arrow columns
    where the recorder wrote them; ``"sqlite"`` reads every hop's row. All give the same tables. Raises
    :class:`TraceFileError`, and ``ValueError`` for an unknown column name.

    The file's structure is checked (``PRAGMA quick_check``) once the reads are done, before this
    returns; with ``checks``, the verdict is left to that stack instead: the check goes on beside
    whatever the caller does with the tables, and the stack's exit raises the ``TraceFileError`` of
    a corrupt file in place of what the caller's block returned or raised.
    """
    columns = _hop_columns(extra_columns)
    try:
        conn = open_for_reading(path, check=False)  # _read checks the structure, alongside its reads
        try:
            conn.execute("BEGIN")  # captures, tokens and the id bound from one snapshot
            tables = _read(conn, Path(path), columns, since, until, reader, checks)
        except SQLITE_ERRORS as exc:
            check_structure(conn, path)  # a corrupt file is the likely cause: then say that
            raise _cannot_read(path, exc) from None
        except (ValueError, TypeError, OverflowError, KeyError) as exc:
            # Content no check above foresaw: still a statement about the file, not a traceback.
            raise TraceFileError(
                f"{path}: cannot read the trace database: unexpected content ({type(exc).__name__}: {exc})"
            ) from None
        finally:
            conn.close()
    except TraceFileError as exc:
        raise _one_line(exc) from None
    give_back()  # what the reads parsed, and the Arrow buffers: the frames hold copies of their own
    return tables


def _cannot_read(path: str | Path, exc: Exception) -> TraceFileError:
    return TraceFileError(f"{path}: cannot read the trace database ({exc})")


def _one_line(error: TraceFileError) -> TraceFileError:
    """``error`` on one line: a path, or an error SQLite reports, can span lines."""
    return TraceFileError(" ".join(str(error).split()))


def _hop_columns(extra: tuple[str, ...] | str) -> tuple[str, ...]:
    if extra == "all":
        extra = tuple(c for c in HOP_COLUMNS if c not in _HEAVY)
    unknown = [c for c in extra if c not in HOP_COLUMNS]
    if unknown:
        raise ValueError(f"unknown hop column {unknown[0]!r} (columns: {', '.join(HOP_COLUMNS)})")
    return tuple(dict.fromkeys((*CORE_HOP_COLUMNS, *(c for c in extra if c != "id"))))


def _read(conn, path: Path, columns: tuple[str, ...], since, until, reader: str, checks: ExitStack | None) -> Tables:
    shape = _shape(conn, path)
    captures = _read_captures(conn)
    last_id = conn.execute(f"SELECT max(id) FROM hops{shape.integer_ids}").fetchone()[0]
    where, params = _window(conn, since, until)
    traced = "trace_id" in shape.hops
    traced = traced and conn.execute("SELECT 1 FROM hops WHERE trace_id IS NOT NULL LIMIT 1").fetchone() is not None
    if not traced:
        columns = tuple(c for c in columns if c not in _TRACE_COLUMNS)
    columns = tuple(c for c in columns if c in shape.hops or c not in _OPTIONAL_COLUMNS)
    # One capture in the whole table (the hops_capture_started index answers at once): no column to read.
    # Two queries: SQLite reads a lone min() or max() off an end of the index, both in one by a scan of
    # it (0.1-0.4 s at 1M hops).
    low, high = (None, 0)
    if "capture_id" in shape.hops:
        low, high = (conn.execute(f"SELECT {end}(capture_id) FROM hops").fetchone()[0] for end in ("min", "max"))
    single_capture = isinstance(low, int) and low == high
    hop_columns = tuple(c for c in columns if c in shape.hops and not (single_capture and c == "capture_id"))
    count = conn.execute(f"SELECT count(*) FROM hops{shape.integer_ids}").fetchone()[0]
    bounds = _chunk_bounds(conn, last_id, shape, count) if last_id is not None else []
    stored = _stored_ranges(conn, shape, hop_columns, last_id, count) if reader != "sqlite" and not where else []
    batches = _longest_runs(_decoded(conn, stored))
    covered = _runs(batches)
    # Even in a file where no hop has a trace id: its entry hops may each have got theirs only in the
    # response (a shard of a capture can hold only such hops).
    root_traces = {"trace_id", "service", "response_headers"} <= shape.hops
    entries = tuple(str(e) for e in captures["entry"].dropna().unique()) if root_traces else ()
    reads = _Reads(hop_columns, _without(bounds, covered), where, params, entries, last_id, shape, _outside("hop_id", covered))
    threads = len(os.sched_getaffinity(0))
    check = _StructureCheck(conn.uri, path)
    uncovered = count - sum(last - first + 1 for first, last in covered)  # the hops read as rows
    through_arrow = reader == "arrow" or (reader == "auto" and uncovered >= ARROW_MIN_HOPS)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        if through_arrow:
            running = [pool.submit(reads.through_arrow, conn.uri, threads)]
        else:
            running = [pool.submit(_run_read, conn.uri, read) for read in reads.through_sqlite()]
        tokens = _read_tokens(conn)  # the same snapshot as the captures and the id bound
        with check.kept_by(checks):
            parts = _finish(running, through_arrow, pool, conn.uri, reads)
            check.start()
            sightings = _merged_sightings(parts[0], batches)
            hop_parts = _in_id_order([*parts[1:], *_batch_parts(("id", *hop_columns), batches, entries)])
            hops, repeated = _hops_frame(hop_parts, hop_columns, columns, low if single_capture else None, entries, shape)
            tables = _tables(captures, hops, tokens, sightings)
    tables.notes[:0] = [*shape.notes, *_unread_ids(conn, shape), *repeated]
    tables.notes += capture_notes(tables.captures)
    return tables


def _hops_frame(
    parts: list[dict], read: tuple[str, ...], columns: tuple[str, ...], capture: int | None, entries: tuple[str, ...], shape: _Shape
) -> tuple[pd.DataFrame, list[str]]:
    """The hops frame from the parts of its ``read`` columns, with every one of ``columns`` (the capture id
    ``capture`` when the file holds one, NULL for a column the file lacks), the trace ids entry hops got in
    their responses, and the first hop of each id; and notes of the hops whose id repeated."""
    hops, repeated = _unique_ids(_join_hops(read, parts), shape)
    if capture is not None:
        hops["capture_id"] = np.full(len(hops), capture, np.int64)
    for name in columns:
        if name not in hops:  # a column this file lacks: NULL throughout (shape.notes say so)
            hops[name] = _column(name, [np.full(len(hops), _NULL, np.int64) if _is_numeric(name) else [None] * len(hops)])
    hops = hops[list(dict.fromkeys((*columns, *_TRACE_COLUMNS)))]
    if entries and parts:
        _add_root_traces(hops, *(np.concatenate([part["root_traces"][i] for part in parts]) for i in range(4)))
    return hops, repeated


def _finish(running: list, through_arrow: bool, pool: ThreadPoolExecutor, uri: str, reads: _Reads) -> list:
    """What the reads returned: the sightings, then the hop columns of each id range.

    When the Arrow reader failed (a damaged file, text that is not UTF-8), the ``sqlite3``
    reads take over: they read what can be read and phrase what cannot."""
    if through_arrow:
        try:
            return running[0].result()
        except ArrowReadError:
            running = [pool.submit(_run_read, uri, read) for read in reads.through_sqlite()]
    return [future.result() for future in running]


@dataclass(frozen=True)
class _Reads:
    """The reads of the hop columns (in ``bounds``' id ranges) and the token sightings, done either way."""

    columns: tuple[str, ...]
    bounds: list[tuple[int, int]]
    where: str
    params: tuple
    entries: tuple[str, ...]
    last_id: int | None
    shape: _Shape
    sightings_where: str  # which token sightings: those of the hops no stored batch covers

    def through_sqlite(self) -> list[Callable[[sqlite3.Connection], object]]:
        # The longest read first, so that the chunks of hops even out the threads' ends.
        columns = partial(
            _read_hop_columns, columns=self.columns, where=self.where, params=self.params,
            unique_ids=self.shape.rowid_ids, entries=self.entries,
        )  # fmt: skip
        return [
            partial(_read_hop_tokens, last_id=self.last_id, shape=self.shape, where=self.sightings_where),
            *(partial(columns, lo=lo, hi=hi) for lo, hi in self.bounds),
        ]

    def through_arrow(self, uri: str, threads: int) -> list:
        """The same as the reads of :meth:`through_sqlite` return, read by :func:`read_tables`."""
        names = ("id", *self.columns)
        values = [_value(c) for c in names] + ([_root_trace_candidate(len(self.entries))] if self.entries else [])
        # The first row tells the driver each column's type (see hoptrace.analyzer._arrow_child).
        sample = ["0" if _is_numeric(c) else "''" for c in names] + (["''"] if self.entries else [])
        select = f"SELECT {', '.join(sample)} UNION ALL SELECT {', '.join(values)} FROM hops NOT INDEXED WHERE id > ? AND id <= ?"
        queries = [_hop_tokens_query(self.last_id, self.shape, self.sightings_where)]
        queries += [_with_values(select + self.where, (*self.entries, lo, hi, *self.params)) for lo, hi in self.bounds]
        # Each id range is made into its part as it arrives, while the child reads the next ones.
        with closing(read_tables(uri, queries, threads)) as tables:
            sightings = next(tables)
            parts: list = [[sightings.column(0).to_numpy(), *sightings.columns[1:]] if sightings.num_rows else None]
            parts += [self._arrow_part(names, table) for table in tables]
        return parts

    def _arrow_part(self, names: tuple[str, ...], table: pa.Table) -> dict | None:
        """One id range's columns, as :func:`_read_hop_columns` gives them."""
        if not table.num_rows:
            return None
        part = {name: _arrow_column(name, table.column(i)) for i, name in enumerate(names)}
        if self.entries:
            headers = table.column(len(names))
            found = pc.is_valid(headers)
            ids = part["id"][found.to_numpy(zero_copy_only=False)].tolist()
            part["root_traces"] = _root_trace_rows(zip(ids, headers.filter(found).to_pylist(), strict=True))
        return part


def _with_values(sql: str, params: tuple) -> str:
    """``sql`` with each ``?`` replaced by the literal of its parameter (none of the SQL here has another ``?``)."""
    pieces = sql.split("?")
    assert len(pieces) == len(params) + 1, "one parameter per placeholder"
    return "".join(piece + sql_literal(value) for piece, value in zip(pieces, params)) + pieces[-1]


def _arrow_column(name: str, column: pa.ChunkedArray) -> np.ndarray | pa.ChunkedArray:
    """A hop column as :func:`_column` takes it: numbers (never NULL: see :func:`_value`) as an array."""
    return column.to_numpy() if _is_numeric(name) else column


def _stored_ranges(conn, shape: _Shape, columns: tuple[str, ...], last_id: int | None, count: int) -> list[tuple[int, int]]:
    """The id ranges (first, last) of the recorder's batches stored in Arrow (:mod:`hoptrace._hop_columns`)
    that can stand for their rows, in order: :func:`_decoded` reads them.

    None unless ``hops.id`` is the rowid (a batch names its hops by id), the file has the sightings'
    columns and hoptrace's triggers, and the read wants no column they lack; and only the batches
    written under the tables and triggers the file has now (:func:`hoptrace._hop_columns.schema_key`:
    an ALTER TABLE or a rebuild fires no trigger). A batch that claims ids an earlier one has is left
    out (its hops are read as rows), and so is every run of adjacent batches of which a hop is missing
    from the table (``count`` hops up to ``last_id``).
    """
    names = {row[1] for row in conn.execute(f"PRAGMA table_info({batch_columns.TABLE})")}
    usable = {"first_id", "last_id", "tables", "hops", "sightings"} <= names and shape.rowid_ids and last_id is not None
    if not usable or _sighting_values(shape) is None or not set(columns) <= set(batch_columns.STORED):
        return []
    # The streams are read by rowid: first_id must be it (INTEGER PRIMARY KEY DESC, for one, is not).
    key = batch_columns.schema_key(conn)
    if key is None or conn.execute(f"SELECT 1 FROM {batch_columns.TABLE} WHERE rowid IS NOT first_id LIMIT 1").fetchone():
        return []
    ranges: list[tuple[int, int]] = []
    query = f"SELECT first_id, last_id FROM {batch_columns.TABLE} WHERE last_id <= ? AND tables = ? ORDER BY first_id"
    for first, last in conn.execute(query, (last_id, key)):
        if isinstance(first, int) and isinstance(last, int) and first <= last and (not ranges or first > ranges[-1][1]):
            ranges.append((first, last))
    # Ids are unique: when they are dense (a recorder's file), every run between the ends is whole.
    lowest = conn.execute("SELECT min(id) FROM hops").fetchone()[0]
    dense = last_id - lowest + 1 == count
    whole = "SELECT count(*) FROM hops WHERE id BETWEEN ? AND ?"
    kept = []
    for run in _adjacent(ranges):
        first, last = run[0][0], run[-1][1]
        if first >= lowest and (dense or conn.execute(whole, (first, last)).fetchone()[0] == last - first + 1):
            kept += run
    return kept


def _decoded(conn, ranges: list[tuple[int, int]]) -> list[batch_columns.Batch]:
    """The stored batches of ``ranges`` that decode (:func:`hoptrace._hop_columns.decode`), in id order;
    the others' hops are read as rows.

    Each stream is read through SQLite's incremental blob I/O: 0.11 s for a million hops' streams, where a
    column fetch took 0.28 s. (Decoding them in a thread beside the tokens' read measured no faster: six
    loads each at 1M hops, medians 2.06 and 2.02 s; the decoding holds the GIL the read needs.)"""
    table, rows = batch_columns.TABLE, []
    for first, last in ranges:  # read in this transaction, as the ranges were: first_id is the rowid
        try:
            streams = []
            for column in ("hops", "sightings"):
                with conn.blobopen(table, column, first, readonly=True) as blob:
                    streams.append(blob.read())
        except sqlite3.OperationalError:  # not a blob or text: no stream
            continue
        rows.append((first, last, *streams))
    return [batch for batch in batch_columns.decode(rows) if batch is not None]


# Runs of adjacent stored batches a read takes (a recorder's file has one run per row process it had):
# the hops outside them are read in one query, whose WHERE names each run.
_MAX_RUNS = 64


def _longest_runs(batches: list[batch_columns.Batch]) -> list[batch_columns.Batch]:
    """The batches of the :data:`_MAX_RUNS` longest runs of adjacent ones (the others' hops are read as rows)."""
    runs = _adjacent(batches)
    longest = sorted(range(len(runs)), key=lambda i: runs[i][-1][1] - runs[i][0][0], reverse=True)[:_MAX_RUNS]
    return [batch for i in sorted(longest) for batch in runs[i]]


def _in_id_order(parts: list[dict | None]) -> list[dict]:
    """The hop columns' parts (of id ranges read as rows, of runs of stored batches) in id order, as the rows are."""
    return sorted((part for part in parts if part is not None), key=lambda part: part["id"][0])


def _adjacent(ranges: list) -> list[list]:
    """Id ranges (first, last), or batches (which start with theirs), in order, in runs of adjacent ones."""
    runs: list[list] = []
    for item in ranges:
        if runs and item[0] == runs[-1][-1][1] + 1:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


def _runs(ranges: list) -> list[tuple[int, int]]:
    """The id ranges (first, last) that ``ranges`` (or batches) cover, adjacent ones joined."""
    return [(run[0][0], run[-1][1]) for run in _adjacent(ranges)]


def _without(bounds: list[tuple[int, int]], runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The id ranges ``bounds`` (``lo < id <= hi``) without the ids of ``runs`` (``first <= id <= last``, in order)."""
    left = []
    for lo, hi in bounds:
        for first, last in runs:
            if first > hi or last <= lo:
                continue
            if first - 1 > lo:
                left.append((lo, first - 1))
            lo = max(lo, last)
        if lo < hi:
            left.append((lo, hi))
    return left


def _outside(column: str, runs: list[tuple[int, int]]) -> str:
    """A WHERE clause's ``AND`` keeping the rows whose ``column`` is in none of ``runs``."""
    inside = " OR ".join(f"CAST({column} AS INTEGER) BETWEEN {first} AND {last}" for first, last in runs)
    return f" AND NOT ({inside})" if runs else ""


def _batch_parts(names: tuple[str, ...], batches: list[batch_columns.Batch], entries: tuple[str, ...]) -> list[dict]:
    """The stored batches' hop columns, one part per run of adjacent batches, as :func:`_read_hop_columns` gives them."""
    parts = []
    for run in _adjacent(batches):
        first, last = run[0].first_id, run[-1].last_id
        table = pa.concat_tables([b.hops for b in run])
        part = {"id": np.arange(first, last + 1, dtype=np.int64)}
        part.update((name, _stored_value(name, table.column(name))) for name in names[1:])
        if entries:
            part["root_traces"] = _stored_root_traces(table, first, entries)
        parts.append(part)
    return parts


def _stored_root_traces(table: pa.Table, first_id: int, entries: tuple[str, ...]) -> _RootTraces:
    """:func:`_root_trace_rows` of the entry hops of a run of stored batches (whose first hop is ``first_id``)."""
    at_entry = pc.is_in(table.column("service"), value_set=pa.array(entries, pa.string()))
    found = pc.and_(at_entry, pc.is_valid(table.column(batch_columns.ROOT_TRACE[0]))).to_numpy(zero_copy_only=False)
    columns = (table.column(name).filter(found).to_numpy(zero_copy_only=False) for name in batch_columns.ROOT_TRACE)
    return (first_id + np.flatnonzero(found), *columns)


# CAST(x AS INTEGER) of a REAL beyond a 64-bit integer gives the nearest one; this is the largest float below 2**63.
_INT64_LIMIT = float(np.nextafter(2.0**63, 0))


def _stored_value(name: str, column: pa.ChunkedArray) -> np.ndarray | pa.ChunkedArray:
    """A stored batch's column as :func:`_value` reads its rows: a number as an integer (``_NULL`` for NULL), text as is."""
    if not _is_numeric(name):
        return column
    if pa.types.is_integer(column.type):
        return column.fill_null(_NULL).to_numpy()
    values = column.to_numpy()  # NaN for NULL
    null = np.isnan(values)
    if name in _TIME_COLUMNS or name in _REAL_COLUMNS:
        values = values * (1e6 if name in _TIME_COLUMNS else 1e3) + 0.5  # as _value's SQL: the same two roundings
    whole = np.trunc(np.clip(np.where(null, 0.0, values), -_INT64_LIMIT, _INT64_LIMIT)).astype(np.int64)
    return np.where(null, _NULL, whole)


def _merged_sightings(read: list | None, batches: list[batch_columns.Batch]) -> pd.DataFrame:
    """The token sightings read as rows and those of the stored batches, in hop id order, as a read of
    them all by hop id gives them."""
    if not batches:
        return _sightings(read)
    columns = [*([read] if read is not None else []), *([b.first_id + b.sightings.column(0).to_numpy(), *b.sightings.columns[1:]] for b in batches)]
    ids = np.concatenate([np.asarray(c[0], np.int64) for c in columns])
    texts = [_arrow_text([c[i] for c in columns], categorical=True) for i in (1, 2, 3)]
    if len(ids) and not (ids[1:] >= ids[:-1]).all():
        order = np.argsort(ids, kind="stable")
        ids, texts = ids[order], [text.take(order) for text in texts]
    return _sightings([ids, *texts] if len(ids) else None)


@dataclass
class _Shape:
    """The columns each table of a file has, and whether ``hops.id`` is its rowid (unique whole numbers)."""

    columns: dict[str, frozenset[str]]
    rowid_ids: bool
    notes: list[str]

    @property
    def hops(self) -> frozenset[str]:
        return self.columns["hops"]

    @property
    def integer_ids(self) -> str:
        """A WHERE clause keeping the hops whose id is a whole number (every hop when the id is the rowid)."""
        return "" if self.rowid_ids else " WHERE typeof(id) = 'integer'"


# Without these a hop cannot be placed at all.
_REQUIRED_HOP_COLUMNS = ("id", "service", "started_at", "ended_at")


def _shape(conn, path: Path) -> _Shape:
    """What the file's tables look like; a hostile or damaged file may lack columns or its primary key."""
    info = {table: conn.execute(f"PRAGMA table_info({table})").fetchall() for table in COLUMNS}
    columns = {table: frozenset(row[1] for row in rows) for table, rows in info.items()}
    lacking = [c for c in _REQUIRED_HOP_COLUMNS if c not in columns["hops"]]
    if lacking:
        raise TraceFileError(f"{path}: table hops has no column {', '.join(lacking)}; not a usable trace database")
    rowid_ids = ids_are_rowids(info["hops"])
    notes = []
    for table, expected in COLUMNS.items():
        # A file of an older schema lacks the columns later versions added: not worth a note.
        missing = [c for c in expected if c not in columns[table] and c not in ADDED_COLUMNS.get(table, ())]
        if missing:
            notes.append(f"table {table} has no column {', '.join(missing)}: read as empty")
    return _Shape(columns, rowid_ids, notes)


def _unread_ids(conn, shape: _Shape) -> list[str]:
    if shape.rowid_ids:
        return []
    count = conn.execute("SELECT count(*) FROM hops WHERE typeof(id) != 'integer'").fetchone()[0]
    return [f"{count} hops without a whole-number id were ignored"] if count else []


def _unique_ids(hops: pd.DataFrame, shape: _Shape) -> tuple[pd.DataFrame, list[str]]:
    """The hops with the first of each id (ids repeat only in a hops table without its primary key)."""
    repeated = np.zeros(len(hops), bool) if shape.rowid_ids else hops.index.duplicated()
    if not repeated.any():
        return hops, []
    return hops[~repeated], [f"{int(repeated.sum())} hops whose id repeated an earlier one were ignored"]


class _StructureCheck:
    """:func:`hoptrace.db.check_structure` of one file, in a thread of its own from :meth:`start` on.

    The loader starts it when the reads are done, so that the check runs while what they read is
    put together (and, left to the caller, while that is analysed), on the core that work leaves
    idle: SQLite lets go of the GIL while it checks. Started with the reads, it took the cores from
    them: at 1M hops the Arrow reader's two threads, the check and the tokens' read shared two
    cores (six loads alternating, medians: 4.70 s with the reads, 4.35 s after them).

    Leaving it waits for the verdict, which comes before the block's result or error (the check is
    started then if it was not), so what a corrupt file reads as is never seen; but not on Ctrl-C,
    which is let through at once (the thread is a daemon: it does not hold the exit either).
    """

    def __init__(self, uri: str, path: Path) -> None:
        self._uri, self._path = uri, path
        self._verdict: Future | None = None

    def start(self) -> None:
        if self._verdict is None:
            self._verdict = Future()
            threading.Thread(target=self._check, name="hoptrace-check", daemon=True).start()

    def _check(self) -> None:
        try:
            self._verdict.set_result(_run_read(self._uri, partial(check_structure, path=self._path)))
        except SQLITE_ERRORS as exc:  # the file went away, or no connection could be opened to it
            self._verdict.set_exception(_cannot_read(self._path, exc))
        except BaseException as exc:  # noqa: BLE001 -- handed on to whoever waits for the verdict
            self._verdict.set_exception(exc)

    @contextmanager
    def kept_by(self, checks: ExitStack | None) -> Iterator[None]:
        """The verdict at the block's end; with ``checks``, when the block succeeds, at that stack's end instead."""
        if checks is None:
            with self:
                yield
            return
        try:
            yield
        except BaseException:
            with self:  # a read failed: the verdict now, in place of its error
                raise
        checks.enter_context(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):  # KeyboardInterrupt, SystemExit
            return
        self.start()
        try:
            self._verdict.result()  # TraceFileError for a corrupt file, in place of what the block returned or raised
        except TraceFileError as error:
            raise _one_line(error) from None


def _tables(captures: pd.DataFrame, hops: pd.DataFrame, tokens: pd.DataFrame, hop_tokens: pd.DataFrame) -> Tables:
    """The tables as read, cleaned: hops without times dropped, durations and failures derived,
    times outside :data:`SANE_TIMES` read as unknown."""
    notes: list[str] = []
    bad = ~(_sane(hops["started_at"]) & _sane(hops["ended_at"]))
    if bad.any():
        notes.append(f"{int(bad.sum())} hops without a valid start or end time (a time between 2000 and 2100) were ignored")
        hops = hops[~bad]
    notes += _clear_insane(hops, [c for c in (*_TIME_COLUMNS, *_SECOND_COLUMNS) if c in hops], "hop times")
    tokens, captures = tokens.copy(), captures.copy()
    notes += _clear_insane(tokens, ["iat", "nbf", "exp", "first_seen_at"], "token times (iat, nbf, exp, first seen)")
    # A token cannot start being valid after it expires: such an iat or nbf would draw its life backwards.
    for claim in ("iat", "nbf"):
        after = (tokens[claim] > tokens["exp"]).to_numpy()
        if after.any():
            notes.append(f"{int(after.sum())} token {claim} claims later than the token's exp were ignored")
            tokens.loc[after, claim] = np.nan
    notes += _clear_insane(captures, ["started_at", "ended_at"], "capture times")
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


# Times hoptrace can have recorded, in UNIX seconds: 2000-01-01 to 2100-01-01 UTC. A value outside is
# damage or a hostile claim (iat 2e10, exp 1e-7): read as unknown, with a note, so that no analysis or
# chart is asked to span centuries.
SANE_TIMES = (946_684_800.0, 4_102_444_800.0)


def _sane(values: pd.Series) -> np.ndarray:
    array = values.to_numpy(dtype="float64", na_value=np.nan)
    return (array >= SANE_TIMES[0]) & (array <= SANE_TIMES[1])


def _clear_insane(frame: pd.DataFrame, columns: list[str], what: str) -> list[str]:
    """Set values outside :data:`SANE_TIMES` to NaN in place; a note when there were any."""
    cleared = 0
    for name in columns:
        wrong = frame[name].notna().to_numpy() & ~_sane(frame[name])
        if wrong.any():
            cleared += int(wrong.sum())
            frame.loc[wrong, name] = np.nan
    return [f"{cleared} {what} outside 2000-2100 were read as unknown"] if cleared else []


# The most hops one commit of the recorder holds (TraceWriter's default batch_size): what a
# crash can lose beyond what the capture's counters show.
_WRITER_BATCH = 2_000


def capture_notes(captures: pd.DataFrame) -> list[str]:
    """A note for each capture without an end time: its proxy was killed or crashed, or is still recording.

    The recorder updates a capture's counters in the transaction of each batch it writes, so at
    the last write ``hops_seen - hops_recorded - hops_dropped`` hops had been seen and not written;
    those seen after it are not counted anywhere, but were at most one batch.
    """
    notes = []
    for capture_id, row in captures[captures["ended_at"].isna()].iterrows():
        counts = [_count(row.get(name)) for name in ("hops_seen", "hops_recorded", "hops_dropped")]
        if None in counts:
            missing = "its counters are unreadable: how many hops are missing is unknown"
        else:
            seen, recorded, dropped = counts
            missing = (
                f"at its last write {seen} hops seen, {recorded} written, {dropped} dropped; up to"
                f" {max(seen - recorded - dropped, 0)} missing, plus up to {_WRITER_BATCH:,} seen after it"
            )
        # Renderers shorten a note past 200 characters: this one stays under.
        notes.append(f"capture {capture_id} did not end cleanly (crashed, killed) or is still running: {missing}")
    return notes


def _count(value: object) -> int | None:
    return int(value) if isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= 0 else None


def _window(conn, since, until) -> tuple[str, tuple]:
    if since is None and until is None:
        return "", ()
    lo = -1.7e308 if since is None else float(since)
    hi = 1.7e308 if until is None else float(until)
    # Every hop of a request that started in the window ends by the last such request's end.
    last_end = conn.execute(
        "SELECT max(CASE WHEN typeof(ended_at) IN ('integer', 'real') THEN ended_at END) FROM hops"
        " WHERE started_at >= ? AND started_at <= ?",
        (lo, hi),
    ).fetchone()[0]
    if last_end is None:
        return " AND 0", ()
    return " AND ended_at >= ? AND started_at <= ?", (lo, float(last_end))


def _run_read(uri: str, read: Callable[[sqlite3.Connection], object]):
    """``read`` on a read-only connection of its own, opened as the first one was."""
    conn = connect_read_only(uri)
    try:
        return read(conn)
    finally:
        conn.close()


# LIKE (case-insensitive, nothing parsed) keeps the JSON work to the hops whose headers name one:
# at 1M hops, half of them propagating traceparent, 1.7 s of the load.
_NAMES_A_RESPONSE_HEADER = " OR ".join(f"hops.response_headers LIKE '%{name}%'" for name in batch_columns.RESPONSE_TRACE_HEADERS)


def _root_trace_candidate(entries: int, value: str = "CAST(hops.response_headers AS TEXT)") -> str:
    """For the pass that reads the hop columns: ``value`` (a hop's response headers) where they may
    give the trace id a client request got only in its response (W3C traceresponse, an echoed
    X-Request-ID), else NULL; it takes ``entries`` parameters, the entry routes.

    A client usually sends no trace context: the entry service starts the trace and says
    so in its answer. Without this, the entry hop would be the one hop of its request
    outside the trace. SQLite picks the entry hops without a trace id whose headers name one
    of those headers in the same pass over the table as the columns, and Python reads their
    JSON (:func:`_root_trace_rows`): SQLite's ``json_each`` over them cost 2.2 s of CPU at 1M
    hops (87k such hops, half of the entry hops), where Python's parse of them costs 0.4 s.
    """
    marks = ", ".join("?" * entries)
    return (
        f"CASE WHEN hops.trace_id IS NULL AND hops.service IN ({marks}) AND ({_NAMES_A_RESPONSE_HEADER})"
        f" THEN {value} END"
    )


def _root_trace_headers(conn, ids: str | None, entries: tuple[str, ...]) -> list[tuple[int, str]]:
    """``(id, response headers)`` of the hops ``ids`` names (``group_concat`` of them), read by id: one
    string of every such hop's headers could pass SQLite's limit on a string's length."""
    found = _ints(ids) if ids else np.zeros(0, np.int64)
    rows = conn.execute(
        f"SELECT id, {_root_trace_candidate(len(entries))} FROM hops WHERE id IN (SELECT value FROM json_each(?))",
        (*entries, json.dumps(found.tolist())),
    ).fetchall()
    return [(hop_id, text) for hop_id, text in rows if text is not None]


# The trace ids entry hops got in their responses: hop ids, then trace ids, span ids and sources (objects).
_RootTraces = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _root_trace_rows(found: Iterable[tuple[int, str]]) -> _RootTraces:
    """The trace id each hop of the ``(id, headers)`` found got in its response, as the recorder stores
    them with a batch (:func:`hoptrace._hop_columns.root_trace`)."""
    rows = [(hop_id, *root) for hop_id, text in found if (root := batch_columns.root_trace(text)) is not None]
    ids, *values = zip(*rows, strict=True) if rows else ((), (), (), ())
    return (np.array(ids, np.int64), *(np.array(column, dtype=object) for column in values))


def _add_root_traces(hops: pd.DataFrame, ids: np.ndarray, *values: np.ndarray) -> None:
    """Set the trace id, span id and source of entry hops without one from what their responses said."""
    # Of an id a hostile file holds twice, the first hop is kept (see _unique_ids): so is its root trace,
    # and none goes to a kept hop that has a trace id of its own.
    first = np.unique(ids, return_index=True)[1]
    at = hops.index.get_indexer(ids[first])
    untraced = taken(hops["trace_id"].isna().to_numpy(), at, False)  # False at -1: no such hop
    first, at = first[untraced], at[untraced]
    for name, column in zip(("trace_id", "span_id", "trace_source"), values, strict=True):
        if name in hops:
            hops[name] = _replaced(hops[name], at, column[first])


def _replaced(column: pd.Series, positions: np.ndarray, values: np.ndarray) -> pd.Series:
    """A text ``column`` with ``values`` at ``positions``: one Arrow column made anew (0.04 s at 1M hops,
    87k values), not a pandas ``.loc`` assignment into the old one (0.05-0.09 s, more in a profile)."""
    if not len(positions):
        return column
    array = pa.array(column.array)
    mask = np.zeros(len(column), bool)
    mask[positions] = True
    replaced = pc.replace_with_mask(array, pa.array(mask), pa.array(values[np.argsort(positions)], array.type))
    return pd.Series(pd.array(replaced, dtype=column.dtype), index=column.index, name=column.name)


def _read_captures(conn) -> pd.DataFrame:
    frame = _read_all(conn, "captures")
    for name in ("started_at", "ended_at"):
        frame[name] = pd.to_numeric(frame[name], errors="coerce").astype("float64")
    frame["id"] = pd.to_numeric(frame["id"], errors="coerce")
    frame["entry"] = frame["entry"].map(lambda v: v if isinstance(v, str) else None)
    frame = frame.dropna(subset=["id"]).astype({"id": "int64"}).drop_duplicates("id")
    return frame.set_index("id").sort_index()


def _read_all(conn, table: str) -> pd.DataFrame:
    """Every row of ``table`` with the columns of the current schema: NULL for those the file lacks."""
    cur = conn.execute(f"SELECT * FROM {table}")
    names = [d[0] for d in cur.description]
    return pd.DataFrame.from_records(cur.fetchall(), columns=names).reindex(columns=list(COLUMNS[table]))


def _value(column: str) -> str:
    """``column`` of one hop, typed: an integer (``_NULL`` for anything but a number) or text (or NULL)."""
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
    return f"CAST({column} AS TEXT)"


def _numeric(column: str, value: str) -> str:
    return f"CASE typeof({column}) WHEN 'integer' THEN {value} WHEN 'real' THEN {value} ELSE {_NULL} END"


def _expr(column: str) -> str:
    """``column`` of the hops a query reads, as one string (see the module's docstring)."""
    if _is_numeric(column):
        return f"group_concat({_value(column)}, ',')"
    return f"json_group_array({_value(column)})"


def _read_hop_columns(
    conn, columns: tuple[str, ...], lo: int, hi: int, where: str, params: tuple, unique_ids: bool = True,
    entries: tuple[str, ...] = (),
) -> dict | None:
    """The hops with ``lo < id <= hi``: per column, an int array (numbers) or a list (text); None if none.

    ``unique_ids=False`` (a hops table without its primary key): no column is looked up by id.
    With ``entries`` (the entry routes), also ``root_traces``: the trace ids those routes' hops without
    one got in their responses (see :func:`_root_trace_candidate`, :func:`_root_trace_rows`).
    """
    sparse = [c for c in columns if c in _SPARSE_COLUMNS and unique_ids]
    names = ("id", *(c for c in columns if c not in sparse))
    exprs = [_expr(c) for c in names]
    if entries:  # the ids of the hops whose headers may give a trace id; their headers are read by id after
        exprs.append(f"group_concat({_root_trace_candidate(len(entries), 'hops.id')}, ',')")
    if sparse:
        # The ids of the few hops that have a value: NULLs are left out of group_concat.
        exprs.append(f"group_concat(CASE WHEN {' OR '.join(f'{c} IS NOT NULL' for c in sparse)} THEN id END, ',')")
    select = f"SELECT {', '.join(exprs)} FROM hops NOT INDEXED WHERE id > ? AND id <= ?"
    row = conn.execute(select + where, (*entries, lo, hi, *params)).fetchone()
    if row[0] is None:
        return None
    out = {name: _ints(text) if _is_numeric(name) else json.loads(text) for name, text in zip(names, row)}
    if entries:
        out["root_traces"] = _root_trace_rows(_root_trace_headers(conn, row[len(names)], entries))
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


def _chunk_bounds(conn, last_id: int, shape: _Shape, count: int) -> list[tuple[int, int]]:
    """Id ranges of about ``_CHUNK`` hops each: rowid range scans, no sort.

    ``last_id`` is the snapshot's largest id, so every hop of it counts (``count``): a bare
    ``count(*)`` SQLite answers from the smallest index (10 ms at 1M hops, where
    ``WHERE id <= ?`` walks the whole table: 0.3 s before any thread can start). The
    ranges cover every id whatever the count says; an index that disagrees with its
    table (a hostile file) only changes how many hops a range holds.
    """
    ids = shape.integer_ids
    # Ranges start after `first - 1`, which must be a 64-bit integer too (and ids stay above _NULL).
    first = max(conn.execute(f"SELECT min(id) FROM hops{ids}").fetchone()[0], _NULL + 1)
    if count == 0:
        return []
    if last_id - first + 1 == count:  # the recorder's ids are dense: ranges by arithmetic
        return [(lo, min(lo + _CHUNK, last_id)) for lo in range(first - 1, last_id, _CHUNK)]
    bounds, lo = [], first - 1
    while lo < last_id:
        hi = conn.execute(
            f"SELECT id FROM hops{ids or ' WHERE 1'} AND id > ? ORDER BY id LIMIT 1 OFFSET ?", (lo, _CHUNK - 1)
        ).fetchone()
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
    if any(isinstance(chunk, pa.ChunkedArray) for chunk in chunks):  # read through Arrow, or stored in Arrow
        return _strings(_arrow_text(chunks, name in _CATEGORICAL), name in _CATEGORICAL)
    items = np.concatenate([np.asarray(chunk, dtype=object) for chunk in chunks]) if chunks else np.zeros(0, object)
    return _strings(items, categorical=name in _CATEGORICAL)


def _arrow_text(parts: list, categorical: bool) -> pa.ChunkedArray:
    """Text parts (Arrow columns, or lists of the rows read by ``sqlite3``) as one Arrow column: dictionary-encoded
    where every part is and the column is categorical (the stored batches' categories), else strings."""
    pieces = [piece for part in parts for piece in (part.chunks if isinstance(part, pa.ChunkedArray) else [pa.array(part, pa.string())])]
    if categorical and pieces and all(pa.types.is_dictionary(piece.type) for piece in pieces):
        return pa.chunked_array(pieces)
    return pa.chunked_array([p.cast(pa.string()) if pa.types.is_dictionary(p.type) else p for p in pieces], pa.string())


def _ints(text: str) -> np.ndarray:
    return np.fromstring(text, dtype=np.int64, sep=",")


def _strings(items: list | np.ndarray | pa.ChunkedArray, categorical: bool = False) -> pd.api.extensions.ExtensionArray:
    """A str array whose equal values share one object (1M copies of "gateway" are 50 MB),
    or a Categorical (categories sorted) for the columns with few distinct values."""
    if isinstance(items, pa.ChunkedArray):
        if not categorical:
            return pd.array(items, dtype="str")  # pandas keeps "str" in Arrow: the array itself, no copy
        # Arrow's own encoding, in C: codes in order of first appearance, as pandas.factorize gives them;
        # columns already encoded (stored batches) only have their dictionaries unified.
        if pa.types.is_dictionary(items.type):
            encoded = pa.table({"text": items}).unify_dictionaries().column(0).combine_chunks()
        else:
            encoded = items.combine_chunks().dictionary_encode()
        codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.intp)
        uniques = encoded.dictionary.to_numpy(zero_copy_only=False)
    else:
        codes, uniques = pd.factorize(np.asarray(items, dtype=object))
    if not categorical:
        return pd.array(uniques, dtype="str").take(codes, allow_fill=True)
    order = np.argsort(uniques.astype(str), kind="stable")
    rank = np.empty(len(order) + 1, np.int64)
    rank[order] = np.arange(len(order))
    rank[-1] = -1  # code -1 (NULL) stays -1
    return pd.Categorical.from_codes(rank[codes], pd.Index(uniques[order], dtype="str"))


def _sighting_values(shape: _Shape) -> list[str] | None:
    """hop_id, fingerprint, role and location of a token sighting, typed as :func:`_value` types a hop's."""
    if not {"hop_id", "fingerprint", "role"} <= shape.columns["hop_tokens"]:
        return None  # sightings without their hop, token or role say nothing
    location = "location" if "location" in shape.columns["hop_tokens"] else "NULL"
    return [f"ifnull(CAST(hop_id AS INTEGER), {_NULL})", "CAST(fingerprint AS TEXT)", "CAST(role AS TEXT)", f"CAST({location} AS TEXT)"]


def _read_hop_tokens(conn, last_id: int, shape: _Shape, where: str = "") -> list | None:
    """The token sightings of the hops up to ``last_id`` (and ``where``): hop ids as an array, the rest as lists."""
    values = _sighting_values(shape)
    if values is None:
        return None
    row = conn.execute(
        f"SELECT group_concat({values[0]}, ','), {', '.join(f'json_group_array({v})' for v in values[1:])}"
        f" FROM hop_tokens WHERE hop_id <= ?{where}",
        (last_id,),
    ).fetchone()
    return None if row[0] is None else [_ints(row[0]), *(json.loads(text) for text in row[1:])]


def _hop_tokens_query(last_id: int | None, shape: _Shape, where: str = "") -> str:
    """:func:`_read_hop_tokens`'s rows for the Arrow reader, after a row of each column's type."""
    values = _sighting_values(shape)
    sample = "SELECT 0, '', '', ''"
    if values is None or last_id is None:
        return sample
    return f"{sample} UNION ALL SELECT {', '.join(values)} FROM hop_tokens WHERE hop_id <= {sql_literal(last_id)}{where}"


def _sightings(columns: list | None) -> pd.DataFrame:
    """The token sightings from their four columns (hop ids as an array, the rest as text)."""
    names = ("hop_id", "fingerprint", "role", "location")
    if columns is None or not len(columns[0]):
        return pd.DataFrame({n: pd.Series(dtype="int64" if n == "hop_id" else "str") for n in names})
    hop_ids = columns[0] if isinstance(columns[0], np.ndarray) else columns[0].to_numpy()
    frame = pd.DataFrame({"hop_id": hop_ids, **{n: _strings(values, categorical=True) for n, values in zip(names[1:], columns[1:])}})
    return frame[frame["fingerprint"].notna().to_numpy() & frame["role"].notna().to_numpy()]


def _read_tokens(conn) -> pd.DataFrame:
    frame = _read_all(conn, "tokens")
    for name in ("iat", "nbf", "exp", "first_seen_at"):
        frame[name] = pd.to_numeric(frame[name], errors="coerce").astype("float64")
    if "verdict" not in frame:  # a file from before signatures were checked
        frame["verdict"] = None
    # Lists, not Series.map: ten maps cost ~10 ms on a live view's tail, whatever its size.
    for name in ("kind", "sub", "iss", "aud", "alg", "kid", "typ", "jti", "error", "verdict"):
        frame[name] = pd.array([v if isinstance(v, str) else None for v in frame[name].to_numpy(object)], dtype="str")
    frame = frame[np.fromiter((isinstance(v, str) for v in frame["fingerprint"].to_numpy(object)), bool, len(frame))]
    return frame.drop_duplicates("fingerprint").set_index("fingerprint")
