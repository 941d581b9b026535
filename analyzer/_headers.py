"""The few header lines the detectors read, fetched for the hops they ask about.

The loader leaves the header columns out (at a million hops they are most of the file,
and parsing them all costs more than the whole analysis). The detectors need few:
``Retry-After`` on failed calls (``retry_without_backoff``), and values the recorder
replaced with ``[redacted:<hash prefix>]`` (``service_key_*``: within a capture the same
secret gives the same prefix) on a sample of calls, on refused calls and on requests.
:class:`HeaderReader` reads just those hops' header columns, by id, on a read-only
connection of its own; a header column that is not a JSON list of pairs (a hostile
file) gives no lines.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from hoptrace._stored import header_pairs
from hoptrace.db import open_for_reading

HEADER_LINE_COLUMNS = ("hop_id", "name", "value")
REDACTED_PREFIX = "[redacted:"
SIDES = ("request", "response")
_ANY: tuple[str, ...] = ()  # no filter on the header text


def empty_lines() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c == "hop_id" else object) for c in HEADER_LINE_COLUMNS})


class HeaderReader:
    """The header lines of chosen hops of one trace DB (names lower-cased)."""

    def __init__(self, path: str | Path) -> None:
        self.path = path

    def lines(self, hop_ids: Iterable[int], side: str, *, containing: Iterable[str] = _ANY) -> pd.DataFrame:
        """``hop_id name value`` of every header line on ``side`` of these hops; with
        ``containing``, only of the hops whose header text holds one of those strings
        (SQLite's ``instr`` rules the others out before Python parses anything)."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        ids = sorted({int(i) for i in hop_ids})
        wanted = [str(text) for text in dict.fromkeys(containing)]
        if not ids or (containing is not _ANY and not wanted):
            return empty_lines()
        column = f"{side}_headers"
        match = f" AND ({' OR '.join(f'instr({column}, ?) > 0' for _ in wanted)})" if wanted else ""
        sql = f"SELECT id, {column} FROM hops WHERE id IN (SELECT value FROM json_each(?)) AND {column} IS NOT NULL{match}"
        conn = open_for_reading(self.path, check=False)  # the loader has checked the file already
        try:
            rows = conn.execute(sql, (json.dumps(ids), *wanted)).fetchall()
        except sqlite3.DatabaseError:
            return empty_lines()  # an unreadable header column costs these detectors only
        finally:
            conn.close()
        out = [(hop_id, *line) for hop_id, text in rows for line in _pairs(text)]
        return pd.DataFrame(out, columns=list(HEADER_LINE_COLUMNS)).astype({"hop_id": "int64"}) if out else empty_lines()


def _pairs(text: object) -> list[tuple[str, str]]:
    """``[[name, value], ...]`` as written by the recorder, names lower-cased; anything else: none."""
    return [(name.lower(), value) for name, value in header_pairs(text) if isinstance(value, str)]
