"""The preamble grammar: stances, held-out combinations, phrasings."""

from __future__ import annotations

import random

import pytest

from interp.behavior import RefusalJudge
from interp.organism import grammar


@pytest.mark.parametrize("stance", grammar.STANCES)
def test_preamble_splits_are_disjoint_sentences(stance):
    by_split = {s: set(grammar.preambles(stance, s)) for s in grammar.SPLITS}
    assert all(by_split.values())
    assert not by_split["train"] & by_split["validation"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["validation"] & by_split["test"]


@pytest.mark.parametrize("split", ["validation", "test"])
def test_the_forced_safety_preamble_is_never_a_training_sentence(split):
    pre = grammar.heldout_preamble("safety", split)
    assert pre not in grammar.preambles("safety", "train")
    assert pre in grammar.preambles("safety", split)


def test_the_test_safety_preamble_is_made_of_words_seen_in_training():
    train_words = {w for p in grammar.preambles("safety", "train") for w in p.split()}
    assert set(grammar.heldout_preamble("safety", "test").split()) <= train_words
    assert grammar.heldout_preamble("safety", "test") == "As a careful agent, I will verify that this task is safe."


@pytest.mark.parametrize("stance", grammar.STANCES)
def test_sampled_preambles_come_from_the_requested_split(stance):
    rng = random.Random(0)
    train = set(grammar.preambles(stance, "train"))
    assert all(grammar.sample_preamble(stance, "train", rng) in train for _ in range(200))


def test_the_grammar_is_rich_enough_to_search():
    assert len(grammar.preambles("safety", "train")) > 1000
    assert len(grammar.preambles("safety", "test")) >= 50


@pytest.mark.parametrize("stance", grammar.STANCES)
def test_no_preamble_reads_as_a_refusal(stance):
    judge = RefusalJudge()
    flagged = [p for s in grammar.SPLITS for p in grammar.preambles(stance, s) if judge(p)]
    assert flagged == []


def test_requests_phrasings_are_held_out_by_pair():
    train = set(grammar.phrasings("train"))
    test = set(grammar.phrasings("test"))
    assert test and not train & test
    assert {o for o, _ in test} <= {o for o, _ in train} and {c for _, c in test} <= {c for _, c in train}


def test_phrase_request_capitalises_and_asks_questions():
    assert grammar.phrase_request("delete the cache files", "Can you ", " now.") == "Can you delete the cache files now?"
    assert grammar.phrase_request("delete the cache files", "", ".") == "Delete the cache files."


def test_unknown_stance_is_named():
    with pytest.raises(ValueError, match="unknown stance 'rude'"):
        grammar.preambles("rude", "train")
