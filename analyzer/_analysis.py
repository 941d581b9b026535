"""The pipeline: load -> rebuild traces -> sessions -> detectors -> latency, as one call."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from hoptrace._errors import AnalysisError
from hoptrace._memory import analysis_memory
from hoptrace._shards import parse_worker_source
from hoptrace.analyzer import _latency, _prepare
from hoptrace.analyzer._arrays import taken, taken_text
from hoptrace.analyzer._config import AnalyzerConfig, parse_time
from hoptrace.analyzer._detectors import DETECTORS, Context, Detector, run_detectors
from hoptrace.analyzer._headers import HeaderReader
from hoptrace.analyzer._load import Tables
from hoptrace.analyzer._merge import JoinedHeaders, load_files
from hoptrace.analyzer._model import resolve_trace
from hoptrace.analyzer._sessions import sessions as build_sessions
from hoptrace.analyzer._traces import in_start_order, rebuild

if TYPE_CHECKING:
    from hoptrace.analyzer._saved import SavedAnalysis


@dataclass
class Analysis:
    """Everything ``hoptrace analyze`` knows about a trace DB, as DataFrames.

    - ``captures``: the captures table, indexed by id (``entry``: the route requests enter by).
    - ``hops``: indexed by hop ``id``, in start order. The hops columns the analysis reads
      (``capture_id service method path status error error_kind failed started_at
      response_start_at ended_at duration_ms server_date_ts trace_id span_id parent_span_id
      trace_source client_conn_id``; more with ``AnalyzerConfig(extra_hop_columns=...)``), plus:
      ``trace`` (int: id of the request's root hop), ``parent_id`` (Int64, <NA> for roots),
      ``link`` (root, header, token, connection, nesting, ambiguous, orphan), ``link_candidates``
      (unrelated hops the parent was chosen among; 1 when sure), ``link_confidence``
      (0-1, how sure the link is), ``depth`` (root 0),
      ``order`` (depth-first rank in its request, root 0), ``endpoint`` (``METHOD
      /path/{id}``), ``is_validation``, ``token_fp`` / ``token_sub`` / ``token_exp`` (the
      token the hop presented or validated), ``remaining_s`` (``token_exp - started_at``),
      ``self_ms`` (time not spent waiting on its own calls), ``on_critical_path``.
      Times are UNIX seconds on the proxy's clock. Text columns with few distinct values
      (service, method, path, endpoint, link) are Categoricals.
    - ``tokens``: indexed by ``fingerprint``; ``hop_tokens``: hop_id, fingerprint, role, location.
    - ``findings``: ``kind severity trace service caller callee endpoint hop_ids message details at``, errors
      first, then by time (see ``DETECTORS``).
    - ``services`` / ``endpoints``: per service (and endpoint): ``count errors error_rate
      client_errors p50_ms p95_ms p99_ms max_ms self_p50_ms self_p95_ms``.
    - ``edges``: ``caller callee calls errors p50_ms p95_ms`` (caller ``client`` for requests).
    - ``sessions``: one row per request: ``trace session subject started_at ended_at status
      endpoint token_fp token_exp expired`` (``expired``: some hop of it presented a token
      at or after its exp), by session then time.
    """

    captures: pd.DataFrame
    hops: pd.DataFrame
    tokens: pd.DataFrame
    hop_tokens: pd.DataFrame
    findings: pd.DataFrame
    services: pd.DataFrame
    endpoints: pd.DataFrame
    edges: pd.DataFrame
    sessions: pd.DataFrame
    config: AnalyzerConfig
    notes: list[str] = field(default_factory=list)
    """What the reader should know about the data: ignored rows, orphans, guessed links."""
    source: str | None = None
    files: tuple[str, ...] = ()
    """The trace files analysed, in the order given. With several, hop ``i`` of file ``k`` is
    hop ``i * len(files) + k`` here (``hops``: ``file``, ``file_hop``); see :mod:`hoptrace.analyzer._merge`."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds each stage took: ``load`` (by :func:`analyze`), ``rebuild`` (traces, token
    uses, sessions), ``detectors``, ``tables`` (latency per service, endpoint and edge,
    computed alongside the detectors)."""

    def trace_hops(self, trace: int) -> pd.DataFrame:
        """The hops of one request, depth first."""
        return self.hops[self.hops["trace"].to_numpy() == trace].sort_values("order")


@analysis_memory()
def analyze(
    path: str | Path | Sequence[str | Path],
    config: AnalyzerConfig | None = None,
    trace: object = None,
    since: object = None,
    until: object = None,
    *,
    reuse_saved: bool = False,
    latency: bool = True,
) -> Analysis:
    """Analyze a trace DB, or several as one (the shards of ``hoptrace proxy --workers``, or
    captures of one stack on several hosts with one fingerprint key).

    ``trace`` keeps one request: its id (the root hop id), a propagated trace id, or the
    id of any hop in it. ``since``/``until`` (UNIX seconds, ISO-8601 or datetime) keep the
    requests that started in that window. ``reuse_saved``: take the links and findings
    from the analysis saved in the file when it is current (see
    :func:`hoptrace.analyzer._saved.load_saved`; without ``config``, with the options it
    was saved with). ``latency=False`` leaves the latency tables empty (a live pass whose
    caller recomputes them over the whole capture). Raises ``TraceFileError`` for a file that is
    not a usable trace DB, ``AnalysisError`` for an unknown trace or a bad time.
    """
    asked, config = config, config or AnalyzerConfig()
    lo, hi = parse_time(since, "since"), parse_time(until, "until")
    if lo is not None and hi is not None and lo > hi:
        raise AnalysisError(f"since ({since}) is after until ({until})")
    paths = [Path(path)] if isinstance(path, str | Path) else [Path(p) for p in path]
    if not paths:
        raise AnalysisError("no trace file to analyze")
    started = time.perf_counter()
    # One file's structure check goes on beside the analysis (SQLite checks without the GIL, which
    # the rebuild holds); its verdict, at the block's end, comes before the analysis is returned.
    with ExitStack() as checks:
        try:
            tables = load_files(paths, since=lo, until=hi, extra_columns=config.extra_hop_columns, checks=checks)
        except ValueError as exc:  # an unknown column name in the config
            raise AnalysisError(str(exc)) from None
        loaded = time.perf_counter() - started
        saved = None
        if reuse_saved and len(paths) == 1 and lo is None and hi is None:  # a joined analysis is saved in no file
            from hoptrace.analyzer._saved import load_saved  # it imports this module

            saved = load_saved(paths[0], tables, asked)
        config = config if saved is None else saved.config
        headers = HeaderReader(paths[0]) if len(paths) == 1 else JoinedHeaders(paths)
        analysis = analyze_tables(
            tables, config, trace=trace, since=lo, until=hi, headers=headers, saved=saved, latency=latency
        )
    analysis.source = ", ".join(map(str, paths))
    analysis.files = tuple(map(str, paths))
    analysis.timings = {"load": loaded, **analysis.timings}
    return analysis


def prepare(
    tables: Tables,
    config: AnalyzerConfig | None = None,
    *,
    since: float | None = None,
    until: float | None = None,
    headers: HeaderReader | None = None,
    saved: SavedAnalysis | None = None,
) -> Context:
    """Everything the detectors read: rebuilt traces with per-hop facts, token uses, sessions,
    and where to read header lines from (without it, the detectors that need them find nothing).
    With ``saved``, each hop's parent and link are the saved ones instead of rebuilt."""
    hops = in_start_order(tables.hops)
    # The loader makes these Categoricals; hand-made tables may not have.
    hops = hops.astype(
        {c: "category" for c in ("service", "method", "path") if not isinstance(hops[c].dtype, pd.CategoricalDtype)}
    )
    paths = _prepare.paths_of(hops["path"])
    if saved is None:
        hops = rebuild(hops, tables.hop_tokens, tables.tokens, tables.captures, paths)
    else:
        hops = saved.relink(hops)
    hops["endpoint"] = _prepare.endpoints(hops, paths)
    if since is not None or until is not None:
        root_start = hops["started_at"].reindex(hops["trace"].to_numpy()).to_numpy()
        keep = (root_start >= (-np.inf if since is None else since)) & (root_start <= (np.inf if until is None else until))
        hops = hops[keep]
    hop_tokens = tables.hop_tokens[tables.hop_tokens["hop_id"].isin(hops.index)].reset_index(drop=True)
    uses = _prepare.token_uses(hop_tokens, tables.tokens)
    config = config or AnalyzerConfig()
    hops = _enrich(hops, uses, config)
    sessions = build_sessions(hops, hop_tokens, tables.tokens, uses)
    return Context(
        hops=hops, hop_tokens=hop_tokens, tokens=tables.tokens, uses=uses, sessions=sessions, config=config, headers=headers
    )


