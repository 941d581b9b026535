"""The aiohttp app of `hoptrace ui`: static files, a GET-only JSON API, server-sent events when live.

Trace files are untrusted, so every response carries a strict Content-Security-Policy
(scripts and styles only from this server, no inline code, fetches only to it), the
browser may not sniff types or frame the page, only GET and HEAD are answered, and a
request naming another Host (a DNS-rebinding page) is refused.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from hoptrace.ui._preview import NotFound, NotReady, Preview
from hoptrace.ui._query import BadQuery, RequestQuery, integer

if TYPE_CHECKING:  # imported in the background: pandas and the analyzer take seconds to load
    from hoptrace.ui._data import Data

CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
STATIC = {"app.js": "text/javascript", "app.css": "text/css", "index.html": "text/html"}
POLL_S = 0.2
"""How often a live view looks for new hops: one indexed max(id) query, ~0.1 ms."""
HEARTBEAT_S = 15.0


@dataclass
class Current:
    """What answers the API: the SQL preview while pandas and the analyzer load, then their Data."""

    data: Preview | Data


DATA = web.AppKey("data", Current)
WATCHERS = web.AppKey("watchers", list)
HOSTS = web.AppKey("hosts", set)
CLOSING = web.AppKey("closing", asyncio.Event)


@web.middleware
async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Security headers on every answer, and only GET / HEAD from a page this server served."""
    if request.method not in ("GET", "HEAD"):
        response: web.StreamResponse = _error(405, f"{request.method} not allowed: the UI only reads")
    elif not _own_host(request):
        response = _error(421, "unexpected Host header")
    else:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = _error(exc.status, exc.reason)
        except (BadQuery, ValueError) as exc:
            response = _error(400, str(exc))
        except NotFound as exc:
            response = _error(404, str(exc))
        except NotReady as exc:
            response = _error(503, str(exc))
    if not response.prepared:  # an event stream sent its headers itself
        response.headers.update(SECURITY_HEADERS)
        if request.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
    return response


def _own_host(request: web.Request) -> bool:
    """Whether the Host is the address the server listens on (or localhost): no rebinding."""
    host = (request.host or "").rsplit(":", 1)[0].strip("[]")
    return host in request.app[HOSTS]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message.splitlines()[0] if message else "error"}, status=status)


def _json(payload: Any) -> web.Response:
    return web.Response(text=json.dumps(payload, allow_nan=False, separators=(",", ":")), content_type="application/json")


def _db(request: web.Request) -> int:
    return integer(request.query, "db", 0, 0, 1000)


def _id(request: web.Request, name: str) -> int:
    return integer(request.match_info, name, 0, 0, 2**62)


async def _in_thread(func: Callable[..., Any], *args: Any) -> Any:
    """Run a query in a worker thread: at a million hops a filter takes tens of ms, off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, func, *args)


async def index(request: web.Request) -> web.StreamResponse:
    return _static_file("index.html")


async def static(request: web.Request) -> web.StreamResponse:
    return _static_file(request.match_info["name"])


def _static_file(name: str) -> web.Response:
    if name not in STATIC:
        raise web.HTTPNotFound(reason=f"no file {name}")
    body = (files("hoptrace.ui") / "static" / name).read_bytes()
    return web.Response(body=body, content_type=STATIC[name], charset="utf-8")


def _whole(method: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A handler answering ``Data.<method>()``, which takes no parameter."""

    async def handler(request: web.Request) -> web.Response:
        return _json(await _in_thread(getattr(request.app[DATA].data, method)))

    return handler


async def api_requests(request: web.Request) -> web.Response:
    query = RequestQuery.parse(request.query)
    return _json(await _in_thread(request.app[DATA].data.request_page, query))


async def api_request(request: web.Request) -> web.Response:
    return _json(await _in_thread(request.app[DATA].data.request, _db(request), _id(request, "trace")))


async def api_hop(request: web.Request) -> web.Response:
    return _json(await _in_thread(request.app[DATA].data.hop, _db(request), _id(request, "hop")))


async def api_compare(request: web.Request) -> web.Response:
    q = request.query
    a = (integer(q, "adb", 0, 0, 1000), integer(q, "a", 0, 0, 2**62))
    b = (integer(q, "bdb", 0, 0, 1000), integer(q, "b", 0, 0, 2**62))
    return _json(await _in_thread(request.app[DATA].data.compare, a, b))


async def api_session(request: web.Request) -> web.Response:
    return _json(await _in_thread(request.app[DATA].data.session, _db(request), _id(request, "session")))


