"""The hoptrace recorder: a mitmproxy addon that writes every hop to a SQLite trace file.

Use it from ``hoptrace proxy`` (loaded for you), or from plain mitmproxy::

    mitmdump -s addons/mitmdump_recorder.py --set hoptrace_db=traces.db \\
        --mode reverse:http://127.0.0.1:3001@127.0.0.1:13001 --set hoptrace_service=auth@13001

Every flow gets a ``response`` or an ``error`` event, never both, so both hooks
share :meth:`Recorder._record` and each flow becomes exactly one row. The hooks run
on mitmproxy's event loop and do nothing but copy the flow's values into a snapshot
(~5 µs) for the writer thread.

Every request that reached the proxy becomes a row, also at shutdown: once
:meth:`Recorder.stop_accepting` ran (``hoptrace proxy`` on SIGINT/SIGTERM, mitmproxy's
``done`` under mitmdump) a new request is answered 503 with ``Connection: close``
and never forwarded, responses in flight carry ``Connection: close``, and a request
still open when the file closes is recorded as cut, ``error_kind = 'shutdown'``.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import time
from collections.abc import Sequence

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode

from hoptrace._errors import HoptraceError
from hoptrace._memory import freeze_start_up
from hoptrace._types import Counters, Route
from hoptrace.addons._hop import CUT_BY_HOPTRACE
from hoptrace.addons._writer import ROW_PROCESS_AFTER, ROW_PROCESS_MODES, TraceWriter

logger = logging.getLogger("hoptrace")

FINGERPRINT_KEY_ENV = "HOPTRACE_FINGERPRINT_KEY"
ROW_PROCESS_ENV = "HOPTRACE_ROW_PROCESS"


SHUTDOWN_CUT = ("shutdown", "cut by the proxy's shutdown")
_REFUSED_AT_SHUTDOWN = ("shutdown", "not forwarded: the proxy was shutting down")


class Recorder:
    def __init__(self, source: str = "mitmdump -s") -> None:
        self.writer: TraceWriter | None = None
        self.source = source
        # When the proxy stopped taking new requests (time.time()), or None.
        self.stopping_at: float | None = None
        self._service_by_port: dict[int, str] = {}
        # Flows whose request arrived and that have not finished yet, by id.
        self.open_flows: dict[str, http.HTTPFlow] = {}
        self._cut: set[str] = set()
        self._atexit = False

    def load(self, loader) -> None:
        loader.add_option("hoptrace_db", str | None, None, "Record every hop to this SQLite trace file (created if missing).")
        loader.add_option(
            "hoptrace_service",
            Sequence[str],
            [],
            "Name the service behind a listener, as NAME@LISTEN_PORT; repeat for each listener. "
            "Unnamed listeners are named after their upstream, e.g. 127.0.0.1:3001.",
        )
        loader.add_option("hoptrace_entry", str | None, None, "Service where client requests enter the stack (default: the first named).")
        loader.add_option("hoptrace_store_bodies", bool, False, "Also store request and response bodies (up to 64 KiB, redacted).")
        loader.add_option(
            "hoptrace_fingerprint_key",
            str | None,
            None,
            f"Secret key for token fingerprints, to compare tokens across captures (also ${FINGERPRINT_KEY_ENV}). "
            "Default: a random key per capture, never written anywhere.",
        )
        default_mode = os.environ.get(ROW_PROCESS_ENV, "auto")
        loader.add_option(
            "hoptrace_row_process",
            str,
            default_mode if default_mode in ROW_PROCESS_MODES else "auto",
            "Build rows (token parsing, redaction) in a child process, off the proxy's core and GIL: "
            f"auto (once a capture has seen {ROW_PROCESS_AFTER} flows), on, off (in the writer thread). "
            f"Default also from ${ROW_PROCESS_ENV}.",
            choices=list(ROW_PROCESS_MODES),
        )

    def configure(self, updated: set[str]) -> None:
        if "hoptrace_service" in updated:
            self._service_by_port = parse_service_names(ctx.options.hoptrace_service)
        writer_options = {"hoptrace_db", "hoptrace_store_bodies", "hoptrace_fingerprint_key", "hoptrace_row_process", "mode"}
        if updated & writer_options and ctx.options.hoptrace_db:
            self.close()
            try:
                self.writer = TraceWriter(
                    ctx.options.hoptrace_db,
                    routes=self._routes(),
                    entry=ctx.options.hoptrace_entry or next(iter(self._service_by_port.values()), None),
                    key=_fingerprint_key(ctx.options.hoptrace_fingerprint_key),
                    store_bodies=ctx.options.hoptrace_store_bodies,
                    row_process=ctx.options.hoptrace_row_process,
                    source=self.source,
                )
            except HoptraceError as exc:
                raise exceptions.OptionsError(str(exc)) from None
            if not self._atexit:
                # mitmproxy keeps serving connections after `done`, and their flows
                # still fire `response`: close at exit, not in `done`.
                atexit.register(self._close_at_exit)
                self._atexit = True

    def running(self) -> None:
        freeze_start_up()  # under plain mitmdump; hoptrace proxy freezes again after its own start-up

    # -- hooks (mitmproxy's event loop: keep them trivial) ------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if self.writer is None:
            return
        self.writer.counters.seen += 1
        self.open_flows[flow.id] = flow
        if self.stopping_at is not None:
            flow.metadata[CUT_BY_HOPTRACE] = _REFUSED_AT_SHUTDOWN
            flow.response = http.Response.make(
                503, b"proxy shutting down\n", {"Connection": "close", "Retry-After": "1", "Content-Type": "text/plain"}
            )

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if self.stopping_at is not None and flow.response is not None:
            flow.response.headers["Connection"] = "close"

    def response(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def done(self) -> None:
        self.stop_accepting()
        if self.writer is not None:
            self.writer.flush()

    # -- the rest ------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Flows whose request arrived and that have not finished yet."""
        return len(self.open_flows)

    def stop_accepting(self) -> None:
        """From now on, answer new requests 503 + Connection: close, and close connections after their response."""
        if self.stopping_at is None:
            self.stopping_at = time.time()

    def cut_open_flows(self) -> None:
        """Mark every flow still open as cut by the shutdown, so the error it may still get says so."""
        for flow in list(self.open_flows.values()):
            flow.metadata.setdefault(CUT_BY_HOPTRACE, SHUTDOWN_CUT)

    def close(self) -> Counters | None:
        """Record flows still open as cut by the shutdown, flush and close the trace file; returns the final counters."""
        if self.writer is None:
            return None
        self.cut_open_flows()
        for flow_id, flow in list(self.open_flows.items()):
            self._cut.add(flow_id)
            self._record(flow)
        return self.writer.close()

    def _record(self, flow: http.HTTPFlow) -> None:
        if self.writer is None or flow.id in self._cut and flow.id not in self.open_flows:
            return  # already recorded as cut by the shutdown
        self.open_flows.pop(flow.id, None)
        try:
            self.writer.submit(self._service(flow), flow)
        except Exception:  # mitmproxy would swallow it; we count the hop as lost, and the tests keep it at 0
            self.writer.counters.addon_errors += 1
            self.writer.counters.dropped += 1
            logger.exception("hoptrace: could not queue flow %s", flow.id)

    def _service(self, flow: http.HTTPFlow) -> str:
        port = flow.client_conn.sockname[1] if flow.client_conn.sockname else None
        if (name := self._service_by_port.get(port)) is None:
            name = _upstream_name(flow.client_conn.proxy_mode) or f"port-{port}"
            self._service_by_port[port] = name
        return name

    def _routes(self) -> list[Route]:
        routes = []
        for spec in ctx.options.mode:
            mode = ProxyMode.parse(spec)
            if isinstance(mode, ReverseMode):
                port = mode.listen_port() or 0
                name = self._service_by_port.get(port) or _upstream_name(mode) or f"port-{port}"
                routes.append(Route(name, mode.data, port))
        return routes

    def _close_at_exit(self) -> None:
        if self.writer is not None and not self.writer.closed:
            counters = self.writer.close()
            print(f"hoptrace: {counters.summary()} -> {self.writer.path}", flush=True)


def parse_service_names(specs: Sequence[str]) -> dict[int, str]:
    """``["auth@13001", ...]`` → ``{13001: "auth"}``; raises OptionsError on a bad spec."""
    names: dict[int, str] = {}
    for spec in specs:
        name, sep, port = spec.rpartition("@")
        if not sep or not name or not port.isdecimal() or not 0 < int(port) < 65536:
            raise exceptions.OptionsError(f"hoptrace_service: expected NAME@LISTEN_PORT, got {spec!r}")
        names[int(port)] = name
    return names


def _upstream_name(mode: ProxyMode) -> str | None:
    if isinstance(mode, ReverseMode):
        host, port = mode.address
        return f"{host}:{port}"
    return None


def _fingerprint_key(hex_key: str | None) -> bytes:
    hex_key = hex_key or os.environ.get(FINGERPRINT_KEY_ENV)
    if not hex_key:
        return secrets.token_bytes(32)
    try:
        key = bytes.fromhex(hex_key)
    except ValueError:
        raise exceptions.OptionsError("hoptrace_fingerprint_key: expected a hex string") from None
    if len(key) < 16:
        raise exceptions.OptionsError("hoptrace_fingerprint_key: use at least 16 bytes (32 hex digits)")
    return key
