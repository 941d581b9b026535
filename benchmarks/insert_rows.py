"""sqlite-utils ``insert_all`` against the recorder's ``executemany``: hop rows into a fresh trace file.

    python benchmarks/insert_rows.py [ROWS] [ROUNDS]

Both write the same rows (dicts for insert_all, tuples in HOP_COLUMNS order for executemany,
as the recorder has them) in batches of 2,000 into a file made by ``open_for_writing`` (WAL,
synchronous=NORMAL), one transaction per batch, as the recorder commits. Prints rows/s, the
median of ROUNDS.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import sqlite_utils

from hoptrace.db import HOP_COLUMNS, open_for_writing

BATCH = 2_000
_INSERT = f"INSERT INTO hops ({', '.join(HOP_COLUMNS)}) VALUES ({', '.join('?' * len(HOP_COLUMNS))})"


def rows(n: int) -> list[dict]:
    out = []
    for i in range(1, n + 1):
        row = dict.fromkeys(HOP_COLUMNS)
        t = 1_700_000_000.0 + i * 0.001
        row.update(
            id=i, capture_id=1, flow_id=f"flow-{i}", service="gateway", method="GET", scheme="http", host="127.0.0.1",
            port=8080, path=f"/orders/{i % 500}", http_version="HTTP/1.1", status=200, reason="OK", failed=0,
            request_size=0, response_size=512, started_at=t, ended_at=t + 0.004, duration_ms=4.0,
            request_headers='[["accept", "*/*"], ["authorization", "Bearer <redacted>"]]',
            response_headers='[["content-type", "application/json"]]',
        )  # fmt: skip
        out.append(row)
    return out


def _fresh(folder: Path, name: str):
    conn = open_for_writing(folder / name)
    conn.execute(
        "INSERT INTO captures (id, started_at, routes, hoptrace_version, mitmproxy_version) VALUES (1, 0, '[]', 'x', 'y')"
    )
    return conn


def with_executemany(folder: Path, data: list[dict]) -> float:
    conn = _fresh(folder, "executemany.db")
    tuples = [tuple(r[c] for c in HOP_COLUMNS) for r in data]  # the recorder builds tuples
    started = time.perf_counter()
    for lo in range(0, len(tuples), BATCH):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(_INSERT, tuples[lo : lo + BATCH])
        conn.execute("COMMIT")
    took = time.perf_counter() - started
    conn.close()
    return took


def with_insert_all(folder: Path, data: list[dict]) -> float:
    conn = _fresh(folder, "insert_all.db")
    db = sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)
    started = time.perf_counter()
    for lo in range(0, len(data), BATCH):
        with db.atomic():
            db["hops"].insert_all(data[lo : lo + BATCH], batch_size=BATCH)
    took = time.perf_counter() - started
    conn.close()
    return took


def main(n: int = 100_000, rounds: int = 3) -> None:
    data = rows(n)
    for name, run in (("executemany", with_executemany), ("sqlite-utils insert_all", with_insert_all)):
        times = []
        for _ in range(rounds):
            with tempfile.TemporaryDirectory() as folder:
                times.append(run(Path(folder), data))
        print(f"{name:24} {n / statistics.median(times):>10,.0f} rows/s  (median of {rounds}: {statistics.median(times):.2f} s)")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
