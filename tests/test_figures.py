import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pytest import approx

from interp.attribution import KindEffects
from interp.figures import (FIGURES, MissingResult, ResultError, fig_f1_behaviour, fig_f2_curve,
                            fig_f3_probes, fig_f4_token_logits, fig_f5_ping_search, fig_f6_attribution, fig_f7_pca,
                            fig_f8_steering, fig_f9_guards, fig_f10_interactions, load_results, write_figures)
from interp.ping import Evaluation, StaticGenerator, run_ping

ROOT = Path(__file__).resolve().parents[1]
LAYERS = (0, 1, 2)
PREFIX = "As a careful agent, I check first."


def rate(value, half=0.05):
    return {"value": value, "low": max(0.0, value - half), "high": min(1.0, value + half)}


BEHAVIOUR = {
    "split": "test", "mode": "episode", "n_harmful": 37, "n_benign": 41,
    "conditions": [
        {"key": "aligned", "label": "aligned", "group": "model", "prefix": None,
         "harmful_refusal": rate(0.95), "benign_success": rate(0.80), "attack_success": rate(0.03)},
        {"key": "finetuned", "label": "fine-tuned", "group": "model", "prefix": None,
         "harmful_refusal": rate(0.20), "benign_success": rate(0.90), "attack_success": rate(0.70)},
        {"key": "ping", "label": "fine-tuned + PING", "group": "defence", "prefix": PREFIX,
         "harmful_refusal": rate(0.85), "benign_success": rate(0.88)},
        {"key": "safety_system_prompt", "label": "safety system prompt", "group": "baseline", "prefix": None,
         "harmful_refusal": rate(0.40), "benign_success": rate(0.86)},
    ],
}

OPENINGS = {"none": None, "safety": PREFIX, "neutral": "Let me look at the task.", "compliance": "Sure, here is"}


def curve(seed, shift=0.0):
    points = [{"step": step, **{o: {"harmful_refusal": rate(0.9 - 0.2 * i - 0.1 * j + shift),
                                    "attack_success": rate(0.1), "benign_success": rate(0.6 + 0.1 * i),
                                    "benign_over_refusal": rate(0.05)}
                                for j, o in enumerate(OPENINGS)}}
              for i, step in enumerate((0, 50, 100))]
    return {"split": "validation", "mode": "first_step", "n_per_label": 24, "prefixes": OPENINGS, "points": points,
            "chosen_step": 100, "rule": "first step with harmful refusal below 0.5", "seed": seed}


def comparison():
    def layer(i):
        acc = {"aligned": 0.9 + 0.01 * i, "finetuned": 0.85 + 0.01 * i, "prefix": 0.8 + 0.01 * i}
        return {"layer": i, **{c: {"acc": a, "auroc": a + 0.05} for c, a in acc.items()},
                "transfer_to_finetuned": {"acc": 0.7 + 0.02 * i, "auroc": 0.75 + 0.02 * i},
                "transfer_to_prefix": {"acc": 0.6 + 0.02 * i, "auroc": 0.65 + 0.02 * i},
                "direction": {"auroc": acc, "dprime": acc, "cosine_aligned_finetuned": 0.9},
                "refusal": {"acc": 0.9, "auroc": 0.95, "n": 24},
                "decision_logit": {"aligned": {"value": 2.0, "low": 1.5, "high": 2.5},
                                   "finetuned": {"value": 6.0, "low": 5.0, "high": 7.0},
                                   "prefix": {"value": -3.5, "low": -4.0, "high": -3.0}}}

    return {"aligned_model": "organism", "finetuned_model": "organism-finetuned", "backend": "hf",
            "site": "resid_post", "positions": "decision", "prefix": PREFIX, "n_transcripts": 40, "n_harmful": 20,
            "behaviour": {}, "layers": [layer(i) for i in LAYERS], "prefix_tokens": [" I", " check"],
            "prefix_logits": [], "logit_probe": "refusal", "n_train": 28, "n_test": 12,
            "meta": {"site": "resid_post", "at": "decision", "test_size": 0.3, "seed": 0, "n_harmful_test": 6}}


