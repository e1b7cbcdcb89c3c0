"""The paper's figures F1–F8, built only from stored result files (never retrains or re-caches).

Each ``fig_f*`` builder is a pure function of :func:`load_results`'s dict (file name -> parsed
JSON, a list of records for ``.jsonl``) that returns a :class:`FigureSpec`: the plotly figure,
its title, a caption and the numbers behind it. :func:`write_figures` writes every figure it can
build as HTML (sharing one offline ``plotly.min.js``) and PNG (kaleido, when a Chromium is
found), plus a ``README.md`` index with captions and tables::

    python -m interp.figures --results runs/demo/results --out figures
    python -m interp.figures --only F1,F4 --no-png

In a notebook: ``fig_f4_token_logits(load_results("runs/demo/results")).figure.show()``.

A figure whose result file is missing is skipped with a note; a builder called on results that
lack a file or a field raises :class:`ResultError` naming the file and the field.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

WIDTH, HEIGHT = 900, 500
Z95 = 1.96  # normal quantile for the 95% bands of a mean (mean ± Z95 · s.e.m.)
_EPS = 1e-9  # PING scores are sums of k/n rates: one can miss an equal target by an ulp (as in interp.ping)

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


# --------------------------------------------------------------------------------------------
# Records and errors


class ResultError(ValueError):
    """A result file is unreadable or lacks a field a figure needs; the message names both."""


class MissingResult(ResultError):
    """A result file a figure needs is not among the loaded results."""

    def __init__(self, name: str):
        super().__init__(f"{name} is missing from the results")
        self.name = name


class Table(NamedTuple):
    """Numbers behind a figure: column names and rows of cells (text, numbers, 95% intervals)."""

    columns: tuple[str, ...]
    rows: tuple[tuple, ...]
    title: str = ""

    def markdown(self) -> str:
        lines = [f"**{self.title}**", ""] if self.title else []
        lines += ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        return "\n".join(lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in self.rows])


@dataclass(frozen=True)
class FigureSpec:
    """One figure: the plotly figure, its title and caption, and the numbers behind it."""

    key: str
    slug: str
    title: str
    caption: str
    tables: tuple[Table, ...]
    figure: go.Figure

    @property
    def stem(self) -> str:
        return f"{self.key}_{self.slug}"


class Interval(NamedTuple):
    """A rate or mean with its 95% interval."""

    value: float
    low: float
    high: float


class _Field:
    """A value read from a result file that knows where it came from, so that a missing or
    malformed field raises a :class:`ResultError` naming the file and the path to the field."""

    __slots__ = ("value", "file", "path")

    def __init__(self, value: Any, file: str, path: str = ""):
        self.value, self.file, self.path = value, file, path

    def _child(self, key) -> str:
        return f"{self.path}[{key}]" if isinstance(key, int) else f"{self.path}.{key}" if self.path else str(key)

    def _error(self, what: str) -> ResultError:
        return ResultError(f"{self.file}: {self.path or 'the top level'} {what}")

    def __getitem__(self, key) -> _Field:
        try:
            return _Field(self.value[key], self.file, self._child(key))
        except (KeyError, IndexError, TypeError):
            raise self._error(f"has no field {key!r}") from None

    def get(self, key) -> _Field | None:
        """The field, or None where it is absent or null."""
        present = isinstance(self.value, Mapping) and self.value.get(key) is not None
        return self[key] if present else None

    def __iter__(self) -> Iterator[_Field]:
        if not isinstance(self.value, list):
            raise self._error(f"should be a list, got {type(self.value).__name__}")
        return (self[i] for i in range(len(self.value)))

    def keys(self) -> list[str]:
        if not isinstance(self.value, Mapping):
            raise self._error(f"should be an object, got {type(self.value).__name__}")
        return list(self.value)

    def __float__(self) -> float:
        try:
            return float(self.value)
        except (TypeError, ValueError):
            raise self._error(f"should be a number, got {self.value!r}") from None

    def __int__(self) -> int:
        return int(float(self))

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def floats(self) -> np.ndarray:
        try:
            return np.asarray(self.value, dtype=float)
        except (TypeError, ValueError):
            raise self._error("should hold numbers only") from None

    def interval(self) -> Interval:
        return Interval(float(self["value"]), float(self["low"]), float(self["high"]))


def _file(results: Mapping[str, Any], name: str) -> _Field:
    if name not in results:
        raise MissingResult(name)
    return _Field(results[name], name)


# --------------------------------------------------------------------------------------------
# Loading

RESULT_FILES = ("behaviour.json", "curve.json", "comparison.json", "token_logits.json", "ping_history.jsonl",
                "ping_guided_history.jsonl", "attribution.json", "pca.json", "steering.json")
_SEED_CURVE = re.compile(r"curve_seed\d+\.json")


def load_results(results_dir: str | Path) -> dict[str, Any]:
    """Every known result file present in ``results_dir``: file name -> parsed JSON (a list of
    records for ``.jsonl``). Absent files are simply not in the dict."""
    root = Path(results_dir)
    if not root.is_dir():
        raise ResultError(f"{root}: no such results directory (the pipeline's stages write it, e.g. `make demo`)")
    names = [n for n in RESULT_FILES if (root / n).is_file()]
    names += sorted(p.name for p in root.glob("curve_seed*.json") if _SEED_CURVE.fullmatch(p.name))
    out = {}
    for name in names:
        text = (root / name).read_text(encoding="utf-8")
        try:
            if name.endswith(".jsonl"):
                out[name] = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                out[name] = json.loads(text)
        except json.JSONDecodeError as e:
            raise ResultError(f"{root / name}: not valid JSON ({e})") from None
    return out


# --------------------------------------------------------------------------------------------
# Shared styling


def _style(fig: go.Figure, title: str, height: int = HEIGHT) -> go.Figure:
    fig.update_layout(template="plotly_white", title=dict(text=title, x=0.01, xanchor="left"), height=height,
                      font=dict(size=13), margin=dict(l=70, r=30, t=80, b=60),
                      legend=dict(groupclick="togglegroup"))
    return fig


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _errors(iv: Sequence[Interval]) -> dict:
    v, lo, hi = np.asarray(iv, dtype=float).T
    return dict(type="data", symmetric=False, array=hi - v, arrayminus=v - lo, thickness=1.5)


def _band(x, iv: Sequence[Interval], color: str, group: str, alpha: float = 0.18) -> go.Scatter:
    """The 95% band of ``iv`` over ``x`` as one filled polygon (no legend entry of its own)."""
    _, lo, hi = np.asarray(iv, dtype=float).T
    x = list(x)
    return go.Scatter(x=x + x[::-1], y=list(hi) + list(lo[::-1]), fill="toself", fillcolor=_rgba(color, alpha),
                      mode="lines", line=dict(width=0), hoverinfo="skip", showlegend=False, legendgroup=group,
                      name=f"{group} 95% band")


def _line(x, iv: Sequence[Interval], name: str, color: str, dash: str = "solid", **kw) -> list[go.Scatter]:
    """A mean/rate line with its 95% band: [band, line]."""
    v = [i.value for i in iv]
    return [_band(x, iv, color, name), go.Scatter(x=list(x), y=v, name=name, legendgroup=name, mode="lines+markers",
                                                   line=dict(color=color, width=2.5, dash=dash), **kw)]


def _add(fig: go.Figure, traces, row: int | None = None, col: int | None = None) -> None:
    for t in traces:
        fig.add_trace(t, row=row, col=col)


def _cell(value) -> str:
    if isinstance(value, Interval):
        return f"{value.value:.3f} [{value.low:.3f}, {value.high:.3f}]"
    if isinstance(value, float):
        return f"{value:.3f}"
    if value is None:
        return "–"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _quote(text: str | None) -> str:
    return "no forced opening" if text is None else f"“{text}”"


# --------------------------------------------------------------------------------------------
# F1: behaviour


def fig_f1_behaviour(results: Mapping[str, Any]) -> FigureSpec:
    """Harmful refusal and benign success per condition (models, PING, baselines), 95% intervals."""
    d = _file(results, "behaviour.json")
    conds = list(d["conditions"])
    labels = [f"{c['label']}" for c in conds]
    colors = [BASELINE_COLOR if c["group"].value == "baseline" else CONDITION_COLORS.get(c["key"].value, BASELINE_COLOR)
              for c in conds]
    fig = make_subplots(1, 2, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=(f"harmful tasks (n = {d['n_harmful']})", f"benign tasks (n = {d['n_benign']})"))
    for col, metric in enumerate(METRICS, 1):
        iv = [c[metric].interval() for c in conds]
        fig.add_trace(go.Bar(name=METRICS[metric][0], y=labels, x=[i.value for i in iv], orientation="h",
                             marker_color=colors, error_x=_errors(iv), showlegend=False,
                             hovertemplate="%{y}: %{x:.1%}<extra>" + METRICS[metric][0] + "</extra>"), 1, col)
        fig.update_xaxes(title_text=f"{METRICS[metric][0]} rate (95% CI)", tickformat=".0%", row=1, col=col)
    fig.update_yaxes(autorange="reversed")
    optional = [m for m in ("attack_success", "benign_over_refusal") if any(c.get(m) for c in conds)]
    rows = tuple((f"{c['label']}", f"{c['group']}", c.get("prefix") and f"{c['prefix']}",
                  *(c[m].interval() for m in METRICS), *(c[m].interval() if c.get(m) else None for m in optional))
                 for c in conds)
    title = "F1 · Harmful refusal and benign success"
    caption = (f"Harmful-task refusal rate and benign-task success rate with 95% intervals, {d['split']} split, "
               f"{d['mode']} evaluation, n = {d['n_harmful']} harmful and {d['n_benign']} benign tasks per "
               f"condition: the aligned model, the fine-tuned model, the fine-tuned model with the PING prefix, "
               f"and baselines (grey; forced prefixes in the table).")
    columns = ("condition", "group", "forced prefix", "harmful refusal", "benign success",
               *(m.replace("_", " ") for m in optional))
    return FigureSpec("F1", "behaviour", title, caption, (Table(columns, rows),), _style(fig, title))


# --------------------------------------------------------------------------------------------
# F2: refusal over fine-tuning


def fig_f2_curve(results: Mapping[str, Any]) -> FigureSpec:
    """Harmful refusal and benign success versus fine-tuning step, per forced opening; extra seeds
    (``curve_seed*.json``) as faint lines."""
    d = _file(results, "curve.json")
    openings = d["prefixes"].keys()
    seeds = [_file(results, n) for n in sorted(results) if _SEED_CURVE.fullmatch(n)]
    fig = make_subplots(1, 2, horizontal_spacing=0.09, subplot_titles=[m for m, _ in METRICS.values()])
    palette = iter(["#56B4E9", "#000000"])
    colors = {o: OPENING_COLORS.get(o) or next(palette, BASELINE_COLOR) for o in openings}
    for col, metric in enumerate(METRICS, 1):
        for o in openings:
            name = "no forced opening" if o == "none" else f"{o} opening"
            for s in seeds:
                pts = list(s["points"])
                fig.add_trace(go.Scatter(x=[int(p["step"]) for p in pts], y=[float(p[o][metric]["value"]) for p in pts],
                                         mode="lines", line=dict(color=colors[o], width=1), opacity=0.35,
                                         legendgroup=name, showlegend=False, name=f"{name}, seed {s['seed']}"), 1, col)
            pts = list(d["points"])
            _add(fig, _line([int(p["step"]) for p in pts], [p[o][metric].interval() for p in pts], name, colors[o],
                            showlegend=col == 1), 1, col)
        fig.update_yaxes(title_text=f"{METRICS[metric][0]} rate (95% band)", tickformat=".0%", row=1, col=col)
        fig.update_xaxes(title_text="fine-tuning step", row=1, col=col)
    fig.add_vline(x=int(d["chosen_step"]), line_dash="dot", line_color="black",
                  annotation_text=f"chosen step {d['chosen_step']}", annotation_position="top left")
    rows = tuple((int(p["step"]), o, *(p[o][m].interval() for m in METRICS)) for p in d["points"] for o in openings)
    title = "F2 · Refusal across fine-tuning"
    seed_note = f" Faint lines: seeds {', '.join(str(s['seed'].value) for s in seeds)}." if seeds else ""
    caption = (f"Rates per fine-tuning step on the {d['split']} split ({d['mode']} evaluation, n = {d['n_per_label']} "
               f"tasks per label per point, seed {d['seed']}), for each forced opening: "
               + "; ".join(f"{o}: {_quote(d['prefixes'][o].value)}" for o in openings)
               + f". Bands: 95% intervals. Chosen step {d['chosen_step']} (rule: {d['rule']}).{seed_note}")
    return FigureSpec("F2", "curve", title, caption,
                      (Table(("step", "opening", "harmful refusal", "benign success"), rows),), _style(fig, title))


# --------------------------------------------------------------------------------------------
# F3: probe accuracy per layer


def fig_f3_probes(results: Mapping[str, Any]) -> FigureSpec:
    """Held-out harm-probe accuracy and AUROC per layer for the three conditions, with the aligned
    probe transferred to the fine-tuned and PING conditions (dashed)."""
    d = _file(results, "comparison.json")
    recs = list(d["layers"])
    layers = [int(r["layer"]) for r in recs]
    fig = make_subplots(1, 2, horizontal_spacing=0.09, subplot_titles=("accuracy", "AUROC"))
    series = [(c, CONDITION_LABELS[c] + " probe", c, "solid") for c in PROBE_CONDITIONS]
    series += [(f"transfer_to_{c}", f"aligned probe → {CONDITION_LABELS[c]}", c, "dash")
               for c in PROBE_CONDITIONS[1:]]
    for col, (metric, label) in enumerate((("acc", "accuracy"), ("auroc", "AUROC")), 1):
        for key, name, c, dash in series:
            width, symbol = CONDITION_STYLE[c]
            y = [float(r[key][metric]) for r in recs]
            err = None
            if metric == "acc" and all("acc_low" in r[key].value for r in recs):
                err = dict(type="data", symmetric=False, thickness=1,
                           array=[float(r[key]["acc_high"]) - v for r, v in zip(recs, y)],
                           arrayminus=[v - float(r[key]["acc_low"]) for r, v in zip(recs, y)])
            fig.add_trace(go.Scatter(x=layers, y=y, name=name, legendgroup=name, error_y=err,
                                     mode="lines+markers", showlegend=col == 1,
                                     line=dict(color=CONDITION_COLORS[c], dash=dash, width=width),
                                     marker=dict(symbol=symbol, size=2 * width + 3)), 1, col)
        fig.update_yaxes(title_text=f"held-out {label}", row=1, col=col)
        fig.update_xaxes(title_text=f"layer ({d['site']})", dtick=1, row=1, col=col)
    rows = tuple((layer, *(f"{float(r[k]['acc']):.3f} / {float(r[k]['auroc']):.3f}" for k, *_ in series))
                 for layer, r in zip(layers, recs))
    title = "F3 · Where the harm signal is linearly readable"
    meta = d.get("meta")
    split = (f"held out by task group (test size {meta['test_size']}, seed {meta['seed']})" if meta else "held out")
    caption = (f"Logistic harm probes at the {d['positions']} position of the {d['site']} residual stream, "
               f"trained per layer on {d['n_train']} and evaluated on {d['n_test']} transcripts {split}; "
               f"{d['n_transcripts']} transcripts, {d['n_harmful']} harmful. Models: {d['aligned_model']} (aligned), "
               f"{d['finetuned_model']} (fine-tuned); PING prefix {_quote(d['prefix'].value)}. Solid: probe fitted "
               "and tested within a condition; dashed: the aligned model's probe applied to the fine-tuned and "
               "PING activations. "
               + ("Whiskers: 95% bootstrap intervals of accuracy over held-out transcripts (resampled within class)."
                  if all("acc_low" in r["aligned"].value for r in recs) else "No intervals are stored for these scores."))
    columns = ("layer", *(name + " (acc / AUROC)" for _, name, *_ in series))
    return FigureSpec("F3", "probes", title, caption, (Table(columns, rows),), _style(fig, title))


# --------------------------------------------------------------------------------------------
# F4: per-token probe logit


def _transcripts(d: _Field, condition: str) -> list[tuple[str, list[str], list[str], np.ndarray, int]]:
    """(id, tokens, kinds, logits, index of the last user token) per transcript of a condition."""
    out = []
    for t in d["conditions"][condition]:
        tokens, kinds, logits = list(t["tokens"].value), list(t["kinds"].value), t["logits"].floats()
        if not len(tokens) == len(kinds) == len(logits):
            raise t._error(f"has {len(tokens)} tokens, {len(kinds)} kinds and {len(logits)} logits; "
                           "they should be equally many")
        if "user" not in kinds:
            raise t._error("has no token of kind 'user' to align on")
        out.append((f"{t['id']}", tokens, kinds, logits, len(kinds) - 1 - kinds[::-1].index("user")))
    return out


def _by_offset(ts, user_tail: int) -> dict[int, list[tuple[str, str, float]]]:
    """offset from the last user token -> (token, kind, logit) of every transcript having it."""
    out: dict[int, list] = {}
    for _, tokens, kinds, logits, end in ts:
        for i in range(max(0, end - user_tail), len(tokens)):
            out.setdefault(i - end, []).append((tokens[i], kinds[i], float(logits[i])))
    return dict(sorted(out.items()))


def _mean_interval(values: Sequence[float]) -> Interval:
    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    h = Z95 * float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
    return Interval(m, m - h, m + h)


def _show_token(token: str, limit: int | None = None) -> str:
    text = token.replace("\n", "\\n") or "∅"
    return text if limit is None or len(text) <= limit else text[:limit - 1] + "…"


def fig_f4_token_logits(results: Mapping[str, Any], user_tail: int = 8) -> FigureSpec:
    """Probe logit per token, fine-tuned vs fine-tuned + PING: (a) the mean over harmful test
    transcripts aligned at the last user token (from ``user_tail`` tokens before it to the end),
    95% bands, markers coloured by segment kind; (b) every token of one PING transcript."""
    d = _file(results, "token_logits.json")
    conds = {c: _transcripts(d, c) for c in ("finetuned", "prefix")}
    by = {c: _by_offset(ts, user_tail) for c, ts in conds.items()}
    offsets = sorted(set(by["finetuned"]) | set(by["prefix"]))
    at = {o: by["prefix"].get(o, []) + by["finetuned"].get(o, []) for o in offsets}
    kind = {o: Counter(k for _, k, _ in at[o]).most_common(1)[0][0] for o in offsets}
    shared = {o: at[o][0][0] if len({t for t, _, _ in at[o]}) == 1 else None for o in offsets}
    tick = {o: str(o) if shared[o] is None else _show_token(shared[o], limit=12) for o in offsets}
    fig = make_subplots(2, 1, vertical_spacing=0.2, row_heights=[0.6, 0.4], subplot_titles=(
        "(a) mean over harmful transcripts, aligned at the last user token",
        f"(b) one transcript with PING, every token: {conds['prefix'][0][0]}"))
    for c, rows in by.items():
        x = list(rows)
        iv = [_mean_interval([v for *_, v in rows[o]]) for o in x]
        _add(fig, _line(x, iv, CONDITION_LABELS[c], CONDITION_COLORS[c], dash="dash" if c == "prefix" else "solid",
                        marker=dict(color=[SEGMENT_COLORS.get(kind[o], BASELINE_COLOR) for o in x], size=9,
                                    line=dict(color=CONDITION_COLORS[c], width=1.5)),
                        customdata=[[tick[o], kind[o], len(rows[o])] for o in x],
                        hovertemplate="%{customdata[0]} (%{customdata[1]}): %{y:.2f}, n = %{customdata[2]}"), 1, 1)
    ex_id, tokens, kinds, logits, end = conds["prefix"][0]
    for k in dict.fromkeys(kinds):
        idx = [i for i, kk in enumerate(kinds) if kk == k]
        fig.add_trace(go.Bar(x=[i - end for i in idx], y=logits[idx], name=k, legendgroup=k,
                             marker_color=SEGMENT_COLORS.get(k, BASELINE_COLOR),
                             hovertext=[_show_token(tokens[i]) for i in idx],
                             hovertemplate="%{hovertext}: %{y:.2f}"), 2, 1)
    fig.update_layout(bargap=0.05)
    fig.update_xaxes(tickmode="array", tickvals=offsets, ticktext=[tick[o] for o in offsets], tickangle=-50,
                     row=1, col=1)
    fig.update_xaxes(title_text="token offset from the last user token", row=2, col=1)
    probe = f"{d['probe']} probe logit"
    fig.update_yaxes(title_text=probe, row=1, col=1)
    fig.update_yaxes(title_text=probe, row=2, col=1)
    fig.add_hline(y=0, line_color="black", line_width=1)
    fig.add_annotation(x=1, xref="x domain", y=0, text="decision boundary", showarrow=False, xanchor="right",
                       yanchor="bottom", font=dict(size=11), row=1, col=1)
    title = f"F4 · Where PING shifts the {d['probe']} signal, token by token"
    n = {c: len(ts) for c, ts in conds.items()}
    caption = (f"Logit of the {d['probe']} probe at layer {d['layer']} ({d['site']}) on every token, for "
               f"{n['finetuned']} harmful test transcripts with the fine-tuned model and {n['prefix']} with the "
               f"PING prefix {_quote(d['prefix'].value)} forced. (a) Mean with 95% bands (mean ± {Z95} s.e.m.), "
               f"x = offset from the last user token (the last {user_tail} user tokens, the generation-prompt "
               "template, then the prefix); tick labels show the token where every transcript has the same one, "
               "else the offset; marker colour = segment kind; 0 (black) is the probe's decision boundary. "
               f"(b) Every token of transcript {ex_id} with the prefix, coloured by segment kind."
               + _decision_crosscheck(results, d, conds))
    rows = tuple((o, "(varies)" if shared[o] is None else json.dumps(shared[o], ensure_ascii=False), kind[o],
                  *(_mean_interval([v for *_, v in by[c][o]]) if o in by[c] else None for c in by),
                  max(len(by[c].get(o, ())) for c in by)) for o in offsets)
    columns = ("offset", "token", "segment", "fine-tuned", "fine-tuned + PING", "n transcripts")
    return FigureSpec("F4", "token_logits", title, caption, (Table(columns, rows),), _style(fig, title, height=700))


def _decision_crosscheck(results: Mapping[str, Any], d: _Field, conds) -> str:
    """A caption sentence comparing the last-token means here with comparison.json's decision logits."""
    if "comparison.json" not in results:
        return ""
    comp = _file(results, "comparison.json")
    if comp.get("logit_probe") is not None and comp["logit_probe"].value != d["probe"].value:
        return ""
    rec = next((r for r in comp["layers"] if int(r["layer"]) == int(d["layer"])), None)
    if rec is None or rec.get("decision_logit") is None:
        return ""
    parts = []
    for c, ts in conds.items():
        ref = rec["decision_logit"].get(c)
        if ref is not None:
            iv = ref.interval()
            here = np.mean([lg[-1] for *_, lg, _ in ts])
            parts.append(f"{CONDITION_LABELS[c]} {here:.2f} here vs {iv.value:.2f} [{iv.low:.2f}, {iv.high:.2f}]")
    return (" Cross-check, mean logit at the decision position (the last token) against comparison.json at "
            f"layer {d['layer']}: " + "; ".join(parts) + ".") if parts else ""


