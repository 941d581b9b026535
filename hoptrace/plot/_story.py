"""A finding told in one sentence with its numbers, for the top of the report.

Built from the presentation model's finding and hop rows: which request, who called
whom, how late or how close. The detector's own message stays the fallback (and is
shown beside the story), so a kind without a phrasing here still reads.
"""

from __future__ import annotations

from typing import Any

from hoptrace._format import as_float, as_int, clean, is_missing, ms, seconds
from hoptrace.analyzer._model import Model, callers


def story(m: Model, finding: dict[str, Any]) -> str:
    """``finding`` (a row of ``Analysis.findings`` as a dict) in one sentence, plain text."""
    hops = m.analysis.hops
    trace = as_int(finding.get("trace"))
    lead = ""
    if trace is not None and trace in hops.index:
        r = m.request(trace)
        lead = f"Request {trace} ({clean(r.method, 10)} {clean(r.path, 80)} at {clean(r.service, 40)} → {r.ended}" + (
            f" in {ms(r.duration_ms)}): " if r.duration_ms is not None else "): "
        )
    ids = [int(i) for i in list(finding.get("hop_ids") or []) if int(i) in hops.index]
    details = finding.get("details") if isinstance(finding.get("details"), dict) else {}
    told = _told(m, str(finding.get("kind")), details, ids, trace)
    return lead + (told or clean(finding.get("message"), 400))


def _told(m: Model, kind: str, d: dict, ids: list[int], trace: int | None) -> str | None:
    """The sentence for the kinds whose numbers tell the story best; None: use the message."""
    hops = m.analysis.hops
    if kind == "expired_mid_flow" and ids:
        # The hop the finding names (its endpoint); the others carried the token after exp too.
        first = next((i for i in ids if str(hops.at[i, "endpoint"]) == str(d.get("endpoint"))), ids[0])
        late = hops.loc[first]
        caller = clean(callers(hops.loc[[first]].pipe(_with_parent, hops)).iloc[-1], 40)
        root = hops.loc[trace] if trace is not None and trace in hops.index else None
        late_by, left = as_float(d.get("late_by_s")), as_float(d.get("remaining_at_entry_s"))
        status = as_int(late["status"])
        sent = f"{caller} sent the token to {clean(late['service'], 40)} {clean(d.get('endpoint') or late['endpoint'], 80)}"
        when = f" {seconds(late_by)} after its exp" if late_by is not None else " after its exp"
        got = f" and got {status}" if status is not None else " and got no response"
        entry = ""
        if root is not None and left is not None:
            entry = f"; the token had {seconds(left)} left when it entered {clean(root['service'], 40)}"
        more = (as_int(d.get("late_hops")) or len(ids)) - 1
        others = f"; {more} more hop{'s' * (more != 1)} carried it after its exp" if more > 0 else ""
        return sent + when + got + entry + others + "."
    if kind == "near_expiry" and ids:
        hop = hops.loc[ids[-1]]
        left = as_float(d.get("remaining_s"))
        return (f"the token reached {clean(hop['service'], 40)} {clean(hop['endpoint'], 80)} with "
                f"{seconds(left) if left is not None else '?'} of life left.")  # fmt: skip
    return None


def _with_parent(one, hops):
    """``one`` (a hop row frame) with its parent row too, so :func:`callers` can name the caller."""
    import pandas as pd

    parent = as_int(one["parent_id"].iloc[0]) if not is_missing(one["parent_id"].iloc[0]) else None
    return pd.concat([hops.loc[[parent]], one]) if parent is not None and parent in hops.index else one
