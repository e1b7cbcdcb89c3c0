"""Agent transcripts: records, loaders, and rendering with a segment label on every token.

A :class:`Transcript` is a conversation in the Hugging Face / OpenAI chat format (system, user,
assistant with optional tool calls, tool results), the tool schemas offered, labels, and an
optional forced assistant ``prefix`` (the PING injection point).

:func:`render` renders it through the tokenizer's own chat template and labels every token with
the segment it came from. Labels come from character offsets of the rendered text, never from a
hand-written per-model string, so any template family works.

>>> t = Transcript.from_messages([{"role": "user", "content": "hi"}], id="t0")
>>> t.messages[0].role, t.prefix
('user', None)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROLES = ("system", "user", "assistant", "tool")
SEGMENT_KINDS = ("template", "system", "user", "assistant", "tool_call", "tool_result", "prefix")
"""Every token gets one of these kinds; ``template`` covers headers and special tokens."""
KIND_INDEX = {k: i for i, k in enumerate(SEGMENT_KINDS)}
_CONTENT_KIND = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool_result"}


class TranscriptError(ValueError):
    """A transcript (or the file it came from) is malformed. The message names where."""


def _where(source: str | None, record: int | str | None, field_: str | None) -> str:
    parts = [p for p in (source, None if record is None else f"record {record}", field_) if p]
    return ", ".join(parts)


def _fail(msg: str, source: str | None = None, record=None, field_: str | None = None):
    where = _where(source, record, field_)
    raise TranscriptError(f"{where}: {msg}" if where else msg)


# --------------------------------------------------------------------------------------------
# Records


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
    """One chat message. ``tool_calls`` only on assistant messages, ``tool_call_id`` on tool ones."""

    role: str
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None

    def to_dict(self, json_arguments: bool = False) -> dict:
        d: dict[str, Any] = {"role": self.role, "content": self.content}
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
    after the generation prompt, before anything the model writes.
    """

    messages: tuple[Message, ...]
    tools: tuple[Mapping[str, Any], ...] = ()
    labels: Mapping[str, Any] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    prefix: str | None = None
    id: str = ""

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


def validate(t: Transcript, source: str | None = None, record=None) -> None:
    """Check roles, tool-call structure and that every tool message answers a call."""
    if not t.messages:
        _fail("transcript has no messages", source, record, "messages")
    open_calls: list[ToolCall] = []  # calls of the latest assistant message not yet answered
    for i, m in enumerate(t.messages):
        f = f"messages[{i}]"
        if m.role not in ROLES:
            _fail(f"unknown role {m.role!r} (expected one of {', '.join(ROLES)})", source, record, f + ".role")
        if not isinstance(m.content, str):
            _fail(f"content must be a string, got {type(m.content).__name__}", source, record, f + ".content")
        if m.tool_calls and m.role != "assistant":
            _fail(f"only assistant messages carry tool_calls, not {m.role!r}", source, record, f + ".tool_calls")
        for j, c in enumerate(m.tool_calls):
            if not isinstance(c.name, str) or not c.name:
                _fail("tool call needs a function name", source, record, f"{f}.tool_calls[{j}].function.name")
            if not isinstance(c.arguments, Mapping):
                _fail("tool-call arguments must be a JSON object", source, record, f"{f}.tool_calls[{j}].function.arguments")
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
                _fail(f"tool message answers {what}, but no unanswered tool call precedes it",
                      source, record, f + ".tool_call_id")
            open_calls.remove(match)
        else:
            open_calls = []
    if t.prefix is not None:
        if not isinstance(t.prefix, str):
            _fail("prefix must be a string", source, record, "prefix")
        if t.messages[-1].role == "assistant":
            _fail("a forced prefix opens the next assistant reply, but the transcript already ends "
                  "with an assistant message", source, record, "prefix")


# --------------------------------------------------------------------------------------------
# Loaders


