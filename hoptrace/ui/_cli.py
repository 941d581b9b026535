"""`hoptrace ui`: the click command (registered in hoptrace.cli). aiohttp and pandas load inside it."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import click

from hoptrace._click import BadInput, OneLineCommand, exit_2_on_bad_input
from hoptrace._options import trace_dbs_argument


@click.command("ui", cls=OneLineCommand)
@trace_dbs_argument()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Anything but loopback shows the traces to the network.",
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8470, show_default=True, help="Port to listen on; 0 picks a free one."
)
@click.option("--no-live", "no_live", is_flag=True, help="Analyse once; do not watch the DBs for new hops.")
def ui(dbs: tuple[Path, ...], host: str, port: int, no_live: bool) -> None:
    """Browse trace DBs in a local web view: requests, waterfalls, hop details, sessions, compare.

    Several files (or a folder of shards) are one joined analysis, as in `hoptrace analyze`.

    Works on a DB the proxy is still writing: new requests appear within about a
    second, their findings once the tail is analysed (a few seconds). Everything is
    served from this process; nothing is fetched from the internet. Ctrl-C stops.

    Example:

    \b
        hoptrace ui traces.db
        hoptrace ui traces.db --port 0 --host 127.0.0.1
        hoptrace ui traces.w1.db traces.w2.db
    """
    from hoptrace.ui._server import start_ui

    async def serve() -> None:
        url, runner = await start_ui(list(dbs), host, port, live=not no_live)
        click.echo(f"hoptrace ui: serving {', '.join(str(d) for d in dbs)} at {url}  (Ctrl-C to stop)")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    with exit_2_on_bad_input():
        try:
            asyncio.run(serve())
        except OSError as exc:  # the port is taken, or the address is not this machine's
            raise BadInput(f"{host}:{port}: cannot listen ({exc.strerror or exc})") from None
