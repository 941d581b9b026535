"""Token parsing for hostile input: fingerprint every token, decode JWT claims without verifying.

Nothing here raises on a bad token: whatever is wrong with it becomes the
``error`` of its :class:`TokenInfo`, and its hop is recorded all the same.

We decode with base64 + json rather than ``jwt.decode(verify_signature=False)``:
we need only the two JSON segments, and pyjwt 2.15 spends ~49 µs per decode
checking every character in Python, against ~8 µs here (measured on a 2-core box); this runs
on the recorder's thread, which shares the GIL with the proxy.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache

MAX_TOKEN_BYTES = 16 * 1024
MAX_CLAIMS_JSON = 8 * 1024
# A NumericDate we believe: after 1970, before the year 5138 (1e11 s).
_MAX_NUMERIC_DATE = 1e11
_TIME_CLAIMS = ("iat", "nbf", "exp")
_TEXT_CLAIMS = ("iss", "sub", "jti")
_B64URL = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")
# Candidates for a token met in a value with no name to go by: three to five
# base64url segments. Only those whose first segment decodes to a JSON object
# with "alg" are JWTs (:func:`find_jwts`): a prefix such as "eyJ" misses a header
# serialised with whitespace first ("ewog..." is '{\n').
_JWT_CANDIDATE = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{4,}(?:\.[A-Za-z0-9_-]*){2,4}")


@dataclass(frozen=True, slots=True)
class TokenInfo:
    kind: str  # jwt | jwe | opaque
    length: int
    alg: str | None = None
    kid: str | None = None
    typ: str | None = None
    iss: str | None = None
    sub: str | None = None
    aud: str | None = None
    jti: str | None = None
    iat: float | None = None
    nbf: float | None = None
    exp: float | None = None
    claims: str | None = None  # JSON of the payload, signature never included
    error: str | None = None


def fingerprint(key: bytes, token: str) -> str:
    """A keyed hash of the token: stable within a capture, useless to whoever holds the file.

    A plain hash would let anyone with the trace test guesses of a token; the key
    lives only in the recorder's memory (or the user's environment).
    """
    try:
        raw = token.encode("utf-8", "surrogateescape")  # the bytes as they came off the wire
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape ("\ud800"): hash its code point
        raw = token.encode("utf-8", "surrogatepass")
    return hmac.new(key, raw, hashlib.sha256).hexdigest()[:32]


def find_jwts(text: str) -> list[str]:
    """Every JWT or JWE in free text, recognised by its structure, not its first characters."""
    return [text[start:end] for start, end in jwt_spans(text)]


@lru_cache(maxsize=4096)
def jwt_spans(text: str) -> tuple[tuple[int, int], ...]:
    """Where the JWTs (3 segments) and JWEs (5, header with "enc") of ``text`` are.

    Cached: the same header values (user agents, hosts) come back on every hop.
    """
    if text.count(".") < 2:
        return ()
    spans = []
    for match in _JWT_CANDIDATE.finditer(text):
        parts = match.group().split(".")
        header, error = _segment(parts[0], "header") if len(parts[0]) <= MAX_TOKEN_BYTES else ({}, "too long")
        if error is None and "alg" in header:
            count = 5 if len(parts) >= 5 and "enc" in header else 3
            spans.append((match.start(), match.start() + len(".".join(parts[:count]))))
    return tuple(spans)


def is_jwt(value: str) -> bool:
    """Three (JWS) or five (JWE) base64url segments, the first a JSON object with "alg"."""
    return len(value.split(".")) in (3, 5) and jwt_spans(value) == ((0, len(value)),)


def decode(token: str) -> TokenInfo:
    """Classify and decode one token. Never raises."""
    length = len(token)
    if length > MAX_TOKEN_BYTES:
        return TokenInfo("opaque", length, error=f"token of {length} bytes exceeds the {MAX_TOKEN_BYTES}-byte cap; not decoded")
    parts = token.split(".")
    if len(parts) == 5:
        # JWE: the payload is encrypted; only the protected header is readable.
        header, error = _segment(parts[0], "header")
        return TokenInfo("jwe", length, **_header_fields(header), error=error)
    if len(parts) != 3 or not (parts[0].startswith("eyJ") or is_jwt(token)):
        return TokenInfo("opaque", length)
    header, header_error = _segment(parts[0], "header")
    payload, payload_error = _segment(parts[1], "payload")
    if header_error or payload_error:
        return TokenInfo("jwt", length, **_header_fields(header), error=header_error or payload_error)
    claims, claim_errors = _claims(payload)
    return TokenInfo("jwt", length, **_header_fields(header), **claims, error="; ".join(claim_errors) or None)


def _segment(segment: str, name: str) -> tuple[dict, str | None]:
    if not _B64URL.match(segment):
        return {}, f"{name} is not base64url"
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError) as exc:
        # RecursionError: deeply nested JSON; json raises it rather than ValueError.
        return {}, f"{name} is not JSON ({type(exc).__name__})"
    if not isinstance(value, dict):
        return {}, f"{name} is not a JSON object"
    return value, None


def _header_fields(header: dict) -> dict:
    return {name: _text(header.get(name)) for name in ("alg", "kid", "typ")}


def _claims(payload: dict) -> tuple[dict, list[str]]:
    fields: dict = {name: _text(payload.get(name)) for name in _TEXT_CLAIMS}
    errors = []
    for name in _TIME_CLAIMS:
        if name not in payload:
            continue
        value = payload[name]
        if _numeric_date(value):
            fields[name] = float(value)
        else:
            errors.append(f"{name} is not a finite NumericDate: {_text(value)!r}"[:200])
    aud = payload.get("aud")
    if aud is not None:
        fields["aud"] = aud if isinstance(aud, str) else _compact_json(aud)
    claims = _compact_json(payload)
    if claims is not None and len(claims) > MAX_CLAIMS_JSON:
        errors.append(f"claims of {len(claims)} bytes truncated to the named ones")
        claims = None
    fields["claims"] = claims
    return fields, errors


def _numeric_date(value: object) -> bool:
    # bool is an int subclass: `"exp": true` must not become 1.0. An int is
    # compared as it is: 10**400 is past any float, and math.isfinite(10**400)
    # raises OverflowError.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return 0 <= value <= _MAX_NUMERIC_DATE


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value[:512]
    text = _compact_json(value)
    return text[:512] if text is not None else None


def _compact_json(value: object) -> str | None:
    try:
        # NaN/Infinity are not JSON: allow_nan=False makes them an error we report as None.
        return json.dumps(value, separators=(",", ":"), allow_nan=False, sort_keys=True)
    except (ValueError, TypeError, RecursionError):
        return None
