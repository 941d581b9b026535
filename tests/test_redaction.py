"""Secrets in places the name-based rules used to miss: multipart fields, JWTs without an `eyJ` prefix,
OAuth / SAS / SAML parameter names, a JWT in a path, a token in a URL's fragment, short names (pwd, otp).
Canaries must be in none of the DB, -wal, -shm."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from hypothesis import given
from hypothesis import strategies as st
from mitmproxy.test import taddons, tflow, tutils

from hoptrace.addons import Recorder
from hoptrace.addons._hop import snapshot, snapshot_row
from hoptrace.addons._redact import SENSITIVE_PARAM, header_value, json_body, redacted
from hoptrace.addons._redact import query as redact_query
from hoptrace.addons._tokens import decode, find_jwts
from hoptrace.analyzer._prepare import normalise_path

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


# -- URLs: a JWT in a path, a token in a fragment, secrets under short names ------------------------------

_segment = st.from_regex(r"[A-Za-z0-9._~-]{1,12}", fullmatch=True)
_secret = st.from_regex(r"[A-Za-z0-9]{16,24}", fullmatch=True)
_plain_pairs = st.lists(st.tuples(st.sampled_from(["x", "page", "lang", "next"]), _segment), max_size=3)


def _jwt(secret: str) -> str:
    return f"{b64(json.dumps({'alg': 'HS256'}))}.{b64(json.dumps({'sub': secret}))}.{b64(secret)}"


def _pairs(pairs) -> str:
    return "&".join(f"{name}={value}" for name, value in pairs)


@given(segments=st.lists(_segment, max_size=3), jwt_at=st.integers(0, 3), query_pairs=_plain_pairs,
       fragment_pairs=_plain_pairs, fragment_name=st.sampled_from(["access_token", "id_token", "code", "state"]),
       secret=_secret, header=st.sampled_from(["Location", "Referer", "Content-Location"]))  # fmt: skip
def test_a_url_header_keeps_no_secret_of_its_path_query_or_fragment(segments, jwt_at, query_pairs, fragment_pairs, fragment_name, secret, header):
    """OAuth's implicit flow answers ``Location: https://app/cb#access_token=...``: the fragment was read as part of the last query value."""
    token = _jwt(secret)
    path = "/" + "/".join([*segments[:jwt_at], token, *segments[jwt_at:]])
    query = _pairs(query_pairs)
    fragment = _pairs([*fragment_pairs, (fragment_name, secret)])
    value = f"https://app.example{path}" + (f"?{query}" if query else "") + f"#{fragment}"
    stored = header_value(KEY, header, value)
    assert secret not in stored and token not in stored
    base, hash_, stored_fragment = stored.partition("#")
    assert hash_ and stored_fragment.endswith(f"{fragment_name}={redacted(KEY, secret)}")  # order and names kept
    assert base.endswith(f"?{query}" if query else path.replace(token, redacted(KEY, token)))


@given(segments=st.lists(_segment, min_size=1, max_size=3), query_pairs=_plain_pairs, secret=_secret, fragment=st.booleans())
def test_a_request_target_keeps_no_jwt_of_its_path_nor_any_fragment(segments, query_pairs, secret, fragment):
    token = _jwt(secret)
    target = "/" + "/".join([*segments, token]) + (f"?{_pairs(query_pairs)}" if query_pairs else "")
    if fragment:
        target += f"#access_token={secret}"
    flow = tflow.tflow(resp=True)
    flow.request.path = target
    row, _ = snapshot_row(snapshot(flow), KEY, False)
    assert secret not in row["path"] and secret not in (row["query"] or "")
    assert row["path"] == "/" + "/".join([*segments, redacted(KEY, token)])
    assert (row["query"] or "") == _pairs(query_pairs)
    # The analysis names the endpoint by the route, not by each token's stand-in.
    assert normalise_path(row["path"]).endswith("/{id}")


_SHORT = ["pwd", "pass", "otp", "totp", "sid"]


@given(word=st.sampled_from(_SHORT), case=st.sampled_from([str.lower, str.upper, str.capitalize]),
       before=st.sampled_from(["", "x_", "user-", "X-Upstream-", "user[", "user.", "login "]),
       after=st.sampled_from(["", "_2", "-value", "]", ".x"]), secret=_secret)  # fmt: skip
def test_short_secret_names_are_redacted_as_a_word_of_the_name(word, case, before, after, secret):
    name = f"{before}{case(word)}{after}"
    assert header_value(KEY, name, secret) == redacted(KEY, secret)
    assert json_body(KEY, {name: secret}) == {name: redacted(KEY, secret)}
    stored = redact_query(KEY, urlencode([(name, secret)]))
    assert secret not in stored and parse_qsl(stored) == [(name, redacted(KEY, secret))]


@given(word=st.sampled_from(_SHORT), before=st.sampled_from(["new", "sms", "user", "x2"]),
       after=st.sampled_from(["", "Code", "Value", "_1"]), secret=_secret)  # fmt: skip
def test_short_secret_names_are_redacted_as_a_camel_case_hump(word, before, after, secret):
    for name in (f"{before}{word.capitalize()}{after}", f"{word}{after.capitalize() or 'X'}"):
        assert json_body(KEY, {name: secret}) == {name: redacted(KEY, secret)}, name


@given(word=st.sampled_from(["footprint", "passenger", "Passenger", "PASSENGER", "compass", "bypassMode", "pwdx", "besides",
                             "hotpot", "Sidebar", "consider"]), value=_segment)  # fmt: skip
def test_words_that_only_contain_a_short_name_are_kept(word, value):
    assert redact_query(KEY, f"{word}={value}") == f"{word}={value}"


# A fragment that is no parameter list, or one of harmless names: every byte as it was.
_fragment_text = st.text(st.sampled_from("abcxyz019/?:~%.-_=&!'()*+,;@ é"), max_size=30)


@given(fragment=_fragment_text, secret=_secret, where=st.sampled_from(["name", "bare", "none"]))
def test_a_fragment_keeps_every_byte_but_its_secrets(fragment, secret, where):
    """``#/orders?tab=2`` or ``#:~:text=a%20b`` are not parameters to re-encode; a token in one is still replaced."""
    token = _jwt(secret)
    extra = {"name": f"&id_token={secret}", "bare": f"&{token}", "none": ""}[where]
    stored = header_value(KEY, "Location", f"https://app.example/cb#{fragment}{extra}")
    assert secret not in stored and token not in stored
    kept = stored.partition("#")[2]
    if not SENSITIVE_PARAM.search(fragment) and not find_jwts(fragment):
        assert kept.startswith(fragment)


@given(secret=_secret)
def test_a_bare_token_as_the_whole_query_is_replaced(secret):
    token = _jwt(secret)
    flow = tflow.tflow(resp=True)
    flow.request.path = f"/magic?{token}"
    row, _ = snapshot_row(snapshot(flow), KEY, False)
    assert secret not in (row["query"] or "") and redacted(KEY, token) in row["query"]


def test_bearer_in_a_header_name_is_a_secret():
    assert header_value(KEY, "X-Upstream-Bearer", "opaque-credential-123") == redacted(KEY, "opaque-credential-123")
