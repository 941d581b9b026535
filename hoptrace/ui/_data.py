"""Everything the web view knows about its trace DBs, and the one place it reads the analysis.

The server asks this module for plain dicts and lists (JSON-ready); nothing else in
``hoptrace.ui`` touches a DataFrame. What the view shows is the presentation model's
(:mod:`hoptrace.analyzer._model`): the worst-first order, how each hop ended, the finding
groups, the call graph; this module only indexes and pages it. :meth:`Data.preview` lists
each DB's newest requests straight from SQL (see :mod:`hoptrace.ui._preview`, which the
server answers with while this module loads); then each DB is analysed once. While a DB is being written, :meth:`Data.peek` lists
the requests recorded since (by hop id) and :meth:`Data.refresh` analyses only the tail
(the requests that started in the last ``LOOKBACK_S`` seconds before the newest hop) and
merges it into what it had. Headers, query and token claims, which the analysis frames
leave out, are read per hop with the project's read-only opener.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import sqlite3
import tempfile
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hoptrace._format import hop_ended
from hoptrace._stored import header_pairs, stored_json, stored_value
from hoptrace.analyzer import Analysis, analysis_for, analyze, latency_tables
from hoptrace.analyzer._arrays import group_keys
from hoptrace.analyzer._model import (
    TIERS,
    Model,
    finding_sort_keys,
    group_findings,
    hop_endings,
    model,
    outcomes,
    slowest_first,
    sorted_findings,
    worst_first_keys,
)
from hoptrace.analyzer._types import OUTCOMES, SEVERITIES, SEVERITY_RANK
from hoptrace.db import COLUMNS as COLUMNS_OF
from hoptrace.db import empty_file, open_for_reading, shared_columns, table_columns
from hoptrace.ui._preview import COLUMNS, NotFound, NotReady, entry_requests
from hoptrace.ui._query import RequestQuery
from hoptrace.ui._worker import Worker

__all__ = ["Data", "NotFound", "NotReady", "align", "curl_line", "graph_layout", "timings"]

NO_FINDING_RANK = len(SEVERITIES)
SETTLE_HOPS = 100_000
"""Hops the live passes may gather before they are merged into the whole capture's analysis
(at 500 hops/s: every 200 s)."""
LOOKBACK_S = 10.0
"""How far before the newest hop a live refresh re-analyses: a request still running
after that long is analysed in two parts (its early hops as they were)."""
TIME_SLACK_S = 1e-6
"""How much earlier than a live pass's start the copy of the tail begins (see :func:`copy_tail`)."""
SORTABLE = {
    "worst": "worst", "started": "started_at", "duration": "duration_ms", "status": "status", "hops": "hops", "severity": "rank",
}  # fmt: skip
HOP_FIELDS = (
    "service", "method", "path", "endpoint", "status", "error", "error_kind", "failed", "duration_ms", "link",
    "link_candidates", "depth", "is_validation", "token_fp", "token_sub", "token_exp", "remaining_s", "self_ms",
    "on_critical_path",
)  # fmt: skip
HOP_COLUMNS = (
    "id", "method", "scheme", "host", "port", "path", "query", "http_version", "status", "reason", "error", "error_kind",
    "started_at", "request_end_at", "connect_at", "connected_at", "response_start_at", "ended_at", "request_headers",
    "response_headers",
)  # fmt: skip
SIGHTING_COLUMNS = ("fingerprint", "role", "location")
TOKEN_COLUMNS = ("kind", "alg", "kid", "typ", "iss", "sub", "iat", "nbf", "exp", "claims", "error")
SUMMARY = ("db", "trace", "started_at", "endpoint", "status", "status_class", "ended", "duration_ms", "subject")
"""What names a request: the head of its waterfall and each side of a compare."""
COMPARED = ("status", "error_kind", "link")
SLOWER = 2.0  # a hop at least this many times slower (and 5 ms more) than its match counts as a difference


def plain(value: Any) -> Any:
    """A JSON-ready Python value: numpy scalars unwrapped, NaN / NA / inf as None."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str) and value in ("nan", "None", "<NA>"):  # missing values the analysis cast to str
        return None
    return value


class Memo:
    """The value last computed from some objects, kept while they are the same objects (held weakly:
    frames and analyses are swapped whole, never changed in place) and the same plain values (a time)."""

    def __init__(self) -> None:
        self._last: tuple[tuple[Any, ...], Any] | None = None
        """(the objects, the value): one attribute, so that a thread never reads one's with the other's."""

    def get(self, compute: Callable[..., Any], *objects: Any) -> Any:
        """``compute(*objects)``, or what it gave last time, for these same objects."""
        last = self._last
        if last is not None and len(last[0]) == len(objects) and all(map(_same, last[0], objects)):
            return last[1]
        value = compute(*objects)
        self._last = (tuple(_held(obj) for obj in objects), value)
        return value


def _held(obj: Any) -> Any:
    return obj if isinstance(obj, (int, float, str)) else weakref.ref(obj)


def _same(held: Any, obj: Any) -> bool:
    return held() is obj if isinstance(held, weakref.ref) else type(held) is type(obj) and held == obj


@dataclass
class Source:
    """One trace DB and its analysis, or several files joined into one (``files``)."""

    index: int
    path: Path
    files: tuple[Path, ...] = ()
    """With several: every file, ``path`` the first. Such a source is analysed whole at each
    change (``hoptrace.analyzer._merge`` numbers hop ``i`` of file ``k`` of ``K`` as ``i * K + k``)."""
    analysis: Analysis | None = None
    model: Model | None = None
    """The presentation model of ``analysis``: the worst-first order, hop endings, finding groups, graph."""
    tables_stale: bool = False
    """A merged analysis's latency tables cover only the tail: :meth:`Data.model_of` recomputes them."""
    requests: pd.DataFrame = field(default_factory=pd.DataFrame)
    recent: pd.DataFrame = field(default_factory=pd.DataFrame)
    """Live: the requests :meth:`Data.peek` listed since a pass last swapped ``requests`` in, none of
    them analysed. Kept apart, so that listing a few rows does not copy the whole list (at a million
    hops 174k rows, five times a second) nor throw away its sort orders."""
    max_hop_id: int = 0
    analyse_s: float = 0.0
    by_trace: pd.DataFrame = field(default_factory=pd.DataFrame)
    """``requests`` indexed by trace, for one request's lookups."""
    lookup: Index | None = None
    pending: Tail | None = None
    """Live: the analysis of the requests that started since ``pending.since``, not yet merged into
    ``analysis`` (merging copies every hop: it waits until a view of the whole capture asks)."""
    counts: tuple[int, int] = (0, 0)
    """(hops, findings) of ``analysis`` with ``pending`` merged in, for the status line."""
    settling: bool = False
    """A merge of ``pending`` into ``analysis`` is running: live passes leave their analyses in ``deferred``."""
    deferred: list[tuple[Analysis, float]] = field(default_factory=list)
    """Live passes' analyses (and their ``since``) waiting for that merge, in the order of the passes."""
    orders: Memo = field(default_factory=Memo, repr=False, compare=False)
    """The list's positions in each (sort, descending) order, while it is the same list."""
    facets: Memo = field(default_factory=Memo, repr=False, compare=False)
    """What the filters can take in ``analysis`` (see :class:`Facets`)."""
    kept: Memo = field(default_factory=Memo, repr=False, compare=False)
    """What a merge from the pending tail's start keeps of ``analysis`` (see :func:`_merged_counts`)."""

    def order(self, requests: pd.DataFrame, sort: str, descending: bool) -> np.ndarray:
        """Positions of ``requests`` (this source's list, as a caller read it) in a page's order, sorted
        once per list and order. Sorting 174k requests for every page cost 30-55 ms; a live view asks
        for a page after every pass and peek, and that CPU came out of the passes."""
        orders = self.orders.get(lambda _: {}, requests)
        if (sort, descending) not in orders:
            order = _worst_first(requests, descending) if sort == "worst" else None
            if order is None:
                by = requests[list(dict.fromkeys((SORTABLE[sort], "started_at")))].reset_index(drop=True)
                order = _sorted(by, sort, descending).index.to_numpy()
            orders[sort, descending] = order
        return orders[sort, descending]

    def listed(self) -> pd.DataFrame:
        """``requests`` and then ``recent``, as one list."""
        return pd.concat([self.requests, self.recent], ignore_index=True) if len(self.recent) else self.requests

    def is_listed(self, trace: int) -> bool:
        return any(len(frame) and trace in frame["trace"].to_numpy() for frame in (self.requests, self.recent))


@dataclass
class Tail:
    """What the live passes analysed since ``since``: the requests that started then or later."""

    analysis: Analysis
    since: float
    lookup: Index


@dataclass(frozen=True, eq=False)
class _Started:
    """A live pass started in the worker: its source, the start time it analyses from, and the
    newest hop id that was recorded before its copy began."""

    source: Source
    since: float
    newest: int


class Slices:
    """Positions of equal values as slices of one sort: a key's rows in O(log n), where a scan of a
    million-row column costs ~10 ms per lookup."""

    def __init__(self, values: np.ndarray) -> None:
        self.order = np.argsort(values, kind="stable")
        self.keys, self.starts = np.unique(values[self.order], return_index=True)

    def positions(self, key: Any) -> np.ndarray:
        at = int(np.searchsorted(self.keys, key))
        if at >= len(self.keys) or self.keys[at] != key:
            return self.order[0:0]
        end = self.starts[at + 1] if at + 1 < len(self.starts) else len(self.order)
        return self.order[self.starts[at] : end]


