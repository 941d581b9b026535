"""`hoptrace proxy`'s indexed hook dispatch calls exactly what mitmproxy's own dispatch calls.

Random chains of addons (sub-addons, async handlers, handlers that raise or halt the event,
hook attributes that are not callable) get mitmproxy's own event sequences of real flow
objects through both managers, then an addon added and one removed; the calls, in order,
and the errors logged must be the same.
A mitmproxy upgrade that changes how events are dispatched fails here.
"""

from __future__ import annotations

import asyncio
import logging

from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import eventsequence, exceptions, options
from mitmproxy.master import Master
from mitmproxy.test import tflow

from hoptrace.proxy._dispatch import IndexedAddons, indexed_master

HOOKS = ("requestheaders", "request", "responseheaders", "response", "error", "update", "tcp_start", "tcp_message", "tcp_end")
BEHAVIOURS = ("returns", "awaits", "raises", "halts", "is not callable")

handlers = st.dictionaries(st.sampled_from(HOOKS), st.sampled_from(BEHAVIOURS), max_size=4)
addon_specs = st.fixed_dictionaries({"hooks": handlers, "children": st.lists(handlers, max_size=2)})


def _handler(label: str, hook: str, behaviour: str, calls: list):
    def handle(self, flow):
        flow_ids = tuple(f.id for f in flow) if isinstance(flow, list) else flow.id  # `update` gets a list
        calls.append((label, hook, flow_ids))
        if behaviour == "raises":
            raise ValueError(f"{label} fails on {hook}")
        if behaviour == "halts":
            raise exceptions.AddonHalt
        if behaviour == "awaits":

            async def later():
                await asyncio.sleep(0)
                calls.append((label, f"{hook} awaited", flow_ids))

            return later()

    return handle


def _addon(label: str, hooks: dict[str, str], calls: list, children: list | None = None):
    methods = {
        hook: 5 if behaviour == "is not callable" else _handler(label, hook, behaviour, calls)
        for hook, behaviour in hooks.items()
    }
    # The label as its text: mitmproxy names the addon in what it logs.
    addon = type(label, (), {**methods, "__repr__": lambda self: label})()
    addon.name = label
    if children is not None:
        addon.addons = children
    return addon


def _chain(specs: list[dict], calls: list, prefix: str) -> list:
    return [
        _addon(
            f"{prefix}{i}",
            spec["hooks"],
            calls,
            [_addon(f"{prefix}{i}.{j}", hooks, calls) for j, hooks in enumerate(spec["children"])],
        )
        for i, spec in enumerate(specs)
    ]


def _flows() -> list:
    flows = [tflow.tflow(resp=True), tflow.tflow(err=True), tflow.ttcpflow(), tflow.ttcpflow(err=True)]
    for number, flow in enumerate(flows):
        flow.id = f"flow{number}"  # the same ids for both managers
    return flows


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def _through(master, flow) -> None:
    """Every event of ``flow``, as mitmproxy's proxy server sends them."""
    for event in eventsequence.iterate(flow):
        await master.addons.handle_lifecycle(event)


async def _dispatch(make_master, specs: list[dict], late: dict) -> tuple[list, list[str]]:
    calls: list = []
    errors = _Errors()
    logging.getLogger("mitmproxy").addHandler(errors)
    master = make_master(options.Options())
    try:
        chain = _chain(specs, calls, "addon")
        master.addons.add(*chain)
        for flow in _flows():
            await _through(master, flow)
        # The chain changes, a new addon comes, then the first leaves: the next events must see each change.
        for change in (lambda: master.addons.add(_addon("late", late, calls)), lambda: master.addons.remove(chain[0])):
            change()
            await _through(master, _flows()[0])
    finally:
        master._legacy_log_events.uninstall()  # what Master.run does on its way out
        logging.getLogger("mitmproxy").removeHandler(errors)
    return calls, errors.messages


@settings(max_examples=150, deadline=None)
@given(specs=st.lists(addon_specs, min_size=1, max_size=5), late=handlers)
def test_the_indexed_dispatch_calls_what_mitmproxys_calls(specs, late):
    expected = asyncio.run(_dispatch(Master, specs, late))
    got = asyncio.run(_dispatch(indexed_master, specs, late))
    assert got == expected


def test_the_proxys_master_dispatches_through_the_index():
    async def build():
        master = indexed_master(options.Options())
        calls: list = []
        master.addons.add(_addon("one", {"response": "returns"}, calls))
        # Option changes reach the addons once, through the new manager only.
        configured: list = []
        probe = type("Configured", (), {"load": lambda self, loader: loader.add_option("probe", int, 0, "a test's option")})()
        probe.configure = lambda updated: configured.append(set(updated))
        master.addons.add(probe)
        master.options.update(probe=1)
        await _through(master, _flows()[0])
        master.addons.clear()  # no addon left: the next events reach none
        await _through(master, _flows()[0])
        master._legacy_log_events.uninstall()  # what Master.run does on its way out
        return master, calls, configured

    master, calls, configured = asyncio.run(build())
    assert isinstance(master.addons, IndexedAddons)
    assert calls == [("one", "response", "flow0")]
    assert configured == [{"probe"}]
    # The events went through the index, which was rebuilt, empty, after the clear.
    assert "response" in master.addons._handlers and not any(master.addons._handlers.values())
