"""The ``hop_columns`` table: each batch of hops the recorder wrote, also as Arrow columns.

SQLite hands its rows out one at a time, and reading the analysis's 18 columns of a million
hops costs ~2.5 s of CPU whatever the reader (the ADBC driver's included): ~0.5 µs a row plus
~20 ns a value, spent in SQLite and in the reader, not on the disk. The recorder has each batch
in hand when it writes it, so it also stores the batch's analysis columns as one Arrow IPC stream
and the batch's token sightings as another, in the same transaction as the rows: the loader
decodes those (a million hops: ~0.25 s) and reads as rows only the hops no batch covers.

The streams are uncompressed, ~173 bytes a hop (19 % more file): LZ4 made the hop columns 3.4 times
smaller but their decoding cost more than the reads they replace. The ids are not stored: a batch's hops
are ``first_id`` to ``last_id``, dense (the recorder numbers a batch's hops from the file's largest
id on, in one transaction), and a sighting names its hop by its place in the batch.

The rows stay the truth. The schema's triggers (see :data:`TRIGGERS`) delete a batch's columns as
soon as one of its hops (its stored columns) or sightings is changed, replaced or deleted, by
any SQLite client; and :func:`decode` refuses a stream that is not exactly what :func:`encode`
writes, so a hostile or damaged one is read as rows instead.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import struct
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from typing import TYPE_CHECKING, NamedTuple

from hoptrace._stored import header_pairs

if TYPE_CHECKING:
    import pyarrow as pa

TABLE = "hop_columns"
# The hop columns stored, each as "int" (int64), "real" (float64), "text" (string) or "category"
# (a dictionary-encoded string: the columns with few distinct values).
STORED = {
    "capture_id": "int", "service": "category", "method": "category", "path": "category", "status": "int",
    "error": "text", "error_kind": "category", "failed": "int", "started_at": "real", "response_start_at": "real",
    "ended_at": "real", "trace_id": "text", "span_id": "text", "parent_span_id": "text", "trace_source": "text",
    "server_date_ts": "real", "client_conn_id": "text",
}  # fmt: skip
# Response headers that can give a hop without a trace id the one its service started (best first).
RESPONSE_TRACE_HEADERS = ("traceresponse", "x-request-id", "x-correlation-id")
# Three more columns: where a hop has no trace id, the trace id, span id and source (the header's name)
# its response headers give it (see root_trace); NULL elsewhere. Found here, in the row process: in the
# loader, parsing and ranking the headers cost 0.3-0.9 s at a million hops, and ranking parsed pairs 0.3 s.
ROOT_TRACE = ("root_trace_id", "root_span_id", "root_trace_source")
# The streams' format, part of each batch's key (see schema_key): batches of another are left unread
# without being decoded. 2: the root traces resolved (2026-11-30's recorder stored the headers' pairs).
_FORMAT = "2"
# A W3C traceresponse: version-trace id-span id-flags, in hex.
_TRACERESPONSE = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}", re.IGNORECASE)
_SIGHTINGS = ("offset", "fingerprint", "role", "location")

# Columns a change of which makes a batch's stored copy wrong; and the SQL that finds the batch holding
# an id in O(log n) (the newest first_id at or below it, if it reaches that far).
_WATCHED = (*STORED, "response_headers", "id")
_HOLDING = f"first_id = (SELECT max(first_id) FROM {TABLE} WHERE first_id <= {{id}}) AND last_id >= {{id}}"


def _forget(*ids: str) -> str:
    return f"DELETE FROM {TABLE} WHERE {' OR '.join(f'({_HOLDING.format(id=i)})' for i in ids)};"


DESCRIPTION = (
    "Each batch of hops the recorder's row process wrote, again as Arrow IPC streams that the analysis reads in place of"
    " the rows; a copy, deleted by triggers as soon as one of its hops or sightings changes."
)
COLUMN_DOCS = {
    "first_id": "the batch's first hop id",
    "last_id": "its last hop id (every id between is one of its hops)",
    "hops": f"Arrow IPC stream: the hops' {', '.join(STORED)} and {', '.join(ROOT_TRACE)}",
    "sightings": "Arrow IPC stream: the batch's hop_tokens rows, each hop as its offset in the batch",
    "tables": "what the hops and hop_tokens tables and these triggers were when it was written (see schema_key)",
}
DDL = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (first_id INTEGER PRIMARY KEY, last_id INTEGER NOT NULL,"
    " tables TEXT NOT NULL, hops BLOB NOT NULL, sightings BLOB NOT NULL)"
)
TRIGGERS = {
    "hop_columns_hop_changed": f"AFTER UPDATE OF {', '.join(_WATCHED)} ON hops BEGIN {_forget('OLD.id', 'NEW.id')} END",
    "hop_columns_hop_deleted": f"AFTER DELETE ON hops BEGIN {_forget('OLD.id')} END",
    # INSERT OR REPLACE of a hop deletes the old row without its DELETE trigger (recursive_triggers is off).
    "hop_columns_hop_added": f"AFTER INSERT ON hops BEGIN {_forget('NEW.id')} END",
    # A sighting's hop as reads take it: CAST (a hop_id of 5.5 or '5' is hop 5's).
    "hop_columns_sighting_added": f"AFTER INSERT ON hop_tokens BEGIN {_forget('CAST(NEW.hop_id AS INTEGER)')} END",
    "hop_columns_sighting_changed": (
        f"AFTER UPDATE ON hop_tokens BEGIN {_forget('CAST(OLD.hop_id AS INTEGER)', 'CAST(NEW.hop_id AS INTEGER)')} END"
    ),
    "hop_columns_sighting_deleted": f"AFTER DELETE ON hop_tokens BEGIN {_forget('CAST(OLD.hop_id AS INTEGER)')} END",
}
# What the triggers cannot see: a change to the tables themselves (ALTER TABLE, a rebuild that drops the
# triggers). Each batch carries the key of the tables' and triggers' SQL it was written under, and is
# read only while the file's key is the same.
_KEYED = ("hops", "hop_tokens", *TRIGGERS)


def schema_key(conn: sqlite3.Connection) -> str | None:
    """The key of the SQL of ``hops``, ``hop_tokens`` and the triggers as the file has them; None when a
    trigger is missing or not the one hoptrace makes (stored columns then go unwritten and unread)."""
    marks = ", ".join("?" * len(_KEYED))
    found = dict(conn.execute(f"SELECT name, sql FROM sqlite_master WHERE name IN ({marks})", _KEYED).fetchall())
    if any(found.get(name) != f"CREATE TRIGGER {name} {body}" for name, body in TRIGGERS.items()):
        return None
    return hashlib.sha256("\0".join([_FORMAT, *(str(found.get(name)) for name in _KEYED)]).encode()).hexdigest()[:32]


def create(execute: Callable[[str], object]) -> None:
    """The table and its triggers, where they are not yet (``execute`` runs one statement)."""
    execute(DDL)
    for name, body in TRIGGERS.items():
        execute(f"CREATE TRIGGER IF NOT EXISTS {name} {body}")


def ensure_triggers(conn: sqlite3.Connection) -> None:
    """For a writer: the triggers as hoptrace makes them, every stored batch forgotten if they were not (a
    client may have changed rows while they were missing). One transaction; call it outside any other."""
    if schema_key(conn) is not None:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(f"DELETE FROM {TABLE}")
        for name in TRIGGERS:
            conn.execute(f"DROP TRIGGER IF EXISTS {name}")
        create(conn.execute)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class Batch(NamedTuple):
    """One batch's columns as :func:`decode` hands them out: ``hops`` in :data:`STORED`'s order, then
    :data:`ROOT_TRACE`'s; ``sightings`` as offset (in the batch), fingerprint, role, location (the text
    dictionary-encoded), in the order of ``hop_tokens``' primary key."""

    first_id: int
    last_id: int
    hops: pa.Table
    sightings: pa.Table


