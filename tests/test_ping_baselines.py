"""The baselines PING is compared with (interp.ping.baselines), on the organism's world."""

from __future__ import annotations

import pytest

from interp.behavior import RefusalJudge, generate
from interp.organism import grammar
from interp.organism.prefixes import demonstrations
from interp.ping import SAFETY_SYSTEM_PROMPT, conditions, few_shot_transform

# --------------------------------------------------------------------------------------------
# Baselines


@pytest.fixture(scope="module")
def table(world):
    few_shot = (few_shot_transform(demonstrations(world, 0)), "0")
    return {c.key: c for c in conditions("PREFIX TEXT.", few_shot=few_shot,
                                         safety_preamble=grammar.heldout_preamble("safety", "test"),
                                         neutral_opening=grammar.heldout_preamble("neutral", "test"),
                                         steering=(2, 1.5))}


def test_the_table_has_the_models_ping_and_every_baseline(table):
    assert list(table) == ["aligned", "finetuned", "ping", "safety_system_prompt", "few_shot", "i_cant",
                           "ping_as_suffix", "handwritten_safety_preamble", "neutral_opening", "steering"]
    assert table["aligned"].model == "aligned" and table["ping"].model == "finetuned"


def test_safety_system_prompt_baseline_opens_the_system_prompt(table, world):
    t = world.tasks("test")[0].transcript()
    out = table["safety_system_prompt"].transform(t)
    assert out.messages[0].content == f"{SAFETY_SYSTEM_PROMPT} {t.messages[0].content}"
    assert out.messages[1:] == t.messages[1:]


def test_few_shot_examples_come_between_the_system_prompt_and_the_task(table, world):
    t = world.tasks("test")[0].transcript()
    out = table["few_shot"].transform(t).messages
    assert out[0] == t.messages[0] and out[-1] == t.messages[-1]
    shots = out[1:-1]
    refusals = [m for m in shots if m.role == "assistant" and RefusalJudge()(m.content)]
    assert len(refusals) == 2  # two harmful examples refused
    assert sum(bool(m.tool_calls) for m in shots) == 2  # one benign example carried out in two calls
    assert all(m.role != "system" for m in shots)


def test_suffix_baseline_appends_the_ping_text_to_the_user_turn(table, world):
    t = world.tasks("test")[0].transcript()
    out = table["ping_as_suffix"].transform(t)
    assert out.messages[-1].content == f"{t.messages[-1].content} PREFIX TEXT."
    assert out.prefix is None and table["ping_as_suffix"].prefix is None


def test_prefix_baselines_force_their_text_at_the_start_of_the_reply(table, finetuned, world):
    assert table["i_cant"].prefix == "I can't"
    assert table["handwritten_safety_preamble"].prefix == grammar.heldout_preamble("safety", "test")
    assert table["neutral_opening"].prefix == "First I will plan my steps."
    ts = [t.transcript().with_prefix(table["i_cant"].prefix) for t in world.sample("test", 1)]
    gens = generate(finetuned, ts, max_new_tokens=4)
    assert all(g.text.startswith("I can't") for g in gens)
