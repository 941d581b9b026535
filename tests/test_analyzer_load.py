"""Loading a trace DB: untrusted files, a DB still being written, hostile values, time windows."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pandas as pd
import pytest
import sqlite_utils
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hoptrace._errors import AnalysisError, TraceFileError
from hoptrace.analyzer import AnalyzerConfig, _load, analyze, load
from hoptrace.analyzer._arrow_child import ArrowReadError, read_tables, sql_literal
from hoptrace.cli import cli
from hoptrace.db import HOP_COLUMNS, open_for_writing

from .analyzer_fixtures import T0, Builder, same_tables
from .hostile_files import mutants

SAMPLES = sorted((Path(__file__).parent.parent / "sample_traces").glob("*.db"))


def small(b: Builder | None = None) -> Builder:
    b = b or Builder()
    t = b.token(sub="alice", exp=100)
    root = b.hop("gateway", "GET /products", 0, 1, presented=t)
    b.hop("products", "GET /products", 0.1, 0.2, presented=t, parent=root)
    return b


def test_columns_and_types(tmp_path):
    t = load(small().write(tmp_path / "t.db"))
    assert list(t.hops.index) == [1, 2] and t.hops.index.name == "id"
    assert t.hops["started_at"].tolist() == [T0, T0 + 0.1]
    assert t.hops["status"].dtype == "Int64" and t.hops["failed"].tolist() == [0, 0]
    assert t.hops["duration_ms"].tolist() == pytest.approx([1000.0, 100.0], abs=1e-3)
    assert "request_headers" not in t.hops and "reason" not in t.hops
    assert t.tokens.loc[t.hop_tokens["fingerprint"].iloc[0], "sub"] == "alice"
    assert t.captures.loc[1, "entry"] == "gateway"
    every = load(tmp_path / "t.db", extra_columns="all")
    assert {"reason", "flow_id", "client_addr", "request_size"} <= set(every.hops.columns)
    assert "response_headers" not in every.hops
    with pytest.raises(ValueError, match="unknown hop column"):
        load(tmp_path / "t.db", extra_columns=("nope",))


def test_a_db_without_hops(tmp_path):
    path = Builder().write(tmp_path / "empty.db")
    a = analyze(path)
    assert a.hops.empty and a.findings.empty and a.sessions.empty and a.services.empty


def test_reading_while_the_proxy_writes(tmp_path):
    path = tmp_path / "live.db"
    writer = open_for_writing(path)  # WAL, as the recorder has it
    writer.execute(
        "INSERT INTO captures (id, started_at, routes, entry, hoptrace_version, mitmproxy_version) VALUES (1, ?, '[]', 'gateway', 'x', 'y')",
        (T0,),
    )
    rows = [dict.fromkeys(HOP_COLUMNS) for _ in range(3)]
    for i, row in enumerate(rows, 1):
        row.update(
            id=i,
            capture_id=1,
            flow_id=str(i),
            service="gateway",
            failed=0,
            started_at=T0 + i,
            ended_at=T0 + i + 0.5,
            duration_ms=500.0,
        )
    insert = f"INSERT INTO hops VALUES ({', '.join('?' * len(HOP_COLUMNS))})"
    writer.executemany(insert, ([r[c] for c in HOP_COLUMNS] for r in rows[:2]))
    writer.execute("BEGIN IMMEDIATE")  # a batch in flight: not committed, not seen
    writer.execute(insert, [rows[2][c] for c in HOP_COLUMNS])
    try:
        a = analyze(path)
        assert list(a.hops.index) == [1, 2]
    finally:
        writer.execute("COMMIT")
    assert list(analyze(path).hops.index) == [1, 2, 3]
    writer.close()


def test_hostile_values_do_not_break_the_load(tmp_path):
    b = small()
    b.hop("cart", "GET /x", 0.3, 0.4)
    path = b.write(tmp_path / "hostile.db")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE hops SET status = 'teapot', path = X'2F6361727473FF2FC3', server_date_ts = 'soon' WHERE id = 1")
        conn.execute("UPDATE hops SET method = 42, error = X'00', trace_id = X'FF' WHERE id = 2")
        conn.execute("UPDATE hops SET started_at = 'at noon' WHERE id = 3")
        conn.execute("UPDATE tokens SET exp = 'never', sub = 7")
        conn.execute("INSERT INTO hop_tokens VALUES (2, 'no-such-token', 'presented', 'header:authorization')")
        conn.execute(
            "UPDATE hops SET response_headers = '[[\"traceresponse\", 5], \"junk\", [1]]', request_headers = 'not json' WHERE id = 1"
        )
    a = analyze(path)
    assert list(a.hops.index) == [1, 2]
    assert any("without a valid start" in note for note in a.notes)
    assert a.hops.loc[2, "failed"] == 1  # an error, even as bytes, is a failure
    assert "\ufffd" in a.hops.loc[1, "path"]
    assert pd.isna(a.hops.loc[1, "token_exp"])


def test_since_and_until_keep_whole_requests_that_started_in_the_window(tmp_path):
    b = Builder()
    for i in range(5):  # requests at 0, 10, 20, 30, 40 s; each 5 s long with a call near its end
        root = b.hop("gateway", "GET /a", 10 * i, 10 * i + 5)
        b.hop("auth", "GET /v", 10 * i + 4, 10 * i + 4.5, parent=root)
    path = b.write(tmp_path / "w.db")
    a = analyze(path, since=T0 + 10, until=T0 + 21)
    assert sorted(a.sessions["trace"]) == [3, 5] and len(a.hops) == 4
    iso = analyze(path, since="2023-11-14T22:13:50Z")
    assert sorted(iso.sessions["trace"]) == [7, 9]
    assert analyze(path, since=T0 + 100).hops.empty
    with pytest.raises(AnalysisError, match="since"):
        analyze(path, since="yesterday")
    with pytest.raises(AnalysisError, match="after until"):
        analyze(path, since=T0 + 5, until=T0)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b""), "not a hoptrace trace database"),
        (lambda p: p.write_text("hello, I am a text file\n" * 50), "not a readable SQLite database"),
        (
            lambda p: sqlite3.connect(p).execute("CREATE TABLE users (id INTEGER)").connection.commit(),
            "not a hoptrace trace database",
        ),
        (lambda p: None, "no such file"),
    ],
    ids=["empty", "text", "other-tables", "missing"],
)
def test_bad_files_are_one_line_errors(tmp_path, make, message):
    path = tmp_path / "bad.db"
    make(path)
    with pytest.raises(TraceFileError, match=message) as info:
        analyze(path)
    assert "\n" not in str(info.value)


def test_newer_schema_and_corrupt_file(tmp_path):
    newer = small().write(tmp_path / "newer.db")
    with sqlite3.connect(newer) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(TraceFileError, match="newer"):
        analyze(newer)
    corrupt = corrupt_db(tmp_path)
    with pytest.raises(TraceFileError) as info:
        analyze(corrupt)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("reader", ["sqlite", "arrow"])
def test_a_corrupt_file_whose_reads_fail_oddly_gets_the_checks_verdict(tmp_path, monkeypatch, reader):
    """The structure check starts once the reads are done; when they raise before that with
    something no handler phrases (damage read as garbage), the check still runs and its verdict
    is the error, not the garbage's."""
    path = corrupt_db(tmp_path, hops=3000, damaged_hop=1500)
    with pytest.raises(TraceFileError) as unpatched:
        load(path, reader=reader)

    def garbled(*args):
        raise ValueError("garbage where a number belongs")

    monkeypatch.setattr(_load, "_finish", garbled)
    with pytest.raises(TraceFileError) as info:
        load(path, reader=reader)
    assert str(info.value) == str(unpatched.value) and "malformed" in str(info.value)