def encode(
    hops: Sequence[tuple], columns: Sequence[str], links: Iterable[tuple[int, str, str, str]]
) -> tuple[bytes, bytes] | None:
    """A batch's two streams: ``hops`` are its rows as inserted (``columns`` names their values),
    ``links`` its sightings as inserted, each ``(offset of the hop in the batch, fingerprint, role,
    location)``. None when a value does not fit its column's type (its hops are then read as rows)."""
    import pyarrow as pa  # here: the writer thread of the proxy process never encodes (see hoptrace.addons._store)

    at = {name: i for i, name in enumerate(columns)}
    try:
        arrays = [_array(kind, [hop[at[name]] for hop in hops]) for name, kind in STORED.items()]
        trace, headers = at["trace_id"], at["response_headers"]
        found = [_root_trace(hop[trace], hop[headers]) for hop in hops]
        arrays += [pa.array([root[i] if root else None for root in found], pa.string()) for i in range(len(ROOT_TRACE))]
        # The rows hop_tokens took (INSERT OR IGNORE: one of each), in the order of its primary key, which
        # is the order reads of them by hop id give (through its index).
        sightings = list(zip(*sorted(set(links)))) or [[]] * len(_SIGHTINGS)
        # Fingerprints repeat (one token on a request's every hop), roles and locations are a few words:
        # dictionaries make these ~80 bytes a sighting ~15.
        texts = [_array("category", list(values)) for values in sightings[1:]]
        return (
            _stream(pa.Table.from_arrays(arrays, [*STORED, *ROOT_TRACE])),
            _stream(pa.Table.from_arrays([pa.array(sightings[0], pa.int64()), *texts], _SIGHTINGS)),
        )
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return None


