"""`hoptrace proxy` and `hoptrace addon-path`: the click commands (registered in hoptrace.cli)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import click

from hoptrace._click import BadInput, OneLineCommand, OwnProcess, PathArg, exit_2_on_bad_input
from hoptrace.addons.upstream_timeout import DEFAULT_UPSTREAM_TIMEOUT


def _finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    # FloatRange lets NaN through: every comparison with it is false.
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number of seconds", ctx, param)
    return value


def _workers(ctx: click.Context, param: click.Parameter, value: str) -> int:
    if value == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # str.isdigit() also holds for '¹' and other digits int() refuses.
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= 256:
        raise click.BadParameter(f"expected a number of processes from 1 to 256, or auto; got {value!r}", ctx, param)
    return int(value)


@click.command(cls=OneLineCommand)
@click.option("--route", "route_specs", multiple=True, metavar="NAME=UPSTREAM_URL@LISTEN_PORT", help="A service and the port to listen on for it. Repeat for each service.")
@click.option("--stack", "stack_file", type=PathArg(dir_okay=False), help="A TOML file of [routes.NAME] tables (upstream, listen), instead of --route.")
@click.option("--db", type=PathArg(dir_okay=False), default=None, help="Trace file to record into (default: traces.db, or the stack file's db).")
@click.option("--entry", help="The route where client requests enter (default: the first).")
@click.option("--listen-host", default="127.0.0.1", show_default=True, help="Address the listeners bind to.")
@click.option("--store-bodies", is_flag=True, help="Also store bodies (up to 64 KiB, redacted). Off by default: bodies leak.")
@click.option("--grace", type=click.FloatRange(0, 3600), callback=_finite, default=5.0, show_default=True, help="On Ctrl-C/SIGTERM, seconds to let requests already inside finish; those still open are cut and recorded as error_kind 'shutdown'.")
@click.option("--upstream-timeout", type=click.FloatRange(0, 1e6), callback=_finite, default=DEFAULT_UPSTREAM_TIMEOUT, show_default=True, help="Seconds to wait for an upstream's complete response before cutting the request (error_kind 'timeout'); 0 waits forever.")
@click.option("--workers", default="1", callback=_workers, show_default=True, metavar="N|auto", help="Linux: N proxy processes share each listen port (SO_REUSEPORT), each recording into its own shard next to the DB (traces.w1.db, ...); auto = one per core.")
@click.option("--ui", "web_view", is_flag=True, help="Also serve `hoptrace ui` on the capture, live, in its own process (its analysis never takes the proxy's core).")
@click.option("--ui-port", type=click.IntRange(0, 65535), default=8470, show_default=True, help="Port of the --ui web view on 127.0.0.1; 0 picks a free one.")
@click.option("--otlp-endpoint", metavar="URL", help="Also stream every hop as a span to this OTLP/HTTP receiver (POST URL/v1/traces, protobuf), a request once its tree is complete (2 s after its entry hop ended, at the stream's next tick: ~3-9 s); with --workers, one stream for all shards.")
def proxy(route_specs: tuple[str, ...], stack_file: Path | None, db: Path | None, entry: str | None, listen_host: str, store_bodies: bool, grace: float, upstream_timeout: float, workers: int, web_view: bool, ui_port: int, otlp_endpoint: str | None) -> None:
    """Run mitmproxy in front of every service of a stack and record every hop.

    Each route gets its own reverse listener; point the services (and the client)
    at the listeners instead of at each other. Ctrl-C or SIGTERM stops taking new
    requests, lets those inside finish, flushes and prints the totals. Exits 1 if
    any hop could not be recorded.

    Example:

    \b
        hoptrace proxy --route gateway=http://127.0.0.1:8080@18080 --route auth=http://127.0.0.1:3001@13001 --db traces.db
        hoptrace proxy --stack stack.toml --workers auto
        hoptrace proxy --stack stack.toml --ui
        hoptrace proxy --stack stack.toml --otlp-endpoint http://127.0.0.1:4318
    """
    if click.get_current_context().find_object(OwnProcess):
        _rerun_optimized()
    from hoptrace.proxy.routes import load_stack_file, parse_route
    from hoptrace.proxy.runner import ProxyConfig, print_routes, run_proxy

    if bool(route_specs) == bool(stack_file):
        raise BadInput("give either --route (repeatable) or --stack FILE")
    if workers > 1 and not sys.platform.startswith("linux"):
        raise BadInput("--workers: sharing a port between processes (SO_REUSEPORT balancing) needs Linux")
    if otlp_endpoint is not None:
        from hoptrace.proxy.otlp_stream import traces_url

        try:
            traces_url(otlp_endpoint)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
    with exit_2_on_bad_input():
        if stack_file:
            stack = load_stack_file(stack_file)
            routes, entry, db = stack.routes, entry or stack.entry, db or (Path(stack.db) if stack.db else None)
        else:
            routes = [parse_route(spec) for spec in route_specs]
        config = ProxyConfig(
            routes=routes, db=db or Path("traces.db"), entry=entry, listen_host=listen_host, store_bodies=store_bodies,
            drain_seconds=grace, upstream_timeout=upstream_timeout, otlp_endpoint=otlp_endpoint,
        )  # fmt: skip
        live = sys.stderr.isatty()
        web = _WebView(ui_port) if web_view else None

        def ready(entry_name: str) -> None:
            click.echo(f"hoptrace proxy: recording to {config.db}")
            print_routes(config, entry_name)
            if web is not None:
                web.start([config.db])
            click.echo("proxy ready (Ctrl-C to stop)", err=True)

        def tick(counters) -> None:
            if live:
                click.echo(f"\r  {counters.recorded} hops recorded, {counters.dropped} dropped ", nl=False, err=True)

        try:
            if workers > 1:
                return _run_workers(config, workers, tick, live, web)
            counters = asyncio.run(run_proxy(config, on_ready=ready, on_tick=tick))
        finally:
            if web is not None:
                web.stop()
    if live:
        click.echo(err=True)
    click.echo(f"hoptrace proxy: {counters.summary()} -> {config.db}")
    _fail_if_lost(counters)


def _rerun_optimized() -> None:
    """Replace this process by the same command under ``python -O``, when that costs nothing lasting.

    mitmproxy keeps its self-checks behind ``__debug__``: the type check of every request's and
    response's fields as they are built (``http.MessageData.__post_init__``), the event-type check
    wrapped around every protocol layer's handler (``proxy.utils.expect``) and its asserts. They
    guard mitmproxy's own development; skipping them cuts the proxy's CPU per request by a fifth.
    The process keeps its id, so whoever started it still holds it, and ``multiprocessing`` passes
    -O on to the workers. The proxy runs as it is where exec cannot help: a frozen program, no
    POSIX exec, or no -O bytecode of mitmproxy that Python has or may write (PYTHONDONTWRITEBYTECODE,
    a read-only install), since compiling it at every start would cost ~1.7 s of CPU each time.
    """
    if sys.flags.optimize or os.name != "posix" or getattr(sys, "frozen", False) or not _optimized_bytecode():
        return
    for stream in (sys.stdout, sys.stderr):  # None when the descriptor was closed
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
    with contextlib.suppress(OSError):
        os.execv(sys.executable, [sys.executable, "-O", *sys.orig_argv[1:]])


def _optimized_bytecode() -> bool:
    """Whether mitmproxy's -O bytecode is there, or Python may write it at the first start."""
    spec = importlib.util.find_spec("mitmproxy.http")
    if spec is None or not spec.origin:
        return False
    cached = Path(importlib.util.cache_from_source(spec.origin, optimization=1))
    folder = cached.parent if cached.parent.exists() else cached.parent.parent
    return cached.exists() or (not sys.dont_write_bytecode and os.access(folder, os.W_OK))


