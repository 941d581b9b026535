"""Types shared by the proxy (``hoptrace.proxy``) and the recorder (``hoptrace.addons``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Route:
    """One reverse listener: the service behind it, where it forwards, the port it listens on."""

    name: str
    upstream: str
    listen_port: int


@dataclass
class Counters:
    """What happened to the flows of a capture. Every counter only ever grows.

    ``seen``: requestheaders events (requests that reached the proxy).
    ``recorded``: hops written to the trace file (bare rows included).
    ``dropped``: hops that will never be in the file (queue full, or the file would not take them).
    ``addon_errors``: flows the recorder could not fully read; each is still a row, with the reason.
    ``write_errors``: times the trace file refused a write (disk full, I/O error, ...).
    ``restarts``: times the row process died and was replaced.
    ``otlp_sent`` / ``otlp_dropped``: spans streamed to ``--otlp-endpoint``, and those that could not be.
    """

    seen: int = 0
    recorded: int = 0
    dropped: int = 0
    addon_errors: int = 0
    write_errors: int = 0
    restarts: int = 0
    otlp_sent: int = 0
    otlp_dropped: int = 0
    last_error: str | None = field(default=None, repr=False)

    def summary(self) -> str:
        text = (
            f"{self.recorded} hops recorded, {self.dropped} dropped, "
            f"{self.addon_errors} addon errors, {self.write_errors} write errors"
        )
        if unfinished := self.seen - self.recorded - self.dropped:
            text += f", {unfinished} unfinished"
        if self.otlp_dropped < 0:  # the streaming process never answered (it died: its error is above)
            text += "; OTLP STREAMING FAILED: the streaming process stopped, spans after its last batch were not sent"
        elif self.otlp_sent or self.otlp_dropped:
            text += f"; {self.otlp_sent} spans streamed over OTLP, {self.otlp_dropped} dropped"
        if self.restarts:
            text += f", row process restarted {self.restarts} times"
        return text

    @property
    def lost(self) -> bool:
        """True when a hop that reached the proxy is not in the file: the capture is incomplete."""
        return bool(self.dropped or self.write_errors)


__all__ = ["Counters", "Route"]
