"""`hoptrace proxy --otlp-endpoint`: a live sample-stack run streamed to an OTLP/HTTP receiver started here
(aiohttp on 127.0.0.1), which decodes every body with the OpenTelemetry project's protobuf messages; what the stream
did is kept on the capture row (schema 4) and named in the analysis when spans were lost."""

from __future__ import annotations

import asyncio
import base64
import math
import os
import re
import shutil
import signal
import sqlite3
import threading
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from aiohttp import web
from click.testing import CliRunner
from hypothesis import example, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse

from hoptrace.analyzer import analyze
from hoptrace.analyzer._analysis import stream_notes
from hoptrace.cli import cli
from hoptrace.exchange._otlp import from_otlp_json, span_id
from hoptrace.proxy.otlp_stream import StreamInput, _on_idle_cpu, record_counts, shown_url, traces_url
from hoptrace.proxy.workers import capture_shards, worker_source
from hoptrace.stack.scenarios import SCENARIOS, record

from .conftest import PYTHON, free_port, query

SAMPLES = Path(__file__).parent.parent / "sample_traces"


CANARY = "canary-secret-5e1f"
COUNTS = "SELECT otlp_endpoint, otlp_spans_sent, otlp_spans_dropped FROM captures"


def _canary_nowhere(db: Path, *outputs: str) -> None:
    """The endpoint's password is in no byte of the trace file (and its -wal, -journal) nor in any output."""
    for path in db.parent.glob(f"{db.name}*"):
        assert CANARY.encode() not in path.read_bytes(), path
    for output in outputs:
        assert CANARY not in output


class Receiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces, application/x-protobuf."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.arrived: list[float] = []
        self.content_types: set[str] = set()
        self.authorizations: set[str | None] = set()
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.content_types.add(request.content_type)
        self.authorizations.add(request.headers.get("Authorization"))
        self.bodies.append(await request.read())
        self.arrived.append(time.time())
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf")

    def spans(self) -> list:
        return [
            span
            for body in self.bodies
            for resource in ExportTraceServiceRequest.FromString(body).resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]


