"""`hoptrace proxy` stopping and failing honestly, as a real process in front of real upstreams on 127.0.0.1:
SIGINT under load, SIGKILL under load, an upstream that hangs, an upstream that stops half-way."""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner

from hoptrace.cli import cli

from .conftest import PYTHON, free_port, query

pytestmark = pytest.mark.e2e


class Upstreams:
    """aiohttp apps and raw asyncio servers on 127.0.0.1, run on an event loop in a thread of the test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._cleanups: list = []
        self.seen: list[tuple[float, str]] = []  # (time received, path) by the delaying app

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def delaying_app(self) -> str:
        """Answers 200 after 0-50 ms; /slow/ paths after 30 s."""

        async def handle(request: web.Request) -> web.Response:
            self.seen.append((time.time(), request.path))
            await asyncio.sleep(30 if request.path.startswith("/slow/") else random.uniform(0, 0.05))
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_route("*", "/{path:.*}", handle)
        return self._start_app(app)

    def raw(self, answer: Callable[[asyncio.StreamWriter], object]) -> str:
        """A server that reads a request's head, then does ``answer(writer)`` (a coroutine function)."""

        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
                await answer(writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass

        async def start() -> str:
            server = await asyncio.start_server(connection, "127.0.0.1", 0)
            self._cleanups.append(server.close)
            return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

        return self.run(start())

    def _start_app(self, app: web.Application) -> str:
        async def start() -> str:
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self._cleanups.append(runner.cleanup)
            return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

        return self.run(start())

    def close(self) -> None:
        for cleanup in self._cleanups:
            result = cleanup()
            if asyncio.iscoroutine(result):
                self.run(result)
        self.run(self._cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    @staticmethod
    async def _cancel_the_rest() -> None:
        """Handlers still sleeping (the /slow/ ones, the hanging servers) end here, not at garbage collection."""
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
def upstreams():
    started = Upstreams()
    yield started
    started.close()


def stopping_at(output: str) -> float:
    return float(re.search(r"stopping at ([0-9.]+); no new requests accepted", output)[1])


# -- SIGINT under load -------------------------------------------------------------------------------


async def load(base: str, clients: int, signal_after: int, send_signal: Callable[[], None], slow: int = 0) -> list[tuple[str, float, int | None]]:
    """``clients`` keep-alive workers requesting unique paths; the signal once ``signal_after`` responses
    completed (or after 5 s); on until 1 s after it (or 4,000 requests).

    Returns (path, client start time, status or None when the request did not complete).
    """
    results: list[tuple[str, float, int | None]] = []
    counter = iter(range(4000))
    signalled = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=clients + slow)) as session:

        async def one(path: str) -> None:
            began = time.time()
            try:
                async with session.get(f"{base}{path}") as response:
                    await response.read()
                    results.append((path, began, response.status))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                results.append((path, began, None))

        async def worker() -> None:
            stop_at = float("inf")
            while time.monotonic() < stop_at and (n := next(counter, None)) is not None:
                await one(f"/load/{n}")
                if signalled.is_set() and stop_at == float("inf"):
                    stop_at = time.monotonic() + 1.0

        async def signaller() -> None:
            deadline = time.monotonic() + 5
            while len(results) < signal_after and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            send_signal()
            signalled.set()

        await asyncio.gather(signaller(), *(one(f"/slow/{i}") for i in range(slow)), *(worker() for _ in range(clients)))
    return results


@pytest.mark.parametrize("run", range(5))
def test_sigint_under_load_loses_no_completed_response_and_accepts_nothing_after(run, upstreams, spawn, tmp_path):
    base = upstreams.delaying_app()
    port, db = free_port(), tmp_path / "t.db"
    proc = spawn([PYTHON, "-m", "hoptrace", "proxy", "--db", str(db), "--grace", "1", "--route", f"svc={base}@{port}"], ready="proxy ready")
    results = asyncio.run(load(f"http://127.0.0.1:{port}", 64, 200, lambda: proc.popen.send_signal(signal.SIGINT), slow=3))
    assert proc.stop(timeout=30) == 0, proc.output
    stopped = stopping_at(proc.output)

    rows = {row["path"]: row for row in query(db, "SELECT * FROM hops")}
    completed = [(path, status) for path, _, status in results if status is not None]
    assert len(completed) >= 200, "the load never got going"
    for path, status in completed:  # every response a client completed is a row, with the same status
        assert path in rows and rows[path]["status"] == status, (path, status)
    forwarded = {path for _, path in upstreams.seen}
    for path, row in rows.items():
        if row["started_at"] > stopped:  # a request that arrived after the signal...
            assert path not in forwarded, path  # ...was never forwarded upstream
            assert (row["status"], row["error_kind"]) == (503, "shutdown")
            assert ["Connection", "close"] in json.loads(row["response_headers"])  # the client will not reuse it
        assert row["error_kind"] in (None, "shutdown"), dict(row)  # nothing the shutdown cut looks like an upstream error
    slow = [rows[f"/slow/{i}"] for i in range(3)]
    assert [(r["error_kind"], r["status"], r["failed"]) for r in slow] == [("shutdown", None, 1)] * 3
    capture = query(db, "SELECT * FROM captures")[0]
    assert capture["ended_at"] is not None and capture["hops_seen"] == capture["hops_recorded"] == len(rows)
    assert (capture["hops_dropped"], capture["addon_errors"], capture["write_errors"]) == (0, 0, 0)
    assert query(db, "PRAGMA journal_mode")[0][0] == "delete" and not Path(f"{db}-wal").exists()


