"""Hostile trace files through every command that reads one: never a traceback, a bounded time,
exit 0, 1 or 2, and a one-line error with 2.

MUTANTS mutated copies of a real trace (tests/hostile_files.py; 10 of each of the five
classes) go through `analyze` and one of the two charts, `plot --session` and `plot --trace`
in turn (2 is coprime to the 5 classes: each class meets both), in-process (click's
CliRunner, in worker processes, each call under an alarm), and every REPORT_EVERY-th of them
(all five mutation classes) through `report` too: a report costs as much CPU as the three
others together and draws the same charts from the same loader. HOPTRACE_HOSTILE_FILES=N
runs N mutants (20 or more, so that every class reaches the report; 100 took 200 s of the
suite's 570, a third of a 2-core run's critical path for one test), and
HOPTRACE_HOSTILE_REPORTS=all runs the report on each. A handful go through `hoptrace` as real
processes; a property-based test throws absurd claim and time values at the analysis and both charts.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from multiprocessing import get_context
from pathlib import Path

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hoptrace.cli import cli

from .hostile_files import mutants

SAMPLE = Path(__file__).parent.parent / "sample_traces" / "checkout-expiry.db"
SUBJECT = "user_caceadb2ce29"  # a subject of the sample's expired checkout
CALL_TIMEOUT_S = 60  # per call; a healthy one takes about a second
MUTANTS = int(os.environ.get("HOPTRACE_HOSTILE_FILES", "50"))
REPORT_EVERY = 1 if os.environ.get("HOPTRACE_HOSTILE_REPORTS") == "all" else 4  # coprime to the 5 classes


def commands(db: Path) -> dict[str, list[str]]:
    return {
        "analyze": ["analyze", str(db)],
        "plot --session": ["plot", str(db), "--session", SUBJECT, "--dpi", "50", "-o", f"{db}.session.png"],
        "plot --trace": ["plot", str(db), "--trace", "76", "--dpi", "50", "-o", f"{db}.trace.png"],
        "report": ["report", str(db), "--max-waterfalls", "2", "--max-sessions", "2", "-o", f"{db}.html"],
        "export --har": ["export", str(db), "--har", f"{db}.har"],
        "export --otlp": ["export", str(db), "--otlp", f"{db}.otlp.jsonl"],
        "export --parquet": ["export", str(db), "--parquet", f"{db}.parquet"],
    }


EXPORTS = ("export --har", "export --otlp", "export --parquet")


class _Alarm(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Alarm()


def run_file(db: Path, skip: tuple[str, ...] = ()) -> list[tuple[str, int, str, str, float]]:
    """The commands on ``db`` but ``skip`` in this process: (command, exit code, stderr, what went wrong, seconds)."""
    signal.signal(signal.SIGALRM, _on_alarm)
    out = []
    for name, args in commands(db).items():
        if name in skip:
            continue
        started = time.monotonic()
        signal.alarm(CALL_TIMEOUT_S)
        try:
            result = CliRunner().invoke(cli, args)
        except _Alarm:
            out.append((name, -1, "", f"still running after {CALL_TIMEOUT_S} s", CALL_TIMEOUT_S))
            continue
        finally:
            signal.alarm(0)
        wrong = ""
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            wrong = f"raised {type(result.exception).__name__}: {result.exception}"
        out.append((name, result.exit_code, result.stderr, wrong, time.monotonic() - started))
    return out


def _skipped(i: int) -> tuple[str, ...]:
    """What the i-th mutant leaves out: one chart of the two, two exports of the three, and the report but
    every REPORT_EVERY-th (2, 3 and 4 are coprime to the 5 classes: every class meets every command)."""
    chart = ("plot --trace", "plot --session")[i % 2]
    exports = tuple(e for e in EXPORTS if e != EXPORTS[i % len(EXPORTS)])
    return (chart, *exports) if i % REPORT_EVERY == 0 else (chart, *exports, "report")


def check(db: Path, name: str, code: int, stderr: str, wrong: str) -> None:
    where = f"{db.name}: {name}"
    assert not wrong, f"{where} {wrong}"
    assert "Traceback" not in stderr, f"{where}:\n{stderr}"
    assert code in (0, 1, 2), f"{where} exited {code}: {stderr}"
    if code == 2:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), f"{where}: not one line:\n{stderr}"


def test_mutated_trace_files_never_give_a_traceback(tmp_path):
    files = mutants(SAMPLE, tmp_path, MUTANTS)
    # Worker processes forked from this one (everything imported), one per core.
    with ProcessPoolExecutor(len(os.sched_getaffinity(0)), mp_context=get_context("fork")) as pool:
        results = list(pool.map(run_file, [path for path, _ in files], map(_skipped, range(len(files)))))
    seen_codes, failed_by_kind, ran = set(), {}, set()
    for (path, kind), calls in zip(files, results):
        for name, code, stderr, wrong, _ in calls:
            check(path, name, code, stderr, wrong)
            seen_codes.add(code)
            failed_by_kind.setdefault(kind, set()).add(code)
            ran.add((kind, name))
    assert ran == {(kind, name) for kind in failed_by_kind for name in commands(Path("x"))}  # every class through every command
    # The mutations did bite: some files are refused (exit 2) and some still analyzed.
    assert {0, 2} <= seen_codes
    assert 2 in failed_by_kind["flip_bytes"] and 0 in failed_by_kind["invalid_utf8"]


def test_hostile_files_through_the_installed_command(tmp_path):
    """A few mutants through `hoptrace` as a real process: what a user's terminal shows."""
    files = {kind: path for path, kind in reversed(mutants(SAMPLE, tmp_path, 10))}
    hoptrace = [sys.executable, "-m", "hoptrace"]
    for (kind, db), name in zip(files.items(), commands(Path("x")), strict=False):
        args = commands(db)[name]
        done = subprocess.run([*hoptrace, *args], capture_output=True, text=True, timeout=CALL_TIMEOUT_S, check=False)
        check(db, f"{name} ({kind})", done.returncode, done.stderr, "")


