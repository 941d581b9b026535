"""``hoptrace import``: HAR and mitmproxy flow files into a trace DB, one capture and one transaction per file."""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode

from hoptrace._errors import ImportFileError, RouteError, TraceFileError
from hoptrace.db import open_for_writing
from hoptrace.exchange import _flows, _har
from hoptrace.exchange._rows import HOP_ROW_COLUMNS, CaptureSink, Rows, atomic, build_hop_rows, imported_as

# Flows turned into rows and inserted at a time: bounds memory on a 1 GB file.
BATCH = 500
_REQUEST_SIZE, _RESPONSE_SIZE = HOP_ROW_COLUMNS.index("request_size"), HOP_ROW_COLUMNS.index("response_size")


@dataclass
class ServiceNames:
    """Which service a flow belongs to: by the proxy listener it came in on, or by the address it went to.

    ``by_port``: listen port -> name (reverse-mode listeners, from a stack file);
    ``by_address``: ``host:port`` -> name (``--service``, a stack file's upstreams and
    listeners). Anything unnamed is named after its upstream address, as the recorder does.
    """

    by_address: dict[str, str] = field(default_factory=dict)
    by_port: dict[int, str] = field(default_factory=dict)

    @classmethod
    def build(cls, specs: Iterable[str], routes: Iterable = ()) -> ServiceNames:
        names = cls()
        for route in routes:
            upstream = route.upstream.split("://", 1)[-1].split("/", 1)[0]
            names.by_address[_with_port(upstream, route.upstream)] = route.name
            names.by_port[route.listen_port] = route.name
            for host in ("127.0.0.1", "localhost"):
                names.by_address.setdefault(f"{host}:{route.listen_port}", route.name)
        for spec in specs:
            address, sep, name = spec.rpartition("=")
            host, colon, port = address.rpartition(":")
            # isdecimal() alone takes other scripts' digits ("٣٠٠١") and ports past 65535.
            if not sep or not name or not colon or not host or not (port.isascii() and port.isdecimal() and 1 <= int(port) <= 65535):
                raise RouteError(f"--service {spec!r}: expected HOST:PORT=NAME with a port 1-65535, e.g. 127.0.0.1:3001=auth")
            names.by_address[f"{host.strip('[]').lower()}:{int(port)}"] = name
        return names

    def of(self, flow: http.HTTPFlow) -> tuple[str, str, int]:
        """(service name, upstream URL, listen port or 0) of a flow."""
        mode = _reverse_mode(flow)
        if mode is not None:
            host, port = mode.address
            listen = mode.listen_port() or (flow.client_conn.sockname or (None, 0))[1] or 0
            name = self.by_port.get(listen) or self.by_address.get(f"{host.lower()}:{port}") or f"{host}:{port}"
            return name, mode.data, listen
        host, port = flow.request.host.lower(), flow.request.port
        address = f"{host}:{port}"
        name = self.by_address.get(address) or flow.metadata.get(_har.SERVICE) or address
        return name, f"{flow.request.scheme}://{address}", 0


@dataclass
class Imported:
    path: Path
    kind: str  # har | flows
    capture_id: int
    hops: int
    addon_errors: int
    skipped: int
    already: bool = False
    notes: list[str] = field(default_factory=list)  # one line per flow or entry left out, naming it


def import_file(
    path: Path,
    db: Path,
    names: ServiceNames,
    entry: str | None,
    key: bytes,
    progress: Callable[[str], None] | None = None,
) -> Imported:
    """Import one file as one capture of ``db``, in one transaction: all of it or nothing."""
    try:
        fileobj = path.open("rb")
    except OSError as exc:
        raise ImportFileError(f"{path}: cannot open ({exc.strerror or exc})") from None
    with fileobj:
        if os.fstat(fileobj.fileno()).st_size == 0:
            raise ImportFileError(f"{path}: empty file, neither HAR nor a mitmproxy flow file")
        digest = _har.file_digest(fileobj)
        kind = "har" if _looks_like_json(fileobj) else "flows"
        source = f"import:{kind}:{digest}"
        conn = open_for_writing(db)
        try:
            if (existing := imported_as(conn, source)) is not None:
                return Imported(path, kind, existing, 0, 0, 0, already=True)
            return _import(conn, fileobj, path, kind, digest, names, entry, key, progress)
        except sqlite3.Error as exc:  # rolled back already: nothing of this file is in the DB
            raise TraceFileError(f"{db}: could not write the import of {path} ({exc}); nothing of it was written") from None
        finally:
            conn.close()


