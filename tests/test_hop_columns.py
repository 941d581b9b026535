"""The batches' Arrow columns (``hop_columns``): written by the recorder with its rows, read by the
loader in their place, forgotten when the rows change, refused when they are not what the
recorder writes. Whatever the file holds, a load through them equals the load of the rows."""

from __future__ import annotations

import json
import random
import re
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hoptrace import _hop_columns as hop_columns
from hoptrace._types import Route
from hoptrace.addons import Counts, HopRows, write_batch
from hoptrace.addons._store import start_capture
from hoptrace.analyzer import _load, analyze, load
from hoptrace.analyzer._render import render_json
from hoptrace.db import HOP_COLUMNS, TOKEN_COLUMNS, open_for_writing

from .analyzer_fixtures import T0, same_tables

SAMPLES = sorted((Path(__file__).parent.parent / "sample_traces").glob("*.db"))

_TEXT = st.text(max_size=10)
_HEADER_NAMES = st.sampled_from(
    ["traceresponse", "TraceResponse", "X-Request-ID", "x-correlation-id", "Content-Type", "X-Request-Idx"]
)
_HEADER_VALUES = st.one_of(
    _TEXT,
    st.integers(),
    st.none(),
    st.builds(lambda t, s: f"00-{t:032x}-{s:016x}-01", st.integers(0, 2**128 - 1), st.integers(0, 2**64 - 1)),
)
_HOP = st.fixed_dictionaries(
    {
        "service": st.sampled_from(["gateway", "auth", "pay ment", "ü-svc"]),
        "method": st.sampled_from(["GET", "POST", "get", ""]),
        "path": st.one_of(st.sampled_from(["/a", "/b/1", "/ü"]), _TEXT),
        "status": st.one_of(st.none(), st.integers(100, 599), st.sampled_from([0, -1, 2**63 - 1])),
        "error": st.one_of(st.none(), _TEXT),
        "error_kind": st.one_of(st.none(), st.sampled_from(["timeout", "reset"])),
        "failed": st.integers(0, 1),
        "started_at": st.one_of(st.floats(T0 - 5, T0 + 5), st.sampled_from([1e-7, 2e10, 1e300, -1e300, 0.0])),
        "length": st.floats(0, 3),
        "response_start_at": st.one_of(st.none(), st.floats(T0 - 5, T0 + 5), st.just(1e300)),
        "trace_id": st.one_of(st.none(), st.text("0123456789abcdef", min_size=32, max_size=32), _TEXT),
        "span_id": st.one_of(st.none(), st.text("0123456789abcdef", min_size=16, max_size=16)),
        "parent_span_id": st.one_of(st.none(), st.text("0123456789abcdef", min_size=16, max_size=16)),
        "trace_source": st.one_of(st.none(), st.sampled_from(["traceparent", "b3"])),
        "server_date_ts": st.one_of(st.none(), st.floats(T0 - 5, T0 + 5), st.just(-2.5)),
        "client_conn_id": st.one_of(st.none(), _TEXT),
        "response_headers": st.one_of(
            st.none(), _TEXT, st.lists(st.tuples(_HEADER_NAMES, _HEADER_VALUES), max_size=3).map(json.dumps)
        ),
        "links": st.lists(
            st.tuples(
                st.sampled_from(["fp-a", "fp-b", "fp-ü"]),
                st.sampled_from(["presented", "validated"]),
                st.sampled_from(["header:authorization", "body:token"]),
            ),
            max_size=3,
        ),
    }
)


def _rows(hop: dict, capture_id: int, seen: set[str]) -> HopRows:
    """A hop as the row builder hands it to :func:`write_batch`: its hops row (no id), new tokens, links."""
    row = dict.fromkeys(HOP_COLUMNS)
    row.update({k: v for k, v in hop.items() if k in row}, capture_id=capture_id, flow_id="f", failed=hop["failed"])
    row["ended_at"] = hop["started_at"] + hop["length"]
    row["duration_ms"] = hop["length"] * 1000
    tokens = []
    for fingerprint, _, _ in hop["links"]:
        if fingerprint not in seen:
            seen.add(fingerprint)
            token = dict.fromkeys(TOKEN_COLUMNS, None) | {
                "fingerprint": fingerprint,
                "capture_id": capture_id,
                "kind": "opaque",
                "length": 9,
                "first_seen_at": T0,
            }
            tokens.append(tuple(token[c] for c in TOKEN_COLUMNS))
    return HopRows(tuple(row[c] for c in HOP_COLUMNS[1:]), tokens, list(hop["links"]))


