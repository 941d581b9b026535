"""The trace file itself: schema v4 made with sqlite-utils, migration of version-1 files, views,
Datasette metadata, read-only copies read by another user, captures that did not end."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from contextlib import closing
from pathlib import Path

import pytest
import sqlite_utils

from hoptrace._errors import TraceFileError
from hoptrace.analyzer import analyze, render_json, render_markdown, render_text
from hoptrace.db import (
    ADDED_COLUMNS,
    ANALYSIS_COLUMNS,
    ANALYSIS_TABLES,
    COLUMNS,
    HOP_COLUMNS,
    HOP_TOKEN_COLUMNS,
    MIGRATIONS,
    SCHEMA_VERSION,
    TOKEN_COLUMNS,
    VIEWS,
    metadata,
    open_for_reading,
    open_for_writing,
)

from .analyzer_fixtures import T0, Builder

SAMPLES = Path(__file__).parent.parent / "sample_traces"


def test_the_insert_order_is_the_schema_order(tmp_path):
    assert (HOP_COLUMNS, TOKEN_COLUMNS, HOP_TOKEN_COLUMNS) == tuple(tuple(COLUMNS[t]) for t in ("hops", "tokens", "hop_tokens"))
    with closing(open_for_writing(tmp_path / "new.db")) as conn:
        db = sqlite_utils.Database(conn)
        assert tuple(db["hops"].columns_dict) == HOP_COLUMNS
        assert HOP_COLUMNS[-2:] == ("client_conn_id", "stream_id") and tuple(db["captures"].columns_dict)[-4:] == (
            "source", "otlp_endpoint", "otlp_spans_sent", "otlp_spans_dropped"
        )


def test_a_new_file_has_types_keys_defaults_and_indexes(tmp_path):
    with closing(open_for_writing(tmp_path / "new.db")) as conn:
        db = sqlite_utils.Database(conn)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db["hop_columns"].pks == ["first_id"] and {t.table for t in db.triggers} == {"hops", "hop_tokens"}
        links = {(fk.column, fk.other_table) for fk in db["hop_tokens"].foreign_keys}
        assert links == {("hop_id", "hops"), ("fingerprint", "tokens")}
        assert db["hops"].pks == ["id"] and db["hop_tokens"].pks == list(HOP_TOKEN_COLUMNS)
        assert {i.name for i in db["hops"].indexes} == {"hops_capture_started", "hops_trace"}
        assert db["hops"].columns_dict["started_at"] is float and db["hops"].columns_dict["stream_id"] is int
        conn.execute("INSERT INTO captures (started_at, routes, hoptrace_version, mitmproxy_version) VALUES (1, '[]', 'x', 'y')")
        assert conn.execute("SELECT hops_seen, write_errors, ended_at FROM captures").fetchone() == (0, 0, None)
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO hops (capture_id, flow_id, service) VALUES (1, 'f', 's')")  # no times: NOT NULL
        assert (
            set(db.view_names())
            == set(VIEWS)
            == {"hops_readable", "tokens_readable", "findings_readable", "finding_hops_readable", "analysis_readable"}
        )
        assert set(ANALYSIS_TABLES) <= set(db.table_names()) and db["findings"].count == 0


def test_a_version_1_file_upgrades_when_opened_for_writing(tmp_path):
    v1 = tmp_path / "clean.db"
    shutil.copyfile(SAMPLES / "clean.db", v1)
    with closing(sqlite3.connect(v1)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        before = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in COLUMNS}
        assert "client_conn_id" not in [r[1] for r in conn.execute("PRAGMA table_info(hops)")]
    as_v1 = render_json(analyze(v1))  # readers take a version-1 file as it is
    open_for_writing(v1).close()
    reopened = open_for_writing(v1)  # a second open has nothing left to do
    reopened.close()
    with closing(sqlite3.connect(v1)) as conn:
        db = sqlite_utils.Database(conn)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert {t: db[t].count for t in COLUMNS} == before
        for table, added in ADDED_COLUMNS.items():
            assert tuple(db[table].columns_dict)[-len(added) :] == added
        assert tuple(db["hops"].columns_dict) == HOP_COLUMNS
        assert db["hops_readable"].count == before["hops"]
    assert render_json(analyze(v1)) == as_v1  # and the upgraded file reads the same


def test_a_version_3_file_reads_as_it_is_and_gains_the_otlp_columns_when_opened_for_writing(tmp_path):
    v3 = tmp_path / "clean.db"
    shutil.copyfile(SAMPLES / "clean.db", v3)
    with closing(sqlite3.connect(v3, isolation_level=None)) as conn:  # schema 3 as the previous hoptrace left it
        db = sqlite_utils.Database(conn)
        for step in MIGRATIONS[:2]:
            step(db)
        conn.execute("PRAGMA user_version = 3")
        captures = conn.execute("SELECT * FROM captures").fetchall()
    otlp = ("otlp_endpoint", "otlp_spans_sent", "otlp_spans_dropped")
    assert not set(otlp) & set(sqlite_utils.Database(v3)["captures"].columns_dict)
    as_v3 = analyze(v3)  # a reader takes the missing columns as NULL, without a note
    assert as_v3.captures[list(otlp)].isna().all().all()
    assert not any("otlp" in note for note in as_v3.notes), as_v3.notes
    open_for_writing(v3).close()
    with closing(sqlite3.connect(v3)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        assert tuple(r[1] for r in conn.execute("PRAGMA table_info(captures)"))[-3:] == otlp
        # Schema 5's Arrow columns start empty: the hops written before are read as rows.
        assert conn.execute("SELECT count(*) FROM hop_columns").fetchone()[0] == 0
        # The rows are as they were, not streamed (NULL).
        assert conn.execute("SELECT * FROM captures").fetchall() == [(*row, None, None, None) for row in captures]
    assert render_json(analyze(v3)) == render_json(as_v3)


def test_views_read_as_people_do(tmp_path):
    b = Builder()
    t = b.token(sub="alice", exp=100)
    b.hop("gateway", "GET /a", 0, 1, presented=t)
    b.hop("gateway", "GET /b", 2, 3)
    path = b.write(tmp_path / "v.db")
    open_for_writing(path).close()  # the views come with the current schema
    with closing(sqlite3.connect(path)) as conn:
        conn.row_factory = sqlite3.Row
        hops = [dict(r) for r in conn.execute("SELECT * FROM hops_readable ORDER BY id")]
        token = dict(conn.execute("SELECT * FROM tokens_readable").fetchone())
    assert hops[0]["started"] == "2023-11-14T22:13:20.000Z" and hops[0]["token_sub"] == "alice"
    assert hops[0]["token_remaining_s"] == 100.0 and hops[0]["token_exp"] == "2023-11-14T22:15:00.000Z"
    assert hops[1]["token_sub"] is None and hops[1]["ended"] == "2023-11-14T22:13:23.000Z"
    assert token["sub"] == "alice" and token["exp"] == "2023-11-14T22:15:00.000Z"


def test_datasette_metadata_describes_every_column():
    meta = metadata("traces")["databases"]["traces"]["tables"]
    for table, columns in (*COLUMNS.items(), *ANALYSIS_COLUMNS.items()):
        assert set(meta[table]["columns"]) == set(columns) and all(meta[table]["columns"].values())
    assert "shutdown" in meta["hops"]["columns"]["error_kind"]
    assert set(VIEWS) <= set(meta)
    printed = subprocess.run([sys.executable, "-m", "hoptrace.db", "checkout"], capture_output=True, text=True, check=True)
    assert json.loads(printed.stdout) == metadata("checkout")


# -- read-only copies ------------------------------------------------------------------------


def _wal_file(path: Path, *, keep_wal: bool) -> sqlite3.Connection | None:
    """A trace in WAL mode as the recorder leaves it: closed (every commit in the file) or still open."""
    b = Builder()
    t = b.token(sub="alice", exp=100)
    for i in range(4):
        b.hop("gateway", "GET /a", i, i + 0.5, presented=t)
    b.write(path)
    conn = open_for_writing(path)
    if keep_wal:  # a later commit that only the -wal holds, as while the proxy writes
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute("UPDATE hops SET path = '/in-wal' WHERE id = 4")
        return conn
    conn.close()
    return None


def _as_another_user(read) -> str:
    """``read()`` in a child process under uid/gid nobody when we are root (else as ourselves:
    a non-root user cannot write a folder it made read-only either); its result or error as text."""
    if os.geteuid() != 0:
        try:
            return read()
        except TraceFileError as exc:
            return f"error: {exc}"
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(rfd)
        try:
            os.setgid(65534)
            os.setuid(65534)
            out = read()
        except TraceFileError as exc:
            out = f"error: {exc}"
        except BaseException as exc:
            out = f"crash: {type(exc).__name__}: {exc}"
        os.write(wfd, out.encode())
        os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd) as pipe:
        out = pipe.read()
    os.waitpid(pid, 0)
    return out


def _read_only(folder: Path) -> None:
    folder.chmod(0o755)
    for item in folder.iterdir():
        item.chmod(0o444)
    folder.chmod(0o555)


@pytest.fixture
def shared_folder():
    """A folder every user can reach (pytest's tmp_path is private to its owner)."""
    with tempfile.TemporaryDirectory(prefix="hoptrace-shared-") as name:
        yield Path(name)
        Path(name).chmod(0o755)


def test_a_read_only_copy_of_a_wal_file_analyzes(shared_folder):
    folder = shared_folder
    closed = folder / "closed.db"
    _wal_file(closed, keep_wal=False)
    assert not Path(f"{closed}-wal").exists() and closed.read_bytes()[18:20] == b"\x02\x02"  # WAL mode, no -wal
    live = folder / "live.db"
    writer = _wal_file(live, keep_wal=True)
    live_copy = folder / "live-copy.db"
    for suffix in ("", "-wal"):  # copied while the proxy writes, without its -shm
        shutil.copyfile(f"{live}{suffix}", f"{live_copy}{suffix}")
    writer.close()
    _read_only(folder)
    analyze(SAMPLES / "clean.db")  # imports done before the child drops its rights
    got = _as_another_user(lambda: json.dumps([len(analyze(closed).hops), render_text(analyze(closed)).count("\n") > 3]))
    assert json.loads(got) == [4, True], got
    refused = _as_another_user(lambda: str(len(analyze(live_copy).hops)))
    assert refused.startswith("error: ") and "live-copy.db-wal" in refused and "\n" not in refused, refused


def test_a_live_wal_file_reads_its_uncheckpointed_commits(tmp_path):
    path = tmp_path / "live.db"
    writer = _wal_file(path, keep_wal=True)
    try:
        assert Path(f"{path}-wal").stat().st_size > 0
        assert analyze(path).hops.loc[4, "path"] == "/in-wal"
        with closing(open_for_reading(path)) as conn:
            assert "immutable" not in conn.uri
    finally:
        writer.close()


# -- captures that did not end ---------------------------------------------------------------


def _open_capture(path: Path, *, seen: int, recorded: int, dropped: int) -> sqlite3.Connection:
    """A capture row as the recorder leaves it between batches: counters of the last write, no ended_at."""
    conn = open_for_writing(path)
    conn.execute(
        "INSERT INTO captures (id, started_at, routes, entry, hoptrace_version, mitmproxy_version,"
        " hops_seen, hops_recorded, hops_dropped) VALUES (1, ?, '[]', 'gateway', 'x', 'y', ?, ?, ?)",
        (T0, seen, recorded, dropped),
    )
    for i in range(1, recorded + 1):
        row = dict.fromkeys(HOP_COLUMNS)
        row.update(id=i, capture_id=1, flow_id=str(i), service="gateway", method="GET", path="/a", status=200, failed=0,
                   started_at=T0 + i, ended_at=T0 + i + 0.2, duration_ms=200.0)  # fmt: skip
        conn.execute(f"INSERT INTO hops VALUES ({', '.join('?' * len(HOP_COLUMNS))})", [row[c] for c in HOP_COLUMNS])
    return conn


def test_a_capture_without_an_end_says_hops_may_be_missing(tmp_path):
    path = tmp_path / "killed.db"
    _open_capture(path, seen=10, recorded=7, dropped=1).close()
    a = analyze(path)
    (note,) = [n for n in a.notes if n.startswith("capture 1 ")]
    assert "did not end cleanly (crashed, killed) or is still running" in note and len(note) < 200
    assert "10 hops seen, 7 written, 1 dropped; up to 2 missing, plus up to 2,000 seen after it" in note
    assert note in render_text(a) and note in render_markdown(a) and note in json.loads(render_json(a))["notes"]
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE captures SET ended_at = ?", (T0 + 60,))
    assert not any(n.startswith("capture 1 ") for n in analyze(path).notes)


def test_a_capture_still_being_written_is_not_called_crashed(tmp_path):
    path = tmp_path / "live.db"
    writer = _open_capture(path, seen=5, recorded=5, dropped=0)
    try:
        assert Path(f"{path}-wal").exists()
        (note,) = [n for n in analyze(path).notes if n.startswith("capture 1 ")]
        assert "or is still running" in note and "up to 0 missing" in note
    finally:
        writer.close()
