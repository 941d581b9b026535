"""What hoptrace reads that it did not write: JSON a trace file holds (headers, claims, saved
evidence), and the small text files a user names (stack files, OpenAPI documents).

A trace file can come from anywhere: a column may hold anything but the JSON the recorder
wrote. ``json.loads`` raises ``ValueError`` for text that is not JSON and ``RecursionError``
for arrays or objects nested past the interpreter's recursion limit (``[[[[...`` 50,000
deep), so every reader goes through here and gets "nothing" for either. JSON may also spell
a lone UTF-16 surrogate (``"\\ud800"``), which ``json.loads`` returns as is and no UTF-8
output (Arrow, protobuf, SQLite, a report) can hold: it reads as U+FFFD.
"""

from __future__ import annotations

import errno
import json
import re
import stat
from pathlib import Path
from typing import Any

__all__ = ["YEAR_10000", "header_pairs", "json_object", "read_text_file", "stored_json", "stored_value"]

_INT64 = 1 << 63
YEAR_10000 = 253_402_300_800
"""10000-01-01 UTC in UNIX seconds: no time a hop, a HAR entry or an OTLP span can carry is at or
past it (Python's datetime ends there); a stored or imported time beyond is damage."""


def read_text_file(path: Path) -> str:
    """A text file's content (UTF-8). OSError for anything but a regular file: reading a fifo
    would wait for a writer forever, a device would never end."""
    if not stat.S_ISREG(path.stat().st_mode):
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return path.read_text(encoding="utf-8")


_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def stored_json(text: object, default: Any = None) -> Any:
    """The JSON value of ``text``, lone surrogates as U+FFFD; ``default`` when it is not a str holding JSON."""
    if not isinstance(text, str):
        return default
    try:
        value = json.loads(text)
        # The search is one C scan of the text; the walk, only for the text that spells a surrogate.
        return _without_surrogates(value) if _ESCAPED_SURROGATE.search(text) else value
    except (ValueError, RecursionError):
        return default


def _without_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        # Through UTF-16 a pair joins into its character and a lone half becomes U+FFFD.
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_without_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_without_surrogates(key): _without_surrogates(item) for key, item in value.items()}
    return value


def json_object(text: object) -> dict[str, Any]:
    """A JSON object (a token's claims, a finding's evidence); {} for anything else."""
    value = stored_json(text)
    return value if isinstance(value, dict) else {}


def header_pairs(text: object) -> list[tuple[str, Any]]:
    """``[[name, value], ...]`` as the recorder writes headers: the pairs whose name is a str
    (values as stored, usually str); none when the text is anything else."""
    items = stored_json(text)
    if not isinstance(items, list):
        return []
    return [(item[0], item[1]) for item in items if isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)]


def stored_value(value: object, kind: type) -> object:
    """A value of an untrusted file's column as its declared type, or None, as the analyzer's
    loader reads it: a number where text belongs as its text, a blob as (UTF-8) text, a finite
    number where a number belongs (a float in an int column truncated), anything else None."""
    if value is None:
        return None
    if kind is str:
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value if isinstance(value, str) else str(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not -_INT64 <= value < _INT64:  # also NaN
        return None
    return int(value) if kind is int else float(value)
