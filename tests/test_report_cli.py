"""The command line as a person meets it: severities for --fail-on, relative time windows,
an empty window explained, colour and progress on a terminal only, examples on one line.

Terminal behaviour is tested on a real pseudo-terminal (the `pty` module), piped output
on a real pipe: the installed `hoptrace` script, as a person runs it.
"""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hoptrace._errors import AnalysisError
from hoptrace._format import colour_severities, use_colour
from hoptrace.analyzer._config import parse_time

SAMPLES = Path(__file__).resolve().parent.parent / "sample_traces"
DEMO, FLAKY = SAMPLES / "checkout-expiry.db", SAMPLES / "flaky-retries.db"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def hoptrace(*args: str, tty: bool = False, env: dict | None = None, timeout: float = 120) -> tuple[int, str, str]:
    """Run the CLI; with ``tty`` its stdout and stderr are a pseudo-terminal (returned together as stdout)."""
    cmd = [sys.executable, "-m", "hoptrace", *map(str, args)]
    environ = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | (env or {})
    if not tty:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=environ)
        return done.returncode, done.stdout, done.stderr
    leader, follower = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=environ)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout=timeout), b"".join(chunks).decode("utf-8", "replace"), ""


# ---------------------------------------------------------------- time windows


@given(st.one_of(st.text(max_size=40), st.floats(allow_nan=True, allow_infinity=True), st.integers(),
                 st.integers(min_value=-(10**400), max_value=10**400), st.text("0123456789.:-+TZ smhd", max_size=420),
                 st.from_regex(r"\A\s*\d{1,12}(\.\d{1,8})?\s*(s|sec|m|min|h|d|S|M|H|D|ms|w|y)?\s*\Z")))  # fmt: skip
def test_any_time_is_a_float_or_one_line_naming_the_option(value):
    try:
        got = parse_time(value, "since", now=1_700_000_000.0)
    except AnalysisError as exc:
        message = str(exc)
        assert message.startswith("since: ") and "\n" not in message and len(message) < 400
    else:
        assert isinstance(got, float) and got == got and abs(got) != float("inf")


@pytest.mark.parametrize(("text", "ago"), [("15m", 900), ("2h", 7200), ("30s", 30), ("1d", 86400), ("1.5h", 5400),
                                           (" 15 min ", 900), ("10SEC", 10)])  # fmt: skip
def test_relative_times_count_back_from_now(text, ago):
    assert parse_time(text, "since", now=1_000_000.0) == 1_000_000.0 - ago
    assert parse_time("1700000000", "since") == 1_700_000_000.0  # a bare number stays UNIX seconds


def test_a_window_without_hops_says_where_the_hops_are():
    code, out, err = hoptrace("analyze", DEMO, "--since", "15m")
    assert code == 0, err
    # The sample was recorded long before "15 minutes ago": every hop lies before the window.
    m = re.search(r"no request started at or after (\S+ \S+ UTC); the capture's (\d+) hops lie outside it "
                  r"\((\d+) before, (\d+) after\), from 2026-\d\d-\d\d \S+ UTC to 2026-\d\d-\d\d \S+ UTC", err)  # fmt: skip
    assert m, err
    assert m[2] == m[3] and m[4] == "0" and int(m[2]) > 50
    code, _, err = hoptrace("analyze", DEMO, "--until", "2000-01-01")
    assert code == 0 and "0 before" in err and "after)" in err
    code, _, err = hoptrace("analyze", DEMO, "--since", "1e308")  # past the calendar: the number as given
    assert code == 0 and "at or after 1e+308 (UNIX seconds)" in err and "?" not in err.split(";")[0]
    code, _, err = hoptrace("analyze", DEMO, "--since", "last tuesday")
    assert code == 2 and "such as 15m, 2h, 30s" in err and "Traceback" not in err


# ---------------------------------------------------------------- --fail-on


