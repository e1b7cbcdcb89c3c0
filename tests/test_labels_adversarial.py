"""Generated adversarial agent transcripts on real chat templates, checked by an independent oracle.

Contents are drawn partly from the template's own strings (role names, header words, control
tokens, tool names and descriptions, JSON punctuation, whitespace, think tags, non-ASCII), so a
labeller that searched for content text would land in template markup.

The oracle shares nothing with the labeller's method: it renders the real conversation, then
for one field at a time renders it again with only that field changed to a distinct string and
takes the characters where the two renderings differ as the field's characters. Every one of
them must sit in a token labelled with the field's kind and message (and call); a field that
renders to nothing must be reported in ``empty``; the prefix must be the last tokens. When
changing a field changes more than that field (the template tests the text), the oracle cannot
tell and skips the field; the counts stay small and are asserted.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "templates"))
from families import FAMILIES, tokenizer  # noqa: E402

from interp.transcripts import Transcript, TranscriptError, render  # noqa: E402

N_PER_FAMILY = int(os.environ.get("INTERP_ADVERSARIAL_N", 200))
SEED = 1234
MARK = "§Q§"  # the oracle's stand-in; the generator never writes "§"
SWAP = str.maketrans(" \t", "\t ")


def other(text: str) -> str:
    """What the oracle puts in place of a text: the mark; for blank text other blank text (so
    `if content|trim` stays false): spaces and tabs swapped, or the text doubled."""
    if text.strip():
        return MARK
    return text.translate(SWAP) if text.translate(SWAP) != text else text * 2

TOOLS = [
    {"type": "function", "function": {"name": "whoami", "description": "Print the user name",
                                      "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {"name": "open_page", "description": "Open a URL in the browser",
                                      "parameters": {"type": "object", "properties": {
                                          "url": {"type": "string", "description": "the address"}}}}},
]
WORDS = ["user", "assistant", "system", "tool", "ipython", "function", "Tools", "# Tools", "name", "arguments",
         "whoami", "open_page", "Print the user name", "Open a URL in the browser", "Cutting Knowledge Date",
         "<tools>", "</tools>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>",
         "</think>", '{"name": "', '", "arguments": ', "{", "}", "[", "]", '"', "\\", ",", ": ", "\n", "\n\n", " ",
         "\t", "café", "日本語", "✓", "ü", "🙂", "ok", "Posted.", "The answer is 4.", "x"]


def atoms(name: str) -> list[str]:
    return WORDS + list(FAMILIES[name].specials)


def text(rng: random.Random, pool: list[str], blank: float = 0.1) -> str:
    r = rng.random()
    if r < blank / 2:
        return ""
    if r < blank:
        return rng.choice([" ", "\n", "\n\n", " \n "])
    return "".join(rng.choice(pool) for _ in range(rng.randint(1, 5)))


def arguments(rng: random.Random, pool: list[str]) -> dict:
    out = {}
    for key in rng.sample(["url", "element", "n", "flag", "items"], rng.randint(0, 3)):
        out[key] = {"n": rng.randint(-5, 500), "flag": rng.random() < 0.5,
                    "items": [text(rng, pool, 0) for _ in range(rng.randint(1, 2))]}.get(key) or text(rng, pool, 0)
    return out


def assistant_with_calls(rng, fam, pool, step) -> list[dict]:
    n_calls = rng.randint(1, 3) if fam.multi_calls else 1
    ids = [f"c{step}{j}{rng.randrange(10 ** 6):06d}"[:9].ljust(9, "0") for j in range(n_calls)]
    msg = {"role": "assistant", "content": text(rng, pool, 0.6), "tool_calls": [
        {"id": ids[j], "function": {"name": rng.choice(["whoami", "open_page"]), "arguments": arguments(rng, pool)}}
        for j in range(n_calls)]}
    if rng.random() < 0.4:
        msg["reasoning_content"] = text(rng, pool, 0.2)
    elif rng.random() < 0.3:
        msg["content"] = "<think>" + text(rng, pool, 0.2) + "</think>" + msg["content"]
    results = [{"role": "tool", "tool_call_id": i, "content": rng.choice([text(rng, pool), "user", "\n"])} for i in ids]
    return [msg] + results


def transcript(rng: random.Random, name: str, i: int) -> Transcript:
    """A random agent transcript that the family's template can render at all."""
    fam, pool = FAMILIES[name], atoms(name)
    msgs = [{"role": "user", "content": rng.choice([text(rng, pool), "Print the user name"])}]
    for step in range(rng.randint(0, 2)):
        if fam.tools and rng.random() < 0.7:
            msgs += assistant_with_calls(rng, fam, pool, step)
        else:
            answer = text(rng, pool, 0.2)
            if rng.random() < 0.3:
                answer = "<think>" + text(rng, pool, 0.2) + "</think>" + answer
            msgs += [{"role": "assistant", "content": answer}, {"role": "user", "content": text(rng, pool)}]
    end_with_answer = rng.random() < 0.2 and msgs[-1]["role"] == "user"
    if end_with_answer:
        msgs.append({"role": "assistant", "content": text(rng, pool, 0)})
    if fam.system and rng.random() < 0.7 and (not fam.alternate or msgs[-1]["role"] == "user"):
        msgs.insert(0, {"role": "system", "content": text(rng, pool)})
    prefix = None if end_with_answer or rng.random() < 0.4 else text(rng, pool, 0)
    return Transcript.from_messages(msgs, tools=TOOLS if fam.tools else [], prefix=prefix, id=f"{name}-{i}")


# ------------------------------------------------------------------------------------------ oracle

