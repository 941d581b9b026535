"""`hoptrace proxy`: mitmproxy embedded as a library, one reverse listener per route, recording.

mitmdump dispatches each of a request's ~8 hook events through ~36 built-in
addons, ~43 % of its CPU (profiled under load). A reverse proxy needs five of them, so
we build the master ourselves with only those and the recorder, dispatching each
event to the addons that handle it (``_dispatch.py``): that headroom is what lets
hoptrace record everything and still outrun plain mitmdump.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import exceptions, options
from mitmproxy.addons import core, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master

from hoptrace._errors import RouteError, TraceFileError
from hoptrace._memory import freeze_start_up
from hoptrace._types import Counters, Route
from hoptrace.addons.recorder import ROW_PROCESS_ENV, Recorder
from hoptrace.addons.upstream_timeout import DEFAULT_UPSTREAM_TIMEOUT, UpstreamTimeout
from hoptrace.proxy._dispatch import indexed_master
from hoptrace.proxy.otlp_stream import OtlpStream, StreamInput
from hoptrace.proxy.routes import check_routes


@dataclass
class ProxyConfig:
    routes: list[Route]
    db: Path = Path("traces.db")
    entry: str | None = None
    listen_host: str = "127.0.0.1"
    store_bodies: bool = False
    # How long a stop waits for requests already inside the proxy to finish.
    drain_seconds: float = 5.0
    upstream_timeout: float = DEFAULT_UPSTREAM_TIMEOUT
    # What the capture row's `source` says (a worker of `--workers N` names its capture there).
    source: str = "hoptrace proxy"
    # A worker of `--workers N`: its listeners share their ports with its siblings (SO_REUSEPORT).
    share_ports: bool = False
    # Stream each request's spans to this OTLP/HTTP receiver once its tree is complete.
    otlp_endpoint: str | None = None


class _Startup:
    """Tells the runner whether every listener came up (mitmproxy only logs a failed bind)."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.listening: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def running(self) -> None:
        from mitmproxy import ctx

        listening = len(ctx.master.addons.get("proxyserver").listen_addrs())
        if not self.listening.done():
            self.listening.set_result(listening >= self.expected)


async def run_proxy(
    config: ProxyConfig,
    *,
    on_ready: Callable[[str], None] | None = None,
    on_tick: Callable[[Counters], None] | None = None,
) -> Counters:
    """Serve until SIGINT/SIGTERM, then drain, flush and return the counters.

    ``on_ready(entry)`` runs once every listener is up; ``on_tick(counters)`` about twice a second.
    Raises RouteError / TraceFileError for what the user can fix.
    """
    entry = check_routes(config.routes, config.entry, config.listen_host, config.share_ports)
    master = indexed_master(options.Options())
    recorder = Recorder(source=config.source)
    startup = _Startup(len(config.routes))
    master.addons.add(
        core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig(), recorder, UpstreamTimeout(), startup
    )
    _configure(master, config, entry)

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, _stop, master, recorder)
    run = asyncio.create_task(master.run())
    stream = None
    try:
        started = await asyncio.wait({run, startup.listening}, return_when=asyncio.FIRST_COMPLETED)
        if startup.listening not in started[0] or not startup.listening.result():
            master.shutdown()
            await run
            raise RouteError(f"could not listen on every route's port ({_ports(config.routes)}); see the log above")
        if config.otlp_endpoint:
            stream = OtlpStream([StreamInput(config.db, capture_id=recorder.writer.capture_id)], config.otlp_endpoint, entry)
        freeze_start_up()  # the stream and the rest of this start-up too (the recorder's running hook froze earlier)
        if on_ready is not None:
            on_ready(entry)
        while not run.done():
            await asyncio.wait({run}, timeout=0.5)
            if on_tick is not None and recorder.writer is not None:
                on_tick(recorder.writer.counters)
        await _drain(master, recorder, config.drain_seconds)
    finally:
        # The handlers stay until the file is closed: a second Ctrl-C while the
        # last hops are written must not interrupt the writing (KeyboardInterrupt).
        if stream is not None:
            stream.pause()
        counters = recorder.close()
        if stream is not None:
            counters.otlp_sent, counters.otlp_dropped = stream.finish()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
            # The capture is closed: a late signal must not turn a clean stop into a
            # KeyboardInterrupt (exit 1) while the summary is printed.
            signal.signal(signum, signal.SIG_IGN)
    return counters


