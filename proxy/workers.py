"""`hoptrace proxy --workers N`: N proxy processes sharing each listen port, one shard file each.

One mitmproxy process is one core (its event loop). With ``SO_REUSEPORT`` on every
listener, Linux lets N processes bind the same port and spreads incoming
connections over them by a hash of the connection's addresses; a connection stays
on the process that accepted it, so the requests of one keep-alive connection
(one caller, in order) are all recorded by the same worker.

Each worker records into its own shard next to the DB (``traces.db`` →
``traces.w1.db``, ``traces.w2.db``, ...): SQLite takes one writer per file, and a
shared file would serialise the workers on its lock. The shards of one capture
share a fingerprint key (a token has the same fingerprint in every shard, so the
analysis can join them) and a capture uuid, stored in ``captures.source``
(``hoptrace proxy --workers 2: capture <uuid>, worker 1``): no schema change.

The parent only supervises: it starts the workers, sums their counters for the
live line and the summary, and forwards SIGINT/SIGTERM to them; each worker stops
as the single proxy does (grace, 'shutdown' rows, ended_at, journal mode DELETE).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import secrets
import signal
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from hoptrace._errors import HoptraceError, RouteError
from hoptrace._shards import capture_shards, parse_worker_source, shard_path, worker_source
from hoptrace._types import Counters
from hoptrace.addons.recorder import FINGERPRINT_KEY_ENV
from hoptrace.proxy.otlp_stream import OtlpStream, StreamInput
from hoptrace.proxy.routes import check_routes


def share_listen_ports() -> None:
    """Make every mitmproxy TCP listener of this process bind with ``SO_REUSEPORT``.

    mitmproxy (checked on 11.0.2) never sets it: without it a second process gets
    EADDRINUSE (errno 98). Its TCP listeners are all made by
    ``AsyncioServerInstance.listen`` calling ``asyncio.start_server(handler, host, port)``
    through the ``asyncio`` name of ``mitmproxy.proxy.mode_servers``; we point that
    name at a copy of asyncio whose ``start_server`` adds ``reuse_port=True``. Besides
    the hook dispatch (``_dispatch.py``), this is the one place hoptrace changes
    mitmproxy; tests/test_workers.py checks that two workers bind one port and both
    serve, so an upgrade that moves the call fails there.
    """
    from mitmproxy.proxy import mode_servers

    if not hasattr(mode_servers.AsyncioServerInstance, "listen") or not hasattr(mode_servers, "asyncio"):
        raise RouteError("--workers: this mitmproxy version makes its listeners differently; cannot share ports")
    if isinstance(mode_servers.asyncio, _ReusePortAsyncio):
        return
    mode_servers.asyncio = _ReusePortAsyncio()


class _ReusePortAsyncio:
    """The asyncio module, except that ``start_server`` binds with ``SO_REUSEPORT``."""

    def __getattr__(self, name: str):
        return getattr(asyncio, name)

    @staticmethod
    async def start_server(*args, **kwargs) -> asyncio.Server:
        return await asyncio.start_server(*args, reuse_port=True, **kwargs)


@dataclass
class WorkersResult:
    """The combined counters, each worker's, and the workers that ended without reporting theirs."""

    counters: Counters
    per_worker: dict[int, Counters] = field(default_factory=dict)
    crashed: dict[int, int | None] = field(default_factory=dict)  # worker -> exit code

    @property
    def lost(self) -> bool:
        return self.counters.lost or bool(self.crashed)


def combine(counters: list[Counters]) -> Counters:
    """The sum of the workers' counters; the first last_error found."""
    total = Counters()
    for name in (f.name for f in fields(Counters) if f.name != "last_error"):
        setattr(total, name, sum(getattr(c, name) for c in counters))
    total.last_error = next((c.last_error for c in counters if c.last_error), None)
    return total


