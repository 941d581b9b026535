"""Secrets in places the name-based rules used to miss: multipart fields, JWTs without an `eyJ` prefix,
OAuth / SAS / SAML parameter names. Canaries must be in none of the DB, -wal, -shm."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from urllib.parse import parse_qsl

from hypothesis import given
from hypothesis import strategies as st
from mitmproxy.test import taddons, tflow, tutils

from hoptrace.addons import Recorder
from hoptrace.addons._redact import SENSITIVE_PARAM, redacted
from hoptrace.addons._redact import query as redact_query
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


# -- any query string: redacted, and every byte kept ------------------------------------------------

KEY = b"k" * 32
# Any bytes but the separators, "%" escapes included (valid or not): names and values as they come off the wire.
_part = st.binary(max_size=12).map(lambda b: b.replace(b"&", b"").replace(b"=", b"").replace(b";", b"").replace(b"#", b""))


@given(pairs=st.lists(st.tuples(_part, _part), max_size=5), secret=st.from_regex(r"[A-Za-z0-9]{16,24}", fullmatch=True))
def test_any_query_string_is_redacted_and_keeps_every_other_byte(pairs, secret):
    raw = b"&".join([n + b"=" + v for n, v in pairs] + [b"access_token=" + secret.encode()])
    text = raw.decode("utf-8", "surrogateescape")  # what mitmproxy's Request.path holds
    stored = redact_query(KEY, text)  # raised on any byte that is not UTF-8, costing the hop its details
    assert stored.isascii() and secret not in stored
    before = parse_qsl(text, keep_blank_values=True, errors="surrogateescape")
    after = parse_qsl(stored, keep_blank_values=True, errors="surrogateescape")
    assert [name for name, _ in after] == [name for name, _ in before]
    for (name, value), (_, kept) in zip(before, after, strict=True):
        if SENSITIVE_PARAM.search(name):
            assert kept == redacted(KEY, value)
        elif not find_jwts(value):
            assert kept == value
