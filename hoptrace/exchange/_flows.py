"""Reading mitmproxy flow files (``mitmdump -w``), one flow at a time."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import BinaryIO

from mitmproxy import exceptions, http
from mitmproxy.io import FlowReader
from mitmproxy.version import FLOW_FORMAT_VERSION, VERSION

from hoptrace._errors import ImportFileError
from hoptrace._stored import YEAR_10000

# The timestamps mitmproxy keeps on a flow's parts (request, response, error, connections).
_TIMES = ("timestamp_start", "timestamp_end", "timestamp", "timestamp_tcp_setup", "timestamp_tls_setup")
# mitmproxy's own words, before a ":" that is followed by a quoted value.
_WORDS = re.compile(r"[A-Za-z ,.]+(?:: [A-Za-z ,.]+)*")


def read_flows(fileobj: BinaryIO, name: str, skipped: list[int], notes: list[str]) -> Iterator[http.HTTPFlow]:
    """The HTTP flows of a flow file, in file order; ``skipped[0]`` counts the others (TCP, UDP, DNS).

    A flow with a time no hop can carry (``inf``, NaN, before 1970 or past year 9999) is left
    out with a line in ``notes`` naming it and the field: its hop would have no start or end.

    mitmproxy's reader upgrades older flow formats (``compat.migrate_flow``) and refuses
    newer ones; anything it cannot read becomes one ImportFileError naming the flow.
    """
    flows = FlowReader(fileobj).stream()
    index = 0
    while True:
        index += 1
        try:
            flow = next(flows)
        except StopIteration:
            return
        except exceptions.FlowReadException as exc:
            raise ImportFileError(f"{name}: flow {index}: {_reason(exc)}") from None
        except Exception as exc:  # a hostile file reaches parts of the reader that raise other things
            raise ImportFileError(f"{name}: flow {index}: not a readable mitmproxy flow ({type(exc).__name__})") from None
        if isinstance(flow, http.HTTPFlow) and flow.request is not None:
            if field := _unusable_time(flow):
                notes.append(f"{name}: flow {index}: {field} is not a usable time; skipped")
                continue
            yield flow
        else:
            skipped[0] += 1


def _unusable_time(flow: http.HTTPFlow) -> str | None:
    """The first timestamp of ``flow`` that is set but no time (``request.timestamp_start``), if any."""
    parts = {"request": flow.request, "response": flow.response, "error": flow.error, "server_conn": flow.server_conn, "client_conn": flow.client_conn}
    for part, obj in parts.items():
        for attribute in _TIMES:
            value = getattr(obj, attribute, None)
            if value is not None and not (isinstance(value, int | float) and 0 <= value < YEAR_10000):
                return f"{part}.{attribute}"
    return None


def _reason(exc: Exception) -> str:
    """mitmproxy's message up to where it would quote the file's bytes (which may hold a token)."""
    text = " ".join(str(exc).split())
    if "cannot read files with flow format version" in text:
        return f"{text} (this is mitmproxy {VERSION}, flow format {FLOW_FORMAT_VERSION}; upgrade hoptrace's mitmproxy)"
    words = _WORDS.match(text)
    return words[0].rstrip(" :") if words and words[0].strip() else "not a mitmproxy flow file"
