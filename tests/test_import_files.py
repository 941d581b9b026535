"""`hoptrace import` on HAR and flow files of every shape: DevTools-style entries (HTTP/2 and /3,
failed), timings, and hostile files: truncated, not JSON, a newer format, huge, malformed
(hypothesis mutates a HAR's structure). A file that cannot be read is one line, exit 2,
and leaves the DB exactly as it was."""

from __future__ import annotations

import copy
import io
import json
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy.io import FlowWriter, tnetstring
from mitmproxy.test import tflow

from hoptrace._errors import HoptraceError, ImportFileError
from hoptrace.cli import cli as hoptrace_cli
from hoptrace.exchange import ServiceNames, import_file

KEY = bytes(range(32))
T0 = 1_795_000_000.25


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def har_entry(path: str, *, started: float = T0, status: int = 200, version: str = "HTTP/1.1", timings: dict | None = None, **extra) -> dict:
    timings = timings or {"blocked": -1, "dns": -1, "connect": -1, "ssl": -1, "send": 1.0, "wait": 10.0, "receive": 2.0}
    return {
        "startedDateTime": iso(started),
        "time": sum(v for v in timings.values() if v != -1),
        "request": {
            "method": "GET", "url": f"http://127.0.0.1:3001{path}", "httpVersion": version, "cookies": [],
            "headers": [{"name": "Authorization", "value": "Bearer opaque-token-0123456789abcdef"}], "queryString": [],
            "headersSize": -1, "bodySize": 0,
        },
        "response": {
            "status": status, "statusText": "OK" if status else "", "httpVersion": version if status else "", "cookies": [],
            "headers": [{"name": "Content-Type", "value": "application/json"}],
            "content": {"size": 2, "mimeType": "application/json", "text": "{}"}, "redirectURL": "", "headersSize": -1, "bodySize": 2,
        },
        "cache": {},
        "timings": timings,
        **extra,
    }  # fmt: skip


def har(*entries: dict, version: str = "1.2", creator: str = "WebInspector") -> dict:
    return {"log": {"version": version, "creator": {"name": creator, "version": "537.36"}, "pages": [], "entries": list(entries)}}


def write(path: Path, document) -> Path:
    path.write_text(json.dumps(document) if not isinstance(document, str) else document)
    return path


def counts(db: Path) -> tuple[int, int, int, int]:
    if not db.exists():
        return (0, 0, 0, 0)
    conn = sqlite3.connect(db)
    try:
        return tuple(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("captures", "hops", "tokens", "hop_tokens"))
    finally:
        conn.close()


