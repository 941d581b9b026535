"""The UI benchmark's quick form runs end to end through `benchmarks/run.py --only ui` and checks
what it measures: the list holds every request of the DB, each waterfall holds its request's hops,
every request written live is listed and then analysed.

Speed is never asserted here: the benchmark prints its targets beside the figures.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .conftest import PYTHON

ROOT = Path(__file__).resolve().parents[1]

# The benchmark's smoke runs: CI runs them (selected by default); `-m "not bench"` leaves them out.
pytestmark = [pytest.mark.bench, pytest.mark.e2e]


def test_quick_ui_benchmark_lists_opens_and_follows_every_request(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [PYTHON, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", "ui", "--ui-hops", "3000", "--live-s", "2",
         "--json", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())["ui"]
    opened, live = result["open"], result["live"]
    assert opened["listed"] == opened["entries"] > 100 and opened["wrong_waterfalls"] == 0
    assert opened["waterfall_ms"]["n"] >= 20
    assert live["hops"] == 1000 and live["requests"] > 50
    assert live["listed"] == live["analysed"] == live["requests"]
    assert 0 < live["listed_s"]["median"] <= live["analysed_s"]["median"]  # listed before (or with) its analysis
    table = result["table"]
    assert result["meta"]["cores"] and result["meta"]["cpu"] in table  # the machine is named
    for target in ("first page <= 3 s", "any waterfall <= 300 ms", "listed <= 1 s", "findings ~ 1 s"):
        assert target in table
    (checked,) = [line for line in table.splitlines() if line.startswith("listed == entry-route hops; waterfalls whole")]
    assert checked.endswith("PASS")