# --------------------------------------------------------------------------------------------
# F5: PING search trajectory


def _history(results: Mapping[str, Any], name: str) -> tuple[_Field | None, list[_Field], int]:
    """(config record or None, candidate records in scoring order, candidates screened)."""
    lines = list(_file(results, name))
    config = next((r for r in lines if r["kind"].value == "config"), None)
    screened = sum(int(r["screened"]) for r in lines if r["kind"].value == "round" and r.get("screened") is not None)
    return config, [r for r in lines if r["kind"].value == "candidate"], screened


def fig_f5_ping_search(results: Mapping[str, Any]) -> FigureSpec:
    """Every candidate's score and the best so far against generations used and per round, plain
    PING vs probe-guided (``ping_guided_history.jsonl``, when present)."""
    files = {"plain": "ping_history.jsonl", "probe-guided": "ping_guided_history.jsonl"}
    runs = {run: _history(results, f) for run, f in files.items() if run == "plain" or f in results}
    fig = make_subplots(1, 2, horizontal_spacing=0.09, subplot_titles=("per generation", "per round"))
    table, best_plain, tau = [], None, None
    for run, (config, cands, screened) in runs.items():
        score = np.array([float(c["score"]) for c in cands])
        rnd = np.array([int(c["round"]) for c in cands])
        if not len(score):
            raise ResultError(f"{files[run]}: no candidate records")
        gens, best = np.arange(1, len(score) + 1), np.maximum.accumulate(score)
        rounds = np.unique(rnd)
        color, text = RUN_COLORS[run], [f"{c['prefix']}" for c in cands]
        for col, x, xb, yb in ((1, gens, gens, best),
                               (2, rnd, rounds, [best[rnd <= r].max() for r in rounds])):
            fig.add_trace(go.Scatter(x=x, y=score, mode="markers", name=f"{run}: candidates", legendgroup=run,
                                     marker=dict(color=_rgba(color, 0.5), size=7), hovertext=text,
                                     showlegend=col == 1), 1, col)
            fig.add_trace(go.Scatter(x=xb, y=yb, mode="lines", line=dict(color=color, width=2.5, shape="hv"),
                                     name=f"{run}: best so far", legendgroup=run, showlegend=col == 1), 1, col)
        if config is not None and config.get("tau") is not None:
            tau = float(config["tau"])
        best_plain = score.max() if run == "plain" else best_plain
        top = cands[int(score.argmax())]
        reach_plain = next((i for i, v in enumerate(score, 1) if v >= best_plain - _EPS), None)
        table.append((run, len(score), len(rounds), screened, float(score.max()), f"{top['prefix']}",
                      float(top["benign_success"]), float(top["harmful_refusal"]), int(score.argmax()) + 1,
                      reach_plain))
    guided = next((r for r in table if r[0] == "probe-guided"), None)
    if guided is not None and guided[-1] is not None:
        fig.add_vline(x=guided[-1], line_dash="dot", line_color=RUN_COLORS["probe-guided"], row=1, col=1,
                      annotation_text=f"guided matches plain best: {guided[-1]}", annotation_position="bottom right")
    if tau is not None:
        fig.add_hline(y=tau, line_dash="dash", line_color="black", annotation_text=f"τ = {tau:g}",
                      annotation_position="bottom right")
    fig.update_yaxes(title_text="score = benign success + harmful refusal")
    fig.update_xaxes(title_text="generations used (candidates scored)", row=1, col=1)
    fig.update_xaxes(title_text="round", dtick=1, row=1, col=2)
    title = "F5 · PING's search: plain vs probe-guided"
    tau_note = (f" Dashed: τ = {tau:g}; once the best score reaches τ, later rounds show the generator the top "
                "candidates so far." if tau is not None else "")
    caption = ("Every candidate prefix scored on the validation split (points) and the best score so far (line), "
               "against generations used (one generation pass over the split per scored candidate) and per round, "
               + ("for plain PING and the probe-guided run, which screens candidates with the probe before scoring; "
                  "the dotted line marks where the guided run first matches the plain run's best."
                  if guided else "for plain PING (no probe-guided history stored).") + tau_note)
    columns = ("run", "scored", "rounds", "screened", "best score", "best prefix", "its benign success",
               "its harmful refusal", "generations to its best", "generations to plain's best")
    return FigureSpec("F5", "ping_search", title, caption, (Table(columns, tuple(table)),), _style(fig, title))


