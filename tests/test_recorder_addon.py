"""The recorder addon under mitmproxy's own test harness (taddons / tflow), writing a real SQLite file."""

from __future__ import annotations

import gc
import gzip
import json
import re
import sqlite3
import time
import tracemalloc
import weakref
from pathlib import Path

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow, tutils

from hoptrace.addons import Recorder
from hoptrace.db import SCHEMA_VERSION

from .conftest import file_bytes, query

SECRET = "a-32-byte-secret-for-hs256-tests!"


def make_token(sub: str = "alice", ttl: float = 60) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + ttl, "jti": f"{sub}-{now}"}, SECRET, algorithm="HS256")


def record(db, *flows, **options) -> "Counters":  # noqa: F821
    """Run each flow through the hooks mitmproxy would fire, then close: returns the counters."""
    recorder = Recorder()
    with taddons.context(recorder) as tctx:
        tctx.configure(recorder, hoptrace_db=str(db), hoptrace_service=["gateway@8080"], **options)
        for flow in flows:
            flow.client_conn.sockname = ("127.0.0.1", 8080)  # the listener it arrived on
            recorder.requestheaders(flow)
            if flow.error is not None:
                recorder.error(flow)
            else:
                recorder.response(flow)
        recorder.done()
        return recorder.close()


def test_one_row_per_flow_with_timings_and_service(tmp_path):
    db = tmp_path / "t.db"
    counters = record(db, tflow.tflow(resp=True), tflow.tflow(err=True))
    assert (counters.seen, counters.recorded, counters.dropped, counters.addon_errors) == (2, 2, 0, 0)
    hops = query(db, "SELECT * FROM hops ORDER BY id")
    assert [h["status"] for h in hops] == [200, None]
    assert [h["failed"] for h in hops] == [0, 1]
    assert hops[1]["error"] == "error" and hops[1]["error_kind"] == "other"
    for hop in hops:
        assert hop["service"] == "gateway"
        assert hop["started_at"] <= hop["ended_at"]
        assert hop["duration_ms"] == pytest.approx((hop["ended_at"] - hop["started_at"]) * 1000)
    assert hops[0]["started_at"] <= hops[0]["response_start_at"] <= hops[0]["ended_at"]
    capture = query(db, "SELECT * FROM captures")[0]
    assert (capture["hops_seen"], capture["hops_recorded"], capture["entry"]) == (2, 2, "gateway")
    assert capture["ended_at"] >= capture["started_at"]
    assert query(db, "PRAGMA user_version")[0][0] == SCHEMA_VERSION


def test_status_200_with_error_is_recorded_as_both(tmp_path):
    flow = tflow.tflow(resp=True, err=True)
    flow.error.msg = "peer closed connection without sending complete message body"
    db = tmp_path / "t.db"
    record(db, flow)
    hop = query(db, "SELECT status, error, error_kind, failed FROM hops")[0]
    assert tuple(hop) == (200, flow.error.msg, "truncated", 1)


def test_tokens_found_everywhere_and_stored_only_as_fingerprints(tmp_path):
    presented, in_query, in_cookie, validated, issued, refreshed = (make_token(s) for s in ("h", "q", "c", "b", "i", "r"))
    request = tutils.treq(path=f"/cart/1?access_token={in_query}&page=2".encode(), content=json.dumps({"token": validated}).encode())
    request.headers.update({"Authorization": f"Bearer {presented}", "Cookie": f"theme=dark; session={in_cookie}", "Content-Type": "application/json", "X-Internal-Key": "internal-key-9f8e7d6c5b4a", "traceparent": f"00-{'a' * 32}-{'b' * 16}-01"})
    response = tutils.tresp(content=gzip.compress(json.dumps({"access_token": issued, "token_type": "Bearer"}).encode()))
    response.headers.update({"Content-Type": "application/json", "Content-Encoding": "gzip", "X-Token-Refreshed": refreshed, "Set-Cookie": f"session={in_cookie}; HttpOnly", "Date": "Tue, 15 Nov 1994 08:12:31 GMT"})
    flow = tflow.tflow(req=request, resp=response)
    db = tmp_path / "t.db"
    record(db, flow)

    links = {(r["role"], r["location"]): r["fingerprint"] for r in query(db, "SELECT * FROM hop_tokens")}
    assert set(links) == {
        ("presented", "header:authorization"), ("presented", "query:access_token"), ("presented", "cookie:session"),
        ("validated", "body:token"), ("issued", "response-body:access_token"),
        ("issued", "response-header:x-token-refreshed"), ("issued", "set-cookie:session"),
    }  # fmt: skip
    assert links[("presented", "cookie:session")] == links[("issued", "set-cookie:session")]  # one token, stored once
    subs = {r["sub"] for r in query(db, "SELECT sub FROM tokens")}
    assert subs == {"h", "q", "c", "b", "i", "r"}
    hop = query(db, "SELECT * FROM hops")[0]
    assert (hop["trace_id"], hop["span_id"], hop["trace_source"]) == ("a" * 32, "b" * 16, "traceparent")
    assert hop["server_date"] == "Tue, 15 Nov 1994 08:12:31 GMT" and hop["server_date_ts"] == 784887151.0
    assert hop["path"] == "/cart/1" and "page=2" in hop["query"] and "access_token=[redacted:" in hop["query"]

    stored = file_bytes(db)
    for secret in (presented, in_query, in_cookie, validated, issued, refreshed, "internal-key-9f8e7d6c5b4a"):
        assert secret.encode() not in stored
        assert secret.rsplit(".", 1)[-1].encode() not in stored  # not even the signature
    headers = dict(json.loads(hop["request_headers"]))
    assert headers["Authorization"].startswith("Bearer [redacted:")
    assert headers["Cookie"].startswith("[redacted:") and headers["X-Internal-Key"].startswith("[redacted:")


