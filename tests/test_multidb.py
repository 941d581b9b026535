"""Several trace files, one analysis: a sample trace split in two by hop id analyses as the whole
file; a real `hoptrace proxy --workers 2` capture analyses as a single-worker capture of the same
scenario; hostile paths are one line each."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hoptrace.analyzer import analyze, render_json
from hoptrace.cli import cli

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_traces"


def split_by_hop(db: Path, into: Path, first: set[int]) -> tuple[Path, Path]:
    """``db`` as two files: the hops in ``first`` (and their sightings) in one, the others in the
    other; each keeps every capture row and the token rows its hops saw (a token both halves saw is in both)."""
    halves = (into / "a.db", into / "b.db")
    for n, half in enumerate(halves):
        shutil.copyfile(db, half)
        conn = sqlite3.connect(half)
        try:
            conn.execute("CREATE TEMP TABLE kept (id INTEGER PRIMARY KEY)")
            ids = [row[0] for row in conn.execute("SELECT id FROM hops")]
            conn.executemany("INSERT INTO kept VALUES (?)", [(i,) for i in ids if (i in first) == (n == 0)])
            conn.execute("DELETE FROM hops WHERE id NOT IN (SELECT id FROM kept)")
            conn.execute("DELETE FROM hop_tokens WHERE hop_id NOT IN (SELECT id FROM kept)")
            conn.execute("DELETE FROM tokens WHERE fingerprint NOT IN (SELECT fingerprint FROM hop_tokens)")
            conn.commit()
        finally:
            conn.close()
    return halves


def _in_file_ids(report: dict, analysis) -> dict:
    """A JSON report of a joined analysis with each hop and request id back to its id in its file."""
    local = dict(zip(analysis.hops.index.tolist(), analysis.hops["file_hop"].tolist(), strict=True))

    def back(value, key=""):
        """Ids under a key naming a hop or a request (``trace``, ``hop_ids``, details' ``traces``...)."""
        if isinstance(value, dict):
            return {k: back(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [back(v, key) for v in value]
        named = key in ("trace", "traces", "hop_id", "hop_ids")
        return local[value] if named and isinstance(value, int) and not isinstance(value, bool) and value in local else value

    for finding in report["findings"]:
        del finding["files"]  # what only a joined analysis says: checked on its own below
    report["findings"] = back(report["findings"])
    return report


def _whole(name: str) -> dict:
    return json.loads((SAMPLES / f"{name}.json").read_text(encoding="utf-8"))


NAMES = sorted(p.stem for p in SAMPLES.glob("*.db"))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(NAMES), point=st.floats(0, 1), interleave=st.sampled_from([0, 2, 3]))
@example(name="propagated", point=0.984375, interleave=0)  # the second file's hops all got their trace id in the response
def test_a_sample_split_by_hop_id_analyses_as_the_whole_file(tmp_path_factory, name, point, interleave):
    db = SAMPLES / f"{name}.db"
    ids = sorted(row[0] for row in sqlite3.connect(db).execute("SELECT id FROM hops"))
    cut = ids[int(point * (len(ids) - 1))]
    # A cut at one id, or every 2nd/3rd hop in one file: requests and tokens land in both halves.
    first = {i for i in ids if (i % interleave == 0 if interleave else i <= cut)}
    halves = split_by_hop(db, tmp_path_factory.mktemp("split"), first)
    shared = set.intersection(*({r[0] for r in sqlite3.connect(h).execute("SELECT fingerprint FROM tokens")} for h in halves))

    joined = analyze(list(halves))

    whole = _whole(name)
    report = _in_file_ids(json.loads(render_json(joined)), joined)
    assert report["findings"] == whole["findings"]
    assert report["summary"] | {"captures": whole["summary"]["captures"]} == whole["summary"]
    assert len(joined.captures) == whole["summary"]["captures"]
    assert joined.notes[0].startswith("joined 2 trace files")
    # The joined ids say where each hop came from: file k of K's hop i is i * K + k.
    hops = joined.hops
    second = (hops["file"] == str(halves[1])).to_numpy()
    assert (hops.index.to_numpy() == hops["file_hop"].to_numpy() * 2 + second).all()
    if 0 < len(first) < len(ids):
        assert shared or not interleave, "an interleaved split puts some token in both files"


# -- a real --workers 2 capture against a single-worker one -------------------------------------


def _finding_counts(analysis) -> Counter:
    return Counter(zip(analysis.findings["kind"], analysis.findings["service"], analysis.findings["endpoint"], strict=True))


@pytest.mark.e2e
@pytest.mark.usefixtures("heavy")
def test_a_two_worker_capture_analyses_as_a_single_worker_one(tmp_path):
    """The same scenario of the sample stack through `hoptrace proxy --workers 2` and through one process."""
    import asyncio

    from hoptrace.stack.scenarios import SCENARIOS, record

    # The clean scenario: its findings (token reuse, double validation across services) do not hang on
    # timing, where checkout-expiry's margin of 0.4 s before exp can slip on a loaded machine.
    scenario = SCENARIOS["clean"]
    (tmp_path / "one").mkdir()
    (tmp_path / "shards").mkdir()
    single = asyncio.run(record(tmp_path / "one" / "traces.db", scenario.stack_config(), scenario.drive))
    sharded = asyncio.run(
        record(tmp_path / "shards" / "traces.db", scenario.stack_config(), scenario.drive, proxy_args=("--workers", "2"))
    )
    assert single.proxy_exit == 0 and sharded.proxy_exit == 0, sharded.proxy_output
    shards = sorted((tmp_path / "shards").glob("traces.w*.db"))
    assert [s.name for s in shards] == ["traces.w1.db", "traces.w2.db"]
    # Both workers recorded hops: the analysis below really joins two files.
    assert all(sqlite3.connect(s).execute("SELECT count(*) FROM hops").fetchone()[0] for s in shards)

    expected = analyze(single.db)
    from_folder = analyze([tmp_path / "shards" / s.name for s in shards])
    assert len(from_folder.hops) == len(expected.hops)
    assert _finding_counts(from_folder) == _finding_counts(expected), from_folder.findings[["kind", "service", "endpoint"]]
    assert len(from_folder.sessions) == len(expected.sessions)
    assert from_folder.notes[0].startswith("joined 2 trace files") and "--workers capture" in from_folder.notes[0]
    assert len(from_folder.captures) == 1

    # The CLI from the folder and from the files: the same findings, as JSON.
    by_folder = CliRunner().invoke(cli, ["analyze", str(tmp_path / "shards"), "--format", "json"])
    by_files = CliRunner().invoke(cli, ["analyze", *map(str, shards), "--format", "json"])
    assert by_folder.exit_code == by_files.exit_code == 0, by_folder.output
    assert json.loads(by_folder.output)["findings"] == json.loads(by_files.output)["findings"]
    kinds = Counter(f["kind"] for f in json.loads(by_folder.output)["findings"])
    assert kinds == Counter(expected.findings["kind"])


# -- hostile paths: one line each, exit 2 ---------------------------------------------------------


def _one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    return result.output


@pytest.mark.parametrize(
    "command", [["analyze"], ["report", "-o", "r.html"], ["plot", "--latency", "-o", "p.svg"], ["export", "--har", "x.har"]]
)
def test_hostile_paths_are_one_line_each(command, tmp_path):
    sample = SAMPLES / "clean.db"
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "notes.txt").write_text("not a trace file")
    assert "no such file" in _one_line_error([command[0], str(tmp_path / "missing.db"), *command[1:]])
    assert f"{empty}: a folder with no trace file" in _one_line_error([command[0], str(empty), *command[1:]])
    assert "given twice" in _one_line_error(
        [command[0], str(sample), str(SAMPLES / ".." / "sample_traces" / "clean.db"), *command[1:]]
    )
    out = _one_line_error([command[0], str(sample), str(tmp_path / "notes.txt"), *command[1:]])
    assert str(tmp_path / "notes.txt") in out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    content=st.binary(max_size=300),
    name=st.text(st.characters(categories=("L", "N", "P"), exclude_characters="/"), min_size=1, max_size=12),
)
def test_any_bad_file_among_good_ones_is_named_in_one_line(tmp_path_factory, content, name):
    folder = tmp_path_factory.mktemp("hostile")
    shutil.copyfile(SAMPLES / "clean.db", folder / "a.db")
    bad = folder / f"{name}.db"
    try:
        bad.write_bytes(content)
    except OSError:  # a name the file system refuses is not this test's subject
        return
    result = CliRunner().invoke(cli, ["analyze", str(folder)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert str(bad) in result.output and len(result.output.strip().splitlines()) == 1


def test_a_folder_is_its_db_files_in_name_order_with_numbers_by_value(tmp_path):
    from hoptrace._options import _expand

    for name in ("t.w10.db", "t.w2.db", "t.w1.db", "notes.txt", "t.w1.db-wal"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.db").mkdir()
    assert [p.name for p in _expand(tmp_path)] == ["t.w1.db", "t.w2.db", "t.w10.db"]


def test_an_option_that_writes_into_its_file_takes_one(tmp_path):
    import click

    from hoptrace._options import one_trace_file

    assert one_trace_file((tmp_path / "a.db",), "--save") == tmp_path / "a.db"
    with pytest.raises(click.ClickException, match=r"--save takes one trace file; 2 were given"):
        one_trace_file((tmp_path / "a.db", tmp_path / "b.db"), "--save")


def test_the_web_view_shows_several_files_as_one_joined_analysis(tmp_path):
    from hoptrace.ui._data import Data
    from hoptrace.ui._preview import Preview

    db = SAMPLES / "checkout-expiry.db"
    ids = [row[0] for row in sqlite3.connect(db).execute("SELECT id FROM hops")]
    halves = split_by_hop(db, tmp_path, {i for i in ids if i % 2})
    joined, whole = Data(list(halves)), Data([db])
    assert joined.refresh() and whole.refresh()
    (status,), (alone,) = joined.status()["dbs"], whole.status()["dbs"]
    assert status["path"] == f"{halves[0]}, {halves[1]}"
    assert (status["hops"], status["requests"], status["findings"]) == (alone["hops"], alone["requests"], alone["findings"])
    # A hop's details come from the file it was recorded in, by its id there.
    hops = joined.sources[0].analysis.hops
    for hop_id, in_file in zip(hops.index[:30], hops["file_hop"][:30], strict=True):
        shown, expected = joined.hop(0, int(hop_id)), whole.hop(0, int(in_file))
        assert (shown["started_at"], shown["request_headers"], shown["tokens"]) == (
            expected["started_at"],
            expected["request_headers"],
            expected["tokens"],
        )
    # Before the analysis, the SQL preview lists the joined requests under the joined ids.
    listed = {row["trace"] for _, row in Preview(list(halves)).rows}
    assert listed and listed <= set(hops.index) and {db_ for db_, _ in Preview(list(halves)).rows} == {0}


def test_a_live_view_of_growing_shards_keeps_up_with_each_file(tmp_path):
    from hoptrace.ui._data import Data
    from hoptrace.ui._query import RequestQuery

    db = SAMPLES / "checkout-expiry.db"
    ids = sorted(row[0] for row in sqlite3.connect(db).execute("SELECT id FROM hops"))
    (tmp_path / "full").mkdir()
    full = split_by_hop(db, tmp_path / "full", {i for i in ids if i % 2})
    growing = [tmp_path / "a.db", tmp_path / "b.db"]
    cut = ids[len(ids) * 2 // 3]
    for source, shard in zip(full, growing, strict=True):  # each shard as it was mid-capture
        shutil.copyfile(source, shard)
        with sqlite3.connect(shard) as conn:
            conn.execute("DELETE FROM hop_tokens WHERE hop_id > ?", (cut,))
            conn.execute("DELETE FROM hops WHERE id > ?", (cut,))
    live = Data(growing, lookback_s=1.0)
    assert live.refresh()
    early = live.request_page(RequestQuery(limit=500))["total"]
    for source, shard in zip(full, growing, strict=True):
        with sqlite3.connect(shard) as conn:
            conn.execute("ATTACH ? AS full", (f"file:{source}?mode=ro",))
            conn.execute("INSERT INTO hops SELECT * FROM full.hops WHERE id > ?", (cut,))
            conn.execute("INSERT INTO hop_tokens SELECT * FROM full.hop_tokens WHERE hop_id > ?", (cut,))
            conn.execute("INSERT OR IGNORE INTO tokens SELECT * FROM full.tokens")
    assert live.refresh()
    whole = Data(list(full))
    whole.refresh()
    merged, fresh = (d.request_page(RequestQuery(limit=500))["items"] for d in (live, whole))
    assert early < len(merged)
    def key(r):
        return (r["trace"], r["status"], r["hops"], r["severity"])
    assert sorted(map(key, merged)) == sorted(map(key, fresh))
    # A live pass keeps the tail pending; the whole capture's view is the merge.
    settled = live.settled(live.sources[0])
    assert Counter(settled.findings["kind"]) == Counter(whole.sources[0].analysis.findings["kind"])
    newest = int(settled.hops.index.max())
    assert live.hop(0, newest)["started_at"] == whole.hop(0, newest)["started_at"]


def test_export_of_several_files_is_one_export_of_the_joined_analysis(tmp_path):
    import pyarrow.parquet as pq

    db = SAMPLES / "shared-client.db"
    ids = [row[0] for row in sqlite3.connect(db).execute("SELECT id FROM hops")]
    halves = split_by_hop(db, tmp_path, {i for i in ids if i % 3 == 0})
    out = {}
    for name, files in (("whole", [db]), ("joined", list(halves))):
        folder = tmp_path / name
        result = CliRunner().invoke(cli, ["export", *map(str, files), "--har", str(folder) + ".har",
                                          "--otlp", str(folder) + ".jsonl", "--parquet", str(folder)])  # fmt: skip
        assert result.exit_code == 0, result.output
        har = json.loads(Path(str(folder) + ".har").read_text())["log"]["entries"]
        lines = [json.loads(line) for line in Path(str(folder) + ".jsonl").read_text().splitlines()]
        spans = [[s for r in line["resourceSpans"] for ss in r["scopeSpans"] for s in ss["spans"]] for line in lines]
        out[name] = (
            har,
            spans,
            {t: pq.read_table(folder / f"{t}.parquet") for t in ("hops", "tokens", "hop_tokens", "findings")},
        )
    (har, spans, tables), (whole_har, whole_spans, whole_tables) = out["joined"], out["whole"]
    # One HAR of the joined analysis: every hop once, in start order, each with its request and findings.
    def entry(e):
        return (e["startedDateTime"], e["request"]["url"], e["response"]["status"], len(e["_hoptrace"]["findings"]))
    assert [entry(e) for e in har] == [entry(e) for e in whole_har]
    assert len({e["_hoptrace"]["hop_id"] for e in har}) == len(har) == len(ids)
    # One OTLP file: every hop a span, every parent in its request's line.
    assert sum(map(len, spans)) == sum(map(len, whole_spans)) == len(ids)
    for line in spans:
        assert {s["parentSpanId"] for s in line if s.get("parentSpanId")} <= {s["spanId"] for s in line}
    # One Parquet folder: each table's rows once (a token both files saw is one row), with the file of each row.
    assert {t: tables[t].num_rows for t in tables} == {t: whole_tables[t].num_rows for t in whole_tables}
    assert set(tables["hops"].column("file").to_pylist()) == {str(h) for h in halves}
    assert len(set(tables["hops"].column("id").to_pylist())) == len(ids)
    assert set(tables["hop_tokens"].column("hop_id").to_pylist()) <= set(tables["hops"].column("id").to_pylist())
    # The joined capture ids: halves of one capture are one capture.
    assert set(tables["hops"].column("capture_id").to_pylist()) == set(tables["tokens"].column("capture_id").to_pylist()) == {2}


def test_json_and_report_name_the_file_each_hop_came_from(tmp_path):
    db = SAMPLES / "checkout-expiry.db"
    ids = [row[0] for row in sqlite3.connect(db).execute("SELECT id FROM hops")]
    halves = split_by_hop(db, tmp_path, {i for i in ids if i % 2})
    doc = json.loads(render_json(analyze(list(halves))))
    for finding in doc["findings"]:
        assert [f[0] for f in finding["files"]] == [str(halves[i % 2]) for i in finding["hop_ids"]]
        assert [f[1] for f in finding["files"]] == [i // 2 for i in finding["hop_ids"]]
    hop = doc["traces"][0]["hops"][0]
    assert hop["file"] == str(halves[hop["id"] % 2]) and hop["file_hop"] == hop["id"] // 2
    result = CliRunner().invoke(cli, ["report", *map(str, halves), "-o", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "r.html").read_text()
    assert "recorded in" in html and f"{halves[1]}, hop " in html
    assert "Headers and timings: not available" not in html, "each hop's details are read from its own file"


def test_files_of_different_captures_are_noted_and_analysed_side_by_side():
    files = [SAMPLES / "clean.db", SAMPLES / "checkout-expiry.db"]
    joined, alone = analyze(files), [analyze(f) for f in files]
    assert (
        "2 different captures" in joined.notes[0] and "capture 1 of clean.db; capture 1 of checkout-expiry.db" in joined.notes[0]
    )
    assert len(joined.captures) == 2
    # Recorded at different times: nothing links across them, so the findings are each file's.
    assert _finding_counts(joined) == _finding_counts(alone[0]) + _finding_counts(alone[1])
    assert len(joined.hops) == sum(len(a.hops) for a in alone)


def test_a_capture_that_did_not_end_cleanly_is_named_with_its_file(tmp_path):
    db = SAMPLES / "clean.db"
    ids = [row[0] for row in sqlite3.connect(db).execute("SELECT id FROM hops")]
    halves = split_by_hop(db, tmp_path, {i for i in ids if i % 2})
    with sqlite3.connect(halves[1]) as conn:
        conn.execute("UPDATE captures SET ended_at = NULL")
    notes = analyze(list(halves)).notes
    assert [n for n in notes if "did not end cleanly" in n] == [
        n for n in notes if n.startswith(f"{halves[1]}: capture 1 did not end cleanly")
    ]
    assert any("did not end cleanly" in n for n in notes)


@pytest.mark.parametrize("name", ["checkout-expiry", "propagated"])
def test_captures_of_one_stack_on_two_hosts_join_by_time(tmp_path, name):
    """One proxy per host: the gateway's hops in one file, the other services' in another, each file
    with a capture row of its own (its own start and source), one fingerprint key."""
    db = SAMPLES / f"{name}.db"
    gateway = {row[0] for row in sqlite3.connect(db).execute("SELECT id FROM hops WHERE service = 'gateway'")}
    hosts = split_by_hop(db, tmp_path, gateway)
    with sqlite3.connect(hosts[1]) as conn:
        conn.execute("UPDATE captures SET started_at = started_at + 0.5, routes = '[]'")

    joined = analyze(list(hosts))

    report = _in_file_ids(json.loads(render_json(joined)), joined)
    assert report["findings"] == _whole(name)["findings"]
    assert len(joined.captures) == 1 and "one capture in 2 files (a.db, b.db)" in joined.notes[0]
    # Requests span both files: their trees were rebuilt across the hosts.
    files_per_request = joined.hops.groupby("trace", observed=True)["file"].nunique()
    assert (files_per_request == 2).any()


def test_hop_ids_too_large_to_renumber_are_set_aside_with_a_note(tmp_path):
    """A hostile file's ids can be any 64-bit integer: times the file count they would overflow."""
    shutil.copyfile(SAMPLES / "clean.db", tmp_path / "a.db")
    shutil.copyfile(SAMPLES / "clean.db", tmp_path / "b.db")
    with sqlite3.connect(tmp_path / "b.db") as conn:
        conn.execute("UPDATE hops SET id = id + (1 << 62) WHERE id % 2 = 0")
    joined = analyze([tmp_path / "a.db", tmp_path / "b.db"])
    whole = sqlite3.connect(SAMPLES / "clean.db").execute("SELECT count(*), sum(id % 2 = 0) FROM hops").fetchone()
    assert f"{tmp_path / 'b.db'}: {whole[1]} hops with ids too large to join with 1 other files were ignored" in joined.notes
    assert len(joined.hops) == 2 * whole[0] - whole[1]


def test_every_sample_at_once_is_one_joined_analysis():
    """Any number of files joins, not only two: with three or more, a capture row's missing source
    reached the source parser as NaN (pandas 3 text columns) and the analysis failed with a traceback."""
    files = [SAMPLES / f"{name}.db" for name in NAMES]
    joined = analyze(files)
    assert joined.hops["capture_id"].nunique() == len(files) == len(NAMES) >= 3
    assert len(joined.hops) == sum(len(analyze([f]).hops) for f in files)
    result = CliRunner().invoke(cli, ["analyze", *map(str, files), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["findings"]) == len(joined.findings)
