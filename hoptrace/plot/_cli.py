"""`hoptrace plot` and `hoptrace report`: the click commands (registered in hoptrace.cli).

Importing this module is cheap: matplotlib, pandas and the analyzer load inside the commands.
"""

from __future__ import annotations

from pathlib import Path

import click

from hoptrace._click import BadInput, OneLineCommand, exit_2_on_bad_input
from hoptrace._errors import HoptraceError
from hoptrace._options import output_option, trace_dbs_argument

PLOT_FORMATS = (".png", ".svg")
REPORT_FORMATS = (".html", ".htm")


def _check_output(path: Path, allowed: tuple[str, ...]) -> None:
    suffix = path.suffix.lower()
    if suffix not in allowed:
        got = f"{suffix!r}" if suffix else "no extension"
        raise BadInput(f"{path}: cannot tell the output format from {got}; name the file with {' or '.join(allowed)}")
    if not path.parent.exists():
        raise BadInput(f"{path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise BadInput(f"{path}: is a directory")


def _no_hops(dbs: tuple[Path, ...]) -> BadInput:
    return BadInput(
        f"{', '.join(map(str, dbs))}: no hops recorded in {'these trace files' if len(dbs) > 1 else 'this trace database'}; nothing to draw "
        "(was the proxy in front of the services while they were called?)"
    )


def _has_hops(db: Path) -> bool | None:
    """Whether the DB has any hop (None: cannot tell here; the analyzer will say why)."""
    import sqlite3

    from hoptrace.db import open_for_reading

    try:
        conn = open_for_reading(db, check=False)  # the analyzer checks the file's structure
        try:
            return bool(conn.execute("SELECT EXISTS (SELECT 1 FROM hops)").fetchone()[0])
        finally:
            conn.close()
    except (sqlite3.Error, UnicodeDecodeError, HoptraceError):  # SQLite's message about a damaged file may not be UTF-8
        return None


def _analyze(dbs: tuple[Path, ...]):
    if all(_has_hops(db) is False for db in dbs):  # say so before the analysis has to cope with empty tables
        raise _no_hops(dbs)
    from hoptrace.analyzer import analysis_for  # loads pandas: only once a command runs

    analysis = analysis_for(dbs)  # the analysis saved in the file when it is current
    if len(analysis.hops) == 0:
        raise _no_hops(dbs)
    return analysis


@click.command("plot", cls=OneLineCommand)
@trace_dbs_argument()
@click.option(
    "--trace",
    "trace",
    metavar="ID",
    help="Draw this request's waterfall: its id from `hoptrace analyze`, a traceparent/b3/x-request-id "
    "trace id (any letter case), or any hop id in it. Default: the worst request (error findings first, then "
    "failed requests, then warnings, slowest first).",
)
@click.option(
    "--session",
    "session",
    metavar="SUB|TOKEN",
    help="Draw a workflow over wall time: a subject (the tokens' sub), a token fingerprint (or a "
    "prefix of 6+ characters) or a session number.",
)
@click.option("--latency", "latency", is_flag=True, help="Draw per-service latency (p50/p95/p99) and error rates.")
@click.option("--services", "services", is_flag=True, help="Draw the call graph between services.")
@output_option("File to write; .png or .svg picks the format.", required=True)
@click.option("--dpi", default=100, show_default=True, type=click.IntRange(50, 600), help="Resolution of a PNG.")
def plot(dbs: tuple[Path, ...], trace: str | None, session: str | None, latency: bool, services: bool, output: Path, dpi: int) -> None:
    """Draw a chart of a trace database as PNG or SVG.

    Without a chart option, draws one request's waterfall: each hop as a bar from
    start to end, indented under its caller, coloured by outcome, with the token's
    expiry as a red line. --session draws a workflow with its tokens' lifetimes,
    --latency per-service latency, --services the call graph.

    \b
    Example:
        hoptrace plot traces.db --trace 8 -o checkout.png
        hoptrace plot traces.db --session alice -o alice.svg
        hoptrace plot traces.w1.db traces.w2.db --latency -o latency.svg
    """
    chosen = [
        name
        for name, on in (
            ("--trace", trace is not None),
            ("--session", session is not None),
            ("--latency", latency),
            ("--services", services),
        )
        if on
    ]
    if len(chosen) > 1:
        raise BadInput(f"choose one chart: {' and '.join(chosen)} cannot be combined")
    _check_output(output, PLOT_FORMATS)
    with exit_2_on_bad_input():
        analysis = _analyze(dbs)
        from hoptrace import plot as hp

        if session is not None:
            fig = hp.session_view(analysis, session)
            n = len(hp.select_session(analysis, session))
            what = f"workflow of {session}, {n} request{'s' * (n != 1)}"
        elif latency:
            fig = hp.latency(analysis)
            what = "latency per service"
        elif services:
            fig = hp.service_graph(analysis)
            what = "service call graph"
        else:
            if trace is None:
                picked, why = hp.pick_worst_trace(analysis)
                click.echo(f"no --trace given: drawing request {picked}, {why}", err=True)
            else:
                picked = hp.resolve_trace(analysis, trace)
            fig = hp.waterfall(analysis, picked)
            n = int((analysis.hops["trace"] == picked).sum())
            what = f"waterfall of request {picked}, {n} hop{'s' * (n != 1)}"
        hp.save_figure(fig, output, dpi=dpi)
    click.echo(f"wrote {output} ({what})")


def _at_most(name: str, default: int, what: str):
    return click.option(name, default=default, show_default=True, type=click.IntRange(0, 1000), help=what)


@click.command("report", cls=OneLineCommand)
@trace_dbs_argument()
@output_option("HTML file to write (.html); self-contained, viewable offline.", required=True)
@_at_most("--max-waterfalls", 20, "Waterfalls of failed requests to include at most.")
@_at_most("--max-sessions", 3, "Workflow views of affected sessions to include at most.")
@click.option("--title", default=None, help="Title of the report (default: from the DB's name).")
def report(dbs: tuple[Path, ...], output: Path, max_waterfalls: int, max_sessions: int, title: str | None) -> None:
    """Write one self-contained HTML report of a trace database.

    It opens with the answer: each error finding told in one sentence with its
    request's waterfall (with only warnings, the clearest example of each kind);
    then the findings grouped by kind, each request's hops with their redacted
    headers, token claims and timings, the affected workflows, latency per service
    and the service graph. Charts are inline SVG; nothing is fetched when opened.

    \b
    Example:
        hoptrace report traces.db -o report.html
        hoptrace report shards/ -o report.html
    """
    from hoptrace._format import Progress

    _check_output(output, REPORT_FORMATS)
    progress = Progress("hoptrace report")
    with exit_2_on_bad_input():
        progress("analysing")
        analysis = _analyze(dbs)
        from hoptrace.plot import write_report

        write_report(analysis, output, source=", ".join(db.name for db in dbs), title=title, max_waterfalls=max_waterfalls, max_sessions=max_sessions,
                     progress=progress)  # fmt: skip
    n = len(analysis.findings)
    click.echo(f"wrote {output} ({n} finding{'s' * (n != 1)})")
