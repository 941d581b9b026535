"""The capture benchmark runs end to end and counts every hop three ways; the row process it measures is exact.

Speed is never asserted here: the benchmark prints its targets, the suite checks
that what it measures is correct (rows == responses == the service's count).
"""

from __future__ import annotations

import gzip
import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import jwt
import pandas as pd
import pytest
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from hoptrace.addons._writer import Route, TraceWriter
from hoptrace.analyzer import load

from .conftest import PYTHON, file_bytes

# The benchmark's smoke runs: CI runs them (selected by default); `-m "not bench"` leaves them out.
pytestmark = pytest.mark.bench

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
@pytest.mark.usefixtures("heavy")
def test_quick_benchmark_counts_every_hop_and_prints_every_configuration(tmp_path):
    out = tmp_path / "bench.json"
    # Rows built in the row process from the first flow: under the default ("auto")
    # a run this short would never start it, and it is what `hoptrace proxy` uses under load.
    env = {**os.environ, "HOPTRACE_ROW_PROCESS": "on", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [PYTHON, str(ROOT / "benchmarks" / "run.py"), "--only", "capture", "--quick", "--requests", "150", "--json", str(out)],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr

    table = result.stdout
    for label in (
        "direct to the service",
        "mitmdump --mode reverse",
        "mitmdump -w FILE",
        "hoptrace proxy",
        "mitmdump -s hoptrace recorder",
    ):
        assert table.count(label) >= 2, f"{label!r} missing for a concurrency:\n{table}"
    for ratio in ("b/a", "c/b", "d/b", "d/c", "e/b"):
        assert ratio in table
    for target in (
        "(d) >= 2.0 x (b) throughput",
        "(d) proxy CPU <= 1.2 ms per request",
        "(d) p99 no worse than (b)",
        "(d) >= 1.25 x (c) throughput",
        "(e) costs <= 10% of (b)",
        "0 hops lost",
    ):
        assert target in table
    assert "2 cores" in table or f"{os.cpu_count()} cores" in table
    assert "share these cores" in table

    data = json.loads(out.read_text())["capture"]
    runs = data["runs"]
    assert {(r["config"], r["clients"]) for r in runs} == {(k, c) for k in "abcde" for c in (16, 64)}
    for run in runs:
        assert run["problems"] == [], run
        assert run["ok"] == run["requests"] == 150 and run["failed"] == 0, run
        # Three counts of the same hops, warm-up included.
        assert run["responses"] == run["served"], run
        if run["config"] in "cde":
            assert run["rows"] == run["responses"], run
        if run["config"] in "de":
            counters = run["recorder"]
            assert counters["hops_recorded"] == counters["hops_seen"] == run["rows"], run
            assert counters["hops_dropped"] == counters["addon_errors"] == counters["write_errors"] == 0, run
        if run["config"] != "a":
            assert run["proxy_cpu_ms_per_req"] > 0 and run["proxy_peak_rss_mb"] > 0, run
        assert run["p50_ms"] <= run["p99_ms"]
    assert next(t for t in data["targets"] if t["target"].startswith("0 hops lost"))["result"] == "PASS"


# -- the row process: same rows as the writer thread, and it may die without losing a hop ------

SECRET = "a-32-byte-secret-for-hs256-tests!"


def _flows() -> list[http.HTTPFlow]:
    now = int(time.time())
    token = jwt.encode({"sub": "alice", "iat": now, "exp": now + 60}, SECRET, algorithm="HS256")
    flows = []
    for i in range(40):
        flow = tflow.tflow(resp=True, err=i % 7 == 3)
        flow.request.path = f"/items/{i}?access_token={token}&page={i}"
        flow.request.headers["Authorization"] = f"Bearer {token}" if i % 2 else "Bearer eyJhbGciOiJub25lIn0.e30."
        flow.request.headers["Cookie"] = f"session=s3cr3t-session-value-{i % 3}; theme=dark"
        flow.request.headers["traceparent"] = f"00-{i:032x}-{i + 1:016x}-01"
        if i % 5 == 0:
            flow.response = tutils.tresp(content=gzip.compress(json.dumps({"access_token": f"issued-token-{i:020d}"}).encode()))
            flow.response.headers.update(
                {"Content-Type": "application/json", "Content-Encoding": "gzip", "Date": "Tue, 15 Nov 1994 08:12:31 GMT"}
            )
        flows.append(flow)
    return flows


def _write(db: Path, flows, row_process: str, kill_after: int | None = None, pause_after: int | None = None):
    key = b"k" * 32
    writer = TraceWriter(db, routes=[Route("svc", "http://127.0.0.1:1", 8080)], entry="svc", key=key, row_process=row_process)
    for n, flow in enumerate(flows):
        writer.counters.seen += 1
        writer.submit("svc", flow)
        if n == pause_after:  # as traffic that pauses: the row process has its Arrow encoder ready by then
            assert writer.flush()
            time.sleep(1.5)
        if kill_after is not None and n == kill_after:
            assert writer.flush()
            writer._row_process._proc.kill()
    return writer.close()


def _table(db: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_row_process_writes_the_same_rows_as_the_writer_thread(tmp_path):
    flows = _flows()
    for mode in ("off", "on"):
        counters = _write(tmp_path / f"{mode}.db", flows, mode, pause_after=4)
        assert (counters.recorded, counters.dropped, counters.addon_errors, counters.write_errors) == (len(flows), 0, 0, 0)
    for sql in (
        "SELECT * FROM hops ORDER BY id",
        "SELECT * FROM tokens ORDER BY fingerprint",
        "SELECT * FROM hop_tokens ORDER BY 1, 2, 3, 4",
    ):
        assert _table(tmp_path / "off.db", sql) == _table(tmp_path / "on.db", sql), sql
    assert len(_table(tmp_path / "on.db", "SELECT * FROM tokens")) >= 3
    # The row process also stores each batch's Arrow columns, which the loader reads in place of the rows:
    # every batch once its encoder is ready (the first batch goes without, not to wait for it).
    assert _table(tmp_path / "off.db", "SELECT count(*) FROM hop_columns") == [(0,)]
    assert _table(tmp_path / "on.db", "SELECT max(last_id) FROM hop_columns") == [(len(flows),)]
    through_columns, rows = load(tmp_path / "on.db", reader="auto"), load(tmp_path / "off.db", reader="sqlite")
    for table in ("hops", "tokens", "hop_tokens"):  # the captures differ: each has its own start time
        pd.testing.assert_frame_equal(getattr(through_columns, table), getattr(rows, table), check_exact=True)
    raw = file_bytes(tmp_path / "on.db")
    assert b"s3cr3t-session-value" not in raw and b"issued-token-" not in raw


def test_a_dead_row_process_loses_no_hop(tmp_path, caplog):
    flows = _flows()
    counters = _write(tmp_path / "t.db", flows, "on", kill_after=9)
    assert (counters.recorded, counters.dropped, counters.addon_errors) == (len(flows), 0, 0)
    assert len(_table(tmp_path / "t.db", "SELECT id FROM hops")) == len(flows)
    assert any("row process failed" in r.getMessage() for r in caplog.records)
