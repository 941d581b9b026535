"""Synthetic trace DBs of a realistic shape and any size, for the analysis benchmark.

The traffic is cohorts of :data:`USERS` concurrent users of a 12-service shop
(users arrive 0.2 s apart, so about 15 are mid-session at any moment). Each user
logs in, browses, adds to the cart, browses again and checks out: 5 to 8 hops a
request, every internal call forwarding the user's bearer token, except the
service-to-service calls of login. Odd cohorts propagate W3C ``traceparent``
(the gateway starting the trace and answering ``traceresponse``); even ones send
no trace header at all, so both ways of rebuilding requests are exercised.

Every cohort has the same faults, on the same users (:data:`PLANTED`): a token that
expires between the gateway's check and payment's, a ledger retried after 503s,
a shared client sending another user's token, a login answering an old token, a
slow inventory call, a session going on after its token expired, a token refused
while valid; and the pricing service's clock runs 4 s ahead. The analysis must
therefore report the same findings for every cohort, at every size: that is what
the benchmark checks besides timing it.

One cohort is simulated in Python (:func:`cohort`); SQLite then writes the DB by
copying it ``cohorts`` times, each copy shifted in time and given its own users,
tokens, carts and trace ids, in ``INSERT ... SELECT`` statements: a million hops
take seconds, not minutes. Cohorts follow each other without overlapping, so hop
ids follow end times across the file, as the recorder assigns them. Every
:data:`BATCH` hops then get their Arrow columns (``hoptrace._hop_columns``), as the
recorder's row process writes them with each batch.

    python benchmarks/synth.py 100000 /tmp/synth-100k.db
"""

from __future__ import annotations

import json
import math
import random
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hoptrace import _hop_columns as hop_columns
from hoptrace.db import SCHEMA, SCHEMA_VERSION

T0 = 1_767_254_400.0  # 2026-01-01T08:00:00Z: the capture's start
USERS = 32
ARRIVAL_S = 0.2
TTL_S = 900.0
SKEWED_SERVICE, SKEW_S = "pricing", 4
# Which user of every cohort carries which fault, and the finding it must produce.
PLANTED = {
    "expired_mid_flow": 3,  # login hands out a token that runs out inside checkout
    "retry_storm": 7,  # payment calls ledger three times: 503, 503, 200
    "token_crossover": 11,  # cart's shared client sends user 12's token to catalog
    "token_reuse": 15,  # a second login answers the first login's token
    "slow_hop": 19,  # one inventory call takes 600 ms instead of ~4
    "expired_in_session": 23,  # the session goes on after its token expired
    "rejected_valid_token": 27,  # pricing answers 401 to a valid token
}
ROUTES = (
    "gateway", "auth", "users", "keys", "audit", "catalog", "inventory", "pricing", "cart", "payment", "ledger", "notify",
)  # fmt: skip
REASONS = {200: "OK", 201: "Created", 401: "Unauthorized", 503: "Service Unavailable"}
# Hops per batch the recorder writes (TraceWriter's batch_size), each with its Arrow columns.
BATCH = 2_000


@dataclass
class Call:
    """One hop of the simulation: a service answering, after calling others one after the other."""

    service: str
    endpoint: str  # "METHOD /path"; {uid} and {cart} are replaced per user in the DB
    token: str | None = "presented"  # the user's token: presented | validated | issued | None
    token_of: int | None = None  # whose token it is, if not the caller's user
    status: int = 200
    work_s: tuple[float, float] = (0.0008, 0.0012)  # own time before the calls and after them (half between)
    calls: list[Call | float] = field(default_factory=list)  # a float: a pause of that many seconds


@dataclass
class Cohort:
    """One cohort, as rows for the template tables (times relative to the cohort's start)."""

    hops: list[dict]
    tokens: list[dict]
    hop_tokens: list[tuple[int, int, str, str]]  # hop, token owner, role, location
    span_s: float


def _login(uid: int, status: int = 200) -> Call:
    return Call("gateway", "POST /auth/login", "issued", status=status, calls=[
        Call("auth", "POST /login", "issued", status=status, work_s=(0.002, 0.003), calls=[
            Call("users", "GET /users/{uid}", None), Call("keys", "GET /keys", None),
        ]),
        Call("audit", "POST /events"),
    ])  # fmt: skip


