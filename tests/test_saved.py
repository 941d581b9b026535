"""`hoptrace analyze --save`: the analysis kept in the trace file (schema 3), its views, and its reuse by
`hoptrace report` and `hoptrace ui` while it is current. Real SQLite files: copies of sample_traces/."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import traceback
from contextlib import closing
from pathlib import Path

import pandas as pd
import pytest
import sqlite_utils
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hoptrace._errors import TraceFileError
from hoptrace.addons._rows import clean
from hoptrace.analyzer import (
    KINDS,
    SEVERITIES,
    AnalyzerConfig,
    _analysis,
    analysis_for,
    analyze,
    load,
    load_saved,
    render_json,
    save,
)
from hoptrace.analyzer._cli import analyze as analyze_command
from hoptrace.analyzer._render import _jsonable
from hoptrace.analyzer._traces import in_start_order
from hoptrace.db import MIGRATIONS, SCHEMA_VERSION, open_for_writing
from hoptrace.plot._cli import report as report_command

from .test_db import _as_another_user

SAMPLES = Path(__file__).parent.parent / "sample_traces"
LINK_COLUMNS = ["trace", "parent_id", "link", "link_candidates", "link_confidence", "depth", "order"]
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _copy(name: str, folder: Path) -> Path:
    path = folder / name
    shutil.copyfile(SAMPLES / name, path)
    return path


def _same_document(a, b) -> None:
    """Two analyses render the same JSON document (all of it: findings, every hop's tree, sessions, latency)."""
    assert render_json(a) == render_json(b)


@pytest.fixture
def detector_runs(monkeypatch) -> list[int]:
    """Counts the detector passes (each still runs in full): a reused analysis makes none."""
    runs: list[int] = []
    real = _analysis.run_detectors

    def counted(*args, **kwargs):
        runs.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_analysis, "run_detectors", counted)
    return runs


@pytest.mark.parametrize("name", sorted(p.name for p in SAMPLES.glob("*.db")))
def test_a_saved_analysis_reloads_as_the_fresh_one_on_every_sample(tmp_path, name, detector_runs):
    path = _copy(name, tmp_path)
    fresh = analyze(path)
    written = save(path, fresh)
    assert written["analysis_hops"] == len(fresh.hops) and written["findings"] == len(fresh.findings)
    runs = len(detector_runs)
    reused = analysis_for(path)
    assert len(detector_runs) == runs  # the findings came from the file
    _same_document(reused, fresh)
    pd.testing.assert_frame_equal(reused.hops[LINK_COLUMNS], fresh.hops[LINK_COLUMNS])
    def norm(f):
        return f.assign(hop_ids=f["hop_ids"].map(lambda ids: [int(i) for i in ids]), details=f["details"].map(_jsonable))
    pd.testing.assert_frame_equal(norm(reused.findings), norm(fresh.findings))
    with closing(sqlite3.connect(path)) as conn:  # the sample (schema 1) was upgraded in place, still one file
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    _same_document(analyze(path), fresh)  # and an analysis of the upgraded file is the same as before


def test_a_version_2_file_upgrades_when_an_analysis_is_saved(tmp_path):
    path = _copy("checkout-expiry.db", tmp_path)
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:  # schema 2 as the previous hoptrace left it
        MIGRATIONS[0](sqlite_utils.Database(conn))
        conn.execute("PRAGMA user_version = 2")
        before = {
            t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("captures", "hops", "tokens", "hop_tokens")
        }
    assert load_saved(path, load(path)) is None  # nothing saved in a version-2 file
    save(path, analyze(path))
    db = sqlite_utils.Database(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert {t: db[t].count for t in before} == before
    assert db["analysis_hops"].count == before["hops"] and db["findings"].count > 0
    assert {"findings_readable", "finding_hops_readable", "analysis_readable"} <= set(db.view_names())


def test_the_views_read_in_sqlite_utils_with_iso_times_and_subjects(tmp_path):
    path = _copy("checkout-expiry.db", tmp_path)
    result = CliRunner().invoke(analyze_command, [str(path), "--save"])
    assert result.exit_code == 0, result.output
    cli = Path(sys.executable).with_name("sqlite-utils")
    sql = "select * from findings_readable where severity = 'error'"
    done = subprocess.run([str(cli), str(path), sql], capture_output=True, text=True, check=True, timeout=60)
    error = json.loads(done.stdout)  # sqlite-utils' own JSON; the other views through the sqlite3 module

    def rows(sql: str) -> list[dict]:
        with closing(sqlite3.connect(path)) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute(sql)]

    assert [f["kind"] for f in error] == ["expired_mid_flow"] and ISO.match(error[0]["at"])
    late = json.loads(error[0]["hop_ids"])
    assert json.loads(error[0]["evidence"])["late_by_s"] > 0
    hop = rows(f"select * from hops_readable where id = {late[0]}")[0]
    assert hop["path"] == "/introspect" and hop["status"] == 401 and ISO.match(hop["started"])
    assert hop["token_sub"].startswith("user_") and hop["token_remaining_s"] < 0  # presented after its exp
    assert hop["link"] == "token" and hop["parent_id"] is not None
    request = rows(f"select * from hops_readable where id = {hop['request']}")[0]
    assert request["link"] == "root" and request["method"] == "POST" and request["token_remaining_s"] > 0
    per_hop = rows("select * from finding_hops_readable where finding_id = 1")
    assert [h["hop_id"] for h in per_hop] == late and per_hop[0]["request"] == hop["request"]
    assert rows("select current from analysis_readable") == [{"current": 1}]


