"""F10: remote connections. Whether interaction attribution ranks a distributed-harm task's planted
pieces first, per layer and method, and the arc diagram of one task's pairwise interactions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from interp.figures.results import FigureSpec, Table, result_file
from interp.figures.style import SEGMENT_COLORS, error_bars, styled

METHOD_STYLE = {"exact": ("#000000", "solid"), "grad": ("#E69F00", "dash"), "ig": ("#009E73", "dot")}
METHOD_LABELS = {"exact": "exact (joint vs separate ablation)", "grad": "second-order gradient",
                 "ig": "integrated-gradient interactions"}


def _arcs(example, layer: int) -> list[go.Scatter]:
    """Segments as nodes in context order; an arc per pair, width ∝ |I|, red where the pair acts
    together (I > 0), blue where the two stand in for each other."""
    segs = list(example["segments"])
    names = [f"{s['name']}" for s in segs]
    j = [int(x) for x in example["layers"]].index(layer)
    pairs = [(tuple(int(i) for i in t), float(v.floats()[j])) for t, v in zip(example["terms"], example["values"])
             if len(t.value) == 2]
    top = max((abs(v) for _, v in pairs), default=0.0) or 1.0
    traces = []
    for (a, b), v in sorted(pairs, key=lambda p: abs(p[1])):
        if abs(v) < 0.02 * top:
            continue
        t = np.linspace(0, np.pi, 30)
        mid, r = (a + b) / 2, (b - a) / 2
        traces.append(go.Scatter(x=mid - r * np.cos(t), y=r * np.sin(t), mode="lines", showlegend=False,
                                 line=dict(width=1 + 7 * abs(v) / top, color="#CC3311" if v > 0 else "#0077BB"),
                                 hovertemplate=f"{names[a]} × {names[b]}: I = {v:.3f}<extra></extra>"))
    traces.append(go.Scatter(x=list(range(len(names))), y=[0] * len(names), mode="markers+text", text=names,
                             textposition="bottom center", showlegend=False, hoverinfo="text",
                             marker=dict(size=14, color=[SEGMENT_COLORS.get(f"{s['kind']}", "#777") for s in segs])))
    return traces


def fig_f10_interactions(results: Mapping[str, Any]) -> FigureSpec:
    """Left: the share of harmful distributed tasks whose planted pair has the largest pairwise
    interaction, per layer, for each method and task kind (95% intervals). Right: the exact
    pairwise interactions of the first pair task at the layer where exact recovery is best."""
    d = result_file(results, "interactions.json")
    kinds = d["kinds"]
    fig = make_subplots(1, 2, column_widths=[0.45, 0.55], horizontal_spacing=0.08,
                        subplot_titles=("planted pair ranked first", "one task's pairwise interactions (exact)"))
    rows = []
    for kind in kinds.keys():
        rec = kinds[kind]
        for method in (m for m in METHOD_STYLE if rec.get(m) is not None):
            r = rec[method]
            layers = [int(x) for x in r["layers"]]
            iv = [t.interval() for t in r["top1"]]
            color, dash = METHOD_STYLE[method]
            fig.add_trace(go.Scatter(x=layers, y=[i.value for i in iv], error_y=error_bars(iv), mode="lines+markers",
                                     name=f"{kind}: {METHOD_LABELS[method]}", line=dict(color=color, dash=dash),
                                     marker=dict(symbol="circle" if kind == "pair" else "diamond", size=8)), 1, 1)
            rows += [(kind, method, layer, i, float(m)) for layer, i, m in zip(layers, iv, r["mean_rank"])]
    fig.update_xaxes(title_text="layer (segments ablated from)", dtick=1, row=1, col=1)
    fig.update_yaxes(title_text="share of tasks", range=[-0.02, 1.05], row=1, col=1)
    pair = kinds["pair"]
    best = max(zip([int(x) for x in pair["exact"]["layers"]], [float(t["value"]) for t in pair["exact"]["top1"]]),
               key=lambda x: (x[1], -x[0]))[0]
    example = pair["example"]
    for tr in _arcs(example, best):
        fig.add_trace(tr, 1, 2)
    fig.update_xaxes(visible=False, row=1, col=2)
    fig.update_yaxes(visible=False, row=1, col=2)
    planted = ", ".join(f"{p}: {s}" for p, s in pair["planted"][0].value.items())
    title = "F10 · Remote connections: does interaction attribution find the planted pieces?"
    counts = ", ".join(f"{k}: n = {kinds[k]['n']}" for k in kinds.keys())
    caption = (f"Harmful distributed-harm tasks of the {d['split']} split ({counts}): "
               f"the harm needs pieces in different segments (pair: the act in the user turn and the target in a tool "
               f"observation; triple: also the policy in the system prompt). Metric: {d['metric']} at the decision; "
               f"each segment replaced by the {d['baseline']}. Left: how often the planted pair's interaction is the "
               f"largest of all pairs (ties count against it). Right: task {example['transcript']} at layer {best}, "
               f"planted {planted}; arcs join segments in context order, width ∝ |I|, red: the two raise the signal "
               "together, blue: either stands in for the other.")
    table = Table(("kind", "method", "layer", "planted pair first", "mean rank"), tuple(rows),
                  "planted pair ranked first, per layer")
    return FigureSpec("F10", "interactions", title, caption, (table,), styled(fig, title, height=520))