def _run_workers(config, workers: int, tick, live: bool, web: _WebView | None) -> None:
    from hoptrace.proxy.runner import print_routes
    from hoptrace.proxy.workers import run_workers

    def ready(entry_name: str, shards: list[Path]) -> None:
        click.echo(f"hoptrace proxy: {workers} workers recording to {', '.join(map(str, shards))}")
        print_routes(config, entry_name)
        if web is not None:
            web.start(shards)
        click.echo("proxy ready (Ctrl-C to stop)", err=True)

    result = run_workers(config, workers, on_ready=ready, on_tick=tick)
    if live:
        click.echo(err=True)
    for index, counters in sorted(result.per_worker.items()):
        click.echo(f"  worker {index}: {counters.summary()}")
    click.echo(f"hoptrace proxy: {workers} workers: {result.counters.summary()}")
    if result.crashed:
        died = ", ".join(f"worker {i} (exit {code})" for i, code in sorted(result.crashed.items()))
        raise click.ClickException(f"{died} ended without closing its shard; its last hops may be missing")
    _fail_if_lost(result.counters)


class _WebView:
    """``--ui``: ``hoptrace ui`` on the capture as a child process. Its analysis runs pandas
    in threads: in the proxy's own process it would hold the GIL the event loop needs."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.process: subprocess.Popen | None = None

    def start(self, dbs: list[Path]) -> None:
        command = [sys.executable, "-m", "hoptrace", "ui", *map(str, dbs), "--host", "127.0.0.1", "--port", str(self.port)]
        # Its own process group: a Ctrl-C meant for the proxy does not stop the view before the proxy's summary.
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _fail_if_lost(counters) -> None:
    if counters.lost:
        raise click.ClickException(
            f"{counters.dropped} hops were not recorded ({counters.write_errors} write errors); last error: {counters.last_error}"
        )


@click.command("addon-path", cls=OneLineCommand)
def addon_path() -> None:
    """Print the path of the recorder script for plain mitmdump / mitmproxy.

    Example:

    \b
        mitmdump -s "$(hoptrace addon-path)" --set hoptrace_db=traces.db --mode reverse:http://127.0.0.1:3001@127.0.0.1:13001
    """
    from importlib.resources import files

    click.echo(files("hoptrace.addons") / "mitmdump_recorder.py")


__all__ = ["addon_path", "proxy"]
