"""The analysis kept in the trace file: ``hoptrace analyze --save`` writes it; the report and the web view reuse it while it is current.

What is saved is the part of :class:`Analysis` that costs: each hop's place in its request
(the rebuild: ``parent_id``, ``link``, ``link_candidates``, ``link_confidence``) and the
findings (the detectors). Everything else (request, depth and order, endpoints, token
uses, sessions, self time, critical path, latency tables) is derived again from the loaded
hops, which reading the file needs anyway; so an analysis built from a saved one is the
analysis a fresh run gives, and the tests hold it to that.

A saved analysis is **current** when the file still holds exactly the hops it analysed
(the recorder and the importers only append hops, with ids above every earlier one: the
count of hops and the largest id say whether any came since), the same captures, open or
ended, the same hoptrace (version and detector kinds), and, for a caller that asks for
options, the same options. :func:`load_saved` says which; it returns None for an analysis
that is missing, stale or unreadable (a file is untrusted: a forged saved analysis that
does not add up is set aside, with a note, and the file analysed afresh).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import sqlite_utils

import hoptrace
from hoptrace._errors import AnalysisError, TraceFileError
from hoptrace._format import utc
from hoptrace._stored import stored_json
from hoptrace.addons._rows import clean
from hoptrace.analyzer._analysis import Analysis, analyze
from hoptrace.analyzer._config import AnalyzerConfig
from hoptrace.analyzer._detectors import FINDING_COLUMNS, KINDS, empty_findings
from hoptrace.analyzer._load import Tables
from hoptrace.analyzer._render import _jsonable
from hoptrace.analyzer._traces import LINKS, _Links, _with_links
from hoptrace.analyzer._types import SEVERITIES
from hoptrace.db import ANALYSIS_SCHEMA, SQLITE_ERRORS, open_for_reading, open_for_saving

FORMAT = 1
"""Layout of the saved analysis tables; a reader takes only its own."""
_NOT_FINDINGS = ("worst", "extra_hop_columns")
"""Options that change neither links nor findings: how many trees a report draws, which extra columns are read."""


@dataclass
class SavedAnalysis:
    """A current saved analysis: the options it was made with, each hop's link (by hop id), the findings."""

    config: AnalyzerConfig
    links: pd.DataFrame
    """Indexed by hop id: ``parent_id`` (Int64), ``link``, ``link_candidates``, ``link_confidence``."""
    findings: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    def relink(self, hops: pd.DataFrame) -> pd.DataFrame:
        """``hops`` (loaded, in start order) with the columns the rebuild adds, from the saved links."""
        links = self.links.reindex(hops.index)
        parent = hops.index.get_indexer(links["parent_id"].fillna(-1).to_numpy(np.int64))
        kind = pd.Categorical(links["link"], categories=LINKS).codes.astype(np.int8)
        found = _Links(parent=parent.astype(np.int64), link=kind, candidates=links["link_candidates"].to_numpy(np.int64),
                       confidence=links["link_confidence"].to_numpy(np.float64), todo=np.zeros(len(hops), bool))  # fmt: skip
        return _with_links(hops, found)


def analysis_for(path: str | Path | Sequence[str | Path], config: AnalyzerConfig | None = None) -> Analysis:
    """The whole file's analysis: the saved one when it is current (the rebuild and the detectors skipped),
    else a fresh one. Without ``config``, a saved analysis is taken with the options it was saved with.
    Several files are analysed afresh, joined: no one file holds their analysis."""
    return analyze(path, config=config, reuse_saved=True)


# -- writing ----------------------------------------------------------------------------


# Rows per write transaction: the recorder of a capture still running waits at most 5 s
# (its busy timeout) for the write lock and drops its batch after that, so a save never
# holds the lock for more than one chunk's insert (milliseconds).
CHUNK_ROWS = 10_000


