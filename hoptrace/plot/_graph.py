"""The call graph between services: who calls whom, how often, how slowly, how badly."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
import pandas as pd

from hoptrace._errors import AnalysisError
from hoptrace.plot._common import (
    NEUTRAL,
    OUTCOME_COLORS,
    as_float,
    as_int,
    clean_text,
    col,
    durations_ms,
    finite_floats,
    fmt_ms,
    frame,
    hop_outcomes,
    new_figure,
    outcome_legend_handles,
    require_hops,
)

CLIENT = "client"
XS, YS = 3.6, 1.55  # inches between layers / between boxes in a layer (data units are inches)
NODE_GID = "node:"  # + service name
EDGE_GID = "edge:"  # + "caller->callee"
WORST = ("error", "5xx", "4xx")


def service_graph(analysis: Any, *, title: str | None = None):
    """The call-graph Figure of ``analysis``."""
    hops = require_hops(analysis)
    edges = frame(analysis, "edges")
    if len(edges) == 0:
        edges = edges_from_hops(hops)
    return service_graph_figure(edges, frame(analysis, "services"), hops, title=title)


def edges_from_hops(hops: pd.DataFrame) -> pd.DataFrame:
    """caller, callee, calls, errors, p95_ms from ``hops`` (needs parent_id; roots are called by ``client``)."""
    callers = _callers(hops)
    h = hops.assign(
        caller=callers,
        callee=col(hops, "service").astype(str),
        _err=hop_outcomes(hops).isin(["5xx", "error"]),
        _d=durations_ms(hops),
    )
    g = h.groupby(["caller", "callee"], sort=True)
    out = g.agg(calls=("callee", "size"), errors=("_err", "sum"), p95_ms=("_d", lambda s: s.quantile(0.95)))
    return out.reset_index()


def _callers(hops: pd.DataFrame) -> pd.Series:
    services = col(hops, "service").astype(str)
    parents = np.trunc(finite_floats(col(hops, "parent_id")))
    has_parent = ~np.isnan(parents)
    callers = np.full(len(hops), CLIENT, dtype=object)
    # A parent id that is no hop here (cut off by a time window) leaves the hop called by the client.
    callers[has_parent] = services.reindex(parents[has_parent].astype(np.int64)).fillna(CLIENT).to_numpy(dtype=object)
    return pd.Series(callers, index=hops.index)


def service_graph_figure(
    edges: pd.DataFrame, services: pd.DataFrame | None = None, hops: pd.DataFrame | None = None, *, title: str | None = None
):
    """Draw services as boxes in layers from the client, and one arrow per caller → callee.

    ``edges``: ``Analysis.edges`` (caller, callee, calls, errors, p95_ms). Arrows grow with
    the call count and are labelled ``N calls · p95``; grey when no call failed, else in
    the outcome colour of the worst failure (needs ``hops``; 5xx colour without).
    ``services``: ``Analysis.services`` for the per-box hop count, p95 and error rate.
    """
    if edges is None or len(edges) == 0:
        raise AnalysisError("no calls recorded: no service graph to draw")
    e = edges.copy()
    e["caller"] = col(e, "caller").astype(str)
    e["callee"] = col(e, "callee").astype(str)
    nodes = list(dict.fromkeys([*e["caller"], *e["callee"]]))
    if services is not None and len(services) and "service" in services.columns:
        nodes += [str(s) for s in services["service"] if str(s) not in nodes]
    layer = _layers(nodes, e)
    pos, widest, depth = _positions(nodes, layer, e)

    stats = {}
    if services is not None and len(services) and "service" in services.columns:
        stats = {str(r["service"]): r for _, r in services.iterrows()}
    worst = _worst_outcomes(hops) if hops is not None and len(hops) else {}
    worst_node: dict[str, str] = {}
    for (_, b), o in worst.items():
        if b not in worst_node or WORST.index(o) < WORST.index(worst_node[b]):
            worst_node[b] = o

    fig = new_figure(max(8.0, XS * depth + 1.4), max(3.6, YS * widest + 1.8))
    ax = fig.add_subplot()
    ax.set_xlim(-0.62 * XS, (depth - 1 + 0.62) * XS)
    ax.set_ylim(-((widest - 1) / 2 + 0.6) * YS, ((widest - 1) / 2 + 0.6) * YS)
    ax.set_aspect("equal", adjustable="box")  # so the curve maths below holds in inches
    ax.axis("off")

    patches = {}
    for name in nodes:
        x, y = pos[name]
        text, ec = _node_text(name, stats.get(name), e, worst_node.get(name))
        t = ax.text(
            x,
            y,
            text,
            ha="center",
            va="center",
            fontsize=8.5,
            zorder=2,
            gid=NODE_GID + name,
            bbox={
                "boxstyle": "round,pad=0.55",
                "fc": "#f7f7f7" if name != CLIENT else "#ffffff",
                "ec": ec,
                "lw": 1.6 if ec != NEUTRAL else 1.0,
            },
        )
        patches[name] = t.get_bbox_patch()

    pairs = set(zip(e["caller"], e["callee"]))
    max_calls = max(float(pd.to_numeric(e.get("calls", pd.Series([1]))).max() or 1), 1.0)
    self_loops = defaultdict(list)
    for _, r in e.iterrows():
        a, b = r["caller"], r["callee"]
        calls = as_int(r.get("calls")) or 0
        errors = as_int(r.get("errors")) or 0
        p95 = as_float(r.get("p95_ms"))
        label = f"{calls} call{'s' * (calls != 1)} · p95 {fmt_ms(p95)}" + (
            f"\n{errors} error{'s' * (errors != 1)}" if errors else ""
        )
        color = NEUTRAL if not errors else OUTCOME_COLORS[worst.get((a, b), "5xx")]
        if a == b:
            self_loops[a].append(label.replace("\n", ", "))
            ax.annotate("", xy=(0, 0), xytext=(0, 0), gid=EDGE_GID + f"{a}->{b}", visible=False)
            continue
        (xa, ya), (xb, yb) = pos[a], pos[b]
        forward = layer[b] == layer[a] + 1 and (b, a) not in pairs
        length = math.hypot(xb - xa, yb - ya)
        if forward:
            rad = 0.0
        elif layer[a] == layer[b]:
            # Same column: bulge out to the right, clear of the boxes in between.
            rad = math.copysign(min(max(1.9 / max(length, 1e-6), 0.25), 0.9), yb - ya)
            if (b, a) in pairs and ya > yb:
                rad *= 1.6
        elif (b, a) in pairs and layer[b] == layer[a] + 1:
            rad = 0.2  # a pair calling each other: two arcs, one on each side
        else:
            rad = _skip_rad(pos, layer, a, b, length)
        lw = 1.0 + 2.2 * math.log10(1 + 9 * calls / max_calls)
        ax.annotate(
            "",
            xy=(xb, yb),
            xytext=(xa, ya),
            gid=EDGE_GID + f"{a}->{b}",
            zorder=3,
            arrowprops={
                "arrowstyle": "-|>",
                "mutation_scale": 14,
                "lw": lw,
                "color": color,
                "shrinkA": 3,
                "shrinkB": 3,
                "connectionstyle": f"arc3,rad={rad}",
                "patchA": patches[a],
                "patchB": patches[b],
            },
        )
        # Label at the curve's midpoint: the chord's middle, pushed sideways by rad/2 of its length.
        mx, my = (xa + xb) / 2, (ya + yb) / 2
        dx, dy = xb - xa, yb - ya
        lx, ly = mx + 0.5 * rad * dy, my - 0.5 * rad * dx
        side = {"ha": "center"}
        if layer[a] == layer[b]:
            side = {"ha": "left" if rad * (yb - ya) > 0 else "right"}
            lx += 0.06 if side["ha"] == "left" else -0.06
        ax.text(
            lx,
            ly,
            "\n".join(clean_text(part, 60) for part in label.split("\n")),
            **side,
            va="center",
            fontsize=7.5,
            zorder=4,
            color="#222222" if not errors else color,
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85},
        )
    for name, labels in self_loops.items():
        x, y = pos[name]
        ax.annotate(
            "↻ calls itself: " + "; ".join(labels),
            xy=(x, y),
            xytext=(0, -34),
            textcoords="offset points",
            ha="center",
            va="top",
            fontsize=7.5,
            color=NEUTRAL,
            zorder=4,
        )

    from matplotlib.lines import Line2D

    present = {worst.get((a, b), "5xx") for a, b, er in zip(e["caller"], e["callee"], col(e, "errors", 0)) if (as_int(er) or 0)}
    handles = [Line2D([], [], color=NEUTRAL, lw=2, label="calls without errors")]
    handles += [
        Line2D([], [], color=h.get_facecolor(), lw=2, label=f"calls with errors, worst: {h.get_label()}")
        for h in outcome_legend_handles(present)
    ]
    for text in ax.texts:  # all drawn inside the axes: the layout need not measure them
        text.set_in_layout(False)
    fig.legend(handles=handles, loc="outside upper left", ncols=min(len(handles), 4), fontsize=8, frameon=False)
    total = int(pd.to_numeric(col(e, "calls", 0), errors="coerce").fillna(0).sum())
    ax.set_title(
        title
        or f"Service call graph: {len(nodes) - (CLIENT in nodes)} services, {len(e)} caller → callee pairs, "
        f"{total} calls\narrow width ∝ calls; box: hops served, p95 latency, error rate",
        loc="left",
        fontsize=11,
    )
    return fig


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
    widest = max(len(v) for v in by_layer.values())
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
        k = len(members)
        for i, n in enumerate(members):
            pos[n] = (float(L) * XS, ((k - 1) / 2 - i) * YS)
    return pos, widest, max(by_layer) + 1


def _node_text(name: str, stats, e: pd.DataFrame, worst: str | None) -> tuple[str, str]:
    if name == CLIENT:
        calls = int(pd.to_numeric(e.loc[e["caller"] == CLIENT, "calls"], errors="coerce").fillna(0).sum()) if "calls" in e else 0
        return f"client\n{calls} request{'s' * (calls != 1)}", NEUTRAL
    label = clean_text(name, 28)
    if stats is None:
        return label, NEUTRAL
    count = as_int(stats.get("count"))
    rate = as_float(stats.get("error_rate"))
    lines = [label, f"{'?' if count is None else count} hop{'s' * (count != 1)} · p95 {fmt_ms(stats.get('p95_ms'))}"]
    if rate is not None:
        lines.append(f"errors {100 * rate:.1f}%")
    return "\n".join(lines), OUTCOME_COLORS[worst or "5xx"] if rate else NEUTRAL


def _worst_outcomes(hops: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(caller, callee) -> the worst outcome (error, then 5xx, then 4xx) of its calls, for pairs with any."""
    outcomes = hop_outcomes(hops)
    bad = outcomes.isin(WORST).to_numpy(dtype=bool)
    calls = pd.DataFrame(
        {
            "caller": _callers(hops)[bad].to_numpy(),
            "callee": col(hops, "service").astype(str)[bad].to_numpy(),
            "rank": outcomes[bad].map(WORST.index).to_numpy(),
        }
    )
    worst = calls.groupby(["caller", "callee"], sort=False)["rank"].min()
    return {pair: WORST[int(rank)] for pair, rank in worst.items()}
