"""`hoptrace proxy --ui`: the web view of the capture, served by a child of the proxy while it records."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from .conftest import free_port


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@pytest.mark.e2e
def test_proxy_ui_lists_requests_while_they_are_recorded_and_stops_with_the_proxy(upstream, proxy):
    ui_port = free_port()
    proc, listen, _db = proxy({"svc": upstream()}, "--ui", "--ui-port", str(ui_port))
    api = f"http://127.0.0.1:{ui_port}/api/requests"
    paths = [f"/order/{i}" for i in range(3)]
    for path in paths:
        urllib.request.urlopen(listen["svc"] + path, timeout=5).read()
    listed: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(listed) < len(paths):
        try:
            listed = [item["endpoint"] for item in _get_json(api)["items"]]
        except (urllib.error.URLError, ConnectionError):
            pass  # the view is still starting
        time.sleep(0.3)
    assert sorted(listed) == sorted(f"GET {p}" for p in paths), listed
    assert proc.stop() == 0, proc.output
    assert "3 hops recorded" in proc.output
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        _get_json(api)  # the view went with the proxy
