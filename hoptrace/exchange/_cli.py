"""``hoptrace import`` and ``hoptrace export``."""

from __future__ import annotations

import os
from pathlib import Path

import click

from hoptrace import __version__
from hoptrace._click import BadInput, OneLineCommand, PathArg, exit_2_on_bad_input
from hoptrace._options import trace_dbs_argument


@click.command("import", cls=OneLineCommand)
@click.argument("files", nargs=-1, required=True, type=PathArg(dir_okay=False))
@click.option("--db", type=PathArg(dir_okay=False), required=True, help="Trace file to import into (created if missing).")
@click.option("--service", "service_specs", multiple=True, metavar="HOST:PORT=NAME", help="Name the service at this address (a reverse proxy's upstream, or what a browser called). Repeatable.")
@click.option("--stack", "stack_file", type=PathArg(dir_okay=False), help="The proxy's stack TOML: names services by upstream and listen port, and gives the entry.")
@click.option("--entry", help="The service where client requests enter (default: the stack's, else the service of the earliest hop).")
@click.option("--fingerprint-key", envvar="HOPTRACE_FINGERPRINT_KEY", help="Hex key for token fingerprints, to compare tokens with other captures (default: random).")
def import_(files: tuple[Path, ...], db: Path, service_specs: tuple[str, ...], stack_file: Path | None, entry: str | None, fingerprint_key: str | None) -> None:
    """Import HAR files and mitmproxy flow files (`mitmdump -w`) into a trace file.

    Each file becomes one capture, written in one transaction: a file that cannot be
    read leaves nothing behind. Hops go through the live recorder's row builder, so
    tokens are decoded and fingerprinted and secrets redacted exactly as `hoptrace proxy`
    does. A file already imported into DB (same sha256) is skipped.

    Example:

    \b
        hoptrace import capture.har --db traces.db --service 127.0.0.1:3001=auth --entry gateway
        hoptrace import flows.mitm --db traces.db --stack stack.toml
    """
    from hoptrace.exchange._import import ServiceNames, fingerprint_key as key_of, import_file
    from hoptrace.proxy.routes import load_stack_file

    with exit_2_on_bad_input():
        routes = []
        if stack_file:
            stack = load_stack_file(stack_file)
            routes, entry = stack.routes, entry or stack.entry
        names = ServiceNames.build(service_specs, routes)
        key = key_of(fingerprint_key)
        for path in files:
            result = import_file(path, db, names, entry, key, progress=lambda text: click.echo(text, nl=False, err=True))
            if result.already:
                click.echo(f"{path}: already imported into {db} as capture {result.capture_id}; skipped")
                continue
            for note in result.notes:
                click.echo(note, err=True)
            skipped = f", {result.skipped} non-HTTP entries skipped" if result.skipped else ""
            skipped += f", {len(result.notes)} noted above" if result.notes else ""
            click.echo(
                f"{path}: {result.hops} hops imported into {db} as capture {result.capture_id}"
                f" ({result.kind}, {result.addon_errors} addon errors{skipped})"
            )


@click.command("export", cls=OneLineCommand)
@trace_dbs_argument()
@click.option("--har", "har_out", type=PathArg(dir_okay=False), help="Write a HAR 1.2 file (opens in Chrome DevTools, HTTP Toolkit).")
@click.option("--otlp", "otlp_out", type=PathArg(dir_okay=False), help="Write OTLP/JSON lines (one ExportTraceServiceRequest per request) for an OpenTelemetry Collector, Jaeger or Tempo.")
@click.option("--parquet", "parquet_out", type=PathArg(file_okay=False), help="Write a folder of Parquet files: hops, tokens, hop_tokens, traces, findings.")
@click.option("--trace", help="Only this request (its id, a trace id, or any hop id in it).")
@click.option("--since", help="Only requests that started at or after this time (UNIX seconds or ISO 8601).")
@click.option("--until", help="Only requests that started at or before this time.")
@click.option("--finding", "finding_kind", metavar="KIND", help="Only requests with a finding of this kind (e.g. expired_mid_flow).")
def export(dbs: tuple[Path, ...], har_out: Path | None, otlp_out: Path | None, parquet_out: Path | None, trace: str | None, since: str | None, until: str | None, finding_kind: str | None) -> None:
    """Export a trace file, with hoptrace's analysis, as HAR, OTLP/JSON or Parquet.

    What leaves is what the trace file holds: redacted values stay `[redacted:...]`,
    tokens are fingerprints and decoded claims, never raw. The analysis travels along:
    HAR entries carry `_hoptrace` (request, parent hop, link, findings), OTLP spans
    carry the rebuilt parents and findings as events. Several files (or a folder
    of shards) export as one analysis: one HAR, OTLP file or Parquet folder.

    Example:

    \b
        hoptrace export traces.db --har checkout.har --finding expired_mid_flow
        hoptrace export traces.db --otlp traces.jsonl
        hoptrace export traces.db --parquet out/parquet
        hoptrace export traces.w1.db traces.w2.db --otlp traces.jsonl
    """
    from hoptrace.exchange._har import write_har
    from hoptrace.exchange._otlp import SpanIds, write_otlp
    from hoptrace.exchange._parquet import write_parquet
    from hoptrace.exchange._select import select

    if not (har_out or otlp_out or parquet_out):
        raise BadInput("give at least one of --har FILE, --otlp FILE, --parquet DIR")
    with exit_2_on_bad_input():
        selection = select(dbs, trace=trace, since=since, until=until, finding=finding_kind)
        if har_out:
            entry = next(iter(selection.analysis.captures["entry"].dropna()), None)
            count = _atomic_write(har_out, lambda out: write_har(selection.hops(), out, version=__version__, entry=entry))
            click.echo(f"{har_out}: {count} entries")
        if otlp_out:
            tokens, ids = selection.tokens(), SpanIds.of_captures(selection.analysis.captures)
            lines, spans = _atomic_write(otlp_out, lambda out: write_otlp(selection.hops(), tokens, out, ids))
            click.echo(f"{otlp_out}: {spans} spans in {lines} requests")
        if parquet_out:
            counts = write_parquet(selection, parquet_out)
            click.echo(f"{parquet_out}: " + ", ".join(f"{name} {rows} rows" for name, rows in counts.items()))


def _atomic_write(path: Path, write):
    """Write ``path`` so that a failed export never leaves half a file, and never replace what is not a file.

    A symlink is followed: the new file is renamed over its target, so the link stays a link.
    A path that exists but is not a regular file (a fifo, ``/dev/stdout``) is written in place:
    a rename would put a regular file where the fifo or device node was.
    """
    target = Path(os.path.realpath(path))
    try:
        if target.exists() and not target.is_file():
            with target.open("wb") as out:
                return write(out)
    except OSError as exc:
        raise BadInput(f"{path}: cannot write ({exc.strerror or exc})") from None
    partial = target.with_name(f".{target.name}.partial")
    try:
        with partial.open("wb") as out:
            result = write(out)
        os.replace(partial, target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise BadInput(f"{path}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return result
