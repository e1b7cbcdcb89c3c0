import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import agent_transcript
from handbuilt import handbuilt_model, only_in

from interp.attribution import (DirectionProjection, LogitDiff, SegmentInteractions, mean_residual, pair_agreement,
                                planted_rank, recovery, segment_interaction)
from interp.cache import render_for
from interp.models import load_model
from interp.transcripts import Message, Transcript

FAST = ("grad", "ig")


def short(i: int = 0) -> Transcript:
    """System, user, two calls in one turn, two tool results; no tool schemas."""
    return dataclasses.replace(agent_transcript(i), tools=())


def with_reply(t: Transcript) -> Transcript:
    return t.with_messages([*t.messages, Message("assistant", "I cannot help with that.")])


def planted() -> Transcript:
    """The user's request and the first tool result each hold a word found nowhere else."""
    t = short()
    msgs = list(t.messages)
    msgs[1] = Message("user", "Open the page and post qqqq now")
    msgs[3] = Message("tool", "zzzz vvvv", tool_call_id="c1")
    return t.with_messages(msgs)


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    return load_model(tiny_dirs["llama"])


def gate_model(tiny, t: Transcript, names, bilinear=False):
    r = render_for(tiny, [t])[0]
    return handbuilt_model(tiny.tokenizer, only_in(r, names), bilinear=bilinear), r


def zeros(model) -> torch.Tensor:
    return torch.zeros(model.n_layers, model.d_model)


def gate_metric(model, layer=0) -> DirectionProjection:
    d = torch.zeros(model.d_model)
    d[-1] = 1.0
    return DirectionProjection(d, layer=layer)


# ---------------------------------------------------------------------------------------------
# A planted interaction in a hand-built model


