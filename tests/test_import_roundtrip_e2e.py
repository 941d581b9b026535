"""One run of the sample stack recorded three ways at once, and the same diagnosis from each.

The services call each other through `hoptrace proxy`, whose routes lead to a real
`mitmdump --mode reverse` writing a flow file (`-w`) and a HAR (`savehar`'s `hardump`),
whose routes lead to the services. Every hop passes both proxies, so the three records
hold the same traffic: `hoptrace proxy`'s own DB, and the flow file and the HAR imported
by `hoptrace import`. The analyses must agree on the findings (kind, service, request)
and on every hop's parent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pandas as pd
import pytest

from hoptrace.analyzer import analyze
from hoptrace.stack import SERVICES, start_stack
from hoptrace.stack.scenarios import SCENARIOS

from .conftest import Proc, free_port

pytestmark = pytest.mark.e2e

MITMDUMP = str(Path(sys.executable).parent / "mitmdump")
KEY = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"


def hoptrace(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hoptrace", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "HOPTRACE_FINGERPRINT_KEY": KEY, **(env or {})},
    )  # fmt: skip


async def record_three_ways(tmp: Path) -> dict:
    # Three users, one of them checking out with 0.4 s of token life left. Every hop
    # crosses two proxies on a shared 2-core box: a 6 s token life keeps the on-time
    # users' checkouts inside it.
    scenario = dataclasses.replace(SCENARIOS["checkout-expiry"], users=3)
    config = scenario.stack_config(token_ttl=6)
    hop_port = {name: free_port() for name in SERVICES}
    mitm_port = {name: free_port() for name in SERVICES}
    config.upstreams = {name: f"http://127.0.0.1:{port}" for name, port in hop_port.items()}
    config.ports = dict.fromkeys(SERVICES, 0)
    paths = {"proxy": tmp / "proxy.db", "flows": tmp / "capture.mitm", "har": tmp / "capture.har"}
    async with await start_stack(config) as stack:
        modes = [f"--mode=reverse:{stack.urls[name]}@{mitm_port[name]}" for name in SERVICES]
        mitmdump = Proc([
            MITMDUMP, "-q", *modes, "--set", "connection_strategy=lazy", "--set", "listen_host=127.0.0.1",
            "-w", str(paths["flows"]), "--set", f"hardump={paths['har']}",
        ])  # fmt: skip
        routes = [f"--route={name}=http://127.0.0.1:{mitm_port[name]}@{hop_port[name]}" for name in SERVICES]
        proxy = Proc([sys.executable, "-m", "hoptrace", "proxy", "--db", str(paths["proxy"]), "--entry", "gateway", *routes])
        try:
            proxy.wait_for("proxy ready", 60)
            await _wait_listening(list(mitm_port.values()))
            flows = await scenario.drive(f"http://127.0.0.1:{hop_port['gateway']}")
            served = {name: stats["total"] for name, stats in stack.stats().items() if stats["total"]}
        finally:
            assert proxy.stop() == 0, proxy.output
            mitmdump.stop()  # SIGINT: mitmdump flushes -w and writes the HAR as it exits
    stack_file = tmp / "stack.toml"
    stack_file.write_text(
        'entry = "gateway"\n'
        + "".join(f'[routes.{n}]\nupstream = "{stack.urls[n]}"\nlisten = {mitm_port[n]}\n' for n in SERVICES)
    )
    return {"paths": paths, "flows": flows, "served": served, "urls": stack.urls, "stack_file": stack_file, "proxy_output": proxy.output}


async def _wait_listening(ports: list[int], timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for port in ports:
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    os.environ["HOPTRACE_FINGERPRINT_KEY"] = KEY  # the proxy child inherits it: one key, comparable fingerprints
    try:
        tmp = tmp_path_factory.mktemp("three")
        run = asyncio.run(record_three_ways(tmp))
    finally:
        del os.environ["HOPTRACE_FINGERPRINT_KEY"]
    paths = run["paths"]
    flows_db, har_db = tmp / "from-flows.db", tmp / "from-har.db"
    imported = hoptrace("import", str(paths["flows"]), "--db", str(flows_db), "--stack", str(run["stack_file"]))
    assert imported.returncode == 0, imported.stderr
    services = [f"--service=127.0.0.1:{run['urls'][n].rsplit(':', 1)[1]}={n}" for n in SERVICES]
    imported_har = hoptrace("import", str(paths["har"]), "--db", str(har_db), *services, "--entry", "gateway")
    assert imported_har.returncode == 0, imported_har.stderr
    run["dbs"] = {"proxy": paths["proxy"], "flows": flows_db, "har": har_db}
    run["outputs"] = {"flows": imported.stdout, "har": imported_har.stdout}
    return run


def _identities(db: Path) -> dict[int, tuple]:
    """A hop's identity across the three records: what it was, the tokens on it, its rank among its like."""
    conn = sqlite3.connect(db)
    tokens = defaultdict(set)
    for hop_id, fp in conn.execute("SELECT hop_id, fingerprint FROM hop_tokens"):
        tokens[hop_id].add(fp)
    rank: Counter = Counter()
    identities = {}
    for hop_id, service, method, path, status in conn.execute("SELECT id, service, method, path, status FROM hops ORDER BY started_at, id"):
        like = (service, method, path, status, tuple(sorted(tokens[hop_id])))
        identities[hop_id] = (*like, rank[like])
        rank[like] += 1
    conn.close()
    return identities


