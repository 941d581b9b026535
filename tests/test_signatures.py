"""JWT signatures checked where the recorder builds rows, against the JWKS served in the capture.

Real mitmproxy flows (its own test flow builder), real RSA keys (cryptography), real
tokens signed with pyjwt; only the verdict may reach the row, never a key or signature.
"""

from __future__ import annotations

import json

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.test import tflow

from hoptrace.addons._rows import build_rows, snapshots
from hoptrace.addons._signatures import MAX_KEYS, KeySets
from hoptrace.addons._tokens import decode
from hoptrace.db import TOKEN_COLUMNS

KEY = b"k" * 32
VERDICT = TOKEN_COLUMNS.index("verdict")


def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(private, kid: str) -> dict:
    return {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key())), "kid": kid, "use": "sig", "alg": "RS256"}


def sign(private, kid: str | None, sub: str = "alice") -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode({"sub": sub, "exp": 4_000_000_000}, private, algorithm="RS256", headers=headers)


def flow(path: str, *, bearer: str | None = None, answer: dict | None = None):
    f = tflow.tflow(resp=True)
    f.request.path = path
    if bearer:
        f.request.headers["Authorization"] = f"Bearer {bearer}"
    if answer is not None:
        f.response.status_code = 200
        f.response.headers["Content-Type"] = "application/json"
        f.response.content = json.dumps(answer).encode()
    return f


def verdicts(flows, capture_id: int) -> dict[str, str | None]:
    """The verdict of each token first seen on these flows, by the subject it names."""
    items, errors = snapshots([("svc", f) for f in flows])
    built = build_rows(items, KEY, False, capture_id)
    assert errors == 0 and built.addon_errors == 0
    rows = [token for hop in built.hops for token in hop.tokens]
    return {row[TOKEN_COLUMNS.index("sub")]: row[VERDICT] for row in rows}


def test_verdicts_against_the_served_key_set():
    current, rotated_out = rsa_key(), rsa_key()
    hs = jwt.encode({"sub": "hs", "exp": 4_000_000_000}, "s" * 32, algorithm="HS256")
    forged = sign(current, "k-2025", "forged")
    forged = forged.rsplit(".", 1)[0] + "." + sign(rotated_out, "k-2025", "forged").rsplit(".", 1)[1]
    flows = [
        flow("/orders", bearer=sign(current, "k-2025", "early")),  # before any key set: cannot tell
        flow("/.well-known/jwks.json", answer={"keys": [jwk(current, "k-2025")]}),
        flow("/orders", bearer=sign(current, "k-2025", "alice")),
        flow("/orders", bearer=sign(rotated_out, "k-2024", "bob")),
        flow("/orders", bearer=forged),
        flow("/orders", bearer=sign(current, None, "no-kid")),
        flow("/orders", bearer=hs),
    ]
    assert verdicts(flows, capture_id=101) == {
        "early": "unverifiable",
        "alice": "valid",
        "bob": "unknown_kid",
        "forged": "invalid",
        "no-kid": "valid",
        "hs": "unverifiable",
    }
    # The key set is the capture's: the next capture starts with none.
    assert verdicts([flow("/orders", bearer=sign(current, "k-2025", "carol"))], capture_id=102) == {"carol": "unverifiable"}


def test_no_key_or_signature_reaches_a_row():
    private = rsa_key()
    served = jwk(private, "k1")
    token = sign(private, "k1")
    items, _ = snapshots([("svc", flow("/.well-known/jwks.json", answer={"keys": [served]})), ("svc", flow("/x", bearer=token))])
    text = repr(build_rows(items, KEY, False, 103))
    assert token.rsplit(".", 1)[1] not in text  # the signature
    assert token not in text


def test_key_sets_stay_bounded():
    sets = KeySets()
    public = jwk(rsa_key(), "k")
    for batch in range(3):
        keys = [{**public, "kid": f"k{batch}-{i}"} for i in range(MAX_KEYS)]
        sets.learn(1, json.dumps({"keys": keys}))
    assert len(sets._keys) == MAX_KEYS
    assert "k2-0" in sets._keys and "k0-0" not in sets._keys  # the oldest forgotten first


jwk_names = st.sampled_from(["keys", "kty", "kid", "n", "e", "crv", "x"]) | st.text(max_size=5)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(jwk_names, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(body=json_values, token_kid=st.none() | st.text(max_size=8))
def test_hostile_key_sets_never_raise(body, token_kid):
    sets = KeySets()
    sets.learn(1, json.dumps({"keys": body}))
    sets.learn(1, json.dumps(body))
    header = {"alg": "RS256", **({"kid": token_kid} if token_kid is not None else {})}
    token = jwt.utils.base64url_encode(json.dumps(header).encode()).decode() + ".eyJzdWIiOiJ4In0.c2ln"
    assert sets.verdict(1, token, decode(token)) in ("valid", "invalid", "unknown_kid", "unverifiable")


@pytest.mark.parametrize("kind", ["opaque", "jwe"])
def test_only_jwts_get_a_verdict(kind):
    token = "opaque-token-value" if kind == "opaque" else "eyJhbGciOiJSU0EtT0FFUCIsImVuYyI6IkEyNTZHQ00ifQ.a.b.c.d"
    assert KeySets().verdict(1, token, decode(token)) is None