def _verify(status: int = 200) -> Call:
    return Call("auth", "GET /verify", status=status)


def _browse(slow: bool = False, pricing_status: int = 200) -> Call:
    inventory = Call("inventory", "GET /stock/{sku}", work_s=(0.3, 0.3) if slow else (0.0025, 0.0035))
    pricing = Call("pricing", "GET /prices/{sku}", status=pricing_status)
    return Call("gateway", "GET /products", status=pricing_status, calls=[
        _verify(), Call("catalog", "GET /products", status=pricing_status, calls=[inventory, pricing]),
    ])  # fmt: skip


def _refused(endpoint: str) -> Call:
    return Call("gateway", endpoint, status=401, calls=[_verify(status=401)])


def _add(crossover_of: int | None = None) -> Call:
    return Call("gateway", "POST /cart/items", status=201, calls=[
        _verify(),
        Call("cart", "POST /carts/{cart}/items", status=201, calls=[
            Call("catalog", "GET /products/{sku}", token_of=crossover_of),
            Call("inventory", "POST /reservations", status=201),
            Call("pricing", "GET /prices/{sku}"),
        ]),
    ])  # fmt: skip


def _checkout(expired: bool = False, ledger_503s: int = 0) -> Call:
    """Payment works 0.8 s (the card network) between reading the cart and validating the token."""
    if expired:
        after_work = [Call("auth", "POST /introspect", "validated", status=401)]
        status = 401
    else:
        ledger = [Call("ledger", "POST /charges", status=503) for _ in range(ledger_503s)]
        retries = [x for call in ledger for x in (call, 0.05)]  # 50 ms back-off after each 503
        after_work = [Call("auth", "POST /introspect", "validated"), *retries, Call("ledger", "POST /charges", status=201),
                      Call("notify", "POST /notifications", status=201)]  # fmt: skip
        status = 201
    payment = Call("payment", "POST /payments", status=status, calls=[Call("cart", "GET /carts/{cart}"), 0.8, *after_work])
    return Call("gateway", "POST /checkout", status=status, calls=[_verify(), payment, Call("audit", "POST /events")])


def _session(user: int) -> list[Call]:
    """What a user does, in order; the planted users' sessions carry their fault."""
    expired = user == PLANTED["expired_in_session"]
    session = [
        _login(user),
        _browse(slow=user == PLANTED["slow_hop"], pricing_status=401 if user == PLANTED["rejected_valid_token"] else 200),
        _add(crossover_of=user + 1 if user == PLANTED["token_crossover"] else None),
        _refused("GET /products") if expired else _browse(),
        _refused("POST /checkout")
        if expired
        else _checkout(expired=user == PLANTED["expired_mid_flow"], ledger_503s=2 if user == PLANTED["retry_storm"] else 0),
    ]
    if user == PLANTED["token_reuse"]:
        session.append(_login(user))
    return session


def cohort(seed: int = 0) -> Cohort:
    """Simulate one cohort: every user's session, hop by hop, with ids in end order."""
    rng = random.Random(seed)
    hops: list[dict] = []
    links: list[tuple[dict, int, str, str]] = []
    request = 0

    def run(call: Call, start: float, user: int, parent: dict | None) -> dict:
        nonlocal request
        hop = {"call": call, "user": user, "request": request, "parent": parent, "start": start, "sku": rng.randrange(1, 500)}
        hops.append(hop)
        if call.token:
            location = {"presented": "header:authorization", "validated": "body:token", "issued": "response-body:access_token"}
            owner = user if call.token_of is None else call.token_of
            links.append((hop, owner, call.token, location[call.token]))
        t = start + rng.uniform(*call.work_s)
        for step in call.calls:
            if isinstance(step, float):
                t += step
            else:
                t = run(step, t + rng.uniform(0.0002, 0.0004), user, hop)["end"] + rng.uniform(0.0001, 0.0003)
            t += rng.uniform(*call.work_s) / 2
        hop["end"] = t + rng.uniform(*call.work_s)
        return hop

    logins: dict[int, float] = {}
    for user in range(USERS):
        t = user * ARRIVAL_S + rng.uniform(0.0, 0.05)
        for call in _session(user):
            root = run(call, t, user, None)
            request += 1
            logins.setdefault(user, root["start"])
            t = root["end"] + rng.uniform(0.05, 0.3)

    # Ids in end order, as the recorder assigns them.
    hops.sort(key=lambda h: h["end"])
    for local_id, hop in enumerate(hops, 1):
        hop["id"] = local_id
    tokens = [_token(user, hops, logins[user]) for user in range(USERS)]
    rows = [_hop_row(hop) for hop in hops]
    return Cohort(
        hops=rows,
        tokens=tokens,
        hop_tokens=[(hop["id"], owner, role, location) for hop, owner, role, location in links],
        span_s=max(hop["end"] for hop in hops),
    )