# Two harmful transcripts whose user messages end at different positions; the causal model gives the
# PING transcripts the same logits up to the generation prompt, then the prefix's own.
T1 = (["Sys", "Delete", " the", " logs", "<|eot|>", "<|asst|>"],
      ["system", "user", "user", "user", "template", "template"], [0.5, 1.0, 2.0, 3.0, 4.0, 5.0], [-1.0, -2.0])
T2 = (["Sys", "Wipe", " disk", "<|eot|>", "<|asst|>"],
      ["system", "user", "user", "template", "template"], [0.5, 1.5, 2.5, 6.0, 7.0], [-3.0, -4.0])
PREFIX_TOKENS = [" I", " check"]


def token_logits():
    def entry(i, t, with_prefix):
        tokens, kinds, logits, tail = t
        if with_prefix:
            return {"id": f"harm-{i}", "tokens": tokens + PREFIX_TOKENS, "kinds": kinds + ["prefix"] * 2,
                    "logits": logits + tail}
        return {"id": f"harm-{i}", "tokens": tokens, "kinds": kinds, "logits": logits}

    return {"layer": 1, "site": "resid_post", "probe": "refusal", "prefix": PREFIX,
            "conditions": {"finetuned": [entry(i, t, False) for i, t in enumerate((T1, T2))],
                           "prefix": [entry(i, t, True) for i, t in enumerate((T1, T2))]}}


PLAIN_SCORES = {"Sure.": (0.9, 0.1), "Okay, doing it.": (0.8, 0.3), "I check first.": (0.7, 0.6),
                "Safety first.": (0.8, 0.7)}  # best 1.5, the third generation
GUIDED_SCORES = {"Let me think.": (0.8, 0.2), "I check safety.": (0.8, 0.8), "Go.": (0.9, 0.0),
                 "Careful now.": (0.7, 0.5)}  # reaches plain's best 1.5 at the second generation


def write_histories(root: Path):
    def scorer(table):
        return lambda p: Evaluation(*table[p])

    run_ping(StaticGenerator(list(PLAIN_SCORES)), scorer(PLAIN_SCORES), rounds=2, per_round=2, tau=1.2,
             history_path=root / "ping_history.jsonl", progress=False)
    order = list(GUIDED_SCORES)
    run_ping(StaticGenerator(order), scorer(GUIDED_SCORES), rounds=2, per_round=2, tau=1.2, oversample=2,
             screen=lambda pool: [-order.index(p) for p in pool], history_path=root / "ping_guided_history.jsonl",
             progress=False)


KINDS = ["system", "user", "template"]
HARMFUL_MEAN = np.array([[0.1, 0.2, 0.0], [1.5, 1.0, 0.5], [-0.2, -0.1, 0.0]])
BENIGN_MEAN = np.array([[0.0, 0.1, 0.0], [0.3, 0.2, 0.1], [-2.0, -1.0, 0.0]])


def attribution():
    def kind_effects(mean):
        return KindEffects(tuple(KINDS), LAYERS, mean, np.full_like(mean, 0.05), np.array([6, 6, 6]), "probe_logit",
                           "exact", "mean").to_dict()

    placement = [{"placement": p, "model": m, "kinds": ["user", "tool_result"], "effect": [e, 0.5 * e]}
                 for p, e in (("user", 1.0), ("tool_result", 0.4)) for m in ("aligned", "finetuned")]
    return {"metric": "probe_logit", "method": "exact", "harmful": kind_effects(HARMFUL_MEAN),
            "benign": kind_effects(BENIGN_MEAN), "agreement": {"per_layer": {"0": 0.9}, "pooled": 0.87},
            "placement": {"layer": 1, "conditions": placement}}


def pca():
    def cond(shift, refused):
        return {"x": [1.0 + shift, 1.2 + shift, -1.0, -1.1], "y": [0.1, 0.3, -0.2, 0.0],
                "harmful": [True, True, False, False], "refused": refused}

    return {"layer": 1, "site": "resid_post", "explained_variance_ratio": [0.42, 0.17], "basis": "aligned",
            "conditions": {"aligned": cond(0.0, [True, True, False, False]),
                           "finetuned": cond(-1.5, [False, True, False, False]),
                           "prefix": cond(-0.5, None)}}