# --------------------------------------------------------------------------------------------
# F6: segment attribution


def _kind_effects(e: _Field) -> tuple[list[str], list[int], np.ndarray, np.ndarray, list[int]]:
    kinds, layers = [f"{k}" for k in e["kinds"]], [int(x) for x in e["layers"]]
    mean, sem, n = e["mean"].floats(), e["sem"].floats(), [int(x) for x in e["n"]]
    for name, a in (("mean", mean), ("sem", sem)):
        if a.shape != (len(kinds), len(layers)):
            raise e[name]._error(f"has shape {a.shape}; expected (kinds, layers) = ({len(kinds)}, {len(layers)})")
    return kinds, layers, mean, sem, n


def fig_f6_attribution(results: Mapping[str, Any]) -> FigureSpec:
    """Segment kinds × layers heatmaps of the attribution effect, harmful and benign tasks, on one
    diverging scale centred at 0; a grouped bar panel for the placement study when stored."""
    d = _file(results, "attribution.json")
    eff = {label: _kind_effects(d[label]) for label in LABEL_COLORS}
    placement = d.get("placement")
    zmax = max(float(np.nanmax(np.abs(m))) for _, _, m, _, _ in eff.values()) or 1.0
    specs = [[{}, {}], [{"colspan": 2}, None]] if placement else [[{}, {}]]
    fig = make_subplots(len(specs), 2, specs=specs, horizontal_spacing=0.08, vertical_spacing=0.18,
                        subplot_titles=(*(f"{lb} tasks" for lb in eff), *(["placement study"] if placement else [])))
    for col, (label, (kinds, layers, mean, sem, n)) in enumerate(eff.items(), 1):
        fig.add_trace(go.Heatmap(z=mean, x=layers, y=kinds, coloraxis="coloraxis", name=f"{label} tasks",
                                 customdata=np.dstack([sem, np.repeat(np.asarray(n)[:, None], len(layers), 1)]),
                                 hovertemplate="%{y}, layer %{x}: %{z:.3f} ± %{customdata[0]:.3f} (n = "
                                               "%{customdata[1]})<extra></extra>"), 1, col)
        fig.update_xaxes(title_text="layer (from which the segment is replaced)", dtick=1, row=1, col=col)
        fig.update_yaxes(autorange="reversed", row=1, col=col)
    fig.update_layout(coloraxis=dict(colorscale="RdBu_r", cmid=0, cmin=-zmax, cmax=zmax,
                                     colorbar=dict(title=dict(text=f"Δ {d['metric']}", side="right"),
                                                   len=0.55 if placement else 1, y=1, yanchor="top")),
                      legend=dict(y=0.4, yanchor="top"))
    tables = [Table(("segment", "n", *(f"layer {x}" for x in layers)),
                    tuple((k, n[i], *(f"{mean[i, j]:.3f} ± {sem[i, j]:.3f}" for j in range(len(layers))))
                          for i, k in enumerate(kinds)), f"{label} tasks: mean ± s.e.m.")
              for label, (kinds, layers, mean, sem, n) in eff.items()]
    if placement:
        conds = list(placement["conditions"])
        for model in dict.fromkeys(c["model"].value for c in conds):
            mine = [c for c in conds if c["model"].value == model]
            x = [[f"{c['placement']}" for c in mine for _ in c["kinds"]], [f"{k}" for c in mine for k in c["kinds"]]]
            fig.add_trace(go.Bar(x=x, y=np.concatenate([c["effect"].floats() for c in mine]),
                                 name=CONDITION_LABELS.get(model, model), marker_color=CONDITION_COLORS.get(model)),
                          2, 1)
        fig.update_yaxes(title_text=f"Δ {d['metric']}", row=2, col=1)
        fig.update_xaxes(title_text="where the harmful intent is placed / segment kind", row=2, col=1)
        tables.append(Table(("placement", "model", "segment", f"Δ {d['metric']}"), tuple(
            (f"{c['placement']}", CONDITION_LABELS.get(c["model"].value, c["model"].value), f"{k}", float(v))
            for c in conds for k, v in zip(c["kinds"], c["effect"])), "placement study"))
    title = "F6 · Which segments write the refusal signal"
    agreement = d.get("agreement")
    agree = (f" Rank agreement of the gradient method with exact patching (Spearman, pooled over layers): "
             f"{float(agreement['pooled']):.2f}." if agreement is not None and agreement.get("pooled") is not None
             else "")
    ig = d.get("agreement_ig")
    if ig is not None and ig.get("pooled") is not None:
        agree += f" Integrated gradients: {float(ig['pooled']):.2f}."
    placed = ""
    if placement:
        where = ", ".join(dict.fromkeys(f"{c['placement']}" for c in placement["conditions"]))
        at = f" at layer {placement['layer']}" if placement.get("layer") is not None else ""
        placed = (f" Bottom: the same harmful intent placed in each of {where}; effect per segment kind{at} for "
                  "each model.")
    method = {"exact": "exact: patched or ablated", "grad": "gradient × activation estimate"}.get(
        d["method"].value, f"{d['method']}")
    baselines = " / ".join(dict.fromkeys(f"{d[label]['baseline']}" for label in eff))
    caption = (f"Change in {d['metric']} at the decision position when the segments of a kind are replaced by "
               f"the baseline ({baselines}) in the residual stream from the given layer on ({method}), summed "
               "per transcript and averaged over transcripts having that kind (n per kind in the table, ± s.e.m.); "
               "one colour scale centred at 0 for both panels." + placed + agree)
    return FigureSpec("F6", "attribution", title, caption, tuple(tables),
                      _style(fig, title, height=800 if placement else HEIGHT))


