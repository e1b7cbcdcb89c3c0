"""Figures of the model's insides: F3 probes per layer, F4 the probe logit token by token, F6
segment attribution, F7 PCA of decision-position activations."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from interp.figures.results import Field, FigureSpec, Table, result_file
from interp.figures.style import (BASELINE_COLOR, HEIGHT, CONDITION_COLORS, CONDITION_LABELS, CONDITION_STYLE,
                                  LABEL_COLORS, PROBE_CONDITIONS, SEGMENT_COLORS, Z95, add_traces,
                                  line_with_band, quoted, styled)
from probes.metrics import Interval


# --------------------------------------------------------------------------------------------
# F3: probe accuracy per layer


def fig_f3_probes(results: Mapping[str, Any]) -> FigureSpec:
    """Held-out harm-probe accuracy and AUROC per layer for the three conditions, with the aligned
    probe transferred to the fine-tuned and PING conditions (dashed)."""
    d = result_file(results, "comparison.json")
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
               f"{d['finetuned_model']} (fine-tuned); PING prefix {quoted(d['prefix'].value)}. Solid: probe fitted "
               "and tested within a condition; dashed: the aligned model's probe applied to the fine-tuned and "
               "PING activations. "
               + ("Whiskers: 95% bootstrap intervals of accuracy over held-out transcripts (resampled within class)."
                  if all("acc_low" in r["aligned"].value for r in recs) else "No intervals are stored for these scores."))
    columns = ("layer", *(name + " (acc / AUROC)" for _, name, *_ in series))
    return FigureSpec("F3", "probes", title, caption, (Table(columns, rows),), styled(fig, title))


# --------------------------------------------------------------------------------------------
# F4: per-token probe logit


def _transcripts(d: Field, condition: str) -> list[tuple[str, list[str], list[str], np.ndarray, int]]:
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
    d = result_file(results, "token_logits.json")
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
        add_traces(fig, line_with_band(x, iv, CONDITION_LABELS[c], CONDITION_COLORS[c], dash="dash" if c == "prefix" else "solid",
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
               f"PING prefix {quoted(d['prefix'].value)} forced. (a) Mean with 95% bands (mean ± {Z95} s.e.m.), "
               f"x = offset from the last user token (the last {user_tail} user tokens, the generation-prompt "
               "template, then the prefix); tick labels show the token where every transcript has the same one, "
               "else the offset; marker colour = segment kind; 0 (black) is the probe's decision boundary. "
               f"(b) Every token of transcript {ex_id} with the prefix, coloured by segment kind."
               + _decision_crosscheck(results, d, conds))
    rows = tuple((o, "(varies)" if shared[o] is None else json.dumps(shared[o], ensure_ascii=False), kind[o],
                  *(_mean_interval([v for *_, v in by[c][o]]) if o in by[c] else None for c in by),
                  max(len(by[c].get(o, ())) for c in by)) for o in offsets)
    columns = ("offset", "token", "segment", "fine-tuned", "fine-tuned + PING", "n transcripts")
    return FigureSpec("F4", "token_logits", title, caption, (Table(columns, rows),), styled(fig, title, height=700))


def _decision_crosscheck(results: Mapping[str, Any], d: Field, conds) -> str:
    """A caption sentence comparing the last-token means here with comparison.json's decision logits."""
    if "comparison.json" not in results:
        return ""
    comp = result_file(results, "comparison.json")
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
# F6: segment attribution


def _kind_effects(e: Field) -> tuple[list[str], list[int], np.ndarray, np.ndarray, list[int]]:
    kinds, layers = [f"{k}" for k in e["kinds"]], [int(x) for x in e["layers"]]
    mean, sem, n = e["mean"].floats(), e["sem"].floats(), [int(x) for x in e["n"]]
    for name, a in (("mean", mean), ("sem", sem)):
        if a.shape != (len(kinds), len(layers)):
            raise e[name]._error(f"has shape {a.shape}; expected (kinds, layers) = ({len(kinds)}, {len(layers)})")
    return kinds, layers, mean, sem, n


def fig_f6_attribution(results: Mapping[str, Any]) -> FigureSpec:
    """Segment kinds × layers heatmaps of the attribution effect, harmful and benign tasks, on one
    diverging scale centred at 0; a grouped bar panel for the placement study when stored."""
    d = result_file(results, "attribution.json")
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
                      styled(fig, title, height=800 if placement else HEIGHT))


# --------------------------------------------------------------------------------------------
# F7: PCA of decision-position activations


def fig_f7_pca(results: Mapping[str, Any]) -> FigureSpec:
    """Decision-position activations on the aligned model's first two principal components, one
    panel per condition; colour harmful/benign, symbol refused/acted where stored."""
    d = result_file(results, "pca.json")
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
    return FigureSpec("F7", "pca", title, caption, (Table(columns, tuple(rows)),), styled(fig, title))
