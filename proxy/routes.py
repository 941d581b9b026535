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
from hoptrace.addons._writer import Route

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
    if not sep or not at:
        raise RouteError(f"route {spec!r}: expected NAME=UPSTREAM_URL@LISTEN_PORT, e.g. auth=http://127.0.0.1:3001@13001")
    return make_route(name.strip(), upstream.strip(), port.strip(), where=f"route {spec!r}")


def make_route(name: str, upstream: str, port: object, *, where: str) -> Route:
    if not _NAME.match(name):
        raise RouteError(f"{where}: service name {name!r} must be letters, digits, '.', '_' or '-'")
    parts = urlsplit(upstream)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RouteError(f"{where}: upstream {upstream!r} must be an http:// or https:// URL")
    try:
        listen_port = int(str(port))
    except ValueError:
        raise RouteError(f"{where}: listen port {port!r} is not a number") from None
    if not 0 < listen_port < 65536:
        raise RouteError(f"{where}: listen port {listen_port} is out of range 1-65535")
    return Route(name, upstream.rstrip("/"), listen_port)


def load_stack_file(path: str | Path) -> StackFile:
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RouteError(f"{path}: no such stack file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RouteError(f"{path}: not a readable TOML stack file ({exc})") from None
    tables = document.get("routes")
    if not isinstance(tables, dict) or not tables:
        raise RouteError(f"{path}: no [routes.NAME] tables")
    routes = []
    for name, table in tables.items():
        if not isinstance(table, dict) or "upstream" not in table or "listen" not in table:
            raise RouteError(f"{path}: [routes.{name}] needs upstream = URL and listen = PORT")
        routes.append(make_route(name, str(table["upstream"]), table["listen"], where=f"{path}: [routes.{name}]"))
    return StackFile(routes, document.get("entry"), document.get("db"))


def check_routes(routes: list[Route], entry: str | None, listen_host: str) -> str:
    """Validate a route set before mitmproxy sees it; returns the entry route's name."""
    if not routes:
        raise RouteError("no routes: give at least one --route NAME=UPSTREAM_URL@LISTEN_PORT or --stack FILE")
    for kind, values in (("service name", [r.name for r in routes]), ("listen port", [r.listen_port for r in routes])):
        if duplicates := sorted({str(v) for v in values if values.count(v) > 1}):
            raise RouteError(f"{kind} used by more than one route: {', '.join(duplicates)}")
    names = [r.name for r in routes]
    entry = entry or names[0]
    if entry not in names:
        raise RouteError(f"entry {entry!r} is not a route; routes are {', '.join(names)}")
    for route in routes:
        _check_port_free(listen_host, route)
    return entry


def _check_port_free(host: str, route: Route) -> None:
    # Binding the way asyncio's server will (SO_REUSEADDR) tells a port in use
    # apart from one in TIME_WAIT, and gives a clear message before mitmproxy
    # starts any listener.
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, route.listen_port))
        except OSError as exc:
            reason = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            raise RouteError(f"route {route.name}: port {host}:{route.listen_port} {reason}") from None
