"""The few header lines the detectors read, in one small query of their own.

The loader leaves the header columns out (at a million hops they are most of the file);
the detectors need only two kinds of line: ``Retry-After`` on answers that ask for one
(``retry_without_backoff``), and values the recorder replaced with ``[redacted:<hash
prefix>]`` (``service_key_missing`` / ``service_key_leak``: the same secret gives the same
prefix within a capture). SQLite's JSON functions pick those lines out, so Python sees
only them; a header column that is not valid JSON (a hostile file) is skipped.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pandas as pd

from hoptrace.db import open_for_reading

HEADER_FACT_COLUMNS = ("hop_id", "side", "name", "value")

# LIKE is case-insensitive for ASCII in SQLite; the LIKE on the whole column rules a hop
# out before json_each splits it, which is most of the cost.
_QUERY = """
SELECT h.id, '{side}', lower(CAST(json_extract(j.value, '$[0]') AS TEXT)), CAST(json_extract(j.value, '$[1]') AS TEXT)
FROM hops h, json_each(h.{side}_headers) j
WHERE h.{side}_headers LIKE ? AND json_valid(h.{side}_headers) AND j.type = 'array'
  AND {keep}
"""
_REDACTED = "CAST(json_extract(j.value, '$[1]') AS TEXT) LIKE '[redacted:%'"
_RETRY_AFTER = "lower(CAST(json_extract(j.value, '$[0]') AS TEXT)) = 'retry-after'"


def empty_header_facts() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c == "hop_id" else object) for c in HEADER_FACT_COLUMNS})


def read_header_facts(path: str | Path) -> pd.DataFrame:
    """``hop_id side name value`` (side ``request`` or ``response``, name lower-case) for
    every redacted header value and every ``Retry-After`` answer of the trace DB."""
    queries = (
        (_QUERY.format(side="request", keep=_REDACTED), ("%[redacted:%",)),
        (_QUERY.format(side="response", keep=_REDACTED), ("%[redacted:%",)),
        (_QUERY.format(side="response", keep=_RETRY_AFTER), ("%retry-after%",)),
    )
    conn = open_for_reading(path, check=False)  # the loader has checked the file already
    try:
        rows = [row for sql, params in queries for row in conn.execute(sql, params)]
    except sqlite3.DatabaseError:
        return empty_header_facts()  # an unreadable header column costs these detectors only
    finally:
        conn.close()
    if not rows:
        return empty_header_facts()
    out = pd.DataFrame(rows, columns=list(HEADER_FACT_COLUMNS))
    out = out[out["name"].map(lambda v: isinstance(v, str)).to_numpy() & out["value"].map(lambda v: isinstance(v, str)).to_numpy()]
    return out.astype({"hop_id": "int64"}).reset_index(drop=True)