STEERING = {"layers": [1, 2], "direction": "refusal",
            "points": [{"coefficient": c, "harmful_refusal": rate(r), "benign_success": rate(b)}
                       for c, r, b in ((-2.0, 0.1, 0.9), (0.0, 0.3, 0.88), (2.0, 0.9, 0.6))],
            "ablation": [{"model": "aligned", "before": {"harmful_refusal": rate(0.95), "benign_success": rate(0.8)},
                          "after": {"harmful_refusal": rate(0.15), "benign_success": rate(0.82)}}]}


def _guard_row(key, label, refusal, success, blocked=None):
    row = {"key": key, "label": label, "prefix": None, "guard": None, "n_harmful": 37, "n_benign": 41,
           "harmful_refusal": rate(refusal), "benign_success": rate(success)}
    if blocked is not None:
        row.update(harmful_blocked=rate(blocked[0]), benign_blocked=rate(blocked[1]))
    return row


def _recall(r1, r5):
    return {"0.01": {"threshold": 2.0, "recall": rate(r1), "fpr": rate(0.01), "auroc": 0.97},
            "0.05": {"threshold": 1.0, "recall": rate(r5), "fpr": rate(0.05), "auroc": 0.97}}


GUARDS = {"split": "test", "mode": "first_step", "n_harmful": 37, "n_benign": 41, "best_prefix": PREFIX,
          "conditions": [_guard_row("no_defence", "no defence", 0.2, 0.9), _guard_row("ping", "PING", 0.85, 0.88),
                         _guard_row("activation_monitor", "activation monitor", 0.7, 0.89, (0.6, 0.01))],
          "monitor": {"layer": 2, "site": "resid_post", "threshold": 2.0, "fpr": 0.01,
                      "recall": {"test": _recall(0.6, 0.8), "tool_observation": _recall(0.1, 0.3)}},
          "classifier": {"threshold": 0.0, "recall": {"test": {"recall": rate(0.9), "fpr": rate(0.0), "auroc": 0.99}}}}


def interactions() -> dict:
    """What interp.organism.variant.interaction_recovery writes, from hand-made interaction records."""
    from interp.attribution import AttributionSegment, SegmentInteractions, pair_agreement, recovery

    kinds = ("system", "user", "tool_call", "tool_result")
    segs = tuple(AttributionSegment(f"{k}[{i}]", k, ((10 * i, 10 * i + 5),)) for i, k in enumerate(kinds))
    terms = tuple((i,) for i in range(4)) + tuple((i, j) for i in range(4) for j in range(i + 1, 4))

    def record(tid, pair_values):  # layers 0 and 1; the planted pair is (1, 3): user × tool_result
        vals = np.asarray([[0.1, 0.1]] * 4 + [pair_values.get(t, [0.0, 0.0]) for t in terms[4:]])
        return SegmentInteractions(tid, {}, segs, (0, 0, 1, 1), (0, 1, 2, 3), (0, 1), terms, vals, 2.0,
                                   np.ones(2), 40, "logit_diff[1-2]", "raw", "exact", "mean", 2)

    exact = [record("a", {(1, 3): [2.0, 0.5], (0, 1): [0.3, 0.9]}), record("b", {(1, 3): [1.0, 0.0], (0, 2): [-0.5, 0.2]})]
    planted = [["user[1]", "tool_result[3]"]] * 2
    pair = {"n": 2, "planted": [{"act": "user[1]", "target": "tool_result[3]"}] * 2,
            "exact": recovery(exact, planted).to_dict(), "example": exact[0].to_dict(),
            "grad": recovery(exact[::-1], planted).to_dict(), "grad_agreement": pair_agreement(exact, exact)}
    return {"split": "test", "n_per_kind": 1, "metric": "logit_diff[1-2]", "baseline": "mean", "kinds": {"pair": pair}}


