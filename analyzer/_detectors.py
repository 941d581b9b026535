"""The detectors: each a small function from the rebuilt traces to findings of one kind.

A detector returns a DataFrame with ``trace``, ``service``, ``hop_ids``, ``message``,
``details`` and ``at``; :func:`run_detectors` adds ``kind`` and ``severity`` and sorts.
Token times are judged on the proxy's clock, which is the one clock every hop shares.
A token is expired at ``exp`` itself (RFC 7519: "on or after"), as pyjwt judges it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd

from hoptrace._format import hop_ended
from hoptrace.analyzer._arrays import group_quantiles, run_starts
from hoptrace.analyzer._config import AnalyzerConfig
from hoptrace.analyzer._latency import is_error
from hoptrace.analyzer._types import SEVERITY_RANK

FINDING_COLUMNS = ("kind", "severity", "trace", "service", "hop_ids", "message", "details", "at")


@dataclass
class Context:
    """What the detectors read: the rebuilt hops, token sightings, sessions, options."""

    hops: pd.DataFrame
    hop_tokens: pd.DataFrame
    tokens: pd.DataFrame
    uses: pd.DataFrame  # presented / validated sightings (see _prepare.token_uses)
    sessions: pd.DataFrame
    config: AnalyzerConfig = field(default_factory=AnalyzerConfig)

    @cached_property
    def used(self) -> pd.DataFrame:
        """``uses`` with the facts of the hop and of its request alongside."""
        return _with_hop(self.uses, self.hops)

    @cached_property
    def issued(self) -> pd.DataFrame:
        """Issued sightings with their hop's facts."""
        rows = self.hop_tokens[self.hop_tokens["role"] == "issued"].drop_duplicates(["hop_id", "fingerprint"])
        rows = rows.rename(columns={"fingerprint": "fp"})[["hop_id", "fp", "location"]]
        return _with_hop(rows, self.hops)

    @cached_property
    def skew(self) -> pd.DataFrame:
        """Clock offset estimates per (service, source), see :func:`skew_estimates`."""
        return skew_estimates(self)


_HOP_FACTS = (
    "trace", "depth", "parent_id", "service", "endpoint", "path", "status", "failed", "error_kind",
    "started_at", "ended_at", "response_start_at", "duration_ms", "is_validation",
)  # fmt: skip


def _with_hop(rows: pd.DataFrame, hops: pd.DataFrame) -> pd.DataFrame:
    out = rows.join(hops[list(_HOP_FACTS)], on="hop_id", how="inner")
    roots = hops[["started_at", "ended_at", "service", "endpoint"]].reindex(out["trace"].to_numpy())
    out["root_start"] = roots["started_at"].to_numpy()
    out["root_duration_s"] = (roots["ended_at"] - roots["started_at"]).to_numpy()
    out["root_service"] = roots["service"].to_numpy()
    out["root_endpoint"] = roots["endpoint"].to_numpy()
    return out


def _findings(rows: list[dict]) -> pd.DataFrame:
    """A detector's findings; a row may set ``severity`` to differ from its detector's."""
    return pd.DataFrame(rows, columns=[c for c in FINDING_COLUMNS if c != "kind"])