def save(path: str | Path, analysis: Analysis) -> dict[str, int]:
    """Write ``analysis`` (of the whole file at ``path``) into the file's analysis tables, replacing
    what was saved before. Returns the rows written per table.

    The ``analysis`` row, which says what the saved tables are current for, goes first and comes
    back last: the old one is deleted in the first short transaction, the rows are written in
    transactions of :data:`CHUNK_ROWS`, and the new ``analysis`` row commits in the last one.
    Until then readers find no saved analysis and analyse afresh, and a save that stops half-way
    leaves none, so no reader ever sees half of one, and a recorder writing the same file never
    waits more than one chunk for the lock.

    Upgrades an older file to the current schema first. On a capture still being recorded, the
    analysis is saved for the hops it read: the file records that bound, and readers analyse
    afresh once a hop past it arrives. Raises :class:`TraceFileError` (one line) for a file it
    cannot write.
    """
    hops, findings = analysis.hops, analysis.findings
    link_rows = _link_rows(hops)
    finding_rows, finding_hop_rows = _finding_rows(findings)
    bound = int(hops.index.max()) if len(hops) else None
    conn = open_for_saving(path)
    try:
        db = sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)
        with db.atomic():
            conn.execute("DELETE FROM analysis")
        for table in ("finding_hops", "findings", "analysis_hops"):
            with db.atomic():
                conn.execute(f"DELETE FROM {table}")
        # executemany of tuples: the recorder's measured 3.7x over insert_all of dicts (README: trace file schema)
        for sql, rows in (
            ("INSERT INTO analysis_hops VALUES (?, ?, ?, ?, ?, ?, ?)", link_rows),
            ("INSERT INTO findings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", finding_rows),
            ("INSERT INTO finding_hops VALUES (?, ?, ?)", finding_hop_rows),
        ):
            for start in range(0, len(rows), CHUNK_ROWS):
                with db.atomic():
                    conn.executemany(sql, rows[start : start + CHUNK_ROWS])
        with db.atomic():
            _write_analysis_row(db, analysis, bound, len(finding_rows))
    except SQLITE_ERRORS as exc:
        raise TraceFileError(f"{path}: cannot save the analysis: {exc}") from None
    finally:
        conn.close()
    return {"analysis_hops": len(link_rows), "findings": len(finding_rows), "finding_hops": len(finding_hop_rows)}


def _write_analysis_row(db: sqlite_utils.Database, analysis: Analysis, bound: int | None, findings: int) -> None:
    counted, captures, open_ = db.conn.execute(
        "SELECT (SELECT count(*) FROM hops WHERE id <= ?), (SELECT count(*) FROM captures),"
        " (SELECT count(*) FROM captures WHERE ended_at IS NULL)",
        (-1 if bound is None else bound,),
    ).fetchone()
    db["analysis"].insert({
        "id": 1, "format": FORMAT, "hoptrace_version": hoptrace.__version__, "kinds": ",".join(KINDS),
        "config": _config_json(analysis.config), "saved_at": time.time(), "hops": counted, "max_hop_id": bound,
        "captures": captures, "captures_open": open_, "findings": findings,
    })  # fmt: skip


def _link_rows(hops: pd.DataFrame) -> list[tuple]:
    parent = hops["parent_id"].astype("Int64").astype(object).where(hops["parent_id"].notna(), None)
    return list(zip(
        hops.index.tolist(), hops["trace"].astype(np.int64).tolist(), parent.tolist(), hops["link"].astype(str).tolist(),
        hops["link_confidence"].astype(float).tolist(), hops["link_candidates"].astype(np.int64).tolist(),
        hops["depth"].astype(np.int64).tolist(),
    ))  # fmt: skip


def _finding_rows(findings: pd.DataFrame) -> tuple[list[tuple], list[tuple]]:
    rows, hop_rows = [], []
    for number, f in enumerate(findings[list(FINDING_COLUMNS)].itertuples(index=False), start=1):
        trace = None if pd.isna(f.trace) else int(f.trace)
        at = float(f.at) if f.at is not None and math.isfinite(float(f.at)) else None
        evidence = json.dumps(_jsonable(f.details), allow_nan=False)  # ASCII: any text survives, SQLite's json() reads it
        rows.append((number, clean(f.kind), clean(f.severity), trace, *map(_text, (f.service, f.caller, f.callee, f.endpoint)),
                     clean(str(f.message)), evidence, at))  # fmt: skip
        hop_rows.extend((number, position, int(hop)) for position, hop in enumerate(f.hop_ids))
    return rows, hop_rows


def _text(value: object) -> str | None:
    return None if value is None or (not isinstance(value, str) and pd.isna(value)) else clean(str(value))


def _config_json(config: AnalyzerConfig) -> str:
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_FINDINGS}
    return json.dumps(fields, sort_keys=True)


