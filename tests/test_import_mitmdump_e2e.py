"""A real `mitmdump --mode reverse` writes a flow file and a HAR (`savehar`) of traffic carrying
canary secrets in every credential place and hostile tokens; `hoptrace import` reads both
with 0 addon errors, and no canary reaches the DB, its -wal/-shm, or any export."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest

from .conftest import PYTHON, Proc, free_port

pytestmark = pytest.mark.e2e

MITMDUMP = str(Path(sys.executable).parent / "mitmdump")
SECRET = "a-32-byte-secret-for-hs256-tests!"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def hostile(payload: bytes) -> str:
    """A JWT-shaped token whose payload is exactly these bytes (no JSON library would write them)."""
    header = b64(b'{"alg":"HS256","typ":"JWT"}')
    return f"{header}.{b64(payload)}.{b64(b'signature-bytes')}"


HOSTILE_TOKENS = [
    hostile(b'{"sub":"huge-exp","exp":1e400}'),  # json reads inf
    hostile(b'{"sub":"negative","exp":-1e30,"iat":-5}'),
    hostile(b'{"sub":"nan","exp":NaN,"nbf":Infinity}'),
    hostile(b'{"sub":"\\ud800","exp":"tomorrow","iat":true}'),  # a lone surrogate, a string exp, a bool iat
    hostile(b'{"sub":"big","exp":99999999999999999999999999,"pad":"' + b"x" * 15_000 + b'"}'),
    hostile(b"[" * 3000 + b"]" * 3000),
    hostile(b'{"sub":"\\u0000nul","aud":[1,{"a":null}],"exp":1.5e9}'),
    "eyJ" + "A" * 40_000,  # over the 16 KiB cap
]

CANARIES = {
    "bearer": jwt.encode({"sub": "canary-user", "exp": time.time() + 3600}, SECRET, algorithm="HS256"),
    "header": "CANARY-HEADER-7f3a9c51d2e8",
    "cookie": "CANARY-COOKIE-0b4d6e2a9f13",
    "query": "CANARY-QUERY-5c8e1f7a3b20",
    "form": "CANARY-FORM-9d2b4a6c8e01",
    "json": "CANARY-JSON-3e7f9a1c5b42",
    "basic": "CANARY-BASIC-6a0c2e4f8b13",
}


def canary_requests() -> list[tuple[str, str, dict, bytes]]:
    c = CANARIES
    basic = base64.b64encode(f"alice:{c['basic']}".encode()).decode()
    return [
        ("GET", "/orders", {"Authorization": f"Bearer {c['bearer']}", "X-Internal-Key": c["header"]}, b""),
        ("GET", "/cart", {"Cookie": f"theme=dark; session={c['cookie']}"}, b""),
        ("GET", f"/search?q=shoes&access_token={c['query']}&password={c['query']}", {}, b""),
        ("POST", "/login", {"Content-Type": "application/x-www-form-urlencoded"}, f"username=alice&password={c['form']}".encode()),
        ("POST", "/introspect", {"Content-Type": "application/json"}, json.dumps({"token": c["json"], "client_secret": c["json"]}).encode()),
        ("GET", "/admin", {"Authorization": f"Basic {basic}"}, b""),
    ]


def send(port: int, method: str, path: str, headers: dict, body: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body or None, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def hoptrace(*args) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "hoptrace", *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mitmdump")
    upstream_port, listen = free_port(), free_port()
    upstream = Proc([PYTHON, "-m", "hoptrace.stack.upstreams", "hello", str(upstream_port)])
    flows, har = tmp / "capture.mitm", tmp / "capture.har"
    mitmdump = Proc([
        MITMDUMP, "-q", f"--mode=reverse:http://127.0.0.1:{upstream_port}@{listen}", "--set", "listen_host=127.0.0.1",
        "--set", "connection_strategy=lazy", "-w", str(flows), "--set", f"hardump={har}",
    ])  # fmt: skip
    try:
        upstream.wait_for("listening")
        wait_listening(listen)
        sent = [send(listen, *request) for request in canary_requests()]
        sent += [send(listen, "GET", f"/hostile/{i}", {"Authorization": f"Bearer {token}"}, b"") for i, token in enumerate(HOSTILE_TOKENS)]
    finally:
        mitmdump.stop()
        upstream.stop()
    # aiohttp answers 400 to a header over its 8 KiB limit: those hops are recorded all the same.
    assert sent[:6] == [200] * 6 and set(sent) <= {200, 400}
    service = f"--service=127.0.0.1:{upstream_port}=hello"
    dbs = {}
    for kind, path in (("flows", flows), ("har", har)):
        dbs[kind] = tmp / f"{kind}.db"
        done = hoptrace("import", path, "--db", dbs[kind], service)
        assert done.returncode == 0, done.stderr
        assert "0 addon errors" in done.stdout, done.stdout
    return {"dbs": dbs, "har": har, "flows": flows, "sent": len(sent), "tmp": tmp}


def test_every_request_imported_with_no_addon_error(captured):
    for kind, db in captured["dbs"].items():
        conn = sqlite3.connect(db)
        assert conn.execute("SELECT count(*) FROM hops WHERE service = 'hello'").fetchone()[0] == captured["sent"], kind
        assert conn.execute("SELECT addon_errors, hops_recorded FROM captures").fetchone() == (0, captured["sent"])
        tokens = conn.execute("SELECT exp, iat, nbf, sub FROM tokens").fetchall()
        assert all(v is None or isinstance(v, float) and abs(v) < 1e15 for row in tokens for v in row[:3]), tokens
        subs = {row[0] for row in conn.execute("SELECT sub FROM tokens")}
        assert {"canary-user", "negative", "nan"} <= subs
        conn.close()


def test_the_savehar_file_really_holds_the_canaries_and_hostile_tokens(captured):
    # The test means something only if the input carried the secrets in the clear.
    raw = captured["har"].read_bytes()
    assert all(value.encode() in raw for value in CANARIES.values() if value != CANARIES["basic"])
    assert HOSTILE_TOKENS[0].encode() in raw


def leaked(data: bytes) -> list[str]:
    needles = {name: value for name, value in CANARIES.items()}
    needles["bearer-signature"] = CANARIES["bearer"].rsplit(".", 1)[1]
    needles["basic-b64"] = base64.b64encode(f"alice:{CANARIES['basic']}".encode()).decode()
    return [name for name, value in needles.items() if value.encode() in data]


def test_no_canary_in_the_imported_dbs_or_any_export(captured):
    tmp = captured["tmp"]
    for kind, db in captured["dbs"].items():
        stored = b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists())
        assert leaked(stored) == [], kind
        out = tmp / f"export-{kind}"
        done = hoptrace("export", db, "--har", f"{out}.har", "--otlp", f"{out}.jsonl", "--parquet", out)
        assert done.returncode == 0, done.stderr
        for path in [Path(f"{out}.har"), Path(f"{out}.jsonl"), *out.glob("*.parquet")]:
            assert leaked(path.read_bytes()) == [], path.name
        har = json.loads(Path(f"{out}.har").read_text())
        headers = [h for e in har["log"]["entries"] for h in e["request"]["headers"]]
        assert any(h["name"] == "X-Internal-Key" and h["value"].startswith("[redacted:") for h in headers)
        assert any(h["name"] == "Authorization" and h["value"].startswith("Basic [redacted:") for h in headers)
        posted = [e["request"].get("postData", {}).get("text") for e in har["log"]["entries"]]
        assert "[redacted]" in posted  # bodies were never stored: the placeholder says so
