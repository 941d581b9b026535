"""Hostile requests through a real `hoptrace proxy` (and plain `mitmdump -s`) in front of a real aiohttp
upstream, sent as raw bytes: every request that reached the proxy is a row, whatever it carried,
and the requests after it are rows too."""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import PYTHON, free_port, query
from .test_proxy import mitmdump_args

pytestmark = pytest.mark.e2e


def b64(raw: bytes | str | dict) -> str:
    if isinstance(raw, dict):
        raw = json.dumps(raw)
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def jwt_with(payload_json: str, header: str = '{"alg":"HS256","typ":"JWT"}') -> str:
    """A JWT whose payload is exactly this JSON text (so it may hold what json.dumps would refuse)."""
    return f"{b64(header)}.{b64(payload_json)}.c2lnbmF0dXJl"


def request(method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> bytes:
    head = [method + b" " + path + b" HTTP/1.1", b"Host: upstream", b"Connection: close"]
    head += [name + b": " + value for name, value in headers]
    if body or method in (b"POST", b"PUT", b"PATCH"):
        head.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def send(port: int, raw: bytes, timeout: float = 10.0) -> bytes:
    """One request on its own connection; what came back before the proxy closed it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


BIG = "1" + "0" * 400


def bearer(payload_json: str) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", b"Bearer " + jwt_with(payload_json).encode())]


# Each vector alone killed the writer before: the row process, then the writer thread, then every later row.
VECTORS = {
    "0xff in the path": request(b"GET", b"/v/a\xffb", []),
    "0xff in the query": request(b"GET", b"/v/query?q=a\xffb&c=%ff&page=2", []),
    "0xff in X-Request-ID": request(b"GET", b"/v/request-id", [(b"X-Request-ID", b"a\xffb")]),
    "0xff in Content-Type": request(b"POST", b"/v/content-type", [(b"Content-Type", b"application/\xffjson")], b"{}"),
    "exp 10^400": request(b"GET", b"/v/exp", bearer('{"sub": "a", "exp": %s}' % BIG)),
    "iat -10^400": request(b"GET", b"/v/iat", bearer('{"sub": "a", "iat": -%s}' % BIG)),
    "sub with a lone surrogate": request(b"GET", b"/v/sub", bearer('{"sub": "\\ud800"}')),
    "JSON body token with a lone surrogate": request(
        b"POST", b"/v/body", [(b"Content-Type", b"application/json")], b'{"token": "\\ud800abcdefghijklmnopqrstuvwxyz"}'
    ),
    "invalid header name": request(b"GET", b"/v/header-name", [(b"X-\xff", b"1")]),
}


class Capture:
    """A proxy's process and trace file, and the requests sent through it."""

    def __init__(self, proc, port: int, db: Path) -> None:
        self.proc, self.port, self.db = proc, port, db
        self.sent = 0
        self.normal = 0

    def send(self, raw: bytes) -> bytes:
        self.sent += 1
        return send(self.port, raw)

    def send_normal(self) -> None:
        self.normal += 1
        reply = self.send(request(b"GET", f"/normal/{self.normal}".encode(), [(b"X-Request-ID", f"normal-{self.normal}".encode())]))
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]

    def rows_now(self, expected: int, timeout: float = 10.0) -> int:
        """Rows in the file once there are ``expected`` of them, or after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            rows = query(self.db, "SELECT count(*) FROM hops")[0][0]
            if rows >= expected or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)


@pytest.fixture(scope="module")
def upstream_url():
    port = free_port()
    proc = subprocess.Popen([PYTHON, "-m", "hoptrace.stack.upstreams", "hello", str(port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "listening"
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def hoptrace_proxy(upstream_url, tmp_path_factory):
    """One long-lived `hoptrace proxy` for every hostile request of this module."""
    from .conftest import Proc

    db = tmp_path_factory.mktemp("hostile") / "traces.db"
    port = free_port()
    proc = Proc([PYTHON, "-m", "hoptrace", "proxy", "--db", str(db), "--store-bodies", "--route", f"up={upstream_url}@{port}"])
    proc.wait_for("proxy ready")
    capture = Capture(proc, port, db)
    yield capture
    if proc.popen.poll() is None:
        proc.popen.kill()


def test_every_known_vector_among_normal_requests_is_a_row(hoptrace_proxy):
    capture = hoptrace_proxy
    for name, raw in VECTORS.items():
        capture.send_normal()
        capture.send(raw)
        capture.send_normal()
        assert capture.rows_now(capture.sent) == capture.sent, f"lost a row after {name!r}"
    bare = query(capture.db, "SELECT path, error FROM hops WHERE error LIKE 'hoptrace could not%'")
    assert [tuple(row) for row in bare] == []  # each vector read in full, not only survived
    paths = {row[0] for row in query(capture.db, "SELECT path FROM hops")}
    assert {f"/normal/{i}" for i in range(1, capture.normal + 1)} <= paths
    assert "/v/a\\xffb" in paths  # the raw byte, escaped, not lost
    assert query(capture.db, "SELECT query FROM hops WHERE path = '/v/query'")[0][0] == "q=a%FFb&c=%FF&page=2"
    hop = query(capture.db, "SELECT request_id, trace_id FROM hops WHERE path = '/v/request-id'")[0]
    assert tuple(hop) == ("a\\xffb", "a\\xffb")
    tokens = {row["sub"]: row for row in query(capture.db, "SELECT * FROM tokens")}
    assert "\ufffd" in tokens  # the lone surrogate replaced, the token kept
    for row in query(capture.db, "SELECT exp, iat, error FROM tokens WHERE error LIKE '%NumericDate%'"):
        assert row["exp"] is None and row["iat"] is None


# -- hypothesis: hostile requests of every shape ------------------------------------------------

_token_bytes = st.binary(max_size=40).filter(lambda b: not set(b) & set(b"\r\n"))


def _target_bytes(raw: bytes) -> bytes:
    """What a request line's target can carry: any byte but spaces and controls, high bytes included."""
    return bytes(c for c in raw if c > 0x20 and c != 0x7F)