def test_every_hop_is_in_all_three_records(three):
    served = three["served"]
    for name, db in three["dbs"].items():
        conn = sqlite3.connect(db)
        counts = dict(conn.execute("SELECT service, count(*) FROM hops GROUP BY service").fetchall())
        capture = conn.execute("SELECT hops_recorded, addon_errors FROM captures").fetchone()
        conn.close()
        assert counts == served, name
        assert capture == (sum(served.values()), 0), name
    assert "0 addon errors" in three["outputs"]["flows"] and "0 addon errors" in three["outputs"]["har"]


def test_same_findings_three_ways(three):
    found = {}
    for name, db in three["dbs"].items():
        analysis = analyze(db)
        ids = _identities(db)
        found[name] = Counter(
            (f["kind"], f["service"], None if pd.isna(f["trace"]) else ids[int(f["trace"])])
            for f in analysis.findings.to_dict("records")
        )
    assert found["proxy"], "the scenario must produce findings"
    assert any(kind == "expired_mid_flow" for kind, _, _ in found["proxy"])
    assert found["flows"] == found["proxy"]
    assert found["har"] == found["proxy"]


def test_same_parent_links_three_ways(three):
    parents = {}
    for name, db in three["dbs"].items():
        ids = _identities(db)
        hops = analyze(db).hops
        parents[name] = {
            ids[int(hop_id)]: None if pd.isna(parent) else ids[int(parent)]
            for hop_id, parent in zip(hops.index, hops["parent_id"].astype(object), strict=True)
        }
    assert parents["flows"] == parents["proxy"]
    assert parents["har"] == parents["proxy"]


def test_the_flow_file_names_services_from_its_listeners_and_the_har_carries_no_caller(three):
    conn = sqlite3.connect(three["dbs"]["flows"])
    assert conn.execute("SELECT count(*) FROM hops WHERE client_addr IS NULL").fetchone()[0] == 0
    (source,) = conn.execute("SELECT source FROM captures").fetchone()
    assert source.startswith("import:flows:") and len(source) == len("import:flows:") + 64
    conn.close()
    conn = sqlite3.connect(three["dbs"]["har"])
    # savehar writes no `connection`: the caller's address is what HAR cannot carry.
    assert conn.execute("SELECT count(*) FROM hops WHERE client_addr IS NOT NULL").fetchone()[0] == 0
    assert conn.execute("SELECT entry FROM captures").fetchone()[0] == "gateway"
    conn.close()


def test_importing_the_same_file_again_adds_nothing(three):
    db = three["dbs"]["flows"]
    before = sqlite3.connect(db).execute("SELECT count(*) FROM hops").fetchone()[0]
    again = hoptrace("import", str(three["paths"]["flows"]), "--db", str(db), "--stack", str(three["stack_file"]))
    assert again.returncode == 0 and "already imported" in again.stdout
    assert sqlite3.connect(db).execute("SELECT count(*) FROM hops").fetchone()[0] == before