def _import(conn, fileobj: BinaryIO, path: Path, kind: str, digest: str, names, entry, key, progress) -> Imported:
    from mitmproxy.version import VERSION

    sink = CaptureSink(conn, f"import:{kind}:{digest}")
    skipped, notes = [0], []
    if kind == "har":
        reader = _har.Entries(fileobj, str(path), digest)
        flows: Iterable[http.HTTPFlow] = reader
        notes = reader.notes
    else:
        flows = _flows.read_flows(fileobj, str(path), skipped, notes)
    size = os.fstat(fileobj.fileno()).st_size
    ticker = _Ticker(progress, path, size, fileobj)
    known: set[str] = set()
    with atomic(conn):
        sink.open(VERSION)
        for batch in _batches(flows, BATCH):
            named = []
            for flow in batch:
                name, upstream, listen = names.of(flow)
                sink.routes.setdefault(name, {"upstream": upstream, "listen_port": listen})
                named.append((name, flow))
            rows = build_hop_rows(named, key, sink.capture_id, known)
            _keep_stated_sizes(rows, batch)
            sink.write(rows)
            ticker.tick(sink.hops)
        if kind == "har":
            skipped[0], entry = reader.skipped, entry or reader.entry
        if entry is not None and entry not in sink.routes:
            raise ImportFileError(f"{path}: entry {entry!r} is not a service of this file ({', '.join(sorted(sink.routes)) or 'no hops'})")
        sink.close(entry)
    ticker.done()
    return Imported(path, kind, sink.capture_id, sink.hops, sink.addon_errors, skipped[0], notes=notes)


def _keep_stated_sizes(rows: Rows, flows: list[http.HTTPFlow]) -> None:
    """A HAR's bodySize over the length of a body the HAR left out or replaced."""
    for index, flow in enumerate(flows):
        stated = flow.metadata.get(_har.SIZES)
        if stated is None:
            continue
        row = list(rows.hops[index])
        for position, size in zip((_REQUEST_SIZE, _RESPONSE_SIZE), stated, strict=True):
            if size is not None:
                row[position] = size
        rows.hops[index] = tuple(row)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _looks_like_json(fileobj: BinaryIO) -> bool:
    """A HAR starts with ``{`` (after a BOM or whitespace); a flow file with a tnetstring length."""
    head = fileobj.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    fileobj.seek(0)
    return head.startswith(b"{")


def _reverse_mode(flow: http.HTTPFlow) -> ReverseMode | None:
    mode = getattr(flow.client_conn, "proxy_mode", None)
    if isinstance(mode, str):
        try:
            mode = ProxyMode.parse(mode)
        except ValueError:
            return None
    return mode if isinstance(mode, ReverseMode) else None


def _with_port(address: str, url: str) -> str:
    host, colon, port = address.rpartition(":")
    if colon and port.isdecimal():
        return f"{host.strip('[]').lower()}:{int(port)}"
    return f"{address.lower()}:{443 if url.startswith('https') else 80}"


def fingerprint_key(hex_key: str | None) -> bytes:
    """The key for token fingerprints, read as the recorder reads ``hoptrace_fingerprint_key``:
    given, else from ``$HOPTRACE_FINGERPRINT_KEY``, else random for this import."""
    from mitmproxy import exceptions

    from hoptrace.addons.recorder import _fingerprint_key

    try:
        return _fingerprint_key(hex_key)
    except exceptions.OptionsError as exc:
        raise ImportFileError(f"--fingerprint-key: {str(exc).partition(': ')[2]}") from None


class _Ticker:
    """Progress on stderr for large files: only on a terminal, at most once a second."""

    def __init__(self, progress, path: Path, size: int, fileobj: BinaryIO) -> None:
        self._progress = progress if progress is not None and sys.stderr.isatty() else None
        self._path, self._size, self._fileobj = path, size, fileobj
        self._next = time.monotonic() + 1.0
        self._shown = False

    def tick(self, hops: int) -> None:
        if self._progress is None or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + 1.0
        done = self._fileobj.tell() / self._size if self._size else 1.0
        self._progress(f"\r  {self._path.name}: {hops} hops, {done:.0%} of {self._size / 1e6:.1f} MB ")
        self._shown = True

    def done(self) -> None:
        if self._shown:
            self._progress("\n")
