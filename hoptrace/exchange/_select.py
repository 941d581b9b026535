"""What every export reads: the stored hops (already redacted) joined with hoptrace's analysis, filtered."""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from hoptrace._errors import AnalysisError
from hoptrace._stored import YEAR_10000, stored_json, stored_value
from hoptrace.db import COLUMNS, ids_are_rowids, open_for_reading

_BATCH = 50_000
# Analysis columns carried to every export, beside the stored hop.
ANALYSIS_COLUMNS = ("trace", "parent_id", "link", "link_candidates", "link_confidence", "depth", "endpoint", "token_fp", "token_sub", "token_exp", "remaining_s")


@dataclass
class Selection:
    """The hops an export covers, with the analysis of the whole files they came from.

    With several files (one joined analysis), a stored row takes the joined ids: hop ``i`` of
    file ``k`` of ``K`` is hop ``i * K + k``, its capture the joined one (``hoptrace.analyzer._merge``).
    """

    files: tuple[Path, ...]
    analysis: object  # hoptrace.analyzer.Analysis
    hop_ids: set[int]
    findings_by_hop: dict[int, list[dict]]

    def hops(self) -> Iterator[dict]:
        """Stored hop rows in start order, each with its analysis columns, streamed from the files."""
        info = self.analysis.hops
        extra = _records(info, [c for c in (*ANALYSIS_COLUMNS, "capture_id") if c in info.columns])
        streams = [self._stored(k, extra) for k in range(len(self.files))]
        yield from streams[0] if len(streams) == 1 else heapq.merge(*streams, key=_start_order)

    def rows(self, table: str, k: int, ids: Sequence[int] | None = None) -> Iterator[tuple[list[str], list[tuple]]]:
        """``table`` of file ``k`` as stored, in batches: (column names, rows). ``ids`` (of hops, as file ``k``
        stores them): only the rows that may hold them."""
        conn = open_for_reading(self.files[k], check=False)  # analyze() already ran quick_check on it
        conn.text_factory = lambda data: data.decode("utf-8", "replace")  # an untrusted file may hold bad UTF-8
        try:
            where, args = _id_range(conn, ids) if ids is not None else ("", ())
            order = " ORDER BY started_at, id" if table == "hops" else ""
            cursor = conn.execute(f"SELECT * FROM {table}{where}{order}", args)
            names = [d[0] for d in cursor.description]
            while batch := cursor.fetchmany(_BATCH):
                yield names, batch
        finally:
            conn.close()

    def hop_id(self, value: object, k: int) -> object:
        """A hop id stored in file ``k`` (a hop's, or a sighting's) as the analysis numbers it: typed as the
        loader types it (a hostile table's 4.5 is hop 4), then joined (hop ``i`` of file ``k`` of ``K`` is
        ``i * K + k``); anything that is no whole number stays as it is."""
        value, count = stored_value(value, int), len(self.files)
        return value * count + k if count > 1 and isinstance(value, int) and not isinstance(value, bool) else value

    def _stored(self, k: int, extra: dict) -> Iterator[dict]:
        count = len(self.files)
        stored_ids = [(joined - k) // count for joined in self.hop_ids if joined % count == k]
        for names, batch in self.rows("hops", k, stored_ids):
            names = tuple(names)
            at_id = names.index("id")
            for values in batch:
                # The id first: a row outside the selection (most of a live OTLP window's, which keeps
                # minutes of hops to send a few seconds') is never typed.
                hop_id = self.hop_id(values[at_id], k)
                if hop_id not in self.hop_ids:
                    continue
                hop = _typed_hop(names, values)
                hop["id"] = hop_id
                if hop["started_at"] is None:
                    continue
                analysed = extra.get(hop_id, {})
                for column in ANALYSIS_COLUMNS:
                    hop[column] = plain(analysed.get(column))
                if count > 1:
                    hop["capture_id"], hop["file"] = plain(analysed.get("capture_id")), str(self.files[k])
                hop["findings"] = self.findings_by_hop.get(hop_id, [])
                yield hop

    def tokens(self) -> dict[str, dict]:
        """Stored token rows (decoded claims, never a raw token), by fingerprint."""
        tokens = self.analysis.tokens
        return {fp: {name: plain(v) for name, v in row.items()} for fp, row in _records(tokens, list(tokens.columns)).items()}


def _records(frame, columns: list[str]) -> dict[object, dict]:
    """``frame``'s rows as dicts of ``columns``, by index, read column by column: DataFrame.to_dict("index")
    boxes every value one at a time (~35 µs a hop, as much as reading the hop)."""
    rows = zip(*(frame[column].astype(object).tolist() for column in columns)) if columns else ((),) * len(frame)
    return {key: dict(zip(columns, row)) for key, row in zip(frame.index.tolist(), rows)}


def _id_range(conn, ids: Sequence[int]) -> tuple[str, tuple]:
    """A WHERE clause keeping the hops that may hold ``ids``: those between the least and the greatest
    (SQLite then searches the rowid) and, in a hostile table without its key, any id that is not an
    integer, which only the id check in Python can place."""
    between, args = ("id BETWEEN ? AND ?", (min(ids), max(ids))) if ids else ("0", ())
    if ids_are_rowids(conn.execute("PRAGMA table_info(hops)").fetchall()):
        return f" WHERE {between}", args
    return f" WHERE typeof(id) != 'integer' OR {between}", args


def _typed_hop(names: tuple[str, ...], values: Sequence) -> dict:
    """A stored hop row with every column its declared type; times a HAR or OTLP can carry, else None
    (an end without a usable time is taken as the start: the hop lasted no time we know of)."""
    hop = dict.fromkeys(COLUMNS["hops"])  # a column the file lacks is read as empty, as the analysis reads it
    for name, value, (kind, is_time) in zip(names, values, _hop_kinds(names), strict=True):
        # SQLite hands text and integers over as str and int, always in range: those are their type already.
        typed = value if type(value) is kind and kind is not float else stored_value(value, kind)
        hop[name] = None if is_time and typed is not None and not 0 <= typed < YEAR_10000 else typed
    if hop.get("ended_at") is None:
        hop["ended_at"] = hop.get("started_at")
    return hop


@cache
def _hop_kinds(names: tuple[str, ...]) -> tuple[tuple[type, bool], ...]:
    """Each column's declared type (text if undeclared), and whether it is a time (a declared number named
    ``*_at``: an undeclared ``seen_at`` of a hostile file is text, compared with no number)."""
    kinds = [COLUMNS["hops"].get(name, (str,))[0] for name in names]
    return tuple((kind, name.endswith("_at") and kind is not str) for name, kind in zip(names, kinds, strict=True))


def _start_order(hop: dict) -> tuple:
    """SQLite's ``ORDER BY started_at, id`` across files: NULL, then numbers, then text."""
    value = hop["started_at"]
    rank = 0 if value is None else 1 if isinstance(value, int | float) else 2 if isinstance(value, str) else 3
    return (rank, value if rank in (1, 2) else 0, hop["id"] if isinstance(hop["id"], int) else 0)


def select(dbs: Sequence[Path], *, trace: str | None = None, since: str | None = None, until: str | None = None, finding: str | None = None) -> Selection:
    """Analyze ``dbs`` (one file, or several as one) and keep the requests the filters name
    (``finding``: requests with a finding of that kind)."""
    from hoptrace.analyzer import KINDS, analyze

    if finding is not None and finding not in KINDS:
        raise AnalysisError(f"--finding {finding!r}: not a finding kind; kinds are {', '.join(KINDS)}")
    # latency=False: no export carries the latency tables (services, endpoints, edges).
    analysis = analyze(dbs, trace=trace, since=since, until=until, latency=False)
    hops, findings = analysis.hops, analysis.findings
    keep = set(int(i) for i in hops.index)
    if finding is not None:
        chosen = findings[findings["kind"] == finding]
        traces = {int(t) for t in chosen["trace"].dropna()}
        touched = {int(i) for ids in chosen["hop_ids"] for i in ids}
        keep = {int(i) for i in hops.index[hops["trace"].isin(traces).to_numpy()]} | (touched & keep)
    by_hop: dict[int, list[dict]] = {}
    for record in findings.to_dict("records"):
        item = {
            "kind": record["kind"], "severity": record["severity"], "message": record["message"],
            "at": plain(record.get("at")), "details": _details(record.get("details")),
        }  # fmt: skip
        for hop_id in record["hop_ids"]:
            if int(hop_id) in keep:
                by_hop.setdefault(int(hop_id), []).append(item)
    return Selection(tuple(dbs), analysis, keep, by_hop)


def plain(value: object) -> object:
    """A pandas/numpy scalar as a JSON-able Python value; NaN, NaT and <NA> as None."""
    kind = type(value)
    if value is None or kind is str or kind is int or kind is bool:  # most values: as they are
        return value
    if hasattr(value, "item"):
        value = value.item()
    try:
        if value != value:  # NaN, NaT, <NA>
            return None
    except (TypeError, ValueError):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _details(value: object) -> object:
    if isinstance(value, str):
        return stored_json(value, value)
    return value if isinstance(value, dict | list) else plain(value)