def _config_of(text: str, base: AnalyzerConfig) -> AnalyzerConfig:
    """The saved options over ``base`` (for the options that change no finding); AnalysisError if they are not options."""
    fields = json.loads(text)
    if not isinstance(fields, dict) or set(fields) & set(_NOT_FINDINGS):
        raise AnalysisError("the saved options are not an object of analyzer options")
    fixed = {k: tuple(v) if isinstance(v, list) else {a: tuple(b) for a, b in v.items()} if isinstance(v, dict) else v
             for k, v in fields.items()}  # fmt: skip
    try:
        return dataclasses.replace(base, **fixed)
    except TypeError as exc:  # an unknown option
        raise AnalysisError(f"the saved options are not this hoptrace's: {exc}") from None


# -- reading ----------------------------------------------------------------------------


class _Unreadable(Exception):
    """The saved analysis does not add up; the message says how."""


def load_saved(path: str | Path, tables: Tables, config: AnalyzerConfig | None = None) -> SavedAnalysis | None:
    """The analysis saved in ``path`` when it is current for ``tables`` (the file's hops as loaded) and
    ``config`` (None: any options, taken as saved); None when there is none, it is stale, or it does not
    add up (then with a note on ``tables``)."""
    try:
        conn = open_for_reading(path, check=False)  # the loader checks the file's structure, and analyze() waits for it
    except TraceFileError:
        return None
    try:
        conn.execute("BEGIN")  # the bounds and the saved rows from one snapshot
        meta = _current_meta(conn, config)
        if meta is None:
            return None
        base = config or AnalyzerConfig()
        saved_config = _config_of(meta["config"], base)
        links = _read_links(conn, tables.hops)
        findings = _read_findings(conn, set(tables.hops.index.tolist()))
    except (_Unreadable, AnalysisError, ValueError, TypeError, OverflowError, RecursionError, *SQLITE_ERRORS) as exc:
        tables.notes.append(f"the analysis saved in the file does not add up ({_one_line(exc)}); analysed afresh")
        return None
    finally:
        conn.close()
    notes = []
    if config is None and _config_json(saved_config) != _config_json(base):
        notes.append(f"findings as saved by hoptrace analyze --save at {utc(meta['saved_at'])} with options "
                     f"{_changed(saved_config, base)}")  # fmt: skip
    return SavedAnalysis(config=saved_config, links=links, findings=findings, notes=notes)


def _current_meta(conn, config: AnalyzerConfig | None) -> dict | None:
    """The saved analysis's row when it is current for the file and ``config``, else None."""
    if conn.execute("PRAGMA user_version").fetchone()[0] < ANALYSIS_SCHEMA:
        return None  # nothing saved: no analysis tables
    conn.row_factory = _dict_row
    try:
        meta = conn.execute("SELECT * FROM analysis WHERE id = 1").fetchone()
        now = conn.execute(
            "SELECT (SELECT count(*) FROM hops) AS hops, (SELECT max(id) FROM hops) AS max_hop_id,"
            " (SELECT count(*) FROM captures) AS captures,"
            " (SELECT count(*) FROM captures WHERE ended_at IS NULL) AS captures_open"
        ).fetchone()
    finally:
        conn.row_factory = None
    if meta is None:
        return None
    same_file = all(meta.get(k) == now[k] for k in now)
    same_hoptrace = (meta.get("format"), meta.get("hoptrace_version"), meta.get("kinds")) == (
        FORMAT,
        hoptrace.__version__,
        ",".join(KINDS),
    )
    if not (same_file and same_hoptrace and isinstance(meta.get("config"), str)):
        return None
    if config is not None and json.loads(meta["config"]) != json.loads(_config_json(config)):
        return None
    return meta


def _dict_row(cursor, row) -> dict:
    return {d[0]: v for d, v in zip(cursor.description, row)}


# Each link as numbers, checked inside SQLite (no Python object per text value): -1 a NULL parent; -2 a value
# hoptrace does not write (a parent or count that is not an integer, a confidence outside 0-1, an unknown kind).
_LINK_SQL = f"""SELECT hop_id,
  CASE WHEN parent_id IS NULL THEN -1 WHEN typeof(parent_id) = 'integer' THEN parent_id ELSE -2 END,
  CASE link {" ".join(f"WHEN '{name}' THEN {code}" for code, name in enumerate(LINKS))} ELSE -2 END,
  CASE WHEN typeof(link_candidates) = 'integer' AND link_candidates >= 0 THEN link_candidates ELSE -2 END,
  CASE WHEN typeof(link_confidence) IN ('integer', 'real') AND link_confidence BETWEEN 0 AND 1 THEN link_confidence
       ELSE -2 END
FROM analysis_hops"""


