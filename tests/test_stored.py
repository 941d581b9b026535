"""What hoptrace reads that it did not write: JSON held in a trace file's columns, and the
files a user names, whatever they are (nested past the recursion limit, a scalar, a blob, a
fifo, a name too long). Each reader says one line or reads "nothing"; none raises."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hoptrace._click import PathArg
from hoptrace._options import _expand
from hoptrace._stored import header_pairs, json_object, read_text_file, stored_json
from hoptrace.cli import cli
from hoptrace.ui._data import Data

SAMPLE = Path(__file__).parent.parent / "sample_traces" / "checkout-expiry.db"
NESTED = "[" * 50_000 + "]" * 50_000  # json.loads raises RecursionError, not ValueError
VALIDATING_HOP = 76  # a hop of the sample that carries a token

json_like = st.one_of(
    st.text(max_size=40),
    st.builds(lambda n, inner: "[" * n + inner + "]" * n, st.integers(0, 60_000), st.sampled_from(["", "1", '"a"', "{}"])),
    st.builds(lambda n: '{"a":' * n + "1" + "}" * n, st.integers(0, 60_000)),
    st.sampled_from(["5", "null", '"x"', '[["a"]]', '[[1, 2]]', '[["a", 1, 2]]', '[["Name", "v"]]', '{"sub": "x"}']),
)


@settings(max_examples=80, deadline=None)
@given(json_like)
def test_stored_json_is_a_value_or_nothing_never_an_error(text):
    value = stored_json(text, default="none")
    assert value == "none" or value is None or isinstance(value, str | int | float | list | dict)
    assert isinstance(json_object(text), dict)
    pairs = header_pairs(text)
    assert all(isinstance(name, str) for name, _ in pairs)


def _damaged(tmp_path: Path, sql: str) -> Path:
    db = tmp_path / "damaged.db"
    shutil.copyfile(SAMPLE, db)
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(sql, (NESTED,) if "?" in sql else ())
    return db


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE tokens SET aud = ?",
        "UPDATE hops SET response_headers = ? WHERE id % 2 = 0",
        "UPDATE hops SET request_headers = '5'",
        "UPDATE tokens SET claims = '{\"a\":' || ? || '}'",
        "UPDATE tokens SET kid = x'00ff', alg = x'01'",
        "UPDATE hops SET request_end_at = 'soon', port = 'x', query = x'00', reason = x'ff' WHERE id = 76",
    ],
    ids=["aud-nested", "headers-nested", "headers-scalar", "claims-nested", "token-blobs", "hop-wrong-types"],
)
def test_hostile_json_and_types_are_read_as_nothing_by_every_reader(tmp_path, sql):
    db = _damaged(tmp_path, sql)
    args = ["report", str(db), "--max-waterfalls", "1", "--max-sessions", "1", "-o", str(tmp_path / "r.html")]
    result = CliRunner().invoke(cli, args)  # the report reads every hop's headers and tokens for its detail rows
    assert result.exit_code == 0 and result.exception is None, (result.output, result.exception)
    data = Data([db])  # the analysis, as analyze runs it
    data.refresh()
    hop = data.hop(0, VALIDATING_HOP)  # the UI's hop pane reads the raw row, its tokens and headers
    assert hop["id"] == VALIDATING_HOP and isinstance(hop["request_headers"], list)
    assert all(isinstance(v, str) for t in hop["tokens"] for v in t["header"].values())


def test_a_saved_analysis_with_nested_evidence_is_analysed_afresh(tmp_path):
    db = tmp_path / "saved.db"
    shutil.copyfile(SAMPLE, db)
    assert CliRunner().invoke(cli, ["analyze", str(db), "--save", "-o", str(tmp_path / "a.txt")]).exit_code in (0, 1)
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE findings SET evidence = ? WHERE rowid = 1", (NESTED,))
    result = CliRunner().invoke(cli, ["report", str(db), "--max-waterfalls", "1", "-o", str(tmp_path / "r.html")])
    assert result.exit_code in (0, 1) and result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert (tmp_path / "r.html").stat().st_size > 0


def _one_line_exit_2(args: list[str], timeout: float = 60) -> str:
    """``hoptrace ARGS`` as a real process (a fifo must not block it): exit 2, one line, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "hoptrace", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_a_fifo_named_as_any_input_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    stack = ["proxy", "--stack", str(fifo)]
    for args in (["analyze", str(fifo)], ["coverage", str(SAMPLE), "--openapi", f"auth={fifo}"], stack):
        line = _one_line_exit_2(args)
        assert str(fifo) in line and "regular file" in line, line


def test_read_text_file_refuses_a_fifo_at_once(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    done = threading.Event()

    def read() -> None:
        with pytest.raises(OSError, match="not a regular file"):
            read_text_file(fifo)
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(10), "reading the fifo blocked"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(st.characters(categories=("N", "L"), exclude_characters="/\x00"), min_size=1, max_size=8))
def test_a_folder_of_trace_files_is_listed_whatever_their_names(tmp_path_factory, name):
    """Numbers in names sort by value (w2 before w10); '²' is a digit to str.isdigit(), not to int()."""
    folder = tmp_path_factory.mktemp("shards")
    for stem in (f"a{name}", "w10", "w2"):
        (folder / f"{stem}.db").touch()
    found = [p.name for p in _expand(folder)]
    assert sorted(found) == sorted({f"a{name}.db", "w10.db", "w2.db"})
    assert found.index("w2.db") < found.index("w10.db")


def test_a_path_too_long_is_one_line(tmp_path):
    line = _one_line_exit_2(["analyze", str(tmp_path / ("x" * 300))])
    assert "cannot reach the file" in line


def test_coverage_reads_a_hop_without_a_path(tmp_path):
    db = _damaged(tmp_path, "UPDATE hops SET path = NULL WHERE id % 2 = 0")
    result = CliRunner().invoke(cli, ["coverage", str(db)])
    assert result.exit_code == 0 and result.exception is None, result.output
    assert "Endpoints exercised" in result.output


def _commands(group: click.Group, ctx: click.Context):
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        yield from _commands(command, ctx) if isinstance(command, click.Group) else [command]


def test_no_path_of_any_command_takes_an_empty_name():
    """``Path("")`` is ``"."``: every file or folder a command takes refuses "" in one line (exit 2),
    rather than reading the current folder's trace files or writing into it."""
    ctx = click.Context(cli)
    paths = [(command, p) for command in _commands(cli, ctx) for p in command.params if isinstance(p.type, click.Path)]
    assert len(paths) >= 15
    for command, param in paths:
        assert isinstance(param.type, PathArg), f"{command.name} {param.name}"
        with pytest.raises(click.BadParameter, match="empty name"):
            param.type.convert("", param, ctx)
    for args in (["analyze", ""], ["report", "", "-o", "x.html"], ["proxy", "--db", "", "--route", "a=1:http://127.0.0.1:2"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "empty name" in result.stderr, (args, result.output)
