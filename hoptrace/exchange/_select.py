"""What every export reads: the stored hops (already redacted) joined with hoptrace's analysis, filtered."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hoptrace._errors import AnalysisError
from hoptrace.db import open_for_reading

# Analysis columns carried to every export, beside the stored hop.
ANALYSIS_COLUMNS = ("trace", "parent_id", "link", "link_candidates", "link_confidence", "depth", "endpoint", "token_fp", "token_sub", "token_exp", "remaining_s")


@dataclass
class Selection:
    """The hops an export covers, with the analysis of the whole file they came from."""

    db: Path
    analysis: object  # hoptrace.analyzer.Analysis
    hop_ids: set[int]
    findings_by_hop: dict[int, list[dict]]

    def hops(self) -> Iterator[dict]:
        """Stored hop rows in start order, each with its analysis columns, streamed from the file."""
        info = self.analysis.hops
        extra = info[[c for c in ANALYSIS_COLUMNS if c in info.columns]].astype(object).to_dict("index")
        conn = open_for_reading(self.db, check=False)  # analyze() already ran quick_check on it
        conn.text_factory = lambda data: data.decode("utf-8", "replace")  # an untrusted file may hold bad UTF-8
        try:
            cursor = conn.execute("SELECT * FROM hops ORDER BY started_at, id")
            names = [d[0] for d in cursor.description]
            for values in cursor:
                hop = dict(zip(names, values, strict=True))
                if hop["id"] not in self.hop_ids:
                    continue
                analysed = extra.get(hop["id"], {})
                for column in ANALYSIS_COLUMNS:
                    hop[column] = plain(analysed.get(column))
                hop["findings"] = self.findings_by_hop.get(hop["id"], [])
                yield hop
        finally:
            conn.close()

    def tokens(self) -> dict[str, dict]:
        """Stored token rows (decoded claims, never a raw token), by fingerprint."""
        tokens = self.analysis.tokens
        return {fp: {k: plain(v) for k, v in row.items()} for fp, row in tokens.to_dict("index").items()}


def select(db: Path, *, trace: str | None = None, since: str | None = None, until: str | None = None, finding: str | None = None) -> Selection:
    """Analyze ``db`` and keep the requests the filters name (``finding``: requests with a finding of that kind)."""
    from hoptrace.analyzer import KINDS, analyze

    if finding is not None and finding not in KINDS:
        raise AnalysisError(f"--finding {finding!r}: not a finding kind; kinds are {', '.join(KINDS)}")
    analysis = analyze(db, trace=trace, since=since, until=until)
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
    return Selection(db, analysis, keep, by_hop)


def plain(value: object) -> object:
    """A pandas/numpy scalar as a JSON-able Python value; NaN, NaT and <NA> as None."""
    if value is None:
        return None
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
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value if isinstance(value, dict | list) else plain(value)