def _read_links(conn, hops: pd.DataFrame) -> pd.DataFrame:
    rows = conn.execute(_LINK_SQL).fetchall()
    ids = hops.index
    try:
        table = np.array(rows, dtype=np.float64).reshape(-1, 5)  # ids up to 2**53 are exact as doubles
    except (TypeError, ValueError):  # a hop id that is text or bytes
        raise _Unreadable("a link of something that is not a hop id") from None
    if np.isnan(table[:, 0]).any():
        raise _Unreadable("a link of no hop")
    links = pd.DataFrame(table[:, 1:], index=pd.Index(table[:, 0], dtype=np.int64), columns=["parent", "kind", "count", "sure"])
    if len(links) != len(ids) or not links.index.is_unique or not ids.isin(links.index).all():
        raise _Unreadable(f"links for {len(links)} hops, {len(ids)} hops read")
    links = links.reindex(ids)
    if (links[["kind", "count", "sure"]] == -2).any(axis=None) or (links["parent"] == -2).any():
        raise _Unreadable("a link kind, parent, count or confidence hoptrace does not write")
    has_parent = (links["parent"] >= 0).to_numpy()
    position = ids.get_indexer(links["parent"].to_numpy(np.int64)[has_parent])
    # The rebuild links a hop only to one that started before it (the longer first on a tie): so no cycle.
    if (position < 0).any() or (position >= np.flatnonzero(has_parent)).any():
        raise _Unreadable("a parent that is not an earlier hop of the file")
    return pd.DataFrame({
        "parent_id": pd.arrays.IntegerArray(np.where(has_parent, links["parent"], 0).astype(np.int64), ~has_parent),
        "link": np.asarray(LINKS, dtype=object)[links["kind"].to_numpy(np.int64)],
        "link_candidates": links["count"].to_numpy(np.int64), "link_confidence": links["sure"].to_numpy(np.float64),
    }, index=ids)  # fmt: skip


def _read_findings(conn, hop_ids: set[int]) -> pd.DataFrame:
    rows = conn.execute(
        "SELECT id, kind, severity, request, service, caller, callee, endpoint, message, evidence, at FROM findings ORDER BY id"
    ).fetchall()
    involved: dict[int, list[int]] = {}
    for finding, hop in conn.execute("SELECT finding_id, hop_id FROM finding_hops ORDER BY finding_id, position"):
        involved.setdefault(finding, []).append(hop)
    out = []
    for number, kind, severity, request, service, caller, callee, endpoint, message, evidence, at in rows:
        ids = involved.get(number, [])
        texts_ok = all(v is None or isinstance(v, str) for v in (service, caller, callee, endpoint))
        if kind not in KINDS or severity not in SEVERITIES or not isinstance(message, str) or not texts_ok:
            raise _Unreadable(f"finding {number} is not one hoptrace makes")
        if not all(isinstance(i, int) and i in hop_ids for i in ids) or not (request is None or request in hop_ids):
            raise _Unreadable(f"finding {number} names a hop the file does not hold")
        if at is not None and not isinstance(at, (int, float)):
            raise _Unreadable(f"finding {number} has a time that is not a number")
        details = stored_json(evidence, _Unreadable)  # the class itself: no JSON value is it
        if details is _Unreadable:
            raise _Unreadable(f"finding {number} has evidence that is not JSON")
        out.append((kind, severity, request, service, caller, callee, endpoint, ids, message, details,
                    np.nan if at is None else float(at)))  # fmt: skip
    if not out:
        return empty_findings()
    findings = pd.DataFrame(out, columns=list(FINDING_COLUMNS))
    # The dtypes the detectors' frames give: severity filled in as objects, the other text inferred.
    return findings.astype({"severity": object, "trace": "Int64", "at": "float64"})


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def _changed(saved: AnalyzerConfig, base: AnalyzerConfig) -> str:
    ours, theirs = dataclasses.asdict(saved), dataclasses.asdict(base)
    return ", ".join(f"{k}={ours[k]!r}" for k in ours if k not in _NOT_FINDINGS and ours[k] != theirs[k])
