"""Render a transcript through its tokenizer's own chat template, with a label on every token.

>>> from interp.transcripts import Transcript
>>> t = Transcript.from_messages([{"role": "user", "content": "hi"}], id="t0")
>>> t.messages[0].role, t.prefix
('user', None)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .labelling import Missing, Span, char_labels, locate, render_real, token_labels
from .records import Transcript, TranscriptError
from .rendered import RenderedTranscript, Segment


def _check_tokenizer(tokenizer) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; set "
            "tokenizer.chat_template (a Jinja string) before rendering transcripts")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("rendering needs a fast tokenizer (character offsets); load it with use_fast=True")


def _turns(t: Transcript) -> np.ndarray:
    """The agent step of every message index (and of ``len(messages)``), ``[n_messages + 1]``."""
    n_assist_before = np.cumsum([0] + [m.role == "assistant" for m in t.messages])
    turns = [int(n_assist_before[i]) - (1 if m.role == "tool" else 0) for i, m in enumerate(t.messages)]
    return np.asarray(turns + [int(n_assist_before[-1])], dtype=np.int32)


def _empty_segments(missing: list[Missing], offsets: np.ndarray, message: np.ndarray, ends: np.ndarray,
                    turns: np.ndarray) -> tuple[Segment, ...]:
    """Zero-length segments where missing fields would sit: at the token where trimmed-away
    whitespace was, else at the first token of their message."""
    out = []
    for m in missing:
        if m.at is not None:
            pos = int(np.searchsorted(offsets[:, 0], m.at))
        else:
            own = np.flatnonzero(message == m.message)
            pos = int(own[0]) if len(own) else int(np.searchsorted(offsets[:, 0], ends[m.message - 1] if m.message else 0))
        out.append(Segment(m.kind, m.message, int(turns[m.message]), m.call, pos, pos, m.note))
    return tuple(out)


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
        A :class:`RenderedTranscript` with ``[pos]`` arrays of ids and labels, and the fields that
        render to no token in ``empty``.

    Raises:
        TranscriptError: naming the transcript, the field and the reason when the template
            transforms a field in a way the labeller cannot follow (see docs/transcripts.md).
    """
    _check_tokenizer(tokenizer)
    t = transcript
    gen = not t.messages[-1].role == "assistant" if add_generation_prompt is None else add_generation_prompt
    if t.prefix is not None and not gen:
        raise TranscriptError(f"transcript {t.id!r}: a forced prefix needs add_generation_prompt=True")
    kw = dict(chat_template_kwargs or {})
    json_arguments, body = render_real(t, tokenizer, gen, kw)
    spans, missing, ends = locate(t, tokenizer, body, json_arguments, gen, kw)
    text = body + (t.prefix or "")
    if t.prefix:
        spans.append(Span("prefix", len(t.messages), -1, len(body), len(text)))

    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    kind, message, call = token_labels(offsets, *char_labels(len(text), spans), ends, len(text))
    turns = _turns(t)
    turn = turns[message]
    tokens = tuple(tokenizer.convert_ids_to_tokens(ids.tolist()))
    empty = _empty_segments(missing, offsets, message, ends, turns)

    truncated = 0
    n_tok = len(ids)
    if max_length is not None and n_tok > max_length:
        if not truncate:
            raise TranscriptError(
                f"transcript {t.id!r} renders to {n_tok} tokens, longer than the context of {max_length}; "
                "pass truncate=True to keep the last tokens")
        truncated = n_tok - max_length
        sl = slice(truncated, None)
        ids, offsets, kind, message, turn, call = ids[sl], offsets[sl], kind[sl], message[sl], turn[sl], call[sl]
        tokens = tokens[truncated:]
        empty = tuple(Segment(s.kind, s.message, s.turn, s.call, max(s.start - truncated, 0),
                              max(s.end - truncated, 0), s.note) for s in empty)
    return RenderedTranscript(t, text, ids, offsets, kind, message, turn, call, tokens, truncated, empty)


def count_tokens(transcript: Transcript, tokenizer, *, add_generation_prompt: bool | None = None,
                 chat_template_kwargs: Mapping[str, Any] | None = None) -> int:
    """How many tokens :func:`render` gives ``transcript`` (before any truncation), from the
    template rendering alone: a fraction of the cost of labelling, for checking lengths first."""
    _check_tokenizer(tokenizer)
    t = transcript
    gen = t.messages[-1].role != "assistant" if add_generation_prompt is None else add_generation_prompt
    _, body = render_real(t, tokenizer, gen, dict(chat_template_kwargs or {}))
    return len(tokenizer(body + (t.prefix or ""), add_special_tokens=False)["input_ids"])


def render_all(transcripts: Sequence[Transcript], tokenizer, **kwargs) -> list[RenderedTranscript]:
    """:func:`render` every transcript; raises on an empty list."""
    if len(transcripts) == 0:
        raise ValueError("no transcripts given (the list is empty)")
    return [render(t, tokenizer, **kwargs) for t in transcripts]
