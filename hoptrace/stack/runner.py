"""Starting and stopping the five services on 127.0.0.1, all in the caller's event loop."""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web

from hoptrace.stack.config import SERVICES, StackConfig, StackError
from hoptrace.stack.services import STATS, build_apps

HOST = "127.0.0.1"
# Callers stop before their callees, so requests in flight can still finish their hops.
_STOP_ORDER = ("gateway", "payment", "cart", "products", "auth")
# Bounds how long stop() waits for requests in flight (a checkout waits work_seconds).
_SHUTDOWN_TIMEOUT = 5.0


@dataclass
class RunningStack:
    """A started stack. ``urls`` are where the services listen; ``upstreams`` are the base
    URLs the services use to reach each other (the same, unless a proxy sits between)."""

    config: StackConfig
    urls: dict[str, str]
    upstreams: dict[str, str]
    _runners: dict[str, web.AppRunner] = field(repr=False)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Every service's counters, as its ``GET /_stats`` would answer."""
        return {name: runner.app[STATS].to_json() for name, runner in self._runners.items()}

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (bounded), close client sessions."""
        for name in _STOP_ORDER:
            runner = self._runners.pop(name, None)
            if runner is not None:
                await runner.cleanup()

    async def __aenter__(self) -> RunningStack:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def start_stack(config: StackConfig) -> RunningStack:
    """Start all five services and return once every one of them accepts connections.

    All ports are bound before any service starts, so port 0 can be resolved to the real
    port for the default upstreams, and a port in use fails before anything runs.
    Raises :class:`StackError` naming the service whose port cannot be bound.
    """
    sockets = _bind_all(config.ports)
    urls = {name: f"http://{HOST}:{sock.getsockname()[1]}" for name, sock in sockets.items()}
    upstreams = {**urls, **config.upstreams}
    apps = build_apps(config, upstreams)
    runners: dict[str, web.AppRunner] = {}
    running = RunningStack(config, urls, upstreams, runners)
    try:
        for name in SERVICES:
            runner = web.AppRunner(apps[name], access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT)
            await runner.setup()
            runners[name] = runner
            await web.SockSite(runner, sockets.pop(name)).start()
    except BaseException:
        await running.stop()
        raise
    finally:
        for sock in sockets.values():  # the ones no site took over
            sock.close()
    return running


def _bind_all(ports: dict[str, int]) -> dict[str, socket.socket]:
    bound: dict[str, socket.socket] = {}
    try:
        for name in SERVICES:
            bound[name] = _bind(name, ports[name])
    except BaseException:
        for sock in bound.values():
            sock.close()
        raise
    return bound


def _bind(service: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # As aiohttp's TCPSite does: a restarted stack can rebind ports in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        reason = "port in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise StackError(f"cannot listen for {service} on {HOST}:{port}: {reason}") from exc
    return sock
