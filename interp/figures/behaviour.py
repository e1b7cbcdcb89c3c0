"""Figures of behaviour: F1 rates per condition, F2 refusal over fine-tuning, F5 the PING search,
F8 steering, F9 guards."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from interp.figures.results import SEED_CURVE, Field, FigureSpec, ResultError, Table, result_file
from interp.figures.style import (BASELINE_COLOR, CONDITION_COLORS, EPS, METRICS, OPENING_COLORS, RUN_COLORS,
                                  add_traces, error_bars, line_with_band, quoted, rgba, styled)


# --------------------------------------------------------------------------------------------
# F1: behaviour


def fig_f1_behaviour(results: Mapping[str, Any]) -> FigureSpec:
    """Harmful refusal and benign success per condition (models, PING, baselines), 95% intervals."""
    d = result_file(results, "behaviour.json")
    conds = list(d["conditions"])
    labels = [f"{c['label']}" for c in conds]
    colors = [BASELINE_COLOR if c["group"].value == "baseline" else CONDITION_COLORS.get(c["key"].value, BASELINE_COLOR)
              for c in conds]
    fig = make_subplots(1, 2, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=(f"harmful tasks (n = {d['n_harmful']})", f"benign tasks (n = {d['n_benign']})"))
    for col, metric in enumerate(METRICS, 1):
        iv = [c[metric].interval() for c in conds]
        fig.add_trace(go.Bar(name=METRICS[metric][0], y=labels, x=[i.value for i in iv], orientation="h",
                             marker_color=colors, error_x=error_bars(iv), showlegend=False,
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
    return FigureSpec("F1", "behaviour", title, caption, (Table(columns, rows),), styled(fig, title))


# --------------------------------------------------------------------------------------------
# F2: refusal over fine-tuning


def fig_f2_curve(results: Mapping[str, Any]) -> FigureSpec:
    """Harmful refusal and benign success versus fine-tuning step, per forced opening; extra seeds
    (``curve_seed*.json``) as faint lines."""
    d = result_file(results, "curve.json")
    openings = d["prefixes"].keys()
    seeds = [result_file(results, n) for n in sorted(results) if SEED_CURVE.fullmatch(n)]
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
            add_traces(fig, line_with_band([int(p["step"]) for p in pts], [p[o][metric].interval() for p in pts], name, colors[o],
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
               + "; ".join(f"{o}: {quoted(d['prefixes'][o].value)}" for o in openings)
               + f". Bands: 95% intervals. Chosen step {d['chosen_step']} (rule: {d['rule']}).{seed_note}")
    return FigureSpec("F2", "curve", title, caption,
                      (Table(("step", "opening", "harmful refusal", "benign success"), rows),), styled(fig, title))


# --------------------------------------------------------------------------------------------
# F5: PING search trajectory


def _history(results: Mapping[str, Any], name: str) -> tuple[Field | None, list[Field], int]:
    """(config record or None, candidate records in scoring order, candidates screened)."""
    lines = list(result_file(results, name))
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
                                     marker=dict(color=rgba(color, 0.5), size=7), hovertext=text,
                                     showlegend=col == 1), 1, col)
            fig.add_trace(go.Scatter(x=xb, y=yb, mode="lines", line=dict(color=color, width=2.5, shape="hv"),
                                     name=f"{run}: best so far", legendgroup=run, showlegend=col == 1), 1, col)
        if config is not None and config.get("tau") is not None:
            tau = float(config["tau"])
        best_plain = score.max() if run == "plain" else best_plain
        top = cands[int(score.argmax())]
        reach_plain = next((i for i, v in enumerate(score, 1) if v >= best_plain - EPS), None)
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
    return FigureSpec("F5", "ping_search", title, caption, (Table(columns, tuple(table)),), styled(fig, title))


# --------------------------------------------------------------------------------------------
# F8: steering


def fig_f8_steering(results: Mapping[str, Any]) -> FigureSpec:
    """Harmful refusal and benign success versus steering coefficient (95% bands); directional
    ablation before/after as a bar panel when stored."""
    d = result_file(results, "steering.json")
    pts = list(d["points"])
    coef = [float(p["coefficient"]) for p in pts]
    ablation = list(d["ablation"]) if d.get("ablation") is not None else []
    fig = make_subplots(1, 2 if ablation else 1, column_widths=[0.6, 0.4] if ablation else None,
                        horizontal_spacing=0.12,
                        subplot_titles=["activation addition", *(["directional ablation"] if ablation else [])])
    for metric, (label, color) in METRICS.items():
        add_traces(fig, line_with_band(coef, [p[metric].interval() for p in pts], label, color), 1, 1)
    fig.update_xaxes(title_text=f"steering coefficient along the {d['direction']} direction", row=1, col=1)
    fig.update_yaxes(title_text="rate (95% band)", tickformat=".0%", row=1, col=1)
    rows = [(f"coefficient {c:g}", *(p[m].interval() for m in METRICS)) for c, p in zip(coef, pts)]
    for when, color in (("before", "#BBBBBB"), ("after", "#555555")):
        if not ablation:
            break
        x = [[f"{a['model']}" for a in ablation for _ in METRICS], [METRICS[m][0] for _ in ablation for m in METRICS]]
        iv = [a[when][m].interval() for a in ablation for m in METRICS]
        fig.add_trace(go.Bar(x=x, y=[i.value for i in iv], error_y=error_bars(iv), name=f"ablation: {when}",
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
                      (Table(("setting", "harmful refusal", "benign success"), tuple(rows)),), styled(fig, title))


# --------------------------------------------------------------------------------------------
# F9: guards


def fig_f9_guards(results: Mapping[str, Any]) -> FigureSpec:
    """Left: harmful refusal (or block) and benign success per defence (PING, a classifier guard,
    the agent's own activation monitor, and the combinations). Right: the monitor's recall at each
    validation false-positive rate, on the test tasks and under the robustness checks."""
    d = result_file(results, "guards.json")
    conds = list(d["conditions"])
    labels = [f"{c['label']}" for c in conds]
    fig = make_subplots(1, 3, shared_yaxes=False, horizontal_spacing=0.08, column_widths=[0.3, 0.3, 0.4],
                        subplot_titles=(f"harmful tasks (n = {d['n_harmful']})", f"benign tasks (n = {d['n_benign']})",
                                        f"activation monitor recall (layer {d['monitor']['layer']})"))
    for col, metric in enumerate(METRICS, 1):
        iv = [c[metric].interval() for c in conds]
        fig.add_trace(go.Bar(y=labels, x=[i.value for i in iv], orientation="h", marker_color=METRICS[metric][1],
                             error_x=error_bars(iv), showlegend=False,
                             hovertemplate="%{y}: %{x:.1%}<extra>" + METRICS[metric][0] + "</extra>"), 1, col)
        fig.update_xaxes(title_text=f"{METRICS[metric][0]} (block counts as refusal)", tickformat=".0%",
                         range=[0, 1.05], row=1, col=col)
        fig.update_yaxes(autorange="reversed", showticklabels=col == 1, row=1, col=col)
    recall = d["monitor"]["recall"]
    reads = recall.keys()
    for fpr, color in zip(recall[reads[0]].keys(), ("#555555", "#BBBBBB")):
        iv = [recall[r][fpr]["recall"].interval() for r in reads]
        fig.add_trace(go.Bar(x=[r.replace("_", " ") for r in reads], y=[i.value for i in iv], error_y=error_bars(iv),
                             name=f"threshold at {float(fpr):.0%} validation FPR", marker_color=color), 1, 3)
    fig.update_yaxes(title_text="harmful tasks flagged (95% CI)", tickformat=".0%", range=[0, 1.05], row=1, col=3)
    fig.update_layout(barmode="group")
    rows = tuple((f"{c['label']}", *(c[m].interval() for m in METRICS),
                  c["harmful_blocked"].interval() if c.get("harmful_blocked") else None,
                  c["benign_blocked"].interval() if c.get("benign_blocked") else None) for c in conds)
    rec_rows = tuple((r.replace("_", " "), *(v for f in recall[r].keys() for v in
                                            (recall[r][f]["recall"].interval(), recall[r][f]["fpr"].interval()
                                             if recall[r][f].get("fpr") else None)),
                      float(recall[r][next(iter(recall[r].keys()))]["auroc"])
                      if recall[r][next(iter(recall[r].keys()))].get("auroc") else None) for r in reads)
    fprs = [f"{float(f):.0%}" for f in recall[reads[0]].keys()]
    title = "F9 · Guards: PING, a classifier guard and the agent's own activations"
    caption = (f"Test split, {d['mode']} evaluation of the fine-tuned agent. A guard blocks a step whose harm score "
               f"reaches its threshold (the step does not run; it counts as a refusal). The classifier guard is a "
               f"small sequence classifier trained on the training split's transcripts (a stand-in for LlamaGuard-"
               f"style guards, not a claim about them); the activation monitor is a harm probe read from the agent's "
               f"own residual stream at layer {d['monitor']['layer']} during the forward pass that writes the step, "
               f"its threshold set on validation tasks at {float(d['monitor']['fpr']):.0%} false positives. Right: "
               f"recall of the monitor on the test tasks, with the PING prefix, fitted on the aligned model instead, "
               f"under few-shot examples, and with the request in a tool observation.")
    return FigureSpec("F9", "guards", title, caption, (
        Table(("defence", "harmful refusal or block", "benign success", "harmful blocked", "benign blocked"), rows),
        Table(("monitor read on", *(f"{x} {w}" for x in fprs for w in ("recall", "test FPR")), "AUROC"), rec_rows,
              "activation monitor, thresholds from validation")), styled(fig, title, height=560))
