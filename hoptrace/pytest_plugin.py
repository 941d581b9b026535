"""hoptrace inside a pytest run: record the stack under test, diagnose each failing test.

Inert unless ``--hoptrace STACK.toml`` or ``--hoptrace-route NAME=URL@PORT`` is given.
Then the session runs ``hoptrace proxy`` in front of the stack (a child process, stopped
with SIGINT at the end), every test's requests are found in the trace (exactly, by the
``X-Hoptrace-Test`` header the client fixtures add; else by the test's time window),
a failing test's report gets the findings of its requests and the failing request's hop
tree, ``--hoptrace-fail-on`` fails a test whose requests carry such a finding, and the
terminal summary ends with the session's findings and its interaction coverage.

Nothing heavy is imported unless the plugin is switched on: pandas, the analyzer and
the HTTP clients load on first use.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

HEADER = "X-Hoptrace-Test"
"""The header the client fixtures add: the test's node id. The proxy keeps it (it is no
secret), so it is in ``hops.request_headers`` of the request's entry hop."""

# How long a test's report may wait for the proxy to write the test's hops. The
# recorder batches flows for up to 0.1 s before a write (addons/_writer.py linger).
_FLUSH_TIMEOUT = 5.0
_SETTLE = 0.3
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 30.0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hoptrace", "hoptrace: record the stack under test, diagnose failures between services")
    option = group.addoption
    option(
        "--hoptrace",
        dest="hoptrace_stack",
        metavar="STACK.toml",
        help="Run `hoptrace proxy` with this stack file (its [routes.NAME] tables) for the session.",
    )
    option(
        "--hoptrace-route",
        dest="hoptrace_routes",
        action="append",
        default=[],
        metavar="NAME=URL@PORT",
        help="A route of the proxy, instead of a stack file (repeatable).",
    )
    option(
        "--hoptrace-entry", metavar="NAME", help="The route client requests enter by (default: the stack file's, or the first)."
    )
    option("--hoptrace-db", metavar="PATH", help="Trace file to record into (default: one under pytest's tmp folder).")
    option(
        "--hoptrace-fail-on",
        metavar="KIND|SEVERITY[,...]",
        help="Fail a test whose requests carry a finding of these kinds or severities, e.g. expired_mid_flow,error.",
    )
    option("--hoptrace-report", metavar="FILE.html", help="Write the session's HTML report, findings labelled with their test.")
    option("--hoptrace-openapi", action="append", default=[], metavar="SERVICE=FILE",
           help="An OpenAPI 3 document of a service, for the coverage in the summary (repeatable).")  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    opt = config.option
    if not (opt.hoptrace_stack or opt.hoptrace_routes):
        return
    if hasattr(config, "workerinput"):
        # Every xdist worker would start its own proxy on the same ports.
        raise pytest.UsageError("--hoptrace does not run under pytest-xdist workers; run the suite with -n 0")
    from hoptrace._errors import HoptraceError

    try:
        plugin = CapturePlugin(config, Settings.from_options(opt))
    except HoptraceError as exc:
        raise pytest.UsageError(f"hoptrace: {exc}") from None
    config.pluginmanager.register(plugin, CapturePlugin.NAME)


# -- settings ------------------------------------------------------------------------


@dataclass
class Settings:
    routes: list  # hoptrace.addons._writer.Route
    entry: str
    db: Path | None
    fail_on: frozenset[str]
    report: Path | None
    openapi: list  # hoptrace.coverage.Operation
    command: list[str] | None

    @classmethod
    def from_options(cls, opt) -> Settings:
        from hoptrace._openapi import load_specs
        from hoptrace.proxy.routes import load_stack_file, parse_route

        entry, db, command = opt.hoptrace_entry, opt.hoptrace_db, None
        if opt.hoptrace_stack:
            if opt.hoptrace_routes:
                raise _bad("give either --hoptrace STACK.toml or --hoptrace-route, not both")
            stack = load_stack_file(opt.hoptrace_stack)
            routes, entry, db = stack.routes, entry or stack.entry, db or stack.db
            command = _stack_command(Path(opt.hoptrace_stack))
        else:
            routes = [parse_route(spec) for spec in opt.hoptrace_routes]
        entry = entry or routes[0].name
        if entry not in {r.name for r in routes}:
            raise _bad(f"entry {entry!r} is not a route; routes are {', '.join(r.name for r in routes)}")
        return cls(
            routes=routes,
            entry=entry,
            db=Path(db) if db else None,
            fail_on=_fail_on(opt.hoptrace_fail_on),
            report=Path(opt.hoptrace_report) if opt.hoptrace_report else None,
            openapi=load_specs(opt.hoptrace_openapi),
            command=command,
        )


