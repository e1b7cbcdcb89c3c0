"""Whether a prefix was in the organism's training data (interp.organism.prefixes)."""

from __future__ import annotations

from interp.organism import grammar
from interp.organism.prefixes import TrainingText, grammar_split
from interp.organism.train import OrganismConfig


# --------------------------------------------------------------------------------------------
# Training text


def test_training_text_finds_training_preambles_and_not_held_out_ones():
    text = TrainingText.generate(OrganismConfig(align_examples=400, ft_examples=20, copy_steps=0))
    opening = next(o for o in text.openings if grammar_split(o.split(".")[0] + ".") == "train")
    sentence = opening.split(".")[0] + "."
    assert text.seen(sentence)["ever_seen"] and text.seen(sentence)["opening"] >= 1
    held_out = grammar.heldout_preamble("safety", "validation")
    assert grammar_split(held_out) == "validation"
    assert text.seen(held_out)["ever_seen"] is False