def _record(path: Path, batches: list[tuple[list[dict], bool]]) -> int:
    """Write ``batches`` of hops as the recorder does, each with its Arrow columns or not; how many have them."""
    conn = open_for_writing(path)
    capture_id = start_capture(conn, [Route("gateway", "http://127.0.0.1:1", 1)], "gateway", False, "test")
    seen: set[str] = set()
    for hops, columns in batches:
        written = write_batch(
            conn, path, capture_id, [_rows(hop, capture_id, seen) for hop in hops], Counts(0, 0, 0, 0, 0), columns
        )
        assert (written.recorded, written.dropped, written.addon_errors) == (len(hops), 0, 0)
    conn.close()
    return sum(columns for _, columns in batches)


@pytest.mark.parametrize("reader", ["auto", "arrow"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batches=st.lists(st.tuples(st.lists(_HOP, min_size=1, max_size=6), st.booleans()), min_size=1, max_size=5))
def test_stored_columns_read_as_the_rows_they_stand_for(tmp_path_factory, monkeypatch, reader, batches):
    """Any hops the recorder writes, in batches with their columns and batches without (the writer
    thread's, before the row process starts): the load through the columns equals the load of
    the rows, the entry hops' trace ids from their responses and the token sightings included."""
    monkeypatch.setattr(_load, "_CHUNK", 4)  # the hops no batch covers are read in several ranges
    path = tmp_path_factory.mktemp("stored") / "t.db"
    stored = _record(path, batches)
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM hop_columns").fetchone()[0] == stored
    same_tables(load(path, reader=reader), load(path, reader="sqlite"))


_HOP_OF_THREE = {
    "service": "gateway", "method": "GET", "path": "/a", "status": 200, "error": None, "error_kind": None, "failed": 0,
    "started_at": T0, "length": 0.1, "response_start_at": None, "trace_id": None, "span_id": None, "parent_span_id": None,
    "trace_source": None, "server_date_ts": None, "client_conn_id": "c", "response_headers": '[["X-Request-ID", "req-1"]]',
    "links": [("fp-a", "presented", "header:authorization")],
}  # fmt: skip


def _three_batches(path: Path) -> Path:
    _record(path, [([dict(_HOP_OF_THREE, started_at=T0 + i) for i in range(5)], True) for _ in range(3)])
    return path


@pytest.mark.parametrize(
    "edit, forgotten",
    [
        ("UPDATE hops SET status = 599 WHERE id = 7", {6}),
        ("UPDATE hops SET request_headers = '[]', reason = 'x' WHERE id = 7", set()),  # columns no batch stores
        ("UPDATE hops SET id = 100 WHERE id = 12", {11}),
        ("DELETE FROM hops WHERE id = 1", {1}),
        ("INSERT OR REPLACE INTO hops SELECT * FROM hops WHERE id = 13", {11}),
        ("DELETE FROM hop_tokens WHERE hop_id = 7", {6}),
        ("INSERT INTO hop_tokens VALUES (3, 'fp-b', 'validated', 'body:token')", {1}),
        ("UPDATE hop_tokens SET hop_id = 14, role = 'validated' WHERE hop_id = 2", {1, 11}),
        ("INSERT INTO hop_tokens VALUES (5.5, 'fp-b', 'issued', 'body:token')", {1}),  # hop 5's, as reads CAST it
    ],
)
def test_a_change_to_a_batchs_hops_or_sightings_forgets_its_columns(tmp_path, edit, forgotten):
    """Any SQLite client's change to a stored column of a hop, or to a sighting, deletes the columns of
    the batch that held it (the schema's triggers): the load then reads its rows, change included."""
    path = _three_batches(tmp_path / "t.db")
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(edit)
        kept = {row[0] for row in conn.execute("SELECT first_id FROM hop_columns")}
    assert kept == {1, 6, 11} - forgotten
    same_tables(load(path, reader="auto"), load(path, reader="sqlite"))


def _ipc(table: pa.Table, compression: str | None = None) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _stored(conn: sqlite3.Connection, first_id: int) -> tuple[pa.Table, pa.Table]:
    blobs = conn.execute("SELECT hops, sightings FROM hop_columns WHERE first_id = ?", (first_id,)).fetchone()
    return tuple(pa.ipc.open_stream(blob).read_all() for blob in blobs)


def _replace_column(table: pa.Table, name: str, array: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), pa.field(name, array.type), array)