async def _record_streaming(db, receiver: Receiver, *proxy_args: str):
    app = web.Application()
    app.router.add_post("/v1/traces", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = receiver.port = site._server.sockets[0].getsockname()[1]
    scenario = SCENARIOS["checkout-expiry"]

    async def drive(gateway_url: str, services=None):
        flows = await scenario.drive(gateway_url, services)
        # Keep the proxy running until spans arrive (bounded): they must come while it records, not at its stop.
        deadline = time.monotonic() + 20
        while not receiver.bodies and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return flows

    try:
        # Credentials in the URL, as a hosted receiver takes them: sent as Basic auth, never stored.
        endpoint = ("--otlp-endpoint", f"http://user:{CANARY}@127.0.0.1:{port}/?token={CANARY}")
        return await record(db, scenario.stack_config(), drive, proxy_args=(*endpoint, *proxy_args))
    finally:
        await runner.cleanup()


@pytest.mark.e2e
def test_every_hop_of_a_live_run_reaches_the_receiver_as_a_span_with_its_parent(tmp_path):
    receiver = Receiver()
    db = tmp_path / "stream.db"
    recording = asyncio.run(_record_streaming(db, receiver))
    assert recording.proxy_exit == 0, recording.proxy_output

    conn = sqlite3.connect(db)
    capture_id, hop_ids = conn.execute("SELECT max(capture_id), group_concat(id) FROM hops").fetchone()
    conn.close()
    hop_ids = [int(i) for i in hop_ids.split(",")]
    spans = receiver.spans()
    assert receiver.content_types == {"application/x-protobuf"}
    # Every hop once, no more.
    assert sorted(span.span_id for span in spans) == sorted(span_id(capture_id, hop) for hop in hop_ids)
    in_trace = {(span.trace_id, span.span_id) for span in spans}
    assert all((span.trace_id, span.parent_span_id) in in_trace for span in spans if span.parent_span_id)
    roots = [span for span in spans if not span.parent_span_id]
    assert len(roots) < len(spans) / 2, "the calls between services came with their inferred parents"
    # The checkout that outlived its token: its finding travels as an event on a hop.
    assert any(event.name == "expired_mid_flow" for span in spans for event in span.events)
    match = re.search(r"(\d+) spans streamed over OTLP, (\d+) dropped", recording.proxy_output)
    assert match and (int(match[1]), int(match[2])) == (len(hop_ids), 0), recording.proxy_output
    # The capture row keeps the same counts: the receiver (without its credentials) got every span.
    stored = [tuple(row) for row in query(db, f"{COUNTS} WHERE id = ?", capture_id)]
    assert stored == [(f"http://127.0.0.1:{receiver.port}/v1/traces", len(spans), 0)]
    assert receiver.authorizations == {"Basic " + base64.b64encode(f"user:{CANARY}".encode()).decode()}
    analysis = analyze(db)
    assert not [note for note in analysis.notes if "streamed" in note], analysis.notes  # nothing lost: nothing to say
    _canary_nowhere(db, recording.proxy_output, CliRunner().invoke(cli, ["analyze", str(db)]).output)
    # Streamed while the proxy ran, not only at its stop.
    stopped_at = float(re.search(r"stopping at (\d+\.\d+)", recording.proxy_output)[1])
    assert min(receiver.arrived) < stopped_at, recording.proxy_output
    # Canary: no bearer token (a JWT starts eyJ, base64 of '{"') in anything the receiver got.
    assert not any(b"eyJ" in body for body in receiver.bodies)


@pytest.mark.e2e
@pytest.mark.usefixtures("heavy")
def test_with_two_workers_one_stream_sends_every_hop_of_every_shard_once_with_parents_across_shards(tmp_path):
    receiver = Receiver()
    db = tmp_path / "stream.db"
    recording = asyncio.run(_record_streaming(db, receiver, "--workers", "2"))
    assert recording.proxy_exit == 0, recording.proxy_output
    shards = capture_shards(db)
    assert len(shards) == 2

    # Each shard exported to a file later: the ids the stream sent are the file export's.
    exported = {}
    for shard in shards:
        out = tmp_path / f"{shard.stem}.jsonl"
        result = CliRunner().invoke(cli, ["export", str(shard), "--otlp", str(out)])
        assert result.exit_code == 0, result.output
        for line in out.read_text().splitlines():
            for resource in from_otlp_json(line).resource_spans:
                for span in resource.scope_spans[0].spans:
                    exported[span.span_id] = shard
    hops = sum(sqlite3.connect(shard).execute("SELECT count(*) FROM hops").fetchone()[0] for shard in shards)
    assert len(exported) == hops, "two shards' hops never share a span id"
    assert set(exported.values()) == set(shards), "both workers recorded hops"

    spans = receiver.spans()
    # Every hop of every shard, once.
    assert sorted(span.span_id for span in spans) == sorted(exported)
    # One stream reads both shards as one capture: a parent is found in the other shard, in the same trace.
    in_trace = {(span.trace_id, span.span_id) for span in spans}
    with_parent = [span for span in spans if span.parent_span_id]
    assert all((span.trace_id, span.parent_span_id) in in_trace for span in with_parent)
    across = [span for span in with_parent if exported[span.span_id] != exported[span.parent_span_id]]
    assert across, "the services' calls came to both workers: some parents are in the other shard"
    # Every request's tree is whole: the only roots are the client's requests to the gateway.
    services = {
        span.span_id: resource.resource.attributes[0].value.string_value
        for body in receiver.bodies
        for resource in ExportTraceServiceRequest.FromString(body).resource_spans
        for span in resource.scope_spans[0].spans
    }
    assert {services[span.span_id] for span in spans if not span.parent_span_id} == {"gateway"}
    assert any(event.name == "expired_mid_flow" for span in spans for event in span.events)
    match = re.search(r"2 workers: .*; (\d+) spans streamed over OTLP, (\d+) dropped", recording.proxy_output)
    assert match and (int(match[1]), int(match[2])) == (hops, 0), recording.proxy_output
    # One stream, its counts written once: on the first shard's row; the shards analysed together count each span once.
    url = f"http://127.0.0.1:{receiver.port}/v1/traces"
    assert [[tuple(row) for row in query(shard, COUNTS)] for shard in shards] == [[(url, hops, 0)], [(None, None, None)]]
    joined = analyze(shards).captures
    assert len(joined) == 1 and tuple(joined.iloc[0][["otlp_endpoint", "otlp_spans_sent", "otlp_spans_dropped"]]) == (url, hops, 0)
    for shard in shards:
        _canary_nowhere(shard, recording.proxy_output)
    stopped_at = float(re.search(r"stopping at (\d+\.\d+)", recording.proxy_output)[1])
    assert min(receiver.arrived) < stopped_at, "streamed while the workers recorded"
    # The stream was paused before the workers closed their shards: each was left self-contained.
    assert all(sqlite3.connect(shard).execute("PRAGMA journal_mode").fetchone()[0] == "delete" for shard in shards)
    assert not any(b"eyJ" in body for body in receiver.bodies)


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=30).filter(lambda v: not re.match(r"^[\x00-\x20]*https?://", v, re.IGNORECASE)))
def test_an_endpoint_that_is_not_an_http_url_exits_2_with_one_line(value):
    result = CliRunner().invoke(cli, ["proxy", "--route", "a=http://127.0.0.1:1@18080", "--otlp-endpoint", value])
    assert result.exit_code == 2, result.output
    assert "--otlp-endpoint" in result.output and "Traceback" not in result.output


