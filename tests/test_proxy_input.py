"""Malformed routes, stack files and options: one line, exit 2, never a traceback (property-based)."""

from __future__ import annotations

import json
import string

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hoptrace._errors import RouteError
from hoptrace._types import Route
from hoptrace.cli import cli
from hoptrace.proxy.routes import StackFile, load_stack_file, parse_route


def assert_one_line_exit_2(args: list[str]) -> str:
    result = CliRunner().invoke(cli, ["proxy", *args])
    assert result.exit_code == 2, (args, result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output
    return result.output


_host = st.one_of(
    st.sampled_from(["127.0.0.1", "[::1]", "[::1", "::1]", "localhost", "", "a b", "h\x00", "[", "]", "-", "ä.example"]),
    st.text(max_size=12),
)
_port = st.one_of(st.integers(-5, 70000).map(str), st.sampled_from(["", "x", "٣", "1e3", "0x10", " 80", "+1"]), st.text(max_size=5))
_scheme = st.sampled_from(["http://", "https://", "ftp://", "", "http:/", "//", "HTTP://", "tcp://"])
_upstream = st.builds(lambda s, h, sep, p, tail: f"{s}{h}{sep}{p}{tail}", _scheme, _host, st.sampled_from([":", "", "::"]), _port,
                      st.sampled_from(["", "/", "/api", "?q", "#f", "@x"]))  # fmt: skip
_spec = st.one_of(
    st.builds(lambda n, u, p: f"{n}={u}@{p}", st.sampled_from(["svc", "", "a b", "ä", "-x", "ok.name"]) | st.text(max_size=6), _upstream, _port),
    st.text(max_size=40),
)


@settings(max_examples=400, deadline=None)
@given(spec=_spec)
def test_any_route_spec_is_a_route_or_one_line_error(spec):
    try:
        route = parse_route(spec)
    except RouteError as exc:
        assert "\n" not in str(exc) and str(exc)
        return
    assert isinstance(route, Route) and 0 < route.listen_port < 65536
    assert route.upstream.startswith(("http://", "https://"))


@settings(max_examples=30, deadline=None)
@given(spec=_spec)
def test_a_malformed_route_on_the_command_line_is_exit_2(spec):
    try:
        parse_route(spec)
    except RouteError:
        assert_one_line_exit_2(["--route", spec, "--db", "/nonexistent-dir/never-created.db"])


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if value == value and abs(value) != float("inf") else "nan"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string for these
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"


_scalar = st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.booleans(), st.text(max_size=20), _upstream)
_toml_value = st.one_of(_scalar, st.lists(_scalar, max_size=3), st.dictionaries(st.sampled_from(["a", "upstream", "listen"]), _scalar, max_size=2))
_route_table = st.dictionaries(
    st.sampled_from(["upstream", "listen", "listen_port", "host", "extra"]), st.one_of(_toml_value, _upstream, st.integers(0, 70000)), max_size=4
)


@st.composite
def stack_files(draw) -> str:
    lines = []
    for key in draw(st.lists(st.sampled_from(["entry", "db", "name", "routes", "version"]), unique=True, max_size=3)):
        lines.append(f"{key} = {toml_value(draw(_toml_value))}")
    for name in draw(st.lists(st.sampled_from(["svc", "a b", "x", "ä", "1"]), unique=True, max_size=3)):
        key = json.dumps(name) if not name.isalnum() or not name.isascii() else name
        lines.append(f"[routes.{key}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in draw(_route_table).items()]
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.text(alphabet=string.printable, max_size=20)))
    return "\n".join(lines) + "\n"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=stack_files())
def test_any_stack_file_is_routes_or_one_line_error(tmp_path, text):
    path = tmp_path / "stack.toml"
    path.write_text(text, encoding="utf-8")
    try:
        stack = load_stack_file(path)
    except RouteError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    assert isinstance(stack, StackFile) and stack.routes
    assert stack.db is None or isinstance(stack.db, str)
    assert stack.entry is None or isinstance(stack.entry, str)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=stack_files())
def test_a_malformed_stack_file_on_the_command_line_is_exit_2(tmp_path, text):
    path = tmp_path / "stack.toml"
    path.write_text(text, encoding="utf-8")
    try:
        load_stack_file(path)
    except RouteError:
        assert_one_line_exit_2(["--stack", str(path), "--db", "/nonexistent-dir/never-created.db"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--route", "svc=http://[::1@18090"], "Invalid IPv6 URL"),
        (["--route", "svc=http://127.0.0.1:8080/api@18090"], "no path"),
        (["--route", "a=http://127.0.0.1:1@13001", "--listen-host", "bad\x00host"], "is not an address"),
        (["--route", "a=http://127.0.0.1:1@13001", "--upstream-timeout", "-1"], "upstream-timeout"),
        (["--route", "a=http://127.0.0.1:1@13001", "--grace", "nan"], "grace"),
        (["--route", "a=http://127.0.0.1:1@13001", "--upstream-timeout", "inf"], "upstream-timeout"),
    ],
)
def test_named_bad_options(args, message):
    # --db in a missing folder: should the option be let through, the proxy stops at once, not serves
    assert message in assert_one_line_exit_2([*args, "--db", "/nonexistent-dir/never-created.db"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('db = 5\n[routes.a]\nupstream = "http://127.0.0.1:1"\nlisten = 13001\n', "db must be a non-empty string"),
        ('[routes.a]\nupstream = "http://127.0.0.1:1"\nlisten = true\n', "is not a number"),
        ('[routes.a]\nupstream = 5\nlisten = 13001\n', "upstream must be a URL string"),
        ('[routes.a]\nupstream = "http://127.0.0.1:1"\nlisten = 13001\nlisten_host = "0.0.0.0"\n', "unknown key 'listen_host'"),
        ('dbb = "x"\n[routes.a]\nupstream = "http://127.0.0.1:1"\nlisten = 13001\n', "unknown key 'dbb'"),
        ("\xff\xfe", "not a readable TOML stack file"),
    ],
)
def test_named_bad_stack_files(tmp_path, text, message):
    path = tmp_path / "stack.toml"
    path.write_bytes(text.encode("latin-1"))
    assert message in assert_one_line_exit_2(["--stack", str(path)])