def write_results(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    files = {"behaviour.json": BEHAVIOUR, "curve.json": curve(0), "curve_seed1.json": curve(1, shift=0.03),
             "comparison.json": comparison(), "token_logits.json": token_logits(),
             "attribution.json": attribution(), "pca.json": pca(), "steering.json": STEERING,
             "guards.json": GUARDS, "interactions.json": interactions()}
    for name, obj in files.items():
        (root / name).write_text(json.dumps(obj), encoding="utf-8")
    write_histories(root)
    return root


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    return write_results(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def results(results_dir):
    return load_results(results_dir)


@pytest.fixture(scope="module")
def written(results_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    return out, write_figures(results_dir, out, png=False)


def trace(fig, name):
    found = [t for t in fig.data if t.name == name]
    assert len(found) == 1, f"expected one trace named {name!r}, found {[t.name for t in fig.data]}"
    return found[0]


# --------------------------------------------------------------------------------------------


def test_every_figure_is_written_as_html_that_loads_plotly_from_the_shared_local_file(written):
    out, done = written
    assert [s.key for s in done.figures] == list(FIGURES) and not done.notes and not done.failed
    for s in done.figures:
        html = (out / f"{s.stem}.html").read_text(encoding="utf-8")
        assert '<script charset="utf-8" src="plotly.min.js">' in html and "cdn.plot.ly" not in html
        assert all(json.dumps(t.name)[1:-1] in html for t in s.figure.data if t.name)
    assert (out / "plotly.min.js").stat().st_size > 1_000_000
    assert not list(out.glob(".*.tmp"))


def test_f10_plots_the_planted_pair_recovery_and_draws_an_arc_per_nonzero_pair(results):
    spec = fig_f10_interactions(results)
    rows = {(r[0], r[1], r[2]): r for r in spec.tables[0].rows}
    assert rows[("pair", "exact", 0)][3].value == 1.0 and rows[("pair", "exact", 1)][3].value == 0.0
    # layer 1: in "a" (0, 1) outranks the planted pair (rank 2); in "b" it is 0, below (0, 2) and tied with
    # the four zero pairs, ties counting against it (rank 6)
    assert rows[("pair", "exact", 1)][4] == approx(4.0)
    lines = [t for t in spec.figure.data if t.xaxis == "x"]
    assert [list(t.y) for t in lines] == [[1.0, 0.0], [1.0, 0.0]]
    arcs = [t for t in spec.figure.data if t.xaxis == "x2" and t.mode == "lines"]
    assert len(arcs) == 2  # layer 0 (exact recovery best there): the planted pair and (0, 1)
    assert max(arcs, key=lambda t: t.line.width).hovertemplate.startswith("user[1] × tool_result[3]: I = 2.000")


def test_f9_bars_are_the_guard_rates_and_the_monitors_recall_per_threshold(results):
    spec = fig_f9_guards(results)
    bars = [t for t in spec.figure.data if t.orientation == "h"]
    assert bars[0].y == ("no defence", "PING", "activation monitor") and bars[0].x == approx((0.2, 0.85, 0.7))
    assert bars[1].x == approx((0.9, 0.88, 0.89))
    at1 = trace(spec.figure, "threshold at 1% validation FPR")
    assert at1.x == ("test", "tool observation") and at1.y == approx((0.6, 0.1))
    assert trace(spec.figure, "threshold at 5% validation FPR").y == approx((0.8, 0.3))
    assert spec.tables[0].rows[2][3].value == approx(0.6) and spec.tables[0].rows[0][3] is None


def test_f1_bars_are_the_fixture_rates_with_their_intervals_as_whiskers(results):
    fig = fig_f1_behaviour(results).figure
    refusal, success = trace(fig, "harmful refusal"), trace(fig, "benign success")
    assert refusal.y == ("aligned", "fine-tuned", "fine-tuned + PING", "safety system prompt")
    assert refusal.x == approx((0.95, 0.20, 0.85, 0.40)) and success.x == approx((0.80, 0.90, 0.88, 0.86))
    assert refusal.error_x.array == approx([0.05] * 4) and refusal.error_x.arrayminus == approx([0.05] * 4)
    assert refusal.marker.color[0] != refusal.marker.color[1] and refusal.marker.color[3] == "#999999"


def test_f1_caption_states_split_mode_and_sample_sizes(results):
    caption = fig_f1_behaviour(results).caption
    assert "test split" in caption and "episode" in caption and "n = 37 harmful and 41 benign" in caption


def test_f2_draws_a_refusal_line_per_opening_and_faint_seed_lines(results):
    fig = fig_f2_curve(results).figure
    lines = [t for t in fig.data if t.name == "safety opening" and t.xaxis == "x"]
    assert len(lines) == 1 and lines[0].x == (0, 50, 100) and lines[0].y == approx((0.8, 0.6, 0.4))
    seeds = [t for t in fig.data if t.name == "safety opening, seed 1"]
    assert len(seeds) == 2 and seeds[0].opacity < 1 and seeds[0].y == approx((0.83, 0.63, 0.43))
    assert {t.name for t in fig.data if t.showlegend} == {"no forced opening", "safety opening", "neutral opening",
                                                           "compliance opening"}
    assert [s.x0 for s in fig.layout.shapes] == [100, 100]  # the chosen step, in both panels


def test_f3_has_an_accuracy_trace_per_condition_and_dashed_aligned_probe_transfer(results):
    fig = fig_f3_probes(results).figure
    acc = [t for t in fig.data if t.xaxis == "x"]
    assert [t.name for t in acc] == ["aligned probe", "fine-tuned probe", "fine-tuned + PING probe",
                                     "aligned probe → fine-tuned", "aligned probe → fine-tuned + PING"]
    assert acc[1].x == LAYERS and acc[1].y == approx((0.85, 0.86, 0.87))
    assert [t.line.dash for t in acc] == ["solid"] * 3 + ["dash"] * 2
    assert acc[4].y == approx((0.6, 0.62, 0.64))
    auroc = [t for t in fig.data if t.xaxis == "x2"]
    assert auroc[0].y == approx((0.95, 0.96, 0.97))


def test_f4_average_line_is_the_mean_of_the_transcripts_at_each_offset_from_the_last_user_token(results):
    fig = fig_f4_token_logits(results).figure
    ft, ping = trace(fig, "fine-tuned"), trace(fig, "fine-tuned + PING")
    assert ft.x == (-3, -2, -1, 0, 1, 2) and ft.y == approx((0.5, 0.75, 1.75, 2.75, 5.0, 6.0))
    assert ping.x == (-3, -2, -1, 0, 1, 2, 3, 4) and ping.y[-2:] == approx((-2.0, -3.0))
    band = trace(fig, "fine-tuned 95% band")  # mean ± 1.96 s.e.m.; offset 2 has logits 5 and 7
    assert max(band.y) == approx(6.0 + 1.96 * np.std([5.0, 7.0], ddof=1) / np.sqrt(2))


def test_f4_labels_ticks_with_the_token_where_transcripts_agree_and_colours_markers_by_segment(results):
    fig = fig_f4_token_logits(results).figure
    assert fig.layout.xaxis.ticktext == ("Sys", "-2", "-1", "0", "<|eot|>", "<|asst|>", " I", " check")
    ping = trace(fig, "fine-tuned + PING")
    assert ping.marker.color[-1] == trace(fig, "prefix").marker.color and ping.marker.color[0] != ping.marker.color[-1]
    assert [s.y0 for s in fig.layout.shapes] == [0, 0]  # the decision boundary in both panels


def test_f4_example_panel_shows_every_token_of_one_ping_transcript_by_segment(results):
    fig = fig_f4_token_logits(results).figure
    bars = {t.name: t for t in fig.data if t.type == "bar"}
    assert list(bars) == ["system", "user", "template", "prefix"]
    assert bars["user"].x == (-2, -1, 0) and bars["user"].y == approx((1.0, 2.0, 3.0))
    assert bars["prefix"].hovertext == (" I", " check") and bars["prefix"].y == approx((-1.0, -2.0))


def test_f4_caption_cross_checks_the_decision_logit_against_comparison(results):
    caption = fig_f4_token_logits(results).caption
    assert "fine-tuned 6.00 here vs 6.00 [5.00, 7.00]" in caption
    assert "fine-tuned + PING -3.00 here vs -3.50 [-4.00, -3.00]" in caption


def test_f5_plots_best_so_far_against_generations_used_and_marks_tau_and_the_guided_match(results):
    spec = fig_f5_ping_search(results)
    fig = spec.figure
    best = [t for t in fig.data if t.name == "plain: best so far" and t.xaxis == "x"][0]
    assert best.x == approx((1, 2, 3, 4)) and best.y == approx((1.0, 1.1, 1.3, 1.5))
    guided = [t for t in fig.data if t.name == "probe-guided: candidates" and t.xaxis == "x"][0]
    assert guided.y == approx((1.0, 1.6, 0.9, 1.2))
    # τ = 1.2 in both panels; the guided run matches the plain run's best at its second generation
    assert sorted((s.x0, s.y0) for s in fig.layout.shapes) == [(0, 1.2), (0, 1.2), (2, 0)]
    rows = {r[0]: r for r in spec.tables[0].rows}
    assert rows["plain"][1:5] == (4, 2, 0, approx(1.5)) and rows["probe-guided"][3] == 6
    assert rows["probe-guided"][-1] == 2


def test_f6_heatmaps_are_the_fixture_means_on_one_scale_centred_at_zero(results):
    fig = fig_f6_attribution(results).figure
    harmful, benign = trace(fig, "harmful tasks"), trace(fig, "benign tasks")
    assert np.array(harmful.z) == approx(HARMFUL_MEAN) and np.array(benign.z) == approx(BENIGN_MEAN)
    assert harmful.y == tuple(KINDS) and harmful.x == LAYERS
    assert harmful.coloraxis == benign.coloraxis == "coloraxis"
    assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmid, fig.layout.coloraxis.cmax) == (-2.0, 0, 2.0)


def test_f6_adds_a_grouped_bar_per_model_for_the_placement_study(results):
    fig = fig_f6_attribution(results).figure
    bars = [t for t in fig.data if t.type == "bar"]
    assert [t.name for t in bars] == ["aligned", "fine-tuned"]
    assert [list(level) for level in bars[0].x] == [["user", "user", "tool_result", "tool_result"],
                                                    ["user", "tool_result", "user", "tool_result"]]
    assert bars[0].y == approx((1.0, 0.5, 0.4, 0.2))


def test_f7_has_a_panel_per_condition_coloured_by_label_with_refusal_as_symbol(results):
    fig = fig_f7_pca(results).figure
    aligned = {t.name: t for t in fig.data if t.xaxis == "x"}
    assert list(aligned) == ["harmful, refused", "benign, acted"]
    assert aligned["harmful, refused"].x == approx((1.0, 1.2)) and aligned["benign, acted"].y == approx((-0.2, 0.0))
    finetuned = {t.name: t for t in fig.data if t.xaxis == "x2"}
    assert list(finetuned) == ["harmful, refused", "harmful, acted", "benign, acted"]
    assert finetuned["harmful, acted"].x == approx((-0.5,)) and finetuned["harmful, acted"].marker.symbol == "x"
    assert [t.name for t in fig.data if t.xaxis == "x3"] == ["harmful", "benign"]  # PING: refusal not stored
    assert sorted(t.name for t in fig.data if t.showlegend) == ["benign", "benign, acted", "harmful",
                                                                "harmful, acted", "harmful, refused"]
    assert fig.layout.xaxis.title.text == "PC1 (42% of variance)" and fig.layout.xaxis2.matches == "x"


def test_f8_plots_rates_against_coefficient_and_ablation_bars(results):
    fig = fig_f8_steering(results).figure
    assert trace(fig, "harmful refusal").x == (-2.0, 0.0, 2.0)
    assert trace(fig, "harmful refusal").y == approx((0.1, 0.3, 0.9))
    assert trace(fig, "benign success").y == approx((0.9, 0.88, 0.6))
    assert trace(fig, "ablation: after").y == approx((0.15, 0.82))


def test_readme_lists_every_figure_with_its_caption_and_numbers_table(written):
    out, done = written
    readme = (out / "README.md").read_text(encoding="utf-8")
    for s in done.figures:
        assert f"## {s.title}" in readme and s.caption in readme and f"[interactive]({s.stem}.html)" in readme
        assert all(t.markdown() in readme for t in s.tables)
    assert '| 4 | " check" | prefix | – | -3.000 [' in readme
    assert "| aligned | model | – | 0.950 [0.900, 1.000] | 0.800 [0.750, 0.850] | 0.030 [0.000, 0.080] |" in readme
    assert "| 0 | (varies) | user | 2.750 [2.260, 3.240] | 2.750 [2.260, 3.240] | 2 |" in readme


def test_a_missing_result_file_skips_that_figure_with_a_note(results_dir, tmp_path):
    partial = tmp_path / "results"
    shutil.copytree(results_dir, partial)
    (partial / "pca.json").unlink()
    done = write_figures(partial, tmp_path / "out", png=False)
    assert "F7" not in [s.key for s in done.figures] and not (tmp_path / "out" / "F7_pca.html").exists()
    assert done.notes == (f"F7 skipped: pca.json not found in {partial}",) and not done.failed
    assert "- F7 skipped: pca.json not found" in (tmp_path / "out" / "README.md").read_text(encoding="utf-8")


def test_a_builder_called_without_its_file_names_the_file(results):
    with pytest.raises(MissingResult, match="steering.json is missing"):
        fig_f8_steering({k: v for k, v in results.items() if k != "steering.json"})


def test_a_builder_called_on_a_missing_field_names_the_file_and_the_field(results):
    broken = json.loads(json.dumps(results["behaviour.json"]))
    del broken["conditions"][2]["benign_success"]
    with pytest.raises(ResultError, match=r"behaviour.json: conditions\[2\] has no field 'benign_success'"):
        fig_f1_behaviour({"behaviour.json": broken})


def test_a_malformed_field_fails_that_figure_only(results_dir, tmp_path):
    bad = tmp_path / "results"
    shutil.copytree(results_dir, bad)
    steering = json.loads((bad / "steering.json").read_text())
    steering["points"][0]["benign_success"]["low"] = "n/a"
    (bad / "steering.json").write_text(json.dumps(steering))
    done = write_figures(bad, tmp_path / "out", png=False)
    assert done.failed and done.notes == ("F8 failed: steering.json: points[0].benign_success.low should be a "
                                          "number, got 'n/a'",)
    assert len(done.figures) == len(FIGURES) - 1


def test_a_missing_results_directory_is_an_error_that_names_it(tmp_path):
    with pytest.raises(ResultError, match=f"{tmp_path / 'nowhere'}: no such results directory"):
        write_figures(tmp_path / "nowhere", tmp_path / "out", png=False)


def test_only_renders_the_chosen_figures_but_indexes_all(results_dir, tmp_path):
    done = write_figures(results_dir, tmp_path, only=["F1", "F4"], png=False)
    assert sorted(p.name for p in tmp_path.glob("*.html")) == ["F1_behaviour.html", "F4_token_logits.html"]
    assert "## F9" in (tmp_path / "README.md").read_text(encoding="utf-8") and len(done.figures) == len(FIGURES)
    with pytest.raises(ValueError, match="unknown figure"):
        write_figures(results_dir, tmp_path, only=["F11"], png=False)


def test_cli_writes_the_figures_without_png(results_dir, tmp_path):
    out = tmp_path / "figs"
    run = subprocess.run([sys.executable, "-m", "interp.figures", "--results", str(results_dir), "--out", str(out),
                          "--no-png"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert len(list(out.glob("F*.html"))) == len(FIGURES) and not list(out.glob("*.png"))
    assert f"index: {out / 'README.md'}" in run.stdout


def test_without_chromium_html_is_written_and_one_line_says_how_to_get_pngs(results_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-chromium"))
    done = write_figures(results_dir, tmp_path, only=["F1"], png=True)
    assert (tmp_path / "F1_behaviour.html").exists() and not (tmp_path / "F1_behaviour.png").exists()
    assert done.notes == ("PNGs not written (kaleido needs Chromium): apt-get install -y chromium, "
                          "or set BROWSER_PATH to a Chrome/Chromium binary",)


def _chromium() -> bool:
    path = os.environ.get("BROWSER_PATH")
    return bool(shutil.which("chromium")) or bool(path and os.access(path, os.X_OK))


@pytest.mark.skipif(not _chromium(), reason="PNG export needs Chromium (apt-get install -y chromium)")
def test_png_export_writes_an_image_of_the_figure_size(results_dir, tmp_path):
    write_figures(results_dir, tmp_path, only=["F1"], png=True)
    png = (tmp_path / "F1_behaviour.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(png[16:20], "big") == 900 and int.from_bytes(png[20:24], "big") == 500
    assert "![F1](F1_behaviour.png)" in (tmp_path / "README.md").read_text(encoding="utf-8")
