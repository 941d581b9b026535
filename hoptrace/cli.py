"""The `hoptrace` command: capture, analyze and plot the traffic between services."""

from __future__ import annotations

from pathlib import Path

import click

from hoptrace import __version__
from hoptrace._click import OneLineGroup, exit_2_on_bad_input
from hoptrace.analyzer._cli import analyze
from hoptrace.plot._cli import plot, report
from hoptrace.proxy._cli import addon_path, proxy
from hoptrace.stack._cli import stack


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hoptrace")
def cli() -> None:
    """Find what breaks between microservices, from the traffic between them.

    Record a stack with `hoptrace proxy`, then `hoptrace analyze` the trace file,
    `hoptrace plot` a request, or `hoptrace report` it all into one HTML file.
    `hoptrace demo` shows the whole job on the bundled sample stack.
    """


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("out/demo"), show_default=True, help="Folder for the trace, the report and the charts.")
@click.option("--users", type=click.IntRange(2, 50), default=6, show_default=True, help="Concurrent users; one of them checks out as its token is about to expire.")
def demo(out: Path, users: int) -> None:
    """Run the bundled stack behind the proxy, drive the checkout flow, analyze and plot it.

    Five aiohttp services (gateway, auth, products, cart, payment) reproduce the
    scenario of a checkout that answers 401 although the token "validates":
    the trace, report.html and the charts land in one folder.

    Example:

        hoptrace demo --out out/demo --users 6
    """
    from hoptrace.demo import run_demo

    with exit_2_on_bad_input():
        written = run_demo(out, users, click.echo)
    click.echo("[demo] files:")
    for path in written:
        click.echo(f"  {path}")
    click.echo(f"Next: open {out / 'report.html'}, or try `hoptrace analyze {out / 'traces.db'} --format markdown`.")


@cli.command("record-samples")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("sample_traces"), show_default=True, help="Folder for the trace files and their golden analyses.")
@click.option("--goldens-only", is_flag=True, help="Keep the recorded traces; only re-analyze them into the golden files.")
def record_samples(out: Path, goldens_only: bool) -> None:
    """Re-record every scenario of the sample stack, each with its golden `analyze --format json`.

    Example:

        hoptrace record-samples --out sample_traces
    """
    from hoptrace.demo import record_samples as record_all

    with exit_2_on_bad_input():
        for path in record_all(out, click.echo, goldens_only=goldens_only):
            click.echo(f"  wrote {path}")


for command in (proxy, addon_path, analyze, plot, report, stack):
    cli.add_command(command)
