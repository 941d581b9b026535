"""The recorder addon under mitmproxy's own test harness (taddons / tflow), writing a real SQLite file."""

from __future__ import annotations

import gzip
import json
import sqlite3
import time

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
