"""Routes: which service sits behind which reverse listener.

A route is written ``NAME=UPSTREAM_URL@LISTEN_PORT``, the shape of mitmproxy's
``reverse:URL@PORT`` with a name in front. A stack file says the same in TOML::

    entry = "gateway"          # optional; default: the first route
    db = "traces.db"           # optional

    [routes.gateway]
    upstream = "http://127.0.0.1:8080"
    listen = 18080

    [routes.auth]
    upstream = "http://127.0.0.1:3001"
    listen = 13001
"""

from __future__ import annotations

import errno
import re
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from hoptrace._errors import RouteError
from hoptrace._stored import read_text_file
from hoptrace._types import Route

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class StackFile:
    routes: list[Route]
    entry: str | None
    db: str | None


def parse_route(spec: str) -> Route:
    """``gateway=http://127.0.0.1:8080@18080`` → Route; RouteError says what is wrong."""
    name, sep, rest = spec.partition("=")
    upstream, at, port = rest.rpartition("@")
    if not sep or not at or not spec.isprintable():
        raise RouteError(f"route {spec!r}: expected NAME=UPSTREAM_URL@LISTEN_PORT, e.g. auth=http://127.0.0.1:3001@13001")
    return make_route(name.strip(), upstream.strip(), port.strip(), where=f"route {spec!r}")


def make_route(name: object, upstream: object, port: object, *, where: str) -> Route:
    """A Route from its three parts, each checked; RouteError names ``where`` and what is wrong."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise RouteError(f"{where}: service name {name!r} must be letters, digits, '.', '_' or '-'")
    if not isinstance(upstream, str):
        raise RouteError(f"{where}: upstream must be a URL string, not {type(upstream).__name__} {upstream!r}")
    listen_port = _port(port, where)
    _check_upstream(upstream, where)
    return Route(name, upstream.rstrip("/"), listen_port)


def _port(port: object, where: str) -> int:
    # A route spec gives text, a stack file an integer; TOML's true/1.5/"x" are neither.
    if isinstance(port, str) and port.isascii() and port.isdigit():
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int):
        raise RouteError(f"{where}: listen port {port!r} is not a number")
    if not 0 < port < 65536:
        raise RouteError(f"{where}: listen port {port} is out of range 1-65535")
    return port


def _check_upstream(upstream: str, where: str) -> None:
    from mitmproxy.proxy.mode_specs import ProxyMode

    message = f"{where}: upstream {upstream!r} must be an http:// or https:// URL (scheme, host, optional port; no path)"
    try:
        parts = urlsplit(upstream)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.port == 0:
            raise RouteError(message)
        # mitmproxy's own parser decides what a reverse listener accepts.
        ProxyMode.parse(f"reverse:{upstream.rstrip('/')}@1")
    except ValueError as exc:  # urlsplit: "Invalid IPv6 URL"; .port: out of range; mitmproxy: its reasons
        raise RouteError(f"{message}: {exc}") from None


# `command` starts the stack itself; the pytest plugin runs it, the proxy leaves it alone.
_TOP_KEYS = frozenset({"entry", "db", "routes", "command"})
_ROUTE_KEYS = frozenset({"upstream", "listen"})


def load_stack_file(path: str | Path) -> StackFile:
    """A stack file's routes, entry and db, every key and type checked; RouteError names the file and the key."""
    path = Path(path)
    try:
        document = tomllib.loads(read_text_file(path))
    except FileNotFoundError:
        raise RouteError(f"{path}: no such stack file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RouteError(f"{path}: not a readable TOML stack file ({' '.join(str(exc).split())})") from None
    if unknown := sorted(set(document) - _TOP_KEYS):
        raise RouteError(f"{path}: unknown key {unknown[0]!r}; a stack file has entry, db, command and [routes.NAME] tables")
    for key in ("entry", "db"):
        if key in document and (not isinstance(document[key], str) or not document[key].strip() or "\0" in document[key]):
            raise RouteError(f"{path}: {key} must be a non-empty string, not {document[key]!r}")
    tables = document.get("routes")
    if not isinstance(tables, dict) or not tables:
        raise RouteError(f"{path}: no [routes.NAME] tables")
    routes = []
    for name, table in tables.items():
        where = f"{path}: [routes.{name}]"
        if not isinstance(table, dict) or "upstream" not in table or "listen" not in table:
            raise RouteError(f"{where} needs upstream = URL and listen = PORT")
        if unknown := sorted(set(table) - _ROUTE_KEYS):
            raise RouteError(f"{where}: unknown key {unknown[0]!r}; a route has upstream and listen")
        routes.append(make_route(name, table["upstream"], table["listen"], where=where))
    return StackFile(routes, document.get("entry"), document.get("db"))


def check_routes(routes: list[Route], entry: str | None, listen_host: str, shared: bool = False) -> str:
    """Validate a route set before mitmproxy sees it; returns the entry route's name.

    ``shared``: the ports are bound with SO_REUSEPORT (a worker of ``--workers``).
    """
    if not routes:
        raise RouteError("no routes: give at least one --route NAME=UPSTREAM_URL@LISTEN_PORT or --stack FILE")
    for kind, values in (("service name", [r.name for r in routes]), ("listen port", [r.listen_port for r in routes])):
        if duplicates := sorted({str(v) for v in values if values.count(v) > 1}):
            raise RouteError(f"{kind} used by more than one route: {', '.join(duplicates)}")
    names = [r.name for r in routes]
    entry = entry or names[0]
    if entry not in names:
        raise RouteError(f"entry {entry!r} is not a route; routes are {', '.join(names)}")
    if not listen_host.isprintable() or not listen_host:
        raise RouteError(f"--listen-host {listen_host!r} is not an address")
    for route in routes:
        _check_port_free(listen_host, route, shared)
    return entry


def _check_port_free(host: str, route: Route, shared: bool) -> None:
    # Binding the way asyncio's server will (SO_REUSEADDR) tells a port in use
    # apart from one in TIME_WAIT, and gives a clear message before mitmproxy
    # starts any listener. A worker of `--workers` binds with SO_REUSEPORT, as its
    # listener will: its siblings may already listen there (the parent checked the
    # port was free before starting any of them).
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind((host, route.listen_port))
        except OSError as exc:
            reason = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            raise RouteError(f"route {route.name}: port {host}:{route.listen_port} {reason}") from None
        except ValueError as exc:  # "embedded null character", IDNA's label too long
            raise RouteError(f"--listen-host {host!r} is not an address ({exc})") from None