@dataclass
class Index:
    """What one request's view looks up, built once per analysis."""

    hops: pd.DataFrame  # the columns a waterfall shows
    hops_by_trace: Slices
    findings_by_trace: Slices
    passing: dict[str, tuple[np.ndarray, np.ndarray]]
    """endpoint -> (start times, traces) of its requests that passed without an error finding, by time."""

    @classmethod
    def build(cls, a: Analysis, requests: pd.DataFrame) -> Index:
        hops = a.hops[["trace", "parent_id", "order", "started_at", *HOP_FIELDS]]
        found = a.findings["trace"].astype("Float64").fillna(-1).to_numpy("int64")
        ok = requests[requests["status_class"].isin(["2xx", "3xx"]) & (requests["rank"] > 0)].sort_values("started_at")
        passing = {ep: (g["started_at"].to_numpy(), g["trace"].to_numpy()) for ep, g in ok.groupby("endpoint", sort=False)}
        return cls(hops, Slices(hops["trace"].to_numpy()), Slices(found), passing)

    def peer(self, endpoint: str, at: float, trace: int) -> int | None:
        """The passing request of ``endpoint`` nearest in time to ``at``, other than ``trace``."""
        times, traces = self.passing.get(endpoint, (np.zeros(0), np.zeros(0, np.int64)))
        mid = int(np.searchsorted(times, at))
        near = [i for i in range(max(0, mid - 2), min(len(times), mid + 2)) if traces[i] != trace]
        return int(traces[min(near, key=lambda i: abs(times[i] - at))]) if near else None