def test_the_exact_method_finds_a_planted_and_with_its_known_value(tiny):
    model, _ = gate_model(tiny, planted(), ["user[1]", "tool_result[3]"])
    x = segment_interaction(model, planted(), gate_metric(model), baseline=zeros(model), merge=("template",))
    assert x.clean == 1.0
    assert x.ranked(0)[0] == (("user[1]", "tool_result[3]"), 1.0)
    others = [v for names, v in x.ranked(0)[1:]]
    assert others == [0.0] * (len(x.segments) * (len(x.segments) - 1) // 2 - 1)
    assert x.term("user[1]")[0] == 1.0 and x.term("tool_result[3]")[0] == 1.0  # each alone removes the AND
    assert planted_rank(x, ["user[1]", "tool_result[3]"], layer=0) == 1


def test_every_order_of_a_three_way_and_is_one_on_the_pieces_and_zero_elsewhere(tiny):
    names = ["system[0]", "user[1]", "tool_result[4]"]
    model, _ = gate_model(tiny, planted(), names)
    x = segment_interaction(model, planted(), gate_metric(model), baseline=zeros(model), order=None,
                            merge=("template",), layers=[0])
    pieces = {x.names.index(n) for n in names}
    for t, v in zip(x.terms, x.values[:, 0]):
        assert v == (1.0 if set(t) <= pieces else 0.0), [x.names[i] for i in t]
    assert x.term(*names)[0] == 1.0


def test_terms_of_every_order_add_up_to_the_effect_of_removing_every_segment(tiny):
    t = short(1)
    mean = mean_residual(tiny, [short(i) for i in range(3)], progress=False)
    x = segment_interaction(tiny, t, LogitDiff(3, 4), baseline=mean, order=None, merge=("template",),
                            exclude=("template",), layers=[0, 2])
    signs = np.asarray([(-1) ** (len(term) + 1) for term in x.terms])
    np.testing.assert_allclose(signs @ x.values, x.total, rtol=1e-5, atol=1e-5)
    assert len(x.segments) == 6 and len(x.terms) == 2 ** 6 - 1 and np.abs(x.total).min() > 1e-3


@pytest.mark.parametrize("method", FAST)
def test_the_estimates_equal_the_exact_pairs_of_a_bilinear_metric(tiny, method):
    model, _ = gate_model(tiny, planted(), ["user[1]", "tool_result[3]"], bilinear=True)
    kw = dict(baseline=zeros(model), merge=("template",), layers=[0])
    exact = segment_interaction(model, planted(), gate_metric(model), **kw)
    fast = segment_interaction(model, planted(), gate_metric(model), method=method, **kw)
    np.testing.assert_allclose(fast.pairs(), exact.pairs(), atol=1e-6)
    assert exact.term("user[1]", "tool_result[3]")[0] > 1  # several marked tokens on each side: a · b


@pytest.mark.parametrize("method,tol", [("grad", 5e-2), ("ig", 1e-2)])
def test_the_estimates_converge_to_the_exact_pairs_for_a_small_intervention(tiny_dirs, method, tol):
    # gpt2: its eager attention keeps float64 (Llama's softmax runs in float32, which buries O(ε²) terms)
    model = load_model(tiny_dirs["gpt2"], dtype=torch.float64)
    t = short()
    r = render_for(model, [t])[0]
    ids = torch.as_tensor(r.input_ids)[None]
    clean = model.residual(ids, torch.ones_like(ids), [1], "resid_pre")[1][0]
    torch.manual_seed(0)
    values = torch.zeros(model.n_layers, len(r), model.d_model, dtype=torch.float64)
    values[1] = clean + 1e-4 * torch.randn_like(clean)
    metric = DirectionProjection(torch.randn(model.d_model), layer=2)
    kw = dict(baseline=values, layers=[1], merge=("template",), exclude=("template",))
    exact = segment_interaction(model, t, metric, **kw).pairs()
    fast = segment_interaction(model, t, metric, method=method, **kw).pairs()
    assert np.abs(exact).max() > 1e-12  # second order in ε = 1e-4: tiny, but far above float64 rounding
    np.testing.assert_allclose(fast, exact, atol=tol * np.abs(exact).max())


# ---------------------------------------------------------------------------------------------
# What cannot influence the decision


@pytest.mark.parametrize("method", ("exact", *FAST))
def test_segments_after_the_decision_position_have_exactly_zero_interactions(tiny, method):
    t = with_reply(short())
    mean = mean_residual(tiny, [short(i) for i in range(3)], progress=False)
    x = segment_interaction(tiny, t, LogitDiff(3, 4), baseline=mean, method=method, merge=("template",),
                            exclude=("template",), layers=[0, 1])
    after = {i for i, s in enumerate(x.segments) if s.spans[0][0] > x.decision}
    assert [x.names[i] for i in after] == ["assistant[5]"]
    touching = [k for k, term in enumerate(x.terms) if set(term) & after]
    assert touching and np.all(x.values[touching] == 0)
    others = [k for k in range(len(x.terms)) if k not in touching and len(x.terms[k]) == 2]
    assert np.abs(x.values[others]).max() > 1e-6


@pytest.mark.parametrize("method", ("exact", *FAST))
def test_segments_a_model_never_reads_have_exactly_zero_interactions(tiny, method):
    model, _ = gate_model(tiny, planted(), ["user[1]", "tool_result[3]"], bilinear=method != "exact")
    x = segment_interaction(model, planted(), gate_metric(model), baseline=zeros(model), method=method,
                            merge=("template",))
    live = {x.names.index("user[1]"), x.names.index("tool_result[3]")}
    dead = [k for k, term in enumerate(x.terms) if len(term) == 2 and set(term) != live]
    assert np.all(x.values[dead] == 0)
    assert x.term("user[1]", "tool_result[3]")[0] > 0


def test_once_the_decision_position_has_read_a_segment_patching_it_later_changes_nothing(tiny):
    model, _ = gate_model(tiny, planted(), ["user[1]", "tool_result[3]"])
    x = segment_interaction(model, planted(), gate_metric(model, layer=1), baseline=zeros(model),
                            merge=("template",), exclude=("template",), layers=[0, 1])
    assert x.term("user[1]", "tool_result[3]").tolist() == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------
# Records, recovery tables, bad input


def test_an_interaction_record_round_trips_through_json(tiny):
    mean = mean_residual(tiny, [short(i) for i in range(2)], progress=False)
    x = segment_interaction(tiny, short(), LogitDiff(3, 4), baseline=mean, merge=("template",), layers=[0])
    back = SegmentInteractions.from_dict(json.loads(x.to_json()))
    assert back.segments == x.segments and back.terms == x.terms and back.turns == x.turns
    np.testing.assert_array_equal(back.values, x.values)
    assert [n["name"] for n in x.nodes()] == x.names and len(x.edges(0, top=3)) == 3


def test_patching_from_a_twin_gives_every_pair_zero_unless_both_segments_differ(tiny):
    twin = planted().with_messages([*planted().messages[:3], Message("tool", "aaaa bbbb", tool_call_id="c1"),
                                    *planted().messages[4:]])
    x = segment_interaction(tiny, planted(), LogitDiff(3, 4), baseline=twin, merge=("template",),
                            exclude=("template",), layers=[0])
    assert np.all(x.pairs()[..., 0] == 0)  # only one segment differs at the embeddings
    assert x.term("tool_result[3]")[0] != 0 and x.baseline.startswith("patch:")


def fake(tid: str, values: dict[tuple[int, int], float], n: int = 4) -> SegmentInteractions:
    from interp.attribution import AttributionSegment

    segs = tuple(AttributionSegment(f"s{i}", "user", ((i, i + 1),)) for i in range(n))
    terms = tuple((i,) for i in range(n)) + tuple((i, j) for i in range(n) for j in range(i + 1, n))
    vals = np.asarray([[values.get(t, 0.0)] for t in terms])
    return SegmentInteractions(tid, {}, segs, (0,) * n, tuple(range(n)), (0,), terms, vals, 1.0, np.zeros(1), 9,
                               "m", "raw", "exact", "mean", 2)


def test_the_planted_pair_ranks_first_only_when_strictly_above_every_other_pair():
    assert planted_rank(fake("a", {(0, 2): 2.0, (1, 3): 1.0}), ["s0", "s2"], 0) == 1
    assert planted_rank(fake("b", {(0, 2): 1.0, (1, 3): 1.0}), ["s0", "s2"], 0) == 2  # a tie counts against
    assert planted_rank(fake("c", {(0, 1): 0.5, (1, 2): 3.0, (0, 3): 4.0}), ["s0", "s1", "s2"], 0) == 2
    rec = recovery([fake("a", {(0, 2): 2.0}), fake("b", {(1, 3): 1.0})], [["s0", "s2"], ["s0", "s2"]])
    assert rec.top1[0]["value"] == 0.5 and rec.mean_rank == (3.5,) and rec.n_terms == 6


def test_pair_agreement_is_one_for_a_monotone_rescaling():
    a = [fake("a", {(0, 1): 1.0, (0, 2): 3.0, (1, 3): -2.0}), fake("b", {(2, 3): 1.0, (0, 3): 0.5})]
    b = [dataclasses.replace(x, values=3 * x.values + 1, method="grad") for x in a]
    got = pair_agreement(a, b)
    assert got["pooled"]["0"] == pytest.approx(1.0) and got["median_per_transcript"]["0"] == pytest.approx(1.0)


BAD = {
    "unknown method": (dict(method="shap"), "unknown interaction method 'shap'"),
    "unknown scale": (dict(scale="log"), "unknown scale 'log'"),
    "order 3 by gradients": (dict(method="grad", order=3), "estimates orders 1 and 2 only"),
    "order zero": (dict(order=0), "order must be a positive integer"),
    "every kind excluded": (dict(exclude=("template", "system", "user", "tool_call", "tool_result")),
                            "no candidate segment"),
    "one-row batches": (dict(batch_size=1), "batch_size must be >= 2"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_arguments_are_named(tiny, case):
    kwargs, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        segment_interaction(tiny, short(), LogitDiff(3, 4), baseline=zeros(tiny), **kwargs)