def test_bodies_opt_in_and_redacted(tmp_path):
    request = tutils.treq(content=b"user=bob&password=hunter2-hunter2&token=abcdefghijklmnopqrstuvwxyz")
    request.headers["Content-Type"] = "application/x-www-form-urlencoded"
    db = tmp_path / "t.db"
    record(db, tflow.tflow(req=request, resp=True), hoptrace_store_bodies=True)
    body = query(db, "SELECT request_body FROM hops")[0][0]
    assert "user=bob" in body and "hunter2" not in body and "abcdefghijklmnop" not in body
    assert b"hunter2" not in file_bytes(db)
    db2 = tmp_path / "default.db"
    record(db2, tflow.tflow(req=request.copy(), resp=True))
    assert query(db2, "SELECT request_body FROM hops")[0][0] is None


def test_bad_options_are_options_errors(tmp_path):
    recorder = Recorder()
    with taddons.context(recorder) as tctx:
        with pytest.raises(exceptions.OptionsError, match="NAME@LISTEN_PORT"):
            tctx.configure(recorder, hoptrace_service=["gateway"])
        with pytest.raises(exceptions.OptionsError, match="cannot open for writing"):
            tctx.configure(recorder, hoptrace_db=str(tmp_path / "missing-dir" / "t.db"))
        foreign = tmp_path / "foreign.db"
        sqlite3.connect(foreign).execute("CREATE TABLE invoices (id)").connection.commit()
        with pytest.raises(exceptions.OptionsError, match="not a hoptrace trace database"):
            tctx.configure(recorder, hoptrace_db=str(foreign))
        with pytest.raises(exceptions.OptionsError, match="hex"):
            tctx.configure(recorder, hoptrace_db=str(tmp_path / "ok.db"), hoptrace_fingerprint_key="not-hex")


def test_fingerprint_key_makes_fingerprints_comparable_across_captures(tmp_path):
    key = "ab" * 32
    fps = []
    for name in ("one.db", "two.db"):
        flow = tflow.tflow(resp=True)
        flow.request.headers["Authorization"] = "Bearer opaque-token-0123456789abcdef"
        record(tmp_path / name, flow, hoptrace_fingerprint_key=key)
        fps.append(query(tmp_path / name, "SELECT fingerprint, kind FROM tokens")[0])
    assert fps[0]["fingerprint"] == fps[1]["fingerprint"] and fps[0]["kind"] == "opaque"