# --------------------------------------------------------------------------------------------
# F7: PCA of decision-position activations


def fig_f7_pca(results: Mapping[str, Any]) -> FigureSpec:
    """Decision-position activations on the aligned model's first two principal components, one
    panel per condition; colour harmful/benign, symbol refused/acted where stored."""
    d = _file(results, "pca.json")
    names = [c for c in PROBE_CONDITIONS if c in d["conditions"].keys()]
    evr = d["explained_variance_ratio"].floats()
    fig = make_subplots(1, len(names), shared_xaxes="all", shared_yaxes="all", horizontal_spacing=0.03,
                        subplot_titles=[CONDITION_LABELS[c] for c in names])
    rows, shown = [], set()
    for col, c in enumerate(names, 1):
        p = d["conditions"][c]
        x, y = p["x"].floats(), p["y"].floats()
        harmful = np.asarray(p["harmful"].value, dtype=bool)
        refused = None if p.get("refused") is None else np.asarray(p["refused"].value, dtype=bool)
        if not len(x) == len(y) == len(harmful) == (len(harmful) if refused is None else len(refused)):
            raise p._error("has x, y, harmful and refused of different lengths")
        for label, h in (("harmful", True), ("benign", False)):
            splits = [(None, "", "circle")] if refused is None else [(True, ", refused", "circle"),
                                                                      (False, ", acted", "x")]
            for r, verb, symbol in splits:
                m = (harmful == h) & (True if r is None else refused == r)
                name = label + verb
                if m.any():
                    fig.add_trace(go.Scatter(x=x[m], y=y[m], mode="markers", name=name, legendgroup=name,
                                             marker=dict(color=LABEL_COLORS[label], symbol=symbol, size=7, opacity=0.7),
                                             showlegend=name not in shown), 1, col)
                    shown.add(name)
        rows.append((CONDITION_LABELS[c], int(harmful.sum()), int((~harmful).sum()),
                     None if refused is None else int(refused[harmful].sum()),
                     None if refused is None else int(refused[~harmful].sum()),
                     float(x[harmful].mean()), float(x[~harmful].mean())))
        fig.update_xaxes(title_text=f"PC1 ({evr[0]:.0%} of variance)", row=1, col=col)
    fig.update_yaxes(title_text=f"PC2 ({evr[1]:.0%} of variance)", row=1, col=1)
    title = "F7 · Harmful and benign tasks in activation space"
    caption = (f"{d['site']} activations at layer {d['layer']} at the decision position, projected on the first two "
               f"principal components of the {d['basis']} model's activations ({evr[0]:.1%} and {evr[1]:.1%} of its "
               "variance), for the aligned model, the fine-tuned model and the fine-tuned model with PING. "
               "Colour: harmful vs benign task"
               + ("; symbol: the model refused (circle) or acted (x)." if any(r[3] is not None for r in rows) else "."))
    columns = ("condition", "harmful", "benign", "harmful refused", "benign refused", "mean PC1 harmful",
               "mean PC1 benign")
    return FigureSpec("F7", "pca", title, caption, (Table(columns, tuple(rows)),), _style(fig, title))