def _token(user: int, hops: list[dict], issued_at: float) -> dict:
    """The user's token; the planted ones expire where their fault needs it to."""
    iat = math.floor(issued_at)
    exp = iat + TTL_S
    mine = [h for h in hops if h["user"] == user and h["parent"] is None]
    if user == PLANTED["expired_mid_flow"]:  # after the gateway's check of checkout, before payment's
        checkout = mine[-1]
        exp = checkout["start"] + 0.4
    elif user == PLANTED["expired_in_session"]:  # between adding to the cart and browsing again
        add, browse = mine[2], mine[3]
        exp = (add["end"] + browse["start"]) / 2
    return {"user": user, "iat": float(iat), "nbf": float(iat), "exp": exp, "first_seen": issued_at}


def _hop_row(hop: dict) -> dict:
    call: Call = hop["call"]
    method, path = call.endpoint.split(" ")
    parent = hop["parent"]
    headers = [["host", f"{call.service}:8080"], ["user-agent", "shop/2.3 aiohttp/3.9"], ["accept", "application/json"]]
    if call.token == "presented":
        headers.append(["authorization", "Bearer [redacted:5f1c9a0e]"])
    if method == "POST":
        headers += [["content-type", "application/json"], ["content-length", "112"]]
    response = [
        ["content-type", "application/json; charset=utf-8"],
        ["content-length", "230"],
        ["server", "Python/3.11 aiohttp/3.9.5"],
    ]
    return {
        "local_id": hop["id"],
        "user": hop["user"],
        "request": hop["request"],
        "parent_local": parent["id"] if parent else 0,
        "service": call.service,
        "method": method,
        "path": path.replace("{sku}", str(hop["sku"])),
        "status": call.status,
        "reason": REASONS[call.status],
        "request_size": 112 if method == "POST" else 0,
        "response_size": 230,
        "request_content_type": "application/json" if method == "POST" else None,
        "start": hop["start"],
        "response_start": hop["end"] - 0.0001,
        "end": hop["end"],
        "date_offset": SKEW_S if call.service == SKEWED_SERVICE else 0,
        "request_headers": json.dumps(headers),
        "response_headers": json.dumps(response),
    }


# -- writing --------------------------------------------------------------------------


_TEMPLATE_SCHEMA = """
CREATE TEMP TABLE t_hops (
    local_id INTEGER PRIMARY KEY, user INTEGER, request INTEGER, parent_local INTEGER, service TEXT, method TEXT,
    path TEXT, status INTEGER, reason TEXT, request_size INTEGER, response_size INTEGER, request_content_type TEXT,
    start REAL, response_start REAL, "end" REAL, date_offset INTEGER, request_headers TEXT, response_headers TEXT
);
CREATE TEMP TABLE t_tokens (user INTEGER, iat REAL, nbf REAL, exp REAL, first_seen REAL);
CREATE TEMP TABLE t_hop_tokens (local_id INTEGER, user INTEGER, role TEXT, location TEXT);
"""

# Cohort k, as SQL: the copies are made from the rows of the template tables.
_COHORTS = "WITH RECURSIVE c(k) AS (SELECT 0 UNION ALL SELECT k + 1 FROM c WHERE k + 1 < :cohorts)"
_USER = "(c.k * :users + t.user)"
_FINGERPRINT = "printf('%016x%016x', c.k + 1, t.user + 1)"
_OFFSET = "(:t0 + c.k * :period)"
_TRACE = "printf('%016x%016x', c.k + 1, t.request + 1)"
_SPAN = "printf('%08x%08x', c.k + 1, t.local_id)"
_PARENT_SPAN = "printf('%08x%08x', c.k + 1, t.parent_local)"
# The service's Date header: whole seconds, on its own (maybe skewed) clock.
_SERVER_DATE = f"(CAST({_OFFSET} + t.response_start AS INTEGER) + t.date_offset)"
_DAYS, _MONTHS = "SunMonTueWedThuFriSat", "JanFebMarAprMayJunJulAugSepOctNovDec"


