"""What must never reach a trace file, and what to write in its place.

Traces get attached to bug reports, so the file is treated as public: credential
headers, cookies, query tokens and anything shaped like a JWT are replaced before
insert. A replacement keeps a keyed-hash prefix, so a reader can still see that two
hops sent the same secret without learning it.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlencode

from hoptrace.addons._tokens import fingerprint, jwt_spans

# Names are matched by pattern, not a fixed list: custom headers such as
# X-Internal-Key or X-Upstream-Bearer are exactly what deny-lists miss. Short
# names (sid, pwd, pass, otp, totp) only as a whole word of the name, as any
# separator or a camelCase hump ends one (user[pass], user.pwd, newPwd, otpCode,
# X-OTP): as substrings they are in ordinary words (footprint, passenger, PASSENGER).
_SHORT = ("sid", "pwd", "pass", "otp", "totp")
_SHORT_WORD = (
    rf"(?-i:(?<![A-Za-z0-9])(?:{'|'.join(_SHORT)})(?![a-z0-9])"  # lower case: user.pwd, otpCode
    rf"|(?<![A-Z])(?:{'|'.join(w.capitalize() for w in _SHORT)})(?![a-z0-9])"  # a hump: newPwd, Pass
    rf"|(?<![A-Z0-9])(?:{'|'.join(w.upper() for w in _SHORT)})(?![A-Za-z0-9]))"  # capitals: X-OTP, userPWD
)
SENSITIVE_NAME = re.compile(r"auth|token|key|secret|session|cookie|passw|credential|signature|jwt|bearer|" + _SHORT_WORD, re.I)
# Parameters (query, form, multipart and JSON fields) whose short names the pattern
# cannot catch: OAuth's code, state and code_verifier, SAS-style `sig`, SAML's
# messages, a client assertion (the 2023 HAR-sanitizer lists name the same).
SENSITIVE_PARAM = re.compile(
    SENSITIVE_NAME.pattern + r"|^(?:code|code_verifier|state|sig|assertion|samlresponse|samlrequest)$", re.I
)
_BOUNDARY = re.compile(r'boundary="?([^";]{1,200})"?', re.I)
_PART_NAME = re.compile(r'content-disposition:[^\n]*?\bname="([^"]*)"', re.I)
# Headers whose value is a URL, whose query may hold its own secrets.
_URL_HEADERS = frozenset({"location", "referer", "content-location"})


def redacted(key: bytes | None, value: str) -> str:
    """The stand-in for a secret value: its keyed-hash prefix, nothing else (without a key, not even that)."""
    return "[redacted]" if key is None else f"[redacted:{fingerprint(key, value)[:12]}]"


def scrub_jwts(key: bytes | None, text: str) -> str:
    """Replace every JWT in free text (a header we had no reason to suspect), found by its structure."""
    if text.count(".") < 2:  # no JWT; and jwt_spans' cache is kept for the values that repeat
        return text
    spans = jwt_spans(text)
    for start, end in reversed(spans):
        text = text[:start] + redacted(key, text[start:end]) + text[end:]
    return text


def header_value(key: bytes, name: str, value: str) -> str:
    lower = name.lower()
    if SENSITIVE_NAME.search(lower):
        if lower in ("authorization", "proxy-authorization") and " " in value:
            scheme, _, credentials = value.partition(" ")
            return f"{scheme} {redacted(key, credentials.strip())}"
        return redacted(key, value)
    if lower in _URL_HEADERS:
        return url(key, value)
    return scrub_jwts(key, value)


def url(key: bytes, value: str) -> str:
    """A URL with the secrets of its path (JWTs: a magic link's ``/verify/eyJ...``), query and fragment replaced.

    OAuth's implicit flow hands the token back in a redirect's fragment
    (``Location: https://app/cb#access_token=...&state=...``): see :func:`_fragment`.
    """
    rest, hash_, fragment = value.partition("#")
    base, question, query_string = rest.partition("?")
    redacted_url = scrub_jwts(key, base) + (f"?{query(key, query_string)}" if question else "")
    return f"{redacted_url}#{_fragment(key, fragment)}" if hash_ else redacted_url


def _fragment(key: bytes, fragment: str) -> str:
    """A URL fragment with the values of sensitive names and every JWT replaced, the rest as it was.

    Not re-encoded as a query is: a fragment is often no parameter list at all (``#/orders?tab=2``,
    ``#:~:text=a%20b``), and re-encoding it would change what it says.
    """
    parts = []
    for part in fragment.split("&"):
        name, equals, value = part.partition("=")
        if equals and SENSITIVE_PARAM.search(unquote(name)):
            parts.append(f"{scrub_jwts(key, name)}={redacted(key, unquote(value))}")
        else:
            parts.append(scrub_jwts(key, part))
    return "&".join(parts)


def query(key: bytes, query_string: str) -> str:
    """The query string with sensitive parameters' values replaced, order kept.

    Bytes that are not UTF-8 (raw, which mitmproxy hands over surrogate-escaped, or
    percent-encoded) come back percent-encoded as they were: encoding them strictly
    raised, and the hop lost everything but its bare row.
    """
    if not query_string:
        return query_string
    pairs = parse_qsl(query_string, keep_blank_values=True, errors="surrogateescape")
    # A name is scrubbed too: a bare token given as the whole query (/magic?<JWT>) parses as a name.
    return urlencode(
        [(scrub_jwts(key, name), _parameter(key, name, value)) for name, value in pairs],
        safe="[]:",
        errors="surrogateescape",
    )


def _parameter(key: bytes, name: str, value: str) -> str:
    """A parameter's value as stored (query, form, multipart): replaced if its name is a secret's, else scrubbed of JWTs."""
    return redacted(key, value) if SENSITIVE_PARAM.search(name) else scrub_jwts(key, value)


def json_body(key: bytes, value: object, depth: int = 0) -> object:
    """A parsed JSON body with the values of sensitive keys replaced (opt-in body storage)."""
    if depth > 20:
        return "[redacted: nested too deep]"
    if isinstance(value, dict):
        return {
            name: redacted(key, str(item)) if SENSITIVE_PARAM.search(str(name)) else json_body(key, item, depth + 1)
            for name, item in value.items()
        }
    if isinstance(value, list):
        return [json_body(key, item, depth + 1) for item in value]
    if isinstance(value, str):
        return scrub_jwts(key, value)
    return value


def multipart_fields(text: str, content_type: str) -> list[tuple[str, str, str]] | None:
    """A multipart/form-data body as (part head, field name, value) triples; None if it does not parse."""
    match = _BOUNDARY.search(content_type)
    if match is None:
        return None
    delimiter = f"--{match[1]}"
    chunks = text.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith("--"):
        return None  # no closing delimiter: cut or not multipart at all
    fields = []
    for chunk in chunks[1:-1]:
        head, sep, value = chunk.partition("\r\n\r\n")
        if not sep:
            head, sep, value = chunk.partition("\n\n")
        name = _PART_NAME.search(head)
        if not sep or name is None:
            return None
        fields.append((head, name[1], value.removesuffix("\r\n").removesuffix("\n")))
    return fields


def multipart(key: bytes, text: str, content_type: str) -> str:
    """A multipart/form-data body with sensitive fields' values replaced; a body that does not parse is not kept."""
    fields = multipart_fields(text, content_type)
    if fields is None:
        return "[redacted: multipart body that does not parse]"
    parts = [f"{head}\r\n\r\n{_parameter(key, name, value)}\r\n" for head, name, value in fields]
    boundary = _BOUNDARY.search(content_type)[1]
    return "".join(f"--{boundary}{part}" for part in parts) + f"--{boundary}--\r\n"
