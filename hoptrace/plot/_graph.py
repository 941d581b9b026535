"""The call graph between services: who calls whom, how often, how slowly, how badly.

:func:`graph_layout` has Graphviz ``dot`` place the boxes and route the arrows (data,
in inches: ``dot`` routes each edge as a spline around the boxes, and gives each edge
label its own place, so at 12+ services no arrow runs through a box and no label sits on
another); :func:`draw_graph` draws them. The nodes and edges are the presentation
model's (:func:`hoptrace.analyzer._model.graph_tables`): a 4xx counts where it happened.
Graphviz is Debian's ``graphviz`` package (``python3 dev.py`` installs it as root),
driven through the ``graphviz`` PyPI package.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from hoptrace._errors import AnalysisError
from hoptrace._format import as_float, as_int
from hoptrace.analyzer._analysis import Analysis
from hoptrace.analyzer._model import CLIENT, model
from hoptrace.plot import _svg as s
from hoptrace.plot._common import (
    NEUTRAL,
    OUTCOME_COLORS,
    OUTCOME_LABELS,
    PlotError,
    clean_text,
    fmt_ms,
    new_figure,
    outcome_legend_handles,
)

NODE_GID = "node:"  # + service name
EDGE_GID = "edge:"  # + "caller->callee"
NODE_FONT, EDGE_FONT = 8.5, 7.5  # points, as dot measures them and matplotlib draws them
TITLE_IN, LEGEND_IN, MARGIN_IN = 0.6, 0.35, 0.15


@dataclass
class Node:
    name: str
    x: float  # centre, inches from the drawing's bottom left
    y: float
    text: str
    color: str  # box outline: the worst failure of the calls it served, grey without
    width: float = 1.0  # box, inches
    height: float = 0.5


@dataclass
class Edge:
    caller: str
    callee: str
    label: str
    color: str
    width: float  # line width, points
    points: list[tuple[float, float]]  # cubic Bezier control points from caller to callee (1 + 3k), inches
    label_xy: tuple[float, float]


@dataclass
class GraphLayout:
    nodes: list[Node]
    edges: list[Edge]
    worst: set[str]  # outcomes of the failing edges (for the legend)
    xlim: tuple[float, float]
    ylim: tuple[float, float]
    size: tuple[float, float]  # inches
    title: str


def service_graph(analysis: Analysis, *, title: str | None = None):
    """The call-graph Figure of ``analysis``."""
    nodes, edges = model(analysis).graph
    return service_graph_figure(edges, nodes, title=title)


def service_graph_figure(edges: pd.DataFrame, services: pd.DataFrame | None = None, *, title: str | None = None):
    """Draw services as boxes in layers from the client, and one arrow per caller → callee.

    ``edges``: caller, callee, calls, errors, p95_ms, and from the model ``client_errors``
    and ``worst`` (``Model.graph``). Arrows grow with the call count and are labelled
    ``N calls · p95``; grey when no call failed, else in the outcome colour of the worst
    failure. ``services``: the model's nodes (``Analysis.services`` plus ``worst``).
    """
    return draw_graph(graph_layout(edges, services, title=title))


def graph_layout(edges: pd.DataFrame, services: pd.DataFrame | None = None, *, title: str | None = None) -> GraphLayout:
    if edges is None or len(edges) == 0:
        raise AnalysisError("no calls recorded: no service graph to draw")
    e = edges.assign(caller=edges["caller"].astype(str), callee=edges["callee"].astype(str))
    if "worst" not in e:  # plain Analysis.edges: failures are 5xx or broken transfers
        e = e.assign(client_errors=0, worst=None)
    services = services if services is not None else pd.DataFrame(columns=["service"])
    names = list(dict.fromkeys([*e["caller"], *e["callee"], *services["service"].astype(str)]))
    stats = {str(r["service"]): r for _, r in services.iterrows()}
    nodes = [Node(n, 0.0, 0.0, *_node_text(n, stats.get(n), e)) for n in names]
    max_calls = max(float(e["calls"].max() or 1), 1.0)
    drawn = [_edge(r, _edge_label(r), max_calls) for r in e.itertuples()]
    width, height = _place(nodes, drawn)
    total = int(pd.to_numeric(e["calls"], errors="coerce").fillna(0).sum())
    return GraphLayout(
        nodes=nodes,
        edges=drawn,
        worst={_worst(r) for r in e.itertuples() if _failures(r)},
        xlim=(-MARGIN_IN, width + MARGIN_IN),
        ylim=(-MARGIN_IN, height + MARGIN_IN),
        size=(max(width + 2 * MARGIN_IN, 6.0), height + 2 * MARGIN_IN + TITLE_IN + LEGEND_IN),
        title=title
        or f"Service call graph: {len(names) - (CLIENT in names)} services, {len(e)} caller → callee pairs, "
        f"{total} calls\narrow width ∝ calls; box: hops served, p95 latency, error rate (5xx and failed; 4xx beside)",
    )


def _place(nodes: list[Node], edges: list[Edge]) -> tuple[float, float]:
    """Run ``dot`` on the graph, then set each node's box and each edge's spline and label
    place from its answer (points, y up); returns the drawing's size in inches."""
    import graphviz

    ids = {n.name: f"n{k}" for k, n in enumerate(nodes)}  # untrusted names never reach dot's syntax
    g = graphviz.Digraph(
        graph_attr={"rankdir": "LR", "nodesep": "0.35", "ranksep": "0.9", "splines": "spline", "pad": "0"},
        node_attr={"shape": "box", "style": "rounded", "fontsize": str(NODE_FONT), "fontname": "DejaVu Sans",
                   "margin": "0.12,0.06"},  # fmt: skip
        edge_attr={"fontsize": str(EDGE_FONT), "fontname": "DejaVu Sans", "arrowsize": "0.8"},
    )
    for n in nodes:
        g.node(ids[n.name], label=_dot_label(n.text))
    for k, ed in enumerate(edges):
        g.edge(ids[ed.caller], ids[ed.callee], label=_dot_label(ed.label), id=f"e{k}", penwidth=f"{ed.width:.2f}")
    try:
        answer = json.loads(g.pipe(format="json", encoding="utf-8"))
    except graphviz.ExecutableNotFound:
        raise PlotError(
            "the service graph needs Graphviz `dot`: run `python3 dev.py` set-up as root, or `apt-get install graphviz`"
        ) from None
    except graphviz.CalledProcessError as exc:
        raise PlotError(f"Graphviz dot could not lay out the service graph: {str(exc.stderr or exc)[:200]}") from None
    by_id = {o["name"]: o for o in answer.get("objects", [])}
    for n in nodes:
        o = by_id[ids[n.name]]
        n.x, n.y = (float(v) / 72.0 for v in o["pos"].split(","))
        n.width, n.height = float(o["width"]), float(o["height"])
    for o in answer.get("edges", []):
        ed = edges[int(o["id"][1:])]
        ed.points = _spline(o)
        ed.label_xy = tuple(float(v) / 72.0 for v in o["lp"].split(",")) if o.get("lp") else ed.points[len(ed.points) // 2]
    x0, y0, x1, y1 = (float(v) / 72.0 for v in answer["bb"].split(","))
    return x1 - x0, y1 - y0


def _spline(o: dict) -> list[tuple[float, float]]:
    """The edge's Bezier control points (inches), from dot's drawing operations, ending at the arrow's tip."""
    points = [tuple(float(v) / 72.0 for v in p) for op in o.get("_draw_", []) if op.get("op") in ("b", "B")
              for p in op["points"]]  # fmt: skip
    tips = [p for op in o.get("_hdraw_", []) if op.get("op") in ("p", "P") for p in op["points"]]
    if tips and points:  # the arrowhead's point farthest from the spline's end is its tip
        end = np.array(points[-1])
        tip = max((np.array(p, dtype=float) / 72.0 for p in tips), key=lambda p: float(np.hypot(*(p - end))))
        points[-1] = (float(tip[0]), float(tip[1]))
    return points


def _dot_label(text: str) -> str:
    """Lines for dot: backslashes doubled (dot reads escapes in labels), centred line breaks."""
    return "\\n".join(line.replace("\\", "\\\\") for line in text.split("\n")) + "\\n"


def _failures(r) -> int:
    return (as_int(r.errors) or 0) + (as_int(r.client_errors) or 0)


def _worst(r) -> str:
    return r.worst if isinstance(r.worst, str) else "5xx"


def _edge_label(r) -> str:
    calls, errors, client = as_int(r.calls) or 0, as_int(r.errors) or 0, as_int(r.client_errors) or 0
    failed = [f"{errors} error{'s' * (errors != 1)}"] if errors else []
    failed += [f"{client} 4xx"] if client else []
    label = f"{calls} call{'s' * (calls != 1)} · p95 {fmt_ms(as_float(r.p95_ms))}"
    return label + ("\n" + ", ".join(failed) if failed else "")


def _edge(r, label: str, max_calls: float) -> Edge:
    calls = as_int(r.calls) or 0
    color = OUTCOME_COLORS[_worst(r)] if _failures(r) else NEUTRAL
    return Edge(r.caller, r.callee, label, color, 1.0 + 2.2 * math.log10(1 + 9 * calls / max_calls), [], (0.0, 0.0))


def _node_text(name: str, stats, e: pd.DataFrame) -> tuple[str, str]:
    if name == CLIENT:
        calls = int(pd.to_numeric(e.loc[e["caller"] == CLIENT, "calls"], errors="coerce").fillna(0).sum())
        return f"client\n{calls} request{'s' * (calls != 1)}", NEUTRAL
    label = clean_text(name, 28)
    if stats is None:
        return label, NEUTRAL
    count, rate, client = as_int(stats["count"]), as_float(stats["error_rate"]), as_int(stats.get("client_errors"))
    lines = [label, f"{'?' if count is None else count} hop{'s' * (count != 1)} · p95 {fmt_ms(stats['p95_ms'])}"]
    if rate is not None:
        lines.append(f"errors {100 * rate:.1f}%" + (f" + {client} 4xx" if client else ""))
    worst = stats.get("worst")
    failing = bool(rate) or bool(client)
    return "\n".join(lines), OUTCOME_COLORS[worst if isinstance(worst, str) else "5xx"] if failing else NEUTRAL


def draw_graph(lay: GraphLayout):
    """The Figure of a :class:`GraphLayout`, one inch of layout to one inch of figure."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    from matplotlib.path import Path as MPath

    fig = new_figure(*lay.size, layout=None)
    w, h = lay.size
    plot_w, plot_h = lay.xlim[1] - lay.xlim[0], lay.ylim[1] - lay.ylim[0]
    ax = fig.add_axes((0, LEGEND_IN / h, plot_w / w, plot_h / h))
    ax.set(xlim=lay.xlim, ylim=lay.ylim)
    ax.axis("off")
    for n in lay.nodes:
        ax.add_patch(FancyBboxPatch((n.x - n.width / 2, n.y - n.height / 2), n.width, n.height, zorder=2,
                                    boxstyle="round,pad=0,rounding_size=0.06", lw=1.6 if n.color != NEUTRAL else 1.0,
                                    fc="#f7f7f7" if n.name != CLIENT else "#ffffff", ec=n.color))  # fmt: skip
        ax.text(n.x, n.y, n.text, ha="center", va="center", fontsize=NODE_FONT, zorder=3, gid=NODE_GID + n.name)
    for ed in lay.edges:
        codes = [MPath.MOVETO] + [MPath.CURVE4] * (len(ed.points) - 1)
        ax.add_patch(FancyArrowPatch(path=MPath(ed.points, codes), arrowstyle="-|>", mutation_scale=12, lw=ed.width,
                                     color=ed.color, zorder=1, gid=EDGE_GID + f"{ed.caller}->{ed.callee}"))  # fmt: skip
        text = "\n".join(clean_text(part, 60) for part in ed.label.split("\n"))
        ax.text(*ed.label_xy, text, ha="center", va="center", fontsize=EDGE_FONT, zorder=4,
                color="#222222" if ed.color == NEUTRAL else ed.color)  # fmt: skip
    handles = [Line2D([], [], color=NEUTRAL, lw=2, label="calls without errors")]
    handles += [Line2D([], [], color=h.get_facecolor(), lw=2, label=f"calls with errors, worst: {h.get_label()}")
                for h in outcome_legend_handles(lay.worst)]  # fmt: skip
    fig.legend(handles=handles, loc="lower left", ncols=min(len(handles), 4), fontsize=8, frameon=False)
    fig.text(0.1 / w, 1 - 0.1 / h, lay.title, ha="left", va="top", fontsize=11)
    return fig


# -- drawing straight to SVG (the report) ---------------------------------------------------

PX_IN = 100  # px per inch of dot's layout: its 8.5 pt node text becomes ~12 px, as the PNG at 100 dpi drew it


def graph_svg(lay: GraphLayout) -> str:
    """``<svg>`` text of a :class:`GraphLayout`, as :func:`draw_graph` draws it: dot's boxes, splines
    and label places scaled to ``PX_IN`` px an inch; arrowheads as markers in the edge's colour."""
    title = lay.title.split("\n")
    items = [(f'<line x1="0" x2="12" y1="-4" y2="-4" stroke="{NEUTRAL}" stroke-width="2"/>', "calls without errors")]
    items += [(f'<line x1="0" x2="12" y1="-4" y2="-4" stroke="{OUTCOME_COLORS[o]}" stroke-width="2"/>',
               f"calls with errors, worst: {OUTCOME_LABELS[o]}") for o in OUTCOME_COLORS if o in lay.worst]  # fmt: skip
    top = 8 + 18 * len(title) + 8
    plot_w, plot_h = (lay.xlim[1] - lay.xlim[0]) * PX_IN, (lay.ylim[1] - lay.ylim[0]) * PX_IN
    width = max(plot_w, 600.0)
    legend_y = top + plot_h + 18
    height = legend_y + s.LEGEND_LINE * (s.legend_lines(items, s.PAD, width - s.PAD) - 1) + 12
    px = lambda x, y: ((x - lay.xlim[0]) * PX_IN, top + (lay.ylim[1] - y) * PX_IN)  # noqa: E731 - dot's y runs up
    colors = dict.fromkeys(ed.color for ed in lay.edges)
    markers = "".join(f'<marker id="hoptrace-arrow-{c.lstrip("#")}" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="11" '
                      f'markerHeight="11" markerUnits="userSpaceOnUse" orient="auto"><path d="M0 0 L10 5 L0 10 Z" '
                      f'fill="{c}"/></marker>' for c in colors)  # fmt: skip
    out = [f'<svg width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
           f'font-family="DejaVu Sans, Arial, sans-serif" font-size="12"><defs>{markers}</defs>']  # fmt: skip
    out += [f'<text x="{s.PAD}" y="{22 + 18 * i}" font-size="{14 if i == 0 else 12}" font-weight="{600 if i == 0 else 400}">'
            f"{s.esc(line)}</text>" for i, line in enumerate(title)]  # fmt: skip
    for ed in lay.edges:
        pts = [px(*p) for p in ed.points]
        d = f"M{pts[0][0]:.1f} {pts[0][1]:.1f}" + "".join(
            "C" + " ".join(f"{x:.1f} {y:.1f}" for x, y in pts[k : k + 3]) for k in range(1, len(pts) - 2, 3)
        )
        out.append(f'<path id="{s.esc(EDGE_GID + ed.caller + "->" + ed.callee)}" d="{d}" fill="none" stroke="{ed.color}" '
                   f'stroke-width="{ed.width * PX_IN / 72:.2f}" marker-end="url(#hoptrace-arrow-{ed.color.lstrip("#")})"/>')  # fmt: skip
    for n in lay.nodes:
        x, y = px(n.x - n.width / 2, n.y + n.height / 2)
        fill = "#fff" if n.name == CLIENT else "#f7f7f7"
        out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{n.width * PX_IN:.1f}" height="{n.height * PX_IN:.1f}" rx="6" '
                   f'fill="{fill}" stroke="{n.color}" stroke-width="{1.6 if n.color != NEUTRAL else 1.0}"/>')  # fmt: skip
        out.append(_centred(*px(n.x, n.y), n.text.split("\n"), NODE_FONT * PX_IN / 72, "#222", NODE_GID + n.name))
    for ed in lay.edges:
        text = [clean_text(part, 60) for part in ed.label.split("\n")]
        # dot puts a label beside its edge, touching it: a white halo keeps the text readable over the line.
        out.append(_centred(*px(*ed.label_xy), text, EDGE_FONT * PX_IN / 72, "#222" if ed.color == NEUTRAL else ed.color,
                            halo=True))  # fmt: skip
    out.append(s.legend(items, s.PAD, legend_y, width - s.PAD))
    out.append("</svg>")
    return "".join(out)


def _centred(x: float, y: float, texts: list[str], size: float, color: str, ident: str | None = None, halo: bool = False) -> str:
    """Lines centred on (x, y), as dot placed them."""
    first = y - (len(texts) - 1) * size * 1.2 / 2 + size * 0.35
    attrs = f' text-anchor="middle" fill="{color}"' + (f' data-name="{s.esc(ident)}"' if ident else "")
    attrs += ' stroke="#fff" stroke-width="3" paint-order="stroke"' if halo else ""
    return s.lines(x, first, texts, size=round(size, 1), step=size * 1.2, attrs=attrs)
