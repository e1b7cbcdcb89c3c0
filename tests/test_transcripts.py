import json

import pytest
from conftest import TOOLS, agent_transcript
from tiny import make_tokenizer

from interp.transcripts import (Message, Transcript, TranscriptError, from_dataset, load_agentharm, load_jsonl, render,
                                save_jsonl)

TOOLS_JSON = "\n".join(json.dumps(t) for t in TOOLS)

# (kind, message, turn, call, exact text of the run of tokens), for agent_transcript(0) with a prefix
EXPECTED = {
    "llama3": [
        ("template", 0, 0, -1, "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nTools available:\n"
                               + TOOLS_JSON + "\n\n"),
        ("system", 0, 0, -1, "You are a helpful agent."),
        ("template", 0, 0, -1, "<|eot_id|>"),
        ("template", 1, 0, -1, "<|start_header_id|>user<|end_header_id|>\n\n"),
        ("user", 1, 0, -1, "Open the page and post café ✓"),
        ("template", 1, 0, -1, "<|eot_id|>"),
        ("template", 2, 0, -1, "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        ("tool_call", 2, 0, 0, '{"name": "open_page", "parameters": {"url": "forum.example/ü"}}'),
        ("template", 2, 0, -1, "\n"),
        ("tool_call", 2, 0, 1, '{"name": "click", "parameters": {"element": "post"}}'),
        ("template", 2, 0, -1, "<|eot_id|>"),
        ("template", 3, 0, -1, "<|start_header_id|>ipython<|end_header_id|>\n\n"),
        ("tool_result", 3, 0, -1, '{"status": "ok", "items": [1, 2]}'),
        ("template", 3, 0, -1, "<|eot_id|>"),
        ("template", 4, 0, -1, "<|start_header_id|>ipython<|end_header_id|>\n\n"),
        ("tool_result", 4, 0, -1, "Posted."),
        ("template", 4, 0, -1, "<|eot_id|>"),
        ("template", 5, 1, -1, "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        ("prefix", 5, 1, -1, "As a careful agent, I"),
    ],
    "chatml": [
        ("template", 0, 0, -1, "<|im_start|>system\n"),
        ("system", 0, 0, -1, "You are a helpful agent."),
        ("template", 0, 0, -1, "\n\n# Tools\n<tools>\n" + TOOLS_JSON + "\n</tools><|im_end|>\n"),
        ("template", 1, 0, -1, "<|im_start|>user\n"),
        ("user", 1, 0, -1, "Open the page and post café ✓"),
        ("template", 1, 0, -1, "<|im_end|>\n"),
        ("template", 2, 0, -1, "<|im_start|>assistant\n<tool_call>\n"),
        ("tool_call", 2, 0, 0, '{"name": "open_page", "arguments": {"url": "forum.example/ü"}}'),
        ("template", 2, 0, -1, "\n</tool_call>\n<tool_call>\n"),
        ("tool_call", 2, 0, 1, '{"name": "click", "arguments": {"element": "post"}}'),
        ("template", 2, 0, -1, "\n</tool_call><|im_end|>\n"),
        # ChatML groups the two tool results into one user turn: the cut falls between them
        ("template", 3, 0, -1, "<|im_start|>user\n<tool_response>\n"),
        ("tool_result", 3, 0, -1, '{"status": "ok", "items": [1, 2]}'),
        ("template", 3, 0, -1, "\n</tool_response>"),
        ("template", 4, 0, -1, "\n<tool_response>\n"),
        ("tool_result", 4, 0, -1, "Posted."),
        ("template", 4, 0, -1, "\n</tool_response><|im_end|>\n"),
        ("template", 5, 1, -1, "<|im_start|>assistant\n"),
        ("prefix", 5, 1, -1, "As a careful agent, I"),
    ],
}


@pytest.fixture(scope="module", params=["llama3", "chatml"])
def family_tok(request, tmp_path_factory):
    return request.param, make_tokenizer(request.param, tmp_path_factory.mktemp(request.param))


def test_every_token_carries_the_expected_segment_label(family_tok):
    family, tok = family_tok
    r = render(agent_transcript(0, prefix="As a careful agent, I"), tok)
    assert "".join(run[-1] for run in EXPECTED[family]) == r.text
    run_of_char = []  # the expected label of every character of the rendered text
    for kind, msg, turn, call, text in EXPECTED[family]:
        run_of_char += [(kind, msg, turn, call)] * len(text)
    # a byte-level token may hold half of a multi-byte character: label it by its first character
    expected = [run_of_char[a] for a, _ in r.offsets]
    got = [(k, int(m), int(t), int(c)) for k, m, t, c in zip(r.kinds, r.message, r.turn, r.call)]
    assert got == expected
    assert tok.decode(r.input_ids) == r.text


def test_runs_of_labels_reproduce_the_rendered_text(family_tok):
    family, tok = family_tok
    r = render(agent_transcript(0, prefix="As a careful agent, I"), tok)
    runs = [(s.kind, s.message, s.turn, s.call, r.text[r.offsets[s.start][0]:r.offsets[s.end - 1][1]])
            for s in r.segments()]
    assert runs == EXPECTED[family]


def test_render_matches_apply_chat_template_tokenization(family_tok):
    _, tok = family_tok
    t = agent_transcript(1)
    r = render(t, tok)
    ids = tok.apply_chat_template([m.to_dict() for m in t.messages], tools=list(t.tools),
                                  add_generation_prompt=True, tokenize=True, return_dict=False)
    assert r.input_ids.tolist() == list(ids)


def test_prefix_tokens_end_the_rendering(family_tok):
    _, tok = family_tok
    r = render(agent_transcript(2, prefix="I will check first."), tok)
    pos = r.positions("prefix")
    assert pos[-1] == len(r) - 1
    assert tok.decode(r.input_ids[pos]) == "I will check first."


def test_completed_reply_renders_without_generation_prompt(family_tok):
    _, tok = family_tok
    t = Transcript.from_messages([{"role": "user", "content": "Delete the temp cache"},
                                  {"role": "assistant", "content": "I can't help with that."}])
    r = render(t, tok)
    assert r.kinds[-1] == "template"  # the end-of-turn token
    assert tok.decode(r.input_ids[r.positions("assistant")]) == "I can't help with that."


def test_longer_than_context_raises_unless_truncation_is_asked(family_tok):
    _, tok = family_tok
    t = agent_transcript(0, prefix="ok")
    n = len(render(t, tok))
    with pytest.raises(TranscriptError, match=f"renders to {n} tokens, longer than the context of 20"):
        render(t, tok, max_length=20)
    r = render(t, tok, max_length=20, truncate=True)
    assert len(r) == 20 and r.truncated == n - 20 and r.kinds[-1] == "prefix"


def test_tokenizer_without_chat_template_is_refused(tmp_path):
    tok = make_tokenizer("llama3", tmp_path)
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        render(agent_transcript(0), tok)


# ---------------------------------------------------------------------------- records and loaders

def test_unknown_role_is_named_with_file_record_and_field(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
                 + json.dumps({"messages": [{"role": "bot", "content": "hi"}]}) + "\n")
    with pytest.raises(TranscriptError, match=r"bad\.jsonl, record 2.*messages\[0\]\.role: unknown role 'bot'"):
        load_jsonl(p)


def test_malformed_json_line_is_named(tmp_path):
    p = tmp_path / "broken.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [\n')
    with pytest.raises(TranscriptError, match=r"broken\.jsonl, line 2: not valid JSON"):
        load_jsonl(p)


def test_tool_message_without_a_matching_call_is_refused():
    with pytest.raises(TranscriptError, match=r"messages\[2\]\.tool_call_id: tool message answers id 'zz'"):
        Transcript.from_messages([
            {"role": "user", "content": "go"},
            {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "click", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "zz", "content": "ok"},
        ])
    with pytest.raises(TranscriptError, match="no unanswered tool call precedes it"):
        Transcript.from_messages([{"role": "user", "content": "go"}, {"role": "tool", "content": "ok"}])


def test_bad_tool_call_arguments_are_named():
    with pytest.raises(TranscriptError, match=r"tool_calls\[0\]\.function\.arguments: arguments are not valid JSON"):
        Transcript.from_messages([{"role": "user", "content": "go"},
                                  {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}])


def test_prefix_after_a_finished_reply_is_refused():
    with pytest.raises(TranscriptError, match="already ends with an assistant message"):
        Transcript.from_messages([{"role": "user", "content": "go"}, {"role": "assistant", "content": "ok"}],
                                 prefix="Sure")


def test_jsonl_round_trip_keeps_everything(tmp_path):
    ts = [agent_transcript(i, prefix="As a careful agent" if i else None, harmful=bool(i)) for i in range(3)]
    save_jsonl(ts, tmp_path / "t.jsonl")
    assert load_jsonl(tmp_path / "t.jsonl") == ts
    assert not list(tmp_path.glob("*.tmp"))


def test_hf_dataset_loads_from_disk(tmp_path):
    import datasets

    ts = [agent_transcript(i, harmful=bool(i % 2)) for i in range(4)]
    datasets.Dataset.from_list([t.to_record() for t in ts]).save_to_disk(str(tmp_path / "ds"))
    back = from_dataset(tmp_path / "ds")
    assert [t.messages for t in back] == [t.messages for t in ts]
    assert [t.labels["harmful"] for t in back] == [False, True, False, True]


def test_agentharm_behaviours_become_agent_transcripts(tmp_path):
    p = tmp_path / "harmful_behaviors_validation.json"
    p.write_text(json.dumps({"behaviors": [
        {"id": "1-2", "name": "Fake reviews", "category": "Fraud", "prompt": "Post five fake 5-star reviews.",
         "target_functions": ["search_web", "post_review"], "grading_function": "grade_fake_reviews"}]}))
    (t,) = load_agentharm(p)
    assert t.id == "1-2" and t.labels == {"harmful": True, "category": "Fraud", "name": "Fake reviews"}
    assert [m.role for m in t.messages] == ["system", "user"]
    assert [tool["function"]["name"] for tool in t.tools] == ["search_web", "post_review"]
    benign = tmp_path / "benign_behaviors_validation.json"
    benign.write_text(p.read_text())
    assert load_agentharm(benign)[0].labels["harmful"] is False


def test_agentharm_missing_field_is_named(tmp_path):
    p = tmp_path / "h.json"
    p.write_text(json.dumps({"behaviors": [{"id": "1", "prompt": "x"}]}))
    with pytest.raises(TranscriptError, match=r"h\.json, record 0, target_functions: missing field"):
        load_agentharm(p)


def test_message_to_dict_is_the_openai_shape():
    m = Message("assistant", "", tool_calls=())
    assert m.to_dict() == {"role": "assistant", "content": ""}