def store(conn: sqlite3.Connection, first_id: int, last_id: int) -> bool:
    """Store the columns of the hops ``first_id`` to ``last_id`` already in the file, as the recorder would have
    with their batch (for files written otherwise: the benchmarks' synthetic captures, tests); False when a
    value does not fit (nothing stored). The ids must be dense: a batch stands for every id in its range."""
    from hoptrace.db import HOP_COLUMNS

    between = "BETWEEN ? AND ? ORDER BY rowid"
    hops = conn.execute(f"SELECT {', '.join(HOP_COLUMNS)} FROM hops WHERE id {between}", (first_id, last_id)).fetchall()
    if [hop[0] for hop in hops] != list(range(first_id, last_id + 1)):
        raise ValueError(f"hops {first_id} to {last_id} are not each in the file once, in order")
    links = conn.execute(
        f"SELECT hop_id - ?, fingerprint, role, location FROM hop_tokens WHERE hop_id {between}", (first_id, first_id, last_id)
    )
    encoded = encode(hops, HOP_COLUMNS, links.fetchall())
    return encoded is not None and insert(conn, first_id, last_id, encoded)


def insert(conn: sqlite3.Connection, first_id: int, last_id: int, encoded: tuple[bytes, bytes]) -> bool:
    """Store a batch's streams (:func:`encode`), in the caller's transaction; False when they cannot be
    (the triggers are not hoptrace's, the streams are too large for SQLite): the hops are read as rows."""
    key = schema_key(conn)
    if key is None:
        return False
    # Streams of hops a client deleted while the triggers were missing, whose ids are being given again.
    conn.execute(f"DELETE FROM {TABLE} WHERE last_id >= ?", (first_id,))
    try:
        conn.execute(
            f"INSERT INTO {TABLE} (first_id, last_id, tables, hops, sightings) VALUES (?, ?, ?, ?, ?)",
            (first_id, last_id, key, *encoded),
        )
    except (sqlite3.IntegrityError, sqlite3.DataError):
        return False
    return True


def prepare() -> None:
    """What :func:`encode` needs the first time, done ahead: pyarrow's import and its first arrays and
    stream (0.35 s, which had held the first batch of a capture back: its hops showed in a live view
    0.3-0.4 s later than before the streams were written)."""
    encode((), (*STORED, "response_headers"), ())


def _array(kind: str, values: list) -> pa.Array:
    import pyarrow as pa

    if kind == "category":
        return pa.array(values, pa.string()).dictionary_encode()
    return pa.array(values, {"int": pa.int64(), "real": pa.float64(), "text": pa.string()}[kind])


def trace_header_pairs(headers: object) -> list[tuple[str, str]]:
    """``(name in lower case, value)`` of each of the stored response ``headers`` that
    :data:`RESPONSE_TRACE_HEADERS` names and whose value is text, in order (only text gives a trace id)."""
    pairs = [(name.lower(), value) for name, value in header_pairs(headers)]
    return [(name, value) for name, value in pairs if name in RESPONSE_TRACE_HEADERS and isinstance(value, str)]