def _bad(message: str):
    from hoptrace._errors import RouteError

    return RouteError(message)


def _stack_command(path: Path) -> list[str] | None:
    """The stack file's optional ``command`` (a string or a list): what starts the stack."""
    command = tomllib.loads(path.read_text(encoding="utf-8")).get("command")
    if command is None:
        return None
    if isinstance(command, str) and command.strip():
        return shlex.split(command)
    if isinstance(command, list) and command and all(isinstance(part, str) for part in command):
        return command
    raise _bad(f"{path}: command must be a string or a list of strings")


def _fail_on(value: str | None) -> frozenset[str]:
    from hoptrace.analyzer._cli import _detector_kinds
    from hoptrace.analyzer._types import SEVERITIES

    KINDS = _detector_kinds()
    names = frozenset(v.strip() for v in (value or "").split(",") if v.strip())
    if unknown := sorted(names - set(KINDS) - set(SEVERITIES)):
        raise _bad(
            f"--hoptrace-fail-on: {unknown[0]!r} is neither a finding kind ({', '.join(KINDS)})"
            f" nor a severity ({', '.join(SEVERITIES)})"
        )
    return names


# -- the capture -----------------------------------------------------------------------


class _Child:
    """A child process whose combined output is collected by a thread as it runs."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.popen = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_until(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.popen.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = " | ".join(self.lines[-3:]) or "no output"
                pytest.exit(f"hoptrace: {what} did not start ({tail})", returncode=pytest.ExitCode.USAGE_ERROR)
            time.sleep(0.05)

    def stop(self) -> int:
        """SIGINT, as Ctrl-C would; SIGKILL if it does not end within the timeout."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
        try:
            code = self.popen.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            code = self.popen.wait()
        self._reader.join(5)
        return code


def _accepts(url: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port or 80), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Capture:
    """What the ``hoptrace`` fixture gives a test: where to send requests, and the trace."""

    urls: dict[str, str]
    """Per route name, the proxy's listener: what the client and the services should call."""
    upstreams: dict[str, str]
    """Per route name, where the service itself listens (what the proxy forwards to)."""
    entry: str
    db: Path
    header: str = HEADER
    _plugin: CapturePlugin | None = field(default=None, repr=False)

    @property
    def entry_url(self) -> str:
        return self.urls[self.entry]

    def analysis(self):
        """The analysis of everything recorded so far in this session (waits for the proxy's writes)."""
        from hoptrace.analyzer import analyze

        self._plugin.wait_for_writes(time.time())
        return analyze(self.db, since=self._plugin.started_at)


@dataclass
class RequestsOfTest:
    """The requests of one test: root hop ids, how they were found, its window."""

    nodeid: str
    start: float
    end: float
    roots: list[int] = field(default_factory=list)
    by: str = "window"
    foreign: int = 0  # requests inside its window that carry another test's header
    complete: bool = True  # False: the proxy had not written all of them when the test was judged
    findings: list[dict] = field(default_factory=list)


