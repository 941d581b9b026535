"""`hoptrace plot` and `hoptrace report`: the click commands (registered in hoptrace.cli).

Importing this module is cheap: matplotlib, pandas and the analyzer load inside the commands.
"""

from __future__ import annotations

from pathlib import Path

import click

from hoptrace._click import BadInput, OneLineCommand, exit_2_on_bad_input
from hoptrace._errors import HoptraceError

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


def _no_hops(db: Path) -> BadInput:
    return BadInput(
        f"{db}: no hops recorded in this trace database; nothing to draw "
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


def _analyze(db: Path):
    if _has_hops(db) is False:  # say so before the analysis has to cope with empty tables
        raise _no_hops(db)
    from hoptrace.analyzer import analyze  # loads pandas: only once a command runs

    analysis = analyze(db)
    hops = getattr(analysis, "hops", None)
    if hops is None or len(hops) == 0:
        raise _no_hops(db)
    return analysis


@click.command("plot", cls=OneLineCommand)
@click.argument("db", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--trace",
    "trace",
    metavar="ID",
    help="Draw this request's waterfall: its id from `hoptrace analyze`, a traceparent/b3/x-request-id "
    "trace id, or any hop id in it. Default: the request of the first error finding.",
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
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="File to write; .png or .svg picks the format."
)
@click.option("--dpi", default=100, show_default=True, type=click.IntRange(50, 600), help="Resolution of a PNG.")
def plot(db: Path, trace: str | None, session: str | None, latency: bool, services: bool, output: Path, dpi: int) -> None:
    """Draw a chart of a trace database as PNG or SVG.

    Without a chart option, draws one request's waterfall: each hop as a bar from
    start to end, indented under its caller, coloured by outcome, with the token's
    expiry as a red line. --session draws a workflow with its tokens' lifetimes,
    --latency per-service latency, --services the call graph.

    Example:

        hoptrace plot traces.db --trace 8 -o checkout.png

        hoptrace plot traces.db --session alice -o alice.svg
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
        analysis = _analyze(db)
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


@click.command("report", cls=OneLineCommand)
@click.argument("db", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="HTML file to write (.html); self-contained, viewable offline.",
)
@click.option(
    "--max-waterfalls",
    default=20,
    show_default=True,
    type=click.IntRange(0, 1000),
    help="Waterfalls of failed requests to include at most.",
)
@click.option(
    "--max-sessions",
    default=10,
    show_default=True,
    type=click.IntRange(0, 1000),
    help="Workflow views of affected sessions to include at most.",
)
@click.option("--title", default=None, help="Title of the report (default: from the DB's name).")
def report(db: Path, output: Path, max_waterfalls: int, max_sessions: int, title: str | None) -> None:
    """Write one self-contained HTML report of a trace database.

    Summary, the findings table, a waterfall for each request with an error
    finding, the workflow view of each affected session, latency per service and
    the service call graph; charts are embedded, nothing is fetched when opened.

    Example:

        hoptrace report traces.db -o report.html
    """
    _check_output(output, REPORT_FORMATS)
    with exit_2_on_bad_input():
        analysis = _analyze(db)
        from hoptrace.plot import write_report

        write_report(analysis, output, source=db.name, title=title, max_waterfalls=max_waterfalls, max_sessions=max_sessions)
    findings = getattr(analysis, "findings", None)
    n = 0 if findings is None else len(findings)
    click.echo(f"wrote {output} ({n} finding{'s' * (n != 1)})")