def run_workers(
    config,
    workers: int,
    *,
    on_ready: Callable[[str, list[Path]], None] | None = None,
    on_tick: Callable[[Counters], None] | None = None,
) -> WorkersResult:
    """Run ``workers`` proxy processes until SIGINT/SIGTERM, then let each stop and return the totals.

    Raises the first worker's RouteError / TraceFileError if one cannot start (the others are stopped).
    """
    # Checked here, once, without SO_REUSEPORT: a port someone else holds (even another
    # `--workers` capture, whose sockets would let ours in) is refused before any worker starts.
    entry = check_routes(config.routes, config.entry, config.listen_host)
    capture = uuid.uuid4().hex
    # One key for every shard, so a token's fingerprint is the same in all of them;
    # handed to the workers in their environment, never written to a file.
    key = os.environ.get(FINGERPRINT_KEY_ENV) or secrets.token_hex(32)
    context = multiprocessing.get_context("spawn")
    # One pipe per worker, not one shared queue: a queue's writers share a lock, and a
    # worker killed while holding it would leave the others unable to report, or exit.
    pipes = {index: context.Pipe(duplex=False) for index in range(1, workers + 1)}
    processes = {
        index: context.Process(
            target=_worker, args=(index, workers, capture, key, config, pipes[index][1]), name=f"hoptrace-w{index}"
        )
        for index in pipes
    }
    for index, process in processes.items():
        process.start()
        pipes[index][1].close()  # the worker's end: once the worker is gone, our end reads EOF
    forward = _Forward(processes)
    if config.otlp_endpoint:
        forward.stream_inputs = [
            StreamInput(shard_path(config.db, i), source=worker_source(workers, capture, i)) for i in processes
        ]
    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = _supervise(config, processes, {pipes[i][0]: i for i in pipes}, forward, on_ready, on_tick, entry)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if forward.stream is not None:  # every worker has ended: its shard is closed
            sent, dropped = forward.stream.finish()
    if forward.stream is not None:
        result.counters.otlp_sent, result.counters.otlp_dropped = sent, dropped
    return result


class _Forward:
    """The parent's SIGINT/SIGTERM handler: pass the signal on to every worker still running.

    With ``--otlp-endpoint``, one streaming process follows every shard (a request's hops are
    spread over the shards: a service's call to another comes on a connection of its own, which
    any worker may accept; only the shards together hold the request's tree). It is paused first:
    a worker closing its shard must be its only reader, or the shard would stay in WAL mode.
    """

    def __init__(self, processes: dict[int, multiprocessing.Process]) -> None:
        self.processes = processes
        self.signalled = False
        self.stream_inputs: list[StreamInput] = []
        self.stream: OtlpStream | None = None

    def __call__(self, signum: int, frame=None) -> None:
        self.signalled = True
        if self.stream is not None:
            self.stream.pause()
        for process in self.processes.values():
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signum)


def _supervise(config, processes, pipes: dict, forward: _Forward, on_ready, on_tick, entry: str) -> WorkersResult:
    latest: dict[int, Counters] = {index: Counters() for index in processes}
    final: dict[int, Counters] = {}
    ready: set[int] = set()
    error: str | None = None
    while pipes:
        for pipe in multiprocessing.connection.wait(list(pipes), timeout=0.5):
            try:
                kind, index, payload = pipe.recv()
            except (EOFError, OSError):  # the worker is gone
                del pipes[pipe]
                continue
            if kind == "ready":
                ready.add(index)
                if len(ready) == len(processes):
                    if forward.stream_inputs and not forward.signalled:
                        forward.stream = OtlpStream(forward.stream_inputs, config.otlp_endpoint, entry)
                    if on_ready is not None:
                        on_ready(payload, [shard_path(config.db, i) for i in processes])
            elif kind == "tick":
                latest[index] = payload
                if on_tick is not None:
                    on_tick(combine(list(latest.values())))
            elif kind == "done":
                final[index] = payload
            elif kind == "error" and error is None:
                error = payload
                forward(signal.SIGTERM)
    for process in processes.values():
        process.join()
    if error is not None:
        raise RouteError(error)
    crashed = {index: p.exitcode for index, p in processes.items() if index not in final}
    counters = combine([final.get(index, latest[index]) for index in processes])
    return WorkersResult(counters, final, crashed)


def _worker(index: int, workers: int, capture: str, key: str, config, pipe) -> None:
    """One worker process: the single proxy, on a shard, with shared ports; reports to the parent through its pipe."""
    from hoptrace.proxy.runner import run_proxy

    # The parent forwards Ctrl-C: a terminal's SIGINT to the whole group would reach us twice.
    os.setpgrp()
    os.environ[FINGERPRINT_KEY_ENV] = key
    parent = os.getppid()
    shard = shard_path(config.db, index)
    # The parent streams every shard (one stream: a request's hops are in several).
    config = replace(config, db=shard, source=worker_source(workers, capture, index), share_ports=True, otlp_endpoint=None)

    def tick(counters: Counters) -> None:
        pipe.send(("tick", index, replace(counters)))
        if os.getppid() != parent:  # the parent died (SIGKILL): stop rather than serve unsupervised
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        share_listen_ports()
        counters = asyncio.run(run_proxy(config, on_ready=lambda entry: pipe.send(("ready", index, entry)), on_tick=tick))
    except HoptraceError as exc:
        pipe.send(("error", index, f"worker {index}: {exc}"))
        sys.exit(2)
    pipe.send(("done", index, replace(counters)))


__all__ = [
    "WorkersResult", "capture_shards", "combine", "parse_worker_source", "run_workers", "shard_path", "share_listen_ports", "worker_source",
]  # fmt: skip
