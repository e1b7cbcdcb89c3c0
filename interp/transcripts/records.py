"""Records: :class:`Transcript`, :class:`Message`, :class:`ToolCall`, their validation, and the
one way to read a label as a class (:func:`binary_label`)."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np

ROLES = ("system", "user", "assistant", "tool")
SEGMENT_KINDS = ("template", "system", "user", "assistant", "tool_call", "tool_result", "prefix", "reasoning")
"""Every token gets one of these kinds; ``template`` covers headers and special tokens. Stored
activation files keep kinds as indices into this tuple, so new kinds are only ever appended."""
KIND_INDEX = {k: i for i, k in enumerate(SEGMENT_KINDS)}
CONTENT_KIND = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool_result"}


class TranscriptError(ValueError):
    """A transcript (or the file it came from) is malformed. The message names where."""


def where(source: str | None, record: int | str | None, field_: str | None, transcript: str | None = None) -> str:
    """``file, record N, transcript 'id', field`` with the parts that are known."""
    parts = [source, None if record is None else f"record {record}",
             f"transcript {transcript!r}" if transcript else None, field_]
    return ", ".join(p for p in parts if p)


def fail(msg: str, source: str | None = None, record=None, field_: str | None = None,
         transcript: str | None = None) -> NoReturn:
    place = where(source, record, field_, transcript)
    raise TranscriptError(f"{place}: {msg}" if place else msg)


@dataclass(frozen=True)
class ToolCall:
    """One function call an assistant message makes; ``arguments`` is a JSON object."""

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    id: str | None = None

    def to_dict(self) -> dict:
        d = {"type": "function", "function": {"name": self.name, "arguments": dict(self.arguments)}}
        if self.id is not None:
            d["id"] = self.id
        return d


@dataclass(frozen=True)
class Message:
    """One chat message. ``tool_calls`` only on assistant messages, ``tool_call_id`` on tool ones.

    ``reasoning_content`` is what an assistant "thought" before its content and calls (the field
    transformers' chat templates read); reasoning may also sit in ``content`` as
    ``<think>…</think>``. Either way its tokens get the ``reasoning`` kind.
    """

    role: str
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None
    reasoning_content: str | None = None

    def to_dict(self, json_arguments: bool = False) -> dict:
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.reasoning_content is not None:
            d["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            calls = [c.to_dict() for c in self.tool_calls]
            if json_arguments:
                for c in calls:
                    c["function"]["arguments"] = json.dumps(c["function"]["arguments"])
            d["tool_calls"] = calls
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            d["name"] = self.name
        return d


@dataclass(frozen=True)
class Transcript:
    """A multi-turn agent conversation plus what an analysis needs to know about it.

    ``prefix`` is text forced at the start of the assistant's next reply: it is rendered right
    after the generation prompt, before anything the model writes. ``source`` says where the
    transcript was read from (file and record), for error messages; it takes no part in equality.
    """

    messages: tuple[Message, ...]
    tools: tuple[Mapping[str, Any], ...] = ()
    labels: Mapping[str, Any] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    prefix: str | None = None
    id: str = ""
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        validate(self)

    @classmethod
    def from_messages(cls, messages: Sequence[Mapping | Message], **kwargs) -> Transcript:
        """Build from OpenAI-style message dicts (or :class:`Message` objects)."""
        return from_record({"messages": list(messages), **kwargs})

    def with_prefix(self, prefix: str | None) -> Transcript:
        """The same transcript with ``prefix`` forced at the start of the next reply."""
        return dataclasses.replace(self, prefix=prefix)

    def with_messages(self, messages: Sequence[Message]) -> Transcript:
        return dataclasses.replace(self, messages=tuple(messages))

    def to_record(self) -> dict:
        """The JSONL form :func:`from_record` reads back (tool-call arguments as JSON strings)."""
        rec: dict[str, Any] = {
            "id": self.id,
            "messages": [m.to_dict(json_arguments=True) for m in self.messages],
        }
        if self.tools:
            rec["tools"] = [dict(t) for t in self.tools]
        if self.labels:
            rec["labels"] = dict(self.labels)
        if self.metadata:
            rec["metadata"] = dict(self.metadata)
        if self.prefix is not None:
            rec["prefix"] = self.prefix
        return rec


def _check_message(m: Message, f: str, bad) -> None:
    if m.role not in ROLES:
        bad(f"unknown role {m.role!r} (expected one of {', '.join(ROLES)})", f + ".role")
    if not isinstance(m.content, str):
        bad(f"content must be a string, got {type(m.content).__name__}", f + ".content")
    if m.reasoning_content is not None:
        if m.role != "assistant":
            bad(f"only assistant messages carry reasoning_content, not {m.role!r}", f + ".reasoning_content")
        if not isinstance(m.reasoning_content, str):
            bad(f"reasoning_content must be a string, got {type(m.reasoning_content).__name__}",
                f + ".reasoning_content")
    if m.tool_calls and m.role != "assistant":
        bad(f"only assistant messages carry tool_calls, not {m.role!r}", f + ".tool_calls")
    seen: dict[str, int] = {}
    for j, c in enumerate(m.tool_calls):
        if not isinstance(c.name, str) or not c.name:
            bad("tool call needs a function name", f"{f}.tool_calls[{j}].function.name")
        if not isinstance(c.arguments, Mapping):
            bad("tool-call arguments must be a JSON object", f"{f}.tool_calls[{j}].function.arguments")
        if c.id is not None and c.id in seen:  # a result could not say which of the two it answers
            bad(f"tool call id {c.id!r} is used twice in one message (calls {seen[c.id]} and {j})",
                f"{f}.tool_calls[{j}].id")
        if c.id is not None:
            seen[c.id] = j


def validate(t: Transcript, source: str | None = None, record=None) -> None:
    """Check roles, tool-call structure (ids unique within a message) and that every tool
    message answers a call. Errors name the file, record, transcript and field."""
    def bad(msg: str, field_: str | None = None) -> NoReturn:
        fail(msg, source, record, field_, t.id)

    if not t.messages:
        bad("transcript has no messages", "messages")
    open_calls: list[ToolCall] = []  # calls of the latest assistant message not yet answered
    for i, m in enumerate(t.messages):
        f = f"messages[{i}]"
        _check_message(m, f, bad)
        if m.role == "assistant":
            open_calls = list(m.tool_calls)
        elif m.role == "tool":
            match = None
            if m.tool_call_id is not None:
                match = next((c for c in open_calls if c.id == m.tool_call_id), None)
            elif open_calls:
                match = open_calls[0]
            if match is None:
                what = f"id {m.tool_call_id!r}" if m.tool_call_id is not None else "a call"
                bad(f"tool message answers {what}, but no unanswered tool call precedes it", f + ".tool_call_id")
            open_calls.remove(match)
        else:
            open_calls = []
    if t.prefix is not None:
        if not isinstance(t.prefix, str):
            bad("prefix must be a string", "prefix")
        if t.messages[-1].role == "assistant":
            bad("a forced prefix opens the next assistant reply, but the transcript already ends "
                "with an assistant message", "prefix")


# reading records (the loaders and Transcript.from_messages share this)


def _parse_call(raw: Any, source, record, f: str) -> ToolCall:
    if not isinstance(raw, Mapping):
        fail("tool call must be an object", source, record, f)
    fn = raw.get("function", raw)
    if not isinstance(fn, Mapping):
        fail("tool call 'function' must be an object", source, record, f + ".function")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        fail("tool call needs a function name", source, record, f + ".function.name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            fail(f"arguments are not valid JSON ({e.msg})", source, record, f + ".function.arguments")
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        fail("arguments must be a JSON object", source, record, f + ".function.arguments")
    return ToolCall(name=name, arguments=dict(args), id=raw.get("id"))


def _text(raw: Any, source, record, f: str) -> str:
    """A content field: a string, null (empty) or OpenAI text parts."""
    if raw is None:
        return ""
    if isinstance(raw, list):  # OpenAI content parts: keep the text ones
        try:
            return "".join(p["text"] for p in raw if p.get("type") == "text")
        except (TypeError, KeyError, AttributeError):
            fail("content parts must be objects with 'type' and 'text'", source, record, f)
    if not isinstance(raw, str):
        fail(f"content must be a string, got {type(raw).__name__}", source, record, f)
    return raw


def _parse_message(raw: Any, source, record, i: int) -> Message:
    f = f"messages[{i}]"
    if isinstance(raw, Message):
        return raw
    if not isinstance(raw, Mapping):
        fail("message must be an object", source, record, f)
    role = raw.get("role")
    if role not in ROLES:
        fail(f"unknown role {role!r} (expected one of {', '.join(ROLES)})", source, record, f + ".role")
    calls = raw.get("tool_calls") or ()
    if not isinstance(calls, (list, tuple)):
        fail("tool_calls must be a list", source, record, f + ".tool_calls")
    reasoning = raw.get("reasoning_content")
    return Message(
        role=role,
        content=_text(raw.get("content"), source, record, f + ".content"),
        tool_calls=tuple(_parse_call(c, source, record, f"{f}.tool_calls[{j}]") for j, c in enumerate(calls)),
        tool_call_id=raw.get("tool_call_id"),
        name=raw.get("name"),
        reasoning_content=None if reasoning is None else _text(reasoning, source, record, f + ".reasoning_content"),
    )


def from_record(rec: Mapping, source: str | None = None, record: int | str | None = None) -> Transcript:
    """Build a transcript from ``{messages, tools?, labels?, metadata?, prefix?, id?}``."""
    if not isinstance(rec, Mapping):
        fail("record must be a JSON object", source, record)
    msgs = rec.get("messages")
    if not isinstance(msgs, (list, tuple)) or not msgs:
        fail("missing or empty 'messages' list", source, record, "messages")
    messages = tuple(_parse_message(m, source, record, i) for i, m in enumerate(msgs))
    tools = rec.get("tools") or ()
    if not isinstance(tools, (list, tuple)) or not all(isinstance(x, Mapping) for x in tools):
        fail("tools must be a list of objects", source, record, "tools")
    labels = rec.get("labels") or {}
    if not isinstance(labels, Mapping):
        fail("labels must be an object", source, record, "labels")
    metadata = rec.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        fail("metadata must be an object", source, record, "metadata")
    tid = rec.get("id")
    if tid is None:
        tid = f"{source or 'transcript'}:{record if record is not None else 0}"
    origin = ", ".join(p for p in (source, None if record is None else f"record {record}") if p) or None
    t = object.__new__(Transcript)  # build, then validate with the file/record in the message
    for k, v in dict(messages=messages, tools=tuple(dict(x) for x in tools), labels=dict(labels),
                     metadata=dict(metadata), prefix=rec.get("prefix"), id=str(tid), source=origin).items():
        object.__setattr__(t, k, v)
    validate(t, source, record)
    return t


def binary_label(t: Transcript, key: str = "harmful") -> bool:
    """Read ``t.labels[key]`` as a class: ``True``/``False``, or the integers 1/0.

    Nothing else is coerced: ``null``, NaN, ``"false"``, ``"yes"``, 0.0 raise a
    :class:`TranscriptError` naming the file, record, transcript and value, so a label a loader
    kept as given never silently becomes a class (``bool("false")`` is ``True``).

    >>> t = Transcript.from_messages([{"role": "user", "content": "hi"}], labels={"harmful": 1})
    >>> binary_label(t)
    True
    """
    if key not in t.labels:
        fail(f"no label {key!r} (labels: {sorted(t.labels)})", t.source, None, f"labels.{key}", t.id)
    try:
        return as_class(t.labels[key])
    except ValueError as e:
        why = str(e)
    fail(why, t.source, None, f"labels.{key}", t.id)


def as_class(v: Any) -> bool:
    """One label value read as a class by :func:`binary_label`'s rule (``True``/``False``, 1/0);
    anything else raises ``ValueError`` saying what the value is. For labels kept elsewhere
    (an activation store's transcript records)."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, numbers.Integral) and int(v) in (0, 1):
        return bool(int(v))
    why = "null (missing?)" if v is None else "NaN" if isinstance(v, float) and math.isnan(v) else repr(v)
    raise ValueError(f"label value {why} is not a class (expected true/false or 1/0)")


def binary_labels(transcripts: Sequence[Transcript], key: str = "harmful") -> np.ndarray:
    """:func:`binary_label` of every transcript, ``[n]`` bool."""
    return np.asarray([binary_label(t, key) for t in transcripts], dtype=bool)