def test_a_check_left_to_the_caller_runs_beside_its_work_and_its_verdict_comes_last(tmp_path, monkeypatch):
    path = small().write(tmp_path / "t.db")
    checking, verdict = threading.Event(), threading.Event()

    def held_check(conn, path):
        checking.set()
        assert verdict.wait(30)
        raise TraceFileError(f"{path}: database is corrupt (held)")

    monkeypatch.setattr(_load, "check_structure", held_check)
    with pytest.raises(TraceFileError, match="corrupt"), ExitStack() as checks:
        tables = load(path, checks=checks)
        # The tables are here while the check is still under way.
        assert checking.wait(30) and not verdict.is_set() and len(tables.hops) == len(small().hops)
        verdict.set()
        raise ValueError("whatever the caller's work made of what a corrupt file reads as")


def test_a_check_left_to_the_caller_lets_ctrl_c_through_at_once(tmp_path, monkeypatch):
    path = small().write(tmp_path / "t.db")
    released = threading.Event()

    def held_check(conn, path):
        assert released.wait(30), "the caller waited for the verdict"

    monkeypatch.setattr(_load, "check_structure", held_check)
    try:
        with pytest.raises(KeyboardInterrupt), ExitStack() as checks:
            load(path, checks=checks)
            raise KeyboardInterrupt
    finally:
        released.set()


