"""`hoptrace coverage` on traces recorded from the sample stack through the real proxy (sample_traces/),
against the OpenAPI documents shipped for the stack's services."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hoptrace.cli import cli
from hoptrace.coverage import compare, coverage_of_db, load_specs, render_markdown, render_text

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_traces"
OPENAPI = ROOT / "hoptrace" / "stack" / "openapi"
SERVICES = ("gateway", "auth", "products", "cart", "payment")
SPEC_ARGS = [f"{name}={OPENAPI / name}.yaml" for name in SERVICES]

# The sample workload (hoptrace/stack/workload.py) runs register, login, browse, add to
# cart, view cart and checkout through the gateway; nobody calls the gateway's GET
# /auth/verify or GET /products/{id}, nor any service's GET /_stats.
SKIPPED = {
    ("gateway", "GET", "/auth/verify"),
    ("gateway", "GET", "/products/{product_id}"),
    *((name, "GET", "/_stats") for name in SERVICES),
}


def run(*args: str):
    return CliRunner().invoke(cli, ["coverage", *map(str, args)])


@pytest.fixture(scope="module")
def clean():
    return coverage_of_db(SAMPLES / "clean.db", load_specs(SPEC_ARGS))


def test_the_operations_the_run_skipped_are_listed_exactly(clean):
    never = {(r.service, r.method, r.path) for r in clean.never_called.itertuples()}
    assert never == SKIPPED
    # Cross-check with the raw hops: every documented operation outside SKIPPED was called.
    with sqlite3.connect(SAMPLES / "clean.db") as conn:
        paths = {(s, m, p) for s, m, p in conn.execute("SELECT DISTINCT service, method, path FROM hops")}
    assert ("gateway", "GET", "/auth/verify") not in paths
    assert any(s == "cart" and m == "GET" and p.startswith("/cart/cart_") for s, m, p in paths)
    assert set(clean.operations["service"]) == set(SERVICES)


def test_endpoints_are_templated_by_the_document_and_carry_their_status_classes(clean):
    rows = {(r.service, r.method, r.path): r for r in clean.endpoints.itertuples()}
    cart = rows[("cart", "GET", "/cart/{cart_id}")]  # the raw paths are /cart/cart_<hex>
    assert sorted(cart.callers) == ["gateway", "payment"]
    assert rows[("gateway", "POST", "/checkout")].classes == ["2xx"]
    assert all(r.documented for r in clean.endpoints.itertuples())
    # A clean run takes no error path: every exercised endpoint is listed as such.
    assert len(clean.errors_never_seen) == len(clean.endpoints)


def test_the_calls_between_services_name_caller_and_callee(clean):
    edges = {(r.caller, r.callee, r.method, r.path) for r in clean.edges.itertuples()}
    assert ("payment", "auth", "POST", "/introspect") in edges
    assert ("gateway", "auth", "GET", "/verify") in edges
    assert ("cart", "products", "GET", "/products/{product_id}") in edges
    assert ("payment", "cart", "GET", "/cart/{cart_id}") in edges
    assert ("client", "gateway", "POST", "/checkout") in edges
    assert not any(callee == "gateway" and caller != "client" for caller, callee, *_ in edges)


def test_documented_responses_never_seen(clean):
    missing = {(r.service, r.method, r.path): r.missing_responses for r in clean.operations.itertuples() if r.called}
    assert missing[("gateway", "POST", "/auth/register")] == ["400", "409"]
    assert missing[("auth", "POST", "/introspect")] == ["400", "401"]
    expiry = coverage_of_db(SAMPLES / "checkout-expiry.db", load_specs(SPEC_ARGS))
    seen = {(r.service, r.method, r.path): r.missing_responses for r in expiry.operations.itertuples() if r.called}
    assert seen[("auth", "POST", "/introspect")] == ["400"]  # the expired token's 401 was answered
    flagged = {(r.service, r.method, r.path) for r in expiry.errors_never_seen.itertuples()}
    assert ("gateway", "POST", "/checkout") not in flagged and ("gateway", "GET", "/products") in flagged


def test_without_documents_paths_are_normalised():
    c = coverage_of_db(SAMPLES / "clean.db")
    assert len(c.operations) == 0
    assert ("cart", "GET", "/cart/{id}") in {(r.service, r.method, r.path) for r in c.endpoints.itertuples()}
    assert "Documented operations never called" not in render_text(c)


def test_comparing_two_runs_shows_what_was_added_and_lost():
    ops = load_specs(SPEC_ARGS)
    clean, flaky = coverage_of_db(SAMPLES / "clean.db", ops), coverage_of_db(SAMPLES / "flaky-retries.db", ops)
    diff = compare(clean, flaky)
    assert "products GET /products/{product_id} 5xx" in diff["status classes"]["added"]
    assert diff["status classes"]["lost"] == []
    back = compare(flaky, clean)
    assert back["status classes"]["lost"] == diff["status classes"]["added"]


def test_cli_formats(tmp_path):
    args = [SAMPLES / "clean.db", *(x for a in SPEC_ARGS for x in ("--openapi", a))]
    text = run(*args)
    assert text.exit_code == 0, text.output
    assert "Documented operations never called: 7" in text.output
    assert "GET /products/{product_id}  getProduct" in text.output
    document = json.loads(run(*args, "--format", "json").output)
    assert document["format"] == "hoptrace-coverage"
    assert {(o["service"], o["method"], o["path"]) for o in document["never_called"]} == SKIPPED
    md = run(*args, "--format", "markdown", "-o", tmp_path / "c.md")
    assert md.exit_code == 0 and (tmp_path / "c.md").read_text().startswith("## Interaction coverage")
    assert render_markdown(coverage_of_db(SAMPLES / "clean.db")).count("### ") == 3
    diff = run(SAMPLES / "flaky-retries.db", "--compare", SAMPLES / "clean.db")
    assert diff.exit_code == 0 and "+ products GET /products 5xx" in diff.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.db"], "missing.db"),
        ([SAMPLES / "clean.db", "--openapi", "gateway"], "expected SERVICE=FILE"),
        ([SAMPLES / "clean.db", "--openapi", "gateway=nowhere.yaml"], "no such OpenAPI document"),
        ([SAMPLES / "clean.db", "--openapi", f"gateway={SAMPLES / 'clean.db'}"], "cannot read the OpenAPI document"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args, message):
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.one_of(
        st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=10),
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
            max_leaves=12,
        ).map(lambda doc: json.dumps({"openapi": "3.0.0", "paths": doc})),
    ),
    suffix=st.sampled_from([".yaml", ".json"]),
)
def test_a_hostile_document_is_one_line_and_exit_2(tmp_path, body, suffix):
    spec = tmp_path / f"spec{suffix}"
    spec.write_text(body, encoding="utf-8", errors="surrogateescape")
    result = run(SAMPLES / "clean.db", "--openapi", f"gateway={spec}")
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    if result.exit_code != 0:
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        assert str(spec) in result.output