class _Groups:
    """Rows grouped by ``keys``, each group in time order, without a Python loop over groups.

    Detectors build one finding per group from ``first`` (the group's earliest row, as
    plain lists) and ``lists`` (a column's values per group): pandas' group iteration
    costs about a millisecond a group, which at a million hops is minutes.
    """

    def __init__(self, rows: pd.DataFrame, keys: list[str], by: str = "started_at") -> None:
        code = rows.groupby(keys, sort=False, dropna=False).ngroup().to_numpy()
        order = np.lexsort((rows.index.to_numpy(), rows[by].to_numpy(), code))
        self.rows = rows.iloc[order]
        code = code[order]
        self.starts = np.flatnonzero(run_starts(code))
        self.counts = np.diff(np.r_[self.starts, len(code)])

    def __len__(self) -> int:
        return len(self.starts)

    def first(self, column: str) -> list:
        return self.rows[column].iloc[self.starts].tolist()

    def at(self, column: str, offset: np.ndarray) -> list:
        """The value of ``column`` at row ``offset`` of each group."""
        return self.rows[column].iloc[self.starts + offset].tolist()

    def lists(self, column: str) -> list[list]:
        values = self.rows[column].tolist()
        ends = (self.starts + self.counts).tolist()
        return [values[a:b] for a, b in zip(self.starts.tolist(), ends)]

    def ids(self) -> list[list[int]]:
        """The index (hop ids) of each group's rows."""
        values = self.rows.index.tolist()
        ends = (self.starts + self.counts).tolist()
        return [values[a:b] for a, b in zip(self.starts.tolist(), ends)]

    def sum(self, column: str) -> np.ndarray:
        values = self.rows[column].to_numpy(dtype=np.float64, na_value=np.nan)
        return np.add.reduceat(values, self.starts) if len(self) else np.zeros(0)


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
    late = late.assign(mid=pd.MultiIndex.from_arrays([late["trace"], late["fp"]]).isin(here))
    g = _Groups(late, ["trace", "fp"])
    rows = []
    for trace, fp, svc, endpoint, path, status, failed, kind, start, exp, entered, root, mid, ids in zip(
        g.first("trace"), g.first("fp"), g.first("service"), g.first("endpoint"), g.first("path"),
        g.first("status"), g.first("failed"), g.first("error_kind"), g.first("started_at"), g.first("exp"),
        g.first("root_start"), g.first("root_endpoint"), g.first("mid"), g.lists("hop_id"),
    ):  # fmt: skip
        late_by, left = start - exp, exp - entered
        origin = "a token issued during the request" if mid else "a token valid when the request entered"
        rows.append({
            "trace": trace, "service": svc, "hop_ids": ids,
            "message": (
                f"{origin} reached {svc} {endpoint} {late_by:.3f} s after it expired"
                f" (status {_status(status, failed, kind)}); it had {left:.3f} s left when {root} entered"
            ),
            "details": {
                "fingerprint": fp, "exp": exp, "entered_at": entered, "remaining_at_entry_s": left,
                "late_by_s": late_by, "path": path, "endpoint": endpoint, "status": _int_or_none(status),
                "late_hops": len(ids), "issued_during_request": bool(mid),
            },
            "at": entered,
        })  # fmt: skip
    return _findings(rows)


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
    pairs = first_valid.merge(expired, on=["session", "fp"], suffixes=("", "_late"))
    pairs = pairs[pairs["started_at_late"] > pairs["started_at"]]
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
    near = near.assign(left=near["exp"] - near["started_at"])
    g = _Groups(near, ["trace", "fp"])
    rows = []
    for trace, fp, svc, endpoint, remaining, took, exp, start, ids in zip(
        g.first("trace"), g.first("fp"), g.first("service"), g.first("endpoint"), g.first("left"),
        g.first("root_duration_s"), g.first("exp"), g.first("started_at"), g.lists("hop_id"),
    ):  # fmt: skip
        rows.append({
            "trace": trace, "service": svc, "hop_ids": ids,
            "message": (
                f"token forwarded to {svc} {endpoint} with {remaining:.3f} s of life left"
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
    v = v[v.groupby(["trace", "token_fp"], observed=True)["service"].transform("size").to_numpy() > 1]
    caller = v["parent_id"].map(h["service"]).astype(object).fillna("client")
    # Each (caller, validator, endpoint) once: a request's calls are then a tuple of small ints.
    call, calls = pd.factorize(pd.MultiIndex.from_arrays([caller, v["service"].astype(object), v["endpoint"].astype(object)]))
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
                ", ".join(f"{c} -> {s} {e}" for c, s, e in chain), chain[1][0],
                list(dict.fromkeys(c for c, _, _ in chain)), list(dict.fromkeys(s for _, s, _ in chain)), [e for _, _, e in chain],
            )  # fmt: skip
        text, second, callers, validators, endpoints = patterns[pattern]
        rows.append({
            "trace": trace, "service": second, "hop_ids": ids,
            "message": f"token validated {len(ids)} times in one request ({text}); {extra_ms:.1f} ms spent beyond the first",
            "details": {
                "fingerprint": fp, "count": len(ids), "callers": callers, "validators": validators,
                "endpoints": endpoints, "extra_ms": extra_ms, "span_s": starts[-1] - starts[0],
            },
            "at": starts[0],
        })  # fmt: skip
    return _findings(rows)


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
    hits = hits.assign(owner=hits["trace"].map(ctx.hops["token_sub"]).astype(object))
    skew = ctx.skew
    date_skew = {svc: off for svc, src, off in zip(skew["service"], skew["source"], skew["offset_s"]) if src == "date"}
    g = _Groups(hits, ["trace"], by="ended_at")
    rows = []
    for trace, fp, svc, endpoint, code, left, sub, owner, services, starts, ids in zip(
        g.first("trace"), g.first("token_fp"), g.first("service"), g.first("endpoint"), g.first("status"),
        g.first("left"), g.first("token_sub"), g.first("owner"), g.lists("service"), g.lists("started_at"), g.ids(),
    ):  # fmt: skip
        offset = date_skew.get(svc)
        foreign = isinstance(sub, str) and isinstance(owner, str) and sub != owner
        if foreign:
            hint = f"it is {sub}'s token in a request of {owner}: see token_crossover"
        elif offset is not None and offset > left:
            hint = f"{svc}'s clock runs {offset:.1f} s ahead of the proxy's"
        else:
            hint = "clock skew, another signing key, or the audience?"
        rows.append({
            "trace": trace, "service": svc, "hop_ids": ids,
            "message": (
                f"{svc} {endpoint} answered {int(code)} to a token with {left:.3f} s of life left"
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
    date = h[h["server_date_ts"].notna().to_numpy()]
    answered = date["response_start_at"].fillna(date["ended_at"])
    samples = [pd.DataFrame({
        "key": date["service"].cat.codes.to_numpy(np.int64) * 2, "hop_id": date.index.to_numpy(),
        "lo": (date["server_date_ts"] - answered).to_numpy(), "hi": (date["server_date_ts"] + 1 - date["started_at"]).to_numpy(),
        "at": date["started_at"].to_numpy(),
    })]  # fmt: skip
    issued = ctx.issued
    if len(issued):
        first_use = ctx.used.groupby("fp")["started_at"].min()
        issued = issued.assign(
            iat=issued["fp"].map(ctx.tokens["iat"]).to_numpy(), first_use=issued["fp"].map(first_use).to_numpy()
        )
        # The issuer is the deepest hop of the request that first issued the token; a token
        # re-issued later (token_reuse) or brought by the client says nothing of the issuer's clock.
        first_trace = issued.sort_values("started_at").drop_duplicates("fp").set_index("fp")["trace"]
        origin = issued[issued["trace"].to_numpy() == issued["fp"].map(first_trace).to_numpy()]
        origin = origin.sort_values(["depth", "ended_at"], ascending=[False, True]).drop_duplicates("fp")
        origin = origin[origin["iat"].notna().to_numpy() & ~(origin["first_use"] < origin["started_at"]).to_numpy()]
        answered = origin["response_start_at"].fillna(origin["ended_at"])
        samples.append(pd.DataFrame({
            "key": names.get_indexer(origin["service"].astype(object)) * 2 + 1, "hop_id": origin["hop_id"].to_numpy(),
            "lo": (origin["iat"] - answered).to_numpy(), "hi": (origin["iat"] + 1 - origin["started_at"]).to_numpy(),
            "at": origin["started_at"].to_numpy(),
        }))  # fmt: skip
    frame = pd.concat(samples, ignore_index=True)
    frame = frame[frame["key"].to_numpy() >= 0].sort_values(["key", "at"], kind="stable")
    columns = ["service", "source", "offset_s", "low_s", "high_s", "samples", "hop_ids", "at"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    key = frame["key"].to_numpy()
    keys, low = group_quantiles(key, frame["lo"].to_numpy(np.float64), (0.9, 0.5))
    _, high = group_quantiles(key, frame["hi"].to_numpy(np.float64), (0.1, 0.5))
    # Bounds that cross mean inconsistent samples: fall back to the medians.
    crossed = low[:, 0] > high[:, 0]
    starts = np.flatnonzero(run_starts(key))
    hop_ids = frame["hop_id"].to_numpy()
    limit = ctx.config.max_hop_ids
    out = pd.DataFrame({
        "service": np.asarray(names, dtype=object)[keys // 2], "source": np.where(keys % 2 == 0, "date", "iat"),
        "low_s": np.where(crossed, low[:, 1], low[:, 0]), "high_s": np.where(crossed, high[:, 1], high[:, 0]),
        "samples": np.diff(np.r_[starts, len(key)]), "hop_ids": [hop_ids[a : a + limit].tolist() for a in starts],
        "at": frame["at"].to_numpy()[starts],
    })  # fmt: skip
    out["offset_s"] = (out["low_s"] + out["high_s"]) / 2
    return out[columns]


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
    # One issuing hop per request: the deepest, where the token was made.
    per_trace = issued.sort_values(["depth", "ended_at"], ascending=[False, True]).drop_duplicates(["fp", "trace"])
    again = per_trace[per_trace.groupby("fp")["trace"].transform("size").to_numpy() > 1]
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


def token_crossover(ctx: Context) -> pd.DataFrame:
    """A hop inside one subject's request carrying another user's token.

    "User" means a subject that some request entered with: a service calling with
    its own credentials (a subject never seen at the entry) is not a crossover.
    """
    u = ctx.used
    # The columns read below only: a million uses copied column by column add up.
    columns = ["trace", "sub", "sub_code", "fp", "hop_id", "service", "endpoint", "started_at", "root_endpoint", "root_start"]
    u = u.loc[(u["depth"].to_numpy() > 0) & (u["sub_code"].to_numpy() >= 0), columns]
    root_sub = ctx.hops["token_sub"][ctx.hops["depth"].to_numpy() == 0]
    # Subjects as the codes token_uses gave them: integer work over a million uses.
    subjects = pd.Index(pd.factorize(ctx.tokens["sub"])[1])
    root_code = pd.Series(subjects.get_indexer(root_sub.astype(object)), index=root_sub.index)
    owner = u["trace"].map(root_code).to_numpy()
    mine = u["sub_code"].to_numpy()
    cross = (owner >= 0) & (mine != owner) & np.isin(mine, root_code[root_code >= 0].unique())
    g = _Groups(u[cross].assign(owner=u["trace"][cross].map(root_sub)), ["trace", "sub"])
    rows = []
    for trace, other, me, request, svc, endpoint, at, services, endpoints, fps, ids in zip(
        g.first("trace"), g.first("sub"), g.first("owner"), g.first("root_endpoint"), g.first("service"),
        g.first("endpoint"), g.first("root_start"), g.lists("service"), g.lists("endpoint"), g.lists("fp"),
        g.lists("hop_id"),
    ):  # fmt: skip
        more = f", and {len(ids) - 1} more hops" if len(ids) > 1 else ""
        rows.append({
            "trace": trace, "service": svc, "hop_ids": list(dict.fromkeys(ids)),
            "message": f"{svc} {endpoint} carried {other}'s token inside a request of {me} ({request}){more}",
            "details": {
                "subject": me, "other_subject": other, "fingerprints": list(dict.fromkeys(fps)),
                "hops": [f"{s} {e}" for s, e in zip(services, endpoints)],
            },
            "at": at,
        })  # fmt: skip
    return _findings(rows)


# -- failures and time ------------------------------------------------------------------


def retry_storm(ctx: Context) -> pd.DataFrame:
    """The same call (caller hop, service, endpoint) repeated after a 5xx, 429 or error."""
    h = ctx.hops
    status = h["status"].to_numpy(dtype=np.float64, na_value=np.nan)
    bad = (is_error(h) | (status == 429)) & h["parent_id"].notna().to_numpy()
    # Only the callers that saw a failure can have retried: a small set.
    calls = h[h["parent_id"].isin(h["parent_id"][bad].unique()).to_numpy()]
    calls = calls.assign(bad=bad[h.index.get_indexer(calls.index)])
    same = ["parent_id", "service", "endpoint"]
    calls = calls.sort_values([*same, "started_at"], kind="stable")
    calls = calls.assign(retry=calls.groupby(same, sort=False)["bad"].shift(fill_value=False).astype(bool))
    retries = calls.groupby(same, sort=False)["retry"].transform("sum").to_numpy()
    storms = calls[retries >= ctx.config.retry_min]
    storms = storms.assign(caller=storms["parent_id"].map(h["service"]))
    g = _Groups(storms, same)
    cost = g.sum("duration_ms") - np.asarray(g.first("duration_ms"), dtype=np.float64)
    rows = []
    for trace, caller, svc, endpoint, starts, ends, retried, bad, outcomes, spent, ids in zip(
        g.first("trace"), g.first("caller"), g.first("service"), g.first("endpoint"), g.lists("started_at"),
        g.lists("ended_at"), g.lists("retry"), g.lists("bad"), _statuses(g), cost.tolist(), g.ids(),
    ):  # fmt: skip
        gaps = [round(s - e, 3) for s, e in zip(starts[1:], ends[:-1])]
        rows.append({
            "trace": trace, "service": svc, "hop_ids": ids,
            "message": (
                f"{caller} called {svc} {endpoint} {len(ids)} times in one request ({sum(retried)} retries;"
                f" statuses {', '.join(outcomes)}; gaps {', '.join(f'{x:.3f}' for x in gaps)} s);"
                f" {spent:.1f} ms spent after the first call"
            ),
            "details": {
                "caller": caller, "endpoint": endpoint, "calls": len(ids), "retries": sum(retried),
                "statuses": outcomes, "gaps_s": gaps, "cost_ms": spent, "recovered": not bad[-1],
            },
            "at": starts[0],
        })  # fmt: skip
    return _findings(rows)


def upstream_error(ctx: Context) -> pd.DataFrame:
    """A hop that failed or answered 5xx while none of its own calls did: where an error began."""
    h = ctx.hops
    bad = is_error(h)
    parents_of_bad = h["parent_id"][bad].dropna().astype("int64").unique()
    origin = h[bad & ~h.index.isin(parents_of_bad)]
    roots = h.reindex(origin["trace"].to_numpy())
    origin = origin.assign(
        client_saw=is_error(roots),
        request=roots["endpoint"].to_numpy(),
        request_status=[_status(*t) for t in zip(roots["status"], roots["failed"], roots["error_kind"])],
        request_code=roots["status"].array,
    )
    g = _Groups(origin, ["trace", "service", "endpoint"])
    rows = []
    for trace, svc, endpoint, error, request, ended, code, client_saw, outcomes, starts, ids in zip(
        g.first("trace"), g.first("service"), g.first("endpoint"), g.first("error"), g.first("request"),
        g.first("request_status"), g.first("request_code"), g.first("client_saw"), _statuses(g), g.lists("started_at"), g.ids(),
    ):  # fmt: skip
        error = error if isinstance(error, str) else None
        times = f"{len(ids)} times" if len(ids) > 1 else "once"
        rows.append({
            "trace": trace, "service": svc, "hop_ids": ids,
            # The client saw the failure, or the request recovered (a retry, a fallback).
            "severity": "error" if client_saw else "warning",
            "message": (
                f"{svc} {endpoint} failed {times} ({', '.join(outcomes)}{f'; {error}' if error else ''});"
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
    Detector("near_expiry", "warning", near_expiry),
    Detector("duplicate_validation", "warning", duplicate_validation),
    Detector("clock_skew", "warning", clock_skew),
    Detector("token_reuse", "warning", token_reuse),
    Detector("retry_storm", "warning", retry_storm),
    Detector("slow_hop", "info", slow_hop),
)
KINDS = tuple(d.kind for d in DETECTORS)


def run_detectors(ctx: Context, detectors: tuple[Detector, ...] = DETECTORS) -> pd.DataFrame:
    """All findings, sorted by severity, then time."""
    frames = []
    for detector in detectors:
        found = detector.run(ctx)
        if len(found):
            frames.append(found.assign(kind=detector.kind, severity=found["severity"].astype(object).fillna(detector.severity)))
    if not frames:
        return empty_findings()
    out = pd.concat(frames, ignore_index=True)
    out["trace"] = out["trace"].astype("Int64")
    out["at"] = out["at"].astype("float64")
    out["rank"] = out["severity"].map(SEVERITY_RANK)
    out = out.sort_values(["rank", "at", "kind"], kind="stable").drop(columns="rank")
    return out[list(FINDING_COLUMNS)].reset_index(drop=True)


def empty_findings() -> pd.DataFrame:
    out = pd.DataFrame({c: pd.Series(dtype=object) for c in FINDING_COLUMNS})
    return out.astype({"trace": "Int64", "at": "float64"})
