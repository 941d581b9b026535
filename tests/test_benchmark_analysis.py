"""The analysis benchmark runs end to end and checks what it measures: every hop read back,
every planted fault found once per cohort, the same findings at every size.

Speed is never asserted here: the benchmark prints its targets.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from hoptrace.db import SCHEMA_VERSION

from .conftest import PYTHON

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import analysis  # benchmarks/ is a folder of scripts, put on the path above
import synth

# The benchmark's smoke runs: CI runs them (selected by default); `-m "not bench"` leaves them out.
pytestmark = pytest.mark.bench


@pytest.mark.e2e
def test_small_analysis_benchmark_finds_the_planted_faults_in_every_cohort_at_every_size(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [PYTHON, str(ROOT / "benchmarks" / "run.py"), "--only", "analysis", "--sizes", "900,4000",
         "--analysis-rounds", "1", "--json", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())["analysis"]

    sizes = result["sizes"]
    assert [s["cohorts"] for s in sizes] == [1, round(4000 / sizes[0]["hops_per_cohort"])]
    for size in sizes:
        assert size["problems"] == []
        assert size["hops"] == size["cohorts"] * size["hops_per_cohort"]
        assert size["hops_read"] == [size["hops"]]
        assert size["signatures"][0]["differing"] == 0
    first = sizes[0]["signatures"][0]
    assert sizes[1]["signatures"][0] == first
    found = Counter(kind for kind, _, n in first["cohort"] for _ in range(n))
    for kind in synth.PLANTED:
        assert found[kind] == 1, f"{kind}: {found}"
    assert first["capture_wide"] == {f"clock_skew {synth.SKEWED_SERVICE}": 1}
    # Findings scale with the cohorts: the bigger DB has exactly as many per cohort.
    assert {k: n * sizes[1]["cohorts"] for k, n in sizes[0]["findings"].items() if k != "clock_skew"} == {
        k: n for k, n in sizes[1]["findings"].items() if k != "clock_skew"
    }

    table = result["table"]
    for column in ("load s", "rebuild s", "detectors s", "waterfall s", "report s", "RSS MB"):
        assert column in table
    targets = {t["target"]: t["result"] for t in result["targets"]}
    assert targets["same findings in every cohort, at every size"] == "PASS"
    assert targets["hops read == hops written, every round"] == "PASS"
    assert f"4k vs 1k: time x <= {analysis.SCALING_SLACK} x hops x" in targets
    assert (tmp_path / "work" / "out-900-0" / "report.html").stat().st_size > 0
    assert (tmp_path / "work" / "out-900-0" / "waterfall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_synthetic_db_is_what_the_recorder_writes(tmp_path):
    db = synth.write(tmp_path / "s.db", 2000)
    conn = sqlite3.connect(db.path)
    ids, ends = zip(*conn.execute("SELECT id, ended_at FROM hops ORDER BY id"))
    assert list(ids) == list(range(1, db.hops + 1))
    assert list(ends) == sorted(ends), "hop ids follow end times, as the recorder assigns them"
    # Odd cohorts propagate traceparent below the gateway; even ones send no trace header.
    traced = dict(conn.execute("SELECT (id - 1) / ? % 2, count(trace_id) FROM hops GROUP BY 1", (db.hops_per_cohort,)))
    assert traced[0] == 0 and traced[1] > 0
    assert conn.execute(
        "SELECT count(*) FROM hop_tokens WHERE fingerprint NOT IN (SELECT fingerprint FROM tokens)"
    ).fetchone() == (0,)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_cohort_signature_tells_a_cohort_that_found_otherwise():
    per_cohort = 10
    findings = pd.DataFrame({
        "kind": ["slow_hop", "slow_hop", "retry_storm", "clock_skew"],
        "trace": [3, 13, 15, None],
        "service": ["inventory", "inventory", "ledger", "pricing"],
        "hop_ids": [[3, 4], [13, 14], [15], [1, 11]],
    })  # fmt: skip
    signature = analysis.cohort_signature(findings, per_cohort)
    assert signature["differing"] == 1  # cohort 1 has a retry storm that cohort 0 has not
    assert signature["cohort"] == [["slow_hop", [3, 4], 1]]
    assert signature["capture_wide"] == {"clock_skew pricing": 1}

    alike = analysis.cohort_signature(findings.iloc[[0, 1, 3]], per_cohort)
    assert alike["differing"] == 0
    ok, why = analysis.same_findings([{"signatures": [alike]}, {"signatures": [signature]}])
    assert not ok and why.startswith("1 cohort(s) found otherwise")
