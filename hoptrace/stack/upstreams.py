"""Small real upstreams for hoptrace's tests and benchmarks, run as processes.

    python -m hoptrace.stack.upstreams hello PORT       # answers every request with 200 {"ok": true}
    python -m hoptrace.stack.upstreams truncate PORT    # promises 100 bytes, sends 10, closes
    python -m hoptrace.stack.upstreams otlp PORT        # an OTLP/HTTP trace receiver counting spans

Each prints ``listening`` once it accepts connections. Both bind 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from aiohttp import web


def hello_app() -> web.Application:
    """One endpoint, a count of what it served at GET /_stats (not counted itself)."""
    served = 0

    async def hello(request: web.Request) -> web.Response:
        nonlocal served
        served += 1
        await request.read()
        return web.json_response({"ok": True})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"total": served})

    app = web.Application()
    app.router.add_get("/_stats", stats)
    app.router.add_route("*", "/{path:.*}", hello)
    return app


def otlp_app() -> web.Application:
    """POST /v1/traces (protobuf, decoded with opentelemetry-proto); the spans received at GET /_stats."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse

    spans = 0

    async def traces(request: web.Request) -> web.Response:
        nonlocal spans
        message = ExportTraceServiceRequest.FromString(await request.read())
        spans += sum(len(scope.spans) for resource in message.resource_spans for scope in resource.scope_spans)
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"total": spans})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/_stats", stats)
    return app


async def _truncating_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # Reads one request's headers, then sends a response whose body stops short:
    # what a crashing upstream looks like to the proxy.
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n0123456789")
    await writer.drain()
    writer.close()


async def _serve(kind: str, port: int) -> None:
    if kind in ("hello", "otlp"):
        runner = web.AppRunner(hello_app() if kind == "hello" else otlp_app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        close = runner.cleanup
    elif kind == "truncate":
        server = await asyncio.start_server(_truncating_connection, "127.0.0.1", port)

        async def close() -> None:
            server.close()
            await server.wait_closed()
    else:
        raise SystemExit(f"unknown upstream {kind!r}: use hello, truncate or otlp")
    print("listening", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await close()


if __name__ == "__main__":
    if len(sys.argv) != 3 or not sys.argv[2].isdecimal():
        raise SystemExit("usage: python -m hoptrace.stack.upstreams hello|truncate|otlp PORT")
    asyncio.run(_serve(sys.argv[1], int(sys.argv[2])))