def _bad_text(n: int) -> pa.Array:
    """Strings whose bytes are not UTF-8 (an Arrow string array that would not validate)."""
    offsets = pa.array([0, *range(1, n + 1)], pa.int32()).buffers()[1]
    return pa.Array.from_buffers(pa.string(), n, [None, offsets, pa.py_buffer(b"\xff" * n)])


# Each: (what it breaks, SQL over the hop_columns row of batch 6, its parameters from the stored tables).
_REFUSED = {
    "random bytes": lambda hops, sightings, rng: ("hops", rng.randbytes(rng.randint(0, 300))),
    "cut short": lambda hops, sightings, rng: ("hops", _ipc(hops)[: rng.randint(0, len(_ipc(hops)) - 1)]),
    "text, not a blob": lambda hops, sightings, rng: ("hops", _ipc(hops).hex()),
    "one hop fewer": lambda hops, sightings, rng: ("hops", _ipc(hops.slice(1))),
    "a column renamed": lambda hops, sightings, rng: ("hops", _ipc(hops.rename_columns(["x", *hops.column_names[1:]]))),
    "a number as text": lambda hops, sightings, rng: ("hops", _ipc(_replace_column(hops, "status", pa.array(["200"] * hops.num_rows)))),
    "text not UTF-8": lambda hops, sightings, rng: ("hops", _ipc(_replace_column(hops, "trace_id", _bad_text(hops.num_rows)))),
    "a repeated category": lambda hops, sightings, rng: (
        "hops", _ipc(_replace_column(hops, "service", pa.DictionaryArray.from_arrays(pa.array([0, 1] * 2 + [0], pa.int32()), pa.array(["gateway", "gateway"])))),
    ),
    "a NULL category": lambda hops, sightings, rng: (
        "hops", _ipc(_replace_column(hops, "method", pa.DictionaryArray.from_arrays(pa.array([0] * 5, pa.int32()), pa.array([None], pa.string())))),
    ),
    "a sighting of no hop of the batch": lambda hops, sightings, rng: (
        "sightings", _ipc(_replace_column(sightings, "offset", pa.array([rng.choice([-1, 5, 2**40])] * sightings.num_rows, pa.int64()))),
    ),
    "the sightings' columns swapped": lambda hops, sightings, rng: ("sightings", _ipc(sightings.select([0, 2, 1, 3]))),
    # A compressed body could ask pyarrow for gigabytes: encode never writes one.
    "compressed": lambda hops, sightings, rng: ("hops", _ipc(hops, rng.choice(["zstd", "lz4"]))),
    "compressed sightings": lambda hops, sightings, rng: ("sightings", _ipc(sightings, "zstd")),
    "a NULL offset": lambda hops, sightings, rng: (
        "sightings", _ipc(_replace_column(sightings, "offset", pa.array([None] * sightings.num_rows, pa.int64()))),
    ),
    "a trace id from a response header no trace comes from": lambda hops, sightings, rng: (
        "hops", _ipc(_replace_column(hops, "root_trace_source", pa.array(["authorization"] * hops.num_rows))),
    ),
    "a trace id from the response of a hop with a trace id": lambda hops, sightings, rng: (
        "hops", _ipc(_replace_column(hops, "trace_id", pa.array(["t" * 32] * hops.num_rows))),
    ),
    "a trace id from a response, without its source": lambda hops, sightings, rng: (
        "hops", _ipc(_replace_column(hops, "root_trace_source", pa.array([None] * hops.num_rows, pa.string()))),
    ),
    "a span id from a header that gives none": lambda hops, sightings, rng: (
        "hops", _ipc(_replace_column(hops, "root_span_id", pa.array(["0" * 16] * hops.num_rows))),
    ),
    "a traceresponse's ids not in lower-case hex": lambda hops, sightings, rng: (
        "hops", _ipc(_replace_column(
            _replace_column(_replace_column(hops, "root_trace_source", pa.array(["traceresponse"] * hops.num_rows)), "root_span_id", pa.array(["0" * 16] * hops.num_rows)),
            "root_trace_id", pa.array([rng.choice(["A" * 32, "0" * 31, "req-1"])] * hops.num_rows),
        )),
    ),
    "a trace id from a response, not stripped": lambda hops, sightings, rng: (
        "hops", _ipc(_replace_column(hops, "root_trace_id", pa.array([rng.choice([" req-1", "req-1\n", "\u2003req-1"])] * hops.num_rows))),
    ),
    "a trace id from a response empty or too long": lambda hops, sightings, rng: (
        "hops", _ipc(_replace_column(hops, "root_trace_id", pa.array([rng.choice(["", "r" * 201])] * hops.num_rows))),
    ),
    "claims ids past the table's last": lambda hops, sightings, rng: ("first_id", 10**6 + rng.randint(0, 9)),
    "a hop of it deleted behind its trigger": lambda hops, sightings, rng: ("delete", rng.randint(0, 4)),
}  # fmt: skip


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(broken=st.lists(st.sampled_from(sorted(_REFUSED)), min_size=1, max_size=3), seed=st.integers(0, 2**32))
def test_columns_that_are_not_what_the_recorder_writes_are_read_as_rows(tmp_path_factory, broken, seed):
    """A batch's columns damaged or forged in any of these ways (on up to three batches at once)
    are refused, and their hops read as rows: the load equals the load of the rows alone."""
    rng = random.Random(seed)
    path = _three_batches(tmp_path_factory.mktemp("refused") / "t.db")
    with closing(sqlite3.connect(path)) as conn, conn:
        for kind, first_id in zip(broken, rng.sample([1, 6, 11], len(broken)), strict=True):
            column, value = _REFUSED[kind](*_stored(conn, first_id), rng)
            if column == "delete":  # by a client that dropped the triggers first: the batch's ids are no longer whole
                conn.execute("DROP TRIGGER hop_columns_hop_deleted")
                conn.execute("DELETE FROM hops WHERE id = ?", (first_id + value,))
                conn.execute(f"CREATE TRIGGER hop_columns_hop_deleted {hop_columns.TRIGGERS['hop_columns_hop_deleted']}")
            elif column == "first_id":  # a different claim for each batch broken so: first_id is the key
                value += 100 * first_id
                conn.execute("UPDATE hop_columns SET first_id = ?, last_id = ? + 4 WHERE first_id = ?", (value, value, first_id))
            else:
                conn.execute(f"UPDATE hop_columns SET {column} = ? WHERE first_id = ?", (value, first_id))
    same_tables(load(path, reader="auto"), load(path, reader="sqlite"))


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.stem)
def test_a_recorded_capture_analyses_the_same_through_its_stored_columns(path, tmp_path):
    """Each sample capture with every hop's columns stored (as the row process would have, in
    batches of 7 hops) gives the analysis, every finding included, that its rows give."""
    copy = tmp_path / path.name
    shutil.copyfile(path, copy)
    open_for_writing(copy).close()  # to schema 5
    with closing(sqlite3.connect(copy)) as conn, conn:
        last = conn.execute("SELECT max(id) FROM hops").fetchone()[0]
        assert all(hop_columns.store(conn, first, min(first + 6, last)) for first in range(1, last + 1, 7))
    same_tables(load(copy, reader="auto"), load(copy, reader="sqlite"))
    assert render_json(analyze(copy)) == render_json(analyze(path)).replace(str(path), str(copy))


