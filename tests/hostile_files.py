"""Mutated copies of a real trace file: what a damaged or hostile DB looks like to every reader.

Each mutation is a small function of (connection or bytes, random generator); :func:`mutants`
makes ``count`` files from a source DB, cycling through the classes so that each is well
represented: byte flips in pages, dropped columns (table rebuilds), a hops table without its
primary key and with repeated ids, invalid UTF-8 in text columns and lone surrogates spelled in
JSON columns, absurd numbers.
"""

from __future__ import annotations

import random
import shutil
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import sqlite_utils

from hoptrace.db import COLUMNS, table_columns

TEXT_COLUMNS = {table: [c for c, (kind, _) in columns.items() if kind is str] for table, columns in COLUMNS.items()}
NUMBER_COLUMNS = {table: [c for c, (kind, _) in columns.items() if kind is not str] for table, columns in COLUMNS.items()}
# Values no recorder writes: far past and future, tiny, huge, non-finite, of the wrong type.
ABSURD = (2e10, 1e-7, -1.0, 0, 1e300, -1e300, float("inf"), float("-inf"), 9.2e18, -(2**63), 2**63 - 1, "soon", b"\x00\xff", "")
SANE_LOOKING = (1_795_282_208.0 + 86400 * 365 * 60, 1_795_282_208.0 - 86400 * 365 * 40)  # within 2000-2100 but far off


def flip_bytes(data: bytearray, rng: random.Random) -> None:
    """Overwrite a few bytes of pages after the first (the header page stays, so SQLite opens it)."""
    pages = len(data) // 4096
    for _ in range(rng.randint(1, 24)):
        at = rng.randrange(4096, pages * 4096)
        data[at] = rng.randrange(256)


def drop_column(conn: sqlite3.Connection, rng: random.Random) -> None:
    """Rebuild one table without one of its columns, as a file from another tool might be."""
    table = rng.choice(list(COLUMNS))
    _rebuild(conn, table, {rng.choice(table_columns(conn, table))})


def no_primary_key(conn: sqlite3.Connection, rng: random.Random) -> None:
    """hops rebuilt without its primary key, then some ids repeated (and some not whole numbers)."""
    _rebuild(conn, "hops", set())
    conn.execute("INSERT INTO hops SELECT * FROM hops WHERE id % ? = 0", (rng.randint(2, 9),))
    rows = rng.sample(range(1, 77), 3)
    conn.execute("UPDATE hops SET id = ? WHERE rowid IN (?, ?, ?)", (rng.choice(ABSURD[7:]), *rows))


JSON_COLUMNS = (("hops", "request_headers"), ("hops", "response_headers"), ("tokens", "claims"))


def invalid_utf8(conn: sqlite3.Connection, rng: random.Random) -> None:
    """Text no UTF-8 output can hold: bytes that are not UTF-8 stored as TEXT in a few text
    columns, and JSON columns whose strings spell lone UTF-16 surrogates (``"\\ud800"``: valid JSON)."""
    for _ in range(rng.randint(1, 6)):
        table = rng.choice(list(TEXT_COLUMNS))
        column = rng.choice([c for c in TEXT_COLUMNS[table] if c in table_columns(conn, table)])
        junk = bytes(rng.choice((0xFF, 0xFE, 0xC3, 0x80, 0xED, 0xA0)) for _ in range(rng.randint(1, 8)))
        conn.execute(f"UPDATE OR IGNORE {table} SET {column} = CAST(? AS TEXT) WHERE rowid % ? = 0", (junk, rng.randint(1, 4)))
    for table, column in rng.sample(JSON_COLUMNS, rng.randint(1, len(JSON_COLUMNS))):
        if column in table_columns(conn, table):  # a letter inside a string becomes an escaped half of a pair
            letter, half = rng.choice("aeiost"), rng.choice(("\\ud800", "\\udfff", "\\uDBFF"))
            conn.execute(f"UPDATE OR IGNORE {table} SET {column} = replace({column}, ?, ?) WHERE rowid % ? = 0",
                         (letter, half, rng.randint(1, 3)))  # fmt: skip


