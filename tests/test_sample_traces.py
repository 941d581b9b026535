"""The shipped sample traces: recorded by the real proxy, re-analyzed against their golden files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hoptrace.analyzer import analyze, render_json
from hoptrace.stack.scenarios import SCENARIOS

ROOT = Path(__file__).resolve().parent.parent
# What each recorded scenario must show, beyond matching its golden file. Runs with
# no fault switched on must show no error at all.
EXPECTED_ERRORS = {
    "checkout-expiry": {"expired_mid_flow"},
    "clean": set(),
    "clock-skew": {"rejected_valid_token"},
    # The leaked token is another user's: their cart answers 403 to it, a rejection of a valid token.
    "shared-client": {"token_crossover", "rejected_valid_token"},
    "flaky-retries": set(),
    "propagated": set(),
    # Cart refuses payment's calls without X-Internal-Key (401 to a valid token: see service_key_missing);
    # cart's 502s after products' 429s are where the failed add-to-carts began.
    "service-faults": {"service_key_missing", "service_key_leak", "refresh_race", "rejected_valid_token", "upstream_error"},
    # Auth's /verify refuses the tokens of the key it rotated away: 401s to tokens with an hour left.
    "rotated-key": {"unknown_signing_key", "rejected_valid_token"},
}
EXPECTED_WARNINGS = {
    "checkout-expiry": {"duplicate_validation", "token_reuse"},
    "clock-skew": {"clock_skew"},
    "flaky-retries": {"retry_storm"},
    "service-faults": {"retry_without_backoff", "rate_limited", "audience_mismatch"},
    "rotated-key": {"token_reuse", "duplicate_validation"},
}


def test_every_scenario_has_a_sample():
    assert set(EXPECTED_ERRORS) == set(SCENARIOS)
    for name in SCENARIOS:
        assert (ROOT / "sample_traces" / f"{name}.db").is_file()
        assert (ROOT / "sample_traces" / f"{name}.json").is_file()


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_reanalysis_matches_the_golden_file(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # the golden file names its source as sample_traces/<name>.db
    analysis = analyze(Path("sample_traces") / f"{name}.db")
    golden = (ROOT / "sample_traces" / f"{name}.json").read_text(encoding="utf-8")
    assert json.loads(render_json(analysis)) == json.loads(golden), (
        f"analysis of {name} changed; if that is intended: python3 dev.py hoptrace record-samples --goldens-only"
    )
    findings = analysis.findings
    errors = set(findings.loc[findings["severity"] == "error", "kind"])
    assert errors == EXPECTED_ERRORS[name]
    assert EXPECTED_WARNINGS.get(name, set()) <= set(findings.loc[findings["severity"] == "warning", "kind"])


def test_every_finding_names_its_caller_callee_and_endpoint():
    for name in SCENARIOS:
        for f in json.loads((ROOT / "sample_traces" / f"{name}.json").read_text(encoding="utf-8"))["findings"]:
            if f["trace"] is None:  # about a whole service (clock_skew): the service only
                assert f["callee"] == f["service"], (name, f["kind"])
                continue
            assert f["caller"] and f["callee"] and f["endpoint"], (name, f["kind"])


def test_samples_hold_no_raw_token():
    for db in (ROOT / "sample_traces").glob("*.db"):
        data = db.read_bytes()
        # A JWT's header+payload start would be there if a raw token had leaked: '{"alg":"HS256","typ":"JWT"}.{'
        # and (keys sorted, as pyjwt writes them) '{"alg":"RS256",'.
        assert b"eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ" not in data, db.name
        assert b"eyJhbGciOiJSUzI1NiIs" not in data, db.name


@pytest.mark.parametrize(
    ("kind", "sample"),
    [
        *((kind, "service-faults") for kind in (
            "service_key_missing", "service_key_leak", "refresh_race", "retry_without_backoff", "rate_limited", "audience_mismatch",
        )),
        ("unknown_signing_key", "rotated-key"),
    ],
)  # fmt: skip
def test_fail_on_accepts_each_new_kind(kind, sample):
    from click.testing import CliRunner

    from hoptrace.analyzer._cli import analyze as analyze_command

    result = CliRunner().invoke(analyze_command, [str(ROOT / "sample_traces" / f"{sample}.db"), "--fail-on", kind])
    assert result.exit_code == 1, result.output
    assert "failing on" in result.stderr and kind in result.stderr


def test_audience_map_from_the_command_line():
    from click.testing import CliRunner

    from hoptrace.analyzer._cli import analyze as analyze_command

    db = str(ROOT / "sample_traces" / "service-faults.db")
    runner = CliRunner()
    told = runner.invoke(analyze_command, [db, "--format", "json", "--audience", "cart=payment", "--fail-on", "audience_mismatch"])
    assert told.exit_code == 0 and json.loads(told.stdout)["config"]["audiences"] == {"cart": ["payment"]}
    bad = runner.invoke(analyze_command, [db, "--audience", "cart"])
    assert bad.exit_code == 2 and "SERVICE=AUD" in bad.output and "Traceback" not in bad.output
