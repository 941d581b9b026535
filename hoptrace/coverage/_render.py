"""Coverage as text, Markdown or JSON. Renderers only format the model."""

from __future__ import annotations

import json

from hoptrace._format import clean, md_table, text_table
from hoptrace.coverage._model import Coverage

JSON_FORMAT = "hoptrace-coverage"
JSON_VERSION = 1


def _headline(c: Coverage) -> list[str]:
    services = c.endpoints["service"].nunique() if len(c.endpoints) else 0
    out = [f"{len(c.endpoints)} endpoints exercised on {services} services, {len(c.edges)} caller -> callee calls"]
    if len(c.operations):
        called = int(c.operations["called"].sum())
        out.append(
            f"documented operations called: {called} of {len(c.operations)} ({100 * called / len(c.operations):.0f} %)"
            f" in the documents of {', '.join(c.specs)}"
        )
    return out


def _sections(c: Coverage) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, headers, rows) for each table, shared by the text and Markdown renderers."""
    sections = [
        (
            "Endpoints exercised",
            ["SERVICE", "ENDPOINT", "CALLS", "STATUS CLASSES", "CALLERS"],
            [[clean(r.service, 40), f"{r.method} {clean(r.path, 80)}" + ("" if r.documented is not False else " (undocumented)"),
              str(r.calls), " ".join(r.classes), ", ".join(map(str, r.callers))] for r in c.endpoints.itertuples()],
        ),
        (
            "Calls between services",
            ["CALLER", "CALLEE", "ENDPOINT", "CALLS", "STATUS CLASSES"],
            [[clean(r.caller, 40), clean(r.callee, 40), f"{r.method} {clean(r.path, 80)}", str(r.calls), " ".join(r.classes)]
             for r in c.edges.itertuples()],
        ),
    ]  # fmt: skip
    if len(c.operations):
        sections += [
            (
                "Documented operations never called",
                ["SERVICE", "OPERATION", "ID"],
                [[r.service, f"{r.method} {r.path}", r.operation_id or "-"] for r in c.never_called.itertuples()],
            ),
            (
                "Documented responses never seen (operations that were called)",
                ["SERVICE", "OPERATION", "RESPONSES NEVER SEEN"],
                [[r.service, f"{r.method} {r.path}", ", ".join(r.missing_responses)]
                 for r in c.operations.itertuples() if r.called and r.missing_responses],
            ),
        ]  # fmt: skip
    sections.append(
        (
            "Error paths never exercised (no 4xx, 5xx or failure seen)",
            ["SERVICE", "ENDPOINT", "STATUSES SEEN"],
            [
                [clean(r.service, 40), f"{r.method} {clean(r.path, 80)}", ", ".join(map(str, r.statuses))]
                for r in c.errors_never_seen.itertuples()
            ],
        )
    )
    return sections


def render_text(c: Coverage) -> str:
    out = [f"hoptrace interaction coverage of {clean(c.source or 'trace DB')}", *(f"  {line}" for line in _headline(c))]
    for title, headers, rows in _sections(c):
        out += ["", f"{title}: {len(rows)}"]
        if rows:
            out += text_table(headers, rows)
    return "\n".join(out) + "\n"


def render_markdown(c: Coverage) -> str:
    out = [f"## Interaction coverage of `{clean(c.source or 'trace DB')}`", "", *(f"- {line}" for line in _headline(c))]
    for title, headers, rows in _sections(c):
        out += ["", f"### {title} ({len(rows)})", ""]
        out += md_table(headers, rows) if rows else ["none"]
    return "\n".join(out) + "\n"


def render_json(c: Coverage) -> str:
    def records(frame) -> list[dict]:
        return [{k: (None if v is None else v) for k, v in row.items()} for row in frame.to_dict("records")]

    document = {
        "format": JSON_FORMAT,
        "version": JSON_VERSION,
        "source": c.source,
        "documents": c.specs,
        "endpoints": records(c.endpoints),
        "edges": records(c.edges),
        "operations": records(c.operations),
        "never_called": records(c.never_called),
        "errors_never_seen": records(c.errors_never_seen),
    }
    return json.dumps(document, indent=2, default=_plain)


def _plain(value):
    """numpy scalars and booleans as JSON numbers."""
    return value.item() if hasattr(value, "item") else str(value)


def render_comparison(diff: dict[str, dict[str, list[str]]], base: str, new: str, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(
            {"format": f"{JSON_FORMAT}-comparison", "version": JSON_VERSION, "base": base, "new": new, **diff}, indent=2
        )
    bullet = "- " if fmt == "markdown" else "  "
    out = [f"{'## ' if fmt == 'markdown' else ''}Coverage of {clean(new)} compared with {clean(base)}"]
    for what, change in diff.items():
        for verb, sign in (("added", "+"), ("lost", "-")):
            out += ["", f"{what} {verb}: {len(change[verb])}"]
            out += [f"{bullet}{sign} {clean(item, 200)}" for item in change[verb]]
    return "\n".join(out) + "\n"
