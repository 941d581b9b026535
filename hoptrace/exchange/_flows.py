"""Reading mitmproxy flow files (``mitmdump -w``), one flow at a time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from mitmproxy import exceptions, http
from mitmproxy.io import FlowReader
from mitmproxy.version import FLOW_FORMAT_VERSION, VERSION

from hoptrace._errors import ImportFileError


def read_flows(fileobj: BinaryIO, name: str, skipped: list[int]) -> Iterator[http.HTTPFlow]:
    """The HTTP flows of a flow file, in file order; ``skipped[0]`` counts the others (TCP, UDP, DNS).

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
            yield flow
        else:
            skipped[0] += 1


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    if "cannot read files with flow format version" in text:
        return f"{text} (this is mitmproxy {VERSION}, flow format {FLOW_FORMAT_VERSION}; upgrade hoptrace's mitmproxy)"
    return text[:200] or "not a mitmproxy flow file"
