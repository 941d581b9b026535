"""Large reads of a trace DB through Arrow (``adbc-driver-sqlite``), in a child process.

The ADBC driver reads SQLite rows straight into Arrow columns, in C, on threads that do
not hold the GIL: at a million hops the reads and the frames built from them cost ~6.5 s of
CPU where the ``sqlite3`` module's reads and their parsing cost ~11 s. It bundles its own copy of
SQLite, though, and two copies of SQLite in one process break each other's locks: POSIX
advisory locks belong to the process, so when either copy closes its descriptor of the
file, the locks the other holds on it are gone, and a proxy still recording may then
checkpoint the WAL under a read in progress. So the reads run in a child process that
opens the file through that copy only, and hands the tables back as an Arrow IPC stream
on its stdout (pyarrow and the driver alone load in ~0.3 s; the ADBC DB-API module
would add pandas, 0.6 s more).

Each query's first row is a type sample, dropped here: the driver types a column by the
first rows it reads (a column NULL there becomes int64, and a later text value an error).
A table with text that is not UTF-8 is refused rather than handed back invalid.
:func:`read_tables` raises :class:`ArrowReadError` for anything that went wrong; the
caller then reads the file the slower way, which knows how to phrase what is wrong with it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.ipc


class ArrowReadError(Exception):
    """The child could not read the file (a damaged file, text that is not UTF-8, a missing driver)."""


def read_tables(uri: str, queries: list[str], threads: int) -> Iterator[pa.Table]:
    """The result of each query, in order, each as soon as the child has sent it, read by a child
    process with ``threads`` connections; close the iterator to stop the child early.

    A query carries its values as literals (:func:`sql_literal`): binding parameters needs
    Arrow arrays built from Python values, and pyarrow imports pandas to build those."""
    request = json.dumps({"uri": uri, "queries": queries, "threads": threads}).encode()
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    except OSError as exc:  # no interpreter to start (Python embedded in another program), no process left
        raise ArrowReadError(f"cannot start the reader: {exc}") from None
    with child:
        try:
            _send(child, request)
            for _ in queries:
                yield _next_table(child)
        except BaseException:
            # Interrupted (Ctrl-C, a timeout), or the caller stopped early: the reads are wanted no more, now.
            child.kill()
            raise
        if child.wait() != 0:
            raise ArrowReadError(child.stderr.read().decode(errors="replace").strip())


def _send(child: subprocess.Popen, request: bytes) -> None:
    """The request on the child's stdin; :class:`ArrowReadError` if the child is gone (it could not start Python)."""
    try:
        child.stdin.write(request)
        child.stdin.close()
    except OSError as exc:  # BrokenPipeError: it exited before reading
        raise _failed(child, exc) from None


def _next_table(child: subprocess.Popen) -> pa.Table:
    """The next table the child wrote; :class:`ArrowReadError` with the child's reason if it could not."""
    try:
        return pa.ipc.open_stream(child.stdout).read_all()
    except (OSError, pa.ArrowException) as exc:
        raise _failed(child, exc) from None


def _failed(child: subprocess.Popen, exc: Exception) -> ArrowReadError:
    """The error to raise once the child is killed and reaped: its own words, if it said any."""
    child.kill()
    child.wait()
    return ArrowReadError(child.stderr.read().decode(errors="replace").strip() or str(exc))


def sql_literal(value: float | str) -> str:
    """``value`` as an SQL literal: text as the hex of its UTF-8 bytes, so nothing in it is ever SQL;
    a float as its exact value (see :func:`_exact_real`)."""
    if isinstance(value, str):
        return f"CAST(X'{value.encode().hex()}' AS TEXT)"
    if isinstance(value, float) and not math.isfinite(value):
        raise ArrowReadError(f"no SQL literal for {value}")  # the caller reads the other way, binding it
    return _exact_real(value) if isinstance(value, float) else str(int(value))


def _exact_real(value: float) -> str:
    """A finite float as SQL that evaluates to exactly it: its 53-bit integer mantissa times or
    divided by whole powers of two (each exact). SQLite's reading of a decimal literal can be a unit
    in the last place off (``9.33259240110794e-302`` read back as ``9.332592401107941e-302``)."""
    mantissa, exponent = math.frexp(value)
    scaled, shift = int(mantissa * 2**53), exponent - 53
    steps, left = [], abs(shift)
    while left:
        step = min(left, 62)  # 2**62 is still an SQLite integer
        steps.append(f" {'*' if shift > 0 else '/'} {2**step}")
        left -= step
    return f"(CAST({scaled} AS REAL){''.join(steps)})"


def _read(uri: str, query: str) -> pa.Table:
    # Imported here, in the child only: the driver's copy of SQLite must never load into the analysis process.
    import adbc_driver_manager
    import adbc_driver_sqlite

    database = adbc_driver_sqlite.connect(uri)
    connection = adbc_driver_manager.AdbcConnection(database)
    statement = adbc_driver_manager.AdbcStatement(connection)
    try:
        # As hoptrace's own read connections: views and triggers of a hostile file call nothing with side effects.
        for pragma in ("PRAGMA trusted_schema = OFF", "PRAGMA busy_timeout = 5000"):
            statement.set_sql_query(pragma)
            statement.execute_update()
        statement.set_sql_query(query)
        stream, _ = statement.execute_query()
        table = pa.RecordBatchReader.from_stream(stream).read_all().slice(1)
        table.validate(full=True)  # text that is not UTF-8: ArrowInvalid
        return table
    finally:
        statement.close()
        connection.close()
        database.close()


def main() -> int:
    request = json.load(sys.stdin)
    uri, queries = request["uri"], request["queries"]
    try:
        with ThreadPoolExecutor(max_workers=max(1, int(request["threads"]))) as pool:
            for table in pool.map(lambda query: _read(uri, query), queries):
                with pa.ipc.new_stream(sys.stdout.buffer, table.schema) as writer:
                    writer.write_table(table)
    except Exception as exc:  # noqa: BLE001 - whatever it is, the parent reads the file the other way
        print(f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
