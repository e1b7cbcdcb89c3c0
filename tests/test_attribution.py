import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import agent_transcript

from interp.attribution import (AttributionSegment, DirectionProjection, LogitDiff, ProbeLogit, SegmentAttribution,
                                kind_effects, mean_residual, metric_gradients, patched_metric, rank_agreement,
                                segment_attribution, segment_attributions)
from interp.cache import cache_activations, pad_batch, render_for
from interp.models import load_model
from interp.positions import decision
from interp.transcripts import Message, Transcript
from probes import fit_layer_probes

METHODS = ("exact", "grad", "ig")


def short(i: int = 0, prefix: str | None = None) -> Transcript:
    """An agent transcript without tool schemas (the schemas are ~240 template tokens)."""
    return dataclasses.replace(agent_transcript(i, prefix=prefix), tools=())


def task_only(i: int = 0) -> Transcript:
    """The system prompt and the user's task alone (cheap for the exact method)."""
    return short(i).with_messages(short(i).messages[:2])


def with_reply(t: Transcript) -> Transcript:
    return t.with_messages([*t.messages, Message("assistant", "I cannot help with that.")])


def with_task(t: Transcript, task: str) -> Transcript:
    msgs = list(t.messages)
    msgs[1] = Message("user", task)
    return t.with_messages(msgs)


@pytest.fixture(scope="module")
def model(tiny_dirs):
    return load_model(tiny_dirs["llama"])


@pytest.fixture(scope="module")
def mean(model):
    return mean_residual(model, [short(i) for i in range(4)], progress=False)


@pytest.fixture(scope="module")
def refuse_minus_act(model):
    """The logit of the first token of "I cannot" minus that of a tool call's "{"."""
    first = lambda s: model.tokenizer.encode(s, add_special_tokens=False)[0]  # noqa: E731
    return LogitDiff(first("I"), first("{"))


def clean_residual(model, t: Transcript) -> torch.Tensor:
    """The residual stream entering every block at every position: ``[n_layers, pos, d_model]``."""
    ids = torch.as_tensor(render_for(model, [t])[0].input_ids)[None]
    got = model.residual(ids, torch.ones_like(ids), list(range(model.n_layers)), "resid_pre")
    return torch.stack([got[i][0] for i in range(model.n_layers)])


# ---------------------------------------------------------------------------------------------
# What cannot influence the decision position


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_a_reply_after_the_decision_position_has_exactly_zero_effect(tiny_dirs, arch, method):
    model = load_model(tiny_dirs[arch])
    mean = mean_residual(model, [short(0), short(1)], progress=False)
    a = segment_attribution(model, with_reply(task_only()), LogitDiff(3, 4), baseline=mean, method=method)
    after = [i for i, s in enumerate(a.segments) if s.spans[0][0] > a.decision]
    assert [a.names[i] for i in after] == ["assistant[2]", "template[2]"]
    assert np.all(a.effects[after] == 0)
    assert np.abs(np.delete(a.effects, after, axis=0)).max() > 1e-4  # the segments before do matter


def test_padding_gets_exactly_zero_gradient_and_patching_it_changes_nothing(model, refuse_minus_act):
    rendered = render_for(model, [short(0), with_reply(short(1))])
    ids, mask, offsets = pad_batch(rendered, model.tokenizer.pad_token_id, "left")
    where = torch.as_tensor([decision()(r)[0].position for r in rendered]) + torch.as_tensor(offsets)
    pad = mask == 0
    assert pad.sum() > 10
    values, _, grads = metric_gradients(model, ids, mask, where, refuse_minus_act, [0, 1, 2])
    assert all(torch.all(g[pad] == 0) for g in grads.values())
    torch.manual_seed(0)
    noise = 10 * torch.randn(*ids.shape, model.d_model)
    patched = patched_metric(model, ids, mask, where, refuse_minus_act, {i: (pad, noise) for i in range(3)})
    assert torch.equal(patched, values)