# -- SIGKILL under load ---------------------------------------------------------------------------------


@pytest.mark.parametrize("run", range(10))
def test_sigkill_under_load_leaves_a_sound_file_marked_unfinished(run, upstreams, spawn, tmp_path):
    base = upstreams.delaying_app()
    port, db = free_port(), tmp_path / "t.db"
    proc = spawn([PYTHON, "-m", "hoptrace", "proxy", "--db", str(db), "--route", f"svc={base}@{port}"], ready="proxy ready")
    results = asyncio.run(load(f"http://127.0.0.1:{port}", 64, 100 + 20 * run, proc.popen.kill))
    proc.popen.wait(10)
    time.sleep(0.3)  # the row process exits when its pipe closes, after the batch it was writing
    assert any(status == 200 for *_, status in results)
    assert query(db, "PRAGMA integrity_check")[0][0] == "ok"
    assert query(db, "SELECT ended_at FROM captures")[0][0] is None  # never stamped: did not end cleanly
    recorded = query(db, "SELECT count(*), sum(status = 200) FROM hops")[0]
    assert recorded[0] <= sum(1 for *_, status in results if status is not None) + 64
    analyzed = CliRunner().invoke(cli, ["analyze", str(db)])  # read-only, beside the -wal the kill left
    assert analyzed.exit_code == 0 and "did not end cleanly" in analyzed.output, analyzed.output


# -- upstreams that hang or stop half-way ----------------------------------------------------------------


async def _hang(writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(60)


async def _half_head(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Ty")
    await writer.drain()
    writer.close()


async def _half_body(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
    await writer.drain()
    writer.close()


async def _close_silently(writer: asyncio.StreamWriter) -> None:
    writer.close()


async def _stall_body(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
    await writer.drain()
    await asyncio.sleep(60)


def test_hanging_and_half_sent_upstreams_are_classified(upstreams, spawn, tmp_path):
    kinds = {"hang": _hang, "stall": _stall_body, "head": _half_head, "body": _half_body, "silent": _close_silently}
    routes = {name: (upstreams.raw(answer), free_port()) for name, answer in kinds.items()}
    db = tmp_path / "t.db"
    args = [PYTHON, "-m", "hoptrace", "proxy", "--db", str(db), "--upstream-timeout", "1"]
    for name, (url, port) in routes.items():
        args += ["--route", f"{name}={url}@{port}"]
    proc = spawn(args, ready="proxy ready")

    async def fetch(name: str) -> tuple[str, int | None, float]:
        began = time.monotonic()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
                async with session.get(f"http://127.0.0.1:{routes[name][1]}/{name}") as response:
                    await response.read()
                    return name, response.status, time.monotonic() - began
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return name, None, time.monotonic() - began

    async def fetch_all():
        return await asyncio.gather(*(fetch(name) for name in kinds))

    answers = {name: (status, took) for name, status, took in asyncio.run(fetch_all())}
    assert proc.stop() == 0, proc.output
    rows = {row["service"]: row for row in query(db, "SELECT * FROM hops")}
    kinds_seen = {name: rows[name]["error_kind"] for name in kinds}
    assert kinds_seen == {"hang": "timeout", "stall": "timeout", "head": "truncated", "body": "truncated", "silent": "reset"}
    assert "within 1 s" in rows["hang"]["error"] and answers["hang"][1] < 5  # cut near the limit, not at 60 s
    assert answers["hang"][0] == 502 and answers["head"][0] == 502
    assert all(rows[name]["failed"] == 1 for name in kinds)