# A path, then often a query string (with a token name, or a percent-escape that is not UTF-8).
_path = st.builds(
    lambda path, query, rest: b"/h/" + _target_bytes(path) + query + _target_bytes(rest),
    st.binary(max_size=60), st.sampled_from([b"", b"?", b"?access_token=", b"?q=%ff&"]), st.binary(max_size=30),
)  # fmt: skip
_header_name = st.one_of(
    st.sampled_from([b"X-Request-ID", b"Content-Type", b"traceparent", b"Cookie", b"X-Token", b"b3", b"Date"]),
    st.binary(min_size=1, max_size=12).filter(lambda b: not set(b) & set(b" :\r\n\t\x00")),
)
_claim = st.one_of(
    st.integers(min_value=-(10**500), max_value=10**500).map(str),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "true", "null", "[]", "{}", '"\\ud800"', '"\\udfff\\ud800"']),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.text(max_size=20).map(lambda t: json.dumps(t)),
)
_jwt = st.builds(
    lambda exp, iat, sub: jwt_with(f'{{"exp":{exp},"iat":{iat},"sub":{sub}}}'),
    _claim, _claim, st.sampled_from(['"\\ud800"', '"alice"', "12", '"\\u0000"', "null"]),
)
_header = st.one_of(
    st.tuples(_header_name, _token_bytes),
    st.tuples(st.just(b"Authorization"), _jwt.map(lambda t: b"Bearer " + t.encode())),
    st.tuples(st.just(b"X-Forwarded-Token"), _jwt.map(str.encode)),
)
_body = st.one_of(
    st.just(b""),
    st.binary(max_size=200),
    _jwt.map(lambda t: json.dumps({"token": t}).encode()),
    st.sampled_from([b'{"token": "\\ud800aaaaaaaaaaaaaaaaaaaa"}', b'{"a": ' * 3000, b"\xff\xfe{}"]),
)
hostile_requests = st.builds(request, st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE"]), _path, st.lists(_header, max_size=5), _body)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(raws=st.lists(hostile_requests, min_size=1, max_size=3))
def test_hostile_requests_never_cost_a_row(hoptrace_proxy, raws):
    capture = hoptrace_proxy
    for raw in raws:
        capture.send(raw)
    capture.send_normal()
    assert capture.rows_now(capture.sent) == capture.sent
    bare = query(capture.db, "SELECT path, error FROM hops WHERE error LIKE 'hoptrace could not%'")
    assert [tuple(row) for row in bare] == []  # read in full, not only survived


def test_the_proxy_stops_with_a_true_summary(hoptrace_proxy):
    """Runs last in this module: stop the proxy that took every hostile request above."""
    capture = hoptrace_proxy
    if capture.sent < len(VECTORS):  # run alone (-k): the vectors first
        for raw in VECTORS.values():
            capture.send(raw)
    assert capture.proc.stop(signal.SIGINT) == 0, capture.proc.output
    row = query(capture.db, "SELECT * FROM captures")[0]
    rows = query(capture.db, "SELECT count(*) FROM hops")[0][0]
    bare = query(capture.db, "SELECT count(*) FROM hops WHERE error LIKE 'hoptrace could not read this flow%'")[0][0]
    assert rows == capture.sent == row["hops_seen"] == row["hops_recorded"]
    assert (row["hops_dropped"], row["write_errors"]) == (0, 0)
    assert row["addon_errors"] == bare  # every addon error is a bare row, and the other way round
    assert f"hoptrace proxy: {rows} hops recorded, 0 dropped, {bare} addon errors, 0 write errors" in capture.proc.output
    assert row["ended_at"] is not None and row["source"] == "hoptrace proxy"
    assert query(capture.db, "PRAGMA integrity_check")[0][0] == "ok"
    _assert_valid_utf8(capture.db)


def _assert_valid_utf8(db: Path) -> None:
    """Every text value of every table decodes as UTF-8 (SQLite hands the bytes back unchecked with text_factory=bytes)."""
    import sqlite3

    conn = sqlite3.connect(db)
    conn.text_factory = bytes
    try:
        for table in ("hops", "tokens", "hop_tokens", "captures"):
            for row in conn.execute(f"SELECT * FROM {table}"):
                for value in row:
                    if isinstance(value, bytes):
                        value.decode("utf-8")
                    elif isinstance(value, float):
                        assert value == value and abs(value) != float("inf")
    finally:
        conn.close()


def test_plain_mitmdump_takes_every_vector_too(upstream_url, spawn, tmp_path):
    port, db = free_port(), tmp_path / "mitmdump.db"
    proc = spawn(mitmdump_args(upstream_url, "up", port, db))
    capture = Capture(proc, port, db)
    _wait_listening(port)
    for raw in VECTORS.values():
        capture.send_normal()
        capture.send(raw)
    capture.send_normal()
    assert capture.rows_now(capture.sent) == capture.sent
    assert proc.stop(signal.SIGTERM) == 0, proc.output
    row = query(db, "SELECT * FROM captures")[0]
    assert query(db, "SELECT count(*) FROM hops")[0][0] == capture.sent == row["hops_seen"] == row["hops_recorded"]
    bare = [tuple(r) for r in query(db, "SELECT path, error FROM hops WHERE error LIKE 'hoptrace could not%'")]
    assert (row["hops_dropped"], row["addon_errors"], row["write_errors"], bare) == (0, 0, 0, []), proc.output
    assert f"hoptrace: {capture.sent} hops recorded, 0 dropped, 0 addon errors, 0 write errors" in proc.output
    assert row["source"] == "mitmdump -s"
    _assert_valid_utf8(db)


def _wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")