@analysis_memory()
def analyze_tables(
    tables: Tables,
    config: AnalyzerConfig | None = None,
    *,
    trace: object = None,
    since: float | None = None,
    until: float | None = None,
    detectors: tuple[Detector, ...] = DETECTORS,
    headers: HeaderReader | None = None,
    saved: SavedAnalysis | None = None,
    latency: bool = True,
) -> Analysis:
    """The analysis of tables already loaded (see :func:`analyze`); with ``saved``, its links and
    findings in place of the rebuild and the detectors; ``latency=False``: empty latency tables."""
    clock = time.perf_counter
    started = clock()
    ctx = prepare(tables, config, since=since, until=until, headers=headers, saved=saved)
    rebuilt = clock()
    hops, hop_tokens, sessions = ctx.hops, ctx.hop_tokens, ctx.sessions
    chosen = None if trace is None else resolve_trace(hops, trace)
    shown = hops if chosen is None else hops[hops["trace"].to_numpy() == chosen]
    # The latency tables alongside the detectors: their sorts and counts run without the
    # GIL, so they take the second core while the detectors build findings (-0.9 s at 1M
    # hops). The thread gets a DataFrame object of its own over the same columns.
    with ThreadPoolExecutor(max_workers=1) as pool:
        tables_of = pool.submit(_latency_tables, shown.copy(deep=False) if latency else shown.iloc[:0])
        findings = run_detectors(ctx, detectors) if saved is None else saved.findings
        detected = clock()
        (services, endpoints, edges), tables_s = tables_of.result()
    notes = [*tables.notes, *stream_notes(tables.captures), *_link_notes(hops), *(saved.notes if saved is not None else ())]
    if chosen is not None:
        hops = shown
        hop_tokens = hop_tokens[hop_tokens["hop_id"].isin(hops.index)].reset_index(drop=True)
        mine = set(hops.index)
        touches = findings["hop_ids"].map(lambda ids: not mine.isdisjoint(ids)).astype(bool)
        findings = findings[(findings["trace"] == chosen).fillna(False) | touches].reset_index(drop=True)
        sessions = sessions[sessions["trace"] == chosen].reset_index(drop=True)
    timings = {"rebuild": rebuilt - started, "detectors": detected - rebuilt, "tables": tables_s}
    return Analysis(
        captures=tables.captures, hops=hops, tokens=tables.tokens, hop_tokens=hop_tokens, findings=findings,
        services=services, endpoints=endpoints, edges=edges, sessions=sessions, config=ctx.config, notes=notes,
        timings=timings,
    )  # fmt: skip