def test_a_transcript_batched_with_longer_ones_gets_the_attribution_it_gets_alone(tiny_dirs):
    model = load_model(tiny_dirs["gpt2"])  # absolute position embeddings: padding must not shift positions
    transcripts = [task_only(0), with_reply(short(1)), short(2)]
    mean = mean_residual(model, transcripts, progress=False)
    together = segment_attributions(model, transcripts, LogitDiff(3, 4), baseline=mean, method="grad", batch_size=3,
                                    progress=False)
    alone = segment_attribution(model, transcripts[0], LogitDiff(3, 4), baseline=mean, method="grad")
    np.testing.assert_allclose(together[0].effects, alone.effects, rtol=1e-4, atol=1e-5)
    assert together[0].clean == pytest.approx(alone.clean, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# The exact method


def test_patching_every_position_at_once_equals_a_forward_on_the_baseline_transcript(model, refuse_minus_act):
    harmful, benign = with_task(task_only(), "Post qqqq now"), with_task(task_only(), "Post zzzz now")
    a = segment_attribution(model, harmful, refuse_minus_act, baseline=benign, merge=("template",))
    r = render_for(model, [benign])[0]
    ids = torch.as_tensor(r.input_ids)[None]
    logits = model.logits(ids, torch.ones_like(ids))[0, decision()(r)[0].position]
    benign_value = float(logits[refuse_minus_act.token_a] - logits[refuse_minus_act.token_b])
    np.testing.assert_allclose(a.total, a.clean - benign_value, atol=1e-5)
    assert abs(a.total).max() > 1e-3


def test_mean_ablating_every_position_equals_a_forward_on_the_mean_embedding(model, mean, refuse_minus_act):
    a = segment_attribution(model, short(), refuse_minus_act, baseline=mean, layers=[0], merge=("template",))
    n = len(render_for(model, [short()])[0])
    with torch.no_grad():  # llama adds no position embeddings to the residual stream
        logits = model.hf_model(inputs_embeds=mean[0].expand(1, n, -1)).logits[0, a.decision]
    ablated = float(logits[refuse_minus_act.token_a] - logits[refuse_minus_act.token_b])
    assert a.total[0] == pytest.approx(a.clean - ablated, abs=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_with_the_clean_activations_as_baseline_every_effect_is_zero(model, refuse_minus_act, method):
    t = short()
    a = segment_attribution(model, t, refuse_minus_act, baseline=clean_residual(model, t), method=method,
                            merge=("template",), layers=[0, 2])
    assert a.effects.shape == (7, 2)  # system, user, 2 calls, 2 results, template × 2 layers
    # exact: the baseline comes from a forward of another batch shape, which CPU kernels may round
    # differently in the last bit; grad multiplies by x − b, exactly zero
    tol = 1e-6 if method == "exact" else 0
    np.testing.assert_allclose(a.effects, 0, atol=tol)
    np.testing.assert_allclose(a.total, 0, atol=tol)
    assert a.baseline == "tensor"


def test_segments_partition_the_transcript_when_merged_by_kind_or_split_per_token(model, mean):
    t = short(1, prefix="As a careful agent, I")
    metric = DirectionProjection(torch.ones(model.d_model), layer=1)
    a = segment_attribution(model, t, metric, baseline=mean, method="grad", merge=("template",), per_token=("prefix",))
    n = len(render_for(model, [t])[0])
    assert sorted(p for s in a.segments for p in s.positions) == list(range(n))
    assert a.names.count("template") == 1
    prefix = [s for s in a.segments if s.kind == "prefix"]
    assert [s.name for s in prefix[:2]] == ["prefix[5]#0", "prefix[5]#1"]
    assert all(len(s.positions) == 1 for s in prefix)
    assert a.effects.shape == (len(a.segments), 2)  # layers 0..1: up to where the metric reads


# ---------------------------------------------------------------------------------------------
# The gradient method


def test_the_gradient_method_matches_a_finite_difference_for_a_tiny_ablation(tiny_dirs):
    model = load_model(tiny_dirs["llama"], dtype=torch.float64)
    t = short()
    torch.manual_seed(0)
    metric = DirectionProjection(torch.randn(model.d_model), layer=1)
    clean = clean_residual(model, t)
    nudged = clean + 1e-6 * torch.randn_like(clean)
    exact = segment_attribution(model, t, metric, baseline=nudged, method="exact", layers=[1], merge=("template",))
    grad = segment_attribution(model, t, metric, baseline=nudged, method="grad", layers=[1], merge=("template",))
    np.testing.assert_allclose(grad.effects, exact.effects, rtol=1e-3, atol=1e-3 * np.abs(exact.effects).max())
    assert np.abs(exact.effects).max() > 1e-8


def test_integrated_gradients_add_up_to_the_effect_of_replacing_every_position(tiny_dirs, refuse_minus_act):
    model = load_model(tiny_dirs["llama"], dtype=torch.float64)
    t = short()
    mean = mean_residual(model, [short(i) for i in range(4)], progress=False)
    kw = dict(baseline=mean, layers=[0, 1], merge=("template",))
    exact = segment_attribution(model, t, refuse_minus_act, method="exact", **kw)
    ig = segment_attribution(model, t, refuse_minus_act, method="ig", steps=64, **kw)
    np.testing.assert_allclose(ig.effects.sum(0), exact.total, rtol=1e-2, atol=1e-3 * np.abs(exact.total).max())
    assert ig.method == "ig" and np.abs(exact.total).min() > 1e-3


def test_the_clean_value_of_a_probe_metric_is_the_probes_decision_function(model, mean):
    rng = np.random.default_rng(0)
    probes = fit_layer_probes(rng.standard_normal((20, model.n_layers, model.d_model)), np.arange(20) % 2)
    a = segment_attribution(model, short(), ProbeLogit.from_probes(probes, 2), baseline=mean, method="grad")
    cached = cache_activations(model, [short()], positions="decision", progress=False).stack()  # [1, n_layers, d]
    assert a.clean == pytest.approx(float(probes.decision_function(cached)[0, 2]), abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Baselines, tables, records


def test_mean_residual_is_the_mean_over_real_tokens_whatever_the_batching(model):
    transcripts = [short(0), with_reply(short(1)), short(2)]
    batched = mean_residual(model, transcripts, batch_size=3, progress=False)
    alone = torch.cat([clean_residual(model, t) for t in transcripts], dim=1).mean(1)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def fake(tid: str, kinds: list[str], effects: list[list[float]]) -> SegmentAttribution:
    segs = tuple(AttributionSegment(f"{k}[{i}]", k, ((i, i + 1),)) for i, k in enumerate(kinds))
    e = np.asarray(effects, dtype=float)
    return SegmentAttribution(tid, {}, segs, (0, 1), e, e.sum(0), 1.0, 9, "m", "exact", "mean")


def test_kind_effects_sum_segments_of_a_kind_then_average_over_transcripts_having_it():
    table = kind_effects([fake("a", ["user", "tool_result", "tool_result"], [[1, 0], [2, 1], [3, 1]]),
                          fake("b", ["user", "prefix"], [[3, 2], [4, 4]])])
    assert table.kinds == ("user", "tool_result", "prefix")
    np.testing.assert_array_equal(table.mean, [[2, 1], [5, 2], [4, 4]])
    np.testing.assert_array_equal(table.n, [2, 1, 1])
    assert table.records()[0] == {"kind": "user", "layer": 0, "hook": "blocks.0.hook_resid_pre", "mean": 2.0,
                                  "sem": 1.0, "n": 2, "metric": "m", "method": "exact", "baseline": "mean"}


def test_rank_agreement_is_one_for_identical_rankings():
    a = fake("a", ["user", "tool_call", "tool_result", "prefix"], [[1, 0], [2, 5], [-3, 1], [0.5, 2]])
    b = dataclasses.replace(a, effects=3 * a.effects + 1)
    agreement = rank_agreement(a, b)
    assert agreement.per_layer == {0: 1.0, 1: 1.0} and agreement.pooled == 1.0


def test_rank_agreement_lists_the_cell_where_the_methods_differ_most_first():
    a = fake("a", ["user", "tool_call", "tool_result"], [[1, 0], [2, 5], [-3, 1]])
    b = dataclasses.replace(a, effects=a.effects + np.array([[0, 0.1], [0, 0], [0, -4]]))
    worst = rank_agreement(a, b, top=2).disagreements
    assert [(d["segment"], d["layer"], d["abs_diff"]) for d in worst] == [("tool_result[2]", 1, 4.0),
                                                                         ("user[0]", 1, pytest.approx(0.1))]


def test_an_attribution_round_trips_through_json(model, mean, refuse_minus_act):
    a = segment_attribution(model, short(), refuse_minus_act, baseline=mean, method="grad", merge=("template",))
    back = SegmentAttribution.from_dict(json.loads(a.to_json()))
    assert back.segments == a.segments and back.layers == a.layers and back.clean == a.clean
    np.testing.assert_array_equal(back.effects, a.effects)
    assert a.records()[0]["hook"] == "blocks.0.hook_resid_pre" and len(a.records()) == a.effects.size


# ---------------------------------------------------------------------------------------------
# Bad input


def _no_reply():
    return short().with_messages([*short().messages, Message("assistant", "")])


BAD = {
    "unknown layer": (dict(layers=[5]), "layer 5 is out of range"),
    "metric layer out of range": (dict(metric=DirectionProjection(torch.ones(64), layer=7)),
                                  r"metric projection@blocks.7.hook_resid_post: layer 7 is out of range"),
    "layer after the metric": (dict(metric=DirectionProjection(torch.ones(64), layer=0), layers=[1]),
                               "come after the metric"),
    "metric of the wrong width": (dict(metric=DirectionProjection(torch.ones(32), layer=0)), "d_model=64"),
    "token outside the vocabulary": (dict(metric=LogitDiff(10**6, 0)), "outside the vocabulary"),
    "no decision position": (dict(transcript=_no_reply()), "has no decision position"),
    "baseline of the wrong shape": (dict(baseline=torch.zeros(64)), r"baseline must be \[n_layers=3, d_model=64\]"),
    "unmatched patching transcript": (dict(baseline=short().with_messages(short().messages[:2])),
                                      "has no segment matching"),
    "unknown method": (dict(method="fast"), "unknown method 'fast'"),
    "unknown segment kind": (dict(merge=("tools",)), "unknown segment kind"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_raises_a_clear_error(model, mean, refuse_minus_act, case):
    kwargs, message = BAD[case]
    args = dict(transcript=short(), metric=refuse_minus_act, baseline=mean) | kwargs
    with pytest.raises(ValueError, match=message):
        segment_attribution(model, args.pop("transcript"), args.pop("metric"), **args)