def fields(t: Transcript):
    """``(kind, message, call, empty, change)``: every text the oracle checks, whether it is empty,
    and how to change it alone (reasoning and answer of a ``<think>`` content separately)."""
    out = []
    for i, m in enumerate(t.messages):
        kind = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool_result"}[m.role]
        if m.role == "assistant" and "</think>" in m.content:
            head, _, tail = m.content.partition("</think>")
            pre, tag, thought = head.rpartition("<think>")
            out.append(("reasoning", i, -1, not thought, _set(i, "content", f"{pre}{tag}{other(thought)}</think>{tail}")))
            out.append((kind, i, -1, not tail, _set(i, "content", f"{pre}{tag}{thought}</think>{other(tail)}")))
        else:
            out.append((kind, i, -1, not m.content, _set(i, "content", other(m.content))))
        if m.reasoning_content is not None:
            out.append(("reasoning", i, -1, not m.reasoning_content,
                        _set(i, "reasoning_content", other(m.reasoning_content))))
        for j, c in enumerate(m.tool_calls):
            out.append(("tool_call", i, j, False, _set_call(i, j, None)))
            for key, v in c.arguments.items():
                out.append(("tool_call", i, j, False, _set_call(i, j, key)))
    return out


def _set(i, key, value):
    def change(msgs):
        msgs[i] = dict(msgs[i], **{key: value})
    return change


def _set_call(i, j, key):
    def change(msgs):
        calls = [dict(c, function=dict(c["function"])) for c in msgs[i]["tool_calls"]]
        fn = calls[j]["function"]
        if key is None:
            fn["name"] = MARK
        else:
            v = fn["arguments"][key]
            new = (not v) if isinstance(v, bool) else v + 12345 if isinstance(v, int) else [MARK] if isinstance(v, list) else MARK
            fn["arguments"] = dict(fn["arguments"], **{key: new})
        msgs[i] = dict(msgs[i], tool_calls=calls)
    return change


def differing(a: str, b: str) -> tuple[int, int, int]:
    """Start and ends (in ``a`` and in ``b``) of the region where two texts differ."""
    lo = os.path.commonprefix([a, b]).__len__()
    hi = os.path.commonprefix([a[lo:][::-1], b[lo:][::-1]]).__len__()
    return lo, len(a) - hi, len(b) - hi


def oracle(t: Transcript, r, tok, kwargs) -> tuple[list[str], int]:
    """Disagreements between the labels and the oracle, and how many fields it had to skip."""
    gen = t.messages[-1].role != "assistant"
    msgs = [m.to_dict() for m in t.messages]
    body = tok.apply_chat_template(msgs, tools=list(t.tools) or None, add_generation_prompt=gen, tokenize=False,
                                   **kwargs)
    problems, skipped = [], 0
    for kind, i, j, empty, change in fields(t):
        reported = any(s.kind == kind and s.message == i for s in r.empty)
        if empty:  # nothing to find: reported empty (or its think tags carry its label)
            if not reported and not any(k == kind and m == i for k, m in zip(r.kinds, r.message)):
                problems.append(f"{kind}[{i}] is empty but not reported empty")
            continue
        changed = [dict(m) for m in msgs]
        change(changed)
        other = tok.apply_chat_template(changed, tools=list(t.tools) or None, add_generation_prompt=gen,
                                        tokenize=False, **kwargs)
        lo, hi, hi_other = differing(body, other)
        new = other[lo:hi_other]
        if new not in (MARK, json.dumps(MARK)[1:-1]) and not re.fullmatch(r"[-\w.]*|(?:\s|\\[tn])*", new):
            skipped += 1  # changing the field changed template text too: the oracle cannot tell
            if os.environ.get("INTERP_ORACLE_DEBUG"):
                print("skip", t.id, kind, i, j, repr(body[lo:hi][:80]), repr(new[:80]))
            continue
        starts = r.offsets[:, 0]
        if lo >= hi:  # renders to nothing (or, for doubled blank text, somewhere in a blank run)
            k = int(np.searchsorted(starts, lo, side="right")) - 1
            near = range(len(r)) if new.strip() == "" else (k, k - 1)
            inside = any(0 <= q < len(r) and r.kinds[q] == kind and r.message[q] == i for q in near)
            if not inside and not reported:
                problems.append(f"{kind}[{i}] renders to nothing but is not reported empty")
            continue
        for x in range(lo, hi):
            k = int(np.searchsorted(starts, x, side="right")) - 1
            got = (r.kinds[k], int(r.message[k]), int(r.call[k]) if kind == "tool_call" else -1)
            if got != (kind, i, j if kind == "tool_call" else -1) and not (starts[k] < lo and got[0] != "template"):
                problems.append(f"{kind}[{i}.{j}] char {x} {body[x]!r} in token {r.tokens[k]!r} labelled {got}")
                break
    if t.prefix:
        pre = [k for k, (a, _) in enumerate(r.offsets) if a >= len(body)]
        if not pre or pre[-1] != len(r) - 1 or any(r.kinds[k] != "prefix" for k in pre):
            problems.append("prefix tokens are not the last tokens, all labelled prefix")
    return problems, skipped


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_generated_transcripts_are_labelled_where_the_oracle_finds_their_text(name):
    fam, tok, rng = FAMILIES[name], tokenizer(name), random.Random(f"{SEED}-{name}")
    problems, skipped, errors, checked = [], 0, [], 0
    for i in range(N_PER_FAMILY):
        t = transcript(rng, name, i)
        try:
            r = render(t, tok, chat_template_kwargs=fam.kwargs)
        except TranscriptError as e:
            errors.append(str(e))
            continue
        p, s = oracle(t, r, tok, fam.kwargs)
        problems += [f"{t.id}: {x}" for x in p]
        skipped += s
        checked += 1
    assert problems == []
    assert errors == []
    assert skipped <= checked // 10
