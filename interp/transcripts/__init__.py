"""Agent transcripts: records, loaders, and rendering with a segment label on every token.

A :class:`Transcript` is a conversation in the Hugging Face / OpenAI chat format (system, user,
assistant with optional reasoning and tool calls, tool results), the tool schemas offered,
labels, and an optional forced assistant ``prefix`` (the PING injection point).

:func:`render` renders it through the tokenizer's own chat template and labels every token with
the segment it came from. Labels are located without searching for content text: the
conversation is rendered a second time with a unique marker in place of every piece of text,
and the two renderings are aligned character by character (:mod:`.standin`, :mod:`.align`,
:mod:`.labelling`; docs/transcripts.md has the rules). A transformation the labeller cannot
follow raises a :class:`TranscriptError` naming the transcript, field and reason.

>>> t = Transcript.from_messages([{"role": "user", "content": "hi"}], id="t0")
>>> t.messages[0].role, t.prefix
('user', None)
"""

from .labelling import Span
from .loaders import (DEFAULT_AGENT_SYSTEM_PROMPT, from_dataset, from_record, load_agentharm, load_jsonl,
                      save_jsonl)
from .records import (KIND_INDEX, ROLES, SEGMENT_KINDS, Message, ToolCall, Transcript, TranscriptError, as_class,
                      binary_label, binary_labels, validate)
from .rendered import RenderedTranscript, Segment
from .rendering import count_tokens, render, render_all

__all__ = [
    "DEFAULT_AGENT_SYSTEM_PROMPT", "KIND_INDEX", "ROLES", "SEGMENT_KINDS", "Message", "RenderedTranscript", "Segment",
    "Span", "ToolCall", "Transcript", "TranscriptError", "as_class", "binary_label", "binary_labels", "count_tokens",
    "from_dataset", "from_record", "load_agentharm", "load_jsonl", "render", "render_all", "save_jsonl", "validate",
]
