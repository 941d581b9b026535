"""The OTLP stream's window (hoptrace.proxy.otlp_window) over real SQLite shard files written as the recorder
writes them: a hop that lands in its shard late, after its request's root was sent, is still sent, under its
parent, with the ids a file export of its shard gives."""

from __future__ import annotations

import sqlite3

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from hoptrace.exchange._otlp import span_id
from hoptrace.proxy.otlp_stream import LATE, SETTLE, StreamInput
from hoptrace.proxy.otlp_window import Follower, Window
from hoptrace.proxy.workers import worker_source

from .analyzer_fixtures import T0, Builder

CAPTURE = "0123456789abcdef0123456789abcdef"


class Collected:
    """The sender's side: every message, serialised and decoded again as a receiver would."""

    def __init__(self) -> None:
        self.spans: list = []

    def add(self, message: ExportTraceServiceRequest, spans: int) -> None:
        decoded = ExportTraceServiceRequest.FromString(message.SerializeToString())
        got = [span for resource in decoded.resource_spans for scope in resource.scope_spans for span in scope.spans]
        assert len(got) == spans
        self.spans += got

    def flush(self) -> None:
        pass


def _shard(path, worker: int, build) -> None:
    builder = Builder(entry="gateway")
    token = builder.token(sub="alice", exp=3600, fingerprint="f" * 32)
    build(builder, token)
    builder.write(path)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE captures SET source = ?", (worker_source(2, CAPTURE, worker),))


def test_a_call_recorded_late_in_another_shard_is_sent_under_its_parent_once(tmp_path):
    def gateway(builder, token):
        builder.hop("gateway", "POST /checkout", 0.0, 1.0, presented=token, client_addr="127.0.0.1:50000")

    def auth(builder, token):
        builder.hop("auth", "POST /validate", 0.2, 0.5, validated=token, client_addr="127.0.0.1:50001")

    shard1, shard2, late = tmp_path / "t.w1.db", tmp_path / "t.w2.db", tmp_path / "late.db"
    _shard(shard1, 1, gateway)
    _shard(shard2, 2, lambda b, token: None)
    _shard(late, 2, auth)
    collected = Collected()
    inputs = [StreamInput(shard, source=worker_source(2, CAPTURE, worker)) for worker, shard in ((1, shard1), (2, shard2))]
    window = Window(inputs, tmp_path / "window.db")
    follower = Follower(window, "gateway", collected)

    assert window.copy() == 1
    follower.tick(T0 + 1.0 + SETTLE + 2)  # the gateway's hop ended long enough ago: sent, alone
    assert [span.span_id for span in collected.spans] == [span_id(f"{CAPTURE}/w1", 1)]

    # Worker 2's recorder was behind: the call it relayed lands in its shard only now, its start long past.
    with sqlite3.connect(shard2) as conn:
        conn.execute("ATTACH DATABASE ? AS late", (str(late),))
        for table in ("hops", "tokens", "hop_tokens"):
            conn.execute(f"INSERT OR IGNORE INTO {table} SELECT * FROM late.{table}")
    assert window.copy() == 1
    follower.tick(T0 + 30)
    root, call = collected.spans
    assert call.span_id == span_id(f"{CAPTURE}/w2", 1) != root.span_id
    assert (call.parent_span_id, call.trace_id) == (root.span_id, root.trace_id)

    follower.tick(float("inf"))  # nothing is sent twice
    assert len(collected.spans) == 2
    window.close()


def test_a_long_capture_keeps_the_hops_late_calls_need_not_two_minutes_of_them(tmp_path):
    """A request a second for 200 s, and two calls whose recorder was behind: one lands 29.8 s after it ended
    (within ``LATE``), and then one 45 s after. Until something lands late the window keeps about ``LATE`` s
    of hops, not ``HORIZON``'s two minutes; once the first did, twice that: both calls are sent under their
    parents."""
    builder, landed = Builder(entry="gateway"), []  # ids in the order the hops land, and when each does
    token = builder.token(sub="alice", exp=3600, fingerprint="f" * 32)
    late = {179: (150, 29.8), 199: (160, 45.0)}  # lands after gateway hop k: the call in request r, that late
    for k in range(200):
        builder.hop("gateway", "POST /checkout", k, k + 0.5, presented=token, client_addr="127.0.0.1:50000")
        landed.append(k + 0.5)
        if k in late:
            request, lateness = late[k]
            builder.hop("auth", "POST /validate", request + 0.2, request + 0.3, validated=token, client_addr="127.0.0.1:50001")
            landed.append(request + 0.3 + lateness)
    live, full = builder.write(tmp_path / "live.db"), builder.write(tmp_path / "full.db")
    with sqlite3.connect(live) as conn:
        conn.execute("DELETE FROM hops")
    collected = Collected()
    window = Window([StreamInput(live, capture_id=1)], tmp_path / "window.db")
    follower = Follower(window, "gateway", collected)
    kept_from, lateness = {}, {}
    for step in range(1, 22):
        now = T0 + 10 * step
        with sqlite3.connect(live) as conn:  # what the recorder committed by now
            conn.execute("ATTACH DATABASE ? AS full", (str(full),))
            conn.execute(
                "INSERT OR IGNORE INTO hops SELECT * FROM full.hops WHERE id <= ?", (sum(t <= now - T0 for t in landed),)
            )
        window.copy()
        follower.tick(now)
        kept_from[now - T0] = window.conn.execute("SELECT min(started_at) FROM hops").fetchone()[0] - T0
        lateness[now - T0] = follower.lateness
    follower.tick(float("inf"))

    assert len(collected.spans) == len(builder.hops) == 202  # each once
    by_id = {span.span_id: span for span in collected.spans}
    calls = [span for span in collected.spans if span.name.endswith("/validate")]
    parents = [by_id[call.parent_span_id].start_time_unix_nano if call.parent_span_id in by_id else None for call in calls]
    assert parents == [int((T0 + request) * 1e9) for request in (150, 160)]
    # Before anything landed late: no lateness (ten seconds between ticks are the stream's, not the
    # recorder's), and LATE s of hops, the settle time, the longest hop twice, a tick.
    assert lateness[180] == 0 and lateness[190] == pytest.approx(180 - 150.3)
    assert 170 - kept_from[170] <= LATE + SETTLE + 2 * 0.5 + 10
