"""The benchmark's load generator: a bounded, keep-alive HTTP/1.1 load, run as its own process.

    python benchmarks/loadgen.py --port 18080 --clients 16 --requests 4000 [--warmup 8]

Opens ``--clients`` keep-alive connections to 127.0.0.1:PORT, each a user with its
own HS256 bearer token (pyjwt), sends ``--warmup`` requests per connection, prints
``warm`` and waits for a line on stdin (the driver reads the proxy's CPU counters
then), then sends exactly ``--requests`` requests spread over the connections
(each sends its next one when its last response is complete) and prints one JSON
line: counts, elapsed time, latency percentiles. Nothing is retried; a request
that fails is counted, and the whole run stops at ``--max-seconds``.

The client is a small asyncio Protocol rather than aiohttp's client: it shares two
cores with the proxy and the service, so every microsecond it spends per request
is taken from what it measures (aiohttp's client costs several times more).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field

import jwt

# Not a real secret: the benchmark's services never verify the tokens.
SECRET = "hoptrace-benchmark-hs256-secret-32b!"


def make_token(user: int, now: int) -> str:
    """A token shaped like an OAuth access token for one user (~450 bytes)."""
    claims = {
        "iss": "https://auth.bench.internal/realms/shop",
        "sub": f"user-{user:05d}",
        "aud": ["orders-api", "inventory-api"],
        "azp": "web-frontend",
        "iat": now,
        "nbf": now,
        "exp": now + 900,
        "jti": str(uuid.uuid4()),
        "scope": "openid profile orders:read orders:write inventory:read",
        "roles": ["customer", "beta-tester"],
        "tenant": "eu-west-1",
        "email": f"user{user}@example.test",
    }
    return jwt.encode(claims, SECRET, algorithm="HS256", headers={"kid": "bench-key-1"})


class Connection(asyncio.Protocol):
    """One keep-alive connection; ``request`` returns the response's status when it is complete."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None
        self.need: int | None = None  # bytes of the whole response, once its head is parsed
        self.status = 0
        self.chunked = False
        self.sent_at = 0.0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.need is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            self.status = int(head[9:12])
            length = head.find(b"\r\ncontent-length:")
            if length >= 0:
                stop = head.find(b"\r\n", length + 2)
                self.need = end + 4 + int(head[length + 17 : stop if stop >= 0 else None])
                self.chunked = False
            elif b"transfer-encoding: chunked" in head:
                self.need = -1
                self.chunked = True
            else:
                self._fail("response without Content-Length")
                return
        if self.chunked:
            # Enough for the test services; a real client would parse every chunk.
            end = self.buffer.find(b"\r\n0\r\n\r\n")
            if end < 0:
                return
            self.need = end + 7
        if len(self.buffer) >= self.need:
            del self.buffer[: self.need]
            self.need = None
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(self.status)

    def _fail(self, why: str) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.close()

    async def request(self, data: bytes) -> int:
        if self.transport is None:
            raise ConnectionError("not connected")
        self.waiter = asyncio.get_running_loop().create_future()
        self.sent_at = time.monotonic()
        self.transport.write(data)
        return await self.waiter

    def expire(self, now: float, timeout: float) -> None:
        """Fail the request in flight if it is older than ``timeout`` (the watchdog calls this)."""
        if self.waiter is not None and not self.waiter.done() and now - self.sent_at > timeout:
            self._fail(f"no response within {timeout:.0f} s")


class Client:
    """One simulated user: a connection, a token, its own request headers."""

    def __init__(self, index: int, port: int, token: str) -> None:
        self.index = index
        self.port = port
        self.conn: Connection | None = None
        self.prefix = f"GET /api/orders/{index:03d}-".encode()
        self.suffix = (
            f" HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: hoptrace-bench/1\r\nAccept: application/json\r\n"
            f"Authorization: Bearer {token}\r\n"
        ).encode()

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, self.conn = await loop.create_connection(Connection, "127.0.0.1", self.port)

    def request_bytes(self, n: int) -> bytes:
        trace = os.urandom(16).hex()
        return b"%s%d?expand=items%s" % (self.prefix, n, self.suffix) + (
            f"traceparent: 00-{trace}-{trace[:16]}-01\r\n\r\n".encode()
        )

    async def send(self, n: int) -> int:
        """The status, or 0 when the request failed (the connection is then reopened)."""
        try:
            if self.conn is None or self.conn.transport is None:
                await self.connect()
            return await self.conn.request(self.request_bytes(n))
        except (OSError, ConnectionError):
            if self.conn is not None and self.conn.transport is not None:
                self.conn.transport.close()
            self.conn = None
            return 0