# --------------------------------------------------------------------------------------------
# F8: steering


def fig_f8_steering(results: Mapping[str, Any]) -> FigureSpec:
    """Harmful refusal and benign success versus steering coefficient (95% bands); directional
    ablation before/after as a bar panel when stored."""
    d = _file(results, "steering.json")
    pts = list(d["points"])
    coef = [float(p["coefficient"]) for p in pts]
    ablation = list(d["ablation"]) if d.get("ablation") is not None else []
    fig = make_subplots(1, 2 if ablation else 1, column_widths=[0.6, 0.4] if ablation else None,
                        horizontal_spacing=0.12,
                        subplot_titles=["activation addition", *(["directional ablation"] if ablation else [])])
    for metric, (label, color) in METRICS.items():
        _add(fig, _line(coef, [p[metric].interval() for p in pts], label, color), 1, 1)
    fig.update_xaxes(title_text=f"steering coefficient along the {d['direction']} direction", row=1, col=1)
    fig.update_yaxes(title_text="rate (95% band)", tickformat=".0%", row=1, col=1)
    rows = [(f"coefficient {c:g}", *(p[m].interval() for m in METRICS)) for c, p in zip(coef, pts)]
    for when, color in (("before", "#BBBBBB"), ("after", "#555555")):
        if not ablation:
            break
        x = [[f"{a['model']}" for a in ablation for _ in METRICS], [METRICS[m][0] for _ in ablation for m in METRICS]]
        iv = [a[when][m].interval() for a in ablation for m in METRICS]
        fig.add_trace(go.Bar(x=x, y=[i.value for i in iv], error_y=_errors(iv), name=f"ablation: {when}",
                             marker_color=color),
                      1, 2)
        rows += [(f"ablation, {a['model']}, {when}", *(a[when][m].interval() for m in METRICS)) for a in ablation]
    if ablation:
        fig.update_yaxes(title_text="rate (95% CI)", tickformat=".0%", row=1, col=2)
        fig.update_layout(barmode="group")
    layers = ", ".join(f"{int(x)}" for x in d["layers"])
    title = "F8 · Steering along the refusal direction"
    caption = (f"Harmful refusal and benign success with 95% bands when the {d['direction']} direction, scaled by "
               f"the coefficient, is added to the residual stream at layer(s) {layers}"
               + ("; right: rates before and after ablating the direction, per model." if ablation else "."))
    return FigureSpec("F8", "steering", title, caption,
                      (Table(("setting", "harmful refusal", "benign success"), tuple(rows)),), _style(fig, title))


