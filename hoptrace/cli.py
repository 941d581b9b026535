"""The `hoptrace` command: capture, analyze and plot the traffic between services."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from hoptrace import __version__
from hoptrace._click import BadInput, OneLineGroup, exit_2_on_bad_input
from hoptrace._coverage_cli import coverage
from hoptrace.analyzer._cli import analyze
from hoptrace.exchange._cli import export, import_
from hoptrace.plot._cli import plot, report
from hoptrace.stack._cli import demo, record_samples, stack
from hoptrace.ui._cli import ui


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hoptrace")
def cli() -> None:
    """Find what breaks between microservices, from the traffic between them.

    Record a stack with `hoptrace proxy`, then `hoptrace analyze` the trace file,
    `hoptrace plot` a request, or `hoptrace report` it all into one HTML file.
    `hoptrace demo` shows the whole job on the bundled sample stack.
    """


@cli.command()
@click.option("--route", "route_specs", multiple=True, metavar="NAME=UPSTREAM_URL@LISTEN_PORT", help="A service and the port to listen on for it. Repeat for each service.")
@click.option("--stack", "stack_file", type=click.Path(dir_okay=False, path_type=Path), help="A TOML file of [routes.NAME] tables (upstream, listen), instead of --route.")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Trace file to record into (default: traces.db, or the stack file's db).")
@click.option("--entry", help="The route where client requests enter (default: the first).")
@click.option("--listen-host", default="127.0.0.1", show_default=True, help="Address the listeners bind to.")
@click.option("--store-bodies", is_flag=True, help="Also store bodies (up to 64 KiB, redacted). Off by default: bodies leak.")
def proxy(route_specs: tuple[str, ...], stack_file: Path | None, db: Path | None, entry: str | None, listen_host: str, store_bodies: bool) -> None:
    """Run mitmproxy in front of every service of a stack and record every hop.

    Each route gets its own reverse listener; point the services (and the client)
    at the listeners instead of at each other. Ctrl-C or SIGTERM stops, flushes
    and prints the totals.

    Example:

        hoptrace proxy --route gateway=http://127.0.0.1:8080@18080 --route auth=http://127.0.0.1:3001@13001 --db traces.db
    """
    from hoptrace.proxy.routes import load_stack_file, parse_route
    from hoptrace.proxy.runner import ProxyConfig, print_routes, run_proxy

    if bool(route_specs) == bool(stack_file):
        raise BadInput("give either --route (repeatable) or --stack FILE")
    with exit_2_on_bad_input():
        if stack_file:
            stack = load_stack_file(stack_file)
            routes, entry, db = stack.routes, entry or stack.entry, db or (Path(stack.db) if stack.db else None)
        else:
            routes = [parse_route(spec) for spec in route_specs]
        config = ProxyConfig(routes=routes, db=db or Path("traces.db"), entry=entry, listen_host=listen_host, store_bodies=store_bodies)
        live = sys.stderr.isatty()

        def ready(entry_name: str) -> None:
            click.echo(f"hoptrace proxy: recording to {config.db}")
            print_routes(config, entry_name)
            click.echo("proxy ready (Ctrl-C to stop)", err=True)

        def tick(counters) -> None:
            if live:
                click.echo(f"\r  {counters.recorded} hops recorded, {counters.dropped} dropped ", nl=False, err=True)

        counters = asyncio.run(run_proxy(config, on_ready=ready, on_tick=tick))
    if live:
        click.echo(err=True)
    click.echo(f"hoptrace proxy: {counters.summary()} -> {config.db}")
    if counters.write_errors:
        raise click.ClickException(f"{counters.write_errors} batches could not be written: {counters.last_error}")


@cli.command("addon-path")
def addon_path() -> None:
    """Print the path of the recorder script for plain mitmdump / mitmproxy.

    Example:

        mitmdump -s "$(hoptrace addon-path)" --set hoptrace_db=traces.db --mode reverse:http://127.0.0.1:3001@13001
    """
    from importlib.resources import files

    click.echo(files("hoptrace.addons") / "mitmdump_recorder.py")


for command in (analyze, plot, report, stack, demo, record_samples):
    cli.add_command(command)
cli.add_command(import_)
cli.add_command(export)
cli.add_command(ui)
cli.add_command(coverage)
