"""`hoptrace proxy` and plain `mitmdump -s` as real processes in front of real upstreams on 127.0.0.1."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from hoptrace.proxy._cli import _optimized_bytecode

from .conftest import PYTHON, command_line, free_port, query

pytestmark = pytest.mark.e2e


def hops(db: Path) -> list[sqlite3.Row]:
    return query(db, "SELECT * FROM hops ORDER BY id")


def capture(db: Path) -> sqlite3.Row:
    return query(db, "SELECT * FROM captures")[0]


async def fetch_all(urls: list[str], concurrency: int, headers: dict | None = None) -> list[int]:
    """GET every URL with `concurrency` keep-alive workers; returns the statuses (0 for a failure)."""
    statuses: list[int] = []
    queue = list(reversed(urls))
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker() -> None:
            while queue:
                url = queue.pop()
                try:
                    async with session.get(url, headers=headers) as response:
                        await response.read()
                        statuses.append(response.status)
                except aiohttp.ClientError:
                    statuses.append(0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def test_records_every_hop_and_stops_cleanly_on_sigint(upstream, proxy):
    proc, listen, db = proxy({"hello": upstream("hello")})
    statuses = asyncio.run(fetch_all([f"{listen['hello']}/items/{i}?page={i}" for i in range(20)], 4))
    assert statuses == [200] * 20
    assert proc.stop(signal.SIGINT) == 0
    assert "20 hops recorded, 0 dropped, 0 addon errors, 0 write errors" in proc.output
    recorded = hops(db)
    assert len(recorded) == 20
    assert {h["service"] for h in recorded} == {"hello"}
    assert sorted(h["path"] for h in recorded) == sorted(f"/items/{i}" for i in range(20))
    for hop in recorded:
        assert hop["started_at"] <= hop["response_start_at"] <= hop["ended_at"]
        assert hop["server_date"] is not None and hop["failed"] == 0
    row = capture(db)
    assert (row["hops_seen"], row["hops_recorded"], row["hops_dropped"], row["addon_errors"]) == (20, 20, 0, 0)
    assert json.loads(row["routes"])[0]["name"] == "hello" and row["ended_at"] is not None


def test_the_program_reruns_itself_under_python_O_in_the_same_process(upstream, proxy):
    # mitmproxy's self-checks behind __debug__ cost a fifth of the proxy's CPU per request.
    assert _optimized_bytecode(), "no -O bytecode of mitmproxy here: dev.py compiles it when it installs"
    proc, listen, db = proxy({"hello": upstream("hello")})
    assert command_line(proc.popen.pid)[1:5] == ["-O", "-m", "hoptrace", "proxy"]
    assert asyncio.run(fetch_all([f"{listen['hello']}/items/1"], 1)) == [200]
    assert proc.stop(signal.SIGINT) == 0
    assert "1 hops recorded, 0 dropped" in proc.output and len(hops(db)) == 1


@pytest.mark.parametrize(("cached", "may_write", "expected"), [(False, False, False), (True, False, True), (False, True, True)])
def test_python_O_is_skipped_only_where_mitmproxy_would_be_compiled_at_every_start(tmp_path, monkeypatch, cached, may_write, expected):
    pyc = tmp_path / "__pycache__" / "http.cpython-311.opt-1.pyc"
    if cached:
        pyc.parent.mkdir()
        pyc.write_bytes(b"")
    monkeypatch.setattr(importlib.util, "cache_from_source", lambda source, optimization: str(pyc))
    monkeypatch.setattr(sys, "dont_write_bytecode", not may_write)
    assert _optimized_bytecode() is expected


def test_the_proxy_runs_with_its_standard_output_closed(upstream, tmp_path):
    db, port = tmp_path / "t.db", free_port()
    args = [PYTHON, "-m", "hoptrace", "proxy", "--db", str(db), "--route", f"hello={upstream('hello')}@{port}"]
    # fd 1 closed in the child: Python starts with sys.stdout None.
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: os.close(1),  # noqa: PLW1509 -- a test's child, no threads in play
    )  # fmt: skip
    try:
        said = []
        for line in proc.stderr:
            said.append(line)
            if "proxy ready" in line:
                break
        assert "proxy ready" in "".join(said), "".join(said)
        assert asyncio.run(fetch_all([f"http://127.0.0.1:{port}/items/1"], 1)) == [200]
        proc.send_signal(signal.SIGINT)
        said.append(proc.communicate(timeout=30)[1])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "Traceback" not in "".join(said), "".join(said)
    assert len(hops(db)) == 1


def test_unreachable_and_truncating_upstreams_are_recorded_as_failed(upstream, proxy):
    refused = f"http://127.0.0.1:{free_port()}"
    proc, listen, db = proxy({"gone": refused, "crashy": upstream("truncate")})
    statuses = asyncio.run(fetch_all([f"{listen['gone']}/a", f"{listen['crashy']}/b"], 1))
    assert statuses[0] == 502  # mitmproxy answers for the dead upstream
    assert proc.stop() == 0
    by_service = {h["service"]: h for h in hops(db)}
    assert by_service["gone"]["failed"] == 1 and by_service["gone"]["error_kind"] == "refused"
    crashy = by_service["crashy"]
    assert crashy["failed"] == 1 and crashy["error_kind"] in ("truncated", "reset")
    assert crashy["error"]


def test_bounded_load_loses_nothing(upstream, proxy):
    base = upstream("hello")
    proc, listen, db = proxy({"hello": base})
    requests = 5000
    statuses = asyncio.run(fetch_all([f"{listen['hello']}/load/{i}" for i in range(requests)], 32, headers={"Authorization": "Bearer opaque-load-token-0123456789"}))
    served = asyncio.run(_stats(base))
    assert proc.stop() == 0
    assert statuses.count(200) == requests
    assert served == requests
    assert len(hops(db)) == requests
    row = capture(db)
    assert (row["hops_recorded"], row["hops_dropped"], row["addon_errors"], row["write_errors"]) == (requests, 0, 0, 0)


async def _stats(base: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"{base}/_stats") as response:
        return (await response.json())["total"]


def mitmdump_args(upstream_url: str, service: str, port: int, db: Path) -> list[str]:
    """Plain mitmdump with the recorder script `hoptrace addon-path` prints, listening on 127.0.0.1 only."""
    mitmdump = shutil.which("mitmdump") or str(Path(sys.executable).with_name("mitmdump"))
    script = subprocess.run([PYTHON, "-m", "hoptrace", "addon-path"], capture_output=True, text=True, check=True).stdout.strip()
    return [mitmdump, "-q", "-s", script, "--set", f"hoptrace_db={db}", "--set", f"hoptrace_service={service}@{port}",
            "--set", "connection_strategy=lazy", "--mode", f"reverse:{upstream_url}@127.0.0.1:{port}"]  # fmt: skip


def test_plain_mitmdump_with_the_recorder_script(upstream, spawn, tmp_path):
    port, db = free_port(), tmp_path / "mitmdump.db"
    proc = spawn(mitmdump_args(upstream("hello"), "hello", port, db))
    # mitmdump -q prints nothing when ready: poll the listener.
    statuses = asyncio.run(_poll_then_fetch(f"http://127.0.0.1:{port}", 10))
    assert statuses == [200] * 10
    assert proc.stop(signal.SIGTERM) == 0
    assert "hoptrace: 10 hops recorded, 0 dropped" in proc.output
    recorded = hops(db)
    assert len(recorded) == 10 and {h["service"] for h in recorded} == {"hello"}


async def _poll_then_fetch(base: str, count: int) -> list[int]:
    for _ in range(200):
        try:
            async with aiohttp.ClientSession() as session, session.get(f"{base}/ready"):
                break
        except aiohttp.ClientError:
            await asyncio.sleep(0.05)
    else:
        raise AssertionError("mitmdump never listened")
    return await fetch_all([f"{base}/n/{i}" for i in range(count - 1)], 2) + [200]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--route", "auth"], "expected NAME=UPSTREAM_URL@LISTEN_PORT"),
        (["--route", "auth=ftp://x@13001"], "must be an http:// or https:// URL"),
        (["--route", "auth=http://127.0.0.1:1@99999"], "out of range"),
        (["--route", "svc=http://[::1@18090"], "Invalid IPv6 URL"),
        (["--route", "a=http://127.0.0.1:1@13001", "--route", "a=http://127.0.0.1:2@13002"], "service name used by more than one route: a"),
        (["--route", "a=http://127.0.0.1:1@13001", "--entry", "zzz"], "entry 'zzz' is not a route"),
        ([], "give either --route"),
        (["--stack", "/nonexistent/stack.toml"], "no such stack file"),
        (["--route", "a=http://127.0.0.1:1@13001", "--db", "/nonexistent-dir/t.db"], "cannot open for writing"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = subprocess.run([PYTHON, "-m", "hoptrace", "proxy", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_port_in_use_and_foreign_db(tmp_path):
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([PYTHON, "-m", "hoptrace", "proxy", "--route", f"a=http://127.0.0.1:1@{port}", "--db", str(tmp_path / "t.db")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and f"port 127.0.0.1:{port} is already in use" in result.stderr
    foreign = tmp_path / "notes.txt"
    foreign.write_text("not a database, just notes\n" * 100)
    result = subprocess.run([PYTHON, "-m", "hoptrace", "proxy", "--route", f"a=http://127.0.0.1:1@{free_port()}", "--db", str(foreign)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "notes.txt" in result.stderr and "Traceback" not in result.stderr
    assert foreign.read_text().startswith("not a database")  # left as it was


def test_stack_file(upstream, spawn, tmp_path):
    port = free_port()
    stack = tmp_path / "stack.toml"
    stack.write_text(f'entry = "hello"\ndb = "{tmp_path / "from-stack.db"}"\n\n[routes.hello]\nupstream = "{upstream("hello")}"\nlisten = {port}\n')
    proc = spawn([PYTHON, "-m", "hoptrace", "proxy", "--stack", str(stack)], ready="proxy ready")
    assert asyncio.run(fetch_all([f"http://127.0.0.1:{port}/s"], 1)) == [200]
    assert proc.stop() == 0
    assert len(hops(tmp_path / "from-stack.db")) == 1