class Data:
    """The analyses of ``paths``, queried by the web view. Thread-safe: a refresh swaps frames whole."""

    def __init__(self, paths: list[Path], lookback_s: float = LOOKBACK_S) -> None:
        """Several ``paths`` are one joined analysis (the shards of one capture, or one stack's hosts)."""
        files = tuple(Path(p) for p in paths)
        self.sources = [Source(0, files[0], files if len(files) > 1 else ())]
        self.lookback_s = lookback_s
        self.version = 0
        self.last_error: str | None = None
        """Why the latest live refresh failed, if it did (shown by the status API)."""
        self.on_change: Callable[[], None] = lambda: None
        """Called (from the refreshing thread) when a pass has listed its rows, before :meth:`refresh`
        returns: the server tells the open pages at once rather than after the pass's join; and from
        the thread of a merge when it has joined what passes left it, or failed."""
        self._lock = threading.Lock()
        self._settling = threading.Lock()
        self._settler: threading.Thread | None = None
        """The thread merging a pending tail grown past ``SETTLE_HOPS``, while it runs."""
        self._facets = Memo()
        self._tails = Worker(preload=__name__)
        self._started: _Started | None = None
        """The tail pass running in the worker, when one is."""
        for path in files:
            open_for_reading(path, check=False).close()  # a bad file fails here, at start, as one line

    def follow(self) -> None:
        """Start the process the live passes run in now: its imports take about a second, which
        the first pass would otherwise wait for."""
        self._tails.start()

    def close(self) -> None:
        """Stop that process (it also ends by itself when this one does)."""
        self._tails.close()

    # -- loading ---------------------------------------------------------------------------

    def peek(self) -> bool:
        """List requests recorded since the last analysis at once, read by id from SQL; the tail
        analysis that follows (a second or more) adds their trees and findings. True when any."""
        changed = False
        for source in self.sources:
            if source.analysis is None or len(source.requests) == 0 or source.files:  # joined: listed once analysed
                continue
            recent = source.recent
            after = int(max(source.requests["trace"].max(), recent["trace"].max() if len(recent) else -1))
            new = _quick_requests(source.path, source.index, after_id=after)
            with self._lock:
                # A refresh may have swapped the list in meanwhile, with some of these analysed: keep those
                # (looked up among its rows past `after`, not all of them: a hash of 174k traces is 6 ms).
                traces = source.requests["trace"].to_numpy()
                new = new[~np.isin(new["trace"].to_numpy(), traces[traces > after])]
                if len(new):
                    source.recent = pd.concat([source.recent, new], ignore_index=True) if len(source.recent) else new
                    self.version += 1
                    changed = True
        return changed

    def refresh(self) -> bool:
        """Analyse whatever was recorded since the last call; True when anything changed. Live, the
        next pass may already run in the worker when this returns: the next call takes its result."""
        changed = False
        for source in self.sources:
            newest = _newest_hop_id(source)
            if newest == source.max_hop_id and self._started_for(source) is None:
                continue
            started = time.perf_counter()
            if source.analysis is None:
                self._analyse_all(source, newest)
            else:
                self._analyse_tail(source, newest)
            source.analyse_s = time.perf_counter() - started
            if source.pending is not None and len(source.pending.analysis.hops) > SETTLE_HOPS:
                self._settle_aside(source)
            changed = True
        return changed

    def _settle_aside(self, source: Source) -> None:
        """Merge the pending tail in a thread of its own. The merge copies every hop (1-3 s at a million):
        run here, it held back the next passes' rows that long; beside them, only their joins wait."""
        if source.settling or (self._settler is not None and self._settler.is_alive()):
            return  # one merge at a time (a view asked for one, or the last one still runs)
        self._settler = threading.Thread(target=self._settle_noting, args=(source,), name="hoptrace-settle", daemon=True)
        self._settler.start()

    def _settle_noting(self, source: Source) -> None:
        try:
            self.settled(source)
        except Exception as exc:  # noqa: BLE001 - no caller to raise to: the status line shows it
            self.last_error = f"{time.strftime('%H:%M:%S')} merging the live tail: {exc}"
            self.on_change()

    def _analyse_all(self, source: Source, newest: int) -> None:
        analysis = analysis_for(source.files or source.path)  # the analysis saved in the file when it is current
        if not len(analysis.hops):
            analysis, requests, index = None, pd.DataFrame(), None
        else:
            requests = _ranked(_requests(model(analysis), source.index))
            index = Index.build(analysis, requests)
        with self._lock:
            requests = self._still_waiting(source, requests) if analysis is not None else requests
            source.analysis, source.max_hop_id, source.requests, source.lookup = analysis, newest, requests, index
            source.recent = pd.DataFrame()
            source.model = None if analysis is None else model(analysis)
            source.by_trace = requests.set_index("trace", drop=False) if len(requests) else requests
            source.counts = (0, 0) if analysis is None else (len(analysis.hops), len(analysis.findings))
            source.pending, source.tables_stale = None, False
            self.version += 1

    def _analyse_tail(self, source: Source, newest: int) -> None:
        """Analyse the requests that started in the last ``lookback_s`` seconds (and any listed, waiting):
        work that follows the tail, not the file. The request list swaps the tail's rows in; then the
        tail joins what earlier passes found since the last merge (``Source.pending``).

        The tail is analysed in the worker process. When more hops came while it ran, the next
        pass starts there at once, and this one's rows are merged here meanwhile: the worker is
        never idle while hops wait."""
        before = source.pending.analysis if source.pending is not None else source.analysis
        started, self._started = self._started_for(source), None
        if started is None:  # (the worker holds one call: another source's, if any, is dropped)
            started = self._start_tail(source, newest, _newest_start(before))
        tail, fresh = self._tails.result()
        if (now := _newest_hop_id(source)) > started.newest:
            self._started = self._start_tail(source, now, _newest_start(before, tail))
        self._list_tail(source, tail, fresh, started, source.pending)
        with self._lock:
            if source.settling:  # the merge joins it when it is done (see settled())
                source.deferred.append((tail, started.since))
                return
        with self._settling:  # a merge starting meanwhile waits for this join
            self._join_tail(source, tail, started.since, source.pending)

    def _list_tail(self, source: Source, tail: Analysis, fresh: pd.DataFrame, started: _Started, pending: Tail | None) -> None:
        """Swap a pass's rows into the request list, before its analysis joins the pending one: the
        rows are what a live page waits for, and the join (a copy of the pending tail) can follow."""
        since = started.since
        # A hop of an older request still running looks like a request of its own in the tail: the
        # view that holds that request keeps it (as the merge will), so it is no row of the list.
        claimed = _running_hops(source.analysis, since)
        if pending is not None and pending.since < since:
            claimed = claimed.append(_running_hops(pending.analysis, since))
        hops = tail.hops
        roots = (hops.index.to_numpy() == hops["trace"].to_numpy()) & (hops["started_at"].to_numpy() >= since)
        fresh = fresh[fresh["trace"].isin(hops.index[roots]).to_numpy() & ~fresh["trace"].isin(claimed).to_numpy()]
        with self._lock:
            requests = _ranked(_relisted(source.requests, fresh, since, source.recent))
            source.max_hop_id, source.requests, source.recent = started.newest, requests, pd.DataFrame()
            source.by_trace = requests.set_index("trace", drop=False)
            self.version += 1
        self.on_change()

    def _join_tail(self, source: Source, tail: Analysis, since: float, pending: Tail | None) -> None:
        """``source.pending`` with a pass's analysis joined: what pages filter by, and a request's view reads."""
        if pending is not None and pending.since < since:
            joined, joined_since = _merge(pending.analysis, tail, since), pending.since
        else:
            joined, joined_since = tail, since
        with self._lock:
            requests = source.requests
        mine = requests[(requests["started_at"] >= joined_since).to_numpy() & requests["hops"].notna().to_numpy()]
        lookup = Index.build(joined, mine)
        counts = _merged_counts(source.kept.get(_kept_of_base, source.analysis, joined_since), joined)
        with self._lock:
            source.pending, source.counts, source.tables_stale = Tail(joined, joined_since, lookup), counts, True
            self.version += 1

    def _started_for(self, source: Source) -> _Started | None:
        """The pass running in the worker, when it is ``source``'s."""
        started = self._started
        return started if started is not None and started.source is source else None

    def _start_tail(self, source: Source, newest: int, latest_start: float) -> _Started:
        """Start, in the worker, the analysis of the requests that started within ``lookback_s`` of
        ``latest_start`` or are listed and waiting; every hop up to ``newest`` is in its copy."""
        since = latest_start - self.lookback_s
        # Requests listed live but not analysed yet are in this pass, however long the last one took.
        listed = (frame for frame in (source.requests, source.recent) if len(frame))
        waiting = [frame["started_at"].to_numpy()[frame["hops"].isna().to_numpy()] for frame in listed]
        since = min([since, *(float(starts.min()) for starts in waiting if len(starts))])
        self._tails.submit(tail_pass, source.files or (source.path,), bool(source.files), since, source.index)
        return _Started(source, since, newest)

    @staticmethod
    def _still_waiting(source: Source, requests: pd.DataFrame) -> pd.DataFrame:
        """``requests`` with the rows peek() listed while a pass ran, past what it analysed (under the lock)."""
        listed = source.listed()
        if not len(listed) or not len(requests):
            return requests
        waiting = listed[listed["hops"].isna().to_numpy() & ~listed["trace"].isin(requests["trace"]).to_numpy()]
        return pd.concat([requests, waiting[waiting["trace"] > requests["trace"].max()]], ignore_index=True)

    def settled(self, source: Source) -> Analysis | None:
        """``source.analysis`` with the live passes' pending tail merged in: what a view of the whole
        capture (a hop's detail, workflows, latency, graph, filters by service) reads. The merge copies
        every hop (about a second at a million), so it happens when one of those asks, or when the
        pending tail has grown past ``SETTLE_HOPS``, not on every live pass. Meanwhile live passes
        list their rows and leave their analyses to be joined here, after the merge."""
        with self._settling:
            with self._lock:
                pending = source.pending
                if pending is None:
                    return source.analysis
                source.settling = True
            try:
                merged = _merge(source.analysis, pending.analysis, pending.since)
                with self._lock:
                    requests = source.requests
                index = Index.build(merged, requests)
                with self._lock:  # no pass joined meanwhile (they wait in deferred, or for _settling)
                    source.analysis, source.lookup, source.model = merged, index, model(merged)
                    source.pending, source.tables_stale = None, True
            finally:
                self._join_deferred(source)
            return merged

    def _join_deferred(self, source: Source) -> None:
        """Join the analyses live passes left while a merge ran, in their order (under ``_settling``)."""
        while True:
            with self._lock:
                if not source.deferred:
                    source.settling = False
                    return
                tail, since = source.deferred.pop(0)
            self._join_tail(source, tail, since, source.pending)
            self.on_change()

    def preview(self) -> None:
        """List each DB's requests (its entry route's hops) from SQL, before any analysis: no findings yet."""
        for source in self.sources:
            if source.analysis is None and not source.files:
                source.requests = _quick_requests(source.path, source.index)
        self.version += 1

    # -- the request list ------------------------------------------------------------------

    def request_page(self, query: RequestQuery) -> dict[str, Any]:
        with self._lock:  # the lists, the rows listed since and the analyses of one moment
            held = [(s, s.requests, s.recent, s.analysis, s.pending) for s in self.sources]
        end, total, tops = query.offset + query.limit, 0, []
        for source, listed, recent, base, pending in held:
            wanted = _wanted_traces(base, pending, query)
            for reqs, whole in ((listed, True), (recent, False)):
                if not len(reqs):
                    continue
                keep = _kept(reqs, query, wanted)
                total += int(keep.sum())
                if whole:  # a list's first `end` rows in the page's order hold every row of it the page can show
                    order = source.order(reqs, query.sort, query.descending)
                    tops.append(reqs.iloc[order[keep[order]][:end]])
                else:  # the few rows listed live since
                    tops.append(_sorted(reqs[keep], query.sort, query.descending).iloc[:end])
        if not tops:
            return {"total": 0, "offset": query.offset, "items": [], "version": self.version}
        rows = tops[0] if len(tops) == 1 else _sorted(pd.concat(tops, ignore_index=True), query.sort, query.descending)
        page = rows.iloc[query.offset : end]
        columns = ["db", "trace", "started_at", "endpoint", "service", "status", "status_class", "ended", "duration_ms",
                   "hops", "subject", "severity", "kinds", "worst", "tier"]  # fmt: skip
        analysing = any(s.analysis is None and len(s.requests) for s in self.sources)
        return {"total": total, "offset": query.offset, "items": _records(page[columns]), "version": self.version,
                "analysing": analysing}  # fmt: skip

    def facets(self) -> dict[str, list]:
        """The values each filter of the request list can take, in the whole capture's analysis and the
        live passes' pending tail as they stand. A live page asks for them on every change: merging the
        two (as a view of the whole capture does, a copy of every hop: ~1 s at a million) each time
        took the time of the passes it waited for; they are worked out once per pass."""
        with self._lock:
            held = [(s, s.analysis, s.pending, s.model) for s in self.sources if s.analysis is not None]
        state = [obj for _, base, pending, _ in held for obj in (base, pending) if obj is not None]
        return self._facets.get(lambda *_: self._facets_of(held), *state)

    @staticmethod
    def _facets_of(held: list[tuple[Source, Analysis, Tail | None, Model]]) -> dict[str, list]:
        values: dict[str, list[str]] = {}
        groups: dict[str, dict[str, Any]] = {}
        for s, base, pending, _ in held:
            whole = s.facets.get(Facets.of, base.hops, base.findings)
            if pending is None:
                found, kinds = whole.merged()
            else:
                found, kinds = whole.merged(Facets.of(pending.analysis.hops, pending.analysis.findings), pending.since)
            for name, texts in found.items():
                values[name] = _sorted_union(values[name], set(texts)) if name in values else texts
            for severity, kind, count in kinds:
                group = groups.setdefault(kind, {"kind": kind, "severity": severity, "count": 0})
                group["count"] += count
        out = {name: values.get(name, []) for name in ("service", "endpoint", "subject")}
        # Finding kinds in the model's group order (errors first, then by first occurrence), with counts.
        return {**out, "kind": list(groups), "kinds": list(groups.values()), "severity": list(SEVERITIES),
                "status": list(OUTCOMES)}  # fmt: skip

    def status(self) -> dict[str, Any]:
        # Read without the lock: the event streams call this on the server's loop, which must not wait
        # for a pass's swap. Rows a pass is moving into the list may count twice until the next event.
        dbs = [
            {
                "db": s.index,
                "path": ", ".join(map(str, s.files or (s.path,))),
                "hops": s.counts[0],
                "requests": len(s.requests) + len(s.recent),
                "analysing": s.analysis is None and len(s.requests) > 0,
                "findings": s.counts[1],
                "max_hop_id": s.max_hop_id,
                "analyse_s": round(s.analyse_s, 3),
            }
            for s in self.sources
        ]
        return {"version": self.version, "last_error": self.last_error, "dbs": dbs}

    # -- one request -----------------------------------------------------------------------

    def source(self, db: int) -> Source:
        if not 0 <= db < len(self.sources):
            raise NotFound(f"no trace database #{db}")
        source = self.sources[db]
        if source.analysis is None:
            if len(source.requests):
                raise NotReady(f"{source.path.name} is still being analysed; try again in a few seconds")
            raise NotFound(f"{source.path.name} has no hops yet")
        return source

    def request(self, db: int, trace: int) -> dict[str, Any]:
        """A request as its waterfall needs it: hops depth first, token expiries, findings, a passing peer."""
        source = self.source(db)
        # A request of the live passes is looked up among theirs; any other in the whole capture's.
        pending = source.pending
        found_in = pending if pending is not None and trace in pending.lookup.hops.index else source
        lookup, findings = found_in.lookup, (found_in.analysis.findings)
        rows = lookup.hops.iloc[lookup.hops_by_trace.positions(trace)]
        if rows.empty or trace not in rows.index:
            if source.is_listed(trace):  # listed live, not analysed yet
                raise NotReady(f"request {trace} is being analysed; try again in a second")
            raise NotFound(f"no request {trace} in {source.path.name}")
        rows = rows.sort_values("order")
        t0 = float(rows.at[trace, "started_at"])
        found = findings.iloc[lookup.findings_by_trace.positions(trace)]
        findings = _findings_of(group_findings(found), set(rows.index))
        ended, outcome = hop_endings(rows), outcomes(rows)
        flagged: dict[int, list[int]] = {}
        for n, f in enumerate(findings):
            for hop_id in f["hop_ids"]:
                flagged.setdefault(hop_id, []).append(n)
        hops = []
        for hop_id, hop in zip(rows.index, rows.to_dict("records"), strict=True):
            item = {"id": int(hop_id), "parent": plain(hop["parent_id"])}
            item |= {name: plain(hop[name]) for name in HOP_FIELDS}
            item["ended"], item["outcome"] = ended[hop_id], outcome[hop_id]
            item["start_ms"] = (float(hop["started_at"]) - t0) * 1000
            item["findings"] = flagged.get(int(hop_id), [])
            hops.append(item)
        expiries = sorted({float(e) for e in rows["token_exp"].dropna()})
        root = source.by_trace.loc[trace]
        return {
            **{name: plain(root[name]) for name in SUMMARY},
            "tier": TIERS[int(root["tier"])],
            "hops": hops,
            "expiries": [{"at": e, "ms": (e - t0) * 1000} for e in expiries],
            "findings": findings,
            "peer": _peer(source, root["endpoint"], t0, trace),
        }

    def hop(self, db: int, hop_id: int) -> dict[str, Any]:
        """One hop in full: redacted headers and query, timings, its tokens' header and claims, a curl line."""
        source = self.source(db)
        pending = source.pending
        hops = pending.analysis.hops if pending is not None and hop_id in pending.analysis.hops.index else self.settled(source).hops
        if hop_id not in hops.index:
            raise NotFound(f"no hop {hop_id} in {source.path.name}")
        facts = hops.loc[hop_id]
        path, stored_id = (source.path, hop_id) if not source.files else (facts["file"], int(facts["file_hop"]))
        conn = open_for_reading(path, check=False)  # the analysis checked the file's structure
        try:
            conn.row_factory = _dict_row
            select = f"SELECT {_columns(conn, 'hops', 'h', HOP_COLUMNS)} FROM hops AS h WHERE h.id = ?"
            row = conn.execute(select, (stored_id,)).fetchone()
            tokens = _hop_tokens_of(conn, stored_id)
        finally:
            conn.close()
        if row is None:  # a hostile file's id that the analysis read as this one and SQL does not match
            raise NotFound(f"hop {hop_id} of {source.path.name} cannot be read back")
        request_headers, response_headers = _headers(row["request_headers"]), _headers(row["response_headers"])
        detail = {name: plain(facts[name]) for name in HOP_FIELDS}
        detail |= {
            "ended": hop_ended(facts["status"], facts["failed"], facts["error_kind"]),
            "db": db,
            "id": hop_id,
            "trace": int(facts["trace"]),
            "parent": plain(facts["parent_id"]),
            "query": row["query"],
            "reason": row["reason"],
            "http_version": row["http_version"],
            "started_at": row["started_at"],
            "ended_at": row["ended_at"],
            "timings": timings(row),
            "request_headers": request_headers,
            "response_headers": response_headers,
            "tokens": [_token(t, row["started_at"]) for t in tokens],
            "curl": curl_line(row, request_headers),
        }
        return detail

    # -- compare, sessions, latency, graph -------------------------------------------------

    def compare(self, a: tuple[int, int], b: tuple[int, int]) -> dict[str, Any]:
        left, right = self.request(*a), self.request(*b)
        return {"a": _summary(left), "b": _summary(right), "rows": align(left["hops"], right["hops"])}

    def sessions(self, limit: int = 500) -> list[dict[str, Any]]:
        """One row per workflow (session): subject, requests, span, whether a token expired in it."""
        out = []
        for s in self.sources:
            a = self.settled(s)
            if a is None or a.sessions.empty:
                continue
            rows = a.sessions
            # A request failed as the model says: its root ended 4xx, 5xx or without a whole answer.
            failed = ~np.isin(outcomes(a.hops.loc[rows["trace"].to_numpy()]).to_numpy(), ["2xx", "3xx"])
            grouped = rows.assign(failed=failed).groupby("session", sort=False)
            table = grouped.agg(subject=("subject", "first"), requests=("trace", "size"), started_at=("started_at", "min"),
                                ended_at=("ended_at", "max"), expired=("expired", "any"), failed=("failed", "sum"))  # fmt: skip
            table = table.reset_index().assign(db=s.index)
            out.extend(_records(table))
        out.sort(key=lambda r: (not r["expired"], -(r["failed"] or 0), r["started_at"] or 0))
        return out[:limit]

    def session(self, db: int, session: int) -> dict[str, Any]:
        """A workflow's requests over wall time and the lifetimes of the tokens they carried."""
        a = self.settled(self.source(db))
        rows = a.sessions[a.sessions["session"] == session]
        if rows.empty:
            raise NotFound(f"no session {session}")
        fps = [fp for fp in rows["token_fp"].unique() if plain(fp) is not None]
        tokens = a.tokens.reindex(fps)
        roots = a.hops.loc[rows["trace"].to_numpy()]
        rows = rows.assign(outcome=outcomes(roots).to_numpy(), ended=hop_endings(roots).to_numpy())
        return {
            "db": db,
            "session": session,
            "subject": plain(rows["subject"].iloc[0]),
            "requests": _records(
                rows[["trace", "started_at", "ended_at", "status", "outcome", "ended", "endpoint", "token_fp", "expired"]]
            ),
            "tokens": [
                {"fingerprint": fp, "iat": plain(t["iat"]), "exp": plain(t["exp"]), "sub": plain(t["sub"])}
                for fp, t in tokens.iterrows()
            ],
        }

    def latency(self) -> dict[str, Any]:
        services, endpoints = [], []
        for s in self.sources:
            if s.analysis is None:
                continue
            a = self.model_of(s).analysis
            services += _records(slowest_first(a.services).assign(db=s.index))
            endpoints += _records(slowest_first(a.endpoints).assign(db=s.index))
        return {"services": services, "endpoints": endpoints}

    def graph(self) -> dict[str, Any]:
        """The model's call graph (DBs summed), its services in columns by call depth from the client."""
        edges: dict[tuple[str, str], dict[str, Any]] = {}
        worst: dict[str, str | None] = {}
        for s in self.sources:
            if s.analysis is None:
                continue
            nodes, found = self.model_of(s).graph
            for name, outcome in zip(nodes["service"], nodes["worst"]):
                worst[name] = _worse(worst.get(name), plain(outcome))
            for row in _records(found):
                edge = edges.setdefault((row["caller"], row["callee"]), {"calls": 0, "errors": 0, "client_errors": 0,
                                                                          "p95_ms": 0.0, "worst": None})  # fmt: skip
                for name in ("calls", "errors", "client_errors"):
                    edge[name] += row[name] or 0
                edge["p95_ms"] = max(edge["p95_ms"], row["p95_ms"] or 0.0)
                edge["worst"] = _worse(edge["worst"], row["worst"])
        return graph_layout(edges, worst)

    def model_of(self, source: Source) -> Model:
        """The source's model, its latency tables recomputed from the merged hops after a live merge (on first use)."""
        if source.tables_stale:
            analysis = self.settled(source)
            tables = dict(zip(("services", "endpoints", "edges"), latency_tables(analysis.hops), strict=True))
            fixed = model(dataclasses.replace(analysis, **tables))
            with self._lock:
                if source.analysis is analysis:  # no refresh swapped it meanwhile
                    source.analysis, source.model, source.tables_stale = fixed.analysis, fixed, False
            return fixed
        return source.model


