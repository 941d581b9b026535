"""Parquet out: the stored tables and hoptrace's analysis, for DuckDB, Polars or Spark.

``hops``, ``tokens``, ``hop_tokens``: the trace DB's tables as stored (already redacted;
tokens are fingerprints and decoded claims), typed from their declared SQLite types and
streamed in batches. ``traces``: each hop's rebuilt request, parent and link.
``findings``: one row per finding, ``hop_ids`` as a list. zstd-compressed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from hoptrace._stored import stored_value
from hoptrace.db import open_for_reading
from hoptrace.exchange._select import Selection, plain

_ARROW_TYPES = {"INTEGER": pa.int64(), "REAL": pa.float64(), "TEXT": pa.string()}
_PYTHON_TYPES = {pa.int64(): int, pa.float64(): float, pa.string(): str}
TABLES = ("hops", "tokens", "hop_tokens", "traces", "findings")


def write_parquet(selection: Selection, out: Path) -> dict[str, int]:
    """Write every table of :data:`TABLES` as ``out/<table>.parquet``; returns rows per table.

    Several files (one joined analysis): their rows together, with the joined hop and capture
    ids and a ``file`` column; a token several files saw is one row.
    """
    out.mkdir(parents=True, exist_ok=True)
    hop_ids = selection.hop_ids
    hop_tokens = selection.analysis.hop_tokens
    fingerprints = set(hop_tokens.loc[hop_tokens["hop_id"].isin(hop_ids), "fingerprint"])
    joined = len(selection.files) > 1
    captures = selection.analysis.hops["capture_id"].to_dict() if joined else {}
    token_captures = selection.analysis.tokens["capture_id"].map(plain).to_dict() if joined else {}
    written: set[str] = set()

    def new_token(row: dict) -> bool:
        keep = row["fingerprint"] in fingerprints and row["fingerprint"] not in written
        written.add(row["fingerprint"])
        return keep

    # How a row of file k is numbered in the joined analysis (one file: as stored).
    def hop(row: dict, k: int) -> dict:
        row["id"] = selection.hop_id(row["id"], k)  # as the analysis numbers it: the check keeps what traces holds
        if joined:
            row["capture_id"] = captures.get(row["id"])
        return row

    def token(row: dict, k: int) -> dict:
        if joined:
            row["capture_id"] = _whole(token_captures.get(row["fingerprint"]))
        return row

    def sighting(row: dict, k: int) -> dict:
        row["hop_id"] = selection.hop_id(row["hop_id"], k)  # typed as the hops' ids: the check keeps what the analysis linked
        return row

    counts = {
        "hops": _copy_table(selection, "hops", out, hop, lambda row: row["id"] in hop_ids),
        "tokens": _copy_table(selection, "tokens", out, token, new_token),
        "hop_tokens": _copy_table(selection, "hop_tokens", out, sighting, lambda row: row["hop_id"] in hop_ids),
    }
    counts["traces"] = _write(_traces(selection), out / "traces.parquet")
    counts["findings"] = _write(_findings(selection), out / "findings.parquet")
    return counts


def _copy_table(selection: Selection, table: str, out: Path, renumber, keep) -> int:
    """``table`` of every file, ``renumber(row, file index)`` then ``keep(row)``, typed by the first file's schema."""
    conn = open_for_reading(selection.files[0], check=False)  # the caller's analysis ran quick_check on it
    try:
        columns = [(row[1], (row[2] or "TEXT").upper()) for row in conn.execute(f"PRAGMA table_info({table})")]
    finally:
        conn.close()
    if len(selection.files) > 1:
        columns.append(("file", "TEXT"))
    schema = pa.schema([(name, _ARROW_TYPES.get(kind, pa.string())) for name, kind in columns])
    rows = 0
    with pq.ParquetWriter(out / f"{table}.parquet", schema, compression="zstd") as writer:
        for k, path in enumerate(selection.files):
            for names, batch in selection.rows(table, k):
                # A file of another schema version: the first file's columns, NULL where this one lacks them.
                kept = [renumber(dict.fromkeys(schema.names) | dict(zip(names, values, strict=True)), k) for values in batch]
                kept = [row | ({"file": str(path)} if "file" in schema.names else {}) for row in kept if keep(row)]
                if kept:
                    table_rows = [{name: row[name] for name in schema.names} for row in kept]
                    writer.write_table(pa.Table.from_pylist([_typed(row, schema) for row in table_rows], schema=schema))
                    rows += len(kept)
    return rows


def _whole(value: object) -> int | None:
    """A joined capture id as the analysis holds it (a float beside NaN) as an integer."""
    return int(value) if isinstance(value, int | float) else None


def _typed(row: dict, schema: pa.Schema) -> dict:
    """SQLite is dynamically typed and the file untrusted: a value of another type becomes NULL or text."""
    for field in schema:
        row[field.name] = stored_value(row[field.name], _PYTHON_TYPES[field.type])
    return row


def _traces(selection: Selection) -> pa.Table:
    hops = selection.analysis.hops
    hops = hops[hops.index.isin(selection.hop_ids)]
    columns = ["trace", "parent_id", "link", "link_candidates", "depth", "order", "endpoint", "service", "token_fp", "token_sub", "token_exp", "remaining_s", "self_ms", "on_critical_path", "file", "file_hop"]
    frame = hops[[c for c in columns if c in hops.columns]].copy()
    for name in ("link", "endpoint", "service", "token_fp", "token_sub", "file"):
        if name in frame:
            frame[name] = frame[name].astype(object).where(frame[name].notna(), None).map(lambda v: None if v in ("nan", "None") else v)
    frame.insert(0, "hop_id", frame.index.astype("int64"))
    return pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)


def _findings(selection: Selection) -> pa.Table:
    findings = selection.analysis.findings
    records = []
    for record in findings.to_dict("records"):
        hop_ids = [int(i) for i in record["hop_ids"]]
        if not selection.hop_ids.intersection(hop_ids):
            continue
        records.append({
            "kind": record["kind"], "severity": record["severity"], "trace": plain(record["trace"]),
            "service": plain(record["service"]), "hop_ids": hop_ids, "message": record["message"],
            "details": json.dumps(record["details"], default=str) if record["details"] is not None else None,
            "at": plain(record["at"]),
        })  # fmt: skip
    schema = pa.schema([
        ("kind", pa.string()), ("severity", pa.string()), ("trace", pa.int64()), ("service", pa.string()),
        ("hop_ids", pa.list_(pa.int64())), ("message", pa.string()), ("details", pa.string()), ("at", pa.float64()),
    ])  # fmt: skip
    return pa.Table.from_pylist(records, schema=schema)


def _write(table: pa.Table, path: Path) -> int:
    pq.write_table(table, path, compression="zstd")
    return table.num_rows