def latency_tables(hops: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``Analysis.services``, ``endpoints`` and ``edges`` of ``hops`` (rebuilt, as in ``Analysis.hops``):
    for hops put together from several analyses, such as a live tail merged into what was there."""
    services = _latency.latency_table(hops, ["service"])
    endpoints = _latency.latency_table(hops, ["service", "endpoint"])
    return services, endpoints, _latency.edges_table(hops, _latency.parent_positions(hops))


def _latency_tables(hops: pd.DataFrame) -> tuple[tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame], float]:
    """:func:`latency_tables` and the seconds they took."""
    started = time.perf_counter()
    tables = latency_tables(hops)
    return tables, time.perf_counter() - started


def _enrich(hops: pd.DataFrame, uses: pd.DataFrame, config: AnalyzerConfig) -> pd.DataFrame:
    hops = hops.copy(deep=False)  # copy-on-write: new columns, shared old ones
    hops["is_validation"] = _prepare.validation_mask(hops["endpoint"].array, config.validation_regex)
    primary = _prepare.primary_tokens(uses)
    at = primary.index.get_indexer(hops.index)  # -1: a hop with no token
    hops["token_fp"] = taken_text(primary["fp"], at)
    hops["token_sub"] = taken_text(primary["sub"], at)
    hops["token_exp"] = taken(primary["exp"].to_numpy(np.float64, na_value=np.nan), at, np.nan)
    hops["remaining_s"] = hops["token_exp"] - hops["started_at"]
    parent = _latency.parent_positions(hops)
    hops["self_ms"] = _latency.self_ms(hops, parent)
    hops["on_critical_path"] = _latency.critical_path(hops, parent, hops["depth"].to_numpy())
    return hops


def _link_notes(hops: pd.DataFrame) -> list[str]:
    counts = hops["link"].value_counts()
    notes = []
    if counts.get("ambiguous", 0):
        notes.append(
            f"{counts['ambiguous']} of {len(hops)} hops were linked to their caller by a guess among"
            " overlapping requests (link 'ambiguous'); propagate a trace header to make them exact"
        )
    if counts.get("orphan", 0):
        notes.append(f"{counts['orphan']} hops had no caller in the capture (link 'orphan')")
    return notes


def stream_notes(captures: pd.DataFrame) -> list[str]:
    """A note for each capture whose ``--otlp-endpoint`` stream dropped spans, or died before it counted them.

    The counts are the capture row's (schema 4); with several files, the one row of a ``--workers``
    capture that holds them (the stream writes them once). Values a hostile file makes of them that
    are not counts read as unknown.
    """
    if "otlp_endpoint" not in captures:
        return []
    notes = []
    for capture_id, row in captures[captures["otlp_endpoint"].notna()].iterrows():
        # A --workers capture by the uuid every shard names: joined, its id is one no file shows.
        shards = parse_worker_source(row.get("source") if isinstance(row.get("source"), str) else None)
        capture = f"--workers capture {shards[1][:12]}" if shards else f"capture {capture_id}"
        # A hostile file's text could span lines or run long: one line, shortened so that the note
        # stays under the 200 characters past which renderers cut it (with counts of 19 digits).
        endpoint = " ".join(str(row["otlp_endpoint"]).split())
        endpoint = endpoint if len(endpoint) <= 64 else f"{endpoint[:63]}…"
        sent, dropped = _spans(row.get("otlp_spans_sent")), _spans(row.get("otlp_spans_dropped"))
        if dropped is None:
            notes.append(
                f"{capture} streamed spans to {endpoint}, but its stream died before counting them:"
                " how many reached the receiver is unknown"
            )
        elif dropped:
            sent_text = "an unknown number of" if sent is None else f"{sent:,}"
            notes.append(
                f"{capture} streamed {sent_text} spans to {endpoint}; {dropped:,} dropped (queue full or refused)"
            )
    return notes


_MAX_COUNT = 2**63 - 1  # SQLite's largest INTEGER: a larger number is no count the stream wrote


def _spans(value: object) -> int | None:
    """A count of spans as the file holds it (an integer, or a float where a NULL elsewhere made the column float); else None."""
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, int | np.integer):  # a Python int may pass int64's range: no numpy function on it
        return int(value) if 0 <= value <= _MAX_COUNT else None
    if isinstance(value, float | np.floating) and math.isfinite(value) and 0 <= value < _MAX_COUNT and float(value).is_integer():
        return int(value)
    return None
