"""``hoptrace analyze``: the analysis as a report, and as a CI gate with ``--fail-on``."""

from __future__ import annotations

from pathlib import Path

import click

from hoptrace._click import BadInput, OneLineCommand, exit_2_on_bad_input
from hoptrace._options import output_option, trace_db_argument

# The kinds are listed here rather than imported, so that `hoptrace --help` does not
# load pandas; a test keeps this tuple equal to DETECTORS.
KINDS = (
    "expired_mid_flow", "expired_in_session", "rejected_valid_token", "token_crossover", "upstream_error",
    "service_key_missing", "service_key_leak", "refresh_race", "audience_mismatch", "unknown_signing_key", "near_expiry",
    "duplicate_validation", "clock_skew", "token_reuse", "retry_storm", "retry_without_backoff", "rate_limited", "slow_hop",
)  # fmt: skip
FORMATS = ("text", "json", "markdown")


def _kinds(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    kinds = tuple(k.strip() for k in value.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise click.BadParameter(f"unknown finding kind {unknown[0] if unknown else value!r}; kinds: {', '.join(KINDS)}")
    return kinds


def _audiences(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for item in value:
        service, sep, aud = item.partition("=")
        if not sep or not service.strip() or not aud.strip():
            raise click.BadParameter(f"{item!r} is not SERVICE=AUD (e.g. payment=https://pay.example.com)")
        out[service.strip()] = (*out.get(service.strip(), ()), aud.strip())
    return out


@click.command("analyze", cls=OneLineCommand)
@trace_db_argument(must_exist=False)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="text", show_default=True, help="Report format.")
@click.option(
    "--trace", "trace", metavar="ID", help="Only this request: its id (the root hop id), a trace id, or any hop id in it."
)
@click.option(
    "--since",
    metavar="T",
    help="Only requests that started at or after T (UNIX seconds or ISO-8601; UTC unless a zone is given).",
)
@click.option("--until", metavar="T", help="Only requests that started at or before T.")
@click.option(
    "--fail-on",
    "fail_on",
    metavar="KIND[,KIND...]",
    callback=_kinds,
    help="Exit 1 when a finding of one of these kinds is found.",
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
@output_option("Write the report here instead of stdout.")
def analyze(
    db: Path,
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
    output: Path | None,
) -> None:
    """Analyze a trace file: rebuilt request trees, findings, latency, sessions.

    Exit status: 0 when done, 1 when a --fail-on kind was found, 2 for bad input
    (a file that is not a trace DB, an unknown --trace, an unreadable time).

    Finding kinds: expired_mid_flow, expired_in_session, rejected_valid_token,
    token_crossover, upstream_error, service_key_missing, service_key_leak,
    refresh_race, audience_mismatch, near_expiry, duplicate_validation, clock_skew,
    token_reuse, retry_storm, retry_without_backoff, rate_limited, slow_hop.

    \b
    Example:
        hoptrace analyze traces.db --format markdown --fail-on expired_mid_flow,token_crossover
    """
    from hoptrace.analyzer import AnalyzerConfig, render_json, render_markdown, render_text
    from hoptrace.analyzer import analyze as run_analysis

    options = {
        "near_expiry_s": near_expiry_s, "skew_threshold_s": skew_threshold_s, "slow_ms": slow_ms,
        "validation_patterns": validation_patterns or None, "audiences": audiences or None, "worst": worst,
    }  # fmt: skip
    with exit_2_on_bad_input():
        config = AnalyzerConfig(**{k: v for k, v in options.items() if v is not None})
        analysis = run_analysis(db, config=config, trace=trace, since=since, until=until)
    render = {"text": render_text, "json": render_json, "markdown": render_markdown}[fmt]
    report = render(analysis)
    if output is None:
        click.echo(report, nl=False)
    else:
        try:
            output.write_text(report, encoding="utf-8")
        except OSError as exc:
            raise BadInput(f"{output}: cannot write the report: {exc.strerror or exc}") from None
    found = sorted(set(analysis.findings["kind"]) & set(fail_on))
    if found:
        counts = analysis.findings["kind"].value_counts()
        summary = ", ".join(f"{counts[k]} {k}" for k in found)
        click.echo(f"hoptrace analyze: failing on {summary}", err=True)
        raise SystemExit(1)
