"""The call graph between services: who calls whom, how often, how slowly, how badly.

:func:`graph_layout` places the boxes and bends the arrows (data, in inches);
:func:`draw_graph` draws them. The nodes and edges are the presentation model's
(:func:`hoptrace.analyzer._model.graph_tables`): a 4xx counts where it happened.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pandas as pd

from hoptrace._errors import AnalysisError
from hoptrace._format import as_float, as_int
from hoptrace.analyzer._analysis import Analysis
from hoptrace.analyzer._model import CLIENT, model
from hoptrace.plot._common import (
    NEUTRAL,
    OUTCOME_COLORS,
    clean_text,
    fmt_ms,
    new_figure,
    outcome_legend_handles,
)

XS, YS = 3.6, 1.55  # inches between layers / between boxes in a layer (data units are inches)
NODE_GID = "node:"  # + service name
EDGE_GID = "edge:"  # + "caller->callee"


@dataclass
class Node:
    name: str
    x: float
    y: float
    text: str
    color: str  # box outline: the worst failure of the calls it served, grey without


@dataclass
class Edge:
    caller: str
    callee: str
    label: str
    color: str
    width: float
    rad: float  # arc3 bend; 0 for a straight arrow
    label_xy: tuple[float, float]
    label_ha: str


@dataclass
class GraphLayout:
    nodes: list[Node]
    edges: list[Edge]
    self_loops: dict[str, list[str]]  # service -> labels of its calls to itself
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
    nodes = list(dict.fromkeys([*e["caller"], *e["callee"], *services["service"].astype(str)]))
    layer = _layers(nodes, e)
    pos, widest, depth = _positions(nodes, layer, e)
    stats = {str(r["service"]): r for _, r in services.iterrows()}
    placed = [Node(n, *pos[n], *_node_text(n, stats.get(n), e)) for n in nodes]
    pairs = set(zip(e["caller"], e["callee"]))
    max_calls = max(float(e["calls"].max() or 1), 1.0)
    drawn, loops = [], defaultdict(list)
    for r in e.itertuples():
        label = _edge_label(r)
        if r.caller == r.callee:
            loops[r.caller].append(label.replace("\n", ", "))
        else:
            drawn.append(_edge(r, label, pos, layer, pairs, max_calls))
    total = int(pd.to_numeric(e["calls"], errors="coerce").fillna(0).sum())
    return GraphLayout(
        nodes=placed,
        edges=drawn,
        self_loops=dict(loops),
        worst={_worst(r) for r in e.itertuples() if _failures(r)},
        xlim=(-0.62 * XS, (depth - 1 + 0.62) * XS),
        ylim=(-((widest - 1) / 2 + 0.6) * YS, ((widest - 1) / 2 + 0.6) * YS),
        size=(max(8.0, XS * depth + 1.4), max(3.6, YS * widest + 1.8)),
        title=title
        or f"Service call graph: {len(nodes) - (CLIENT in nodes)} services, {len(e)} caller → callee pairs, "
        f"{total} calls\narrow width ∝ calls; box: hops served, p95 latency, error rate (5xx and failed; 4xx beside)",
    )


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


def _edge(r, label: str, pos, layer, pairs, max_calls: float) -> Edge:
    a, b = r.caller, r.callee
    (xa, ya), (xb, yb) = pos[a], pos[b]
    length = math.hypot(xb - xa, yb - ya)
    if layer[b] == layer[a] + 1 and (b, a) not in pairs:
        rad = 0.0
    elif layer[a] == layer[b]:
        # Same column: bulge out to the right, clear of the boxes in between.
        rad = math.copysign(min(max(1.9 / max(length, 1e-6), 0.25), 0.9), yb - ya)
        rad *= 1.6 if (b, a) in pairs and ya > yb else 1.0
    elif (b, a) in pairs and layer[b] == layer[a] + 1:
        rad = 0.2  # a pair calling each other: two arcs, one on each side
    else:
        rad = _skip_rad(pos, layer, a, b, length)
    # Label at the curve's midpoint: the chord's middle, pushed sideways by rad/2 of its length.
    lx, ly = (xa + xb) / 2 + 0.5 * rad * (yb - ya), (ya + yb) / 2 - 0.5 * rad * (xb - xa)
    ha = "center"
    if layer[a] == layer[b]:
        ha = "left" if rad * (yb - ya) > 0 else "right"
        lx += 0.06 if ha == "left" else -0.06
    calls = as_int(r.calls) or 0
    color = OUTCOME_COLORS[_worst(r)] if _failures(r) else NEUTRAL
    return Edge(a, b, label, color, 1.0 + 2.2 * math.log10(1 + 9 * calls / max_calls), rad, (lx, ly), ha)


def _skip_rad(pos, layer, a: str, b: str, length: float) -> float:
    """The bend of an arrow that jumps columns: half a row off the chord, on the side with more room."""
    (xa, ya), (xb, yb) = pos[a], pos[b]
    r = min(max(YS / max(length, 1e-6), 0.12), 0.6)
    lo, hi = sorted((layer[a], layer[b]))
    between = [p for n, p in pos.items() if lo < layer[n] < hi] or [p for n, p in pos.items() if n not in (a, b)]

    def room(rad: float) -> float:
        mx, my = (xa + xb) / 2 + 0.5 * rad * (yb - ya), (ya + yb) / 2 - 0.5 * rad * (xb - xa)
        return min((math.hypot(mx - x, my - y) for x, y in between), default=math.inf)

    up, down = room(r), room(-r)
    return r if up > down + 1e-9 or (abs(up - down) <= 1e-9 and xb >= xa) else -r


def _layers(nodes: list[str], e: pd.DataFrame) -> dict[str, int]:
    """Longest call path from the client (or from nodes nobody calls), cycles broken.

    Every call then points rightwards: a callee sits in a column after all its
    callers, so no arrow has to run up or down a column through other boxes.
    """
    out_edges: dict[str, list[str]] = defaultdict(list)
    indeg: dict[str, int] = defaultdict(int)
    for a, b in dict.fromkeys(zip(e["caller"], e["callee"])):
        if a != b:
            out_edges[a].append(b)
            indeg[b] += 1
    # Depth-first from the sources: an edge to a node still on the stack closes a cycle.
    starts = ([CLIENT] if CLIENT in nodes else []) + [n for n in nodes if indeg[n] == 0 and n != CLIENT] + list(nodes)
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    back: set[tuple[str, str]] = set()
    topo: list[str] = []
    for root in starts:
        if root in state:
            continue
        state[root] = 1
        stack = [(root, iter(out_edges[root]))]
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                topo.append(node)
                stack.pop()
            elif state.get(nxt) == 1:
                back.add((node, nxt))
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(out_edges[nxt])))
    layer = dict.fromkeys(nodes, 0)
    for a in reversed(topo):  # topological order of the graph without its back edges
        for b in out_edges[a]:
            if (a, b) not in back:
                layer[b] = max(layer[b], layer[a] + 1)
    return layer


def _positions(nodes, layer, e) -> tuple[dict[str, tuple[float, float]], int, int]:
    by_layer = defaultdict(list)
    for n in nodes:
        by_layer[layer[n]].append(n)
    preds = defaultdict(list)
    for a, b in zip(e["caller"], e["callee"]):
        preds[b].append(a)
    pos: dict[str, tuple[float, float]] = {}
    for L in sorted(by_layer):
        members = by_layer[L]
        # Barycentre ordering: a node sits near the average height of its callers.
        members.sort(
            key=lambda n: (
                -np.mean([pos[p][1] for p in preds[n] if p in pos]) if any(p in pos for p in preds[n]) else 0.0,
                n != CLIENT,
                n,
            )
        )
        for i, n in enumerate(members):
            pos[n] = (float(L) * XS, ((len(members) - 1) / 2 - i) * YS)
    return pos, max(len(v) for v in by_layer.values()), max(by_layer) + 1


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
    """The Figure of a :class:`GraphLayout`."""
    from matplotlib.lines import Line2D

    fig = new_figure(*lay.size)
    ax = fig.add_subplot()
    ax.set(xlim=lay.xlim, ylim=lay.ylim)
    ax.set_aspect("equal", adjustable="box")  # so the curve maths of the layout holds in inches
    ax.axis("off")
    boxes = {}
    for n in lay.nodes:
        bbox = {"boxstyle": "round,pad=0.55", "fc": "#f7f7f7" if n.name != CLIENT else "#ffffff", "ec": n.color,
                "lw": 1.6 if n.color != NEUTRAL else 1.0}  # fmt: skip
        t = ax.text(n.x, n.y, n.text, ha="center", va="center", fontsize=8.5, zorder=2, gid=NODE_GID + n.name, bbox=bbox)
        boxes[n.name] = (n, t.get_bbox_patch())
    for ed in lay.edges:
        (a, pa), (b, pb) = boxes[ed.caller], boxes[ed.callee]
        ax.annotate("", xy=(b.x, b.y), xytext=(a.x, a.y), gid=EDGE_GID + f"{ed.caller}->{ed.callee}", zorder=3,
                    arrowprops={"arrowstyle": "-|>", "mutation_scale": 14, "lw": ed.width, "color": ed.color,
                                "shrinkA": 3, "shrinkB": 3, "connectionstyle": f"arc3,rad={ed.rad}", "patchA": pa,
                                "patchB": pb})  # fmt: skip
        text = "\n".join(clean_text(part, 60) for part in ed.label.split("\n"))
        ax.text(*ed.label_xy, text, ha=ed.label_ha, va="center", fontsize=7.5, zorder=4,
                color="#222222" if ed.color == NEUTRAL else ed.color,
                bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85})  # fmt: skip
    for name, labels in lay.self_loops.items():
        n = boxes[name][0]
        ax.annotate("", xy=(0, 0), xytext=(0, 0), gid=EDGE_GID + f"{name}->{name}", visible=False)
        ax.annotate("↻ calls itself: " + "; ".join(labels), xy=(n.x, n.y), xytext=(0, -34), textcoords="offset points",
                    ha="center", va="top", fontsize=7.5, color=NEUTRAL, zorder=4)  # fmt: skip
    handles = [Line2D([], [], color=NEUTRAL, lw=2, label="calls without errors")]
    handles += [Line2D([], [], color=h.get_facecolor(), lw=2, label=f"calls with errors, worst: {h.get_label()}")
                for h in outcome_legend_handles(lay.worst)]  # fmt: skip
    for text in ax.texts:  # all drawn inside the axes: the layout need not measure them
        text.set_in_layout(False)
    fig.legend(handles=handles, loc="outside upper left", ncols=min(len(handles), 4), fontsize=8, frameon=False)
    ax.set_title(lay.title, loc="left", fontsize=11)
    return fig