def _append_hop(path: Path) -> None:
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "INSERT INTO hops (capture_id, flow_id, service, method, path, status, failed, started_at, ended_at, duration_ms)"
            " SELECT capture_id, 'late', service, method, path, 200, 0, max(ended_at) + 1, max(ended_at) + 1.01, 10 FROM hops"
        )


def test_a_stale_saved_analysis_is_not_reused(tmp_path, detector_runs):
    path = _copy("clean.db", tmp_path)
    save(path, analyze(path))
    _append_hop(path)  # recorded after the save
    assert load_saved(path, load(path)) is None
    runs = len(detector_runs)
    got = analysis_for(path)
    assert len(detector_runs) == runs + 1 and len(got.hops) == 77
    _same_document(got, analyze(path))
    assert sqlite_utils.Database(path).execute("SELECT current FROM analysis_readable").fetchone() == (0,)


def test_a_capture_still_recording_is_saved_with_the_bound_it_saw(tmp_path):
    path = _copy("clean.db", tmp_path)
    writer = open_for_writing(path)  # the recorder holds the file (WAL), its capture open
    try:
        writer.execute("UPDATE captures SET ended_at = NULL")
        result = CliRunner().invoke(analyze_command, [str(path), "--save", "-o", str(tmp_path / "out.txt")])
        assert result.exit_code == 0 and "still open: saved for the hops recorded so far" in result.output
        assert load_saved(path, load(path)) is not None
        writer.execute("UPDATE captures SET ended_at = started_at + 60")  # it ends: no longer what was saved
        assert load_saved(path, load(path)) is None
    finally:
        writer.close()


def test_options_that_change_findings_are_part_of_what_is_current(tmp_path):
    path = _copy("checkout-expiry.db", tmp_path)
    tight = AnalyzerConfig(near_expiry_s=0.5)
    save(path, analyze(path, config=tight))
    assert load_saved(path, load(path), AnalyzerConfig()) is None  # asked for the defaults: not this one
    assert load_saved(path, load(path), AnalyzerConfig(near_expiry_s=0.5, worst=2)) is not None  # worst draws, finds nothing
    taken = analysis_for(path)  # no options asked: the saved ones, said in a note
    _same_document(analysis_for(path, tight), analyze(path, config=tight))
    assert taken.config.near_expiry_s == 0.5 and any("near_expiry_s=0.5" in n for n in taken.notes)
    assert (taken.findings["kind"] == "near_expiry").sum() < (analyze(path).findings["kind"] == "near_expiry").sum()


def _attempt(path: Path) -> str:
    result = CliRunner().invoke(analyze_command, [str(path), "--save", "-o", "/dev/null"])
    return json.dumps(
        [result.exit_code, result.output, "".join(traceback.format_exception(result.exception)) if result.exception else ""]
    )


@pytest.fixture
def shared_folder():
    """A folder another user can enter (pytest's tmp_path is private to its owner)."""
    with tempfile.TemporaryDirectory(prefix="hoptrace-save-") as name:
        Path(name).chmod(0o755)
        yield Path(name)
        Path(name).chmod(0o755)


