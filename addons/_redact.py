"""What must never reach a trace file, and what to write in its place.

Traces get attached to bug reports, so the file is treated as public: credential
headers, cookies, query tokens and anything shaped like a JWT are replaced before
insert. A replacement keeps a keyed-hash prefix, so a reader can still see that two
hops sent the same secret without learning it.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode

from hoptrace.addons._tokens import JWT_PATTERN, fingerprint

# Names are matched by pattern, not a fixed list: custom headers such as
# X-Internal-Key are exactly what deny-lists miss (FIELD_NOTES, redaction norms).
SENSITIVE_NAME = re.compile(r"auth|token|key|secret|session|cookie|passw|credential|signature|jwt|(?:^|[-_])sid(?:$|[-_])", re.I)
# OAuth's authorization code travels as a bare `code` parameter.
_SENSITIVE_PARAM = re.compile(SENSITIVE_NAME.pattern + r"|^code$", re.I)
# Headers whose value is a URL, whose query may hold its own secrets.
_URL_HEADERS = frozenset({"location", "referer", "content-location"})


def redacted(key: bytes, value: str) -> str:
    """The stand-in for a secret value: its keyed-hash prefix, nothing else."""
    return f"[redacted:{fingerprint(key, value)[:12]}]"


def scrub_jwts(key: bytes, text: str) -> str:
    """Replace anything JWT-shaped in free text (a header we had no reason to suspect)."""
    if "eyJ" not in text:
        return text
    return JWT_PATTERN.sub(lambda m: redacted(key, m.group(0)), text)


def header_value(key: bytes, name: str, value: str) -> str:
    lower = name.lower()
    if SENSITIVE_NAME.search(lower):
        if lower in ("authorization", "proxy-authorization") and " " in value:
            scheme, _, credentials = value.partition(" ")
            return f"{scheme} {redacted(key, credentials.strip())}"
        return redacted(key, value)
    if lower in _URL_HEADERS and "?" in value:
        base, _, query_string = value.partition("?")
        return f"{base}?{query(key, query_string)}"
    return scrub_jwts(key, value)


def headers(key: bytes, fields: list[tuple[str, str]]) -> list[list[str]]:
    return [[name, header_value(key, name, value)] for name, value in fields]


def query(key: bytes, query_string: str) -> str:
    """The query string with sensitive parameters' values replaced, order kept."""
    if not query_string:
        return query_string
    pairs = parse_qsl(query_string, keep_blank_values=True)
    return urlencode(
        [(name, redacted(key, value) if _SENSITIVE_PARAM.search(name) else scrub_jwts(key, value)) for name, value in pairs],
        safe="[]:",
    )


def json_body(key: bytes, value: object, depth: int = 0) -> object:
    """A parsed JSON body with the values of sensitive keys replaced (opt-in body storage)."""
    if depth > 20:
        return "[redacted: nested too deep]"
    if isinstance(value, dict):
        return {
            name: redacted(key, str(item)) if SENSITIVE_NAME.search(str(name)) else json_body(key, item, depth + 1)
            for name, item in value.items()
        }
    if isinstance(value, list):
        return [json_body(key, item, depth + 1) for item in value]
    if isinstance(value, str):
        return scrub_jwts(key, value)
    return value