# -- pure helpers (tested as data) ------------------------------------------------------------


def timings(row: dict[str, Any]) -> dict[str, float | None]:
    """connect / send / wait / receive in ms from the hop's proxy timestamps (the split HAR uses).

    send: request headers to request end; wait: request end to the first response byte;
    receive: first to last response byte; connect: the upstream TCP set-up (None when the
    connection was reused). A missing timestamp (the hop failed) leaves its part None.
    """

    def span(start: str, end: str) -> float | None:
        a, b = row.get(start), row.get(end)
        return None if a is None or b is None else max(0.0, (b - a) * 1000)

    return {
        "connect": span("connect_at", "connected_at"),
        "send": span("started_at", "request_end_at"),
        "wait": span("request_end_at", "response_start_at"),
        "receive": span("response_start_at", "ended_at"),
    }


def curl_line(row: dict[str, Any], headers: list[list[str]]) -> str:
    """A shell-quoted curl command that repeats the hop against its upstream, secrets as recorded ([redacted:…])."""
    host = row.get("host") or "127.0.0.1"
    port = f":{row['port']}" if row.get("port") else ""
    url = f"{row.get('scheme') or 'http'}://{host}{port}{row.get('path') or '/'}"
    if row.get("query"):
        url += f"?{row['query']}"
    parts = ["curl", "-X", row.get("method") or "GET", url]
    for name, value in headers:
        if name.lower() not in ("host", "content-length", "connection"):
            parts += ["-H", f"{name}: {value}"]
    return " ".join(shlex.quote(str(p)) for p in parts)


def align(a: list[dict], b: list[dict]) -> list[dict[str, Any]]:
    """Pair the hops of two requests by (service, method, endpoint, n-th occurrence), in a's tree order.

    Each row names the fields that differ: status, error kind, link, ``duration`` (one at
    least ``SLOWER`` times the other), ``expired`` (the token expired on one side only),
    ``missing`` (the hop exists on one side only).
    """

    def keyed(hops: list[dict]) -> dict[tuple, dict]:
        seen: dict[tuple, int] = {}
        out = {}
        for hop in hops:
            base = (hop["service"], hop["method"], hop["endpoint"])
            seen[base] = seen.get(base, 0) + 1
            out[(*base, seen[base])] = hop
        return out

    left, right = keyed(a), keyed(b)
    order = list(left) + [k for k in right if k not in left]
    rows = []
    for key in order:
        x, y = left.get(key), right.get(key)
        differs = ["missing"] if x is None or y is None else _differences(x, y)
        rows.append({"key": f"{key[0]} {key[2]}" + (f" #{key[3]}" if key[3] > 1 else ""), "a": x, "b": y, "differs": differs})
    return rows


