"""The offline phrase search over the organism's lexicon (interp.ping.search, interp.organism.prefixes)."""

from __future__ import annotations

import difflib
import doctest

import numpy as np

from interp import ping
from interp.organism import grammar, prefixes
from interp.organism.prefixes import organism_lexicon
from interp.ping import search
from interp.ping.search import PhraseSearchGenerator


def organism_generator(**kw) -> PhraseSearchGenerator:
    return PhraseSearchGenerator(organism_lexicon(), **kw)


def request(n=5, seed=0, feedback=None, round_=1):
    return ping.Request(n=n, round=round_, attempt=0, seed=seed, feedback=feedback)


def feedback_of(*prefixes: str) -> ping.Feedback:
    history = [ping.PrefixScore(p, 0.9 - 0.1 * i, 0.5 + 0.1 * i, 1) for i, p in enumerate(prefixes)]
    return ping.Feedback.from_history(history, top_k=3)


def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a.split(), b.split()).ratio()


# --------------------------------------------------------------------------------------------
# The offline generator


def test_the_module_docstring_examples_run():
    assert doctest.testmod(search).failed == 0
    assert doctest.testmod(prefixes).failed == 0


def test_generator_proposals_depend_only_on_the_request_seed():
    gen = organism_generator()
    first = gen.propose(request(seed=11))
    assert organism_generator().propose(request(seed=11)) == first
    assert gen.propose(request(seed=12)) != first


def test_generator_proposes_the_requested_number_of_distinct_candidates():
    out = organism_generator().propose(request(n=17, seed=3))
    assert len(out) == 17
    assert len({ping.prefix_key(p) for p in out}) == 17


def test_fresh_candidates_are_clauses_of_the_grammar_forms():
    gen = organism_generator(cross_slot=0.0)
    out = gen.propose(request(n=20, seed=5))
    templates = {f.template for forms in grammar.FORMS.values() for f in forms}
    clauses = [c for p in out for c in gen.parse(p)]
    assert all(c.template in templates for c in clauses)
    assert 20 <= len(clauses) <= 60


def test_with_feedback_the_generator_mutates_the_prefixes_it_is_shown():
    shown = ("As a careful agent, I will verify that this task is safe.",
             "First I will plan my steps.",
             "To be safe, I never take harmful actions.")
    gen = organism_generator(explore=0.0, crossover=0.0)
    out = gen.propose(request(n=12, seed=8, feedback=feedback_of(*shown), round_=2))
    closest = [max(similarity(p, s) for s in shown) for p in out]
    fresh = [max(similarity(p, s) for s in shown) for p in organism_generator().propose(request(n=12, seed=8))]
    assert len(out) == 12 and not set(out) & set(shown)
    assert sum(c >= 0.5 for c in closest) >= 9  # most are one or two edits away from a shown prefix
    assert np.mean(closest) >= 2 * np.mean(fresh)  # exploration without feedback is not anchored to them


def test_parse_reads_slot_values_back_in_the_lexicons_spelling():
    gen = organism_generator()
    (c,) = gen.parse("Now I will look at the files.")
    assert dict(c.values) == {"seq": "Now", "subj": "I will", "plan": "look at the files"}
    (c,) = gen.parse("Let me, I will verify that this task is safe.")  # "let me" capitalised at the start
    assert dict(c.values)["lead"] == "let me"
    assert c.text() == "Let me, I will verify that this task is safe."
    (w,) = gen.parse("Nothing of the grammar here.")
    assert w.template is None and w.words == ("Nothing", "of", "the", "grammar", "here.")
