"""Hand-made trace databases for the analyzer's tests: a builder and a synthetic sample stack.

:class:`Builder` writes exactly what the recorder writes (``hoptrace.db``'s schema,
plain ``sqlite3.executemany``), with times given in seconds after ``T0`` so a test
reads like a timeline. Every hop may name its true parent: :attr:`Builder.truth`
is the ground truth that trace inference is scored against.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from hoptrace.db import HOP_COLUMNS, HOP_TOKEN_COLUMNS, SCHEMA, SCHEMA_VERSION, TOKEN_COLUMNS

T0 = 1_700_000_000.0


@dataclass
class Builder:
    """A trace DB under construction. Times are seconds after ``T0``."""

    entry: str | None = "gateway"
    hops: list[dict] = field(default_factory=list)
    tokens: list[dict] = field(default_factory=list)
    links: list[tuple] = field(default_factory=list)
    truth_parent: dict[int, int | None] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _token_ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def token(self, sub=None, exp=None, *, iat=None, nbf=None, kind="jwt", iss=None, seen=0.0, fingerprint=None) -> str:
        """A token; ``exp``/``iat``/``nbf`` in seconds after T0 (None: no such claim)."""
        fp = fingerprint or hashlib.sha256(str(next(self._token_ids)).encode()).hexdigest()[:32]
        self.tokens.append({
            "fingerprint": fp, "capture_id": 1, "kind": kind, "length": 200 if kind != "opaque" else 32,
            "alg": "HS256" if kind == "jwt" else None, "kid": None, "typ": None, "iss": iss, "sub": sub,
            "aud": None, "jti": None, "iat": _abs(iat), "nbf": _abs(nbf), "exp": _abs(exp), "claims": None,
            "error": None, "first_seen_at": T0 + seen, "verdict": None,
        })  # fmt: skip
        return fp

    def hop(
        self,
        service: str,
        endpoint: str,
        start: float,
        end: float,
        *,
        parent: int | None = None,
        status: int | None = 200,
        presented=(),
        validated=(),
        issued=(),
        failed: bool = False,
        error: str | None = None,
        **columns,
    ) -> int:
        """Record one hop; ``endpoint`` is ``"METHOD /path"``; token arguments take one fp or several."""
        hop_id = next(self._ids)
        method, _, path = endpoint.partition(" ")
        row = dict.fromkeys(HOP_COLUMNS)
        row.update(
            id=hop_id, capture_id=1, flow_id=f"flow-{hop_id}", service=service, method=method, path=path,
            scheme="http", host="127.0.0.1", status=status, failed=int(failed or error is not None),
            error=error, started_at=T0 + start, ended_at=T0 + end, duration_ms=(end - start) * 1000.0,
            response_start_at=T0 + end if status is not None else None,
        )  # fmt: skip
        row.update(columns)
        self.hops.append(row)
        self.truth_parent[hop_id] = parent
        for role, fps, location in (
            ("presented", presented, "header:authorization"),
            ("validated", validated, "body:token"),
            ("issued", issued, "response-body:token"),
        ):
            for fp in (fps,) if isinstance(fps, str) else fps:
                self.links.append((hop_id, fp, role, location))
        return hop_id

    @property
    def truth(self) -> pd.Series:
        """True parent hop id by hop id (<NA> for roots)."""
        return pd.Series(self.truth_parent, dtype="Int64").rename_axis("id")

    def write(self, path: str | Path) -> Path:
        """The DB as the recorder would have left it."""
        path = Path(path)
        conn = sqlite3.connect(path)
        self.fill(conn)
        conn.close()
        return path

    def fill(self, conn: sqlite3.Connection) -> None:
        conn.executescript(SCHEMA)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute(
            "INSERT INTO captures (id, started_at, ended_at, routes, entry, hoptrace_version, mitmproxy_version,"
            " hops_seen, hops_recorded) VALUES (1, ?, ?, '[]', ?, '0.1.0', '11.0.2', ?, ?)",
            (T0, T0 + max((h["ended_at"] - T0 for h in self.hops), default=0.0), self.entry, len(self.hops), len(self.hops)),
        )
        conn.executemany(
            f"INSERT INTO hops VALUES ({', '.join('?' * len(HOP_COLUMNS))})",
            ([h[c] for c in HOP_COLUMNS] for h in self.hops),
        )
        conn.executemany(
            f"INSERT INTO tokens VALUES ({', '.join('?' * len(TOKEN_COLUMNS))})",
            ([t[c] for c in TOKEN_COLUMNS] for t in self.tokens),
        )
        conn.executemany(f"INSERT OR IGNORE INTO hop_tokens VALUES ({', '.join('?' * len(HOP_TOKEN_COLUMNS))})", self.links)
        conn.commit()


def same_tables(a, b) -> None:
    """Two loads of trace files (:class:`hoptrace.analyzer.Tables`) are equal: frames, dtypes and notes."""
    for name in ("captures", "hops", "tokens", "hop_tokens"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name), check_exact=True)
    assert a.notes == b.notes


def _abs(t: float | None) -> float | None:
    return None if t is None else T0 + t


# -- the sample stack, simulated ------------------------------------------------------


@dataclass
class _Node:
    service: str
    endpoint: str
    start: float
    end: float = 0.0
    status: int = 200
    presented: tuple = ()
    validated: tuple = ()
    issued: tuple = ()
    trace_id: str | None = None
    children: list = field(default_factory=list)


def synthetic_stack(
    users: int = 10,
    workflows: int = 2,
    *,
    seed: int = 0,
    ttl: float = 3600.0,
    work_s: float = 1.0,
    propagate: bool = False,
    entry: str | None = "gateway",
    think_s: float = 0.01,
) -> Builder:
    """The sample stack under load: ``users`` concurrent users, each registering, logging in
    (and getting register's token back), then running ``workflows`` browse / add-to-cart /
    view-cart / checkout workflows back to back, ``think_s`` apart at most.

    Checkout re-validates the token at auth from payment after ``work_s`` of work (the
    scenario's bug). With ``propagate`` every hop below the entry carries one trace id per
    request (W3C mode: the client itself sends none). Hop ids follow end times, as the
    recorder assigns them.
    """
    rng = random.Random(seed)

    def ms(lo: float, hi: float) -> float:
        return rng.uniform(lo, hi) / 1000.0

    def run(node: _Node, plan: list) -> _Node:
        # The service works a little, makes its calls one after the other, answers.
        t = node.start + ms(0.2, 1.5)
        for step in plan:
            if isinstance(step, float):
                t += step * rng.uniform(0.9, 1.1)
                continue
            child, child_plan = step
            child.start = t
            node.children.append(run(child, child_plan))
            t = child.end + ms(0.2, 1.0)
        node.end = t + ms(0.3, 2.0)
        return node

    roots = []
    for u in range(users):
        t = rng.uniform(0, 0.05)
        sub = f"user{u}"
        tok = None
        names = ["register", "login"] + ["browse", "add", "view", "checkout"] * workflows
        for n, name in enumerate(names):
            trace = f"{u:04x}{n:012x}" if propagate else None

            def node(service, endpoint, trace=trace, **kw):
                return _Node(service, endpoint, 0.0, trace_id=trace, **kw)

            cart = f"cart_{u:03d}a{n}"
            if name in ("register", "login"):
                if tok is None:
                    tok = (sub, t + ttl, int(T0 + t) - T0)
                status = 201 if name == "register" else 200
                root = _Node("gateway", f"POST /auth/{name}", t, status=status, issued=(tok,))
                plan = [(node("auth", f"POST /{name}", status=status, issued=(tok,)), [])]
            else:
                verify = (node("auth", "GET /verify", presented=(tok,)), [])
                if name == "browse":
                    root = _Node("gateway", "GET /products", t, presented=(tok,))
                    plan = [verify, (node("products", "GET /products", presented=(tok,)), [])]
                elif name == "add":
                    root = _Node("gateway", "POST /cart/items", t, presented=(tok,), status=201)
                    item = (node("products", f"GET /products/{rng.randrange(100)}", presented=(tok,)), [])
                    plan = [verify, (node("cart", "POST /cart/items", presented=(tok,), status=201), [item])]
                elif name == "view":
                    root = _Node("gateway", f"GET /cart/{cart}", t, presented=(tok,))
                    plan = [verify, (node("cart", f"GET /cart/{cart}", presented=(tok,)), [])]
                else:
                    root = _Node("gateway", "POST /checkout", t, presented=(tok,))
                    pay_plan = [
                        (node("cart", f"GET /cart/{cart}", presented=(tok,)), []),
                        float(work_s),
                        (node("auth", "POST /introspect", validated=(tok,)), []),
                    ]
                    plan = [verify, (node("payment", "POST /checkout", presented=(tok,)), pay_plan)]
            roots.append(run(root, plan))
            t = root.end + rng.uniform(0.0, think_s)
    return _emit(roots, entry)


def _emit(roots: list[_Node], entry: str | None) -> Builder:
    b = Builder(entry=entry)
    parent_of: dict[int, _Node | None] = {}
    flat: list[_Node] = []

    def walk(node: _Node, parent: _Node | None) -> None:
        parent_of[id(node)] = parent
        flat.append(node)
        for child in node.children:
            walk(child, node)

    for root in roots:
        walk(root, None)
    tokens: dict[tuple, str] = {}

    def fps(toks: tuple) -> list[str]:
        out = []
        for sub, exp, iat in toks:
            if (sub, exp) not in tokens:
                tokens[(sub, exp)] = b.token(sub=sub, exp=exp, iat=iat, iss="auth", seen=iat)
            out.append(tokens[(sub, exp)])
        return out

    ids: dict[int, int] = {}
    for node in sorted(flat, key=lambda n: n.end):
        extra = {"trace_id": node.trace_id, "trace_source": "traceparent"} if node.trace_id else {}
        ids[id(node)] = b.hop(
            node.service,
            node.endpoint,
            node.start,
            node.end,
            status=node.status,
            presented=fps(node.presented),
            validated=fps(node.validated),
            issued=fps(node.issued),
            **extra,
        )
    for node in flat:
        parent = parent_of[id(node)]
        b.truth_parent[ids[id(node)]] = None if parent is None else ids[id(parent)]
    return b


def analyze_builder(b: Builder, tmp_path: Path, name: str = "t.db", **kwargs):
    """Write ``b`` to a DB under ``tmp_path`` and analyze it."""
    from hoptrace.analyzer import analyze

    path = tmp_path / name
    if path.exists():
        path.unlink()
    return analyze(b.write(path), **kwargs)


def rebuild_builder(b: Builder, tmp_path: Path) -> pd.DataFrame:
    """Only the trace rebuilding step on ``b``: the hops with their links."""
    from hoptrace.analyzer import load
    from hoptrace.analyzer._traces import rebuild

    path = tmp_path / "rebuild.db"
    if path.exists():
        path.unlink()
    t = load(b.write(path))
    return rebuild(t.hops, t.hop_tokens, t.tokens, t.captures)


def detect(b: Builder, tmp_path: Path, kind: str, **config) -> pd.DataFrame:
    """Only the detector of ``kind`` run on ``b``: its findings (with kind and severity)."""
    from hoptrace.analyzer import DETECTORS, AnalyzerConfig, load
    from hoptrace.analyzer._analysis import prepare
    from hoptrace.analyzer._detectors import run_detectors

    path = tmp_path / f"{kind}.db"
    if path.exists():
        path.unlink()
    ctx = prepare(load(b.write(path)), AnalyzerConfig(**config))
    return run_detectors(ctx, tuple(d for d in DETECTORS if d.kind == kind))