def test_the_sample_with_a_hostile_claim_still_draws(tmp_path):
    """The claims that made the session chart and the report die in the font rasteriser."""
    db = tmp_path / "claims.db"
    shutil.copyfile(SAMPLE, db)
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE tokens SET iat = 2e10 WHERE rowid = 1")
        conn.execute("UPDATE tokens SET exp = 1e-7 WHERE rowid = 2")
        # Within 2000-2100 but decades after the capture: drawn clipped, not at x = 1.9e9 s.
        conn.execute("UPDATE tokens SET iat = 3.7e9, exp = 3.8e9 WHERE sub = ?", (SUBJECT,))
    for name, code, stderr, wrong, _ in run_file(db):
        check(db, name, code, stderr, wrong)
        assert code == 0, f"{name}: {stderr}"
    report = CliRunner().invoke(cli, ["analyze", str(db)]).stdout
    assert "token times (iat, nbf, exp, first seen) outside 2000-2100 were read as unknown" in report


finite_or_not = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([2e10, 1e-7, -1.0, 0.0, 1_795_282_208.0 + 3.15e9, 946_684_800.0, 4_102_444_800.0]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(iat=finite_or_not, exp=finite_or_not, nbf=finite_or_not, shift=finite_or_not)
def test_absurd_claims_and_times_analyze_and_draw(tmp_path, iat, exp, nbf, shift):
    from hoptrace import plot as hp
    from hoptrace.analyzer import analyze, render_json, render_text

    db = tmp_path / "absurd.db"
    shutil.copyfile(SAMPLE, db)
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE tokens SET iat = ?, exp = ?, nbf = ? WHERE sub = ?", (iat, exp, nbf, SUBJECT))
        conn.execute("UPDATE hops SET ended_at = started_at + ? WHERE id = 76", (0.0 if math.isnan(shift) else shift,))
    analysis = analyze(db)
    render_text(analysis), render_json(analysis)
    for figure in (hp.session_view(analysis, SUBJECT), hp.waterfall(analysis, int(analysis.hops["trace"].iloc[-1]))):
        hp.save_figure(figure, tmp_path / "chart.png", dpi=40)