def _http_date(ts: str) -> str:
    """An HTTP Date header's text, by SQLite (which has no day or month names)."""
    return (
        f"substr('{_DAYS}', 1 + 3 * strftime('%w', {ts}, 'unixepoch'), 3) || strftime(', %d ', {ts}, 'unixepoch')"
        f" || substr('{_MONTHS}', 3 * strftime('%m', {ts}, 'unixepoch') - 2, 3) || strftime(' %Y %H:%M:%S GMT', {ts}, 'unixepoch')"
    )


_INSERT_HOPS = f"""
INSERT INTO hops (
    id, capture_id, flow_id, service, client_addr, method, scheme, host, port, path, query, http_version, status, reason,
    failed, request_size, response_size, request_content_type, response_content_type, started_at, request_end_at,
    response_start_at, ended_at, duration_ms, trace_id, span_id, parent_span_id, trace_source, server_date,
    server_date_ts, request_headers, response_headers
)
{_COHORTS}
SELECT
    c.k * :per_cohort + t.local_id, 1,
    printf('%08x-%04x-4%03x-8%03x-%012x', c.k, t.local_id % 65536, t.user, t.request % 4096, c.k * :per_cohort + t.local_id),
    t.service, '127.0.0.1:' || (30000 + (c.k * :per_cohort + t.local_id) % 30000), t.method, 'http', '127.0.0.1',
    8080, replace(replace(t.path, '{{uid}}', {_USER}), '{{cart}}', printf('cart_%08x', {_USER})),
    NULL, 'HTTP/1.1', t.status, t.reason, 0, t.request_size, t.response_size, t.request_content_type,
    'application/json; charset=utf-8', {_OFFSET} + t.start, {_OFFSET} + t.start + 0.0002,
    {_OFFSET} + t.response_start, {_OFFSET} + t."end", (t."end" - t.start) * 1000.0,
    CASE WHEN c.k % 2 = 1 AND t.parent_local > 0 THEN {_TRACE} END,
    CASE WHEN c.k % 2 = 1 AND t.parent_local > 0 THEN {_SPAN} END,
    CASE WHEN c.k % 2 = 1 AND t.parent_local > 0 THEN {_PARENT_SPAN} END,
    CASE WHEN c.k % 2 = 1 AND t.parent_local > 0 THEN 'traceparent' END,
    {_http_date(_SERVER_DATE)}, {_SERVER_DATE},
    CASE WHEN c.k % 2 = 1 AND t.parent_local > 0
        THEN json_insert(t.request_headers, '$[#]', json_array('traceparent',
             '00-' || {_TRACE} || '-' || {_PARENT_SPAN} || '-01'))
        ELSE t.request_headers END,
    CASE WHEN c.k % 2 = 1 AND t.parent_local = 0
        THEN json_insert(t.response_headers, '$[#]', json_array('traceresponse',
             '00-' || {_TRACE} || '-' || {_SPAN} || '-01'))
        ELSE t.response_headers END
FROM c CROSS JOIN temp.t_hops t  -- CROSS JOIN: cohorts outer, so rows come in id order
"""

_INSERT_TOKENS = f"""
INSERT INTO tokens (fingerprint, capture_id, kind, length, alg, kid, typ, iss, sub, aud, jti, iat, nbf, exp, claims, first_seen_at)
{_COHORTS}
SELECT {_FINGERPRINT}, 1, 'jwt', 318, 'HS256', 'k-2026-01', 'JWT', 'https://auth.shop.internal',
    'user-' || {_USER}, 'shop', printf('jti-%08x', {_USER}),
    {_OFFSET} + t.iat, {_OFFSET} + t.nbf, {_OFFSET} + t.exp,
    json_object('iss', 'https://auth.shop.internal', 'sub', 'user-' || {_USER}, 'aud', 'shop',
                'iat', {_OFFSET} + t.iat, 'nbf', {_OFFSET} + t.nbf, 'exp', {_OFFSET} + t.exp,
                'jti', printf('jti-%08x', {_USER}), 'scope', 'orders:read orders:write cart:write',
                'roles', json_array('customer')),
    {_OFFSET} + t.first_seen
FROM c CROSS JOIN temp.t_tokens t
"""