# Hostile Authorization values: garbage, JWE, oversize, deeply nested, NaN exp, odd bytes.
_b64 = st.binary(max_size=300).map(lambda b: __import__("base64").urlsafe_b64encode(b).decode().rstrip("="))
_nan_exp = st.just('eyJhbGciOiJIUzI1NiJ9.' + __import__("base64").urlsafe_b64encode(b'{"exp": NaN, "sub": 1}').decode().rstrip("=") + ".c2ln")
authorization_values = st.one_of(
    st.text(max_size=200),
    st.builds(lambda a, b, c: f"Bearer eyJ{a}.{b}.{c}", _b64, _b64, _b64),
    st.builds(lambda parts: "Bearer " + ".".join(parts), st.lists(_b64, min_size=5, max_size=5)),
    st.integers(16_000, 40_000).map(lambda n: "Bearer eyJ" + "A" * n),
    st.integers(1, 4000).map(lambda n: "Bearer eyJhbGciOiJub25lIn0." + __import__("base64").urlsafe_b64encode(b"[" * n + b"]" * n).decode() + "."),
    _nan_exp.map(lambda t: f"Bearer {t}"),
    st.sampled_from(["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "bearer  x", "Token \x00\x01"]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(authorization_values, min_size=1, max_size=8))
def test_hostile_authorization_values_never_lose_a_hop(tmp_path_factory, values):
    db = tmp_path_factory.mktemp("prop") / "t.db"
    flows = []
    for value in values:
        flow = tflow.tflow(resp=True)
        flow.request.headers["Authorization"] = value
        flows.append(flow)
    counters = record(db, *flows)
    assert counters.addon_errors == 0 and counters.dropped == 0
    assert query(db, "SELECT count(*) FROM hops")[0][0] == len(values)
    for token in query(db, "SELECT kind, exp, error FROM tokens"):
        assert token["kind"] in ("jwt", "jwe", "opaque")
        assert token["exp"] is None or token["exp"] == token["exp"]  # never NaN


def test_a_full_disk_is_loud_and_counted(tmp_path, caplog):
    recorder = Recorder()
    flows = []
    for i in range(50):
        flow = tflow.tflow(resp=True)
        flow.request.headers["X-Padding"] = "p" * 4000
        flows.append(flow)
    with taddons.context(recorder) as tctx:
        tctx.configure(recorder, hoptrace_db=str(tmp_path / "t.db"))
        # SQLite's own way to say "disk full" without filling a disk.
        recorder.writer._conn.execute("PRAGMA max_page_count = 40")
        for flow in flows:
            recorder.requestheaders(flow)
            recorder.response(flow)
        counters = recorder.close()
    assert counters.write_errors >= 1 and counters.dropped >= 1
    assert counters.recorded + counters.dropped == len(flows)
    assert "full" in counters.last_error
    assert any("could not write" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


# -- the writer cannot die ------------------------------------------------------------------------

from hoptrace.addons import _hop  # noqa: E402
from hoptrace.addons._rows import build_rows, clean  # noqa: E402
from hoptrace.addons._store import Counts, write_batch  # noqa: E402
from hoptrace.addons._writer import TraceWriter  # noqa: E402
from hoptrace.db import open_for_writing  # noqa: E402


def new_capture(conn: sqlite3.Connection) -> int:
    """A capture row for rows written without a recorder; its id."""
    return conn.execute("INSERT INTO captures (started_at, routes, hoptrace_version, mitmproxy_version) VALUES (1, '[]', '0', '0')").lastrowid


def test_a_backlog_keeps_neither_the_flows_nor_their_large_bodies(tmp_path):
    """Hops waiting for the writer are snapshots: each flow, and a body past what rows ever read, is freed at once."""
    # The writer lingers 30 s after its first hop: all twenty wait in its queue until close().
    writer = TraceWriter(tmp_path / "t.db", routes=[], entry=None, key=bytes(32), row_process="off", linger=30.0)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        flows = []
        for _ in range(20):
            flow = tflow.tflow(resp=True)
            flow.response.content = b"x" * (1 << 20)
            writer.submit("svc", flow)
            flows.append(weakref.ref(flow))
            del flow
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert [ref() for ref in flows] == [None] * 20
    assert held < 4 << 20, f"{held / (1 << 20):.1f} MB held for 20 queued hops of 1 MB bodies"
    counters = writer.close()
    assert (counters.recorded, counters.dropped, counters.addon_errors) == (20, 0, 0)
    assert [tuple(row) for row in query(tmp_path / "t.db", "SELECT count(*), min(response_size) FROM hops")] == [(20, 1 << 20)]


def test_a_flow_that_cannot_be_read_is_a_bare_row_and_an_addon_error(tmp_path):
    broken = tflow.tflow(resp=True)
    broken.client_conn.peername = 5  # snapshot() indexes it: TypeError
    db = tmp_path / "t.db"
    counters = record(db, tflow.tflow(resp=True), broken, tflow.tflow(resp=True))
    assert (counters.seen, counters.recorded, counters.addon_errors, counters.dropped) == (3, 3, 1, 0)
    hops = query(db, "SELECT flow_id, path, error, error_kind, failed FROM hops ORDER BY id")
    assert hops[1]["flow_id"] == broken.id and hops[1]["path"] == broken.request.path.partition("?")[0]
    assert hops[1]["error"].startswith("hoptrace could not read this flow: TypeError") and hops[1]["failed"] == 1
    assert [h["error"] for h in (hops[0], hops[2])] == [None, None]


_any_value = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(), st.binary(), st.tuples(st.binary(), st.binary()),
    st.lists(st.tuples(st.binary(max_size=8), st.binary(max_size=8)), max_size=3), st.just(10**400),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(snaps=st.lists(st.lists(_any_value, min_size=27, max_size=27).map(tuple), min_size=1, max_size=4))
def test_any_snapshot_becomes_a_row_that_sqlite_takes(tmp_path_factory, snaps):
    """Snapshots with anything in any field: each becomes a row, full or bare, and the batch commits."""
    conn = open_for_writing(tmp_path_factory.mktemp("rows") / "t.db")
    capture_id = new_capture(conn)
    built = build_rows([("svc", snap) for snap in snaps], b"k" * 32, True, capture_id)
    written = write_batch(conn, "t.db", capture_id, built.hops, Counts(len(snaps), 0, 0, 0, 0))
    assert (written.recorded, written.dropped, written.write_errors) == (len(snaps), 0, 0)
    assert conn.execute("SELECT count(*) FROM hops").fetchone()[0] == len(snaps)
    conn.close()


@settings(max_examples=200, deadline=None)
@given(value=st.one_of(_any_value, st.text(alphabet=st.characters(min_codepoint=0xD700, max_codepoint=0xE000)), st.integers(-(10**30), 10**30)))
def test_clean_leaves_only_what_sqlite_and_readers_take(value):
    cleaned = clean(value)
    if isinstance(cleaned, str):
        cleaned.encode("utf-8")  # never raises: no surrogate survives
    elif isinstance(cleaned, float):
        assert cleaned == cleaned and abs(cleaned) != float("inf")
    elif isinstance(cleaned, int):
        assert -(1 << 63) <= cleaned < (1 << 63)
    else:
        assert cleaned is None


def test_undecodable_bytes_are_escaped_and_lone_surrogates_replaced():
    assert clean("a\udcffb") == "a\\xffb"  # a raw 0xff byte, as surrogateescape decoded it
    assert clean("x\ud800y") == "x\ufffdy"
    assert clean(float("nan")) is None and clean(10**400) is None and clean(True) == 1


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b))
def test_a_header_byte_that_is_not_utf8_reads_the_same_in_the_file_har_and_parquet(tmp_path_factory, value):
    """A raw byte in a header value (a Latin-1 é sent as is): ``\\xNN`` in the stored headers, and the
    same text in the HAR and in the Parquet export, which read those headers."""
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from hoptrace.cli import cli

    out = tmp_path_factory.mktemp("header-bytes")
    flow = tflow.tflow(resp=True)
    flow.request.headers.fields = (*flow.request.headers.fields, (b"X-Name", value))
    now = time.time()  # tflow's times are from 1999, which the analysis behind the exports sets aside
    flow.request.timestamp_start, flow.request.timestamp_end = now, now + 0.001
    flow.response.timestamp_start, flow.response.timestamp_end = now + 0.002, now + 0.003
    record(out / "t.db", flow)
    expected = clean(value.decode("utf-8", "surrogateescape"))
    stored = dict(json.loads(query(out / "t.db", "SELECT request_headers FROM hops")[0]["request_headers"]))
    assert stored["X-Name"] == expected
    done = CliRunner().invoke(cli, ["export", str(out / "t.db"), "--har", str(out / "t.har"), "--parquet", str(out / "pq")])
    assert done.exit_code == 0, done.output
    har = json.loads((out / "t.har").read_text(encoding="utf-8"))["log"]["entries"][0]["request"]["headers"]
    assert {h["name"]: h["value"] for h in har}["X-Name"] == expected
    parquet = pq.read_table(out / "pq" / "hops.parquet").column("request_headers").to_pylist()[0]
    assert dict(json.loads(parquet))["X-Name"] == expected


def test_a_row_sqlite_refuses_is_isolated_and_its_neighbours_are_written(tmp_path):
    conn = open_for_writing(tmp_path / "t.db")
    capture_id = new_capture(conn)
    flows = [tflow.tflow(resp=True) for _ in range(9)]
    built = build_rows([("svc", _hop.snapshot(flow)) for flow in flows], b"k" * 32, False, capture_id)
    hops = list(built.hops)
    poisoned = list(hops[5].hop)
    poisoned[1] = None  # flow_id is NOT NULL: SQLite refuses the whole batch for this one row
    hops[5] = hops[5]._replace(hop=tuple(poisoned))
    written = write_batch(conn, tmp_path / "t.db", capture_id, hops, Counts(9, 0, 0, 0, 0))
    assert (written.recorded, written.dropped, written.addon_errors) == (9, 0, 1)  # the bad one went in bare
    ids = [row[0] for row in conn.execute("SELECT flow_id FROM hops ORDER BY id")]
    assert ids == [flow.id if i != 5 else "unknown" for i, flow in enumerate(flows)]
    poisoned[1], poisoned[20] = "flow-x", None  # started_at NOT NULL: the bare row gets a time of its own
    hops[5] = hops[5]._replace(hop=tuple(poisoned))
    written = write_batch(conn, tmp_path / "t.db", capture_id, hops[4:7], Counts(9, 9, 0, 0, 0))
    assert (written.recorded, written.dropped, written.addon_errors) == (3, 0, 1)
    bare = conn.execute("SELECT error, started_at FROM hops WHERE flow_id = 'flow-x'").fetchone()
    assert "IntegrityError" in bare[0] and bare[1] is not None
    assert conn.execute("SELECT hops_recorded FROM captures").fetchone()[0] >= 9
    conn.close()


def test_capture_counters_in_the_file_never_go_back(tmp_path):
    from hoptrace.addons._store import update_capture

    conn = open_for_writing(tmp_path / "t.db")
    capture_id = new_capture(conn)
    update_capture(conn, capture_id, Counts(10, 9, 1, 2, 1))
    update_capture(conn, capture_id, Counts(3, 3, 0, 0, 0))  # an older view landing late
    assert tuple(conn.execute("SELECT hops_seen, hops_recorded, hops_dropped, addon_errors, write_errors FROM captures").fetchone()) == (10, 9, 1, 2, 1)
    conn.close()


def test_a_dead_row_process_is_restarted_and_nothing_after_it_is_lost(tmp_path, caplog):
    recorder = Recorder()
    with taddons.context(recorder) as tctx:
        tctx.configure(recorder, hoptrace_db=str(tmp_path / "t.db"), hoptrace_row_process="on")
        for round_ in range(3):
            for _ in range(10):
                flow = tflow.tflow(resp=True)
                recorder.requestheaders(flow)
                recorder.response(flow)
            assert recorder.writer.flush()
            if round_ < 2:
                recorder.writer._row_process._proc.kill()
        counters = recorder.close()
    assert (counters.seen, counters.recorded, counters.dropped, counters.addon_errors) == (30, 30, 0, 0)
    assert counters.restarts == 2
    assert query(tmp_path / "t.db", "SELECT count(*) FROM hops")[0][0] == 30
    assert sum("row process failed" in r.getMessage() for r in caplog.records) == 2


def test_a_closed_capture_is_one_self_contained_file_readable_read_only(tmp_path):
    db = tmp_path / "t.db"
    record(db, tflow.tflow(resp=True), tflow.tflow(err=True))
    assert query(db, "PRAGMA journal_mode")[0][0] == "delete"
    assert not (tmp_path / "t.db-wal").exists() and not (tmp_path / "t.db-shm").exists()
    copy_dir = tmp_path / "ro"
    copy_dir.mkdir()
    (copy_dir / "t.db").write_bytes(db.read_bytes())
    (copy_dir / "t.db").chmod(0o444)
    copy_dir.chmod(0o555)
    try:
        conn = sqlite3.connect(f"{(copy_dir / 't.db').as_uri()}?mode=ro", uri=True)
        assert conn.execute("SELECT count(*) FROM hops").fetchone()[0] == 2
        conn.close()
    finally:
        copy_dir.chmod(0o755)


def test_a_failing_disk_is_said_on_stderr_at_once(tmp_path, capfd):
    recorder = Recorder()
    with taddons.context(recorder) as tctx:
        tctx.configure(recorder, hoptrace_db=str(tmp_path / "t.db"))
        recorder.writer._conn.execute("PRAGMA max_page_count = 30")
        for _ in range(40):
            flow = tflow.tflow(resp=True)
            flow.request.headers["X-Padding"] = "p" * 4000
            recorder.requestheaders(flow)
            recorder.response(flow)
        assert recorder.writer.flush()
        assert "hoptrace: RECORDING FAILED: could not write" in capfd.readouterr().err  # before the end, not at it
        counters = recorder.close()
    assert counters.lost and counters.recorded + counters.dropped == 40


def test_running_puts_what_start_up_made_out_of_the_collectors_sight(tmp_path):
    """Under plain mitmdump, the objects alive when the proxy runs are frozen: collections under load
    then scan only what the traffic allocates (``hoptrace proxy`` freezes after its own start-up too)."""
    recorder = Recorder()
    with taddons.context(recorder) as tctx:
        tctx.configure(recorder, hoptrace_db=str(tmp_path / "t.db"))
        gc.unfreeze()
        try:
            recorder.running()  # as mitmproxy calls it once the proxy runs
            still_scanned = gc.get_objects()  # every generation the collector scans
            assert gc.get_freeze_count() > 0 and not any(obj is recorder or obj is tctx.master for obj in still_scanned)
        finally:
            gc.unfreeze()
        recorder.close()


def test_the_row_process_writes_arrow_columns_without_numpy_or_pandas(tmp_path):
    """The row process starts under load, on the cores the proxy shares: it leaves out numpy and
    pandas (0.4 s of its start-up), and pyarrow still writes each batch's columns, which the loader reads."""
    from hoptrace.analyzer import load

    db = tmp_path / "t.db"
    recorder = Recorder()
    with taddons.context(recorder) as tctx:
        tctx.configure(recorder, hoptrace_db=str(db), hoptrace_row_process="on")
        deadline = time.monotonic() + 20
        while not query(db, "SELECT count(*) FROM hop_columns")[0][0] and time.monotonic() < deadline:
            for _ in range(10):  # the first batches go without columns until pyarrow is ready
                flow = tflow.tflow(resp=True)
                flow.request.headers["Authorization"] = f"Bearer {make_token()}"
                recorder.requestheaders(flow)
                recorder.response(flow)
            assert recorder.writer.flush()
        maps = (Path("/proc") / str(recorder.writer._row_process._proc.pid) / "maps").read_text()
        counters = recorder.close()
    loaded = set(re.findall(r"/(?:site|dist)-packages/(\w+)/", maps))
    assert "pyarrow" in loaded, "the row process never loaded pyarrow"
    assert not loaded & {"numpy", "pandas"}
    assert counters.recorded == counters.seen > 0 and not counters.lost
    assert counters.addon_errors == counters.restarts == 0
    assert query(db, "SELECT sum(last_id - first_id + 1) FROM hop_columns")[0][0] > 0
    with_columns, as_rows = load(db), load(db, reader="sqlite")
    assert with_columns.hops.equals(as_rows.hops)


def test_columns_that_cannot_be_encoded_cost_the_rows_nothing(tmp_path, monkeypatch, caplog):
    """The Arrow columns are a copy: whatever fails in them (here, a pyarrow reaching for a module the
    row process refuses), the batch's hops go in whole, with their tokens, and are read as rows."""
    from hoptrace import _hop_columns

    def refused(kind, values):
        raise ModuleNotFoundError("numpy is not imported by hoptrace's row process", name="numpy")

    monkeypatch.setattr(_hop_columns, "_array", refused)
    conn = open_for_writing(tmp_path / "t.db")
    capture_id = new_capture(conn)
    flows = [tflow.tflow(resp=True) for _ in range(5)]
    for flow in flows:
        flow.request.headers["Authorization"] = f"Bearer {make_token()}"
    built = build_rows([("svc", _hop.snapshot(flow)) for flow in flows], b"k" * 32, False, capture_id)
    written = write_batch(conn, tmp_path / "t.db", capture_id, built.hops, Counts(5, 0, 0, 0, 0), columns=True)
    assert (written.recorded, written.dropped, written.addon_errors) == (5, 0, 0)
    assert conn.execute("SELECT count(*) FROM hops WHERE error IS NULL").fetchone()[0] == 5
    assert conn.execute("SELECT count(*) FROM hop_tokens").fetchone()[0] == 5
    assert conn.execute("SELECT count(*) FROM hop_columns").fetchone()[0] == 0
    assert "could not be encoded" in caplog.text
    conn.close()