@pytest.mark.parametrize("deferred", [False, True])
def test_a_check_that_cannot_open_the_file_is_one_line_not_sqlites_error(tmp_path, monkeypatch, deferred):
    path = small().write(tmp_path / "t.db")

    def vanished(conn, path):
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(_load, "check_structure", vanished)
    with pytest.raises(TraceFileError, match=r"t\.db: cannot read the trace database \(unable to open database file\)"):
        if deferred:
            analyze(path)
        else:
            load(path)


def test_a_file_whose_reads_fail_is_checked_once(tmp_path, monkeypatch):
    path = corrupt_db(tmp_path, hops=3000, damaged_hop=1500)
    runs = []
    real = _load.check_structure
    monkeypatch.setattr(_load, "check_structure", lambda conn, path: runs.append(path) or real(conn, path))
    with pytest.raises(TraceFileError, match="malformed"):
        analyze(path)
    assert len(runs) == 1


def test_an_index_damaged_where_no_read_goes_still_fails_the_analysis(tmp_path):
    """The reads never use the tokens' ``sub`` index: the analysis runs to its end on sound
    rows, and the structure check, left to run beside it, still refuses the file."""
    b = Builder()
    for i in range(300):
        b.hop("gateway", f"GET /{i}", i, i + 0.5, presented=b.token(sub=f"user-{i}", exp=10_000))
    path = b.write(tmp_path / "t.db")
    with sqlite3.connect(path) as conn:
        (root,) = conn.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'tokens_sub'").fetchone()
    conn.close()
    data = bytearray(path.read_bytes())
    page = (root - 1) * 4096  # pages count from 1
    data[page : page + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(TraceFileError, match="corrupt"), ExitStack() as checks:
        assert len(load(path, checks=checks).hops) == 300  # the reads alone find nothing wrong
    with pytest.raises(TraceFileError, match="corrupt") as info:
        analyze(path)
    assert "\n" not in str(info.value)


def corrupt_db(tmp_path: Path, hops: int = 300, damaged_hop: int | None = None) -> Path:
    """A capture of ``hops`` hops with one page header of its hops table overwritten: the fourth
    page, or the page holding hop ``damaged_hop`` (in the middle, what the loader asks before the
    reads, counts, id bounds and tokens, never reaches it; the reads and the check do)."""
    b = Builder()
    for i in range(hops):
        b.hop("gateway", f"GET /{i}", i, i + 0.5)
    path = b.write(tmp_path / "corrupt.db")
    data = bytearray(path.read_bytes())
    # The files' pages are 4 KiB; a page's b-tree header opens it.
    page = 4096 * 3 if damaged_hop is None else data.index(f"/{damaged_hop}".encode()) // 4096 * 4096
    data[page : page + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    return path


def test_config_is_validated():
    with pytest.raises(AnalysisError, match="near_expiry_s"):
        AnalyzerConfig(near_expiry_s=-1)
    with pytest.raises(AnalysisError, match="retry_min"):
        AnalyzerConfig(retry_min=0)
    with pytest.raises(AnalysisError, match="regular expression"):
        AnalyzerConfig(validation_patterns=("(",))
    assert json.dumps(AnalyzerConfig().validation_patterns)


def test_entry_hops_take_their_trace_id_from_the_response_whatever_the_header_case(tmp_path):
    b = Builder()
    for i in range(3):
        b.hop("gateway", "GET /a", i, i + 0.5)
    b.hop("gateway", "GET /b", 5, 5.5)  # no such header: stays without a trace id
    trace, span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    b.hop("auth", "GET /v", 0.1, 0.2, trace_id=trace, trace_source="traceparent")  # the stack propagates
    path = b.write(tmp_path / "r.db")
    with sqlite3.connect(path) as conn:
        for hop_id, headers in (
            (1, [["TraceResponse", f"00-{trace.upper()}-{span}-01"]]),
            (2, [["X-Request-ID", " req-42 "]]),
            (3, [["x-request-id", "req-7"], ["traceresponse", f"00-{'a' * 32}-{'b' * 16}-01"]]),  # the best source wins
        ):
            conn.execute("UPDATE hops SET response_headers = ? WHERE id = ?", (json.dumps(headers), hop_id))
        conn.execute('UPDATE hops SET response_headers = \'[["server", "x-request-id-less"]]\' WHERE id = 4')
    hops = load(path).hops
    assert hops.loc[1, ["trace_id", "span_id", "trace_source"]].tolist() == [trace, span, "traceresponse"]
    assert hops.loc[2, ["trace_id", "trace_source"]].tolist() == ["req-42", "x-request-id"]
    assert hops.loc[3, "trace_id"] == "a" * 32
    assert pd.isna(hops.loc[4, "trace_id"])


@pytest.mark.parametrize("reader", ["sqlite", "arrow"])
def test_a_repeated_hop_id_keeps_the_trace_id_of_the_hop_kept(tmp_path, reader):
    """In a hops table without its key, the first hop of an id is kept, with its own response's trace
    id (or its own propagated one), never that of a later copy the notes say was ignored."""
    b = Builder()
    b.hop("gateway", "GET /a", 0, 0.5)
    b.hop("gateway", "GET /b", 1, 1.5)
    b.hop("gateway", "GET /c", 2, 2.5, trace_id="c" * 32, trace_source="traceparent")
    path = b.write(tmp_path / "r.db")
    with sqlite3.connect(path) as conn:
        for hop_id, headers in ((1, [["traceresponse", f"00-{'a' * 32}-{'b' * 16}-01"]]), (2, [["x-request-id", "req-A"]])):
            conn.execute("UPDATE hops SET response_headers = ? WHERE id = ?", (json.dumps(headers), hop_id))
        conn.execute("PRAGMA legacy_alter_table = ON")  # the views keep naming hops
        conn.executescript(
            "ALTER TABLE hops RENAME TO keyed; CREATE TABLE hops AS SELECT * FROM keyed; DROP TABLE keyed;"
            " INSERT INTO hops SELECT * FROM hops WHERE id IN (1, 2, 3)"
        )
        for rowid, headers in ((4, [["x-request-id", "req-B1"]]), (5, [["traceresponse", f"00-{'d' * 32}-{'e' * 16}-01"]])):
            conn.execute("UPDATE hops SET response_headers = ? WHERE rowid = ?", (json.dumps(headers), rowid))
        conn.execute("UPDATE hops SET trace_id = NULL, response_headers = '[[\"x-request-id\", \"req-B3\"]]' WHERE rowid = 6")
    tables = load(path, reader=reader)
    assert "3 hops whose id repeated an earlier one were ignored" in tables.notes
    rows = tables.hops[["trace_id", "span_id", "trace_source"]].astype(object).values.tolist()
    assert [[None if pd.isna(v) else v for v in row] for row in rows] == [
        ["a" * 32, "b" * 16, "traceresponse"], ["req-A", None, "x-request-id"], ["c" * 32, None, "traceparent"],
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("table", "column"), [("captures", "entry"), ("tokens", "exp"), ("hops", "error_kind"), ("hop_tokens", "role")]
)
def test_a_missing_column_reads_as_empty_and_says_so(tmp_path, table, column):
    path = small().write(tmp_path / "t.db")
    with sqlite3.connect(path) as conn:
        conn.execute(f"DROP INDEX IF EXISTS {'tokens_sub' if table == 'tokens' else 'none'}")
        if column == "role":  # part of the primary key: no transform keeps the table whole without it
            _rebuild_without_key(conn, "hop_tokens", "hop_id, fingerprint, location")
        else:
            sqlite_utils.Database(conn)[table].transform(drop={column})
    a = analyze(path)
    assert f"table {table} has no column {column}: read as empty" in a.notes
    assert list(a.hops.index) == [1, 2]
    if column == "exp":
        assert a.hops["token_exp"].isna().all()


def _rebuild_without_key(conn, table: str, columns: str) -> None:
    """``table`` made again from ``columns`` with CREATE TABLE ... AS: no primary key, no constraint."""
    for (view,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'view'").fetchall():
        conn.execute(f"DROP VIEW {view}")  # they name the tables: SQLite refuses a rename under them
    conn.execute(f"CREATE TABLE rebuilt AS SELECT {columns} FROM {table}")
    conn.execute(f"DROP TABLE {table}")
    conn.execute(f"ALTER TABLE rebuilt RENAME TO {table}")


def test_a_hops_table_without_its_primary_key(tmp_path):
    path = small().write(tmp_path / "t.db")
    with sqlite3.connect(path) as conn:
        _rebuild_without_key(conn, "hops", "*")
        conn.execute("INSERT INTO hops SELECT * FROM hops WHERE id = 2")  # id 2 twice
        conn.execute("INSERT INTO hops SELECT * FROM hops WHERE id = 1 LIMIT 1")
        conn.execute("UPDATE hops SET id = 'three' WHERE rowid = 4")
    a = analyze(path)
    assert list(a.hops.index) == [1, 2]
    assert "1 hops whose id repeated an earlier one were ignored" in a.notes
    assert "1 hops without a whole-number id were ignored" in a.notes
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE hops DROP COLUMN started_at")
    with pytest.raises(TraceFileError, match="table hops has no column started_at"):
        analyze(path)


def test_absurd_times_read_as_unknown(tmp_path):
    path = small().write(tmp_path / "t.db")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE tokens SET iat = 2e10, nbf = exp + 5")
        conn.execute("UPDATE hops SET response_start_at = 1e-7, server_date_ts = 9e300 WHERE id = 1")
        conn.execute("UPDATE hops SET started_at = 1e20 WHERE id = 2")
    a = analyze(path)
    assert list(a.hops.index) == [1]
    fp = a.hop_tokens["fingerprint"].iloc[0]
    assert pd.isna(a.tokens.loc[fp, "iat"]) and pd.isna(a.tokens.loc[fp, "nbf"]) and a.tokens.loc[fp, "exp"] == T0 + 100
    assert pd.isna(a.hops.loc[1, "response_start_at"])
    assert "2 hop times outside 2000-2100 were read as unknown" in a.notes
    assert "1 token times (iat, nbf, exp, first seen) outside 2000-2100 were read as unknown" in a.notes
    assert "1 token nbf claims later than the token's exp were ignored" in a.notes


def test_a_schema_whose_error_message_is_not_utf8(tmp_path):
    """SQLite quotes the damaged name in its error; Python then raises UnicodeDecodeError, not sqlite3.Error."""
    path = small().write(tmp_path / "t.db")
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA writable_schema = ON")
        damaged = "name = CAST(X'82' AS TEXT), sql = CAST(X'435245415445204920827E' AS TEXT)"  # "CREATE I \x82~"
        conn.execute(f"UPDATE sqlite_master SET {damaged} WHERE name = 'tokens_sub'")
    for args in (["analyze", str(path)], ["plot", str(path), "-o", str(tmp_path / "x.png")]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and result.stderr.startswith(f"Error: {path}: not a readable SQLite database"), result.stderr


# Any SQLite value: NULL, whole numbers, reals, text (also with NUL and non-ASCII), blobs (also invalid UTF-8).
_ANY_VALUE = st.one_of(
    st.none(),
    st.integers(-(2**62), 2**62),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.binary(max_size=8),
)
_TEXT_COLUMNS = ("method", "path", "error", "client_conn_id")


@pytest.mark.parametrize("reader", ["sqlite", "arrow"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), hops=st.integers(1, 10), null_head=st.integers(0, 10))
def test_any_mix_of_values_reads_as_sqlite_gives_them_whatever_the_batches(
    tmp_path_factory, monkeypatch, reader, data, hops, null_head
):
    """Whatever a hop column holds, and however its values mix (NULL for the first rows and anything
    later: trace headers that start mid-capture, a hostile file), read in ranges of 5 ids on several
    connections, each value reads exactly as sqlite3 reads it: text as text (invalid UTF-8 as
    U+FFFD), numbers as numbers. Through Arrow too, whose driver types a column by its first rows."""
    monkeypatch.setattr(_load, "_CHUNK", 5)
    b = Builder()
    for i in range(hops):
        b.hop("gateway", "GET /a", i, i + 0.5)
    path = b.write(tmp_path_factory.mktemp("mix") / "t.db")
    columns = (*_TEXT_COLUMNS, "status", "port")
    with sqlite3.connect(path) as conn:
        for hop_id in range(1, hops + 1):
            values = [None if hop_id <= null_head else data.draw(_ANY_VALUE) for _ in columns]
            conn.execute(f"UPDATE hops SET {', '.join(f'{c} = ?' for c in columns)} WHERE id = ?", (*values, hop_id))
    got = load(path, extra_columns=("client_conn_id", "port"), reader=reader).hops
    with sqlite3.connect(path) as conn:
        conn.text_factory = lambda raw: raw.decode("utf-8", "replace")
        # A number where a whole number belongs reads as one (CAST); anything else as unknown.
        numbers = [f"CASE WHEN typeof({c}) IN ('integer', 'real') THEN CAST({c} AS INTEGER) END" for c in ("status", "port")]
        select = ", ".join([*(f"CAST({c} AS TEXT)" for c in _TEXT_COLUMNS), *numbers])
        want = {row[0]: row[1:] for row in conn.execute(f"SELECT id, {select} FROM hops ORDER BY id")}
    assert list(got.index) == list(want)
    for hop_id, row in want.items():
        read = [None if pd.isna(v) else v for v in got.loc[hop_id, [*_TEXT_COLUMNS, "status", "port"]].astype(object)]
        assert read == list(row)


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.stem)
def test_both_readers_give_the_same_tables(path, monkeypatch):
    """Arrow (in its child process) and sqlite3 read a recorded capture into equal frames, dtypes
    included; in ranges of 40 ids, so that the Arrow reads run on several connections at once."""
    monkeypatch.setattr(_load, "_CHUNK", 40)
    same_tables(load(path, reader="arrow"), load(path, reader="sqlite"))
    window = (T0, 2e9) if "clean" in path.stem else (None, None)
    same_tables(load(path, reader="arrow", since=window[0], until=window[1]), load(path, reader="sqlite", since=window[0], until=window[1]))


def test_the_arrow_reader_sees_one_snapshot_while_a_writer_commits(tmp_path, monkeypatch):
    """The capture the Arrow reader's child reads while the recorder (another copy of SQLite, in
    this process) commits batches: every load is a whole prefix of what was committed (hops
    1..n, each with its sighting), and the file stays sound. Two copies of SQLite in one
    process lose each other's locks; here they live in two processes."""
    monkeypatch.setattr(_load, "_CHUNK", 300)
    b = Builder()
    token = b.token(sub="alice", exp=10_000)
    b.hop("gateway", "GET /a", 0, 0.5, presented=token)
    path = b.write(tmp_path / "live.db")
    open_for_writing(path).close()  # WAL, as the recorder leaves it (the switch needs the file to itself)
    stop, recording, batches = threading.Event(), threading.Event(), 0

    def record() -> None:
        nonlocal batches
        writer = open_for_writing(path)
        recording.set()
        next_id, deadline = 2, time.monotonic() + 30
        while not stop.is_set() and batches < 400 and time.monotonic() < deadline:
            rows = []
            for hop_id in range(next_id, next_id + 25):
                row = dict.fromkeys(HOP_COLUMNS)
                row.update(id=hop_id, capture_id=1, flow_id=str(hop_id), service="gateway", method="GET", path="/a",
                           failed=0, started_at=T0 + hop_id, ended_at=T0 + hop_id + 0.5, duration_ms=500.0)  # fmt: skip
                rows.append(row)
            writer.execute("BEGIN IMMEDIATE")  # a batch and its sightings in one commit, as the recorder writes them
            writer.executemany(f"INSERT INTO hops VALUES ({', '.join('?' * len(HOP_COLUMNS))})", ([r[c] for c in HOP_COLUMNS] for r in rows))
            writer.executemany("INSERT INTO hop_tokens VALUES (?, ?, 'presented', 'header:authorization')", ((r["id"], token) for r in rows))
            writer.execute("COMMIT")
            next_id += 25
            batches += 1
        writer.close()

    thread = threading.Thread(target=record)
    thread.start()
    try:
        assert recording.wait(10)
        sizes = []
        for _ in range(4):
            tables = load(path, reader="arrow")
            n = len(tables.hops)
            assert list(tables.hops.index) == list(range(1, n + 1))
            assert sorted(tables.hop_tokens["hop_id"]) == list(range(1, n + 1))
            sizes.append(n)
    finally:
        stop.set()
        thread.join()
    assert sizes == sorted(sizes) and batches > 0
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert len(load(path, reader="arrow").hops) == 1 + 25 * batches


def test_the_arrow_child_refuses_what_it_cannot_read_and_says_why(tmp_path):
    path = small().write(tmp_path / "t.db")
    uri = path.resolve().as_uri() + "?mode=ro"
    [table] = read_tables(uri, ["SELECT 0, '' UNION ALL SELECT id, service FROM hops ORDER BY 1"], 1)
    assert table.to_pydict() == {"0": [1, 2], "''": ["gateway", "products"]}  # the type sample dropped
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE hops SET path = CAST(X'2FFF' AS TEXT) WHERE id = 2")
    with pytest.raises(ArrowReadError, match="UTF8"):
        list(read_tables(uri, ["SELECT '' UNION ALL SELECT path FROM hops"], 1))
    with pytest.raises(ArrowReadError, match="no such table"):
        list(read_tables(uri, ["SELECT 0", "SELECT 0 UNION ALL SELECT id FROM missing_table"], 2))
    # The loader then reads the file through sqlite3: the same tables, the bad byte as U+FFFD.
    arrow = load(path, reader="arrow")
    same_tables(arrow, load(path, reader="sqlite"))
    assert arrow.hops.loc[2, "path"] == "/\ufffd"


@settings(max_examples=60, deadline=None)
@given(value=st.one_of(st.text(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False)))
def test_a_value_put_in_sql_as_a_literal_reads_back_as_itself(value):
    """The Arrow reader's queries carry their values as literals (entry routes from the file itself
    among them): no text, however hostile (quotes, NUL, comment marks), is ever read as SQL."""
    conn = sqlite3.connect(":memory:")
    assert conn.execute(f"SELECT {sql_literal(value)}").fetchone()[0] == value


def test_without_a_python_to_start_the_arrow_reader_the_load_reads_through_sqlite(tmp_path, monkeypatch):
    """An embedded Python may have no interpreter to start (``sys.executable`` empty or gone): the
    Arrow reader cannot run, and the load reads the file in this process instead."""
    path = small().write(tmp_path / "t.db")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    with pytest.raises(ArrowReadError, match="cannot start the reader"):
        list(read_tables(path.resolve().as_uri() + "?mode=ro", ["SELECT 1"], 1))
    same_tables(load(path, reader="arrow"), load(path, reader="sqlite"))


def test_a_reader_that_exits_before_reading_its_request_hands_the_load_to_sqlite(tmp_path, monkeypatch):
    """A child that is gone before it reads (no usable Python behind ``sys.executable``): writing the
    request breaks the pipe; that is the reader's error, and the load reads through sqlite3."""
    path = small().write(tmp_path / "t.db")
    monkeypatch.setattr(sys, "executable", shutil.which("false"))
    # Past the pipe's 64 KiB buffer the write waits for a reader, so the pipe breaks whatever the timing.
    big = "SELECT 0 UNION ALL SELECT 1 -- " + "x" * 200_000
    with pytest.raises(ArrowReadError):
        list(read_tables(path.resolve().as_uri() + "?mode=ro", [big], 1))
    same_tables(load(path, reader="arrow"), load(path, reader="sqlite"))


def test_both_readers_agree_on_damaged_and_hostile_files(tmp_path, monkeypatch):
    """Mutated copies of a recorded capture (flipped bytes, dropped columns, no primary key,
    invalid UTF-8, absurd numbers): the Arrow reader, whose SQLite is another version, gives
    the tables the sqlite3 reads give, or the same one-line error."""
    monkeypatch.setattr(_load, "_CHUNK", 30)
    seen = set()
    for path, kind in mutants(SAMPLES[0], tmp_path, 15, seed=3):
        results = []
        for reader in ("arrow", "sqlite"):
            try:
                results.append(load(path, reader=reader))
            except TraceFileError as exc:
                results.append(str(exc))
        arrow, sqlite = results
        if isinstance(sqlite, str):
            assert arrow == sqlite, (kind, path.name)
        else:
            same_tables(arrow, sqlite)
        seen.add((kind, isinstance(sqlite, str)))
    assert ("flip_bytes", True) in seen and ("invalid_utf8", False) in seen  # both outcomes were tried


def _arrow_children() -> list[int]:
    """This process's children running the Arrow reader."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            cmdline = (status.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(os.getpid()) and b"_arrow_child" in cmdline:
            found.append(int(status.parent.name))
    return found


# Counts to 3e8 in SQLite: half a minute or more, so a test that is back within 10 s did not wait for it.
_SLOW_QUERY = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 300000000) SELECT max(x) FROM c"


def test_a_reader_closed_early_stops_its_child_at_once(tmp_path):
    """The loader makes each id range into its part while the child reads the next ones: when that
    work fails, closing the reader kills the child instead of waiting for reads nobody wants."""
    path = small().write(tmp_path / "t.db")
    tables = read_tables(path.resolve().as_uri() + "?mode=ro", ["SELECT 0 UNION ALL SELECT 1", _SLOW_QUERY], 1)
    started = time.monotonic()
    assert next(tables).column(0).to_pylist() == [1]
    tables.close()
    # Back within 10 s: the child was not waited for.
    assert time.monotonic() - started < 10
    assert _arrow_children() == []


class _Interrupted(Exception):
    pass


def test_an_interrupted_load_stops_the_arrow_reader_at_once(tmp_path):
    """Ctrl-C (here an alarm) while the child reads: the child is killed, not waited for."""
    path = small().write(tmp_path / "t.db")

    def interrupt(signum, frame):
        raise _Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    started = time.monotonic()
    try:
        with pytest.raises(_Interrupted):
            list(read_tables(path.resolve().as_uri() + "?mode=ro", [_SLOW_QUERY], 1))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    # Back within 10 s: the child was not waited for.
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 5
    while _arrow_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _arrow_children() == []