def _configure(master: Master, config: ProxyConfig, entry: str) -> None:
    """One reverse listener per route, the recorder's options; TraceFileError for an unusable DB."""
    try:
        master.options.update(
            mode=[f"reverse:{r.upstream}@{config.listen_host}:{r.listen_port}" for r in config.routes],
            hoptrace_db=str(config.db),
            hoptrace_service=[f"{r.name}@{r.listen_port}" for r in config.routes],
            hoptrace_entry=entry,
            hoptrace_store_bodies=config.store_bodies,
            hoptrace_upstream_timeout=config.upstream_timeout,
            # Connect upstream when a request arrives, not when the client connects: with
            # "eager", a dead upstream drops the client before any flow exists to record.
            connection_strategy="lazy",
            # A proxy is what runs under load: start the row process now, not on the
            # 100th flow, in the middle of it (the addon's "auto" suits plain mitmdump).
            hoptrace_row_process=os.environ.get(ROW_PROCESS_ENV, "on"),
        )
    except exceptions.OptionsError as exc:
        raise TraceFileError(str(exc)) from None


def _stop(master: Master, recorder: Recorder) -> None:
    """On SIGINT/SIGTERM: take no new request from here on, then let mitmproxy wind down."""
    if recorder.stopping_at is not None:
        print("hoptrace proxy: already stopping; letting requests inside finish", file=sys.stderr, flush=True)
    else:
        recorder.stop_accepting()
        print(f"hoptrace proxy: stopping at {recorder.stopping_at:.6f}; no new requests accepted", file=sys.stderr, flush=True)
        server = master.addons.get("proxyserver")
        # Closing the listeners at once: a connection attempted from now on is refused.
        asyncio.get_running_loop().create_task(server.servers.update([]))
    master.shutdown()


async def _drain(master: Master, recorder: Recorder, seconds: float) -> None:
    """Let requests already inside finish and be recorded, closing each connection once idle.

    A request still open after ``seconds`` is cut: its connection is closed and its
    row says ``error_kind = 'shutdown'``.
    """
    server = master.addons.get("proxyserver")
    await server.servers.update([])
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        _close_idle(server, recorder)
        if not recorder.in_flight:
            break
        await asyncio.sleep(0.02)
    recorder.cut_open_flows()
    # Idle keep-alive connections would otherwise be cancelled by the event loop's
    # teardown, which asyncio reports as a traceback per connection.
    _close_idle(server, recorder, busy=True)
    deadline = time.monotonic() + 2.0
    while server.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


def _close_idle(server, recorder: Recorder, busy: bool = False) -> None:
    """Close client connections with no request open on them (every one, with ``busy``).

    Idle means: no flow open on it, no hook pending (a response hook still has its
    response to send), no traffic for 50 ms. A response already handed to the
    transport is still sent: cancelling the handler closes the writer, which flushes.
    """
    open_on = {flow.client_conn.id for flow in recorder.open_flows.values()}
    quiet_since = time.time() - 0.05
    for connection_id, handler in list(server.connections.items()):
        active = connection_id in open_on or handler.hook_tasks or handler.timeout_watchdog.last_activity > quiet_since
        if active and not busy:
            continue
        client_io = handler.transports.get(handler.client)
        if client_io is not None and client_io.handler is not None:
            client_io.handler.cancel()


def _ports(routes: list[Route]) -> str:
    return ", ".join(str(r.listen_port) for r in routes)


def print_routes(config: ProxyConfig, entry: str, out=sys.stdout) -> None:
    width = max(len(r.name) for r in config.routes)
    for route in config.routes:
        marker = "  (entry)" if route.name == entry else ""
        print(f"  {route.name:<{width}}  http://{config.listen_host}:{route.listen_port} -> {route.upstream}{marker}", file=out)
