"""`hoptrace proxy --workers N`: real worker processes sharing a port (SO_REUSEPORT) in front of a real
aiohttp upstream on 127.0.0.1, real clients, real shard files."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import signal
import socket
import sqlite3

import aiohttp
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from hoptrace.analyzer import load
from hoptrace.cli import cli
from hoptrace.proxy.workers import capture_shards, parse_worker_source

from .analyzer_fixtures import same_tables
from .conftest import PYTHON, children, command_line, free_port, query

REQUESTS = 2_000
CLIENTS = 32


def _jwt(sub: str) -> str:
    def part(d):
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part({'sub': sub, 'exp': 4102444800})}.c2lnbmF0dXJlLWNhbmFyeQ"


TOKEN = _jwt("worker-canary")


async def _load(base: str) -> int:
    """REQUESTS requests from CLIENTS clients, half over a fresh connection each, half over keep-alive ones."""
    todo = iter(range(REQUESTS))
    answered = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal answered
        for i in todo:
            async with session.get(f"{base}/items/{i}", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                await response.read()
                answered += response.status == 200

    fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=30))
    kept = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    async with fresh, kept:
        await asyncio.gather(*(client(fresh if n % 2 else kept) for n in range(CLIENTS)))
    return answered


async def _served(upstream_url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"{upstream_url}/_stats") as response:
        return (await response.json())["total"]


@pytest.mark.e2e
@pytest.mark.usefixtures("heavy")
def test_two_workers_share_the_port_and_record_every_hop_across_shards(proxy, upstream, tmp_path):
    url = upstream("hello")
    proc, listen, db = proxy({"hello": url}, "--workers", "2")
    workers = [c for c in map(command_line, children(proc.popen.pid)) if "--multiprocessing-fork" in c]
    # The parent re-ran itself under -O; multiprocessing hands the flag on to the workers.
    assert len(workers) == 2 and all(c[1] == "-O" for c in workers), workers
    answered = asyncio.run(_load(listen["hello"]))
    served = asyncio.run(_served(url))
    assert proc.stop(signal.SIGINT) == 0, proc.output

    shards = capture_shards(db)
    assert [s.name for s in shards] == ["traces.w1.db", "traces.w2.db"]
    assert not db.exists() and not list(tmp_path.glob("*-wal")), "shards only, each left in journal mode DELETE"
    rows = {s.name: query(s, "SELECT count(*) FROM hops WHERE status = 200")[0][0] for s in shards}
    # Both workers took connections: the port really was shared (SO_REUSEPORT, set by share_listen_ports).
    assert all(rows.values()), rows
    assert sum(rows.values()) == answered == served == REQUESTS
    captures = [query(s, "SELECT * FROM captures")[0] for s in shards]
    labels = [parse_worker_source(c["source"]) for c in captures]
    assert {label[1] for label in labels} == {labels[0][1]} and sorted(label[2] for label in labels) == [1, 2]
    assert all(c["ended_at"] is not None and c["hops_dropped"] == 0 for c in captures)
    assert sum(c["hops_recorded"] for c in captures) == REQUESTS
    assert all(query(s, "PRAGMA journal_mode")[0][0] == "delete" for s in shards)
    # Each worker's row process stored its batches' Arrow columns, which read as the rows do.
    for shard in shards:
        assert query(shard, "SELECT max(last_id) FROM hop_columns")[0][0] == query(shard, "SELECT max(id) FROM hops")[0][0]
        same_tables(load(shard, reader="auto"), load(shard, reader="sqlite"))
    # One fingerprint key for the capture: the same token has the same fingerprint in every shard.
    fingerprints = {row[0] for s in shards for row in query(s, "SELECT fingerprint FROM tokens")}
    assert len(fingerprints) == 1
    assert all(b"c2lnbmF0dXJlLWNhbmFyeQ" not in s.read_bytes() for s in shards)
    # The parent's summary is the true total of both workers.
    assert re.search(rf"2 workers: {REQUESTS} hops recorded, 0 dropped", proc.output), proc.output
    assert len(re.findall(r"worker \d: \d+ hops recorded, 0 dropped", proc.output)) == 2


@pytest.mark.e2e
def test_a_worker_that_cannot_listen_stops_them_all_with_one_line(spawn, upstream, tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", free_port()))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        args = [
            PYTHON,
            "-m",
            "hoptrace",
            "proxy",
            "--db",
            str(tmp_path / "t.db"),
            "--workers",
            "2",
            "--route",
            f"a={upstream('hello')}@{port}",
        ]
        proc = spawn(args)
        code = proc.popen.wait(60)
        proc._reader.join(5)
    finally:
        taken.close()
    assert code == 2, proc.output
    assert "already in use" in proc.output and "Traceback" not in proc.output


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=6).filter(lambda v: v != "auto" and not (v.isascii() and v.isdigit() and 1 <= int(v) <= 256)))
def test_a_bad_workers_value_exits_2_with_one_line(value):
    result = CliRunner().invoke(cli, ["proxy", "--route", "a=http://127.0.0.1:1@18080", "--workers", value])
    assert result.exit_code == 2, result.output
    assert "--workers" in result.output and "Traceback" not in result.output


def test_shards_of_a_capture_are_listed_in_worker_order(tmp_path):
    for name in ("t.w10.db", "t.w2.db", "t.w1.db", "t.db", "t.wx.db", "other.w1.db"):
        sqlite3.connect(tmp_path / name).close()
    assert [p.name for p in capture_shards(tmp_path / "t.db")] == ["t.w1.db", "t.w2.db", "t.w10.db"]
