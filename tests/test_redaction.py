"""Secrets in places the name-based rules used to miss: multipart fields, JWTs without an `eyJ` prefix,
OAuth / SAS / SAML parameter names. Canaries must be in none of the DB, -wal, -shm."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from mitmproxy.test import taddons, tflow, tutils

from hoptrace.addons import Recorder
from hoptrace.addons._tokens import decode, find_jwts

from .conftest import query


def b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


# A JWT whose header JSON is pretty-printed: its first segment starts "ewog" ('{\n'), not "eyJ".
PRETTY_JWT = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}, indent=2))}.{b64(json.dumps({'sub': 'pretty'}))}.Q0FOQVJZLXByZXR0eS1zaWduYXR1cmU"


def every_file(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists())


def test_jwts_are_found_by_structure_not_prefix():
    assert PRETTY_JWT.startswith("ewog")
    assert find_jwts(f"id={PRETTY_JWT}; other=www.example.com.") == [PRETTY_JWT]
    assert decode(PRETTY_JWT).kind == "jwt" and decode(PRETTY_JWT).sub == "pretty"
    assert find_jwts("v1.2.3 and api.internal.example") == []


def test_redaction_gaps_closed_with_bodies_stored(tmp_path):
    canaries = {
        "multipart password": "CANARY-multipart-password-1",
        "multipart client_secret": "CANARY-multipart-secret-2",
        "multipart state": "CANARY-multipart-state-3",
        "query sig": "CANARY-query-sig-4",
        "query state": "CANARY-query-state-5",
        "query SAMLResponse": "CANARY-query-saml-6",
        "query code": "CANARY-query-code-7",
        "form assertion": "CANARY-form-assertion-8",
        "json signature": "CANARY-json-signature-9",
        "json client_secret": "CANARY-json-secret-10",
        "json code": "CANARY-json-code-11",
    }
    boundary = "XyZ-Boundary"
    multipart = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"user\"\r\n\r\nbob\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"password\"\r\n\r\n{canaries['multipart password']}\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"client_secret\"\r\n\r\n{canaries['multipart client_secret']}\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"state\"\r\n\r\n{canaries['multipart state']}\r\n"
        f"--{boundary}--\r\n"
    )
    upload = tflow.tflow(req=tutils.treq(
        path=f"/cb?sig={canaries['query sig']}&state={canaries['query state']}&SAMLResponse={canaries['query SAMLResponse']}&code={canaries['query code']}&page=2".encode(),
        content=multipart.encode(),
    ), resp=True)  # fmt: skip
    upload.request.headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    upload.request.headers["X-Forwarded-Identity"] = f"by {PRETTY_JWT}"
    form = tflow.tflow(req=tutils.treq(content=f"grant=jwt&assertion={canaries['form assertion']}".encode()), resp=True)
    form.request.headers["Content-Type"] = "application/x-www-form-urlencoded"
    body = {"signature": canaries["json signature"], "client_secret": canaries["json client_secret"], "code": canaries["json code"], "n": 1}
    as_json = tflow.tflow(req=tutils.treq(content=json.dumps(body).encode()), resp=True)
    as_json.request.headers["Content-Type"] = "application/json"

    db = tmp_path / "t.db"
    recorder = Recorder()
    with taddons.context(recorder) as tctx:
        tctx.configure(recorder, hoptrace_db=str(db), hoptrace_store_bodies=True)
        for flow in (upload, form, as_json):
            recorder.requestheaders(flow)
            recorder.response(flow)
        assert recorder.writer.flush()
        while_open = every_file(db)  # the WAL is live now
        recorder.close()
    for stored in (while_open, every_file(db)):
        for what, canary in canaries.items():
            assert canary.encode() not in stored, what
        assert PRETTY_JWT.rsplit(".", 1)[1].encode() not in stored and PRETTY_JWT.encode() not in stored

    hop = query(db, "SELECT * FROM hops ORDER BY id")[0]
    assert "user\"\r\n\r\nbob" in hop["request_body"] and "[redacted:" in hop["request_body"]  # kept what is harmless
    assert "page=2" in hop["query"] and hop["query"].count("[redacted:") == 4
    assert "by [redacted:" in dict(json.loads(hop["request_headers"]))["X-Forwarded-Identity"]
    assert query(db, "SELECT count(*) FROM tokens WHERE sub = 'pretty'")[0][0] == 1  # still decoded, by fingerprint


def test_a_multipart_body_that_does_not_parse_is_not_stored(tmp_path):
    flow = tflow.tflow(req=tutils.treq(content=b"--b\r\nno disposition\r\n\r\nCANARY-unparsed-12\r\n--b--\r\n"), resp=True)
    flow.request.headers["Content-Type"] = "multipart/form-data; boundary=b"
    db = tmp_path / "t.db"
    recorder = Recorder()
    with taddons.context(recorder) as tctx:
        tctx.configure(recorder, hoptrace_db=str(db), hoptrace_store_bodies=True)
        recorder.requestheaders(flow)
        recorder.response(flow)
        recorder.close()
    assert b"CANARY-unparsed-12" not in every_file(db)
    assert query(db, "SELECT request_body FROM hops")[0][0] == "[redacted: multipart body that does not parse]"
