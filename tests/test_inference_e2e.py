"""Trace inference measured against ground truth on the real stack.

The sample stack, with propagation on, sends W3C `traceparent` on every call, names
each call's parent span in `tracestate: hoptrace=<span>`, and answers the client with
`traceresponse`. From those headers as recorded, the true parent of every hop is
known without the analyzer. Then the trace columns are wiped, as if the services had
propagated nothing, and the analyzer must rebuild the same trees from timing and tokens.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3

import pandas as pd
import pytest

from hoptrace.analyzer import analyze, link_accuracy
from hoptrace.stack.scenarios import SCENARIOS, record

pytestmark = pytest.mark.e2e

# Measured: 1.000 at 10 concurrent users on this stack (README: what lowers it).
REQUIRED_ACCURACY = 0.99


def true_parents(db) -> pd.Series:
    """Each hop's parent hop id from the recorded headers alone (<NA> for client requests)."""
    conn = sqlite3.connect(db)
    span_of_hop, parent_span_of_hop = {}, {}
    for hop_id, request_headers, response_headers in conn.execute("SELECT id, request_headers, response_headers FROM hops"):
        request = {name.lower(): value for name, value in json.loads(request_headers)}
        response = {name.lower(): value for name, value in json.loads(response_headers or "[]")}
        if "traceparent" in request:
            span_of_hop[hop_id] = request["traceparent"].split("-")[2]
            entries = dict(entry.strip().split("=", 1) for entry in request.get("tracestate", "").split(",") if "=" in entry)
            parent_span_of_hop[hop_id] = entries["hoptrace"]
        else:  # a client request: the gateway's own span comes back in traceresponse
            span_of_hop[hop_id] = response["traceresponse"].split("-")[2]
    conn.close()
    hop_of_span = {span: hop for hop, span in span_of_hop.items()}
    return pd.Series(
        {hop: hop_of_span[parent_span_of_hop[hop]] if hop in parent_span_of_hop else pd.NA for hop in span_of_hop},
        dtype="Int64",
    )


@pytest.fixture(scope="module")
def propagated(tmp_path_factory):
    scenario = SCENARIOS["propagated"]
    assert scenario.users >= 10
    db = tmp_path_factory.mktemp("inference") / "propagated.db"
    recording = asyncio.run(record(db, scenario.stack_config(), scenario.drive))
    assert all(flow.ok for flow in recording.flows)
    return db


def test_headers_give_exact_trees(propagated):
    truth = true_parents(propagated)
    assert truth.notna().sum() > 0 and truth.isna().sum() == 6 * SCENARIOS["propagated"].users
    hops = analyze(propagated).hops
    assert link_accuracy(hops, truth) == 1.0
    assert set(hops.loc[hops["parent_id"].notna(), "link"]) == {"header"}


def test_inference_without_headers_matches_ground_truth(propagated, tmp_path):
    truth = true_parents(propagated)
    blind = tmp_path / "no-headers.db"
    shutil.copy(propagated, blind)
    conn = sqlite3.connect(blind)
    conn.execute(
        "UPDATE hops SET trace_id = NULL, span_id = NULL, parent_span_id = NULL, trace_source = NULL,"
        " request_id = NULL, correlation_id = NULL"
    )
    conn.commit()
    conn.close()
    hops = analyze(blind).hops
    accuracy = link_accuracy(hops, truth)
    assert accuracy >= REQUIRED_ACCURACY, f"{accuracy:.4f}"
    assert "header" not in set(hops["link"])
    assert set(hops.loc[hops["parent_id"].notna(), "link"]) <= {"token", "nesting", "ambiguous"}