def test_save_refuses_what_it_cannot_do_in_one_line(shared_folder):
    path = _copy("clean.db", shared_folder)
    for extra in (["--trace", "1"], ["--since", "0"]):
        result = CliRunner().invoke(analyze_command, [str(path), "--save", *extra])
        assert result.exit_code == 2 and "cannot be combined" in result.output and result.output.count("\n") == 1
    shared_folder.chmod(0o700)  # another user cannot even reach it
    code, output, _ = json.loads(_as_another_user(lambda: _attempt(path)))
    assert code == 2 and output.count("\n") == 1 and "cannot reach the file: Permission denied" in output
    shared_folder.chmod(0o755)
    path.chmod(0o444)  # as another user (root writes any file): it reads the file, and cannot write it
    code, output, exc = json.loads(_as_another_user(lambda: _attempt(path)))
    assert code == 2, (output, exc)
    assert output.count("\n") == 1 and "cannot save the analysis" in output and "Traceback" not in output
    assert load_saved(path, load(path)) is None  # nothing half-written


def _report(path: Path, out: Path) -> str:
    result = CliRunner().invoke(report_command, [str(path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return re.sub(r"Generated [^<]*", "", out.read_text(encoding="utf-8"))  # the one line that names the time


def test_the_report_is_the_same_with_a_saved_analysis(tmp_path, detector_runs):
    path = _copy("checkout-expiry.db", tmp_path)
    save(path, analyze(path))
    _append_hop(path)  # stale: the report analyses
    before = len(detector_runs)
    stale = _report(path, tmp_path / "stale.html")
    assert len(detector_runs) == before + 1
    save(path, analyze(path))
    before = len(detector_runs)
    reused = _report(path, tmp_path / "reused.html")
    assert len(detector_runs) == before  # current: no detector ran
    assert reused == stale and "expired_mid_flow" in reused


def test_the_web_view_shows_the_same_with_a_saved_analysis(tmp_path, detector_runs):
    from hoptrace.ui._data import Data
    from hoptrace.ui._query import RequestQuery

    def everything(path: Path) -> str:
        data = Data([path])
        data.refresh()
        page = data.request_page(RequestQuery(limit=500))
        views = [page, data.facets(), data.sessions(), data.latency(), data.graph()]
        views += [data.request(0, int(r["trace"])) for r in page["items"]]
        return json.dumps(views, default=str, sort_keys=True)

    path = _copy("shared-client.db", tmp_path)
    fresh = everything(path)
    save(path, analyze(path))
    before = len(detector_runs)
    assert everything(path) == fresh
    assert len(detector_runs) == before


# -- hostile values -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30) | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
names = st.none() | st.text(max_size=40)  # any character but lone surrogates: control characters, NUL, RTL marks


@pytest.fixture(scope="module")
def hostile_base(tmp_path_factory):
    path = _copy("clean.db", tmp_path_factory.mktemp("hostile"))
    return path, analyze(path), load(path)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_hostile_finding_values_round_trip(hostile_base, data):
    path, analysis, tables = hostile_base
    ids = sorted(analysis.hops.index.tolist())
    rows = data.draw(st.lists(st.fixed_dictionaries({
        "kind": st.sampled_from(KINDS), "severity": st.sampled_from(SEVERITIES), "trace": st.none() | st.sampled_from(ids),
        "service": names, "caller": names, "callee": names, "endpoint": names, "hop_ids": st.lists(st.sampled_from(ids), max_size=5),
        "message": st.text(), "details": st.dictionaries(st.text(max_size=10), json_values, max_size=5) | st.none(),
        "at": st.floats() | st.none(),
    }), max_size=6))  # fmt: skip
    findings = pd.DataFrame(rows, columns=list(analysis.findings.columns)).astype({"trace": "Int64", "at": "float64"})
    hostile = _analysis.Analysis(**{**analysis.__dict__, "findings": findings})
    save(path, hostile)
    saved = load_saved(path, tables)
    assert saved is not None
    got = json.loads(render_json(_analysis.Analysis(**{**analysis.__dict__, "findings": saved.findings})))["findings"]
    assert got == json.loads(render_json(hostile))["findings"]
    assert [m for m in saved.findings["message"]] == [r["message"] for r in rows]  # NUL and control characters kept


def test_lone_surrogates_are_saved_as_the_recorder_stores_them(tmp_path):
    path = _copy("clean.db", tmp_path)
    analysis = analyze(path)
    findings = analysis.findings.astype({"message": object})  # a str column cannot hold lone surrogates
    findings.loc[0, "message"] = "bad \udcff byte and \ud800 half"
    save(path, _analysis.Analysis(**{**analysis.__dict__, "findings": findings}))
    saved = load_saved(path, load(path))
    assert saved.findings.loc[0, "message"] == clean("bad \udcff byte and \ud800 half") == "bad \\xff byte and \ufffd half"


forged_values = st.one_of(
    st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(), st.text(max_size=20), st.binary(max_size=8)
)
forged_cells = st.sampled_from([
    ("analysis_hops", "parent_id"), ("analysis_hops", "link"), ("analysis_hops", "link_confidence"),
    ("analysis_hops", "link_candidates"), ("analysis_hops", "hop_id"), ("findings", "kind"), ("findings", "severity"),
    ("findings", "request"), ("findings", "evidence"), ("findings", "message"), ("findings", "at"),
    ("finding_hops", "hop_id"), ("analysis", "config"), ("analysis", "hops"),
])  # fmt: skip


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    path = _copy("checkout-expiry.db", tmp_path_factory.mktemp("forged"))
    save(path, analyze(path))
    return path, load(path)  # the recorded tables: forging the saved ones leaves them as they are


def _forge(source: Path, path: Path, table: str, column: str, value, row: int) -> None:
    shutil.copyfile(source, path)
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA legacy_alter_table = ON")  # the views name the table: leave them be
        # The tables' own constraints (NOT NULL, keys) stop some values; a forged file need not have them.
        conn.execute(f"CREATE TABLE forged AS SELECT * FROM {table}")
        conn.execute(f"DROP TABLE {table}")
        conn.execute(f"ALTER TABLE forged RENAME TO {table}")
        count = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        conn.execute(f"UPDATE {table} SET {column} = ? WHERE rowid = (SELECT min(rowid) + ? FROM {table})", (value, row % count))
        conn.commit()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cell=forged_cells, value=forged_values, row=st.integers(min_value=0, max_value=80))
def test_a_forged_saved_analysis_is_read_as_untrusted(saved_base, tmp_path, cell, value, row):
    """A file is untrusted, its saved analysis too: any value in any saved cell is either taken (the links still
    make trees of the file's hops) or set aside with a note, never a traceback."""
    source, tables = saved_base
    path = tmp_path / "forged.db"
    _forge(source, path, *cell, value, row)
    mine = dataclasses.replace(tables, notes=[])
    saved = load_saved(path, mine)
    if saved is None:
        assert cell[0] == "analysis" or any("does not add up" in n for n in mine.notes)
        return
    hops = saved.relink(in_start_order(tables.hops))
    assert hops["trace"].isin(hops.index).all() and (hops.loc[hops["trace"].to_numpy(), "depth"] == 0).all()
    assert saved.findings["kind"].isin(KINDS).all() and saved.findings["message"].map(type).eq(str).all()


def test_a_forged_cycle_of_parents_is_set_aside_and_the_file_analysed(saved_base, tmp_path):
    source, _ = saved_base
    path = tmp_path / "forged.db"
    shutil.copyfile(source, path)
    with closing(sqlite3.connect(path)) as conn, conn:  # the failing checkout's root made a child of its grandchild
        conn.execute("UPDATE analysis_hops SET parent_id = 74, link = 'token' WHERE hop_id = 76")
    got = analysis_for(path)
    assert any("a parent that is not an earlier hop" in n for n in got.notes)
    fresh = analyze(path)
    pd.testing.assert_frame_equal(got.hops[LINK_COLUMNS], fresh.hops[LINK_COLUMNS])
    assert json.loads(render_json(got))["findings"] == json.loads(render_json(fresh))["findings"]


def test_a_save_that_stops_half_way_leaves_no_saved_analysis_and_never_holds_the_lock_for_long(tmp_path, monkeypatch):
    """The rows go in small transactions, the `analysis` row last: a writer gets the lock between
    them, and a save cut before its last step leaves nothing a reader would reuse."""
    import hoptrace.analyzer._saved as saved_module

    path = _copy("service-faults.db", tmp_path)
    save(path, analyze(path))
    assert load_saved(path, load(path)) is not None
    monkeypatch.setattr(saved_module, "CHUNK_ROWS", 7)
    writes_between = []

    def cut(db, *args):  # every row is in by now; the recorder's own write must have got through meanwhile
        with closing(sqlite3.connect(path, timeout=0)) as other:
            other.execute("BEGIN IMMEDIATE")  # fails at once ("database is locked") if a save held the lock
            other.execute("ROLLBACK")
            writes_between.append(True)
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(saved_module, "_write_analysis_row", cut)
    with pytest.raises(TraceFileError, match="cannot save the analysis"):
        save(path, analyze(path))
    assert writes_between == [True]
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM analysis").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM analysis_hops").fetchone()[0] > 7  # written in several chunks
    assert load_saved(path, load(path)) is None