def root_trace(headers: object) -> tuple[str, str | None, str] | None:
    """The trace id, span id (or None) and source a hop's stored response ``headers`` give it: of the
    headers :data:`RESPONSE_TRACE_HEADERS` names, the best-ranked that gives an id, the last of equals.
    A traceresponse gives both ids (lower case) when it parses; any other, its value, stripped, up to
    200 characters. None when no header gives one."""
    best, best_rank = None, len(RESPONSE_TRACE_HEADERS)
    for name, value in trace_header_pairs(headers):
        value, rank = value.strip(), RESPONSE_TRACE_HEADERS.index(name)
        if not value or rank > best_rank:
            continue
        if name != "traceresponse":
            best, best_rank = (value[:200], None, name), rank
        elif match := _TRACERESPONSE.match(value):
            best, best_rank = (match[1].lower(), match[2].lower(), name), rank
    return best


def _root_trace(trace_id: object, headers: object) -> tuple[str, str | None, str] | None:
    if trace_id is not None or not isinstance(headers, str):
        return None
    lowered = headers.lower()  # most hops name none: no JSON to parse
    if not any(name in lowered for name in RESPONSE_TRACE_HEADERS):
        return None
    return root_trace(headers)


def _stream(table: pa.Table) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def decode(rows: Iterable[tuple[object, object, object, object]]) -> list[Batch | None]:
    """Rows of :data:`TABLE` (first_id, last_id, hops, sightings) as :class:`Batch` es, None for each that is
    not exactly what :func:`encode` writes: the schemas, one row per id from ``first_id`` to ``last_id``,
    valid UTF-8, dictionaries without a repeated or NULL value, each sighting's offset inside the batch, the
    root traces as :func:`root_trace` gives them.

    The root traces are checked on all the batches at once, and one by one only when that fails: each
    check is a few pyarrow calls of ~20 us, 0.2 s over a million hops' batches one by one, 0.04 s at once."""
    import pyarrow as pa

    batches = [_decoded(*row) for row in rows]
    whole = [batch.hops for batch in batches if batch is not None]
    if whole and not _root_traces_as_written(pa.concat_tables(whole)):
        batches = [batch if batch is None or _root_traces_as_written(batch.hops) else None for batch in batches]
    return batches


def _decoded(first_id: object, last_id: object, hops: object, sightings: object) -> Batch | None:
    """A row of :data:`TABLE` as a :class:`Batch`, or None unless it passes every check of :func:`decode`
    but the root traces'."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not (isinstance(first_id, int) and isinstance(last_id, int) and isinstance(hops, bytes) and isinstance(sightings, bytes)):
        return None
    try:
        if _compressed(hops) or _compressed(sightings):
            return None
        hop_table = pa.ipc.open_stream(hops).read_all()
        sighting_table = pa.ipc.open_stream(sightings).read_all()
        if not (hop_table.schema.equals(_schemas()[0]) and sighting_table.schema.equals(_schemas()[1])):
            return None
        if first_id > last_id or hop_table.num_rows != last_id - first_id + 1:
            return None
        hop_table.validate(full=True)
        sighting_table.validate(full=True)
        for table in (hop_table, sighting_table):
            for column in table.columns:
                for chunk in column.chunks if pa.types.is_dictionary(column.type) else ():
                    if chunk.dictionary.null_count or len(pc.unique(chunk.dictionary)) != len(chunk.dictionary):
                        return None
        if any(column.null_count for column in sighting_table.columns):
            return None
        offsets = pc.min_max(sighting_table.column("offset"))
        if sighting_table.num_rows and not (0 <= offsets["min"].as_py() and offsets["max"].as_py() < hop_table.num_rows):
            return None
    except (pa.ArrowException, OSError, struct.error):
        return None
    return Batch(first_id, last_id, hop_table, sighting_table)


def _root_traces_as_written(hops: pa.Table) -> bool:
    """:data:`ROOT_TRACE` as :func:`encode` writes it (see :func:`root_trace`): only on hops without a trace
    id, the three NULL together but the span id, which a traceresponse alone gives (both ids in lower-case
    hex); any other source's trace id 1 to 200 characters, stripped (its end may be where it was cut)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        trace_id, span_id, source = (hops.column(name) for name in ROOT_TRACE)
        found = pc.is_valid(trace_id)
        if pc.any(pc.and_(found, pc.is_valid(hops.column("trace_id")))).as_py() or source.null_count != trace_id.null_count:
            return False
        named = pc.is_in(source.filter(found), value_set=pa.array(RESPONSE_TRACE_HEADERS, pa.string()))
        from_response = pc.fill_null(pc.equal(source, "traceresponse"), False)
        others = trace_id.filter(pc.and_(found, pc.invert(from_response)))
        length = pc.utf8_length(others)
        stripped = pc.and_(
            pc.equal(pc.utf8_ltrim_whitespace(others), others),
            pc.or_(pc.equal(length, 200), pc.equal(pc.utf8_rtrim_whitespace(others), others)),
        )
        # Each check on the hops it concerns: a regex over every hop of a million cost 0.03 s, over those 2 ms.
        checks = (
            named,
            pc.is_valid(span_id.filter(from_response)),
            pc.match_substring_regex(trace_id.filter(from_response), "^[0-9a-f]{32}$"),
            pc.match_substring_regex(span_id.filter(from_response), "^[0-9a-f]{16}$"),
            pc.and_(pc.greater_equal(length, 1), pc.less_equal(length, 200)),
            stripped,
        )
        return span_id.null_count == len(span_id) - (pc.sum(from_response).as_py() or 0) and all(
            pc.all(check).as_py() is not False for check in checks
        )
    except pa.ArrowException:  # a column not of the schema's type would make a check fail to run: not as written
        return False