@dataclass
class Timed:
    """What the timed part saw: each request's latency (seconds) and status (0: failed)."""

    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    timed_out: bool = False
    elapsed_s: float = 0.0
    cpu_s: float = 0.0


async def run(args: argparse.Namespace) -> dict:
    now = int(time.time())
    clients = [Client(i, args.port, make_token(i, now)) for i in range(args.clients)]
    deadline = time.monotonic() + args.max_seconds
    await asyncio.gather(*(c.connect() for c in clients))
    watching = asyncio.create_task(_expire_stuck_requests(clients, args.timeout))
    warm_statuses = await _warm(clients, args.warmup, deadline)
    print("warm", flush=True)
    if not args.no_wait:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    timed = await _timed(clients, args.requests, deadline)
    watching.cancel()
    for client in clients:
        if client.conn is not None and client.conn.transport is not None:
            client.conn.transport.close()
    return _result(args, warm_statuses, timed)


async def _expire_stuck_requests(clients: list[Client], timeout: float) -> None:
    # One timer for every connection, rather than a timeout per request.
    while True:
        await asyncio.sleep(0.5)
        now = time.monotonic()
        for client in clients:
            if client.conn is not None:
                client.conn.expire(now, timeout)


async def _warm(clients: list[Client], per_client: int, deadline: float) -> list[int]:
    statuses: list[int] = []

    async def warm(client: Client) -> None:
        for n in range(per_client):
            if time.monotonic() > deadline:
                return
            statuses.append(await client.send(n))

    await asyncio.gather(*(warm(c) for c in clients))
    return statuses


async def _timed(clients: list[Client], requests: int, deadline: float) -> Timed:
    """Exactly ``requests`` requests over the connections, each sending its next once its last is answered."""
    timed = Timed()
    remaining = requests

    async def worker(client: Client) -> None:
        nonlocal remaining
        clock = time.perf_counter
        while remaining > 0:
            if time.monotonic() > deadline:
                timed.timed_out = True
                return
            remaining -= 1
            started = clock()
            status = await client.send(requests - remaining)
            timed.latencies.append(clock() - started)
            timed.statuses[status] = timed.statuses.get(status, 0) + 1

    cpu_started, started = sum(os.times()[:2]), time.perf_counter()
    await asyncio.gather(*(worker(c) for c in clients))
    timed.elapsed_s, timed.cpu_s = time.perf_counter() - started, sum(os.times()[:2]) - cpu_started
    return timed


def _result(args: argparse.Namespace, warm_statuses: list[int], timed: Timed) -> dict:
    """The JSON line the driver reads."""
    latencies, statuses, elapsed = sorted(timed.latencies), timed.statuses, timed.elapsed_s
    sent = len(latencies)
    ok = sum(n for status, n in statuses.items() if 200 <= status < 300)

    def pct(p: float) -> float | None:
        return latencies[min(sent - 1, int(p * sent))] * 1000 if sent else None

    return {
        "clients": args.clients,
        "requests": args.requests,
        "sent": sent,
        "ok": ok,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "failed": statuses.get(0, 0) + sum(1 for s in warm_statuses if s == 0),
        "warmup_sent": len(warm_statuses),
        "warmup_ok": sum(1 for s in warm_statuses if 200 <= s < 300),
        # Every response seen, warm-up included: what the service and the DB must also count.
        "responses": sum(n for status, n in statuses.items() if status) + sum(1 for s in warm_statuses if s),
        "elapsed_s": elapsed,
        "rps": ok / elapsed if elapsed > 0 else 0.0,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": latencies[-1] * 1000 if sent else None,
        "timed_out": timed.timed_out,
        # This process's own CPU, start-up included, and in the timed part alone.
        "cpu_s": sum(os.times()[:2]),
        "cpu_timed_s": timed.cpu_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="127.0.0.1 port to load (the only target allowed)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--warmup", type=int, default=8, help="requests per connection before the timed part")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="stop the whole run after this long")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for a line on stdin after the warm-up")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 0 or args.warmup < 0:
        parser.error("clients must be >= 1, requests and warmup >= 0")
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
