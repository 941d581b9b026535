"""`hoptrace proxy --otlp-endpoint`: a live sample-stack run streamed to an OTLP/HTTP receiver started here
(aiohttp on 127.0.0.1), which decodes every body with the OpenTelemetry project's protobuf messages."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import time
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse

from hoptrace.cli import cli
from hoptrace.exchange._otlp import from_otlp_json, span_id
from hoptrace.proxy.otlp_stream import traces_url
from hoptrace.proxy.workers import capture_shards
from hoptrace.stack.scenarios import SCENARIOS, record

from .conftest import PYTHON, free_port, query


class Receiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces, application/x-protobuf."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.arrived: list[float] = []
        self.content_types: set[str] = set()

    async def handle(self, request: web.Request) -> web.Response:
        self.content_types.add(request.content_type)
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
    port = site._server.sockets[0].getsockname()[1]
    scenario = SCENARIOS["checkout-expiry"]

    async def drive(gateway_url: str, services=None):
        flows = await scenario.drive(gateway_url, services)
        # Keep the proxy running until spans arrive (bounded): they must come while it records, not at its stop.
        deadline = time.monotonic() + 20
        while not receiver.bodies and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return flows

    try:
        endpoint = ("--otlp-endpoint", f"http://127.0.0.1:{port}")
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
    # Streamed while the proxy ran, not only at its stop.
    stopped_at = float(re.search(r"stopping at (\d+\.\d+)", recording.proxy_output)[1])
    assert min(receiver.arrived) < stopped_at, recording.proxy_output
    # Canary: no bearer token (a JWT starts eyJ, base64 of '{"') in anything the receiver got.
    assert not any(b"eyJ" in body for body in receiver.bodies)


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_a_streaming_process_that_dies_is_named_and_does_not_hold_up_the_stop(spawn, tmp_path):
    """The stream is a process of its own: when it dies the proxy still stops at once, says so, and loses no hop."""
    hello, receiver, listen = free_port(), free_port(), free_port()
    spawn([PYTHON, "-m", "hoptrace.stack.upstreams", "hello", str(hello)], ready="listening")
    spawn([PYTHON, "-m", "hoptrace.stack.upstreams", "otlp", str(receiver)], ready="listening")
    db = tmp_path / "t.db"
    proxy = spawn([PYTHON, "-m", "hoptrace", "proxy", "--db", str(db), "--route", f"svc=http://127.0.0.1:{hello}@{listen}",
                   "--otlp-endpoint", f"http://127.0.0.1:{receiver}"], ready="proxy ready")  # fmt: skip
    for i in range(5):
        with urllib.request.urlopen(f"http://127.0.0.1:{listen}/hello/{i}", timeout=10) as response:
            assert response.status == 200
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
