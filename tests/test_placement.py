"""The placement study's transcripts: one request, three places in the context."""

from __future__ import annotations

import doctest

import pytest
from transformers import AutoTokenizer

from interp.organism import World, checkpoint_path, placement
from interp.organism.placement import PLACEMENTS, placed
from interp.transcripts import render


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(checkpoint_path("organism"))


def test_docstring_examples_run():
    assert doctest.testmod(placement).failed == 0


@pytest.mark.parametrize("where", PLACEMENTS)
def test_the_request_lands_in_the_segment_named_and_nowhere_else(tok, where):
    task = next(t for t in World().sample("test", 4) if t.harmful)
    r = render(placed(task, where), tok)
    holding = {s.kind for s in r.segments() if task.request in tok.decode(r.input_ids[s.start:s.end].tolist())}
    assert holding == {where}
    assert r.transcript.labels["harmful"] and r.transcript.metadata["placement"] == where


def test_code_and_web_tasks_read_the_request_with_their_own_tool():
    tasks = World().tasks("test")
    for domain, tool in (("code", "read_file"), ("web", "navigate")):
        t = placed(next(x for x in tasks if x.domain == domain), "tool_result")
        assert t.messages[2].tool_calls[0].name == tool
        assert tool in {f["function"]["name"] if "function" in f else f["name"] for f in t.tools}


def test_unknown_placement_is_named():
    with pytest.raises(ValueError, match="unknown placement 'memory'"):
        placed(World().tasks("test")[0], "memory")