@settings(max_examples=20, deadline=None)
@given(st.one_of(st.integers(65536, 10**12).map(str), st.from_regex(r"[0-9]{0,3}[a-z][0-9a-z]{0,3}", fullmatch=True)))
def test_an_endpoint_with_a_port_that_is_none_exits_2_with_one_line(port):
    result = CliRunner().invoke(cli, ["proxy", "--route", "a=http://127.0.0.1:1@18080", "--otlp-endpoint", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 2 and "--otlp-endpoint: Port" in result.output and "Traceback" not in result.output, result.output


def test_the_traces_path_is_added_once():
    assert traces_url("http://127.0.0.1:4318") == "http://127.0.0.1:4318/v1/traces"
    assert traces_url("http://127.0.0.1:4318/") == "http://127.0.0.1:4318/v1/traces"
    assert traces_url("https://collector.example:4318/v1/traces") == "https://collector.example:4318/v1/traces"


def _streaming_children(parent: int) -> list[int]:
    """The proxy's multiprocessing children (the OTLP stream; the row process starts only under load)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def _five_requests_streamed(spawn, db: Path, endpoint: str):
    """A proxy recording into ``db`` and streaming to ``endpoint``, in front of a hello service, after 5 requests."""
    hello, listen = free_port(), free_port()
    spawn([PYTHON, "-m", "hoptrace.stack.upstreams", "hello", str(hello)], ready="listening")
    proxy = spawn([PYTHON, "-m", "hoptrace", "proxy", "--db", str(db), "--route", f"svc=http://127.0.0.1:{hello}@{listen}",
                   "--otlp-endpoint", endpoint], ready="proxy ready")  # fmt: skip
    for i in range(5):
        with urllib.request.urlopen(f"http://127.0.0.1:{listen}/hello/{i}", timeout=10) as response:
            assert response.status == 200
    return proxy


@pytest.mark.e2e
def test_a_streaming_process_that_dies_is_named_and_does_not_hold_up_the_stop(spawn, tmp_path):
    """The stream is a process of its own: when it dies the proxy still stops at once, says so, and loses no hop."""
    receiver = free_port()
    spawn([PYTHON, "-m", "hoptrace.stack.upstreams", "otlp", str(receiver)], ready="listening")
    db = tmp_path / "t.db"
    proxy = _five_requests_streamed(spawn, db, f"http://127.0.0.1:{receiver}")
    deadline = time.monotonic() + 20
    while not (children := _streaming_children(proxy.popen.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(children) == 1, children
    os.kill(children[0], signal.SIGKILL)
    # Before the fix the stop waited 60 s for the dead process's answer; the bound here is half that.
    code = proxy.stop(timeout=30)
    assert code != -signal.SIGKILL, proxy.output
    assert "OTLP STREAMING FAILED" in proxy.output
    assert len(query(db, "SELECT id FROM hops")) == 5
    # The row says it streamed, and that the counts are unknown: never a 0 that reads as "nothing lost".
    url = f"http://127.0.0.1:{receiver}/v1/traces"
    assert [tuple(row) for row in query(db, COUNTS)] == [(url, None, None)]
    said = f"capture 1 streamed spans to {url}, but its stream died before counting them"
    assert [note for note in analyze(db).notes if note.startswith(said)], analyze(db).notes


@pytest.mark.e2e
def test_spans_a_receiver_never_took_are_counted_on_the_capture_row_and_named_by_analyze(spawn, tmp_path):
    """A receiver that is down (a closed port: every POST refused): each span is dropped, and the file says so."""
    closed = free_port()
    db = tmp_path / "t.db"
    proxy = _five_requests_streamed(spawn, db, f"http://user:{CANARY}@127.0.0.1:{closed}?api_key={CANARY}")
    assert proxy.stop(timeout=30) == 0, proxy.output  # spans lost to the receiver: the capture itself is whole
    assert "0 spans streamed over OTLP, 5 dropped" in proxy.output
    url = f"http://127.0.0.1:{closed}/v1/traces"
    assert [tuple(row) for row in query(db, COUNTS)] == [(url, 0, 5)]
    result = CliRunner().invoke(cli, ["analyze", str(db)])
    assert result.exit_code == 0, result.output
    assert f"capture 1 streamed 0 spans to {url}; 5 dropped (queue full or refused)" in result.output
    _canary_nowhere(db, proxy.output, result.output)


def test_counts_no_file_will_take_are_one_line_on_stderr_and_the_next_shard_takes_them(tmp_path, capsys):
    """The counts are written after the recorders closed their files: a shard that is gone, not a database, or
    without the capture's row is passed over for the next (a --workers capture); when none takes them, one line
    names each, and nothing raises (the capture is whole; the summary line has the counts)."""
    db = tmp_path / "clean.db"
    shutil.copyfile(SAMPLES / "clean.db", db)
    hops = query(db, "SELECT count(*) FROM hops")[0][0]
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database " * 100)
    endpoint = f"http://u:{CANARY}@127.0.0.1:1?k={CANARY}"
    unusable = [StreamInput(tmp_path / "gone.db", capture_id=1), StreamInput(garbage, capture_id=1), StreamInput(db, capture_id=99)]
    assert not record_counts(unusable, endpoint, 3, 0)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(str(i.db) in err for i in unusable) and "Traceback" not in err, err
    assert CANARY not in err and garbage.read_bytes() == b"not a database " * 100
    assert [tuple(row) for row in query(db, COUNTS)] == [(None, None, None)]

    assert record_counts([unusable[0], StreamInput(db, capture_id=1), StreamInput(db, capture_id=1)], endpoint, 3, 0)
    assert capsys.readouterr().err == ""
    assert [tuple(row) for row in query(db, COUNTS)] == [("http://127.0.0.1:1/v1/traces", 3, 0)]
    assert query(db, "SELECT count(*) FROM hops")[0][0] == hops


@settings(max_examples=60, deadline=None)
@example("x", 2**70, 2**70, False).via("wider than int64: what SQLite returns as REAL, a hostile object column as an int")
@example("x" * 300, 2**63 - 1, 2**63 - 1, True).via("the longest note")
@example("x", 3.0, float("nan"), False).via("a float column: a NULL elsewhere in it")
@given(
    st.one_of(st.none(), st.text(max_size=300)),
    *[st.one_of(st.none(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=5), st.binary(max_size=5))] * 2,
    st.booleans(),
)
def test_a_captures_stream_counts_read_as_one_short_line_whatever_the_file_holds(endpoint, sent, dropped, shards):
    columns = {"otlp_endpoint": [endpoint], "otlp_spans_sent": [sent], "otlp_spans_dropped": [dropped]}
    captures = pd.DataFrame(columns, index=pd.Index([7], name="id"), dtype=object)
    captures["source"] = worker_source(2, "ab" * 16, 1) if shards else "hoptrace proxy"
    notes = stream_notes(captures)
    assert len(notes) <= 1 and all("\n" not in note and len(note) < 200 for note in notes)
    label = "--workers capture abababababab" if shards else "capture 7"
    if endpoint is None:
        assert notes == []
    elif isinstance(dropped, float) and math.isnan(dropped):  # unknown: the stream died
        assert notes[0].startswith(f"{label} streamed spans to ")
    elif type(dropped) is int and 0 < dropped < 2**63 and type(sent) is int and 0 <= sent < 2**63:
        shown = " ".join(endpoint.split())
        shown = shown if len(shown) <= 64 else f"{shown[:63]}…"
        assert notes == [f"{label} streamed {sent:,} spans to {shown}; {dropped:,} dropped (queue full or refused)"]


def test_the_url_kept_has_no_credentials_nor_query():
    assert shown_url(f"https://user:{CANARY}@collector.example:4318/otlp/?token={CANARY}#x") == "https://collector.example:4318/otlp/v1/traces"
    assert shown_url("http://[::1]:4318") == "http://[::1]:4318/v1/traces"


def test_an_analysis_during_the_capture_runs_at_sched_idle_and_leaves_the_callers_priority_alone():
    seen = []
    _on_idle_cpu(lambda: seen.append((os.sched_getscheduler(0), threading.current_thread() is threading.main_thread())))
    assert seen == [(os.SCHED_IDLE, False)]
    # The copy and the last analysis after the stop stay at the process's own priority.
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_what_an_analysis_on_idle_cpu_raises_is_raised_in_the_callers_thread():
    def fail(message):
        raise sqlite3.DatabaseError(message)

    with pytest.raises(sqlite3.DatabaseError, match="from the analysis thread"):
        _on_idle_cpu(fail, "from the analysis thread")