def _compressed(stream: bytes) -> bool:
    """Whether a record batch of an IPC ``stream`` (or a dictionary's) has a compressed body, which
    :func:`encode` never writes: pyarrow decompresses whatever it reads, and a few kilobytes of a hostile
    file could ask it for gigabytes. Read from each message's flatbuffer (Arrow's ``Message.fbs``):
    Message's field 1 is the header's type (2 a DictionaryBatch, whose field 1 is its RecordBatch; 3 a
    RecordBatch), field 2 the header; a RecordBatch's field 3 is its compression, absent when none."""
    import pyarrow as pa

    reader = pa.ipc.MessageReader.open_stream(stream)
    while True:
        try:
            meta = reader.read_next_message().metadata.to_pybytes()
        except StopIteration:
            return False
        root = struct.unpack_from("<I", meta, 0)[0]
        kind = _field(meta, root, 1)
        header = _table_at(meta, root, 2)
        if kind and meta[kind] == 2 and header is not None:
            header = _table_at(meta, header, 1)
        if kind and meta[kind] in (2, 3) and header is not None and _field(meta, header, 3):
            return True


def _field(meta: bytes, table: int, field: int) -> int:
    """Where a flatbuffer table's ``field`` is in ``meta`` (0: absent)."""
    vtable = table - struct.unpack_from("<i", meta, table)[0]
    size = struct.unpack_from("<H", meta, vtable)[0]
    offset = struct.unpack_from("<H", meta, vtable + 4 + 2 * field)[0] if 4 + 2 * field < size else 0
    return table + offset if offset else 0


def _table_at(meta: bytes, table: int, field: int) -> int | None:
    """The table a flatbuffer table's ``field`` refers to."""
    at = _field(meta, table, field)
    return at + struct.unpack_from("<I", meta, at)[0] if at else None


@cache
def _schemas() -> tuple[pa.Schema, pa.Schema]:
    """The schemas :func:`encode` writes."""
    import pyarrow as pa

    kinds = {"int": pa.int64(), "real": pa.float64(), "text": pa.string(), "category": pa.dictionary(pa.int32(), pa.string())}
    hops = pa.schema([*((name, kinds[kind]) for name, kind in STORED.items()), *((name, pa.string()) for name in ROOT_TRACE)])
    return hops, pa.schema([("offset", pa.int64()), *((name, kinds["category"]) for name in _SIGHTINGS[1:])])


__all__ = [
    "COLUMN_DOCS",
    "DDL",
    "DESCRIPTION",
    "RESPONSE_TRACE_HEADERS",
    "ROOT_TRACE",
    "STORED",
    "TABLE",
    "TRIGGERS",
    "Batch",
    "create",
    "decode",
    "encode",
    "ensure_triggers",
    "insert",
    "prepare",
    "root_trace",
    "schema_key",
    "store",
    "trace_header_pairs",
]
