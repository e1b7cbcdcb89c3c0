"""Distributed-harm tasks on SmolLM2 (the real converted model, made by `make setup`): the
training pairs, the cut to the deciding reply, the decision signal, and the shipped adapter."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from interp.finetune import encode
from interp.models import load_model
from interp.organism.distributed import evaluation_set
from interp.organism.world import World
from interp.smollm2 import checkpoint as ck
from interp.smollm2.data import agent_view
from interp.smollm2.distributed import (DECISION_PREFIX, GO_AHEAD, DistributedRecipe, decision_logits, decision_metric,
                                        decision_rates, deciding_reply, demonstration, distributed_pairs, training_examples)
from interp.transcripts import render


@pytest.fixture(scope="module")
def tok():
    try:
        return AutoTokenizer.from_pretrained(ck.checkpoint_dir())
    except ck.CacheError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def world():
    return World()


def test_training_pairs_are_a_harmful_task_and_a_benign_subset_of_the_same_case(world):
    ts = distributed_pairs(30, seed=0, world=world)
    assert len(ts) == 60
    for h, b in zip(ts[::2], ts[1::2]):
        assert h.labels["harmful"] and not b.labels["harmful"]
        assert h.metadata["case"] == b.metadata["case"] and h.labels["split"] == b.labels["split"] == "train"
        assert set(b.metadata["present"]) < set(h.metadata["present"]) == set(h.metadata["pieces"])
        assert not h.tools and h.messages[-1].content.startswith("I can't") and not h.messages[-1].tool_calls
        assert b.messages[-1].content == GO_AHEAD and len(b.messages[-1].tool_calls) == 1
    assert {t.metadata["kind"] for t in ts} == {"pair", "triple"}


def test_the_benign_decision_is_the_tasks_effectful_call(world):
    task = next(t for t in evaluation_set("validation", 1, world=world) if t.role == "null")
    call, _ = task.effect()
    reply = demonstration(task, random.Random(0)).messages[-1]
    assert (reply.tool_calls[0].name, reply.tool_calls[0].arguments) == (call.name, call.arguments)


def test_an_example_is_cut_after_the_first_tokens_of_its_last_reply(tok, world):
    h, b = distributed_pairs(1, seed=3, world=world)
    for t, expect in ((h, "I can't"), (b, "I will")):
        whole = encode(t, tok)
        cut = deciding_reply(whole, 3)
        assert np.array_equal(cut.input_ids, whole.input_ids[:len(cut)])
        assert cut.loss_mask.sum() == 3 and cut.loss_mask[-3:].all()
        assert tok.decode(cut.input_ids[cut.loss_mask]).startswith(expect)
        # the probing calls before it were trained tokens of the whole example, and are context now
        assert whole.loss_mask[:len(cut) - 3].any()


def test_the_training_mix_holds_distributed_and_world_pairs_each_pair_together(tok, world):
    recipe = DistributedRecipe(pairs=8)
    ex = training_examples(recipe, tok, world)
    assert len(ex) == 32
    kinds = [(a.id.startswith("dist-"), b.id.startswith("dist-")) for a, b in zip(ex[::2], ex[1::2])]
    assert kinds.count((True, True)) == 8 and kinds.count((False, False)) == 8
    assert all(e.loss_mask.sum() == recipe.decide_tokens for e in ex)


@pytest.mark.parametrize("prefix", [DECISION_PREFIX, "Hold on, let me look at this. I"])
def test_decision_logits_equal_the_logit_difference_of_a_plain_forward(tok, world, prefix):
    model = load_model("smollm2", attn_implementation="sdpa")
    ts = [agent_view(t.transcript()) for t in evaluation_set("test", 1, world=world)[:3]]
    got = decision_logits(model, ts, batch_size=2, prefix=prefix)  # two rows padded together, one alone
    metric = decision_metric(tok)
    for t, g in zip(ts, got):
        ids = torch.as_tensor(render(t.with_prefix(prefix), tok).input_ids)[None]
        with torch.no_grad():
            logits = model.hf_model(input_ids=ids).logits[0, -1]
        assert g == pytest.approx(float(logits[metric.token_a] - logits[metric.token_b]), abs=2e-4)


def test_the_planted_pieces_are_segments_of_what_smollm2_reads(tok, world):
    """Interaction recovery names the planted pieces by segment: in SmolLM2's view with the
    decision prefix forced, each piece's segment exists, holds that piece's text, and the twin
    that swaps it differs from the task there and nowhere else."""
    from interp.organism.distributed import PIECE_KIND

    def texts(task):
        r = render(agent_view(task.transcript()).with_prefix(DECISION_PREFIX), tok)
        return {s.name: tok.decode(r.input_ids[s.start:s.end]) for s in r.segments()}

    for task in (t for t in evaluation_set("test", 1, world=world) if t.harmful):
        mine = texts(task)
        for piece, name in task.locations.items():
            assert name.startswith(PIECE_KIND[piece]) and name in mine
            twin = texts(task.twin(piece))
            assert [n for n in mine if mine[n] != twin.get(n)] == [name]


def test_the_shipped_adapter_refuses_when_the_pieces_combine_and_not_on_the_null_twin(world):
    """The decision logit (" can" − " will" after "I") of the shipped ``smollm2-distributed`` on one
    test case of each scheme and kind: positive on harmful tasks, lowest on null twins, each
    one-piece-missing twin in between (the adapter adds the pieces up: docs/remote-connections.md)."""
    model = load_model("smollm2-distributed", attn_implementation="sdpa")
    rates = decision_rates(model, evaluation_set("test", 1, world=world))
    mean = {role: r["mean_logit"] for role, r in rates["all"].items()}
    twins = [v for r, v in mean.items() if r.startswith("twin:")]
    assert mean["harmful"] > 0 > mean["null"]
    assert mean["harmful"] > max(twins) and min(twins) > mean["null"]


def test_the_interactions_command_takes_a_subset_of_methods_and_names_a_wrong_one(capsys):
    from interp.smollm2.distributed import _parser

    assert _parser().parse_args(["interactions", "--methods", "ig"]).methods == ["exact", "ig"]
    assert _parser().parse_args(["interactions"]).methods == ["exact", "grad", "ig"]
    with pytest.raises(SystemExit):
        _parser().parse_args(["interactions", "--methods", "exact,shap"])
    assert "shap" in capsys.readouterr().err

