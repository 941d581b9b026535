"""``hoptrace analyze``: the analysis as a report, and as a CI gate with ``--fail-on``."""

from __future__ import annotations

from pathlib import Path

import click

from hoptrace._click import BadInput, OneLineCommand, exit_2_on_bad_input
from hoptrace._errors import HoptraceError
from hoptrace._format import Progress, colour_severities, use_colour
from hoptrace._options import one_trace_file, output_option, trace_dbs_argument
from hoptrace.analyzer._types import SEVERITIES  # no pandas: `hoptrace --help` stays fast

FORMATS = ("text", "json", "markdown")


def _detector_kinds() -> tuple[str, ...]:
    # The one list of kinds is the detector tuple's; imported only when needed, so that
    # `hoptrace --help` and the other commands do not load pandas.
    from hoptrace.analyzer._detectors import KINDS

    return KINDS


class _AnalyzeCommand(OneLineCommand):
    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Finding kinds (for --fail-on)"):
            formatter.write_text(", ".join(_detector_kinds()))
        super().format_epilog(ctx, formatter)


def _kinds(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...]:
    """Kinds and severities; a severity stands for itself and every worse one (``warning``: warning or error)."""
    if value is None:
        return ()
    KINDS = _detector_kinds()
    names = tuple(k.strip().lower() for k in value.split(",") if k.strip())
    unknown = [k for k in names if k not in KINDS and k not in SEVERITIES]
    if unknown or not names:
        raise click.BadParameter(
            f"unknown finding kind {unknown[0] if unknown else value!r}; "
            f"severities: {', '.join(SEVERITIES)}; kinds: {', '.join(KINDS)}"
        )
    return names


def _failing(findings, fail_on: tuple[str, ...]):
    """The findings ``--fail-on`` names: by kind, or by severity at least as bad as one named."""
    worst = max((len(SEVERITIES) - SEVERITIES.index(n) for n in fail_on if n in SEVERITIES), default=0)
    bad = {s for i, s in enumerate(SEVERITIES) if len(SEVERITIES) - i >= worst} if worst else set()
    return findings[findings["kind"].isin(fail_on).to_numpy(dtype=bool) | findings["severity"].isin(bad).to_numpy(dtype=bool)]