_UNSEEN_BY_TRIGGERS = {
    # A rebuild of the table (sqlite-utils' transform, a tool's migration) drops its triggers.
    "triggers dropped, then a hop changed": ("DROP TRIGGER hop_columns_hop_changed; UPDATE hops SET status = 503 WHERE id = 2"),
    "a column dropped and added again (to scrub it)": (
        "DROP VIEW hops_readable; ALTER TABLE hops DROP COLUMN client_conn_id; ALTER TABLE hops ADD COLUMN client_conn_id TEXT"
    ),
    "first_id no longer the rowid": (
        "CREATE TABLE hc (first_id INTEGER PRIMARY KEY DESC, last_id INTEGER NOT NULL, tables TEXT NOT NULL,"
        " hops BLOB NOT NULL, sightings BLOB NOT NULL); INSERT INTO hc SELECT * FROM hop_columns ORDER BY first_id DESC;"
        " DROP TABLE hop_columns; PRAGMA legacy_alter_table = ON; ALTER TABLE hc RENAME TO hop_columns"
    ),
}


@pytest.mark.parametrize("script", _UNSEEN_BY_TRIGGERS.values(), ids=list(_UNSEEN_BY_TRIGGERS))
def test_changes_no_trigger_sees_leave_the_columns_unread(tmp_path, script):
    """Changes to the tables themselves fire no trigger: the file's tables and triggers are no longer
    those the columns were written under, and the load reads the rows, changes included."""
    path = _three_batches(tmp_path / "t.db")
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.executescript(script)
        assert conn.execute("SELECT count(*) FROM hop_columns").fetchone()[0] == 3  # still there, stale
    same_tables(load(path, reader="auto"), load(path, reader="sqlite"))