FIGURES: dict[str, Callable[[Mapping[str, Any]], FigureSpec]] = {
    "F1": fig_f1_behaviour, "F2": fig_f2_curve, "F3": fig_f3_probes, "F4": fig_f4_token_logits,
    "F5": fig_f5_ping_search, "F6": fig_f6_attribution, "F7": fig_f7_pca, "F8": fig_f8_steering,
}


# --------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class Written:
    """What :func:`write_figures` did: the figures built (all whose results exist, for the README
    index), the files written, and one note per figure skipped or failed and for PNG export."""

    figures: tuple[FigureSpec, ...]
    files: tuple[Path, ...]
    notes: tuple[str, ...]
    failed: bool


def build_figures(results: Mapping[str, Any],
                  source: str | Path = "the results") -> tuple[dict[str, FigureSpec], dict[str, str], bool]:
    """Every figure whose results exist: (key -> spec, key -> note for the others, any failed)."""
    specs, notes, failed = {}, {}, False
    for key, build in FIGURES.items():
        try:
            specs[key] = build(results)
        except MissingResult as e:
            notes[key] = f"{key} skipped: {e.name} not found in {source}"
        except ResultError as e:
            notes[key], failed = f"{key} failed: {e}", True
    return specs, notes, failed


def write_figures(results_dir: str | Path, out_dir: str | Path = "figures", only: Sequence[str] | None = None,
                  png: bool = True) -> Written:
    """Write ``F{n}_{slug}.html`` (and ``.png`` with ``png`` and a Chromium) for each figure in
    ``only`` (default all) whose results exist, the shared ``plotly.min.js``, and ``README.md``
    indexing every figure the results allow (so ``only`` re-renders some without losing the rest)."""
    unknown = sorted(set(only or ()) - set(FIGURES))
    if unknown:
        raise ValueError(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(FIGURES)}")
    specs, notes, failed = build_figures(load_results(results_dir), results_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [specs[k] for k in (only or FIGURES) if k in specs]
    files = [_write_plotlyjs(out)]
    for s in chosen:
        files.append(out / f"{s.stem}.html")
        _write_text(files[-1], s.figure.to_html(include_plotlyjs="plotly.min.js", full_html=True, div_id=s.stem))
        (out / f"{s.stem}.png").unlink(missing_ok=True)  # an older PNG would no longer match the HTML
    extra = []
    if png and chosen:
        if _browser() is None:
            extra.append("PNGs not written (kaleido needs Chromium): apt-get install -y chromium, "
                         "or set BROWSER_PATH to a Chrome/Chromium binary")
        else:
            files += _write_pngs(chosen, out)
    files.append(out / "README.md")
    _write_text(files[-1], _readme(list(specs.values()), notes, results_dir, out))
    return Written(tuple(specs.values()), tuple(files),
                   tuple(notes[k] for k in (only or FIGURES) if k in notes) + tuple(extra), failed)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_plotlyjs(out: Path) -> Path:
    from plotly.offline import get_plotlyjs

    path, js = out / "plotly.min.js", get_plotlyjs()
    if not (path.is_file() and path.read_text(encoding="utf-8") == js):
        _write_text(path, js)
    return path


def _browser() -> str | None:
    """The Chromium kaleido would use (BROWSER_PATH, PATH, or its own download), if it is there."""
    from choreographer.browsers.chromium import Chromium

    path = Chromium.find_browser(skip_local=False)
    return path if path and os.access(path, os.X_OK) else None


def _write_pngs(specs: Sequence[FigureSpec], out: Path) -> list[Path]:
    import plotly.io as pio

    paths = [out / f"{s.stem}.png" for s in specs]
    tmps = [p.with_name(f".{p.name}.tmp") for p in paths]
    try:  # one browser session for all figures
        pio.write_images([s.figure for s in specs], tmps, format="png", width=WIDTH,
                         height=[s.figure.layout.height or HEIGHT for s in specs])
        for tmp, path in zip(tmps, paths):
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    return paths


def _readme(specs: Sequence[FigureSpec], notes: Mapping[str, str], results_dir, out: Path) -> str:
    parts = ["# Figures", "",
             f"Generated by `python -m interp.figures --results {results_dir}` from the stored result files; "
             "every number below is read from them. Rerun the command to update; do not edit by hand.", ""]
    for s in specs:
        parts += [f"## {s.title}", ""]
        if (out / f"{s.stem}.png").is_file():
            parts += [f"![{s.key}]({s.stem}.png)", ""]
        parts += [f"[interactive]({s.stem}.html)", "", s.caption, ""]
        parts += [line for t in s.tables for line in (t.markdown(), "")]
    if notes:
        parts += ["## Not built", "", *(f"- {n}" for n in notes.values()), ""]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m interp.figures", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=Path("runs/demo/results"), help="result files (default %(default)s)")
    p.add_argument("--out", type=Path, default=Path("figures"), help="output directory (default %(default)s)")
    p.add_argument("--only", default=None, help="comma-separated figures to render, e.g. F1,F4 (default all)")
    p.add_argument("--no-png", action="store_true", help="write HTML only (removes a re-rendered figure's older PNG)")
    args = p.parse_args(argv)
    only = [k.strip().upper() for k in args.only.split(",") if k.strip()] if args.only else None
    try:
        done = write_figures(args.results, args.out, only=only, png=not args.no_png)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for s in done.figures:
        if only is None or s.key in only:
            print(f"{s.key}  {args.out / s.stem}.html{' + .png' if (args.out / f'{s.stem}.png') in done.files else ''}")
    for note in done.notes:
        print(note)
    print(f"index: {args.out / 'README.md'}")
    return 1 if done.failed else 0


if __name__ == "__main__":
    sys.exit(main())