async def api_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the status each time the data changes (and a comment now and then to keep it open)."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
    response.headers.update(SECURITY_HEADERS)
    await response.prepare(request)
    changed = asyncio.Event()
    request.app[WATCHERS].append(changed)
    try:
        seen = -1
        while not request.app[CLOSING].is_set():
            data = request.app[DATA].data
            if data.version != seen:
                seen = data.version
                await response.write(f"data: {json.dumps(data.status())}\n\n".encode())
            changed.clear()
            try:
                await asyncio.wait_for(changed.wait(), HEARTBEAT_S)
            except TimeoutError:
                await response.write(b": still here\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        request.app[WATCHERS].remove(changed)
    return response


async def end_event_streams(app: web.Application) -> None:
    """Let open event streams end, so that stopping does not wait on the browsers still listening."""
    app[CLOSING].set()
    for event in list(app[WATCHERS]):
        event.set()


async def keep_up(app: web.Application, step: Callable[[], bool], live: bool, pause_after_change: float = POLL_S) -> None:
    """Run ``step`` (in a thread) now and, live, again ``POLL_S`` after it ends, or ``pause_after_change``
    after a step that changed something; wake every event stream when it did. A failing step (a
    half-written tail) is reported, not fatal."""
    data = app[DATA].data
    while True:
        try:
            changed = await _in_thread(step)
        except Exception as exc:  # noqa: BLE001 - the live view must outlive one bad read
            data.last_error = f"{time.strftime('%H:%M:%S')} {exc}"
            changed = False
        if changed:
            _wake(app)
        if not live:
            return
        await asyncio.sleep(pause_after_change if changed else POLL_S)


ROUTES = {
    "/": index,
    "/static/{name}": static,
    "/api/status": _whole("status"),
    "/api/facets": _whole("facets"),
    "/api/requests": api_requests,
    "/api/request/{trace}": api_request,
    "/api/hop/{hop}": api_hop,
    "/api/compare": api_compare,
    "/api/sessions": _whole("sessions"),
    "/api/session/{session}": api_session,
    "/api/latency": _whole("latency"),
    "/api/graph": _whole("graph"),
    "/api/events": api_events,
}


def _wake(app: web.Application) -> None:
    for event in list(app[WATCHERS]):
        event.set()


def _load_data(paths: list[Path]) -> Data:
    """The analysis side, imported here (pandas, numpy, the analyzer), listing the same requests."""
    from hoptrace.ui._data import Data

    data = Data(paths)
    data.preview()
    return data


async def load_and_keep_up(app: web.Application, paths: list[Path], live: bool) -> None:
    """Swap the preview for the loaded Data, then keep it up: new requests are listed within a
    poll, while the (slower) tail analysis that adds their trees and findings runs beside it."""
    try:
        data = await _in_thread(_load_data, paths)
    except Exception as exc:  # noqa: BLE001 - shown in the status line; the listing stays
        app[DATA].data.last_error = f"{time.strftime('%H:%M:%S')} {exc}"
        _wake(app)
        return
    app[DATA].data = data
    _wake(app)
    if live:
        loop = asyncio.get_running_loop()
        data.on_change = lambda: loop.call_soon_threadsafe(_wake, app)
        data.follow()
    # A tail analysis takes about a second while hops arrive: those that came meanwhile wait for the
    # next one, which starts at once rather than POLL_S later (half of POLL_S off the average wait).
    steps = [keep_up(app, data.refresh, live, pause_after_change=0.0)] + ([keep_up(app, data.peek, live)] if live else [])
    await asyncio.gather(*steps)


def make_app(first: Preview, hosts: set[str], live: bool) -> web.Application:
    app = web.Application(middlewares=[guard])
    app[DATA] = Current(first)
    app[WATCHERS] = []
    app[HOSTS] = hosts
    app[CLOSING] = asyncio.Event()
    app.on_shutdown.append(end_event_streams)
    app.add_routes([web.get(path, handler) for path, handler in ROUTES.items()])

    async def background(app: web.Application):
        task = asyncio.create_task(load_and_keep_up(app, first.paths, live))
        yield
        task.cancel()
        if not isinstance(app[DATA].data, Preview):
            await _in_thread(app[DATA].data.close)

    app.cleanup_ctx.append(background)
    return app


async def start_ui(dbs: list[str | Path], host: str = "127.0.0.1", port: int = 0, live: bool = True) -> tuple[str, web.AppRunner]:
    """Serve the UI of ``dbs`` on ``host:port`` (0: a free port) in the running loop.

    Returns once the newest requests are read from SQL (pandas, the analyzer and the
    analysis load in the background) with the URL and the runner; ``await runner.cleanup()``
    stops it. With ``live``, hops recorded later show up within about ``POLL_S`` plus a
    tail analysis. A file that is not a trace DB raises ``TraceFileError`` here.
    """
    first = await _in_thread(Preview, [Path(p) for p in dbs])
    hosts = {host, "localhost", "127.0.0.1", "::1"} if host in ("127.0.0.1", "localhost", "::1") else {host}
    runner = web.AppRunner(make_app(first, hosts, live), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()  # the port the OS picked when port is 0
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{bound[1]}/", runner