def absurd_values(conn: sqlite3.Connection, rng: random.Random) -> None:
    """Absurd numbers in number columns: claims, times, durations, counters, ids of sightings."""
    for _ in range(rng.randint(1, 6)):
        table = rng.choice(["tokens", "tokens", "hops", "hops", "captures", "hop_tokens"])
        column = rng.choice([c for c in NUMBER_COLUMNS[table] if c in table_columns(conn, table)])
        value = rng.choice(ABSURD + SANE_LOOKING)
        try:
            conn.execute(f"UPDATE OR IGNORE {table} SET {column} = ? WHERE rowid % ? = 0", (value, rng.randint(1, 3)))
        except sqlite3.IntegrityError:  # "datatype mismatch": an INTEGER PRIMARY KEY takes only integers
            pass
    if rng.random() < 0.5:  # hops that end before they start
        conn.execute("UPDATE hops SET ended_at = started_at - ? WHERE id % 3 = 0", (rng.choice((0.5, 1e6, 1e9)),))
    if rng.random() < 0.5:  # a column no schema declares, named like a time, holding text and numbers
        conn.execute("ALTER TABLE hops ADD COLUMN seen_at")
        conn.execute("UPDATE hops SET seen_at = CASE id % 3 WHEN 0 THEN 'soon' WHEN 1 THEN 7 END")
    if rng.random() < 0.5:  # a client port no socket has
        conn.execute("UPDATE hops SET client_addr = '10.0.0.1:' || ? WHERE id % 2 = 0", (str(rng.choice((10**20, 70000, 2**63))),))


def _rebuild(conn: sqlite3.Connection, table: str, dropped: set[str]) -> None:
    # sqlite-utils' transform copies the table into a new one of the given shape; a table
    # without its key column (or without any key) is rebuilt with CREATE TABLE ... AS.
    db = sqlite_utils.Database(conn, execute_plugins=False)
    keep = [c for c in table_columns(conn, table) if c not in dropped]
    if dropped and not dropped & set(db[table].pks):
        for index in db[table].indexes:  # transform keeps indexes, so none may name a dropped column
            if dropped & set(index.columns):
                conn.execute(f"DROP INDEX {index.name}")
        db[table].transform(drop=dropped)
        return
    conn.execute(f"CREATE TABLE {table}_rebuilt AS SELECT {', '.join(keep)} FROM {table}")
    conn.execute(f"DROP TABLE {table}")
    conn.execute(f"ALTER TABLE {table}_rebuilt RENAME TO {table}")


SQL_MUTATIONS: tuple[Callable[[sqlite3.Connection, random.Random], None], ...] = (
    drop_column, no_primary_key, invalid_utf8, absurd_values,
)  # fmt: skip


def mutants(source: Path, out: Path, count: int, seed: int = 10) -> list[tuple[Path, str]]:
    """``count`` mutated copies of ``source`` in ``out``, each with the name of its mutation."""
    rng = random.Random(seed)
    made = []
    kinds = ("flip_bytes", *(m.__name__ for m in SQL_MUTATIONS))
    for i in range(count):
        kind = kinds[i % len(kinds)]
        path = out / f"{i:03d}-{kind}.db"
        shutil.copyfile(source, path)
        if kind == "flip_bytes":
            data = bytearray(path.read_bytes())
            flip_bytes(data, rng)
            path.write_bytes(bytes(data))
        else:
            mutate = next(m for m in SQL_MUTATIONS if m.__name__ == kind)
            with closing(sqlite3.connect(path, isolation_level=None)) as conn:
                conn.execute("PRAGMA foreign_keys = OFF")
                mutate(conn, rng)
        made.append((path, kind))
    return made