def _audiences(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for item in value:
        service, sep, aud = item.partition("=")
        if not sep or not service.strip() or not aud.strip():
            raise click.BadParameter(f"{item!r} is not SERVICE=AUD (e.g. payment=https://pay.example.com)")
        out[service.strip()] = (*out.get(service.strip(), ()), aud.strip())
    return out


@click.command("analyze", cls=_AnalyzeCommand)
@trace_dbs_argument()
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="text", show_default=True, help="Report format.")
@click.option(
    "--trace", "trace", metavar="ID", help="Only this request: its id (the root hop id), a trace id, or any hop id in it."
)
@click.option(
    "--since",
    metavar="T",
    help="Only requests that started at or after T: UNIX seconds, ISO-8601 (UTC unless a zone is given), or a time "
    "ago such as 15m, 2h, 30s.",
)
@click.option("--until", metavar="T", help="Only requests that started at or before T (same forms as --since).")
@click.option(
    "--fail-on",
    "fail_on",
    metavar="SEVERITY|KIND[,...]",
    callback=_kinds,
    help="Exit 1 when a finding of one of these kinds, or of this severity or worse (error, warning, info), is found.",
)
@click.option("--near-expiry", "near_expiry_s", type=float, metavar="SECONDS", help="near_expiry threshold (default 30).")
@click.option("--skew-threshold", "skew_threshold_s", type=float, metavar="SECONDS", help="clock_skew threshold (default 2).")
@click.option("--slow-ms", "slow_ms", type=float, metavar="MS", help="slow_hop: also flag any hop slower than this.")
@click.option(
    "--validation-path",
    "validation_patterns",
    multiple=True,
    metavar="REGEX",
    help="A path pattern of token validation calls (repeatable; replaces the defaults verify, validate, introspect, userinfo, tokeninfo).",
)
@click.option(
    "--audience",
    "audiences",
    multiple=True,
    metavar="SERVICE=AUD",
    callback=_audiences,
    help="audience_mismatch: an aud value SERVICE accepts beyond its own name (repeatable).",
)
@click.option("--worst", type=click.IntRange(0, 1000), metavar="N", help="How many requests to draw as trees (default 5).")
@click.option(
    "--save",
    "save",
    is_flag=True,
    help="Also write the analysis into the trace file's own tables (findings, each hop's request, parent and link; "
    "views findings_readable, hops_readable), replacing any saved before, in one transaction; `hoptrace report` and "
    "`hoptrace ui` reuse it while no hop was recorded since. On a capture still being recorded it saves the analysis "
    "of the hops recorded so far, with that bound (readers then analyse afresh). Not with --trace, --since, --until.",
)
@output_option("Write the report here instead of stdout.")
def analyze(
    dbs: tuple[Path, ...],
    fmt: str,
    trace: str | None,
    since: str | None,
    until: str | None,
    fail_on: tuple[str, ...],
    near_expiry_s: float | None,
    skew_threshold_s: float | None,
    slow_ms: float | None,
    validation_patterns: tuple[str, ...],
    audiences: dict[str, tuple[str, ...]],
    worst: int | None,
    save: bool,
    output: Path | None,
) -> None:
    """Analyze a trace file: rebuilt request trees, findings, latency, sessions.

    Several files (or a folder of them) are one analysis: the shards of one
    `hoptrace proxy --workers` capture, or captures of one stack on several hosts
    recorded with one --fingerprint-key.

    Exit status: 0 when done, 1 when a --fail-on kind was found, 2 for bad input
    (a file that is not a trace DB, an unknown --trace, an unreadable time).

    \b
    Example:
        hoptrace analyze traces.db --fail-on error
        hoptrace analyze traces.db --since 15m --format markdown
        hoptrace analyze traces.db --fail-on expired_mid_flow,token_crossover
        hoptrace analyze traces.db --save --audience payment=https://pay.example.com
        hoptrace analyze traces.w1.db traces.w2.db
        hoptrace analyze shards/
    """
    from hoptrace.analyzer import AnalyzerConfig, render_json, render_markdown, render_text
    from hoptrace.analyzer import analyze as run_analysis

    options = {
        "near_expiry_s": near_expiry_s, "skew_threshold_s": skew_threshold_s, "slow_ms": slow_ms,
        "validation_patterns": validation_patterns or None, "audiences": audiences or None, "worst": worst,
    }  # fmt: skip
    if save and (trace is not None or since is not None or until is not None):
        raise BadInput("--save keeps the analysis of the whole file: it cannot be combined with --trace, --since or --until")
    progress = Progress("hoptrace analyze", after_s=2.0)  # a line on a terminal when the analysis ran long
    with exit_2_on_bad_input():
        config = AnalyzerConfig(**{k: v for k, v in options.items() if v is not None})
        # --save writes into the file it read: one file (a joined analysis belongs to no one file).
        target = one_trace_file(dbs, "--save") if save else None
        analysis = run_analysis(dbs, config=config, trace=trace, since=since, until=until)
        if target is not None:
            _save(target, analysis)
    progress(f"analysed {len(analysis.hops)} hops; writing the {fmt} report")
    if len(analysis.hops) == 0 and (since is not None or until is not None):
        click.echo(f"hoptrace analyze: {outside_window(dbs, since, until)}", err=True)
    render = {"text": render_text, "json": render_json, "markdown": render_markdown}[fmt]
    report = render(analysis)
    if output is None:
        click.echo(colour_severities(report) if fmt == "text" and use_colour() else report, nl=False)
    else:
        try:
            output.write_text(report, encoding="utf-8")
        except OSError as exc:
            raise BadInput(f"{output}: cannot write the report: {exc.strerror or exc}") from None
    failing = _failing(analysis.findings, fail_on)
    if len(failing):
        summary = ", ".join(f"{n} {k}" for k, n in failing["kind"].value_counts().sort_index().items())
        click.echo(f"hoptrace analyze: failing on {summary}", err=True)
        raise SystemExit(1)


def _save(db: Path, analysis) -> None:
    from hoptrace.analyzer._saved import save

    written = save(db, analysis)
    still = " (a capture is still open: saved for the hops recorded so far)" if analysis.captures["ended_at"].isna().any() else ""
    click.echo(f"hoptrace analyze: saved {written['findings']} findings and the links of {written['analysis_hops']} hops "
               f"into {db}{still}", err=True)  # fmt: skip


def outside_window(dbs: tuple[Path, ...], since: str | None, until: str | None) -> str:
    """Why a time window holds no hop: how many hops the files have before and after it, and their span."""
    import sqlite3

    from hoptrace._format import utc
    from hoptrace.analyzer._config import parse_time
    from hoptrace.db import open_for_reading

    lo, hi = parse_time(since, "since"), parse_time(until, "until")
    def moment(t: float) -> str:  # a bound past the calendar (--since 1e308) as the number given
        return utc(t) if utc(t) != "?" else f"{t:g} (UNIX seconds)"

    bounds = ([f"at or after {moment(lo)}"] if lo is not None else []) + ([f"at or before {moment(hi)}"] if hi is not None else [])
    window = "no request started " + " and ".join(bounds)
    counts = []
    for db in dbs:
        try:
            conn = open_for_reading(db, check=False)
            try:
                counts.append(conn.execute(
                    "SELECT count(*), min(started_at), max(started_at), sum(started_at < ?), sum(started_at > ?) FROM hops",
                    (-1.7e308 if lo is None else lo, 1.7e308 if hi is None else hi),
                ).fetchone())  # fmt: skip
            finally:
                conn.close()
        except (sqlite3.Error, HoptraceError):
            return window
    n = sum(c[0] for c in counts)
    first = min((c[1] for c in counts if c[1] is not None), default=None)
    last = max((c[2] for c in counts if c[2] is not None), default=None)
    before, after = sum(c[3] or 0 for c in counts), sum(c[4] or 0 for c in counts)
    if not n:
        return f"{window}; the capture has no hops at all"
    return (f"{window}; the capture's {n} hops lie outside it ({before or 0} before, {after or 0} after), "
            f"from {utc(first)} to {utc(last)}")  # fmt: skip
