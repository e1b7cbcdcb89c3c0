"""Shared styling of the figures: sizes, colours, and trace helpers with 95% bands."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from probes.metrics import Interval

WIDTH, HEIGHT = 900, 500
Z95 = 1.96  # normal quantile for the 95% bands of a mean (mean ± Z95 · s.e.m.)
EPS = 1e-9  # PING scores are sums of k/n rates: one can miss an equal target by an ulp (as in interp.ping)

CONDITION_COLORS = {"aligned": "#0072B2", "finetuned": "#D55E00", "prefix": "#009E73", "ping": "#009E73"}
CONDITION_LABELS = {"aligned": "aligned", "finetuned": "fine-tuned", "prefix": "fine-tuned + PING",
                    "ping": "fine-tuned + PING"}
BASELINE_COLOR = "#999999"
SEGMENT_COLORS = {"system": "#8C564B", "user": "#1F77B4", "assistant": "#9467BD", "tool_call": "#E377C2",
                  "tool_result": "#BCBD22", "prefix": "#009E73", "template": "#B0B0B0"}
LABEL_COLORS = {"harmful": "#CC3311", "benign": "#33BBEE"}  # tasks, and the rate measured on them
OPENING_COLORS = {"none": CONDITION_COLORS["finetuned"], "safety": CONDITION_COLORS["prefix"],
                  "neutral": "#E69F00", "compliance": "#CC79A7"}
RUN_COLORS = {"plain": "#E69F00", "probe-guided": "#009E73"}
METRICS = {"harmful_refusal": ("harmful refusal", LABEL_COLORS["harmful"]),
           "benign_success": ("benign success", LABEL_COLORS["benign"])}
PROBE_CONDITIONS = ("aligned", "finetuned", "prefix")
# Probe scores often coincide (at the ceiling); wider lines underneath and distinct markers keep each visible.
CONDITION_STYLE = {"aligned": (6, "circle"), "finetuned": (4, "square"), "prefix": (2, "diamond")}



def styled(fig: go.Figure, title: str, height: int = HEIGHT) -> go.Figure:
    fig.update_layout(template="plotly_white", title=dict(text=title, x=0.01, xanchor="left"), height=height,
                      font=dict(size=13), margin=dict(l=70, r=30, t=80, b=60),
                      legend=dict(groupclick="togglegroup"))
    return fig


def rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _columns(iv: Sequence[Interval]) -> np.ndarray:
    """``[3, n]``: values, lows and highs of the intervals."""
    return np.array([[i.value, i.low, i.high] for i in iv], dtype=float).reshape(-1, 3).T


def error_bars(iv: Sequence[Interval]) -> dict:
    v, lo, hi = _columns(iv)
    return dict(type="data", symmetric=False, array=hi - v, arrayminus=v - lo, thickness=1.5)


def band(x, iv: Sequence[Interval], color: str, group: str, alpha: float = 0.18) -> go.Scatter:
    """The 95% band of ``iv`` over ``x`` as one filled polygon (no legend entry of its own)."""
    _, lo, hi = _columns(iv)
    x = list(x)
    return go.Scatter(x=x + x[::-1], y=list(hi) + list(lo[::-1]), fill="toself", fillcolor=rgba(color, alpha),
                      mode="lines", line=dict(width=0), hoverinfo="skip", showlegend=False, legendgroup=group,
                      name=f"{group} 95% band")


def line_with_band(x, iv: Sequence[Interval], name: str, color: str, dash: str = "solid", **kw) -> list[go.Scatter]:
    """A mean/rate line with its 95% band: [band, line]."""
    v = [i.value for i in iv]
    return [band(x, iv, color, name), go.Scatter(x=list(x), y=v, name=name, legendgroup=name, mode="lines+markers",
                                                   line=dict(color=color, width=2.5, dash=dash), **kw)]


def add_traces(fig: go.Figure, traces, row: int | None = None, col: int | None = None) -> None:
    for t in traces:
        fig.add_trace(t, row=row, col=col)


def quoted(text: str | None) -> str:
    return "no forced opening" if text is None else f"“{text}”"
