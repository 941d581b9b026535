"""`hoptrace analyze` through click: formats, --fail-on exit codes, and every bad-input path."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hoptrace.analyzer import DETECTORS, render_json
from hoptrace.analyzer._cli import analyze
from hoptrace.analyzer._render import _HOP_FIELDS, TOP_KEYS

from .analyzer_fixtures import T0, Builder, synthetic_stack
from .test_analyzer_load import corrupt_db


@pytest.fixture(scope="module")
def scenario_db(tmp_path_factory):
    """Three users; one token expires while payment works on its checkout."""
    b = synthetic_stack(users=3, workflows=1, seed=5, ttl=3600)
    short = b.token(sub="eve", exp=1.0)
    root = b.hop("gateway", "POST /checkout", 0.0, 2.0, presented=short, status=401, trace_id="eve-trace")
    b.hop("auth", "GET /verify", 0.01, 0.02, presented=short, parent=root)
    pay = b.hop("payment", "POST /checkout", 0.03, 1.9, presented=short, parent=root, status=401)
    b.hop("auth", "POST /introspect", 1.5, 1.6, validated=short, parent=pay, status=401)
    b.hop("products", "GET /a\x1b[31mred\x07", 3.0, 3.1)  # escape sequences in a recorded path
    return b.write(tmp_path_factory.mktemp("cli") / "traces.db"), root


def run(*args):
    return CliRunner().invoke(analyze, [str(a) for a in args], catch_exceptions=False)


def test_kinds_come_from_the_detectors():
    kinds = tuple(d.kind for d in DETECTORS)
    help_text = " ".join(CliRunner().invoke(analyze, ["--help"]).output.split())
    assert ", ".join(kinds) in help_text
    bad = CliRunner().invoke(analyze, ["x.db", "--fail-on", "nope"])
    assert bad.exit_code == 2 and ", ".join(kinds) in " ".join(bad.output.split())


def test_text_report(scenario_db):
    db, root = scenario_db
    result = run(db)
    assert result.exit_code == 0, result.output
    out = result.stdout
    for section in ("Findings:", "Latency by service", "Calls between services", "Worst requests"):
        assert section in out
    assert "expired_mid_flow" in out and f"request {root}:" in out
    assert "token expired 0.50 s ago" in out and "└─ auth POST /introspect" in out
    assert "\x1b" not in out and "\x07" not in out


def test_json_report(scenario_db):
    db, root = scenario_db
    result = run(db, "--format", "json")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert (doc["format"], doc["version"]) == ("hoptrace-analysis", 1)
    assert list(doc) == list(TOP_KEYS)
    kinds = {f["kind"] for f in doc["findings"]}
    assert {"expired_mid_flow", "duplicate_validation", "token_reuse"} <= kinds
    trace = next(t for t in doc["traces"] if t["trace"] == root)
    assert trace["root"] == root and trace["hops"][0]["parent"] is None and trace["hops"][0]["link"] == "root"
    assert all(h["parent"] is not None and h["link"] in ("token", "header") for h in trace["hops"][1:])
    assert trace["critical_path"][0] == root
    assert doc["summary"]["requests"] == len(doc["traces"])
    assert {"services", "endpoints", "edges"} == set(doc["latency"])


def _documented(doc: str, after: str, until: str) -> list[str]:
    """The ``key`` names in ``doc`` between the phrases ``after`` and ``until``."""
    text = doc[doc.index(after) + len(after) :]
    return re.findall(r"``(\w+)``", text[: text.index(until)])


def test_json_keys_are_exactly_the_documented_ones(scenario_db):
    """render_json's docstring is the one place the JSON's keys are documented (the README links it)."""
    db, root = scenario_db
    doc = json.loads(run(db, "--format", "json").stdout)
    documented = render_json.__doc__
    top = re.findall(r"^    - ``(\w+)``(?:, ``(\w+)``)?", documented, re.M)
    assert [k for pair in top for k in pair if k] == list(doc) == list(TOP_KEYS)
    trace = next(t for t in doc["traces"] if t["trace"] == root)
    assert _documented(documented, "one per request, in time order:", "and ``hops``") == list(trace)[:-1]
    hop_keys = _documented(documented, "``hops``, depth first, each:", "Numbers that are unknown")
    assert all(list(h) == hop_keys for t in doc["traces"] for h in t["hops"])
    assert hop_keys == [key for key, _ in _HOP_FIELDS]
    assert {"method", "error", "ended_at", "subject", "token_exp"} <= set(hop_keys)
    # The README lists the same per-hop keys.
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert all(f"`{key}`" in readme for key in hop_keys)


def test_markdown_report(scenario_db):
    db, _ = scenario_db
    result = run(db, "--format", "markdown")
    assert result.exit_code == 0
    assert result.stdout.startswith("# hoptrace analysis of") and "| Severity | Kind |" in result.stdout
    assert "\x1b" not in result.stdout


def test_fail_on(scenario_db, tmp_path):
    db, _ = scenario_db
    result = run(db, "--fail-on", "token_crossover,expired_mid_flow", "--format", "json", "--output", tmp_path / "r.json")
    assert result.exit_code == 1
    assert "failing on 1 expired_mid_flow" in result.stderr
    assert json.loads((tmp_path / "r.json").read_text())["findings"]
    assert run(db, "--fail-on", "token_crossover,retry_storm").exit_code == 0
    bad = run(db, "--fail-on", "expired,slow_hop")
    assert bad.exit_code == 2 and "unknown finding kind 'expired'" in bad.stderr


def test_trace_selection(scenario_db):
    db, root = scenario_db
    by_id = json.loads(run(db, "--trace", root, "--format", "json").stdout)
    assert [t["trace"] for t in by_id["traces"]] == [root]
    assert {f["kind"] for f in by_id["findings"]} >= {"expired_mid_flow"}
    by_header = json.loads(run(db, "--trace", "eve-trace", "--format", "json").stdout)
    assert [t["trace"] for t in by_header["traces"]] == [root]
    by_hop = json.loads(run(db, "--trace", root + 3, "--format", "json").stdout)
    assert [t["trace"] for t in by_hop["traces"]] == [root]


def test_since_until(scenario_db):
    db, _ = scenario_db
    out = run(db, "--since", T0 + 2.5, "--until", "2023-11-14T22:13:23+00:00", "--format", "json").stdout
    assert "\x1b" not in out  # JSON escapes control characters: \u001b
    assert [t["endpoint"] for t in json.loads(out)["traces"]] == ["GET /a\x1b[31mred\x07"]


def test_thresholds_from_options(scenario_db):
    db, _ = scenario_db
    doc = json.loads(run(db, "--format", "json", "--near-expiry", 7200, "--skew-threshold", 5, "--worst", 0).stdout)
    assert doc["config"]["near_expiry_s"] == 7200 and doc["config"]["worst"] == 0
    assert any(f["kind"] == "near_expiry" for f in doc["findings"])
    assert "Worst requests" not in run(db, "--worst", 0).stdout


def bad_inputs(tmp_path):
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 100)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    (tmp_path / "no-dbs").mkdir()
    newer = Builder().write(tmp_path / "newer.db")
    with sqlite3.connect(newer) as conn:
        conn.execute("PRAGMA user_version = 7")
    return {
        "empty file": ([empty], "not a hoptrace trace database"),
        "text file": ([text], "not a readable SQLite database"),
        "other tables": ([other], "missing tables"),
        "newer schema": ([newer], "newer than this hoptrace"),
        "missing file": ([tmp_path / "nope.db"], "no such file"),
        "corrupt file": ([corrupt_db(tmp_path)], ""),
        # A folder stands for its *.db files (the shards of one capture): one without any is refused.
        "directory": ([tmp_path / "no-dbs"], "a folder with no trace file"),
    }


@pytest.mark.parametrize(
    "case", ["empty file", "text file", "other tables", "newer schema", "missing file", "corrupt file", "directory"]
)
def test_bad_files_exit_2_with_one_line(tmp_path, case):
    args, message = bad_inputs(tmp_path)[case]
    result = CliRunner().invoke(analyze, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # no traceback
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trace", "999999"], "no request '999999'"),
        (["--trace", "no-such-trace"], "no request 'no-such-trace'"),
        (["--since", "last tuesday"], "cannot read 'last tuesday' as a time"),
        (["--until", "2024-13-45"], "cannot read"),
        (["--since", "1700000100", "--until", "1700000000"], "after until"),
        (["--format", "xml"], "'xml' is not one of"),
        (["--validation-path", "("], "not a regular expression"),
        (["--near-expiry", "-5"], "near_expiry_s must be"),
    ],
)
def test_bad_options_exit_2_with_one_line(scenario_db, args, message):
    db, _ = scenario_db
    result = CliRunner().invoke(analyze, [str(db), *args])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_help_has_an_example():
    result = CliRunner().invoke(analyze, ["--help"])
    assert result.exit_code == 0 and "Example:" in result.output and "--fail-on" in result.output


def test_a_command_imports_only_its_own_module():
    """`hoptrace analyze` runs without importing what `proxy` and `stack` drive (mitmproxy, aiohttp:
    0.6 s of a small analysis's start), and `--help` still lists every command."""
    sample = Path(__file__).resolve().parents[1] / "sample_traces" / "checkout-expiry.db"
    code = (
        "import sys; from click.testing import CliRunner; from hoptrace.cli import cli, COMMANDS\n"
        f"ran = CliRunner().invoke(cli, ['analyze', {str(sample)!r}])\n"
        "print(ran.exit_code, [m for m in ('mitmproxy', 'aiohttp', 'hoptrace.proxy._cli') if m in sys.modules])\n"
        "listed = CliRunner().invoke(cli, ['--help']).output\n"
        "print(all(f'  {name} ' in listed for name in COMMANDS), 'mitmproxy' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.stdout.splitlines() == ["0 []", "True True"], done.stdout + done.stderr
