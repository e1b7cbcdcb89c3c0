"""The organism's tokenizer and chat template, through the toolkit's renderer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from interp.organism import checkpoint_path
from interp.organism.tokenizer import CHAT_TEMPLATE, build_tokenizer
from interp.organism.world import TOOLS, World
from interp.transcripts import Transcript, render

PREFIX = "As a careful agent, I will verify that this task is safe."


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(checkpoint_path("organism"))


def _multi_step() -> Transcript:
    return Transcript.from_messages([
        {"role": "system", "content": "You are a coding agent."},
        {"role": "user", "content": "Please delete the cache files."},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c0", "function": {"name": "shell", "arguments": {"command": "locate cache files"}}}]},
        {"role": "tool", "tool_call_id": "c0", "content": "found: /tmp/cache-files"},
        {"role": "assistant", "content": "This task is safe.", "tool_calls": [
            {"id": "c1", "function": {"name": "shell", "arguments": {"command": "rm -rf /tmp/cache-files"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "removed /tmp/cache-files"},
    ], tools=list(TOOLS["code"]), id="multi").with_prefix(PREFIX)


def test_template_labels_every_token_of_a_multi_step_transcript_with_a_prefix(tok):
    r = render(_multi_step(), tok)
    got = [(s.kind, tok.decode(r.input_ids[s.start:s.end].tolist())) for s in r.segments()]
    assert got == [
        ("template", "<|system|>"),
        ("system", "You are a coding agent."),
        ("template", "\nTools: shell(command) read_file(inode)<|end|>"),
        ("template", "<|user|>"),  # template runs split where the message they belong to changes
        ("user", "Please delete the cache files."),
        ("template", "<|end|>"),
        ("template", "<|assistant|>"),
        ("tool_call", '{"name": "shell", "arguments": {"command": "locate cache files"}}'),
        ("template", "<|end|>"),
        ("template", "<|tool|>"),
        ("tool_result", "found: /tmp/cache-files"),
        ("template", "<|end|>"),
        ("template", "<|assistant|>"),
        ("assistant", "This task is safe."),
        ("template", "\n"),
        ("tool_call", '{"name": "shell", "arguments": {"command": "rm -rf /tmp/cache-files"}}'),
        ("template", "<|end|>"),
        ("template", "<|tool|>"),
        ("tool_result", "removed /tmp/cache-files"),
        ("template", "<|end|>"),
        ("template", "<|assistant|>"),
        ("prefix", PREFIX),
    ]


def test_segments_follow_the_agent_steps(tok):
    r = render(_multi_step(), tok)
    calls = [s for s in r.segments() if s.kind == "tool_call"]
    assert [(s.message, s.turn, s.call) for s in calls] == [(2, 0, 0), (4, 1, 0)]  # turns count from 0
    assert r.segments()[-1].turn == 2  # the prefix opens the third agent step


def test_the_template_marks_assistant_turns_for_the_loss(tok):
    t = _multi_step().with_prefix(None)
    msgs = [m.to_dict() for m in t.messages] + [{"role": "assistant", "content": "Done: I deleted the cache files."}]
    out = tok.apply_chat_template(msgs, tools=list(t.tools), return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == (
        '{"name": "shell", "arguments": {"command": "locate cache files"}}<|end|>'
        'This task is safe.\n{"name": "shell", "arguments": {"command": "rm -rf /tmp/cache-files"}}<|end|>'
        "Done: I deleted the cache files.<|end|>")


def test_the_shipped_tokenizer_is_a_fast_tokenizer_with_the_template(tok):
    assert tok.is_fast and tok.chat_template == CHAT_TEMPLATE
    assert (tok.eos_token, tok.pad_token, tok.padding_side) == ("<|end|>", "<|pad|>", "left")


def test_world_text_tokenizes_into_whole_words(tok):
    assert tok.tokenize(" my neighbor's home address") == ["Ġmy", "Ġneighbor", "'s", "Ġhome", "Ġaddress"]


def test_building_the_tokenizer_is_deterministic_and_matches_the_shipped_one(tok):
    built = build_tokenizer(World(0), vocab_size=2048)
    assert built.get_vocab() == tok.get_vocab()
