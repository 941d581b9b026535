"""`hoptrace proxy`: mitmproxy embedded as a library, one reverse listener per route, recording.

mitmdump dispatches each of a request's ~8 hook events through ~36 built-in
addons, ~43 % of its CPU (FIELD_NOTES). A reverse proxy needs five of them, so
we build the master ourselves with only those and the recorder: that headroom is
what lets hoptrace record everything and still outrun plain mitmdump.
"""

from __future__ import annotations

import asyncio
import gc
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
from hoptrace.addons._writer import Counters, Route
from hoptrace.addons.recorder import ROW_PROCESS_ENV, Recorder
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
    """Serve until SIGINT/SIGTERM (or ``stop`` is set), then drain, flush and return the counters.

    ``on_ready(entry)`` runs once every listener is up; ``on_tick(counters)`` about twice a second.
    Raises RouteError / TraceFileError for what the user can fix.
    """
    entry = check_routes(config.routes, config.entry, config.listen_host)
    master = Master(options.Options())
    recorder = Recorder()
    startup = _Startup(len(config.routes))
    master.addons.add(core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig(), recorder, startup)
    try:
        master.options.update(
            mode=[f"reverse:{r.upstream}@{config.listen_host}:{r.listen_port}" for r in config.routes],
            hoptrace_db=str(config.db),
            hoptrace_service=[f"{r.name}@{r.listen_port}" for r in config.routes],
            hoptrace_entry=entry,
            hoptrace_store_bodies=config.store_bodies,
            # Connect upstream when a request arrives, not when the client connects: with
            # "eager", a dead upstream drops the client before any flow exists to record.
            connection_strategy="lazy",
            # A proxy is what runs under load: start the row process now, not on the
            # 200th flow, in the middle of it (the addon's "auto" suits plain mitmdump).
            hoptrace_row_process=os.environ.get(ROW_PROCESS_ENV, "on"),
        )
    except exceptions.OptionsError as exc:
        raise TraceFileError(str(exc)) from None

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, master.shutdown)
    run = asyncio.create_task(master.run())
    try:
        started = await asyncio.wait({run, startup.listening}, return_when=asyncio.FIRST_COMPLETED)
        if startup.listening not in started[0] or not startup.listening.result():
            master.shutdown()
            await run
            raise RouteError(f"could not listen on every route's port ({_ports(config.routes)}); see the log above")
        # Everything alive now (mitmproxy, its addons, options, certificates) lives
        # until exit: out of the collector's sight, a full collection under load
        # scans only what the traffic allocates. Measured: the worst GC pause fell
        # from ~60 ms to a few ms, and it was what set p99 (benchmarks/README.md).
        gc.collect()
        gc.freeze()
        if on_ready is not None:
            on_ready(entry)
        while not run.done():
            await asyncio.wait({run}, timeout=0.5)
            if on_tick is not None and recorder.writer is not None:
                on_tick(recorder.writer.counters)
        await _drain(master, recorder, config.drain_seconds)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        counters = recorder.close()
    return counters


async def _drain(master: Master, recorder: Recorder, seconds: float) -> None:
    """Stop accepting, let requests already inside finish and be recorded, then close idle connections."""
    server = master.addons.get("proxyserver")
    await server.servers.update([])
    deadline = time.monotonic() + seconds
    while recorder.in_flight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    # Idle keep-alive connections would otherwise be cancelled by the event loop's
    # teardown, which asyncio reports as a traceback per connection.
    for handler in list(server.connections.values()):
        client_io = handler.transports.get(handler.client)
        if client_io is not None and client_io.handler is not None:
            client_io.handler.cancel()
    deadline = time.monotonic() + 2.0
    while server.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


def _ports(routes: list[Route]) -> str:
    return ", ".join(str(r.listen_port) for r in routes)


def print_routes(config: ProxyConfig, entry: str, out=sys.stdout) -> None:
    width = max(len(r.name) for r in config.routes)
    for route in config.routes:
        marker = "  (entry)" if route.name == entry else ""
        print(f"  {route.name:<{width}}  http://{config.listen_host}:{route.listen_port} -> {route.upstream}{marker}", file=out)