def test_fail_on_takes_severities_and_kinds():
    assert hoptrace("analyze", DEMO, "--fail-on", "error")[0] == 1  # the expired checkout
    code, _, err = hoptrace("analyze", FLAKY, "--fail-on", "error")
    assert code == 0, err  # only warnings there
    code, _, err = hoptrace("analyze", FLAKY, "--fail-on", "warning")  # warning or worse
    assert code == 1 and "failing on" in err and "retry_storm" in err
    code, _, err = hoptrace("analyze", DEMO, "--fail-on", "ERROR,retry_storm")
    assert code == 1 and "expired_mid_flow" in err
    code, _, err = hoptrace("analyze", DEMO, "--fail-on", "fatal")
    assert code == 2 and "severities: error, warning, info" in err and "Traceback" not in err


# ---------------------------------------------------------------- a terminal


def test_colour_on_a_terminal_plain_when_piped_or_no_color():
    code, out, _ = hoptrace("analyze", DEMO, tty=True)
    assert code == 0 and "\x1b[1;31merror" in out  # severity words coloured
    code, piped, _ = hoptrace("analyze", DEMO)
    assert code == 0 and not ANSI.search(piped) and "error" in piped
    code, out, _ = hoptrace("analyze", DEMO, tty=True, env={"NO_COLOR": "1"})
    assert code == 0 and not ANSI.search(out)
    # The words keep their text: only escapes are added.
    assert ANSI.sub("", colour_severities("1 error, 2 warnings, 0 info; error-rate")) == "1 error, 2 warnings, 0 info; error-rate"
    assert "error-rate" in colour_severities("error-rate") and "\x1b" not in colour_severities("error-rate")


def test_use_colour_needs_a_terminal(monkeypatch):
    class Tty:
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_colour(Tty()) and not use_colour(open(os.devnull, "w"))
    monkeypatch.setenv("NO_COLOR", "")
    assert not use_colour(Tty())


def test_report_progress_on_a_terminal_only(tmp_path):
    code, out, _ = hoptrace("report", DEMO, "-o", tmp_path / "t.html", tty=True)
    assert code == 0, out
    stages = re.findall(r"^hoptrace report: (.+?) \(\d+\.\d s\)\r?$", out, re.M)
    assert stages[:2] == ["analysing", "stories and waterfalls"] and stages[-1] == "writing"
    code, out, err = hoptrace("report", DEMO, "-o", tmp_path / "p.html")
    assert code == 0 and "hoptrace report:" not in err and out.startswith("wrote ")


def test_help_examples_stay_on_one_line():
    code, out, _ = hoptrace("analyze", "--help")
    assert code == 0
    lines = [line.strip() for line in out.splitlines()]
    assert "hoptrace analyze traces.db --fail-on error" in lines
    assert "hoptrace analyze traces.db --since 15m --format markdown" in lines


def test_a_long_analysis_says_so_on_a_terminal_and_a_quick_one_stays_quiet():
    import io

    from hoptrace._format import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    quiet, loud = Tty(), Tty()
    Progress("hoptrace analyze", quiet, after_s=3600)("analysed 5 hops")
    Progress("hoptrace analyze", loud, after_s=0)("analysed 5 hops")
    Progress("hoptrace analyze", io.StringIO())("piped")  # not a terminal: nothing to say
    assert quiet.getvalue() == "" and re.fullmatch(r"hoptrace analyze: analysed 5 hops \(\d+\.\d s\)\n", loud.getvalue())


def test_the_demo_hint_says_how_to_reach_hoptrace(monkeypatch, tmp_path):
    from hoptrace.stack.demo import closing_hint

    monkeypatch.setenv("PATH", str(tmp_path))  # hoptrace not on PATH: the hint names the installed script
    hint = closing_hint(Path("out/demo"))
    script = Path(sys.executable).parent / "hoptrace"
    assert script.exists()
    assert "analyze out/demo/traces.db --format markdown" in hint and "python3 dev.py hoptrace" in hint
    assert str(script.relative_to(Path.cwd())) in hint if script.is_relative_to(Path.cwd()) else str(script) in hint
    monkeypatch.setenv("PATH", str(script.parent))
    assert "`hoptrace analyze out/demo/traces.db" in closing_hint(Path("out/demo"))