def run(*args) -> subprocess.CompletedProcess:
    """The real command in a child process (its exit status and stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "hoptrace", *map(str, args)], capture_output=True, text=True, timeout=120)


def cli(*args) -> subprocess.CompletedProcess:
    """The same command in this process (click's runner): a child costs seconds of imports on a busy box."""
    result = CliRunner().invoke(hoptrace_cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def test_devtools_shapes_http2_http3_and_failed_entries(tmp_path):
    h2 = har_entry("/h2", version="http/2.0")
    h2["request"]["headers"] += [{"name": ":authority", "value": "127.0.0.1:3001"}, {"name": ":path", "value": "/h2"}]
    failed = har_entry("/down", status=0, started=T0 + 1)
    failed["response"] = {**failed["response"], "_error": "net::ERR_CONNECTION_REFUSED", "content": {"size": 0, "mimeType": "x-unknown"}}
    h3 = har_entry("/h3", version="h3", started=T0 + 2)
    data_url = har_entry("/x", started=T0 + 3)
    data_url["request"]["url"] = "data:image/png;base64,AAAA"
    db = tmp_path / "t.db"
    result = import_file(write(tmp_path / "c.har", har(h2, failed, h3, data_url)), db, ServiceNames.build(["127.0.0.1:3001=api"]), None, KEY)
    assert (result.hops, result.skipped, result.addon_errors) == (3, 1, 0)
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT path, http_version, status, failed, error_kind, service, request_headers FROM hops ORDER BY started_at").fetchall()
    assert [r[:5] for r in rows] == [("/h2", "HTTP/2", 200, 0, None), ("/down", "HTTP/1.1", None, 1, "refused"), ("/h3", "HTTP/3", 200, 0, None)]
    assert {r[5] for r in rows} == {"api"} and ":authority" not in rows[0][6]
    # The token went through the recorder's builder: fingerprinted, linked, never stored raw.
    assert conn.execute("SELECT count(*) FROM hop_tokens WHERE location = 'header:authorization'").fetchone()[0] == 3
    assert b"opaque-token-0123456789abcdef" not in db.read_bytes()
    assert conn.execute("SELECT entry, source FROM captures").fetchone()[0] == "api"


def test_har_timings_become_the_hops_timeline(tmp_path):
    timings = {"blocked": 0.5, "dns": 1.5, "connect": 3.0, "ssl": 1.0, "send": 2.0, "wait": 40.0, "receive": 5.0}
    db = tmp_path / "t.db"
    import_file(write(tmp_path / "c.har", har(har_entry("/t", timings=timings))), db, ServiceNames(), None, KEY)
    hop = sqlite3.connect(db).execute(
        "SELECT started_at, connect_at, connected_at, request_end_at, response_start_at, ended_at, duration_ms FROM hops"
    ).fetchone()  # fmt: skip
    expected = [T0, T0 + 0.002, T0 + 0.005, T0 + 0.007, T0 + 0.047, T0 + 0.052]
    assert list(hop[:6]) == pytest.approx(expected, abs=1e-6)
    assert hop[6] == pytest.approx(52.0, abs=1e-3)  # `time` = the sum of the phases (ssl is inside connect)


def test_flow_files_from_mitmproxy_and_the_same_file_twice(tmp_path):
    flows = [tflow.tflow(resp=True), tflow.tflow(err=True)]
    path = tmp_path / "c.mitm"
    with path.open("wb") as out:
        writer = FlowWriter(out)
        for flow in flows:
            writer.add(flow)
    db = tmp_path / "t.db"
    first = run("import", path, "--db", db)
    assert first.returncode == 0 and "2 hops imported" in first.stdout, first.stderr
    again = run("import", path, "--db", db)
    assert again.returncode == 0 and "already imported" in again.stdout
    assert counts(db)[:2] == (1, 2)


def flow_file_bytes(n: int = 3) -> bytes:
    out = io.BytesIO()
    writer = FlowWriter(out)
    for _ in range(n):
        writer.add(tflow.tflow(resp=True))
    return out.getvalue()


def newer_flow_file() -> bytes:
    state = tflow.tflow(resp=True).get_state()
    state["version"] = 99
    out = io.BytesIO()
    tnetstring.dump(state, out)
    return out.getvalue()


def big_har_with_a_bad_last_entry() -> str:
    entries = [har_entry(f"/item/{i}", started=T0 + i / 1000) for i in range(1200)]  # several batches
    entries[-1]["request"] = "not an object"
    return json.dumps(har(*entries))


BAD_FILES = {
    "truncated.har": lambda: json.dumps(har(har_entry("/a"), har_entry("/b")))[:-40],
    "not-json.har": lambda: "{this is not json",
    "not-har.json": lambda: json.dumps({"hello": "world"}),
    "newer.har": lambda: json.dumps(har(har_entry("/a"), version="9.0")),
    "no-request.har": lambda: json.dumps(har({"startedDateTime": iso(T0), "time": 1, "timings": {}})),
    "bad-date.har": lambda: json.dumps(har({**har_entry("/a"), "startedDateTime": "yesterday"})),
    "nested.har": lambda: '{"log": {"version": "1.2", "entries": [' + "[" * 50_000,
    "big-bad-last.har": big_har_with_a_bad_last_entry,
    "truncated.mitm": lambda: flow_file_bytes()[:-25],
    "garbage.mitm": lambda: b"\x00\xff" * 500 + b"garbage",
    "newer.mitm": newer_flow_file,
    "big-bad-tail.mitm": lambda: flow_file_bytes(700) + b"5:hello,",
    "empty.mitm": lambda: b"",
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_bad_file_is_one_line_exit_2_and_leaves_the_db_as_it_was(tmp_path, name):
    db = tmp_path / "t.db"
    good = write(tmp_path / "good.har", har(har_entry("/ok")))
    assert cli("import", good, "--db", db).returncode == 0
    before = counts(db)
    content = BAD_FILES[name]()
    bad = tmp_path / name
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    done = cli("import", bad, "--db", db)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert counts(db) == before


def test_a_newer_flow_format_says_which(tmp_path):
    path = tmp_path / "newer.mitm"
    path.write_bytes(newer_flow_file())
    done = run("import", path, "--db", tmp_path / "t.db")
    assert done.returncode == 2 and "flow format version 99" in done.stderr and "upgrade" in done.stderr


def test_bad_options_are_one_line(tmp_path):
    good = write(tmp_path / "good.har", har(har_entry("/ok")))
    for args in (["--service", "nonsense"], ["--entry", "nosuch"], ["--fingerprint-key", "zz"], ["--db", tmp_path], [tmp_path]):
        done = cli("import", good, "--db", tmp_path / "t.db", *args)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, (args, done.stderr)
    assert counts(tmp_path / "t.db")[1] == 0


# -- HAR structure mutations -------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


def _containers(node, path=()):
    if isinstance(node, dict):
        yield path
        for key, value in node.items():
            yield from _containers(value, (*path, key))
    elif isinstance(node, list):
        yield path
        for index, value in enumerate(node):
            yield from _containers(value, (*path, index))


BASE = har(
    har_entry("/a", started=T0),
    {**har_entry("/b", started=T0 + 0.5, status=0), "_error": "net::ERR_CONNECTION_RESET"},
    har_entry("/c", started=T0 + 1, version="h2"),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_har_imports_whole_or_not_at_all(tmp_path_factory, data):
    document = copy.deepcopy(BASE)
    for _ in range(data.draw(st.integers(1, 3))):
        containers = list(_containers(document))
        path = data.draw(st.sampled_from(containers))
        parent = document
        for step in path:
            parent = parent[step]
        keys = list(parent.keys()) if isinstance(parent, dict) else list(range(len(parent)))
        if not keys:
            continue
        key = data.draw(st.sampled_from(keys))
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[key]
        else:
            parent[key] = data.draw(json_values)
    tmp = tmp_path_factory.mktemp("mut")
    db = tmp / "t.db"
    import_file(write(tmp / "good.har", har(har_entry("/ok"))), db, ServiceNames(), None, KEY)
    before = counts(db)
    try:
        result = import_file(write(tmp / "m.har", json.dumps(document)), db, ServiceNames(), None, KEY)
    except ImportFileError as exc:
        assert "\n" not in str(exc) and str(tmp / "m.har") in str(exc)
        assert counts(db) == before
    except HoptraceError as exc:  # e.g. the entry a mutated file names is not among its services
        assert "\n" not in str(exc)
        assert counts(db) == before
    else:
        after = counts(db)
        assert after[0] == before[0] + 1 and after[1] == before[1] + result.hops
        assert result.hops <= 3 and result.addon_errors == 0


# -- an entry or flow no hop can carry: left out by name, the rest imported -------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["send", "wait", "receive", "connect"]), value=st.floats(min_value=1.01e9, allow_infinity=False) | st.just(10**30))
def test_a_har_entry_with_an_absurd_time_is_left_out_by_name(tmp_path_factory, field, value):
    tmp = tmp_path_factory.mktemp("time")
    timings = {"blocked": -1, "dns": -1, "connect": -1, "ssl": -1, "send": 1.0, "wait": 10.0, "receive": 2.0, field: value}
    path = write(tmp / "t.har", har(har_entry("/a"), har_entry("/odd", timings=timings), har_entry("/c")))
    done = cli("import", path, "--db", tmp / "t.db")
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == f"{path}: entry 2: timings.{field} {value!r} is not a duration in ms; skipped"
    assert counts(tmp / "t.db")[1] == 2 and "2 hops imported" in done.stdout


TIMES = [("request", "timestamp_start"), ("request", "timestamp_end"), ("response", "timestamp_start"), ("response", "timestamp_end"), ("server_conn", "timestamp_start")]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(TIMES), value=st.sampled_from([float("inf"), float("-inf"), float("nan"), -1.0, 1e300]))
def test_a_flow_with_an_unusable_time_is_left_out_by_name(tmp_path_factory, where, value):
    tmp = tmp_path_factory.mktemp("flowtime")
    out = io.BytesIO()
    for index in range(3):
        state = tflow.tflow(resp=True).get_state()
        if index == 1:
            state[where[0]][where[1]] = value
        tnetstring.dump(state, out)
    path = tmp / "f.mitm"
    path.write_bytes(out.getvalue())
    done = cli("import", path, "--db", tmp / "t.db")
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == f"{path}: flow 2: {where[0]}.{where[1]} is not a usable time; skipped"
    assert counts(tmp / "t.db")[1] == 2


# -- a status as HAR writers give it ---------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(status=st.integers(100, 999), form=st.sampled_from([int, float, str]))
def test_a_status_as_a_float_or_digit_string_is_a_response(tmp_path_factory, status, form):
    tmp = tmp_path_factory.mktemp("status")
    entry = har_entry("/s")
    entry["response"]["status"] = form(status)
    entry["response"]["headers"].append({"name": "X-Kept", "value": "yes"})
    done = cli("import", write(tmp / "s.har", har(entry)), "--db", tmp / "t.db")
    assert done.returncode == 0 and not done.stderr, done.stderr
    row = sqlite3.connect(tmp / "t.db").execute("SELECT status, error, response_headers FROM hops").fetchone()
    assert row[0] == status and row[1] is None and "X-Kept" in row[2]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(status=st.text(max_size=6).filter(lambda t: not (t.isascii() and t.isdecimal() and 100 <= int(t) <= 999)) | st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not (f.is_integer() and 100 <= f <= 999) and f not in (0, -1)) | st.integers(1000, 10**6))
def test_a_status_that_is_no_status_is_said(tmp_path_factory, status):
    tmp = tmp_path_factory.mktemp("nostatus")
    entry = har_entry("/s")
    entry["response"]["status"] = status
    path = write(tmp / "s.har", har(entry))
    done = cli("import", path, "--db", tmp / "t.db")
    assert done.returncode == 0 and counts(tmp / "t.db")[1] == 1
    assert done.stderr.strip() == f"{path}: entry 1: response.status is not an HTTP status; recorded as a hop without a response"


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(2**63, 2**200))
def test_a_body_size_past_64_bits_is_unknown_not_a_broken_file(tmp_path_factory, size):
    tmp = tmp_path_factory.mktemp("size")
    entry = har_entry("/big")
    entry["request"]["bodySize"] = entry["response"]["bodySize"] = size
    done = cli("import", write(tmp / "b.har", har(entry, har_entry("/ok"))), "--db", tmp / "t.db")
    assert done.returncode == 0, done.stderr
    sizes = sqlite3.connect(tmp / "t.db").execute("SELECT request_size, response_size FROM hops WHERE path = '/big'").fetchone()
    assert sizes == (0, 2)  # the body's own length, as for an entry that states none


# -- secrets stay out of error messages ----------------------------------------------------

SECRET = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.SECRET_SIGNATURE"


def _bad_url(where: str, canary: str) -> str:
    url = {"query": f"http:///x?access_token={canary}", "userinfo": f"http://user:{canary}@/x", "fragment": f"http:///x#{canary}",
           "port": f"http://h:{canary}x/x?t={canary}"}[where]  # fmt: skip
    return json.dumps(har({**har_entry("/a"), "request": {**har_entry("/a")["request"], "url": url}}))


def _cut_after(canary: str, tail: str) -> str:
    text = json.dumps(har(har_entry("/a")))
    return text.replace("opaque-token-0123456789abcdef", canary).split(canary)[0] + canary + tail


LEAKY = {
    "url-query": lambda c: _bad_url("query", c),
    "url-userinfo": lambda c: _bad_url("userinfo", c),
    "url-fragment": lambda c: _bad_url("fragment", c),
    "url-port": lambda c: _bad_url("port", c),
    "syntax-after-token": lambda c: _cut_after(c, '" x ]}}]}}'),
    "truncated-after-token": lambda c: _cut_after(c, '"'),
    "bad-utf8-after-token": lambda c: _cut_after(c, "").encode() + b"\xff\xfe\"}]}}]}}",
    "date": lambda c: json.dumps(har({**har_entry("/a"), "startedDateTime": c})),
    "version": lambda c: json.dumps(har(har_entry("/a"), version=c)),
    "flow-literal": lambda c: f"{len(c) + 0}:{c}#".encode(),
    "flow-length": lambda c: f"{c}:x,".encode(),
}


@pytest.mark.parametrize("name", sorted(LEAKY))
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(canary=st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", min_size=12, max_size=40) | st.just(SECRET))
def test_an_import_error_never_echoes_a_secret(tmp_path_factory, name, canary):
    tmp = tmp_path_factory.mktemp("leak")
    content = LEAKY[name](canary)
    path = tmp / ("f.mitm" if name.startswith("flow") else "f.har")
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    done = cli("import", path, "--db", tmp / "t.db")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert canary not in done.stderr and "SIGNATURE" not in done.stderr, done.stderr


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(port=st.integers(65536, 10**30).map(str) | st.just("0") | st.text("٠١٢٣٤٥٦٧٨٩", min_size=1, max_size=5) | st.text(min_size=1, max_size=6).filter(lambda t: not t.isdigit() and ":" not in t))
def test_a_service_port_that_is_no_port_is_one_line(tmp_path_factory, port):
    tmp = tmp_path_factory.mktemp("port")
    good = write(tmp / "good.har", har(har_entry("/ok")))
    done = cli("import", good, "--db", tmp / "t.db", "--service", f"127.0.0.1:{port}=x")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert counts(tmp / "t.db")[1] == 0