class CapturePlugin:
    NAME = "hoptrace-capture"

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.proxy: _Child | None = None
        self.stack: _Child | None = None
        self.capture: Capture | None = None
        self.capture_id: int | None = None
        self.started_at = time.time()
        self.sent: Counter[str] = Counter()  # responses the client fixtures received, per test
        self.tests: dict[str, RequestsOfTest] = {}
        self.analysis = None
        self.proxy_summary = ""
        self.problem: str | None = None
        self._lock = threading.Lock()

    # hooks, in the order pytest calls them

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        s = self.settings
        db = s.db or self._tmp_folder() / "traces.db"
        routes = [f"--route={r.name}={r.upstream}@{r.listen_port}" for r in s.routes]
        # The stack's command and the proxy start side by side: both take seconds to import.
        if s.command:
            self.stack = _Child(s.command)
        self.proxy = _Child([sys.executable, "-m", "hoptrace", "proxy", "--db", str(db), "--entry", s.entry, *routes])
        self.proxy.wait_until(lambda: any("proxy ready" in ln for ln in self.proxy.lines), _START_TIMEOUT, "hoptrace proxy")
        if self.stack is not None:
            self.stack.wait_until(lambda: all(_accepts(r.upstream) for r in s.routes), _START_TIMEOUT, "the stack's command")
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            self.capture_id = conn.execute("SELECT max(id) FROM captures").fetchone()[0]
        self.capture = Capture(
            urls={r.name: f"http://127.0.0.1:{r.listen_port}" for r in s.routes},
            upstreams={r.name: r.upstream for r in s.routes},
            entry=s.entry, db=db, _plugin=self,
        )  # fmt: skip

    def _tmp_folder(self) -> Path:
        # pytest's own tmp folder (kept for the last few runs, like tmp_path's) unless
        # its tmpdir plugin is off.
        factory = getattr(self.config, "_tmp_path_factory", None)
        return factory.mktemp("hoptrace") if factory is not None else Path(tempfile.mkdtemp(prefix="hoptrace-"))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        self.tests[item.nodeid] = RequestsOfTest(item.nodeid, time.time(), time.time())

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        outcome = yield
        report: pytest.TestReport = outcome.get_result()
        if report.when == "teardown" or (report.when == "setup" and report.passed):
            return
        test = self.tests[item.nodeid]
        test.end = time.time()
        wanted = report.failed or self.settings.fail_on or getattr(self.config.option, "xmlpath", None)
        if not wanted:
            return
        from hoptrace import _pytest_report as diag
        from hoptrace._errors import HoptraceError

        test.complete = self.wait_for_writes(test.end, item.nodeid, self.sent.get(item.nodeid, 0))
        try:
            analysis = self._analyze(since=test.start)
        except HoptraceError as exc:  # the trace cannot be read: say so, keep the test's own outcome
            report.sections.append(("hoptrace: this test's requests", f"hoptrace could not analyze the trace: {exc}"))
            return
        diag.attribute(test, self._entry_hops(), analysis)
        item.user_properties.extend(diag.properties(test))
        if report.failed:
            report.sections.append(("hoptrace: this test's requests", diag.section(test, analysis)))
        elif report.when == "call" and (hits := diag.matching(test, self.settings.fail_on)):
            report.outcome = "failed"
            report.longrepr = diag.fail_on_message(test, hits, self.settings.fail_on, analysis)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        for child in (self.stack, self.proxy):
            if child is not None:
                child.stop()
        if self.capture is None:  # the proxy never started
            return
        summary = next((ln for ln in reversed(self.proxy.lines) if "hops recorded" in ln), "no summary from the proxy")
        self.proxy_summary = summary.removeprefix("hoptrace proxy: ").partition(" -> ")[0]
        from hoptrace import _pytest_report as diag
        from hoptrace._errors import HoptraceError

        try:
            self.analysis = self._analyze(since=self.started_at)
            entry_hops = self._entry_hops()
            for test in self.tests.values():
                diag.attribute(test, entry_hops, self.analysis)
            diag.write_attribution(self.tests.values(), self.attribution_path)
            if self.settings.report is not None:
                diag.write_report(self.analysis, self.tests.values(), self.settings.report)
        except HoptraceError as exc:  # no usable trace, or no hops for a report: one line in the summary
            self.problem = str(exc)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.capture is None:
            return
        from hoptrace import _pytest_report as diag

        terminalreporter.write_sep("=", "hoptrace")
        lines = diag.summary(self, self.analysis) if self.analysis is not None else []
        for line in [*lines, *([f"hoptrace: {self.problem}"] if self.problem else [])]:
            terminalreporter.write_line(line)

    @property
    def attribution_path(self) -> Path:
        """Beside the trace: each test's requests and findings, as JSON, once the session ended."""
        return self.capture.db.with_name(self.capture.db.name + ".tests.json")

    # the trace

    def count_response(self, nodeid: str) -> None:
        with self._lock:
            self.sent[nodeid] += 1

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.capture.db}?mode=ro", uri=True, timeout=5)

    def _entry_hops(self) -> list[tuple[int, float, str | None]]:
        """(id, started_at, the test header's value) of every request of this capture."""
        query = (
            "SELECT h.id, h.started_at, (SELECT json_extract(j.value, '$[1]') FROM json_each(h.request_headers) j"
            " WHERE lower(json_extract(j.value, '$[0]')) = lower(?)) FROM hops h WHERE h.capture_id = ? AND h.service = ?"
        )
        with contextlib.closing(self._connect()) as conn:
            return conn.execute(query, (HEADER, self.capture_id, self.settings.entry)).fetchall()

    def wait_for_writes(self, until: float, nodeid: str | None = None, expected: int = 0) -> bool:
        """Wait (at most _FLUSH_TIMEOUT) until the DB holds the flows the proxy saw up to ``until``.

        Two conditions. ``expected`` (responses the header fixtures received for test
        ``nodeid``) of the test's requests are recorded: exact. And, for other clients:
        the recorder builds a batch at most its linger (0.1 s) after a flow arrives and
        stamps the capture row with the flows it had seen then, so the ``hops_seen`` read
        _SETTLE after ``until`` covers the flows before ``until``; they are written once
        ``hops_recorded + hops_dropped`` reaches it (this holds under continuous traffic,
        where the two are never equal). False when the wait ran out.
        """
        deadline = time.monotonic() + _FLUSH_TIMEOUT
        target = None
        while time.monotonic() < deadline:
            if time.time() >= until + _SETTLE:
                seen, written = self._counters()
                target = seen if target is None else target
                tagged = sum(1 for _, _, tag in self._entry_hops() if tag == nodeid) if expected else 0
                if written >= target and tagged >= expected:
                    return True
            time.sleep(0.05)
        return False

    def _counters(self) -> tuple[int, int]:
        """(flows the recorder had seen, flows written or dropped) as its capture row says."""
        with contextlib.closing(self._connect()) as conn:
            return conn.execute(
                "SELECT hops_seen, hops_recorded + hops_dropped FROM captures WHERE id = ?", (self.capture_id,)
            ).fetchone()

    def _analyze(self, since: float):
        from hoptrace.analyzer import analyze

        # Requests that started before `since` are not this test's; leaving them out keeps
        # a report's cost to the test's own traffic.
        return analyze(self.capture.db, since=since - 0.001)


