"""Cut a request whose upstream does not answer in time, and say so in its row.

mitmproxy (11, 12) has no per-request upstream timeout: a hanging upstream holds
the flow until the connection's 10-minute inactivity timeout. ``flow.kill()``
cannot stop a flow waiting for its response (mitmproxy#4711), so the watchdog
cancels the upstream connection's reader task instead: mitmproxy then fails the
flow ("server closed connection", or an incomplete body), answers the client
502, and fires ``error``. The flow was marked first, so the recorder writes
``error_kind = 'timeout'`` with the limit in the message.
"""

from __future__ import annotations

import asyncio
import logging
import time

from mitmproxy import ctx, exceptions, http

from hoptrace.addons._hop import CUT_BY_HOPTRACE

logger = logging.getLogger("hoptrace")

DEFAULT_UPSTREAM_TIMEOUT = 60.0


class UpstreamTimeout:
    def __init__(self) -> None:
        self._waiting: dict[str, http.HTTPFlow] = {}
        self._task: asyncio.Task | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "hoptrace_upstream_timeout",
            float,
            DEFAULT_UPSTREAM_TIMEOUT,
            "Seconds to wait for an upstream's complete response before cutting the request "
            "(recorded as error_kind 'timeout'); 0 waits forever.",
        )

    def configure(self, updated: set[str]) -> None:
        if "hoptrace_upstream_timeout" in updated and not 0 <= ctx.options.hoptrace_upstream_timeout < 1e9:
            raise exceptions.OptionsError("hoptrace_upstream_timeout: seconds, 0 or more")

    def running(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()

    # -- hooks: a dict operation each -----------------------------------------

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:  # not answered by the proxy itself
            self._waiting[flow.id] = flow

    def response(self, flow: http.HTTPFlow) -> None:
        self._waiting.pop(flow.id, None)

    def error(self, flow: http.HTTPFlow) -> None:
        self._waiting.pop(flow.id, None)

    # -- the watchdog -----------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            limit = ctx.options.hoptrace_upstream_timeout
            await asyncio.sleep(min(1.0, limit / 4) if limit else 1.0)
            if limit:
                self.cut_late(limit, time.time())

    def cut_late(self, limit: float, now: float) -> int:
        """Cut every flow waiting longer than ``limit`` seconds; returns how many."""
        late = [flow for flow in self._waiting.values() if now - (flow.request.timestamp_end or now) > limit]
        for flow in late:
            self._waiting.pop(flow.id, None)
            flow.metadata[CUT_BY_HOPTRACE] = ("timeout", f"no complete response from the upstream within {limit:g} s")
            if not _cancel_upstream(flow):
                logger.warning("hoptrace: flow %s is late but its upstream connection was not found", flow.id)
        return len(late)


def _cancel_upstream(flow: http.HTTPFlow) -> bool:
    server = ctx.master.addons.get("proxyserver")
    handler = server.connections.get(flow.client_conn.id) if server is not None else None
    io = handler.transports.get(flow.server_conn) if handler is not None else None
    if io is None or io.handler is None:
        return False
    io.handler.cancel("upstream timeout")
    return True