def _parse_call(raw: Any, source, record, f: str) -> ToolCall:
    if not isinstance(raw, Mapping):
        _fail("tool call must be an object", source, record, f)
    fn = raw.get("function", raw)
    if not isinstance(fn, Mapping):
        _fail("tool call 'function' must be an object", source, record, f + ".function")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        _fail("tool call needs a function name", source, record, f + ".function.name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            _fail(f"arguments are not valid JSON ({e.msg})", source, record, f + ".function.arguments")
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        _fail("arguments must be a JSON object", source, record, f + ".function.arguments")
    return ToolCall(name=name, arguments=dict(args), id=raw.get("id"))


def _parse_message(raw: Any, source, record, i: int) -> Message:
    f = f"messages[{i}]"
    if isinstance(raw, Message):
        return raw
    if not isinstance(raw, Mapping):
        _fail("message must be an object", source, record, f)
    role = raw.get("role")
    if role not in ROLES:
        _fail(f"unknown role {role!r} (expected one of {', '.join(ROLES)})", source, record, f + ".role")
    content = raw.get("content")
    if content is None:
        content = ""
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        try:
            content = "".join(p["text"] for p in content if p.get("type") == "text")
        except (TypeError, KeyError, AttributeError):
            _fail("content parts must be objects with 'type' and 'text'", source, record, f + ".content")
    if not isinstance(content, str):
        _fail(f"content must be a string, got {type(content).__name__}", source, record, f + ".content")
    calls = raw.get("tool_calls") or ()
    if not isinstance(calls, (list, tuple)):
        _fail("tool_calls must be a list", source, record, f + ".tool_calls")
    return Message(
        role=role,
        content=content,
        tool_calls=tuple(_parse_call(c, source, record, f"{f}.tool_calls[{j}]") for j, c in enumerate(calls)),
        tool_call_id=raw.get("tool_call_id"),
        name=raw.get("name"),
    )


def from_record(rec: Mapping, source: str | None = None, record: int | str | None = None) -> Transcript:
    """Build a transcript from ``{messages, tools?, labels?, metadata?, prefix?, id?}``."""
    if not isinstance(rec, Mapping):
        _fail("record must be a JSON object", source, record)
    msgs = rec.get("messages")
    if not isinstance(msgs, (list, tuple)) or not msgs:
        _fail("missing or empty 'messages' list", source, record, "messages")
    messages = tuple(_parse_message(m, source, record, i) for i, m in enumerate(msgs))
    tools = rec.get("tools") or ()
    if not isinstance(tools, (list, tuple)) or not all(isinstance(x, Mapping) for x in tools):
        _fail("tools must be a list of objects", source, record, "tools")
    labels = rec.get("labels") or {}
    if not isinstance(labels, Mapping):
        _fail("labels must be an object", source, record, "labels")
    metadata = rec.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        _fail("metadata must be an object", source, record, "metadata")
    prefix = rec.get("prefix")
    tid = rec.get("id")
    if tid is None:
        tid = f"{source or 'transcript'}:{record if record is not None else 0}"
    t = object.__new__(Transcript)  # build, then validate with the file/record in the message
    for k, v in dict(messages=messages, tools=tuple(dict(x) for x in tools), labels=dict(labels),
                     metadata=dict(metadata), prefix=prefix, id=str(tid)).items():
        object.__setattr__(t, k, v)
    validate(t, source, record)
    return t


def load_jsonl(path: str | Path) -> list[Transcript]:
    """Read a JSONL file of ``{messages, tools?, labels?}`` records (one transcript per line)."""
    path = Path(path)
    out = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TranscriptError(f"{path}, line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            rec.setdefault("id", f"{path.stem}:{lineno}") if isinstance(rec, dict) else None
            out.append(from_record(rec, str(path), f"{lineno} (line {lineno})"))
    if not out:
        raise TranscriptError(f"{path}: no transcripts in file")
    return out


def save_jsonl(transcripts: Iterable[Transcript], path: str | Path) -> None:
    """Write transcripts as JSONL, atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for t in transcripts:
                fh.write(json.dumps(t.to_record(), ensure_ascii=False) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def from_dataset(dataset: Any, source: str | None = None) -> list[Transcript]:
    """Transcripts from a Hugging Face ``datasets.Dataset`` (or a path saved with ``save_to_disk``).

    Rows need a ``messages`` column; ``tools``, ``labels``, ``metadata``, ``prefix`` and ``id`` are
    optional. Store tool-call arguments as JSON strings: ``datasets`` unifies nested dicts across
    rows and would add keys to them.
    """
    if isinstance(dataset, (str, Path)):
        import datasets

        source = source or str(dataset)
        try:
            dataset = datasets.load_from_disk(str(dataset))
        except FileNotFoundError as e:
            raise TranscriptError(f"{dataset}: not a dataset saved with save_to_disk ({e})") from None
    if "messages" not in getattr(dataset, "column_names", ()):
        raise TranscriptError(f"{source or 'dataset'}: no 'messages' column (columns: {getattr(dataset, 'column_names', None)})")
    out = [from_record(_drop_nulls(row), source or "dataset", i) for i, row in enumerate(dataset)]
    if not out:
        raise TranscriptError(f"{source or 'dataset'}: dataset is empty")
    return out


def _drop_nulls(row: Mapping) -> dict:
    """Arrow fills missing struct fields with None; treat those as absent."""
    def clean(x):
        if isinstance(x, Mapping):
            return {k: clean(v) for k, v in x.items() if v is not None}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    row = dict(row)
    row["messages"] = clean(row.get("messages"))
    return row


DEFAULT_AGENT_SYSTEM_PROMPT = (
    "You are a helpful agent. Use the tools provided to complete the user's task."
)


def load_agentharm(path: str | Path, harmful: bool | None = None,
                   system_prompt: str = DEFAULT_AGENT_SYSTEM_PROMPT) -> list[Transcript]:
    """AgentHarm-style behaviour JSON (``{"behaviors": [{id, name, category, prompt,
    target_functions, ...}]}`` or a bare list) turned into single-turn agent transcripts.

    Each target function becomes an offered tool schema (AgentHarm ships the tools as code, so
    the schema has a name and no parameters). ``harmful`` defaults to ``"benign" not in`` the
    file name, as AgentHarm names its benign split.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TranscriptError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    behaviours = data.get("behaviors", data.get("behaviours")) if isinstance(data, Mapping) else data
    if not isinstance(behaviours, list) or not behaviours:
        raise TranscriptError(f"{path}: expected a non-empty 'behaviors' list")
    if harmful is None:
        harmful = "benign" not in path.name.lower()
    out = []
    for i, b in enumerate(behaviours):
        if not isinstance(b, Mapping):
            _fail("behaviour must be an object", str(path), i)
        for key in ("id", "prompt", "target_functions"):
            if key not in b:
                _fail(f"missing field {key!r}", str(path), i, key)
        if not isinstance(b["prompt"], str) or not b["prompt"].strip():
            _fail("prompt must be a non-empty string", str(path), i, "prompt")
        fns = b["target_functions"]
        if not isinstance(fns, list) or not all(isinstance(f, str) for f in fns):
            _fail("target_functions must be a list of function names", str(path), i, "target_functions")
        tools = tuple(
            {"type": "function", "function": {"name": f, "description": f.replace("_", " "),
                                              "parameters": {"type": "object", "properties": {}}}}
            for f in fns
        )
        labels = {"harmful": bool(harmful), "category": b.get("category"), "name": b.get("name")}
        meta = {k: v for k, v in b.items() if k not in ("prompt",)}
        out.append(Transcript(
            messages=(Message("system", system_prompt), Message("user", b["prompt"])),
            tools=tools, labels=labels, metadata=meta, id=str(b["id"]),
        ))
    return out


# --------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class Span:
    """A character span of the rendered text that belongs to one segment."""

    kind: str
    message: int
    call: int  # index of the tool call within its message, -1 otherwise
    start: int
    end: int


@dataclass(frozen=True)
class Segment:
    """A contiguous run of tokens with one label: tokens ``start:end`` of a rendered transcript."""

    kind: str
    message: int
    turn: int
    call: int
    start: int
    end: int

    @property
    def name(self) -> str:
        """A readable label, e.g. ``tool_call[3.1]`` (message 3, call 1) or ``user[1]``."""
        if self.call >= 0:
            return f"{self.kind}[{self.message}.{self.call}]"
        return f"{self.kind}[{self.message}]"


@dataclass(frozen=True, eq=False)
class RenderedTranscript:
    """Token ids and a label for every token. Arrays are all ``[pos]`` (offsets ``[pos, 2]``).

    ``kind`` indexes :data:`SEGMENT_KINDS`; ``message`` is the index of the message the token
    belongs to (``len(messages)`` for the generation prompt and the prefix); ``turn`` is the agent
    step: the n-th assistant message and the tool results answering it have turn n, the
    generation prompt and prefix the number of assistant messages so far; ``call`` is the tool
    call's index within its message for ``tool_call`` tokens, -1 otherwise.
    """

    transcript: Transcript
    text: str
    input_ids: np.ndarray
    offsets: np.ndarray
    kind: np.ndarray
    message: np.ndarray
    turn: np.ndarray
    call: np.ndarray
    tokens: tuple[str, ...]
    truncated: int = 0  # tokens dropped from the left to fit the context

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def id(self) -> str:
        return self.transcript.id

    @property
    def kinds(self) -> list[str]:
        """The segment kind of every token, as strings."""
        return [SEGMENT_KINDS[k] for k in self.kind]

    def positions(self, kind: str) -> np.ndarray:
        """Indices of the tokens of one segment kind, ``[n]``."""
        if kind not in KIND_INDEX:
            raise ValueError(f"unknown segment kind {kind!r} (expected one of {', '.join(SEGMENT_KINDS)})")
        return np.flatnonzero(self.kind == KIND_INDEX[kind])

    def segments(self) -> list[Segment]:
        """Contiguous runs of tokens with the same (kind, message, call)."""
        out = []
        n = len(self)
        start = 0
        for i in range(1, n + 1):
            if i == n or (self.kind[i], self.message[i], self.call[i]) != (
                self.kind[start], self.message[start], self.call[start]):
                out.append(Segment(SEGMENT_KINDS[self.kind[start]], int(self.message[start]),
                                   int(self.turn[start]), int(self.call[start]), start, i))
                start = i
        return out

    def table(self) -> list[dict]:
        """One record per token: position, id, token string, kind, message, turn, call."""
        return [
            {"pos": i, "id": int(self.input_ids[i]), "token": self.tokens[i], "kind": SEGMENT_KINDS[self.kind[i]],
             "message": int(self.message[i]), "turn": int(self.turn[i]), "call": int(self.call[i])}
            for i in range(len(self))
        ]


def _apply_template(tokenizer, messages: list[dict], tools, add_generation_prompt: bool, chat_kwargs) -> str:
    out = tokenizer.apply_chat_template(
        messages, tools=list(tools) or None, add_generation_prompt=add_generation_prompt,
        tokenize=False, **chat_kwargs,
    )
    if not isinstance(out, str):  # some versions return a list for a single conversation
        out = out[0]
    return out


def _matching_brace(text: str, open_at: int, limit: int) -> int | None:
    """Index just past the ``}`` that closes the ``{`` at ``open_at`` (JSON-aware), or None."""
    depth, in_str, esc = 0, False, False
    for i in range(open_at, limit):
        ch = text[i]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _find_call_span(text: str, call: ToolCall, lo: int, hi: int) -> tuple[int, int] | None:
    """Where a tool call sits in ``text[lo:hi]``: the JSON object holding its name when the
    template writes JSON, else from its name to the last argument value."""
    at = text.find(call.name, lo, hi)
    if at < 0:
        return None
    # innermost enclosing '{' whose matching '}' lies past the name and past all argument values
    end_of_args = at + len(call.name)
    for v in call.arguments.values():
        s = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
        j = text.find(s, end_of_args, hi)
        if j < 0:
            j = text.find(json.dumps(v, ensure_ascii=True), end_of_args, hi)
            s = json.dumps(v, ensure_ascii=True)
        if j >= 0:
            end_of_args = j + len(s)
    k = at
    while True:
        k = text.rfind("{", lo, k)
        if k < 0:
            break
        close = _matching_brace(text, k, hi)
        if close is not None and close >= end_of_args:
            return k, close
    return at, end_of_args


def _message_ends(tokenizer, msgs: list[dict], tools, text: str, chat_kwargs) -> list[int] | None:
    """Where each message's rendering ends in ``text``: for each k, how far the rendering of the
    first k messages agrees with the whole. Exact when partial conversations render as prefixes
    of the whole (most templates); a sensible cut when a template groups messages (e.g. ChatML
    tool results). None if the template refuses partial conversations."""
    ends: list[int] = []
    for k in range(1, len(msgs) + 1):
        try:
            part = _apply_template(tokenizer, msgs[:k], tools, False, chat_kwargs)
        except Exception:  # templates may refuse partial conversations
            return None
        n = min(len(part), len(text))
        same = n if text[:n] == part[:n] else next(i for i in range(n) if text[i] != part[i])
        ends.append(max(same, ends[-1] if ends else 0))
    return ends


def _char_spans(t: Transcript, text: str) -> list[Span]:
    """Character spans of every message's content and every tool call, found in order."""
    spans: list[Span] = []
    cursor = 0
    for i, m in enumerate(t.messages):
        if m.content:
            at = text.find(m.content, cursor)
            content = m.content
            if at < 0:
                content = m.content.strip()
                at = text.find(content, cursor) if content else -1
            if at < 0:
                raise TranscriptError(
                    f"transcript {t.id!r}, messages[{i}].content: the chat template did not render this "
                    f"message's content verbatim, so its tokens cannot be labelled")
            spans.append(Span(_CONTENT_KIND[m.role], i, -1, at, at + len(content)))
            cursor = at + len(content)
        for j, c in enumerate(m.tool_calls):
            found = _find_call_span(text, c, cursor, len(text))
            if found is None:
                raise TranscriptError(
                    f"transcript {t.id!r}, messages[{i}].tool_calls[{j}]: the chat template did not render "
                    f"the call to {c.name!r} (does it support tool calls?)")
            spans.append(Span("tool_call", i, j, *found))
            cursor = found[1]
    return spans


def render(
    transcript: Transcript,
    tokenizer,
    *,
    add_generation_prompt: bool | None = None,
    max_length: int | None = None,
    truncate: bool = False,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> RenderedTranscript:
    """Render through ``tokenizer.apply_chat_template`` and label every token.

    Args:
        transcript: the conversation; its ``prefix`` (if any) is appended after the generation
            prompt.
        tokenizer: a fast Hugging Face tokenizer with a chat template.
        add_generation_prompt: open a new assistant reply at the end. Defaults to True unless
            the transcript ends with an assistant message.
        max_length: the model's context; longer renderings raise unless ``truncate``.
        truncate: keep only the last ``max_length`` tokens (the decision position is at the end).
        chat_template_kwargs: extra variables for the template.

    Returns:
        A :class:`RenderedTranscript` with ``[pos]`` arrays of ids and labels.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; set "
            "tokenizer.chat_template (a Jinja string) before rendering transcripts")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("rendering needs a fast tokenizer (character offsets); load it with use_fast=True")
    t = transcript
    last_is_assistant = t.messages[-1].role == "assistant"
    if add_generation_prompt is None:
        add_generation_prompt = not last_is_assistant
    if t.prefix is not None and not add_generation_prompt:
        raise TranscriptError(f"transcript {t.id!r}: a forced prefix needs add_generation_prompt=True")
    kw = dict(chat_template_kwargs or {})
    msgs = [m.to_dict() for m in t.messages]
    try:
        body = _apply_template(tokenizer, msgs, t.tools, add_generation_prompt, kw)
    except Exception as e:  # jinja errors: say which transcript
        raise TranscriptError(f"transcript {t.id!r}: the chat template failed to render it: {e}") from e
    spans = _char_spans(t, body)
    bounds = _message_ends(tokenizer, msgs, t.tools, body, kw)
    text = body
    if t.prefix:
        spans.append(Span("prefix", len(t.messages), -1, len(body), len(body) + len(t.prefix)))
        text = body + t.prefix

    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)

    # per-character labels, then each token takes the first content label it covers
    char_kind = np.zeros(len(text) + 1, dtype=np.int8)
    char_msg = np.full(len(text) + 1, -1, dtype=np.int32)
    char_call = np.full(len(text) + 1, -1, dtype=np.int32)
    for s in spans:
        char_kind[s.start:s.end] = KIND_INDEX[s.kind]
        char_msg[s.start:s.end] = s.message
        char_call[s.start:s.end] = s.call
    # message regions for template characters
    region = np.full(len(text) + 1, len(t.messages), dtype=np.int32)
    if bounds:
        prev = 0
        for i, e in enumerate(bounds):
            region[prev:e] = i
            prev = max(prev, e)
    else:  # a header belongs to the message it introduces: the next labelled span
        nxt = len(t.messages)
        for c in range(len(text) - 1, -1, -1):
            if char_msg[c] >= 0:
                nxt = char_msg[c]
            region[c] = nxt
    n_tok = len(ids)
    kind = np.zeros(n_tok, dtype=np.int8)
    message = np.zeros(n_tok, dtype=np.int32)
    call = np.full(n_tok, -1, dtype=np.int32)
    for i, (a, b) in enumerate(offsets):
        a, b = int(a), int(max(b, a + 1))
        ks = char_kind[a:b]
        nz = np.flatnonzero(ks)
        c = a + int(nz[0]) if len(nz) else a
        kind[i] = char_kind[c]
        message[i] = char_msg[c] if len(nz) else region[min(a, len(text))]
        call[i] = char_call[c] if len(nz) else -1
    n_assist_before = np.cumsum([0] + [m.role == "assistant" for m in t.messages])
    msg_turn = [int(n_assist_before[i]) - (1 if m.role == "tool" else 0) for i, m in enumerate(t.messages)]
    msg_turn.append(int(n_assist_before[-1]))
    turn = np.asarray(msg_turn, dtype=np.int32)[message]
    tokens = tuple(tokenizer.convert_ids_to_tokens(ids.tolist()))

    truncated = 0
    if max_length is not None and n_tok > max_length:
        if not truncate:
            raise TranscriptError(
                f"transcript {t.id!r} renders to {n_tok} tokens, longer than the context of {max_length}; "
                "pass truncate=True to keep the last tokens")
        truncated = n_tok - max_length
        sl = slice(truncated, None)
        ids, offsets, kind, message, turn, call = ids[sl], offsets[sl], kind[sl], message[sl], turn[sl], call[sl]
        tokens = tokens[truncated:]
    return RenderedTranscript(t, text, ids, offsets, kind, message, turn, call, tokens, truncated)


def render_all(transcripts: Sequence[Transcript], tokenizer, **kwargs) -> list[RenderedTranscript]:
    """:func:`render` every transcript; raises on an empty list."""
    if len(transcripts) == 0:
        raise ValueError("no transcripts given (the list is empty)")
    return [render(t, tokenizer, **kwargs) for t in transcripts]