def _differences(x: dict, y: dict) -> list[str]:
    out = [name for name in COMPARED if x.get(name) != y.get(name)]
    dx, dy = x.get("duration_ms") or 0.0, y.get("duration_ms") or 0.0
    if max(dx, dy) >= SLOWER * min(dx, dy) and abs(dx - dy) >= 5:
        out.append("duration")
    if _expired(x) != _expired(y):
        out.append("expired")
    return out


def _expired(hop: dict) -> bool:
    return hop.get("remaining_s") is not None and hop["remaining_s"] <= 0


def _worse(a: str | None, b: str | None) -> str | None:
    """The worse of two outcomes (later in :data:`OUTCOMES`), None counting as none."""
    return max(a, b, key=lambda o: -1 if o is None else OUTCOMES.index(o))


def graph_layout(edges: dict[tuple[str, str], dict[str, Any]], worst: dict[str, str | None] | None = None) -> dict[str, Any]:
    """Columns by the longest call chain from ``client`` (cycles broken), rows in order of first appearance;
    each node with ``worst``, the worst outcome of the calls it answered (from ``worst``)."""
    callers: dict[str, list[str]] = {}
    names: list[str] = []
    for caller, callee in edges:
        for name in (caller, callee):
            if name not in names:
                names.append(name)
        if caller != callee:
            callers.setdefault(callee, []).append(caller)
    depth: dict[str, int] = {}

    def depth_of(name: str, visiting: frozenset = frozenset()) -> int:
        if name not in depth:
            ups = [c for c in callers.get(name, []) if c not in visiting]
            depth[name] = 0 if not ups else 1 + max(depth_of(c, visiting | {name}) for c in ups)
        return depth[name]

    columns: dict[int, list[str]] = {}
    for name in names:
        columns.setdefault(depth_of(name), []).append(name)
    worst = worst or {}
    nodes = [
        {"name": n, "column": c, "row": i, "worst": worst.get(n)}
        for c, members in sorted(columns.items())
        for i, n in enumerate(members)
    ]
    return {
        "nodes": nodes,
        "edges": [{"caller": k[0], "callee": k[1], **v} for k, v in edges.items()],
        "columns": len(columns),
        "rows": max((len(m) for m in columns.values()), default=0),
    }


# -- internal ---------------------------------------------------------------------------------


def tail_pass(files: tuple[Path, ...], joined: bool, since: float, db: int) -> tuple[Analysis, pd.DataFrame]:
    """The requests of ``files`` that started at or after ``since``, analysed, and their rows of the
    request list: a live pass's work, run in the tail process (see :mod:`hoptrace.ui._worker`).

    The pass holds text as Python strings, which sets a pandas option for the whole process: the
    tail process runs nothing else meanwhile. On a tail's thousand-odd rows Arrow's cost per call
    (a take per text column on every row filter, an array built from every list) was ~30 % of the
    pass's CPU: 510 → 357 ms a pass, alternating in one process, the frames equal. What it returns
    holds text in Arrow again, as the analyses it joins do."""
    with pd.option_context("mode.string_storage", "python"):
        tail, requests = _tail_analysis(files, joined, since, db)
    frames = {f.name: getattr(tail, f.name) for f in dataclasses.fields(tail)}
    arrow = {name: _arrow_text(frame) for name, frame in frames.items() if isinstance(frame, pd.DataFrame)}
    return dataclasses.replace(tail, **arrow), _arrow_text(requests)


def _tail_analysis(files: tuple[Path, ...], joined: bool, since: float, db: int) -> tuple[Analysis, pd.DataFrame]:
    with tempfile.TemporaryDirectory(prefix="hoptrace-ui-") as folder:
        # Joined files: each file's tail, joined as the files are (a copy keeps the hop ids, so the joined ids agree).
        tails = [Path(folder) / f"tail{k}.db" for k in range(len(files))]
        for path, tail_db in zip(files, tails, strict=True):
            copy_tail(path, tail_db, since)
        # Its latency tables would cover the tail only: model_of() computes them over the whole capture.
        tail = analyze(tails if joined else tails[0], since=since, latency=False)
    if joined:
        tail.hops["file"] = tail.hops["file"].cat.rename_categories([str(f) for f in files])
    return tail, _requests(model(tail), db)


