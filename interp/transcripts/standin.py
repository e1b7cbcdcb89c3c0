"""Stand-ins: the transcript with every piece of text replaced by a unique marker.

The labeller renders the conversation twice through the same chat template: once as it is, once
with a stand-in for every content field, reasoning, tool-call name and string argument. Markers
are letters and digits only, so trimming, ``tojson`` and HTML escaping leave them as they are and
finding them in the stand-in rendering is unambiguous. Everything that is not a marker is
template text, identical in both renderings, which :mod:`.align` checks character by character.

A stand-in keeps verbatim what a template may *test*: whether a field is empty, the substrings
the template looks for with ``startswith``/``endswith``/``split``/``in`` (``</think>``,
``<tool_response>``), and the whitespace between them, so the template takes the same branches
for the stand-in as for the real text.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from .records import CONTENT_KIND, Message, Transcript

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_TESTED = re.compile(
    r"""(?:startswith|endswith|split|rsplit|partition|replace|count|find)\(\s*(['"])([^'"\\]+)\1"""
    r"""|(['"])([^'"\\]+)\3\s+(?:not\s+)?in\s""")
_NONCES = ("zqx", "qjz", "xjq", "vqzk", "kzvq", "wqxj")


@dataclass(frozen=True)
class Piece:
    """One run of a field's text: replaced by ``marker`` in the stand-in, or kept (marker None)."""

    field: int
    kind: str
    text: str
    marker: str | None
    path: str


@dataclass
class Field:
    """A place in the transcript that holds text: a message's content or reasoning, or a call."""

    kind: str
    message: int
    call: int
    path: str
    text: str
    pieces: list[int] = field(default_factory=list)


@dataclass
class Plan:
    """The stand-in conversation and how its markers map back to the transcript."""

    nonce: str
    fields: list[Field]
    pieces: list[Piece]
    messages: list[dict]
    json_arguments: bool

    def marker_regex(self) -> re.Pattern:
        n = re.escape(self.nonce)
        return re.compile(f"{n}(\\d+){n}")


@functools.lru_cache(maxsize=64)
def tested_literals(template: str) -> tuple[str, ...]:
    """Non-blank string literals a template tests text against, longest first (plus the think tags)."""
    found = {m.group(2) or m.group(4) for m in _TESTED.finditer(template)}
    found |= {THINK_OPEN, THINK_CLOSE}
    return tuple(sorted((s for s in found if s.strip()), key=len, reverse=True))


def choose_nonce(*texts: str) -> str:
    """A marker stem found in none of ``texts`` (the real rendering and the template)."""
    for n in _NONCES:
        if not any(n in t for t in texts):
            return n
    k = 0
    while any(f"zq{k}x" in t for t in texts):
        k += 1
    return f"zq{k}x"


class _Builder:
    def __init__(self, nonce: str, literals: tuple[str, ...], blank_markers: bool):
        self.nonce = nonce
        self.blank_markers = blank_markers
        self.fields: list[Field] = []
        self.pieces: list[Piece] = []
        self.split = re.compile("|".join(re.escape(s) for s in literals))

    def new_field(self, kind: str, message: int, call: int, path: str, text: str) -> int:
        self.fields.append(Field(kind, message, call, path, text))
        return len(self.fields) - 1

    def add(self, f: int, kind: str, text: str, path: str, marked: bool) -> str:
        marker = f"{self.nonce}{len(self.pieces)}{self.nonce}" if marked else None
        self.pieces.append(Piece(f, kind, text, marker, path))
        self.fields[f].pieces.append(len(self.pieces) - 1)
        return marker if marked else text

    def text(self, f: int, kind: str, text: str, path: str, think: bool) -> str:
        """The stand-in of a text field; reasoning inside ``<think>…</think>`` gets its own kind."""
        if text and not text.strip():  # whitespace only: a marker keeps `if content` true, the
            return self.add(f, kind, text, path, self.blank_markers)  # text itself keeps `if content|trim` false
        parts: list[tuple[str, str, bool]] = [(kind, text, False)]
        if think and THINK_CLOSE in text:
            head, _, tail = text.partition(THINK_CLOSE)
            pre, tag, reasoning = head.rpartition(THINK_OPEN)
            parts = [(kind, pre, False), ("reasoning", tag, True), ("reasoning", reasoning, False),
                     ("reasoning", THINK_CLOSE, True), (kind, tail, False)]
        out = []
        for k, part, literal in parts:
            if literal:
                out.append(self.add(f, k, part, path, False) if part else "")
                continue
            at = 0
            for m in self.split.finditer(part) if self.split.pattern else ():
                out.append(self._run(f, k, part[at:m.start()], path))
                out.append(self.add(f, k, m.group(), path, False))
                at = m.end()
            out.append(self._run(f, k, part[at:], path))
        return "".join(out)

    def _run(self, f: int, kind: str, run: str, path: str) -> str:
        if not run:
            return ""
        return self.add(f, kind, run, path, bool(run.strip()))

    def arguments(self, f: int, value: Any, path: str) -> Any:
        """Arguments with every non-empty string leaf replaced by a marker (keys and other
        values kept, so ``tojson`` and ``is string`` behave the same)."""
        if isinstance(value, str):
            return self.add(f, "tool_call", value, path, True) if value else value
        if isinstance(value, dict):
            return {k: self.arguments(f, v, f"{path}.{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.arguments(f, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value


def _message_standin(b: _Builder, i: int, m: Message, real: dict, json_arguments: bool) -> dict:
    out = dict(real)
    f = b.new_field(CONTENT_KIND[m.role], i, -1, f"messages[{i}].content", m.content)
    out["content"] = b.text(f, CONTENT_KIND[m.role], m.content, f"messages[{i}].content", m.role == "assistant")
    if m.reasoning_content is not None:
        path = f"messages[{i}].reasoning_content"
        f = b.new_field("reasoning", i, -1, path, m.reasoning_content)
        out["reasoning_content"] = b.text(f, "reasoning", m.reasoning_content, path, False)
    calls = []
    for j, (c, rc) in enumerate(zip(m.tool_calls, real.get("tool_calls", ()))):
        path = f"messages[{i}].tool_calls[{j}]"
        f = b.new_field("tool_call", i, j, path, c.name)
        fn = dict(rc["function"], name=b.add(f, "tool_call", c.name, path + ".function.name", True))
        args_path = path + ".function.arguments"
        if json_arguments:
            fn["arguments"] = b.add(f, "tool_call", rc["function"]["arguments"], args_path, True)
        else:
            fn["arguments"] = b.arguments(f, dict(c.arguments), args_path)
        calls.append(dict(rc, function=fn))
    if calls:
        out["tool_calls"] = calls
    return out


def plan(t: Transcript, template: str, real_text: str, json_arguments: bool, blank_markers: bool = True) -> Plan:
    """The stand-in conversation for ``t`` (whose real rendering is ``real_text``). Whitespace-only
    fields get a marker when ``blank_markers``, else stay as they are (located by emptying them)."""
    nonce = choose_nonce(real_text, template)
    b = _Builder(nonce, tested_literals(template), blank_markers)
    messages = [_message_standin(b, i, m, m.to_dict(json_arguments), json_arguments)
                for i, m in enumerate(t.messages)]
    return Plan(nonce, b.fields, b.pieces, messages, json_arguments)


def template_source(tokenizer) -> str:
    """The chat template text (all named templates when there are several)."""
    tpl = tokenizer.chat_template
    return "\n".join(tpl.values()) if isinstance(tpl, dict) else str(tpl)


def to_json(value: Any, ascii_only: bool) -> str:
    return json.dumps(value, ensure_ascii=ascii_only)
