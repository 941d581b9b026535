"""The detectors: each a small function from the rebuilt traces to findings of one kind.

A detector returns a DataFrame with ``trace``, ``service``, ``hop_ids``, ``message``,
``details`` and ``at`` (and, where it knows better than the default, ``caller``, ``callee``
and ``endpoint``); :func:`run_detectors` adds ``kind`` and ``severity``, names the caller
(the service whose call it was: the parent hop's, ``client`` for a request), the callee
and the endpoint of each finding's hop, and sorts.
Token times are judged on the proxy's clock, which is the one clock every hop shares.
A token is expired at ``exp`` itself (RFC 7519: "on or after"), as pyjwt judges it.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from functools import cached_property

import numpy as np
import pandas as pd

from hoptrace._format import hop_ended
from hoptrace._stored import stored_json
from hoptrace.analyzer._arrays import group_codes, group_keys, group_quantiles, run_starts, taken
from hoptrace.analyzer._config import AnalyzerConfig
from hoptrace.analyzer._headers import REDACTED_PREFIX, HeaderReader, empty_lines
from hoptrace.analyzer._latency import is_error
from hoptrace.analyzer._prepare import validation_mask
from hoptrace.analyzer._types import SEVERITY_RANK

FINDING_COLUMNS = ("kind", "severity", "trace", "service", "caller", "callee", "endpoint", "hop_ids", "message", "details", "at")


@dataclass
class Context:
    """What the detectors read: the rebuilt hops, token sightings, sessions, options."""

    hops: pd.DataFrame
    hop_tokens: pd.DataFrame
    tokens: pd.DataFrame
    uses: pd.DataFrame  # presented / validated sightings (see _prepare.token_uses)
    sessions: pd.DataFrame
    config: AnalyzerConfig = field(default_factory=AnalyzerConfig)
    headers: HeaderReader | None = None
    """Where the header lines of chosen hops come from (None: no header is read)."""

    def header_lines(self, hop_ids, side: str, **containing) -> pd.DataFrame:
        """``hop_id name value`` of these hops' headers on ``side`` (none without a reader);
        see :meth:`HeaderReader.lines`."""
        if self.headers is None:
            return empty_lines()
        return self.headers.lines(hop_ids, side, **containing)

    @cached_property
    def used(self) -> pd.DataFrame:
        """``uses`` with the facts of the hop and of its request alongside."""
        return _with_hop(self.uses, self.hops)

    @cached_property
    def issued(self) -> pd.DataFrame:
        """Issued sightings with their hop's facts."""
        rows = self.hop_tokens[self.hop_tokens["role"] == "issued"].drop_duplicates(["hop_id", "fingerprint"])
        rows = rows.rename(columns={"fingerprint": "fp"})[["hop_id", "fp"]]
        return _with_hop(rows, self.hops)

    @cached_property
    def caller(self) -> pd.Series:
        """The service that made each hop, by hop id (see :func:`callers`)."""
        return callers(self.hops)

    @cached_property
    def service_keys(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The service credentials and the services they guard (see :func:`service_keys`)."""
        return service_keys(self)

    @cached_property
    def keyless(self) -> pd.DataFrame:
        """Refused calls without the service credential their service requires (see :func:`keyless_refusals`)."""
        return keyless_refusals(self)

    @cached_property
    def retried(self) -> pd.DataFrame:
        """The calls of callers that saw a call fail, each with ``bad`` (see :func:`_calls_of_failed_callers`)."""
        return _calls_of_failed_callers(self.hops)

    @cached_property
    def skew(self) -> pd.DataFrame:
        """Clock offset estimates per (service, source), see :func:`skew_estimates`."""
        return skew_estimates(self)

    @cached_property
    def owners(self) -> pd.DataFrame:
        """Whose each request is, by trace id: ``subject``, ``sub`` (its code into ``uses["sub"]``'s subjects,
        -1: unknown) and ``by_session`` (the subject is its session's, see :func:`request_owners`)."""
        return request_owners(self)


_HOP_FACTS = (
    "trace", "depth", "service", "endpoint", "path", "status", "failed", "error_kind",
    "started_at", "ended_at", "response_start_at", "is_validation",
)  # fmt: skip


def _with_hop(rows: pd.DataFrame, hops: pd.DataFrame) -> pd.DataFrame:
    """``rows`` (with ``hop_id``) of known hops, with their hop's facts and their request's root's.

    Taken by position, column by column, into one new frame: a join, a reindex of the roots and four
    column assignments cost 2 to 3 times as much, most of it pandas' fixed cost per operation."""
    at = hops.index.get_indexer(rows["hop_id"].to_numpy())
    known = at >= 0
    out = rows.copy(deep=False) if known.all() else rows[known]
    at = at[known]
    facts = {c: _taken_array(hops[c], at) for c in _HOP_FACTS}
    root = hops.index.get_indexer(facts["trace"])
    started = _at_root(hops["started_at"], root)
    facts.update(
        root_start=started, root_duration_s=_at_root(hops["ended_at"], root) - started,
        root_endpoint=_at_root(hops["endpoint"], root),
    )  # fmt: skip
    # The arrays are fresh takes: the frame holds them as they are (a copy is ~150 MB at a million uses).
    return pd.concat([out, pd.DataFrame(facts, index=out.index, copy=False)], axis=1)


def _taken_array(column: pd.Series, positions: np.ndarray) -> np.ndarray | pd.api.extensions.ExtensionArray:
    return column.to_numpy()[positions] if isinstance(column.dtype, np.dtype) else column.array.take(positions)


def _at_root(column: pd.Series, root: np.ndarray) -> np.ndarray | pd.api.extensions.ExtensionArray:
    """``column``'s value at each position of ``root``, as ``reindex`` gives it: missing at -1 (a root not
    among the hops). A Categorical stays one (as object values, 0.07 s more at 1M uses)."""
    if isinstance(column.dtype, np.dtype):
        return taken(column.to_numpy(np.float64), root, np.nan)
    return column.array.take(root, allow_fill=True)


def _findings(rows: list[dict]) -> pd.DataFrame:
    """A detector's findings; a row may set ``severity`` to differ from its detector's."""
    return pd.DataFrame(rows, columns=[c for c in FINDING_COLUMNS if c != "kind"])


class _Groups:
    """Rows grouped by ``keys``, each group in time order, without a Python loop over groups.

    Detectors build one finding per group from ``first`` (the group's earliest row, as
    plain lists) and ``lists`` (a column's values per group): pandas' group iteration
    costs about a millisecond a group, which at a million hops is minutes. Only the columns
    asked for are put in group order: reordering every column of ``rows`` at once cost more
    than the rest of most detectors on a live view's tail.
    """

    def __init__(self, rows: pd.DataFrame, keys: list[str], by: str = "started_at") -> None:
        code = group_codes(rows, keys)
        self.order = np.lexsort((rows.index.to_numpy(), rows[by].to_numpy(), code))
        self.rows = rows
        code = code[self.order]
        self.starts = np.flatnonzero(run_starts(code))
        self.counts = np.diff(np.r_[self.starts, len(code)])

    def __len__(self) -> int:
        return len(self.starts)

    def first(self, column: str) -> list:
        return self.at(column, 0)

    def at(self, column: str, offset: np.ndarray | int) -> list:
        """The value of ``column`` at row ``offset`` of each group."""
        return _taken(self.rows[column], self.order[self.starts + offset])

    def lists(self, column: str) -> list[list]:
        return self._split(_taken(self.rows[column], self.order))

    def ids(self) -> list[list[int]]:
        """The index (hop ids) of each group's rows."""
        return self._split(self.rows.index[self.order].tolist())

    def sum(self, column: str) -> np.ndarray:
        values = self.rows[column].to_numpy(dtype=np.float64, na_value=np.nan)[self.order]
        return np.add.reduceat(values, self.starts) if len(self) else np.zeros(0)

    def _split(self, values: list) -> list[list]:
        ends = (self.starts + self.counts).tolist()
        return [values[a:b] for a, b in zip(self.starts.tolist(), ends)]


def _taken(column: pd.Series, positions: np.ndarray) -> list:
    """``column.iloc[positions].tolist()``, the same Python values, without the Series between
    (a detector asks for a dozen columns: the Series cost it 3 to 5 ms on a live view's tail)."""
    return _taken_array(column, positions).tolist()


_status = hop_ended  # how a hop ended, in the words every report uses


def _statuses(g: _Groups) -> list[list[str]]:
    triples = zip(g.lists("status"), g.lists("failed"), g.lists("error_kind"))
    return [[_status(*t) for t in zip(*lists)] for lists in triples]


def _int_or_none(value) -> int | None:
    return None if value is None or pd.isna(value) else int(value)


# -- token expiry ---------------------------------------------------------------------


def expired_mid_flow(ctx: Context) -> pd.DataFrame:
    """A token valid when the request entered, presented at a later hop of it at or after ``exp``."""
    u = ctx.used
    late = u[(u["depth"] > 0) & (u["exp"] > u["root_start"]) & (u["started_at"] >= u["exp"])]
    if late.empty:
        return _findings([])
    issued = ctx.issued
    here = pd.MultiIndex.from_arrays([issued["trace"], issued["fp"]])
    late = late.assign(
        mid=pd.MultiIndex.from_arrays([late["trace"], late["fp"]]).isin(here), caller=late["hop_id"].map(ctx.caller).to_numpy()
    )
    g = _Groups(late, ["trace", "fp"])
    before = _earlier_check(ctx, late, g)
    rows = []
    for trace, fp, caller, svc, endpoint, path, status, failed, kind, start, exp, entered, root, mid, checking, ids, prior in zip(
        g.first("trace"), g.first("fp"), g.first("caller"), g.first("service"), g.first("endpoint"), g.first("path"),
        g.first("status"), g.first("failed"), g.first("error_kind"), g.first("started_at"), g.first("exp"),
        g.first("root_start"), g.first("root_endpoint"), g.first("mid"), g.first("is_validation"), g.lists("hop_id"), before,
    ):  # fmt: skip
        late_by, left = start - exp, exp - entered
        origin = "a token issued during the request" if mid else "the token"
        if checking:
            act = f"{'re-validated' if prior is not None and prior[3] else 'validated'} {origin} at"
        else:
            act = f"sent {origin} to"
        if prior is not None:
            prior_caller, prior_svc, prior_at, prior_checked = prior
            earlier = (
                f"{prior_caller} had {'validated it at' if prior_checked else 'sent it to'} {prior_svc}"
                f" {start - prior_at:.2f} s earlier with {exp - prior_at:.2f} s left"
            )
        else:
            earlier = f"it had {left:.2f} s left when {root} entered"
        rows.append({
            "trace": trace, "service": svc, "caller": caller, "hop_ids": ids,
            "message": (
                f"{caller} {act} {svc} {endpoint} {late_by:.2f} s after exp ({_status(status, failed, kind)}); {earlier}"
            ),
            "details": {
                "fingerprint": fp, "exp": exp, "entered_at": entered, "remaining_at_entry_s": left,
                "late_by_s": late_by, "path": path, "endpoint": endpoint, "status": _int_or_none(status),
                "late_hops": len(ids), "issued_during_request": bool(mid), "caller": caller,
                "earlier_check": None if prior is None else {"caller": prior[0], "service": prior[1], "at": prior[2]},
            },
            "at": entered,
        })  # fmt: skip
    return _findings(rows)


def _earlier_check(ctx: Context, late: pd.DataFrame, g: _Groups) -> list[tuple | None]:
    """Per group of ``g`` (trace, fp): the last hop below the entry that carried the token
    while it was still valid, a validation preferred: ``(caller, service, started_at, validated)``."""
    groups = list(zip(g.first("trace"), g.first("fp")))
    late_at = dict(zip(groups, g.first("started_at")))
    u = ctx.used
    u = u.loc[
        (u["depth"].to_numpy() > 0) & u["trace"].isin(g.first("trace")).to_numpy(),
        ["trace", "fp", "hop_id", "service", "started_at", "exp", "is_validation"],
    ]
    # Each use against its group's late hop, looked up: a merge on (trace, fp) did the same at ~4 ms of fixed cost.
    late = np.array([late_at.get(key, np.nan) for key in zip(u["trace"].tolist(), u["fp"].tolist())], dtype=np.float64)
    started = u["started_at"].to_numpy()
    u = u[(started < late) & (started < u["exp"].to_numpy())]
    u = u.assign(caller=u["hop_id"].map(ctx.caller).to_numpy())
    u = u.sort_values(["is_validation", "started_at"]).drop_duplicates(["trace", "fp"], keep="last")
    found = {
        (t, f): (c, str(s), a, bool(v))
        for t, f, c, s, a, v in zip(u["trace"], u["fp"], u["caller"], u["service"], u["started_at"], u["is_validation"])
    }
    return [found.get(key) for key in groups]


def expired_in_session(ctx: Context) -> pd.DataFrame:
    """A token valid at its first request of a session, presented by a later one after ``exp``,
    with no token issued to the session in between."""
    u = ctx.used
    s = ctx.sessions.set_index("trace")["session"]
    columns = ["hop_id", "trace", "fp", "exp", "started_at", "service", "endpoint", "status", "failed", "error_kind"]
    at_entry = u.loc[(u["depth"] == 0).to_numpy() & u["exp"].notna().to_numpy(), columns]
    at_entry = at_entry.assign(session=at_entry["trace"].map(s)).dropna(subset=["session"])
    valid = at_entry[at_entry["started_at"] < at_entry["exp"]]
    first_valid = valid.sort_values("started_at").drop_duplicates(["session", "fp"])
    expired = at_entry[at_entry["started_at"] >= at_entry["exp"]]
    if expired.empty:
        return _findings([])
    pairs = first_valid.merge(expired, on=["session", "fp"], suffixes=("", "_late"))
    pairs = pairs[pairs["started_at_late"] > pairs["started_at"]]
    if pairs.empty:
        return _findings([])
    # A token issued to the session between the first use and the expired one is a refresh.
    issued = ctx.issued[ctx.issued["depth"] == 0].assign(session=lambda f: f["trace"].map(s))
    issued = issued[["session", "fp", "started_at"]].rename(columns={"fp": "new_fp", "started_at": "issued_at"})
    windows = pairs.merge(issued, on="session")
    refreshed = windows[
        (windows["new_fp"] != windows["fp"]) & (windows["issued_at"] > windows["started_at"])
        & (windows["issued_at"] < windows["started_at_late"])
    ]  # fmt: skip
    done = pd.MultiIndex.from_arrays([refreshed["session"], refreshed["fp"]])
    pairs = pairs[~pd.MultiIndex.from_arrays([pairs["session"], pairs["fp"]]).isin(done)]
    if pairs.empty:
        return _findings([])
    g = _Groups(pairs, ["session", "fp"], by="started_at_late")
    rows = []
    for session, fp, exp, first_at, first_trace, first_hop, first_endpoint, at, trace, hop, endpoint, svc, status, failed, kind, n in zip(
        g.first("session"), g.first("fp"), g.first("exp"), g.first("started_at"), g.first("trace"),
        g.first("hop_id"), g.first("endpoint"), g.first("started_at_late"), g.first("trace_late"),
        g.first("hop_id_late"), g.first("endpoint_late"), g.first("service_late"), g.first("status_late"),
        g.first("failed_late"), g.first("error_kind_late"), g.counts.tolist(),
    ):  # fmt: skip
        late_by = at - exp
        rows.append({
            "trace": trace, "service": svc, "hop_ids": [first_hop, hop],
            "message": (
                f"a token the session first used {at - first_at:.1f} s earlier ({first_endpoint}) was presented"
                f" {late_by:.3f} s after it expired, at {endpoint} (status {_status(status, failed, kind)});"
                " nothing refreshed it in between"
            ),
            "details": {
                "fingerprint": fp, "session": int(session), "exp": exp, "late_by_s": late_by,
                "first_trace": first_trace, "first_used_at": first_at, "expired_requests": n,
                "status": _int_or_none(status),
            },
            "at": first_at,
        })  # fmt: skip
    return _findings(rows)


def near_expiry(ctx: Context) -> pd.DataFrame:
    """A token forwarded with less life left than the threshold, or than its request takes."""
    c = ctx.config
    u = ctx.used
    left = u["exp"] - u["started_at"]
    short = (left < c.near_expiry_s) | (left < c.near_expiry_duration_factor * u["root_duration_s"])
    near = u[((u["depth"] > 0) & (left > 0) & short).to_numpy()]
    if near.empty:
        return _findings([])
    near = near.assign(left=near["exp"] - near["started_at"], caller=near["hop_id"].map(ctx.caller).to_numpy())
    g = _Groups(near, ["trace", "fp"])
    rows = []
    for trace, fp, caller, svc, endpoint, remaining, took, exp, start, ids in zip(
        g.first("trace"), g.first("fp"), g.first("caller"), g.first("service"), g.first("endpoint"), g.first("left"),
        g.first("root_duration_s"), g.first("exp"), g.first("started_at"), g.lists("hop_id"),
    ):  # fmt: skip
        rows.append({
            "trace": trace, "service": svc, "caller": caller, "hop_ids": ids,
            "message": (
                f"{caller} forwarded the token to {svc} {endpoint} with {remaining:.3f} s of life left"
                f" (threshold {c.near_expiry_s:g} s; the request takes {took:.3f} s)"
            ),
            "details": {
                "fingerprint": fp, "remaining_s": remaining, "threshold_s": c.near_expiry_s,
                "request_duration_s": took, "exp": exp,
                "reason": "threshold" if remaining < c.near_expiry_s else "request duration",
            },
            "at": start,
        })  # fmt: skip
    return _findings(rows)


# -- validation -----------------------------------------------------------------------


def duplicate_validation(ctx: Context) -> pd.DataFrame:
    """The same token validated more than once in one request."""
    h = ctx.hops
    v = h.loc[
        h["is_validation"].to_numpy() & h["token_fp"].notna().to_numpy(),
        ["trace", "token_fp", "parent_id", "service", "endpoint", "started_at", "duration_ms"],
    ]
    v = v.drop(index=_forwarding_validations(v))
    v = v[v.groupby(["trace", "token_fp"], observed=True)["service"].transform("size").to_numpy() > 1]
    if v.empty:
        return _findings([])
    # Each (caller, validator, endpoint) once: a request's calls are then a tuple of small ints.
    parties = pd.DataFrame({"caller": v.index.map(ctx.caller), "service": v["service"].astype(object),
                            "endpoint": v["endpoint"].astype(object)})  # fmt: skip
    call, calls = group_keys(parties, list(parties.columns))
    g = _Groups(v.assign(call=call), ["trace", "token_fp"])
    extra = g.sum("duration_ms") - np.asarray(g.first("duration_ms"), dtype=np.float64)
    patterns: dict[tuple, tuple] = {}
    rows = []
    for trace, fp, pattern, starts, ids, extra_ms in zip(
        g.first("trace"), g.first("token_fp"), map(tuple, g.lists("call")), g.lists("started_at"), g.ids(), extra.tolist(),
    ):  # fmt: skip
        if pattern not in patterns:
            chain = [calls[i] for i in pattern]
            patterns[pattern] = (
                ", ".join(f"{c} -> {s} {e}" for c, s, e in chain), chain[1],
                list(dict.fromkeys(c for c, _, _ in chain)), list(dict.fromkeys(s for _, s, _ in chain)), [e for _, _, e in chain],
            )  # fmt: skip
        text, (again_caller, second, again_at), callers, validators, endpoints = patterns[pattern]
        rows.append({
            # The service is the one that validated again: its code has the redundant check.
            "trace": trace, "service": again_caller, "caller": again_caller, "callee": second, "endpoint": again_at, "hop_ids": ids,
            "message": (
                f"{again_caller} re-validated the token at {second} {again_at}: {len(ids)} validations in one request"
                f" ({text}); {extra_ms:.1f} ms spent beyond the first"
            ),
            "details": {
                "fingerprint": fp, "count": len(ids), "callers": callers, "validators": validators,
                "endpoints": endpoints, "extra_ms": extra_ms, "span_s": starts[-1] - starts[0],
            },
            "at": starts[0],
        })  # fmt: skip
    return _findings(rows)


def _forwarding_validations(v: pd.DataFrame) -> pd.Index:
    """Validation hops that only passed the same token on to another validation (a gateway's
    ``/auth/verify`` forwarding to auth's ``/verify``): one validation, counted at the innermost."""
    child = v[v["parent_id"].isin(v.index).to_numpy()]
    parents = child["parent_id"].astype("int64")
    same = child["token_fp"].to_numpy() == v.loc[parents, "token_fp"].to_numpy()
    return pd.Index(parents[same].unique())


def rejected_valid_token(ctx: Context) -> pd.DataFrame:
    """401/403 on a hop whose token was unexpired (and past nbf) on the proxy's clock for the whole hop.

    One finding per request, at the first hop to answer so (its callers passed it on).
    """
    h = ctx.hops
    h = h[np.isin(h["status"].to_numpy(dtype=np.float64, na_value=np.nan), (401, 403))]
    answered = h["response_start_at"].fillna(h["ended_at"]).to_numpy()
    nbf = h["token_fp"].map(ctx.tokens["nbf"]).to_numpy(dtype=np.float64, na_value=np.nan)
    valid = (h["token_exp"].to_numpy() > answered) & ~(nbf > h["started_at"].to_numpy())
    hits = h[valid].assign(left=h["token_exp"].to_numpy()[valid] - answered[valid])
    if hits.empty:
        return _findings([])
    hits = hits.assign(owner=hits["trace"].map(ctx.owners["subject"]), caller=hits.index.map(ctx.caller))
    skew = ctx.skew
    date_skew = {svc: off for svc, src, off in zip(skew["service"], skew["source"], skew["offset_s"]) if src == "date"}
    keyless_names = ctx.keyless["name"].to_dict()
    unknown_keys = _unknown_kids(ctx.tokens)
    g = _Groups(hits, ["trace"], by="ended_at")
    rows = []
    for trace, fp, caller, svc, endpoint, code, left, exp, sub, owner, services, starts, ids in zip(
        g.first("trace"), g.first("token_fp"), g.first("caller"), g.first("service"), g.first("endpoint"), g.first("status"),
        g.first("left"), g.first("token_exp"), g.first("token_sub"), g.first("owner"), g.lists("service"), g.lists("started_at"),
        g.ids(),
    ):  # fmt: skip
        offset = date_skew.get(svc)
        foreign = isinstance(sub, str) and isinstance(owner, str) and sub != owner
        keyless = next((keyless_names[i] for i in ids if i in keyless_names), None)
        if foreign:
            hint = f"it is {sub}'s token in a request of {owner}: see token_crossover"
        elif keyless is not None:
            hint = f"the call lacked the {keyless} header {svc} requires: see service_key_missing"
        elif fp in unknown_keys.index:
            hint = f"it is signed with key {unknown_keys[fp]!r}, in no key set the capture served: see unknown_signing_key"
        elif offset is not None and offset > left:
            hint = f"{svc}'s clock runs {offset:.1f} s ahead of the proxy's"
        elif exp % 1 >= left:  # RFC 7519 allows a fractional NumericDate; some libraries drop the fraction
            hint = f"its exp {exp:.3f} has a fraction of a second: read as the whole second {int(exp)}, it had expired"
        else:
            hint = "clock skew, another signing key, or the audience?"
        rows.append({
            "trace": trace, "service": svc, "caller": caller, "hop_ids": ids,
            "message": (
                f"{svc} {endpoint} answered {int(code)} to {caller}'s call with a token with {left:.3f} s of life left"
                f" on the proxy's clock ({hint})"
            ),
            "details": {
                "fingerprint": fp, "status": int(code), "remaining_s": left, "services": list(dict.fromkeys(services)),
                "service_skew_s": offset, "another_users_token": foreign,
            },
            "at": min(starts),
        })  # fmt: skip
    return _findings(rows)


# -- clocks -----------------------------------------------------------------------------


def skew_estimates(ctx: Context) -> pd.DataFrame:
    """Offset of each service's clock (from its Date headers) and each issuer's (from ``iat``).

    Each sample bounds the offset: a Date header (whole seconds) was written between the
    request and the response on the proxy's clock, so ``date - answered <= offset <=
    date + 1 - started``; likewise ``iat`` between the issuing hop's start and answer.
    The bounds of a service are the 90th percentile of the lower and the 10th of the
    upper bounds (robust to a few odd samples); the estimate is their middle.
    """
    h = ctx.hops
    names = h["service"].cat.categories
    # Plain arrays, not frames: at a million hops each frame of the samples, its concat and its
    # sort were another copy of ~900k rows (~180 MB at the analysis's peak).
    dated = h["server_date_ts"].notna().to_numpy()
    date = h["server_date_ts"].to_numpy()[dated]
    started = h["started_at"].to_numpy()[dated]
    answered = h["response_start_at"].fillna(h["ended_at"]).to_numpy()[dated]
    samples = [(h["service"].cat.codes.to_numpy(np.int64)[dated] * 2, h.index.to_numpy()[dated], date - answered, date + 1 - started, started)]
    if len(ctx.issued):
        samples.append(_iat_samples(ctx, names))
    key, hop_ids, lo, hi, at = (np.concatenate(column) for column in zip(*samples, strict=True))
    del samples, date, started, answered  # each copy of the samples is ~40 MB at 1M hops
    pick = np.flatnonzero(key >= 0)
    pick = pick[np.lexsort((at[pick], key[pick]))]  # by service and source, then time (stable)
    # One column at a time, each old one freed as its sorted copy is made: a tuple of the five
    # copies would hold both sets at once (~35 MB more at 1M hops).
    key = key[pick]
    hop_ids = hop_ids[pick]
    lo = lo[pick]
    hi = hi[pick]
    at = at[pick]
    columns = ["service", "source", "offset_s", "low_s", "high_s", "samples", "hop_ids", "at"]
    if not len(key):
        return pd.DataFrame(columns=columns)
    keys, low = group_quantiles(key, lo.astype(np.float64), (0.9, 0.5))
    _, high = group_quantiles(key, hi.astype(np.float64), (0.1, 0.5))
    # Bounds that cross mean inconsistent samples: fall back to the medians.
    crossed = low[:, 0] > high[:, 0]
    starts = np.flatnonzero(run_starts(key))
    limit = ctx.config.max_hop_ids
    out = pd.DataFrame({
        "service": np.asarray(names, dtype=object)[keys // 2], "source": np.where(keys % 2 == 0, "date", "iat"),
        "low_s": np.where(crossed, low[:, 1], low[:, 0]), "high_s": np.where(crossed, high[:, 1], high[:, 0]),
        "samples": np.diff(np.r_[starts, len(key)]), "hop_ids": [hop_ids[a : a + limit].tolist() for a in starts],
        "at": at[starts],
    })  # fmt: skip
    out["offset_s"] = (out["low_s"] + out["high_s"]) / 2
    return out[columns]


def _iat_samples(ctx: Context, names: pd.Index) -> tuple:
    """:func:`skew_estimates`' samples of the issuers' clocks: (key, hop id, low, high, at) arrays, a key per issuer."""
    issued = ctx.issued
    first_use = ctx.used.groupby("fp")["started_at"].min()
    issued = issued.assign(iat=issued["fp"].map(ctx.tokens["iat"]).to_numpy(), first_use=issued["fp"].map(first_use).to_numpy())
    # The issuer is the deepest hop of the request that first issued the token; a token
    # re-issued later (token_reuse) or brought by the client says nothing of the issuer's clock.
    first_trace = issued.sort_values("started_at").drop_duplicates("fp").set_index("fp")["trace"]
    origin = issued[issued["trace"].to_numpy() == issued["fp"].map(first_trace).to_numpy()]
    origin = origin.sort_values(["depth", "ended_at"], ascending=[False, True]).drop_duplicates("fp")
    origin = origin[origin["iat"].notna().to_numpy() & ~(origin["first_use"] < origin["started_at"]).to_numpy()]
    answered = origin["response_start_at"].fillna(origin["ended_at"]).to_numpy()
    iat, started = origin["iat"].to_numpy(np.float64), origin["started_at"].to_numpy()
    keys = names.get_indexer(origin["service"].astype(object)) * 2 + 1
    return keys, origin["hop_id"].to_numpy(), iat - answered, iat + 1 - started, started


def clock_skew(ctx: Context) -> pd.DataFrame:
    """A service whose Date headers, or an issuer whose ``iat``, are off the proxy's clock."""
    limit = ctx.config.skew_threshold_s
    skew = ctx.skew
    off = skew[(skew["low_s"] > limit) | (skew["high_s"] < -limit)]
    rows = []
    for svc, source, offset, low, high, n, ids, at in off[
        ["service", "source", "offset_s", "low_s", "high_s", "samples", "hop_ids", "at"]
    ].itertuples(index=False):
        direction = "ahead of" if offset > 0 else "behind"
        what = (
            f"{svc}'s Date headers ({n} responses)" if source == "date"
            else f"the iat of tokens issued by {svc} ({n} tokens)"
        )  # fmt: skip
        rows.append({
            "trace": None, "service": svc, "hop_ids": ids,
            "message": (
                f"{what} put its clock {abs(offset):.1f} s {direction} the proxy's"
                f" (between {low:+.1f} and {high:+.1f} s; threshold {limit:g} s)"
            ),
            "details": {
                "source": source, "offset_s": float(offset), "low_s": float(low), "high_s": float(high),
                "samples": int(n), "threshold_s": limit,
            },
            "at": float(at),
        })  # fmt: skip
    return _findings(rows)


# -- token identity -------------------------------------------------------------------


def token_reuse(ctx: Context) -> pd.DataFrame:
    """The same token issued by more than one request (login answering with register's token)."""
    issued = ctx.issued
    if not issued["fp"].duplicated().any():  # each token issued at one hop: by one request
        return _findings([])
    # One issuing hop per request: the deepest, where the token was made.
    per_trace = issued.sort_values(["depth", "ended_at"], ascending=[False, True]).drop_duplicates(["fp", "trace"])
    again = per_trace[per_trace.groupby("fp")["trace"].transform("size").to_numpy() > 1]
    if again.empty:
        return _findings([])
    g = _Groups(again, ["fp"], by="root_start")
    rows = []
    for fp, traces, roots, services, endpoints, times, ids in zip(
        g.first("fp"), g.lists("trace"), g.lists("root_endpoint"), g.lists("service"), g.lists("endpoint"),
        g.lists("root_start"), g.lists("hop_id"),
    ):  # fmt: skip
        rows.append({
            "trace": traces[1], "service": services[1], "hop_ids": ids,
            "message": (
                f"the same token was issued by {len(traces)} requests: {', '.join(roots)}"
                f" (the second {times[1] - times[0]:.3f} s after the first)"
            ),
            "details": {
                "fingerprint": fp, "traces": traces, "endpoints": roots,
                "issuers": [f"{s} {e}" for s, e in zip(services, endpoints)], "issued_at": times,
            },
            "at": times[0],
        })  # fmt: skip
    return _findings(rows)


def request_owners(ctx: Context) -> pd.DataFrame:
    """Whose each request is: its entry hop's token's subject; where it entered with none, its
    session's (:func:`_session_subjects`)."""
    root_sub = ctx.hops["token_sub"][ctx.hops["depth"].to_numpy() == 0]
    subjects = ctx.uses["sub"].cat.categories
    # Subjects as the codes token_uses gave them: integer work over a million uses.
    owner = pd.Series(subjects.get_indexer(root_sub.astype(object)), index=root_sub.index)
    by_session = pd.Series(False, index=root_sub.index)
    session = ctx.sessions.set_index("trace")["session"]
    nameless = session[owner.reindex(session.index).to_numpy() < 0]
    if len(nameless):
        theirs = nameless.map(_session_subjects(ctx, session, nameless.unique(), subjects)).dropna().astype(np.int64)
        owner[theirs.index], by_session[theirs.index] = theirs.to_numpy(), True
    subject = np.append(subjects.to_numpy(object), None)[owner.to_numpy()]  # code -1: the None appended
    return pd.DataFrame({"subject": subject, "sub": owner, "by_session": by_session})


def _session_subjects(ctx: Context, session: pd.Series, nameless: np.ndarray, subjects: pd.Index) -> pd.Series:
    """The subject (code) of each session of ``nameless`` that has one, read from its requests' calls.

    A request entering with a session cookie (a backend-for-frontend holding each user's token)
    names no subject, but its calls do. A session's subject is the one more than half of the calls
    of its requests present, if it is the only subject of the tokens issued to the calls the entry
    made itself in them (at its login; a service's own token fetched deeper does not count); and
    only a subject presented mostly in the sessions that are its own, among these. A service's own
    credentials, fetched once and presented in every user's session, own none.
    """
    # Arrays, not frames: a boolean mask over the uses' frame copies every column (0.3 s at 1M hops).
    u = ctx.used
    calls = pd.DataFrame({"session": u["trace"].map(session).to_numpy(), "sub": u["sub_code"].to_numpy()})
    calls = calls[(u["depth"].to_numpy() > 0) & (calls["sub"].to_numpy() >= 0) & np.isin(calls["session"], nameless)]
    counts = calls.value_counts()
    share = counts / counts.groupby(level="session").transform("sum")
    top = share.index[share.to_numpy() > 0.5]  # (session, subject) pairs, one per session at most
    entry_calls = ctx.issued["depth"].to_numpy() == 1
    issued = pd.DataFrame({
        "session": ctx.issued["trace"][entry_calls].map(session).to_numpy(),
        "sub": subjects.get_indexer(ctx.issued["fp"][entry_calls].map(ctx.tokens["sub"]).astype(object)),
    }).drop_duplicates()  # fmt: skip
    issued = issued[(issued["sub"] >= 0) & ~issued["session"].duplicated(keep=False)]
    top = top[top.isin(pd.MultiIndex.from_frame(issued))]
    # Each subject's calls in the sessions that are its own, against all its calls.
    own_share = counts[top].groupby(level="sub").sum() / counts.groupby(level="sub").sum()
    top = top[own_share.reindex(top.get_level_values("sub")).to_numpy() > 0.5]
    return pd.Series(top.get_level_values("sub"), index=top.get_level_values("session"))


def token_crossover(ctx: Context) -> pd.DataFrame:
    """A hop inside one subject's request carrying another user's token.

    "User" means a subject some request is owned by (:func:`request_owners`): a service
    calling with its own credentials (a subject that owns no request) is not a crossover.
    Where the request's subject is its session's, only a hop linked to it for sure (by a
    trace header or a token) counts, since a guessed link may have put another user's call
    there; and the finding is a warning: the subject was read from the session's calls.
    """
    u = ctx.used
    owners = ctx.owners
    owner = u["trace"].map(owners["sub"]).to_numpy()
    mine = u["sub_code"].to_numpy()
    cross = (u["depth"].to_numpy() > 0) & (mine >= 0) & (owner >= 0) & (mine != owner)
    cross &= np.isin(mine, owners["sub"][owners["sub"] >= 0].unique())
    if cross.any():
        sure = ctx.hops["link"].isin(("header", "token")).to_numpy()[ctx.hops.index.get_indexer(u["hop_id"][cross])]
        cross[cross] = sure | ~u["trace"][cross].map(owners["by_session"]).to_numpy(bool)
    if not cross.any():
        return _findings([])
    columns = ["trace", "sub", "fp", "hop_id", "service", "endpoint", "started_at", "root_endpoint", "root_start"]
    u = u.loc[cross, columns]
    u = u.assign(
        caller=u["hop_id"].map(ctx.caller).to_numpy(), owner=u["trace"].map(owners["subject"]),
        by_session=u["trace"].map(owners["by_session"]).to_numpy(bool),
    )  # fmt: skip
    g = _Groups(u, ["trace", "sub"])
    rows = []
    for trace, other, me, by_session, request, caller, svc, endpoint, at, services, endpoints, fps, ids in zip(
        g.first("trace"), g.first("sub"), g.first("owner"), g.first("by_session"), g.first("root_endpoint"), g.first("caller"),
        g.first("service"), g.first("endpoint"), g.first("root_start"), g.lists("service"), g.lists("endpoint"), g.lists("fp"),
        g.lists("hop_id"),
    ):  # fmt: skip
        more = f", and {len(ids) - 1} more hops" if len(ids) > 1 else ""
        whose = f"of {me}'s session" if by_session else f"of {me}"
        rows.append({
            "trace": trace, "service": svc, "caller": caller, "hop_ids": list(dict.fromkeys(ids)),
            **({"severity": "warning"} if by_session else {}),
            "message": f"{caller} sent {other}'s token to {svc} {endpoint} inside a request {whose} ({request}){more}",
            "details": {
                "subject": me, "other_subject": other, "fingerprints": list(dict.fromkeys(fps)),
                "hops": [f"{s} {e}" for s, e in zip(services, endpoints)],
                "subject_from": "session" if by_session else "request",
            },
            "at": at,
        })  # fmt: skip
    return _findings(rows)


# -- failures and time ------------------------------------------------------------------


def retry_storm(ctx: Context) -> pd.DataFrame:
    """The same call (caller hop, service, endpoint) made again after one failed (5xx, 429 or error)."""
    calls = ctx.retried
    if calls.empty:  # no caller saw a call fail
        return _findings([])
    same = ["parent_id", "service", "endpoint"]
    calls = calls.sort_values([*same, "started_at"], kind="stable")
    # Each call's rows are now adjacent, in start order: each run's retries counted with arrays.
    first = run_starts(group_codes(calls, same))
    retry = _retries(calls["started_at"].to_numpy(), calls["ended_at"].to_numpy(), calls["bad"].to_numpy(bool), first)
    run = np.cumsum(first) - 1
    retries = np.bincount(run, weights=retry)[run]
    storms = calls[retries >= ctx.config.retry_min]
    if storms.empty:
        return _findings([])
    storms = storms.assign(caller=storms.index.map(ctx.caller))
    g = _Groups(storms, same)
    cost = g.sum("duration_ms") - np.asarray(g.first("duration_ms"), dtype=np.float64)
    rows = []
    for trace, caller, svc, endpoint, starts, ends, bad, outcomes, spent, ids in zip(
        g.first("trace"), g.first("caller"), g.first("service"), g.first("endpoint"), g.lists("started_at"),
        g.lists("ended_at"), g.lists("bad"), _statuses(g), cost.tolist(), g.ids(),
    ):  # fmt: skip
        gaps = [round(starts[again] - ends[failed], 3) for failed, again in _retry_pairs(starts, ends, bad)]
        rows.append({
            "trace": trace, "service": svc, "caller": caller, "hop_ids": ids,
            "message": (
                f"{caller} called {svc} {endpoint} {len(ids)} times in one request ({len(gaps)} retries;"
                f" statuses {', '.join(outcomes)}; gaps {', '.join(f'{x:.3f}' for x in gaps)} s);"
                f" {spent:.1f} ms spent after the first call"
            ),
            "details": {
                "caller": caller, "endpoint": endpoint, "calls": len(ids), "retries": len(gaps),
                "statuses": outcomes, "gaps_s": gaps, "cost_ms": spent, "recovered": not bad[-1],
            },
            "at": starts[0],
        })  # fmt: skip
    return _findings(rows)


def _retry_pairs(starts, ends, bad) -> list[tuple[int, int]]:
    """(failed call, its retry) among the calls of one caller to one endpoint, in start order.

    A call retries a failed one if it started once that one had ended: the first such call after
    each failure is its retry. Calls made side by side (a fan-out, one of which failed) overlap
    the failure, so none of them is its retry.
    """
    waiting: list[tuple[float, int]] = []  # failed calls not retried yet, earliest end first
    pairs = []
    for index, (start, end, failed) in enumerate(zip(starts, ends, bad)):
        if waiting and waiting[0][0] <= start:
            pairs.append((heapq.heappop(waiting)[1], index))
        if failed:
            heapq.heappush(waiting, (end, index))
    return pairs


def _retries(starts: np.ndarray, ends: np.ndarray, bad: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Per call (calls sorted by run, then start; ``first`` marks each run's first): whether it is a retry."""
    retry = np.zeros(len(starts), bool)
    bounds = np.r_[np.flatnonzero(first), len(starts)]
    for a, b in itertools.pairwise(bounds.tolist()):
        if b - a > 1 and bad[a : b - 1].any():  # a run with a failure before its last call
            for _, again in _retry_pairs(starts[a:b].tolist(), ends[a:b].tolist(), bad[a:b].tolist()):
                retry[a + again] = True
    return retry


def _calls_of_failed_callers(h: pd.DataFrame) -> pd.DataFrame:
    """The calls made by hops one of whose calls failed (5xx, 429 or error), each with ``bad``.

    Only the callers that saw a failure can have retried: a small set.
    """
    status = h["status"].to_numpy(dtype=np.float64, na_value=np.nan)
    bad = (is_error(h) | (status == 429)) & h["parent_id"].notna().to_numpy()
    calls = h[h["parent_id"].isin(h["parent_id"][bad].unique()).to_numpy()]
    return calls.assign(bad=bad[h.index.get_indexer(calls.index)])


def upstream_error(ctx: Context) -> pd.DataFrame:
    """A hop that failed or answered 5xx while none of its own calls did: where an error began."""
    h = ctx.hops
    bad = is_error(h)
    parents_of_bad = h["parent_id"][bad].dropna().astype("int64").unique()
    origin = h[bad & ~h.index.isin(parents_of_bad)]
    if origin.empty:
        return _findings([])
    roots = h[["endpoint", "status", "failed", "error_kind"]].reindex(origin["trace"].to_numpy())
    origin = origin.assign(
        caller=origin.index.map(ctx.caller),
        client_saw=is_error(roots),
        request=roots["endpoint"].to_numpy(),
        request_status=[_status(*t) for t in zip(roots["status"], roots["failed"], roots["error_kind"])],
        request_code=roots["status"].array,
    )
    g = _Groups(origin, ["trace", "service", "endpoint"])
    rows = []
    for trace, caller, svc, endpoint, error, request, ended, code, client_saw, outcomes, starts, ids in zip(
        g.first("trace"), g.first("caller"), g.first("service"), g.first("endpoint"), g.first("error"), g.first("request"),
        g.first("request_status"), g.first("request_code"), g.first("client_saw"), _statuses(g), g.lists("started_at"), g.ids(),
    ):  # fmt: skip
        error = error if isinstance(error, str) else None
        times = f"{len(ids)} times" if len(ids) > 1 else "once"
        rows.append({
            "trace": trace, "service": svc, "caller": caller, "hop_ids": ids,
            # The client saw the failure, or the request recovered (a retry, a fallback).
            "severity": "error" if client_saw else "warning",
            "message": (
                f"{svc} {endpoint} failed {times} when {caller} called it ({', '.join(outcomes)}{f'; {error}' if error else ''});"
                f" the request {request} ended {ended}"
            ),
            "details": {
                "endpoint": endpoint, "count": len(ids), "outcomes": outcomes, "error": error,
                "request_status": _int_or_none(code),
            },
            "at": starts[0],
        })  # fmt: skip
    return _findings(rows)


def slow_hop(ctx: Context) -> pd.DataFrame:
    """Hops slower than their endpoint's p95 times a factor (or than an absolute limit)."""
    c = ctx.config
    h = ctx.hops
    # A code per (service, endpoint), from the Categoricals' codes: 5x faster than groupby().ngroup().
    service, endpoint = h["service"].cat, h["endpoint"].cat
    group = pd.factorize(service.codes.to_numpy(np.int64) * len(endpoint.categories) + endpoint.codes.to_numpy(np.int64))[0]
    codes, quantiles = group_quantiles(group, h["duration_ms"].to_numpy(np.float64), (0.95,))
    p95 = np.full(group.max(initial=-1) + 1, np.nan)
    p95[codes] = quantiles[:, 0]
    p95 = p95[group]
    ms = h["duration_ms"].to_numpy()
    slow = (np.bincount(group)[group] >= c.slow_min_samples) & (ms > c.slow_p95_factor * p95)
    if c.slow_ms is not None:
        slow |= ms > c.slow_ms
    hits = h[slow].assign(p95=p95[slow])
    if hits.empty:
        return _findings([])
    # The culprit of a request: its slow hop with the most time of its own.
    g = _Groups(hits, ["trace"], by="started_at")
    worst_at = np.array([int(np.argmax(s)) for s in g.lists("self_ms")], dtype=np.int64)
    rows = []
    for trace, svc, endpoint, ms, p, own, starts, ids in zip(
        g.first("trace"), g.at("service", worst_at), g.at("endpoint", worst_at), g.at("duration_ms", worst_at),
        g.at("p95", worst_at), g.at("self_ms", worst_at), g.lists("started_at"), g.ids(),
    ):  # fmt: skip
        ratio = f"{ms / p:.1f}x its p95 of {p:.1f} ms" if p > 0 else f"its p95 being {p:.1f} ms"
        more = f"; {len(ids) - 1} more slow hops in this request" if len(ids) > 1 else ""
        rows.append({
            "trace": trace, "service": svc, "hop_ids": ids,
            "message": f"{svc} {endpoint} took {ms:.1f} ms, {ratio} ({own:.1f} ms in itself){more}",
            "details": {"endpoint": endpoint, "duration_ms": ms, "p95_ms": p, "self_ms": own, "slow_hops": len(ids)},
            "at": starts[0],
        })  # fmt: skip
    return _findings(rows)


# -- retries and rate limits ------------------------------------------------------------


def _retry_after_s(value: str, answered_at: float) -> float | None:
    """Seconds a ``Retry-After`` asks for (RFC 9110 10.2.3: whole seconds or an HTTP date), else None."""
    text = value.strip()
    if text.isdecimal():
        return float(text)
    try:
        return parsedate_to_datetime(text).timestamp() - answered_at
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def retry_without_backoff(ctx: Context) -> pd.DataFrame:
    """Retries of one call after a 5xx, 429 or error whose gaps do not grow, or that come
    sooner than the failed answer's ``Retry-After``."""
    c = ctx.config
    calls = ctx.retried
    if calls.empty:
        return _findings([])
    calls = calls.assign(caller=calls.index.map(ctx.caller))
    answers = ctx.header_lines(calls.index[calls["bad"].to_numpy()], "response", containing=("etry-",))
    ra = answers[answers["name"] == "retry-after"].drop_duplicates("hop_id").set_index("hop_id")["value"]
    calls = calls.assign(retry_after=calls.index.map(ra))
    g = _Groups(calls, ["parent_id", "service", "endpoint"])
    rows = []
    for trace, caller, svc, endpoint, starts, ends, bads, waits, outcomes, ids in zip(
        g.first("trace"), g.first("caller"), g.first("service"), g.first("endpoint"), g.lists("started_at"),
        g.lists("ended_at"), g.lists("bad"), g.lists("retry_after"), _statuses(g), g.ids(),
    ):  # fmt: skip
        # Each retry's gap after the call it retried, and what that failed answer asked for.
        pairs = _retry_pairs(starts, ends, bads)
        if not pairs:
            continue
        retries = [failed for failed, _ in pairs]
        gaps = [starts[again] - ends[failed] for failed, again in pairs]
        asked = [_retry_after_s(waits[i], ends[i]) if isinstance(waits[i], str) else None for i in retries]
        early = [(gap, want) for gap, want in zip(gaps, asked) if want is not None and gap < want - c.retry_after_tolerance_s]
        flat = len(gaps) >= 2 and all(b <= c.retry_backoff_growth * a for a, b in itertools.pairwise(gaps))
        if not (early or flat):
            continue
        why = []
        if flat:
            why.append(f"gaps {', '.join(f'{x:.3f}' for x in gaps)} s do not grow")
        if early:
            gap, want = early[0]
            why.append(f"retried {gap:.3f} s after a Retry-After of {want:g} s")
        rows.append({
            "trace": trace, "service": svc, "caller": caller, "hop_ids": ids,
            "message": (
                f"{caller} retried {svc} {endpoint} {len(retries)} times without backoff: {'; '.join(why)}"
                f" (statuses {', '.join(outcomes)})"
            ),
            "details": {
                "caller": caller, "endpoint": endpoint, "retries": len(retries), "gaps_s": [round(x, 4) for x in gaps],
                "retry_after_s": asked, "ignored_retry_after": len(early), "flat_gaps": flat, "statuses": outcomes,
            },
            "at": starts[0],
        })  # fmt: skip
    return _findings(rows)


def rate_limited(ctx: Context) -> pd.DataFrame:
    """429s: who hit whose limit, at what request rate, and who passed it on to its callers."""
    h = ctx.hops
    status = h["status"].to_numpy(dtype=np.float64, na_value=np.nan)
    limited = h[status == 429]
    if limited.empty:
        return _findings([])
    # Where a 429 began: the hop none of whose own calls answered 429.
    limited = limited[~limited.index.isin(limited["parent_id"].dropna().astype("int64"))]
    limited = limited.assign(caller=limited.index.map(ctx.caller))
    window = ctx.config.rate_window_s
    arrivals = {svc: np.sort(h["started_at"].to_numpy()[(h["service"] == svc).to_numpy()]) for svc in limited["service"].unique()}
    g = _Groups(limited, ["service", "caller"])
    rows = []
    for svc, caller, trace, endpoints, starts, ids in zip(
        g.first("service"), g.first("caller"), g.first("trace"), g.lists("endpoint"), g.lists("started_at"), g.ids(),
    ):  # fmt: skip
        times = arrivals[svc]
        before = int(np.searchsorted(times, starts[0]) - np.searchsorted(times, starts[0] - window))
        rate = before / window if window > 0 else float("nan")
        passed = _propagated(h, ids, ctx.caller)
        told = f"; {', '.join(f'{who} answered {what}' for who, what in passed)} after it" if passed else ""
        rows.append({
            "trace": trace, "service": svc, "caller": caller, "hop_ids": ids[: ctx.config.max_hop_ids],
            "message": (
                f"{caller} hit {_possessive(svc)} rate limit: {len(ids)} calls answered 429"
                f" ({', '.join(dict.fromkeys(map(str, endpoints)))}) after {rate:.1f} requests/s to {svc}"
                f" in the {window:g} s before{told}"
            ),
            "details": {
                "limited_calls": len(ids), "endpoints": list(dict.fromkeys(map(str, endpoints))),
                "rate_per_s": rate, "window_s": window, "propagated_by": [f"{who} {what}" for who, what in passed],
            },
            "at": starts[0],
        })  # fmt: skip
    return _findings(rows)


def _possessive(name: str) -> str:
    return f"{name}'" if name.endswith("s") else f"{name}'s"


def _propagated(h: pd.DataFrame, ids: list[int], caller: pd.Series) -> list[tuple[str, str]]:
    """The callers up the tree that answered 429 or 5xx after these 429s: ``(service, "429 to client")``."""
    seen: dict[tuple[str, str], None] = {}
    frontier = set(ids)
    while frontier:
        parents = h["parent_id"].reindex(list(frontier)).dropna().astype("int64").unique()
        up = h.loc[parents]
        code = up["status"].to_numpy(dtype=np.float64, na_value=np.nan)
        passing = up[(code == 429) | (code >= 500)]
        for hop, svc, status in zip(passing.index, passing["service"], passing["status"]):
            seen[(str(svc), f"{int(status)} to {caller.get(hop, 'unknown')}")] = None
        frontier = set(passing.index.tolist())
    return list(seen)


# -- service credentials ----------------------------------------------------------------


# Calls whose headers the service credentials are learned from: a credential most calls
# to a service carry is in any evenly spread sample this size (5k headers: ~0.2 s to read and parse).
_KEY_SAMPLE = 5_000


def service_keys(ctx: Context) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The service credentials the capture shows (``name value``) and the services they
    guard (``service name``), learned from an evenly spread sample of the calls below the entry.

    A credential is a redacted request header value that calls from at least
    ``key_min_callers`` services carry; it guards the services where at least
    ``key_min_share`` of the calls carry a header of its name.
    """
    c = ctx.config
    h = ctx.hops
    # Ids and one column, not the frame: filtering every column of a million hops cost 0.3 s.
    below = h["depth"].to_numpy() > 0
    inner = h.index[below]
    # A value that starts with the prefix is written `"[redacted:` in the JSON text: SQLite leaves out the
    # hops whose only redacted values are inside others (`Bearer [redacted:...]`, on nearly every hop).
    sample = inner[:: max(1, len(inner) // _KEY_SAMPLE)]
    sent = ctx.header_lines(sample, "request", containing=(f'"{REDACTED_PREFIX}',))
    sent = sent[sent["value"].str.startswith(REDACTED_PREFIX).to_numpy(bool)]
    if sent.empty:  # no credential: the usual answer, and the frames below would cost ~25 ms to say so
        return pd.DataFrame(columns=["name", "value"]), pd.DataFrame(columns=["service", "name"])
    sent = sent.assign(caller=sent["hop_id"].map(ctx.caller).to_numpy())
    callers_of = sent.groupby(["name", "value"])["caller"].nunique()
    keys = callers_of[callers_of >= c.key_min_callers].reset_index()[["name", "value"]]
    carrying = sent.merge(keys, on=["name", "value"])
    carrying = carrying.assign(service=carrying["hop_id"].map(h["service"]).astype(object).to_numpy())
    calls = h["service"][below].value_counts()
    calls.index = calls.index.astype(object)
    per = carrying.groupby(["service", "name"])["hop_id"].nunique().reset_index(name="carrying")
    per = per[(per["carrying"] / per["service"].map(calls)).to_numpy() >= c.key_min_share]
    return keys, per.drop(columns="carrying")


def keyless_refusals(ctx: Context) -> pd.DataFrame:
    """Calls refused (401/403) that lacked a service credential's header their service
    requires (see :func:`service_keys`): the hops, indexed by id, with ``name`` (the header)."""
    _, guarded = ctx.service_keys
    h = ctx.hops
    status = h["status"].to_numpy(dtype=np.float64, na_value=np.nan)
    refused = h[np.isin(status, (401, 403)) & (h["depth"].to_numpy() > 0)]
    if guarded.empty or refused.empty:
        return refused.iloc[:0].assign(name=pd.Series(dtype=object), caller=pd.Series(dtype=object))
    sent = ctx.header_lines(refused.index, "request")
    refused = refused.assign(service=refused["service"].astype(object)).reset_index(names="hop_id")
    refused = refused.merge(guarded, on="service")
    had = pd.MultiIndex.from_arrays([sent["hop_id"], sent["name"]])
    refused = refused[~pd.MultiIndex.from_arrays([refused["hop_id"], refused["name"]]).isin(had)]
    return refused.assign(caller=refused["hop_id"].map(ctx.caller).to_numpy()).set_index("hop_id")


def service_key_missing(ctx: Context) -> pd.DataFrame:
    """A call without the service credential most calls to its service carry, refused (401/403)."""
    refused = ctx.keyless
    if refused.empty:
        return _findings([])
    g = _Groups(refused, ["caller", "service", "name"])
    rows = []
    for caller, svc, name, trace, endpoints, outcomes, starts, ids in zip(
        g.first("caller"), g.first("service"), g.first("name"), g.first("trace"), g.lists("endpoint"), _statuses(g),
        g.lists("started_at"), g.ids(),
    ):  # fmt: skip
        rows.append({
            "trace": trace, "service": svc, "caller": caller, "hop_ids": ids[: ctx.config.max_hop_ids],
            "message": (
                f"{caller} called {svc} {endpoints[0]} without the {name} header other callers send it,"
                f" and was refused ({', '.join(dict.fromkeys(outcomes))}; {len(ids)} calls)"
            ),
            "details": {"header": name, "calls": len(ids), "statuses": outcomes, "endpoints": list(dict.fromkeys(map(str, endpoints)))},
            "at": starts[0],
        })  # fmt: skip
    return _findings(rows)


def service_key_leak(ctx: Context) -> pd.DataFrame:
    """A service credential in a response to the client, or sent by the client to the entry."""
    keys, _ = ctx.service_keys
    if keys.empty:
        return _findings([])
    h = ctx.hops
    entered = h.index[h["depth"].to_numpy() == 0]
    outer = pd.concat([
        ctx.header_lines(entered, side, containing=keys["value"]).assign(side=side) for side in ("request", "response")
    ])  # fmt: skip
    leaks = outer.merge(keys.rename(columns={"name": "key_name"}), on="value")
    if leaks.empty:
        return _findings([])
    leaks = leaks.set_index("hop_id").join(h[["trace", "service", "endpoint", "started_at"]])
    leaks = leaks.assign(service=leaks["service"].astype(object), endpoint=leaks["endpoint"].astype(object))
    g = _Groups(leaks, ["service", "side", "name"])
    rows = []
    for svc, side, name, key_name, trace, endpoints, starts, ids in zip(
        g.first("service"), g.first("side"), g.first("name"), g.first("key_name"), g.first("trace"), g.lists("endpoint"),
        g.lists("started_at"), g.ids(),
    ):  # fmt: skip
        ids = list(dict.fromkeys(ids))
        if side == "response":
            caller, what = svc, f"{svc} answered the client with the service credential {key_name} (in its {name} header)"
        else:
            caller, what = "client", f"the client sent the service credential {key_name} to {svc} (in its {name} header)"
        rows.append({
            "trace": trace, "service": svc, "caller": caller, "callee": "client" if side == "response" else svc,
            "endpoint": endpoints[0], "hop_ids": ids[: ctx.config.max_hop_ids],
            "message": f"{what} on {endpoints[0]}, {len(ids)} times: the secret between services left the stack",
            "details": {"header": name, "credential": key_name, "side": side, "hops": len(ids)},
            "at": starts[0],
        })  # fmt: skip
    return _findings(rows)


# -- token scope ------------------------------------------------------------------------


def _audiences(value: object) -> tuple[str, ...]:
    """A token's ``aud`` as stored (a string, or a JSON list of strings), as a tuple."""
    if not isinstance(value, str) or not value:
        return ()
    items = stored_json(value) if value.startswith("[") else None
    return tuple(str(a) for a in items) if isinstance(items, list) else (value,)


def audience_mismatch(ctx: Context) -> pd.DataFrame:
    """A token presented to a service its ``aud`` does not name (the route's name, or an
    ``audiences`` entry of the config); judged only for an ``aud`` that names some service."""
    u = ctx.used
    auds = ctx.tokens["aud"].dropna().map(_audiences)
    known = {str(s) for s in ctx.hops["service"].cat.categories}
    accepted = {svc: {svc, *extra} for svc, extra in ctx.config.audiences.items()}
    vocabulary = known | {a for extra in ctx.config.audiences.values() for a in extra}
    # Only an aud in the stack's words can be judged: one that names some service or mapped audience.
    auds = auds[auds.map(lambda aud: not vocabulary.isdisjoint(aud)).astype(bool)]
    if auds.empty:
        return _findings([])
    u = u[(u["role"] == "presented").to_numpy() & ~u["is_validation"].to_numpy() & u["fp"].isin(auds.index).to_numpy()]
    u = u.assign(service=u["service"].astype(object))
    # Judged once per (token, service) pair: a token is presented at many hops of one service.
    pairs = u[["fp", "service"]].drop_duplicates()
    pairs = pairs.assign(aud=pairs["fp"].map(auds).to_numpy())
    pairs = pairs[np.array([accepted.get(svc, {svc}).isdisjoint(aud) for svc, aud in zip(pairs["service"], pairs["aud"])], dtype=bool)]
    hits = u.merge(pairs, on=["fp", "service"])
    if hits.empty:
        return _findings([])
    hits = hits.assign(
        aud=hits["aud"].map(",".join), caller=hits["hop_id"].map(ctx.caller).to_numpy(), endpoint=hits["endpoint"].astype(object),
    ).set_index("hop_id")

    def describe(caller, svc, endpoint, aud, calls, refused):
        refusals = f", {refused} refused" if refused else ""
        message = f"{caller} sent a token for aud {aud} to {svc} {endpoint} ({calls} calls{refusals})"
        return f"{message}: {svc} is not among its audiences", {"aud": aud.split(",")}

    return _token_calls(ctx, hits, "aud", describe)


def _token_calls(ctx: Context, hits: pd.DataFrame, label: str, describe) -> pd.DataFrame:
    """One finding per (caller, callee, endpoint, ``label``) of ``hits`` (token uses indexed by
    hop id): an error when a call was refused (401/403, not for a missing service key), else a
    warning. ``describe(caller, callee, endpoint, value, calls, refused)`` gives the message
    and the kind's own details."""
    g = _Groups(hits, ["caller", "service", "endpoint", label])
    keyless = set(ctx.keyless.index)
    rows = []
    for caller, svc, endpoint, value, trace, outcomes, starts, ids in zip(
        g.first("caller"), g.first("service"), g.first("endpoint"), g.first(label), g.first("trace"), _statuses(g),
        g.lists("started_at"), g.ids(),
    ):  # fmt: skip
        refused = [o for o, i in zip(outcomes, ids) if o in ("401", "403") and i not in keyless]
        ids = list(dict.fromkeys(ids))
        message, details = describe(caller, svc, endpoint, value, len(ids), len(refused))
        rows.append({
            "trace": trace, "service": svc, "caller": caller, "hop_ids": ids[: ctx.config.max_hop_ids],
            "severity": "error" if refused else "warning", "message": message,
            "details": {**details, "calls": len(ids), "refused": len(refused), "statuses": outcomes}, "at": starts[0],
        })  # fmt: skip
    return _findings(rows)


def _unknown_kids(tokens: pd.DataFrame) -> pd.Series:
    """The ``kid`` of each token (by fingerprint) whose recorder's verdict is ``unknown_kid``."""
    if "verdict" not in tokens:  # a file recorded before signatures were checked
        return tokens["kid"].iloc[:0]
    return tokens["kid"][(tokens["verdict"] == "unknown_kid").to_numpy()]


def unknown_signing_key(ctx: Context) -> pd.DataFrame:
    """A JWT signed with a key (``kid``) in none of the key sets (JWKS) served in the capture
    before it was first seen: the recorder's verdict ``unknown_kid``."""
    kid = _unknown_kids(ctx.tokens)
    if kid.empty:
        return _findings([])
    # The keys the capture's other signed tokens name: what the issuer signs with now, as a rule.
    others = ctx.tokens.loc[~ctx.tokens.index.isin(kid.index), "kid"].dropna()
    current = sorted({str(k) for k in others})
    u = ctx.used
    u = u[u["fp"].isin(kid.index).to_numpy()]
    if u.empty:
        return _findings([])
    hits = u.assign(
        kid=u["fp"].map(kid).astype(object).to_numpy(), caller=u["hop_id"].map(ctx.caller).to_numpy(),
        service=u["service"].astype(object), endpoint=u["endpoint"].astype(object),
    ).drop_duplicates("hop_id").set_index("hop_id")

    def describe(caller, svc, endpoint, kid_, calls, refused):
        refusals = f", {refused} refused" if refused else ""
        message = f"{caller} sent {svc} {endpoint} a token signed with key {kid_!r}, which no key set served in the capture holds"
        now = f"; the capture's other tokens name {', '.join(map(repr, current))}" if current else ""
        return f"{message} ({calls} calls{refusals}){now}", {"kid": kid_, "other_kids": current}

    return _token_calls(ctx, hits, "kid", describe)


def refresh_race(ctx: Context) -> pd.DataFrame:
    """One refresh token sent to a refresh endpoint twice at once (overlapping, or within
    ``refresh_race_window_s``), one of the two refused with a 4xx."""
    u = ctx.used
    h = ctx.hops
    at_refresh = h.index[validation_mask(h["endpoint"].array, ctx.config.refresh_regex)]
    refresh = u[u["hop_id"].isin(at_refresh).to_numpy()]
    refresh = refresh.drop_duplicates(["hop_id", "fp"])
    refresh = refresh[refresh.groupby(["fp", "service"], observed=True)["hop_id"].transform("size").to_numpy() > 1]
    if refresh.empty:
        return _findings([])
    refresh = refresh.assign(caller=refresh["hop_id"].map(ctx.caller).to_numpy(), service=refresh["service"].astype(object))
    g = _Groups(refresh, ["fp", "service"])
    window = ctx.config.refresh_race_window_s
    found: dict[str, dict] = {}
    for fp, svc, depth, callers_, endpoints, starts, ends, codes, ids in zip(
        g.first("fp"), g.first("service"), g.first("depth"), g.lists("caller"), g.lists("endpoint"), g.lists("started_at"),
        g.lists("ended_at"), g.lists("status"), g.lists("hop_id"),
    ):  # fmt: skip
        pair = next(
            ((i, i + 1) for i in range(len(ids) - 1)
             if starts[i + 1] < ends[i] + window and any(_is_4xx(codes[k]) for k in (i, i + 1))),
            None,
        )  # fmt: skip
        # The deepest service seeing the race is where the token was judged.
        if pair is None or (fp in found and found[fp]["depth"] >= depth):
            continue
        a, b = pair
        refused = b if _is_4xx(codes[b]) else a
        overlap = "while the first ran" if starts[b] < ends[a] else f"{starts[b] - ends[a]:.3f} s after it ended"
        # Who sent the two requests the race belongs to (the client, as a rule), and who passed them on.
        origins = [ctx.caller.get(ctx.hops.at[ids[k], "trace"], "unknown") for k in (a, b)]
        via = f" through {' and '.join(dict.fromkeys((callers_[a], callers_[b])))}" if depth > 0 else ""
        found[fp] = {
            "depth": depth,
            "row": {
                "trace": ctx.hops.at[ids[refused], "trace"], "service": svc, "caller": callers_[refused],
                "endpoint": endpoints[refused], "hop_ids": [ids[a], ids[b]],
                "message": (
                    f"{' and '.join(dict.fromkeys(origins))} sent one refresh token to {svc} {endpoints[b]}{via} twice,"
                    f" the second {starts[b] - starts[a]:.3f} s after the first ({overlap}); {svc} answered {_status(codes[a])} and"
                    f" {_status(codes[b])}: the refresh that lost was refused"
                ),
                "details": {
                    "fingerprint": fp, "gap_s": starts[b] - starts[a], "overlapping": bool(starts[b] < ends[a]),
                    "statuses": [_int_or_none(codes[a]), _int_or_none(codes[b])], "callers": [callers_[a], callers_[b]],
                    "origins": origins,
                },
                "at": starts[a],
            },
        }  # fmt: skip
    return _findings([f["row"] for f in found.values()])


def _is_4xx(status) -> bool:
    return status is not None and not pd.isna(status) and 400 <= status < 500


# -- the list -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detector:
    """One kind of finding: its name, its severity, and the function finding it.

    A finding may state its own severity: upstream_error is a warning when the request
    recovered (a retry answered) and the client never saw the failure.
    """

    kind: str
    severity: str
    run: Callable[[Context], pd.DataFrame]

    @property
    def summary(self) -> str:
        return (self.run.__doc__ or "").strip().splitlines()[0]


DETECTORS: tuple[Detector, ...] = (
    Detector("expired_mid_flow", "error", expired_mid_flow),
    Detector("expired_in_session", "error", expired_in_session),
    Detector("rejected_valid_token", "error", rejected_valid_token),
    Detector("token_crossover", "error", token_crossover),
    Detector("upstream_error", "error", upstream_error),
    Detector("service_key_missing", "error", service_key_missing),
    Detector("service_key_leak", "error", service_key_leak),
    Detector("refresh_race", "error", refresh_race),
    # An error when the service refused the token, a warning otherwise.
    Detector("audience_mismatch", "warning", audience_mismatch),
    Detector("unknown_signing_key", "warning", unknown_signing_key),
    Detector("near_expiry", "warning", near_expiry),
    Detector("duplicate_validation", "warning", duplicate_validation),
    Detector("clock_skew", "warning", clock_skew),
    Detector("token_reuse", "warning", token_reuse),
    Detector("retry_storm", "warning", retry_storm),
    Detector("retry_without_backoff", "warning", retry_without_backoff),
    Detector("rate_limited", "warning", rate_limited),
    Detector("slow_hop", "info", slow_hop),
)
KINDS = tuple(d.kind for d in DETECTORS)


def run_detectors(ctx: Context, detectors: tuple[Detector, ...] = DETECTORS) -> pd.DataFrame:
    """All findings, sorted by severity, then time."""
    found = [(detector, frame) for detector in detectors if len(frame := detector.run(ctx))]
    if not found:
        return empty_findings()
    # Kind and default severity set once on all findings: per detector, the two columns cost 4 ms each time.
    counts = [len(frame) for _, frame in found]
    out = pd.concat([frame for _, frame in found], ignore_index=True)
    out["kind"] = np.repeat([detector.kind for detector, _ in found], counts).astype(object)
    defaults = pd.Series(np.repeat([detector.severity for detector, _ in found], counts).astype(object))
    out["severity"] = out["severity"].astype(object).fillna(defaults)
    out = _name_parties(out, ctx)
    out["trace"] = out["trace"].astype("Int64")
    out["at"] = out["at"].astype("float64")
    out["rank"] = out["severity"].map(SEVERITY_RANK)
    out = out.sort_values(["rank", "at", "kind"], kind="stable").drop(columns="rank")
    return out[list(FINDING_COLUMNS)].reset_index(drop=True)


def callers(hops: pd.DataFrame) -> pd.Series:
    """The service that made each hop, by hop id: its parent's service, ``client`` for a
    request, ``unknown`` for a hop whose caller is not in the capture."""
    out = hops["parent_id"].map(hops["service"]).astype(object)
    entered = hops["parent_id"].isna().to_numpy() & (hops["link"] != "orphan").to_numpy()  # on the codes, no object copy
    out[entered] = "client"
    return out.fillna("unknown")


def _name_parties(found: pd.DataFrame, ctx: Context) -> pd.DataFrame:
    """``caller``, ``callee`` and ``endpoint`` where the detector left them empty, from the
    finding's hop: its first hop at the finding's service (else its first hop). A finding
    about a whole service (no request) names only the service as the callee.

    Array work over every finding's hop ids at once: a loop over findings cost 0.8 s at 1M hops (52k findings).
    """
    hops = ctx.hops
    counts = np.fromiter(map(len, found["hop_ids"]), np.int64, len(found))
    owner = np.repeat(np.arange(len(found)), counts)
    at = hops.index.get_indexer(np.fromiter(itertools.chain.from_iterable(found["hop_ids"]), np.int64, int(counts.sum())))
    in_request = ~pd.isna(found["trace"]).to_numpy()
    usable = (at >= 0) & in_request[owner]
    owner, at, order = owner[usable], at[usable], np.flatnonzero(usable)
    service = hops["service"].astype(object).to_numpy()[at]
    # Per finding, the first of its hops at its own service, else its first hop.
    elsewhere = service != found["service"].astype(object).to_numpy()[owner]
    pick = np.lexsort((order, elsewhere, owner))
    first = pick[np.r_[True, owner[pick][1:] != owner[pick][:-1]]] if len(pick) else pick
    chosen = np.full(len(found), -1, np.int64)
    chosen[owner[first]] = at[first]
    has = chosen >= 0
    named = {
        # A finding without a hop (about a whole service) is at its service.
        "callee": np.where(has, None, found["service"].astype(object).to_numpy()),
        "caller": np.full(len(found), None, dtype=object),
        "endpoint": np.full(len(found), None, dtype=object),
    }
    named["callee"][has] = hops["service"].astype(object).to_numpy()[chosen[has]]
    named["caller"][has] = ctx.caller.reindex(hops.index[chosen[has]]).to_numpy(dtype=object)
    named["endpoint"][has] = hops["endpoint"].astype(object).to_numpy()[chosen[has]]
    filled = {
        column: [mine if isinstance(mine, str) else hop for mine, hop in zip(found[column], named[column])]
        for column in ("caller", "callee", "endpoint")
    }
    return found.assign(**filled)


def empty_findings() -> pd.DataFrame:
    out = pd.DataFrame({c: pd.Series(dtype=object) for c in FINDING_COLUMNS})
    return out.astype({"trace": "Int64", "at": "float64"})