def _arrow_text(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its text in Arrow, each column in one chunk: text columns, categories, index and
    column labels; ``frame`` itself when it is so already.

    A live pass holds text as Python strings (see :func:`tail_pass`): what it hands over must be in
    Arrow, as the analyses it joins are. And a concat keeps its parts' chunks, so a live view's list
    and analysis gain chunks every pass, without end, and taking rows from a column of several
    chunks costs as much as joining them: 150 rows of the 174k-request list took 4-5 ms from 4 to
    18 chunks, 0.8 ms from one (joining the list's: 5 ms a pass)."""
    changed = {}
    for name, dtype in frame.dtypes.items():
        if isinstance(dtype, pd.StringDtype):
            if dtype.storage != "pyarrow":
                changed[name] = frame[name].astype(_in_arrow(dtype))
            elif (chunks := frame[name].array.__arrow_array__()).num_chunks > 1:
                changed[name] = pd.array(chunks.combine_chunks(), dtype=dtype)
        elif isinstance(dtype, pd.CategoricalDtype) and _python_text(dtype.categories):
            changed[name] = frame[name].cat.rename_categories(dtype.categories.astype(_in_arrow(dtype.categories.dtype)))
    out = frame.assign(**changed) if changed else frame
    for axis, labels in enumerate((frame.index, frame.columns)):
        if _python_text(labels):
            out = out.set_axis(labels.astype(_in_arrow(labels.dtype)), axis=axis)
    return out


def _python_text(labels: pd.Index) -> bool:
    return isinstance(labels.dtype, pd.StringDtype) and labels.dtype.storage != "pyarrow"


def _in_arrow(dtype: pd.StringDtype) -> pd.StringDtype:
    """The same text dtype (its missing value too), held in Arrow."""
    return pd.StringDtype("pyarrow", na_value=dtype.na_value)


def copy_tail(path: Path, into: Path, since: float) -> None:
    """The hops of ``path`` that started at or after ``since``, their tokens and the captures, as a new trace DB.

    Every hop of a request that started at ``since`` or later started then too (a call
    starts after its caller), so the copy holds those requests whole. ``since`` is a time as
    the analysis holds it, rounded to the microsecond, and the file's own value may lie up to
    half a microsecond below it: the copy starts ``TIME_SLACK_S`` earlier, and the analysis of
    the copy keeps the requests from ``since`` on by its rounded times. The index on
    (capture_id, started_at) finds the rows: the cost follows the tail, not the file,
    where the analyzer's own window still reads every page (and checks the whole file).
    """
    into.write_bytes(empty_file())
    conn = sqlite3.connect(f"{into.resolve().as_uri()}", uri=True)
    try:
        conn.execute("PRAGMA trusted_schema = OFF")
        # A scratch copy, read once and deleted: no journal, and no sync to disk (each one cost ~20 ms).
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("ATTACH ? AS src", (f"{path.resolve().as_uri()}?mode=ro",))
        conn.execute("BEGIN")
        # Column by column, by name: a file of an older schema has fewer columns (NULL here).
        copy = {
            table: ", ".join(f'"{name}"' for name in shared_columns(conn, table, "src"))
            for table in ("captures", "hops", "hop_tokens", "tokens")
        }
        conn.execute(f"INSERT INTO captures ({copy['captures']}) SELECT {copy['captures']} FROM src.captures")
        conn.execute(
            f"INSERT INTO hops ({copy['hops']}) SELECT {copy['hops']} FROM src.hops"
            " WHERE capture_id IN (SELECT id FROM src.captures) AND started_at >= ?",
            (since - TIME_SLACK_S,),
        )
        conn.execute(
            f"INSERT INTO hop_tokens ({copy['hop_tokens']}) SELECT {copy['hop_tokens']} FROM src.hop_tokens"
            " WHERE hop_id >= (SELECT min(id) FROM hops) AND hop_id IN (SELECT id FROM hops)"
        )
        conn.execute(
            f"INSERT INTO tokens ({copy['tokens']}) SELECT {copy['tokens']} FROM src.tokens"
            " WHERE fingerprint IN (SELECT fingerprint FROM hop_tokens)"
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def _columns(conn: sqlite3.Connection, table: str, alias: str, names: tuple[str, ...]) -> str:
    """``alias.name`` for each of ``names`` the file's ``table`` has, ``NULL AS name`` for the others
    (the analyzer reads a missing column as empty too)."""
    have = set(table_columns(conn, table))
    return ", ".join(f"{alias}.{name}" if name in have else f"NULL AS {name}" for name in names)


def _hop_tokens_of(conn: sqlite3.Connection, hop_id: int) -> list[dict[str, Any]]:
    """The tokens hop ``hop_id`` carried, with their claims; none when a table lacks the columns that join them."""
    joined = {("hop_tokens", "hop_id"), ("hop_tokens", "fingerprint"), ("tokens", "fingerprint")}
    if any(column not in table_columns(conn, table) for table, column in joined):
        return []
    return conn.execute(
        f"SELECT {_columns(conn, 'hop_tokens', 't', SIGHTING_COLUMNS)}, {_columns(conn, 'tokens', 'k', TOKEN_COLUMNS)}"
        " FROM hop_tokens AS t JOIN tokens AS k ON k.fingerprint = t.fingerprint WHERE t.hop_id = ?",
        (hop_id,),
    ).fetchall()


def _newest_hop_id(source: Source) -> int:
    """The largest hop id of ``source``, joined files numbered as the analysis numbers them."""
    if not source.files:
        return _max_hop_id(source.path)
    return max(_max_hop_id(path) * len(source.files) + k for k, path in enumerate(source.files))


def _max_hop_id(path: Path) -> int:
    conn = open_for_reading(path, check=False)
    try:
        return conn.execute("SELECT coalesce(max(id), 0) FROM hops").fetchone()[0]
    finally:
        conn.close()


def _peer(source: Source, endpoint: str, at: float, trace: int) -> int | None:
    """The passing request of ``endpoint`` nearest in time to ``at``: among the live passes' and the whole capture's."""
    found = [p for p in (source.pending.lookup.peer(endpoint, at, trace) if source.pending else None,
                         source.lookup.peer(endpoint, at, trace)) if p is not None]  # fmt: skip
    starts = source.by_trace["started_at"]
    return min(found, key=lambda t: abs(float(starts.get(t, np.inf)) - at), default=None)


def _plain_filters(reqs: pd.DataFrame, q: RequestQuery) -> np.ndarray:
    """The filters on a request's own columns (status, time, text)."""
    keep = np.ones(len(reqs), dtype=bool)
    if q.status:
        keep &= (reqs["status_class"] == q.status).to_numpy()
    # Start times are held in whole microseconds (as the analyzer loads them): so are the bounds, or a
    # window starting at a request's recorded time (1767255321.7541513) would leave that request out.
    if q.since is not None:
        keep &= (reqs["started_at"] >= _whole_us(q.since)).to_numpy()
    if q.until is not None:
        keep &= (reqs["started_at"] <= _whole_us(q.until)).to_numpy()
    if q.text:
        keep &= reqs["haystack"].str.contains(q.text.lower(), regex=False).to_numpy()
    return keep


def _wanted_traces(base: Analysis | None, pending: Tail | None, q: RequestQuery) -> dict[str, np.ndarray]:
    """For each of ``q``'s filters on hops and findings, the requests it keeps, in the whole analysis
    and the live passes' pending tail as they stand, as :meth:`Data.facets` reads them: a filtered
    page open live asks again on every change, and merging the two costs a copy of every hop."""
    by_hop = [(name, column, getattr(q, name)) for name, column in (("service", "service"), ("endpoint", "endpoint"),
              ("subject", "token_sub")) if getattr(q, name)]  # fmt: skip
    wanted = {
        name: _live_traces(base, pending, lambda hops, c=column, v=value: (hops[c] == v).to_numpy())
        for name, column, value in by_hop
    }
    if q.kind or q.severity:
        matching = [np.zeros(0, np.int64)]
        for f in _live_findings(base, pending):
            mask = np.ones(len(f), dtype=bool)
            if q.kind:
                mask &= (f["kind"] == q.kind).to_numpy()
            if q.severity:
                mask &= (f["severity"] == q.severity).to_numpy()
            matching.append(f["trace"][mask].dropna().to_numpy(dtype=np.int64))
        wanted["findings"] = np.concatenate(matching)
    return wanted


def _kept(reqs: pd.DataFrame, q: RequestQuery, wanted: dict[str, np.ndarray]) -> np.ndarray:
    """Which rows of a request list ``q`` keeps, ``wanted`` being what :func:`_wanted_traces` found."""
    keep = _plain_filters(reqs, q)
    for name, traces in wanted.items():
        if name == "subject":  # and the requests that issued the subject's token (login)
            traces = np.union1d(traces, reqs["trace"][(reqs["subject"] == q.subject).to_numpy()])
        keep &= reqs["trace"].isin(traces).to_numpy()
    return keep


def _sorted(requests: pd.DataFrame, sort: str, descending: bool) -> pd.DataFrame:
    """``requests`` in a page's order: by ``sort``, then the newest first; equal rows as they were."""
    return requests.sort_values([SORTABLE[sort], "started_at"], ascending=[not descending, False], kind="stable")


def _worst_first(requests: pd.DataFrame, descending: bool) -> np.ndarray | None:
    """``_sorted(requests, "worst", descending)``'s order, in linear time where ``worst`` holds one ranking's
    places (:func:`_ranked`): the ranked rows by place, then the others, newest first. None otherwise."""
    worst = requests["worst"].to_numpy(dtype=float)
    ranked = _in_order_of(worst, np.flatnonzero(~np.isnan(worst)))
    if ranked is None:
        return None
    others = np.flatnonzero(np.isnan(worst))
    others = others[np.argsort(-requests["started_at"].to_numpy(dtype=float)[others], kind="stable")]
    return np.concatenate([ranked[::-1] if descending else ranked, others])


def _whole_us(t: float) -> float:
    """``t`` rounded to the microsecond, as the loader and :mod:`hoptrace.ui._preview` read times."""
    return math.floor(t * 1e6 + 0.5) / 1e6


def _quick_requests(path: Path, db: int, after_id: int | None = None) -> pd.DataFrame:
    """:func:`entry_requests` as the request list's rows: listed, not analysed (no findings, no place
    in the worst-first order: listed after the requests that have one)."""
    # One frame built from its columns: a live view lists new rows five times a second, and each
    # assign or drop of a few rows' frame costs pandas ~2 ms.
    t = pd.DataFrame(entry_requests(path, after_id), columns=list(COLUMNS))
    listed = {name: t[name] for name in COLUMNS if name not in ("failed", "error_kind")}
    listed |= {"status_class": outcomes(t).to_numpy(), "ended": hop_endings(t).to_numpy()}
    listed |= {"db": db, "hops": None, "subject": None, "rank": NO_FINDING_RANK, "kinds": "", "severity": None,
               "worst": np.nan, "tier": np.nan, "count": 0}  # fmt: skip
    listed["haystack"] = (t["trace"].astype(str) + " " + t["endpoint"].fillna("")).str.lower()
    return pd.DataFrame(listed, index=t.index)


def _requests(m: Model, db: int) -> pd.DataFrame:
    """One row per request (root hop) with what the list shows, filters and sorts on, in the model's words."""
    a = m.analysis
    hops = a.hops
    roots = m.roots
    found = a.findings.dropna(subset=["trace"])
    ranks = found["severity"].map(SEVERITY_RANK).groupby(found["trace"].astype("int64")).min()
    kinds = _kind_lists(found, roots.index)
    # The token a request carried names its subject; a login carries none, its session does.
    by_session = a.sessions.drop_duplicates("trace").set_index("trace")["subject"].reindex(roots.index)
    subject = roots["token_sub"].astype(object).map(plain).fillna(by_session.astype(object).map(plain))
    table = pd.DataFrame(
        {
            "db": db,
            "trace": roots.index.to_numpy(),
            "started_at": roots["started_at"].to_numpy(),
            "endpoint": roots["endpoint"].astype(str).to_numpy(),
            "service": roots["service"].astype(str).to_numpy(),
            "status": roots["status"].to_numpy(),
            "status_class": outcomes(roots).to_numpy(),
            "ended": hop_endings(roots).to_numpy(),
            "duration_ms": roots["duration_ms"].to_numpy(),
            "hops": hops["trace"].value_counts().reindex(roots.index).to_numpy(),
            "subject": subject.to_numpy(),
            "rank": ranks.reindex(roots.index).fillna(NO_FINDING_RANK).astype(int).to_numpy(),
            "kinds": kinds,
            "tier": m.tiers.reindex(roots.index).to_numpy(),
            "count": found["trace"].astype("int64").value_counts().reindex(roots.index, fill_value=0).to_numpy(),
        }
    )
    table["severity"] = table["rank"].map(dict(enumerate(SEVERITIES)))
    table["haystack"] = (
        table["trace"].astype(str) + " " + table["endpoint"] + " " + table["subject"].fillna("") + " " + table["kinds"]
    ).str.lower()
    return table


def _kind_lists(found: pd.DataFrame, traces: pd.Index) -> np.ndarray:
    """Each request's finding kinds, sorted and space-separated ("" for none). A request's kinds
    are a set of bits, and each distinct set (a few dozen) becomes its string once: a string built
    per request costs ~1 s at a million hops, and a pass per kind over the requests ~50 ms on a
    live pass's few hundred."""
    names = np.array(sorted(found["kind"].unique()), dtype=object)  # at most the 18 detectors' kinds: an int64 holds a bit each
    pairs = pd.DataFrame({"trace": found["trace"].astype("int64").to_numpy(),
                          "bit": np.left_shift(1, np.searchsorted(names, found["kind"].to_numpy(object)))})  # fmt: skip
    bits = pairs.drop_duplicates().groupby("trace")["bit"].sum().reindex(traces, fill_value=0).to_numpy()
    sets, at = np.unique(bits, return_inverse=True)
    texts = np.array([" ".join(names[[(s >> k) & 1 == 1 for k in range(len(names))]]) for s in sets], dtype=object)
    return texts[at.reshape(-1)]


def _relisted(listed: pd.DataFrame, fresh: pd.DataFrame, since: float, recent: pd.DataFrame | None = None) -> pd.DataFrame:
    """The request list after a tail pass from ``since``: the rows of ``listed`` analysed earlier of
    requests that started before ``since``, then ``fresh`` (the pass's own), then the rows listed
    while the pass ran, past what it analysed (of ``listed``, then of ``recent``: rows listed after
    it, none analysed). The rows a pass replaces are the last ones (each pass appends its own), so
    the rows before the first of them stay a slice: one copy of the list per pass, where filtering
    it and joining the parts copied it four times (~0.2 s at 174k requests)."""
    traces = listed["trace"].to_numpy()
    unanalysed = listed["hops"].isna().to_numpy()
    renewed = np.isin(traces, fresh["trace"].to_numpy())
    replaced = (listed["started_at"].to_numpy() >= since) | unanalysed | renewed
    first = int(np.argmax(replaced)) if replaced.any() else len(listed)
    kept = listed.iloc[first:][~replaced[first:]]
    newest = max(traces[~replaced].max(initial=-1), fresh["trace"].max() if len(fresh) else -1)
    waiting = [listed.iloc[first:][(unanalysed & ~renewed & (traces > newest))[first:]]]
    if recent is not None and len(recent):  # joined here, not before: each join of the list is a copy of it
        later = recent["trace"].to_numpy()
        waiting.append(recent[~np.isin(later, fresh["trace"].to_numpy()) & (later > newest)])
    return _arrow_text(pd.concat([listed.iloc[:first], kept, fresh, *waiting], ignore_index=True))


def _ranked(requests: pd.DataFrame) -> pd.DataFrame:
    """``requests`` with ``worst``: the place in the presentation model's worst-first order (0 = worst)
    by its keys, each row's own (``tier``, findings ``count``, ``duration_ms``, ``trace``: see
    :func:`~hoptrace.analyzer._model.worst_first_keys`), so that rows analysed in different passes
    rank together without a pass over every hop. Rows listed and not analysed yet have no place (NaN).

    Rows that have a ``worst`` already (from one earlier ranking: a live pass keeps most of the
    list) keep their order, and only the others are sorted and merged in: sorting 174k rows'
    keys cost ~17 ms a pass."""
    keys = _worst_keys(requests)
    analysed = ~np.isnan(keys[0])
    earlier = requests["worst"].to_numpy(dtype=float) if "worst" in requests else np.full(len(requests), np.nan)
    ranked = _in_order_of(earlier, np.flatnonzero(analysed & ~np.isnan(earlier)))
    new = np.flatnonzero(analysed & np.isnan(earlier))
    if ranked is None:  # no earlier ranking to keep (or not one ranking's places)
        ranked, new = np.zeros(0, np.int64), np.flatnonzero(analysed)
    new = new[np.lexsort([k[new] for k in keys][::-1])]
    # Where each new row goes among the ranked rows (new rows in order: never decreasing).
    at = _count_before(keys, ranked, [k[new] for k in keys])
    place = np.full(len(requests), np.nan)
    place[ranked] = np.arange(len(ranked)) + np.bincount(at, minlength=len(ranked) + 1).cumsum()[: len(ranked)]
    place[new] = at + np.arange(len(new))
    return requests.assign(worst=place)


def _worst_keys(requests: pd.DataFrame) -> list[np.ndarray]:
    """Each row's keys in the presentation model's worst-first order (``tier``: NaN for a row not analysed)."""
    ms = pd.to_numeric(requests["duration_ms"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    tier, count, trace = (requests[c].to_numpy() for c in ("tier", "count", "trace"))
    return worst_first_keys(tier, count, ms, trace)


def _in_order_of(places: np.ndarray, rows: np.ndarray) -> np.ndarray | None:
    """``rows`` in the order of their ``places`` (distinct whole numbers, as one ranking gives), in
    linear time; None when the places are not such, or reach past twice the rows of ``places`` (a
    ranking of a list a pass kept most of never does)."""
    if not len(rows):
        return rows
    spots = places[rows]
    if spots.min() < 0 or spots.max() >= 2 * len(places) or (spots != np.floor(spots)).any():
        return None
    slots = np.full(int(spots.max()) + 1, -1, np.int64)
    slots[spots.astype(np.int64)] = rows
    ordered = slots[slots >= 0]
    return ordered if len(ordered) == len(rows) else None


def _count_before(keys: list[np.ndarray], ranked: np.ndarray, probes: list[np.ndarray]) -> np.ndarray:
    """For each probe (one key array per key), how many of the rows ``ranked`` (positions into ``keys``,
    in order) come before it: a binary search of all probes at once, one array step per halving."""
    low, high = np.zeros(len(probes[0]), np.int64), np.full(len(probes[0]), len(ranked), np.int64)
    while (searching := low < high).any():
        mid = (low + high) // 2
        rows = ranked[np.minimum(mid, len(ranked) - 1)]  # a probe whose search ended may point past the end
        less = searching & _lexically_less([k[rows] for k in keys], probes)
        low = np.where(less, mid + 1, low)
        high = np.where(searching & ~less, mid, high)
    return low


def _lexically_less(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    """Row by row, whether the keys ``a`` come before the keys ``b``, the first key first."""
    less = a[-1] < b[-1]
    for x, y in zip(a[-2::-1], b[-2::-1], strict=True):
        less = (x < y) | ((x == y) & less)
    return less


def _newest_start(*analyses: Analysis) -> float:
    """The latest start of a hop in ``analyses`` (an empty one has none)."""
    return float(np.nanmax([a.hops["started_at"].max() if len(a.hops) else np.nan for a in analyses]))


def _running_hops(base: Analysis, since: float) -> pd.Index:
    """Hops of ``base`` that started at ``since`` or later in a request that started before: still
    running when a tail pass began there, they stay with their request (see :func:`_merged_hops`)."""
    return _split_at(base.hops, since)[1].index


def _split_at(hops: pd.DataFrame, since: float) -> tuple[int, pd.DataFrame]:
    """(how many of ``hops`` started before ``since``, the hops after those that belong to a request that
    started before ``since``). ``Analysis.hops`` is in start order and a call starts after its caller, so
    only the rows after the first one started at ``since`` are looked at (at a million hops a boolean
    pass over every column costs about a second); hops in another order are all looked at."""
    first = int(np.searchsorted(hops["started_at"].to_numpy(), since)) if hops["started_at"].is_monotonic_increasing else 0
    rest = hops.iloc[first:]
    return first, rest[hops["started_at"].reindex(rest["trace"].to_numpy()).to_numpy() < since]


def _kept_of_base(base: Analysis, since: float) -> tuple[int, pd.Index, int]:
    """What ``_merge(base, tail, since)`` keeps of ``base`` whatever the tail: the number of hops before
    ``since``, the hops still running then (see :func:`_running_hops`), the number of findings. The same
    for every pass until the pending tail is merged (reading the findings' roots: ~10 ms at 1M hops)."""
    first, running = _split_at(base.hops, since)
    return first, running.index, int(_kept_findings(base, since).sum())


def _merged_counts(kept: tuple[int, pd.Index, int], tail: Analysis) -> tuple[int, int]:
    """(hops, findings) that merging ``tail`` would hold, with ``kept`` (see :func:`_kept_of_base`), without copying a hop."""
    first, running, findings = kept
    added = tail.hops.index[~tail.hops.index.isin(running)]
    return first + len(running) + len(added), findings + len(tail.findings)


def _kept_findings(base: Analysis, since: float) -> np.ndarray:
    """Which findings of ``base`` a merge of a tail from ``since`` keeps."""
    return _keep_before(base.hops, base.findings) < since


def _keep_before(hops: pd.DataFrame, findings: pd.DataFrame) -> np.ndarray:
    """For each finding, the start a tail must come after for a merge to keep it: its request's start,
    or its own time for a finding of no request (NaN, never kept, for a request not in ``hops``)."""
    trace = findings["trace"]
    root_start = hops["started_at"].reindex(trace.fillna(-1).astype("int64").to_numpy()).to_numpy()
    return np.where(trace.isna().to_numpy(), findings["at"].to_numpy(dtype=float), root_start)


def _live_traces(base: Analysis | None, pending: Tail | None, matches: Callable[[pd.DataFrame], np.ndarray]) -> np.ndarray:
    """The requests with a hop that ``matches``, in ``base`` with ``pending`` as merged: ``base``'s
    that started before the tail, as the merge keeps them, and the tail's (none before any analysis)."""
    if base is None:
        return np.zeros(0, np.int64)
    found = base.hops["trace"].to_numpy()[matches(base.hops)]
    if pending is None:
        return found
    found = found[base.hops["started_at"].reindex(found).to_numpy() < pending.since]
    tail = pending.analysis.hops
    return np.union1d(found, tail["trace"].to_numpy()[matches(tail)])


def _live_findings(base: Analysis | None, pending: Tail | None) -> list[pd.DataFrame]:
    """The findings of ``base`` with ``pending`` as merged: those ``base`` keeps, then the tail's
    (none before any analysis)."""
    if base is None:
        return []
    if pending is None:
        return [base.findings]
    return [base.findings[_kept_findings(base, pending.since)], pending.analysis.findings]


@dataclass(frozen=True)
class Facets:
    """What the request list's filters can take in one analysis, worked out once for it: each value
    as sorted text, and its findings in ``group_findings``' order, each with its (severity, kind)
    group. A live pass puts the whole analysis's and its pending tail's together at little cost
    (:meth:`merged`): sorting the capture's subjects and grouping its findings again took ~110 ms a
    pass at 1M hops."""

    values: dict[str, list[str]]
    groups: list[tuple[str, str]]
    """The (severity, kind) of each group code."""
    group: np.ndarray
    rank: np.ndarray
    at: np.ndarray
    keep_before: np.ndarray
    """Of each finding, in that order: its group's code, its severity's rank, its time, and the start a
    tail must come after for a merge to keep it (see :func:`_keep_before`)."""

    @classmethod
    def of(cls, hops: pd.DataFrame, findings: pd.DataFrame) -> Facets:
        values = {name: sorted({str(v) for v in found}) for name, found in _facet_values(hops).items()}
        f = sorted_findings(findings[["severity", "kind", "at", "trace"]].dropna(subset=["severity", "kind"]))
        group, keys = group_keys(f, ["severity", "kind"])
        rank, at = finding_sort_keys(f)
        groups = [(str(severity), str(kind)) for severity, kind in keys]
        return cls(values, groups, group, rank, at, _keep_before(hops, f))

    def merged(
        self, tail: Facets | None = None, since: float = math.inf
    ) -> tuple[dict[str, list[str]], list[tuple[str, str, int]]]:
        """The values, and the (severity, kind, count) of each finding group in ``group_findings``'
        order, of this analysis with ``tail`` (a live pass's, from ``since``) merged as ``_merge``
        merges them. A group's place is its first finding's in a stable sort by severity and time;
        a stable sort of each part's first findings, in the parts' order, puts them in that order."""
        if tail is None:
            return self.values, self._groups_in_order([(self, np.arange(len(self.group)))])
        values = {name: _sorted_union(texts, set(tail.values[name])) for name, texts in self.values.items()}
        parts = [(self, np.flatnonzero(self.keep_before < since)), (tail, np.arange(len(tail.group)))]
        return values, self._groups_in_order(parts)

    @staticmethod
    def _groups_in_order(parts: list[tuple[Facets, np.ndarray]]) -> list[tuple[str, str, int]]:
        names, firsts, part_of, counts = [], [], [], Counter()
        for k, (facets, kept) in enumerate(parts):
            codes, first = np.unique(facets.group[kept], return_index=True)
            for code, n in zip(codes, np.bincount(facets.group[kept])[codes]):
                counts[facets.groups[code]] += int(n)
            names += [facets.groups[code] for code in codes]
            firsts.append(kept[first])
            part_of.append(np.full(len(codes), k))
        rank = np.concatenate([f.rank[at] for (f, _), at in zip(parts, firsts)])
        at = np.concatenate([f.at[at] for (f, _), at in zip(parts, firsts)])
        order = np.lexsort((np.concatenate(firsts), np.concatenate(part_of), at, rank))
        return [(severity, kind, counts[severity, kind]) for severity, kind in dict.fromkeys(names[i] for i in order)]


def _sorted_union(sorted_texts: list[str], more: set[str]) -> list[str]:
    """``sorted_texts`` with ``more`` in: the same list when nothing is new, else a merge of two runs."""
    new = more.difference(sorted_texts)
    return sorted_texts if not new else sorted([*sorted_texts, *sorted(new)])


def _facet_values(hops: pd.DataFrame) -> dict[str, set]:
    return {
        "service": set(hops["service"].dropna().unique()),
        "endpoint": set(hops["endpoint"].dropna().unique()),
        "subject": {v for v in hops["token_sub"].unique() if plain(v) is not None},
    }


def _merge(old: Analysis, tail: Analysis, since: float) -> Analysis:
    """``old`` with every request that started at or after ``since`` replaced by ``tail``'s."""
    hops, kept_ids, tail_hops = _merged_hops(old.hops, tail.hops, since)
    kept = set(hops["trace"].unique()) - set(tail_hops["trace"].unique())
    found = old.findings
    keep_found = found["trace"].isin(kept) | (found["trace"].isna() & (found["at"] < since))
    sessions = old.sessions[old.sessions["trace"].isin(kept)]
    tail_sessions = tail.sessions.copy()
    tail_sessions["session"] = tail_sessions["session"] + (int(old.sessions["session"].max()) + 1 if len(old.sessions) else 0)
    return Analysis(
        captures=tail.captures,
        hops=_arrow_text(hops),
        tokens=_arrow_text(pd.concat([old.tokens, tail.tokens]).pipe(lambda t: t[~t.index.duplicated(keep="last")])),
        hop_tokens=_arrow_text(
            pd.concat(
                [
                    old.hop_tokens[old.hop_tokens["hop_id"].isin(kept_ids)],
                    tail.hop_tokens[tail.hop_tokens["hop_id"].isin(tail_hops.index)],
                ]
            )
        ),
        findings=_arrow_text(pd.concat([found[keep_found], tail.findings], ignore_index=True)),
        services=tail.services,
        endpoints=tail.endpoints,
        edges=tail.edges,
        sessions=_arrow_text(pd.concat([sessions, tail_sessions], ignore_index=True)),
        config=tail.config,
        notes=tail.notes,
        source=tail.source,
    )


def _merged_hops(old: pd.DataFrame, tail: pd.DataFrame, since: float) -> tuple[pd.DataFrame, pd.Index, pd.DataFrame]:
    """(merged, the ids kept, the hops added): ``old``'s hops of the requests that started before ``since``, and ``tail``'s
    others, in start order. The hops before the first one started at ``since`` are kept as they are (see :func:`_split_at`)."""
    first, rest = _split_at(old, since)
    prefix = old.iloc[:first]
    # A hop of an older request, still running, looks like a request of its own in the tail: the old view wins.
    # (A tail hop started at `since` or later: it is never among the prefix's.)
    added = tail[~tail.index.isin(rest.index)]
    recent = pd.concat(_same_categories([rest, added])).sort_values("started_at", kind="stable")
    prefix, recent = _same_categories([prefix, recent])
    return pd.concat([prefix, recent]), prefix.index.append(rest.index), added


def _same_categories(frames: list[pd.DataFrame]) -> list[pd.DataFrame]:
    """``frames`` with each categorical column given the union of their categories, so that a concat keeps
    it categorical (unequal categories would turn a million rows to strings and back)."""
    out = [f.copy(deep=False) for f in frames]
    for column, dtype in frames[0].dtypes.items():
        if isinstance(dtype, pd.CategoricalDtype) and all(isinstance(f[column].dtype, pd.CategoricalDtype) for f in frames):
            union = frames[0][column].cat.categories
            for f in frames[1:]:
                union = union.union(f[column].cat.categories)
            for f in out:
                if not f[column].cat.categories.equals(union):  # the usual case: no new service or endpoint
                    f[column] = f[column].cat.set_categories(union)
    return out


def _findings_of(groups: list, hop_ids: set[int]) -> list[dict[str, Any]]:
    """The findings of :func:`group_findings`, group by group, as JSON-ready dicts."""
    out = []
    for f in (f for g in groups for f in g.rows.itertuples(index=False)):
        ids = [int(h) for h in f.hop_ids if int(h) in hop_ids]
        details = f.details if isinstance(f.details, dict) else {}
        out.append({"kind": f.kind, "severity": f.severity, "service": plain(f.service), "message": f.message,
                    "hop_ids": ids, "details": json.loads(json.dumps(details, default=str))})  # fmt: skip
    return out


def _token(t: dict[str, Any], at: float) -> dict[str, Any]:
    claims = stored_json(t["claims"])
    exp = t["exp"]
    return {
        "fingerprint": t["fingerprint"],
        "role": t["role"],
        "location": t["location"],
        "kind": t["kind"],
        "header": {k: t[k] for k in ("alg", "kid", "typ") if t[k] is not None},
        "claims": claims,
        "exp": exp,
        "remaining_s": None if exp is None else exp - at,
        "error": t["error"],
    }


def _headers(text: str | None) -> list[list[str]]:
    return [[name, str(value)] for name, value in header_pairs(text)]


def _summary(request: dict[str, Any]) -> dict[str, Any]:
    return {k: request[k] for k in SUMMARY}


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """``frame``'s rows as dicts of :func:`plain` values, read a column at a time (``to_dict("records")``
    boxes every value row by row: 5.6 ms for a page of 150 requests, which a live view asks for often)."""
    names = list(frame.columns)
    columns = [_plain_list(frame.iloc[:, i]) for i in range(len(names))]
    return [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]


def _plain_list(column: pd.Series) -> list:
    values = column.tolist()  # Python scalars: NumPy integers and booleans need nothing more (pandas' Int64 may hold NA)
    return values if isinstance(column.dtype, np.dtype) and column.dtype.kind in "iub" else [plain(v) for v in values]


# What each column the hop pane reads holds in hoptrace's schema (hops, its tokens, their sightings).
_KINDS = {name: kind for table in ("hop_tokens", "tokens", "hops") for name, (kind, _) in COLUMNS_OF[table].items()}


def _dict_row(cursor, row) -> dict[str, Any]:
    """A row as a dict, each value of its column's type or None: a hostile file's text where a
    time belongs reads as unknown, a blob where text belongs as text (JSON cannot carry bytes)."""
    return {d[0]: stored_value(v, _KINDS.get(d[0], str)) for d, v in zip(cursor.description, row, strict=True)}
