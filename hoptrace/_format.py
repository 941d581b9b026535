"""How every report and chart writes numbers, durations, times and text from the trace DB.

One rule for each, shared by the text, Markdown, JSON and HTML reports and the charts,
so a duration reads the same in a terminal and under a bar. No pandas or matplotlib
here: the CLI imports this cheaply.

Every string that came from the trace DB (services, paths, error messages) is
untrusted: :func:`clean` replaces control characters (C0, DEL, C1, and the Unicode
line and paragraph separators) before the text reaches a terminal or a label, so a
recorded path cannot carry escape sequences or break a line.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any

CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def is_missing(value: Any) -> bool:
    """None, NaN, NaT or pd.NA (a list or other container is not missing)."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, (str, bytes)) or hasattr(value, "__len__"):
        return False
    try:
        return bool(value != value)  # NaN-likes (numpy floats, NaT) are unequal to themselves
    except (TypeError, ValueError):  # pd.NA refuses bool(): it is missing
        return True


def as_float(value: Any) -> float | None:
    """A finite float, or None for None / NaN / NA / inf / garbage."""
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def as_int(value: Any) -> int | None:
    f = as_float(value)
    return int(f) if f is not None else None


def clean(value: Any, limit: int = 200, mark: str = "?") -> str:
    """DB text made safe to show: control characters replaced by ``mark``, at most ``limit`` characters."""
    if is_missing(value):
        return ""
    text = CONTROL.sub(mark, str(value))
    return text if len(text) <= limit else text[: max(limit - 1, 1)] + "…"


def count(n: int, noun: str) -> str:
    """``1 hop``, ``3 hops``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def ms(value: Any, missing: str = "?") -> str:
    """A duration in milliseconds: ``2.4 ms``, ``1400 ms``, ``12.5 s``."""
    f = as_float(value)
    if f is None:
        return missing
    if f >= 10_000:
        return f"{f / 1000:.1f} s"
    return f"{f:.0f} ms" if f >= 100 else f"{f:.1f} ms"


def seconds(value: float) -> str:
    """A span of seconds: ``0.39 s``, ``45 s``, ``12.0 min``, ``3.0 h`` (sign kept)."""
    a = abs(value)
    if a >= 7200:
        return f"{value / 3600:.1f} h"
    if a >= 120:
        return f"{value / 60:.1f} min"
    return f"{value:.0f} s" if a >= 10 else f"{value:.2f} s"


def token_left(remaining: Any) -> str:
    """A token's remaining life at a hop, in words: ``token 0.39 s left``, ``token expired 0.50 s ago``."""
    f = as_float(remaining)
    if f is None:
        return ""
    if f > 0:
        return f"token {seconds(f)} left"
    return "token expired at exp" if f == 0 else f"token expired {seconds(-f)} ago"


def utc(ts: Any, *, millis: bool = False, date: bool = True) -> str:
    """UNIX seconds as ``2024-01-15 12:42:15 UTC`` (``millis``: ``…:15.123 UTC``; no ``date``: ``12:42:15``)."""
    f = as_float(ts)
    if f is None:
        return "?"
    try:
        dt = datetime.fromtimestamp(f, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return "?"
    if not date:
        return dt.strftime("%H:%M:%S")
    return dt.strftime("%Y-%m-%d %H:%M:%S") + (f".{dt.microsecond // 1000:03d}" if millis else "") + " UTC"


def url_without_secrets(url: str) -> str:
    """``url`` as ``scheme://host[:port]/path``: its userinfo, query and fragment, where secrets
    travel (``user:password@``, ``?access_token=``), left out. Text, not parsing: it works on a
    string that is no valid URL too (a hostile file's), and keeps only what looks like a port."""
    scheme, _, rest = url.partition("://")
    rest = rest.split("?", 1)[0].split("#", 1)[0]
    netloc, slash, path = rest.partition("/")
    host, colon, port = netloc.rpartition("@")[2].rpartition(":")
    if not (port.isascii() and port.isdecimal() and len(port) <= 5 or port.endswith("]")):  # not a port: could be anything
        host, colon, port = host or port, "", ""
    return f"{scheme}://{host}{colon}{port}{slash}{path}"


def hop_ended(status: Any, failed: Any = 0, error_kind: Any = None) -> str:
    """How a hop ended, in a few words: ``401``, ``no response (timeout)``, ``200, then broken (truncated)``.

    The one phrasing of a hop's outcome: finding messages, report trees, chart labels.
    """
    kind = f" ({error_kind})" if isinstance(error_kind, str) else ""
    code = as_int(status)
    if code is None:
        return f"no response{kind}"
    return f"{code}, then broken{kind}" if not is_missing(failed) and bool(failed) else f"{code}"


# -- a terminal ---------------------------------------------------------------------------

# -- tables ----------------------------------------------------------------------------


def text_table(headers: list[str], rows: list[list[str]], right: frozenset[int] = frozenset()) -> list[str]:
    """Rows as aligned columns for a terminal, two spaces apart; ``right``: the right-aligned columns."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells):
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  " + "  ".join(out).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def md_cell(value) -> str:
    """A Markdown table cell: cleaned, with the characters that would end or format it escaped."""
    return clean(value).replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")


def md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    out += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in rows]
    return out


SEVERITY_COLOURS = {"error": "1;31", "warning": "33", "info": "36"}  # ANSI SGR: bold red, yellow, cyan
SEVERITY_WORDS = re.compile(r"(?<![\w-])(errors?|warnings?|info|ERRORS?|WARNINGS?|INFO)(?![\w-])")


def use_colour(stream=None) -> bool:
    """Colour for a terminal only: not when piped or redirected, nor when ``NO_COLOR`` is set (no-color.org)."""
    stream = sys.stdout if stream is None else stream
    return "NO_COLOR" not in os.environ and bool(getattr(stream, "isatty", lambda: False)())


def colour_severities(text: str) -> str:
    """``text`` with each severity word (error, warning, info) in its colour, as ANSI escapes."""

    def paint(match: re.Match) -> str:
        word = match[1]
        key = word.lower().rstrip("s") if word.lower() != "info" else "info"
        return f"\x1b[{SEVERITY_COLOURS[key]}m{word}\x1b[0m"

    return SEVERITY_WORDS.sub(paint, text)


class Progress:
    """A stderr line per stage of a long command (``hoptrace report: findings (1.2 s)``), on a terminal only."""

    def __init__(self, command: str, stream=None, *, after_s: float = 0.0) -> None:
        """``after_s``: say nothing until the command has run that long (a quick run stays quiet)."""
        self.command, self.started, self.after_s = command, time.perf_counter(), after_s
        self.stream = sys.stderr if stream is None else stream
        self.on = bool(getattr(self.stream, "isatty", lambda: False)())

    def __call__(self, stage: str) -> None:
        if self.on and time.perf_counter() - self.started >= self.after_s:
            print(f"{self.command}: {stage} ({time.perf_counter() - self.started:.1f} s)", file=self.stream, flush=True)
