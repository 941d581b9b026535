"""`hoptrace ui` on hostile trace files: every API answer is an answer (200, or a one-line 400,
404 or 503), never a 500, whatever the file holds. The same mutants as tests/test_hostile_files.py
(two of each class), each served by a real server in this process and asked every path."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

from hoptrace._errors import TraceFileError
from hoptrace.ui import start_ui

from .hostile_files import mutants
from .test_ui_server import call

SAMPLE = Path(__file__).resolve().parent.parent / "sample_traces" / "checkout-expiry.db"
API = ("/api/status", "/api/facets", "/api/requests", "/api/requests?sort=severity&q=a", "/api/requests?status=4xx",
       "/api/sessions", "/api/latency", "/api/graph", "/api/request/76", "/api/hop/74", "/api/hop/1",
       "/api/compare?a=76&b=71", "/api/session/0")  # fmt: skip
ANSWERS = {200, 400, 404, 503}
SETTLE_S = 60  # a healthy sample is analysed in about a second


def _settled(url: str) -> dict:
    """The status once the analysis is done or has failed (``last_error``)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        status = json.loads(call(url + "/api/status")[2])
        if not status["dbs"][0]["analysing"] or status["last_error"] or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def test_every_api_answer_on_a_hostile_file_is_an_answer_never_a_500(tmp_path):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    refused, served, codes = [], [], set()
    try:
        for path, kind in mutants(SAMPLE, tmp_path, 10):
            try:
                url, runner = asyncio.run_coroutine_threadsafe(start_ui([path], "127.0.0.1", 0, live=False), loop).result(60)
            except TraceFileError as exc:  # the command's one line, exit 2 (tests/test_ui_server.py)
                refused.append((kind, str(exc)))
                continue
            try:
                url = url.rstrip("/")
                status = _settled(url)
                assert not status["dbs"][0]["analysing"] or status["last_error"], f"{path.name}: never settled"
                for api in API:
                    code, _, body = call(url + api)
                    assert code in ANSWERS, f"{path.name} ({kind}) {api}: {code} {body[:300]!r}"
                    answer = json.loads(body)  # JSON, and for an error one line
                    if code != 200:
                        assert "\n" not in answer["error"], f"{path.name} {api}: {answer}"
                    codes.add(code)
                served.append(kind)
            finally:
                asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    assert served, f"every mutant refused at start: {refused}"
    assert 200 in codes and codes & {400, 404}  # the mutants still serve, and the unknown ids are refused
    assert {"invalid_utf8", "absurd_values"} <= set(served)
