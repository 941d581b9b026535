"""`hoptrace demo` and `hoptrace record-samples`: the whole job on the bundled sample stack.

The demo records the seed's checkout scenario through a real `hoptrace proxy`,
analyzes the trace, and writes the trace file, an HTML report and the charts into
one folder. `record-samples` re-records every scenario into `sample_traces/`,
each with its `hoptrace analyze --format json` output as a golden file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

from hoptrace._errors import HoptraceError
from hoptrace.stack.scenarios import SCENARIOS, Recording, Scenario, record

Echo = Callable[[str], None]


def run_demo(out: Path, users: int, echo: Echo) -> list[Path]:
    """Record, analyze, plot; returns the files written."""
    from hoptrace import plot
    from hoptrace.analyzer import analyze, render_text

    out.mkdir(parents=True, exist_ok=True)
    db = out / "traces.db"
    scenario = dataclasses.replace(SCENARIOS["checkout-expiry"], users=users)
    recording = _record(scenario, db, echo)
    checkouts = [flow.statuses.get("checkout") for flow in recording.flows]
    echo(f"[demo] {len(recording.flows)} users ran register → login → browse → cart → checkout: "
         f"checkout answered 200 to {checkouts.count(200)}, 401 to {checkouts.count(401)}")  # fmt: skip

    echo("[demo] analyzing the trace")
    analysis = analyze(db)
    echo("")
    echo(render_text(analysis))

    echo("[demo] drawing the charts and the report")
    written = [db]
    expired = analysis.findings[analysis.findings["kind"] == "expired_mid_flow"]
    if not expired.empty:
        trace = int(expired["trace"].iloc[0])
        written.append(plot.save_figure(plot.waterfall(analysis, trace), out / "checkout-waterfall.png"))
        subject = analysis.sessions.loc[analysis.sessions["trace"] == trace, "subject"].iloc[0]
        written.append(plot.save_figure(plot.session_view(analysis, subject), out / "session.png"))
    written.append(plot.save_figure(plot.latency(analysis), out / "latency.png"))
    written.append(plot.save_figure(plot.service_graph(analysis), out / "services.png"))
    written.append(plot.write_report(analysis, out / "report.html"))
    return written


def closing_hint(out: Path) -> str:
    """The demo's last line: what to open, and how to reach `hoptrace` from this shell.

    dev.py installs the CLI into the checkout's ``.venv/bin``, which is not on PATH unless
    that virtualenv is activated; the hint names the command as this shell can run it.
    """
    command = "hoptrace"
    if shutil.which("hoptrace") is None:
        script = Path(sys.executable).parent / "hoptrace"
        try:
            command = str(script.relative_to(Path.cwd()))
        except ValueError:
            command = str(script)
    return (
        f"Next: open {out / 'report.html'} in a browser, or run `{command} analyze {out / 'traces.db'} --format markdown`"
        f" (`{command}` is the CLI dev.py installed; `python3 dev.py hoptrace ...` runs it too)."
    )


def record_samples(out: Path, echo: Echo, *, goldens_only: bool = False) -> list[Path]:
    """Re-record every scenario into ``out/<name>.db`` with its golden ``out/<name>.json``.

    ``goldens_only`` keeps the recorded traces (recording only scenarios without one) and
    re-analyzes them: what an analyzer change that is meant to change the output needs.
    """
    from hoptrace.analyzer import analyze, render_json

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for scenario in SCENARIOS.values():
        db = out / f"{scenario.name}.db"
        if not goldens_only or not db.exists():  # a new scenario is recorded all the same
            _record(scenario, db, echo)
            # A shipped trace must open read-only from a read-only folder: out of WAL
            # mode, a reader needs no -shm file beside it.
            with contextlib.closing(sqlite3.connect(db)) as conn:
                conn.execute("PRAGMA journal_mode = DELETE")
        golden = out / f"{scenario.name}.json"
        golden.write_text(render_json(analyze(db)) + "\n", encoding="utf-8")
        written += [db, golden]
    return written


def _record(scenario: Scenario, db: Path, echo: Echo) -> Recording:
    # A trace file holds any number of captures; a demo or a sample starts from none.
    for stale in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        stale.unlink(missing_ok=True)
    echo(f"[{scenario.name}] {scenario.summary}")
    recording = asyncio.run(record(db, scenario.stack_config(), scenario.drive, progress=lambda m: echo(f"[{scenario.name}] {m}")))
    if recording.proxy_exit != 0:
        raise HoptraceError(f"hoptrace proxy exited with {recording.proxy_exit}: {recording.proxy_output.strip()[-500:]}")
    return recording