_INSERT_HOP_TOKENS = f"""
INSERT INTO hop_tokens (hop_id, fingerprint, role, location)
{_COHORTS}
SELECT c.k * :per_cohort + t.local_id, {_FINGERPRINT}, t.role, t.location
FROM c CROSS JOIN temp.t_hop_tokens t
"""


@dataclass(frozen=True)
class SynthDB:
    path: Path
    cohorts: int
    hops: int
    hops_per_cohort: int


def write(path: str | Path, hops: int, *, seed: int = 0) -> SynthDB:
    """A trace DB of about ``hops`` hops (whole cohorts, at least one), replacing ``path``."""
    template = cohort(seed)
    per_cohort = len(template.hops)
    cohorts = max(1, round(hops / per_cohort))
    period = math.ceil(template.span_s) + 1.0  # cohorts never overlap: ids stay in end order
    path = Path(path)
    for stale in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-journal")):
        stale.unlink(missing_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = OFF")  # a file being made from scratch: nothing to roll back to
        conn.execute("PRAGMA synchronous = OFF")
        conn.executescript(SCHEMA + _TEMPLATE_SCHEMA)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("BEGIN")
        _fill_template(conn, template)
        params = {"cohorts": cohorts, "users": USERS, "per_cohort": per_cohort, "t0": T0, "period": period}
        end = T0 + (cohorts - 1) * period + template.span_s
        routes = json.dumps(
            [{"name": n, "upstream": f"http://127.0.0.1:{9100 + i}", "listen_port": 8100 + i} for i, n in enumerate(ROUTES)]
        )
        conn.execute(
            "INSERT INTO captures (id, started_at, ended_at, routes, entry, hoptrace_version, mitmproxy_version,"
            " hops_seen, hops_recorded) VALUES (1, ?, ?, ?, 'gateway', 'synthetic', '11.0.2', ?, ?)",
            (T0, end, routes, cohorts * per_cohort, cohorts * per_cohort),
        )
        for statement in (_INSERT_HOPS, _INSERT_TOKENS, _INSERT_HOP_TOKENS):
            conn.execute(statement, params)
        _store_columns(conn)
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode = DELETE")
    finally:
        conn.close()
    return SynthDB(path=path, cohorts=cohorts, hops=cohorts * per_cohort, hops_per_cohort=per_cohort)


def _store_columns(conn: sqlite3.Connection, batch: int = BATCH) -> None:
    """Each ``batch`` hops' Arrow columns, as the recorder's row process stores them with its batches."""
    last = conn.execute("SELECT max(id) FROM hops").fetchone()[0] or 0
    for first in range(1, last + 1, batch):
        assert hop_columns.store(conn, first, min(first + batch - 1, last)), "a synthetic hop that does not fit its column"


def _fill_template(conn: sqlite3.Connection, template: Cohort) -> None:
    columns = ("local_id", "user", "request", "parent_local", "service", "method", "path", "status", "reason",
               "request_size", "response_size", "request_content_type", "start", "response_start", "end",
               "date_offset", "request_headers", "response_headers")  # fmt: skip
    conn.executemany(
        f"INSERT INTO temp.t_hops VALUES ({', '.join('?' * len(columns))})", ([row[c] for c in columns] for row in template.hops)
    )
    conn.executemany(
        "INSERT INTO temp.t_tokens VALUES (?, ?, ?, ?, ?)",
        ((t["user"], t["iat"], t["nbf"], t["exp"], t["first_seen"]) for t in template.tokens),
    )
    conn.executemany("INSERT INTO temp.t_hop_tokens VALUES (?, ?, ?, ?)", template.hop_tokens)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python benchmarks/synth.py HOPS OUT.db")
    db = write(sys.argv[2], int(sys.argv[1]))
    print(f"{db.path}: {db.hops:,} hops in {db.cohorts} cohorts of {db.hops_per_cohort}")
