"""Real processes on 127.0.0.1 for the capture-path tests: upstreams, `hoptrace proxy`, mitmdump."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from hoptrace._ports import free_port

PYTHON = sys.executable


@contextmanager
def alone_among_heavy_tests(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Held while a test drives load through several processes (a capture benchmark, proxy workers)
    or records a scenario whose analysis rests on its timing, so that no two such tests share the
    cores. The xdist workers of one run share the lock file beside their temporary folders.

    The connection tier's guesses for identical concurrent token-less calls follow timing: a
    20-user recording made during a full suite run fell to 97.8 % of links right, and one made
    beside four busy loops to 98.25 %.
    """
    lock = tmp_path_factory.getbasetemp().parent / "heavy-tests.lock"
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)


@pytest.fixture
def heavy(tmp_path_factory) -> Iterator[None]:
    """:func:`alone_among_heavy_tests` for the whole test."""
    with alone_among_heavy_tests(tmp_path_factory):
        yield


class Proc:
    """A child process whose combined output is collected as it runs."""

    def __init__(self, args: list[str], cwd: Path | None = None) -> None:
        self.args = args
        self.popen = subprocess.Popen(
            args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output:
                return
            if self.popen.poll() is not None:
                self._reader.join(2)
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.args[:4]} did not print {text!r} (exit {self.popen.poll()}):\n{self.output}")

    def stop(self, signum: int = signal.SIGINT, timeout: float = 30.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            code = self.popen.wait()
        self._reader.join(5)
        return code


@pytest.fixture
def spawn():
    """Start processes that are killed at teardown whatever the test did."""
    started: list[Proc] = []

    def start(args: list[str], ready: str | None = None, timeout: float = 30.0) -> Proc:
        proc = Proc(args)
        started.append(proc)
        if ready:
            proc.wait_for(ready, timeout)
        return proc

    yield start
    for proc in started:
        if proc.popen.poll() is None:
            proc.popen.kill()
            proc.popen.wait()


@pytest.fixture
def upstream(spawn):
    """Start one of the small upstreams of hoptrace.stack.upstreams; returns its base URL."""

    def start(kind: str = "hello") -> str:
        port = free_port()
        spawn([PYTHON, "-m", "hoptrace.stack.upstreams", kind, str(port)], ready="listening")
        return f"http://127.0.0.1:{port}"

    return start


@pytest.fixture
def proxy(spawn, tmp_path):
    """Start `hoptrace proxy` with routes {name: upstream_url}; returns (proc, {name: listen_url}, db)."""

    def start(routes: dict[str, str], *extra: str, db: Path | None = None):
        db = db or tmp_path / "traces.db"
        listen = {name: free_port() for name in routes}
        args = [PYTHON, "-m", "hoptrace", "proxy", "--db", str(db), *extra]
        for name, url in routes.items():
            args += ["--route", f"{name}={url}@{listen[name]}"]
        proc = spawn(args, ready="proxy ready")
        return proc, {name: f"http://127.0.0.1:{port}" for name, port in listen.items()}, db

    return start


def command_line(pid: int) -> list[str]:
    """The command line a running process was started (or last exec'd) with."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def children(pid: int) -> list[int]:
    """The ids of a running process's child processes."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended since the listing
            found += [int(line) for line in (task / "children").read_text().split()]
    return found


def query(db: Path, sql: str, *params) -> list[sqlite3.Row]:
    """Rows of one query on a trace file, opened and closed around it."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def file_bytes(db: Path) -> bytes:
    """The DB file and its WAL together: a secret must be in neither."""
    return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())


def record_scenario(name: str, folder: Path):
    """One scenario of the sample stack recorded through the real `hoptrace proxy`: (recording, stack config, db)."""
    import asyncio

    from hoptrace.stack.scenarios import SCENARIOS, record

    scenario = SCENARIOS[name]
    config = scenario.stack_config()
    db = folder / "traces.db"
    return asyncio.run(record(db, config, scenario.drive)), config, db