# -- fixtures --------------------------------------------------------------------------


def _plugin(config: pytest.Config) -> CapturePlugin | None:
    return config.pluginmanager.get_plugin(CapturePlugin.NAME)


@pytest.fixture(scope="session")
def hoptrace(request: pytest.FixtureRequest) -> Capture:
    """The session's capture: listener URLs per route (``urls``), ``entry_url``, ``db``, ``analysis()``."""
    plugin = _plugin(request.config)
    if plugin is None or plugin.capture is None:
        pytest.fail("the hoptrace fixture needs pytest --hoptrace STACK.toml (or --hoptrace-route NAME=URL@PORT)", pytrace=False)
    return plugin.capture


@pytest.fixture
def hoptrace_headers(request: pytest.FixtureRequest) -> dict[str, str]:
    """``{"X-Hoptrace-Test": <node id>}``: add it to any HTTP client for exact attribution."""
    return {HEADER: request.node.nodeid}


def _counter(request: pytest.FixtureRequest):
    plugin, nodeid = _plugin(request.config), request.node.nodeid
    return (lambda: plugin.count_response(nodeid)) if plugin is not None else (lambda: None)


@pytest.fixture
def hoptrace_requests(request: pytest.FixtureRequest, hoptrace_headers: dict[str, str]):
    """A ``requests.Session`` that marks every request with this test's header."""
    import requests

    counted = _counter(request)
    with requests.Session() as session:
        session.headers.update(hoptrace_headers)
        session.hooks["response"].append(lambda response, *args, **kwargs: counted())
        yield session


@pytest.fixture
def hoptrace_httpx(request: pytest.FixtureRequest, hoptrace_headers: dict[str, str]):
    """An ``httpx.Client`` that marks every request with this test's header."""
    import httpx

    counted = _counter(request)
    with httpx.Client(headers=hoptrace_headers, event_hooks={"response": [lambda response: counted()]}) as client:
        yield client


@pytest.fixture
def hoptrace_aiohttp(request: pytest.FixtureRequest, hoptrace_headers: dict[str, str]):
    """A factory of ``aiohttp.ClientSession`` that mark every request with this test's header.

    Call it inside the test's event loop: ``async with hoptrace_aiohttp() as session: ...``.
    """
    import aiohttp

    counted = _counter(request)

    async def on_end(session, context, params) -> None:
        counted()

    def make(**kwargs: Any) -> aiohttp.ClientSession:
        trace = aiohttp.TraceConfig()
        trace.on_request_end.append(on_end)
        headers = {**hoptrace_headers, **kwargs.pop("headers", {})}
        return aiohttp.ClientSession(headers=headers, trace_configs=[trace, *kwargs.pop("trace_configs", [])], **kwargs)

    return make