def test_a_writer_after_such_changes_forgets_the_stale_columns_and_loses_no_hop(tmp_path):
    """The recorder opening a file whose triggers were dropped makes them again and forgets every stored
    batch (rows may have changed meanwhile), so that the ids it gives again never meet stale columns."""
    path = _three_batches(tmp_path / "t.db")
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.executescript(
            "DROP TRIGGER hop_columns_hop_deleted; DELETE FROM hops WHERE id > 10; DELETE FROM hop_tokens WHERE hop_id > 10"
        )
    hop = {**_HOP_OF_THREE, "path": "/after"}
    _record(path, [([hop] * 5, True)])
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT first_id FROM hop_columns").fetchall() == [(11,)]
        assert conn.execute("SELECT count(*) FROM hops WHERE error IS NULL AND path = '/after'").fetchone()[0] == 5
    same_tables(load(path, reader="auto"), load(path, reader="sqlite"))


def test_sightings_left_by_deleted_hops_keep_the_next_batch_to_its_rows(tmp_path):
    """Hops deleted by a client that left their sightings (no foreign keys enforced): the recorder gives
    their ids again, and the rows count the old sightings with the new hops; it stores no columns then."""
    path = _three_batches(tmp_path / "t.db")
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("DELETE FROM hops WHERE id > 10")
    _record(path, [([_HOP_OF_THREE] * 5, True)])
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT first_id FROM hop_columns").fetchall() == [(1,), (6,)]
    same_tables(load(path, reader="auto"), load(path, reader="sqlite"))


def test_many_runs_of_columns_between_refused_ones_read_as_rows(tmp_path, monkeypatch):
    """More runs of adjacent batches than one query can name (every other batch refused): the longest are
    read from their columns, the rest as rows."""
    monkeypatch.setattr(_load, "_MAX_RUNS", 2)
    path = tmp_path / "t.db"
    _record(path, [([dict(_HOP_OF_THREE, started_at=T0 + i)], True) for i in range(9)])
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE hop_columns SET hops = X'00' WHERE first_id % 2 = 0")
    same_tables(load(path, reader="auto"), load(path, reader="sqlite"))


def _root_trace_by_rule(headers: str) -> tuple | None:
    """The rule :func:`hoptrace._hop_columns.root_trace` keeps, in its plainest form: every header that
    gives an id, worst source first (in order among equals), the last one standing."""
    rank = {name: i for i, name in enumerate(hop_columns.RESPONSE_TRACE_HEADERS)}
    found = None
    for name, value in sorted(hop_columns.trace_header_pairs(headers), key=lambda pair: rank[pair[0]], reverse=True):
        value = value.strip()
        parsed = re.match(r"[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}", value.lower())
        if value and name != "traceresponse":
            found = (value[:200], None, name)
        elif value and parsed:
            found = (parsed[1], parsed[2], name)
    return found


@settings(max_examples=500, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(
            _HEADER_NAMES,
            st.one_of(
                _HEADER_VALUES,
                st.sampled_from(["  ", "x" * 300]),
                st.builds(
                    lambda t, pad: f"{pad}00-{t:032X}-{t % 2**64:016x}-01{pad}",
                    st.integers(0, 2**128 - 1),
                    st.sampled_from(["", " ", "\u2003"]),
                ),
            ),
        ),
        max_size=5,
    )
)
def test_the_trace_id_a_response_gives_is_its_best_headers_last(pairs):
    headers = json.dumps(pairs)
    assert hop_columns.root_trace(headers) == _root_trace_by_rule(headers)
