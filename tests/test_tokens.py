"""The token parser on hostile input: it classifies, decodes what it can, and never raises."""

import base64
import json
import math

import jwt
import pytest

from hoptrace.addons._tokens import MAX_TOKEN_BYTES, decode, fingerprint


def b64(obj) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def token(header, payload, signature="c2ln") -> str:
    return f"{b64(header)}.{b64(payload)}.{signature}"


SECRET = "a-32-byte-secret-for-hs256-tests!"


def test_hs256_claims_decoded():
    raw = jwt.encode({"sub": "alice", "iat": 1700000000, "nbf": 1700000000, "exp": 1700000060, "jti": "j1", "iss": "auth", "aud": ["a", "b"]}, SECRET, algorithm="HS256", headers={"kid": "k1"})
    info = decode(raw)
    assert (info.kind, info.alg, info.kid, info.typ) == ("jwt", "HS256", "k1", "JWT")
    assert (info.sub, info.iss, info.jti, info.iat, info.nbf, info.exp) == ("alice", "auth", "j1", 1700000000.0, 1700000000.0, 1700000060.0)
    assert json.loads(info.aud) == ["a", "b"]
    assert info.error is None
    assert raw.split(".")[2] not in (info.claims or "")


def test_alg_none_is_recorded_not_rejected():
    info = decode(token({"alg": "none"}, {"sub": "mallory", "exp": 1700000000}, signature=""))
    assert info.kind == "jwt" and info.alg == "none" and info.sub == "mallory" and info.error is None


def test_jwe_recognised_not_decoded():
    info = decode(".".join([b64({"alg": "RSA-OAEP", "enc": "A256GCM", "kid": "e1"}), "a", "b", "c", "d"]))
    assert info.kind == "jwe" and info.alg == "RSA-OAEP" and info.kid == "e1" and info.claims is None and info.sub is None


@pytest.mark.parametrize("bad_exp", ["tomorrow", None, True, False, float("nan"), float("inf"), -5, 1e300, [1], {"a": 1}])
def test_exp_that_is_not_a_finite_numeric_date_is_null_with_error(bad_exp):
    payload = json.dumps({"sub": "x", "exp": bad_exp}, allow_nan=True).encode()
    info = decode(token({"alg": "HS256"}, payload))
    assert info.kind == "jwt" and info.exp is None and info.sub == "x"
    assert "exp is not a finite NumericDate" in info.error


def test_nested_json_does_not_escape_as_recursion_error():
    deep = b"[" * 5000 + b"]" * 5000  # deeper than the interpreter's recursion limit, under the size cap
    info = decode(f"{b64({'alg': 'HS256'})}.{b64(deep)}.sig")
    assert info.kind == "jwt" and "payload is not JSON" in info.error


def test_oversize_token_not_decoded():
    info = decode("eyJ" + "A" * MAX_TOKEN_BYTES)
    assert info.kind == "opaque" and "cap" in info.error and info.length == MAX_TOKEN_BYTES + 3


@pytest.mark.parametrize("raw", ["abc", "opaque-session-id-1234567890", "a.b.c", "eyJ.eyJ.", "eyJ!!.eyJ.x", "...."])
def test_garbage_is_opaque_or_jwt_with_error(raw):
    info = decode(raw)
    assert info.kind in ("opaque", "jwt", "jwe")
    if info.kind == "jwt":
        assert info.error


def test_payload_not_an_object():
    info = decode(token({"alg": "HS256"}, [1, 2, 3]))
    assert info.kind == "jwt" and info.error == "payload is not a JSON object"


def test_fingerprint_is_keyed_and_stable():
    assert fingerprint(b"k1" * 16, "tok") == fingerprint(b"k1" * 16, "tok")
    assert fingerprint(b"k1" * 16, "tok") != fingerprint(b"k2" * 16, "tok")
    assert len(fingerprint(b"k" * 32, "tok")) == 32
    assert not math.isnan(len(fingerprint(b"k" * 32, "\udcff")))  # lone surrogates from odd headers hash too
