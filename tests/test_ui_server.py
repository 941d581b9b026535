"""The `hoptrace ui` server as a browser's peer sees it: security headers on every answer, GET only,
its own Host only, bad parameters a one-line 400 (never a 500), and the command's bad input exit 2."""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from importlib.resources import files
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hoptrace.cli import cli
from hoptrace.ui import start_ui
from hoptrace.ui._server import CSP

SAMPLE = Path(__file__).resolve().parent.parent / "sample_traces" / "checkout-expiry.db"
PATHS = ("/", "/static/app.js", "/static/app.css", "/api/status", "/api/facets", "/api/requests", "/api/sessions",
         "/api/latency", "/api/graph", "/api/request/76", "/api/hop/74", "/api/compare?a=76&b=71", "/api/session/0",
         "/api/request/999999", "/api/requests?limit=x", "/static/nope.js", "/nope")  # fmt: skip


@pytest.fixture(scope="module")
def served():
    """`start_ui` on the sample in a thread's event loop, as `hoptrace proxy --ui` would run it."""
    loop = asyncio.new_event_loop()
    started: dict = {}
    ready = threading.Event()

    async def main():
        started["url"], started["runner"] = await start_ui([SAMPLE], "127.0.0.1", 0, live=False)
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(main(), loop).result(60)
    assert ready.is_set()
    url = started["url"].rstrip("/")
    for _ in range(600):  # start_ui returns with the request list; the analysis follows in the background
        if not json.loads(call(url + "/api/status")[2])["dbs"][0]["analysing"]:
            break
        time.sleep(0.1)
    yield url
    asyncio.run_coroutine_threadsafe(started["runner"].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def call(url: str, method: str = "GET", headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_every_answer_carries_the_security_headers(served):
    assert served.startswith("http://127.0.0.1:")
    for path in PATHS:
        status, headers, _ = call(served + path)
        assert headers["Content-Security-Policy"] == CSP, path
        assert "script-src 'self'" in CSP and "unsafe" not in CSP
        assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
        if path.startswith("/api/"):
            assert headers["Content-Type"].startswith("application/json") and headers["Cache-Control"] == "no-store"
        assert status in (200, 400, 404)


def test_only_get_from_this_host(served):
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, _, body = call(served + "/api/requests", method)
        assert status == 405 and "only reads" in json.loads(body)["error"]
    status, _, _ = call(served + "/api/status", headers={"Host": "attacker.example:80"})
    assert status == 421  # a DNS-rebinding page gets nothing
    assert call(served + "/api/status", headers={"Host": "localhost"})[0] == 200


def test_the_page_has_no_inline_script_and_the_script_never_writes_html(served):
    _, _, page = call(served + "/")
    scripts = re.findall(rb"<script[^>]*>(.*?)</script>", page, re.DOTALL)
    assert scripts == [b""] and b'src="/static/app.js"' in page and b"style=" not in page
    lines = (files("hoptrace.ui") / "static" / "app.js").read_text().splitlines()
    source = "\n".join(line for line in lines if not line.lstrip().startswith("//"))  # the header comment names innerHTML
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function", source)


def test_bad_parameters_are_a_one_line_400(served):
    for path in ("/api/requests?limit=0", "/api/requests?status=6xx", "/api/requests?since=yesterday",
                 "/api/requests?evil=1", "/api/hop/-1", "/api/request/1e9", "/api/compare?a=1"):  # fmt: skip
        status, _, body = call(served + path)
        assert status in (400, 404), path
        message = json.loads(body)["error"]
        assert message and "\n" not in message and "Traceback" not in message


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["q", "service", "status", "kind", "severity", "subject", "since", "until", "sort",
                                        "order", "offset", "limit", "db"]), st.text(max_size=40), max_size=5))  # fmt: skip
def test_any_request_list_query_is_answered_200_or_400(served, params):
    status, _, body = call(f"{served}/api/requests?{urllib.parse.urlencode(params)}")
    answer = json.loads(body)
    assert (status, "items" in answer) == (200, True) or (status == 400 and answer["error"])


def test_bad_trace_files_exit_2_with_one_line(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all" * 100)
    runner = CliRunner()
    for args in (["ui", str(tmp_path / "missing.db")], ["ui", str(junk)], ["ui", str(SAMPLE), "--port", "70000"], ["ui"]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 2, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_a_taken_port_exits_2(served):
    port = urllib.parse.urlsplit(served).port
    result = CliRunner().invoke(cli, ["ui", str(SAMPLE), "--port", str(port), "--no-live"])
    assert result.exit_code == 2 and "cannot listen" in result.output


@settings(max_examples=25, deadline=None)
@given(st.binary(max_size=2048), st.sampled_from([b"", b"SQLite format 3\x00"]))
def test_any_file_that_is_not_a_trace_db_exits_2_with_one_line(content, prefix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bad.db"
        path.write_bytes(prefix + content)
        result = CliRunner().invoke(cli, ["ui", str(path), "--port", "0", "--no-live"])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and str(path) in result.output
