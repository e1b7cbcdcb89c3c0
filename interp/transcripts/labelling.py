"""Locate every field of a transcript in its real rendering (see :mod:`.standin`, :mod:`.align`).

The result is a label for every character of the rendered text: content characters carry their
field's kind, message and call; template characters carry the message whose markup they are.

Template text belongs to a message by one rule: **a message's markup ends where the rendering
of the conversation cut after it stops agreeing with the whole rendering**, compared from the
message's last located text onward (so templates that rewrite earlier turns, such as reasoning
templates dropping old ``<think>`` blocks, do not move the cut). So a header belongs to the
message it introduces and an end-of-turn token to the message it closes; text after the last
message (the generation prompt) belongs to ``len(messages)``. A token that straddles a cut
belongs to the later message. Where the template refuses a cut conversation, all template text
up to a message's content belongs to it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .align import FOLLOWED_ALWAYS, AlignError, Alignment, align, candidates, claim_literals
from .records import KIND_INDEX, Transcript, TranscriptError
from .standin import THINK_CLOSE, Plan, plan as make_plan, template_source


@dataclass(frozen=True)
class Span:
    """A character span of the rendered text that belongs to one field (kind, message, call)."""

    kind: str
    message: int
    call: int
    start: int
    end: int


@dataclass(frozen=True)
class Missing:
    """A field (or the reasoning or answer part of one) that renders to no character."""

    kind: str
    message: int
    call: int
    at: int | None  # character position when known (trimmed away), None when dropped
    note: str


def apply_template(tokenizer, messages: list[dict], tools, add_generation_prompt: bool, kwargs) -> str:
    out = tokenizer.apply_chat_template(messages, tools=list(tools) or None, add_generation_prompt=add_generation_prompt,
                                        tokenize=False, **kwargs)
    return out if isinstance(out, str) else out[0]  # some versions return a list for one conversation


def render_real(t: Transcript, tokenizer, gen: bool, kwargs) -> tuple[bool, str]:
    """``(json_arguments, text)``: tool-call arguments go in as objects, or as JSON strings when
    the template only takes strings (it fails with objects, as DeepSeek-V3's does)."""
    try:
        return False, apply_template(tokenizer, [m.to_dict() for m in t.messages], t.tools, gen, kwargs)
    except Exception as e:  # jinja errors: say which transcript
        first = e
    if any(m.tool_calls for m in t.messages):
        try:
            return True, apply_template(tokenizer, [m.to_dict(json_arguments=True) for m in t.messages], t.tools,
                                        gen, kwargs)
        except Exception:
            pass
    raise TranscriptError(f"transcript {t.id!r}: the chat template failed to render it: {first}") from first


def common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix (binary search over C-level slice comparisons)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _matching_brace(text: str, open_at: int, limit: int) -> int | None:
    """Index just past the ``}`` that closes the ``{`` at ``open_at`` (JSON-aware), or None."""
    depth, in_str, esc = 0, False, False
    for i in range(open_at, limit):
        ch = text[i]
        if in_str:
            esc, in_str = (False, in_str) if esc else (ch == "\\", ch != '"')
        elif ch == '"':
            in_str = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _call_span(pieces: list[int], al: Alignment, S: str, starts: list[int], ends: list[int],
               tail_end) -> tuple[int, int]:
    """R span of a tool call: the JSON object around it when the template writes one (found in
    the stand-in rendering, where no content can hold a brace), else from its name to its last
    argument, closing any object its arguments open. ``tail_end()``: where in ``S`` the call's
    non-string arguments end (asked only for calls not wrapped in an object)."""
    s_lo = min(al.s_spans[k][0] for k in pieces)
    s_hi = max(al.s_spans[k][1] for k in pieces)
    lo = min(al.spans[k][0] for k in pieces)
    hi = max(al.spans[k][1] for k in pieces)
    before = max((e for e in ends if e <= s_lo), default=0)  # end of the previous marker
    after = min((s for s in starts if s >= s_hi), default=len(S))
    k = s_lo
    while (k := S.rfind("{", before, k)) >= 0:
        close = _matching_brace(S, k, after)
        if close is not None and close >= s_hi:
            return min(lo, al.to_r(k)), max(hi, al.to_r(close - 1) + 1)
    s_end = s_hi
    if (k := S.find("{", s_lo, s_hi)) >= 0 and (close := _matching_brace(S, k, after)) is not None:
        s_end = max(s_end, close)
    tail = tail_end()
    if tail is not None and s_hi < tail <= after:
        s_end = max(s_end, tail)
    return lo, hi if s_end == s_hi else max(hi, al.to_r(s_end - 1) + 1)


def _changed(value):
    """The same kind of value with a different last character (numbers, booleans), else None."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value * 10 + (2 if value % 10 == 1 else 1)
    return None


def _tail_end(t: Transcript, plan: Plan, f: int, S: str, tokenizer, gen, kwargs) -> int | None:
    """Where the call's non-string arguments end in ``S``: the end of what changes when they do
    (one more rendering, only for calls whose arguments hold numbers or booleans)."""
    fld = plan.fields[f]
    if plan.json_arguments:
        return None
    msgs = [dict(m) for m in plan.messages]
    calls = [dict(c) for c in msgs[fld.message]["tool_calls"]]
    args = calls[fld.call]["function"]["arguments"]
    new = {k: (_changed(v) if _changed(v) is not None else v) for k, v in args.items()}
    if new == args:
        return None
    calls[fld.call] = dict(calls[fld.call], function=dict(calls[fld.call]["function"], arguments=new))
    msgs[fld.message] = dict(msgs[fld.message], tool_calls=calls)
    try:
        S3 = apply_template(tokenizer, msgs, t.tools, gen, kwargs)
    except Exception:
        return None
    end = len(S) - common_prefix(S[::-1], S3[::-1])
    return end + 1 if S[end - 3:end + 1].lower() == "true" else end  # true/false share their last "e"


def _block(t: Transcript, plan: Plan, f: int, al: Alignment, S: str, tokenizer, gen, kwargs,
           piece: int | None = None) -> list[Span]:
    """Spans of a field with no marker (only whitespace and tested markup), or of one blank
    ``piece`` the template moved: render once more with a marker for it; the part of ``S`` that
    differs must be one of its forms (or of the answer part, when a ``<think>`` block is dropped)."""
    fld = plan.fields[f]
    msgs = [dict(m) for m in plan.messages]
    probe = f"{plan.nonce}{len(plan.pieces)}{plan.nonce}"
    msgs[fld.message][fld.path.rsplit(".", 1)[1]] = probe if piece is None else "".join(
        probe if k == piece else plan.pieces[k].marker or plan.pieces[k].text for k in fld.pieces)
    try:
        S2 = apply_template(tokenizer, msgs, t.tools, gen, kwargs)
    except Exception as e:
        raise AlignError(fld.pieces[0], f"the template fails when this text is replaced ({e})") from e
    a = common_prefix(S, S2)
    b = common_prefix(S[a:][::-1], S2[a:][::-1])
    region = S[a:len(S) - b]
    if not region:
        return []
    text = fld.text if piece is None else plan.pieces[piece].text
    kinds = [plan.pieces[k].kind for k in ([piece] if piece is not None else fld.pieces) for _ in plan.pieces[k].text]
    answer = text.rfind(THINK_CLOSE) + len(THINK_CLOSE) if THINK_CLOSE in text else 0
    for start in dict.fromkeys((0, answer)):
        for form, enc, lo, hi in candidates(text[start:]):
            if region == form and not plan.marker_regex().search(region):
                r0 = al.to_r(a)
                sub = kinds[start + lo:start + hi] if enc == "raw" else [fld.kind] * len(form)
                return [Span(k, fld.message, -1, r0 + i, r0 + i + 1) for i, k in enumerate(sub)]
    raise AlignError(fld.pieces[0], f"rewritten: the template renders {region[:40]!r} for this markup-only "
                                    f"text ({fld.text[:40]!r}), which the labeller cannot follow")


def _field_spans(t, plan, al, claimed, S, tokenizer, gen, kwargs) -> tuple[list[Span], set]:
    """Spans of every field in ``R``, and the (field, kind) pairs that got a character."""
    starts = sorted(s for s, _ in al.s_spans.values())
    ends = sorted(e for _, e in al.s_spans.values())
    spans: list[Span] = []
    rendered: set[tuple[int, str]] = set()
    for f, fld in enumerate(plan.fields):
        kept = [k for k in fld.pieces if plan.pieces[k].marker is None and plan.pieces[k].text]
        if kept and not any(k in al.spans for k in fld.pieces):  # no marker rendered: emptying shows it
            block = _block(t, plan, f, al, S, tokenizer, gen, kwargs)
            spans += block
            rendered |= {(f, s.kind) for s in block}
            continue
        for k in fld.pieces:
            p = plan.pieces[k]
            span = al.spans.get(k, claimed.get(k))
            if span is not None:
                spans.append(Span(p.kind, fld.message, fld.call, *span))
                if span[1] > span[0]:
                    rendered.add((f, p.kind))
            elif p.marker is None and p.kind not in FOLLOWED_ALWAYS and p.text.strip():  # blanks: trimmed
                raise AlignError(k, f"rewritten: the template changes the markup {p.text!r} inside this text")
            elif p.marker is not None and p.kind not in FOLLOWED_ALWAYS:
                raise AlignError(k, _dropped(p.marker, S))
        located = [k for k in fld.pieces if k in al.spans]
        for k in fld.pieces if located and fld.call < 0 else ():  # blank text the template moved
            p = plan.pieces[k]
            if p.marker is None and k not in claimed and p.text and not p.text.strip():
                moved = _block(t, plan, f, al, S, tokenizer, gen, kwargs, piece=k)
                spans += moved
                rendered |= {(f, x.kind) for x in moved}
        if fld.call >= 0 and located:
            tail = functools.partial(_tail_end, t, plan, f, S, tokenizer, gen, kwargs)
            spans.append(Span("tool_call", fld.message, fld.call, *_call_span(located, al, S, starts, ends, tail)))
            rendered.add((f, "tool_call"))
    return spans, rendered


def _dropped(marker: str, S: str) -> str:
    if marker.lower() in S.lower():
        return "case-changed: the template changes the case of this text"
    return "dropped: the template does not render this text"


def _missing(plan: Plan, al: Alignment, rendered: set) -> list[Missing]:
    """Kinds of each field that got no character, with why."""
    out = []
    for f, fld in enumerate(plan.fields):
        kinds = dict.fromkeys([fld.kind] + [plan.pieces[k].kind for k in fld.pieces])
        for kind in kinds:
            if (f, kind) in rendered:
                continue
            mine = [k for k in fld.pieces if plan.pieces[k].kind == kind]
            if not any(plan.pieces[k].text.strip() for k in mine):
                trimmed = [al.spans[k][0] for k in mine if k in al.spans]
                note = ("empty" if not "".join(plan.pieces[k].text for k in mine) else
                        "whitespace trimmed away by the template" if trimmed
                        else "whitespace-only, rendered as nothing by the template")
                out.append(Missing(kind, fld.message, fld.call, trimmed[0] if trimmed else None, note))
            else:
                out.append(Missing(kind, fld.message, fld.call, None, "dropped by the template"))
    return out


def locate(t: Transcript, tokenizer, body: str, json_arguments: bool, gen: bool, kwargs):
    """``(spans, missing, ends)``: field spans and missing fields of ``body`` (the real
    rendering) and where each message's markup ends, ``[n_messages]`` character positions.

    Whitespace-only fields first get markers (so ``if content`` sees text); if the template
    then branches differently (it tests ``content|trim``), they are kept as they are instead."""
    template = template_source(tokenizer)
    first = None
    for blank_markers in (True, False):
        plan = make_plan(t, template, body, json_arguments, blank_markers)
        try:
            S = apply_template(tokenizer, plan.messages, t.tools, gen, kwargs)
            al = align(plan, body, S)
            spans, rendered = _field_spans(t, plan, al, claim_literals(plan, al, S), S, tokenizer, gen, kwargs)
            break
        except AlignError as e:
            where = f", {plan.pieces[e.piece].path}" if e.piece is not None else ""
            first = first or TranscriptError(f"transcript {t.id!r}{where}: {e.reason}")
            if not any(f.text and not f.text.strip() for f in plan.fields):
                raise first from None
        except Exception as e:
            raise TranscriptError(f"transcript {t.id!r}: the chat template failed to render its stand-in: {e}") from e
    else:
        raise first from None
    ends = _message_ends(t, plan, al, S, tokenizer, gen, kwargs)
    return spans, _missing(plan, al, rendered), ends


def _agreement(P: str, S: str, plan: Plan, al: Alignment, marker_starts: list[int]) -> int:
    """Where ``P`` (a cut conversation's rendering) stops agreeing with ``S``, compared from the
    last marker of ``P`` that ``S`` also holds."""
    base_p = base_s = 0
    for m in plan.marker_regex().finditer(P):
        k = int(m.group(1))
        if k in al.s_spans:
            base_p, base_s = m.end(), al.s_spans[k][1]
    end = base_s + common_prefix(P[base_p:], S[base_s:])
    return min(end, min((s for s in marker_starts if s >= base_s), default=len(S)))


def _message_ends(t, plan: Plan, al: Alignment, S: str, tokenizer, gen: bool, kwargs) -> np.ndarray:
    n = len(t.messages)
    marker_starts = sorted(s for s, _ in al.s_spans.values())
    last_of = {}  # message -> end of its last located marker in S
    for k, (_, e) in al.s_spans.items():
        m = plan.fields[plan.pieces[k].field].message
        last_of[m] = max(e, last_of.get(m, 0))
    ends, prev = [], 0
    for k in range(1, n + 1):
        end = None
        if k == n and not gen:
            end = len(S)
        else:
            try:
                P = apply_template(tokenizer, plan.messages[:k], t.tools, False, kwargs)
                end = _agreement(P, S, plan, al, marker_starts)
            except Exception:  # templates may refuse cut conversations: header rule alone
                end = max([v for m, v in last_of.items() if m < k], default=prev)
        prev = max(prev, end)
        ends.append(prev)
    return np.asarray([al.to_r(e) for e in ends], dtype=np.int64)


def char_labels(n_chars: int, spans: list[Span]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-character kind, message and call arrays, ``[n_chars]`` (template characters: kind 0)."""
    kind = np.zeros(n_chars, dtype=np.int8)
    msg = np.full(n_chars, -1, dtype=np.int32)
    call = np.full(n_chars, -1, dtype=np.int32)
    for s in sorted(spans, key=lambda s: s.kind == "tool_call", reverse=True):  # calls first, pieces over them
        kind[s.start:s.end] = KIND_INDEX[s.kind]
        msg[s.start:s.end] = s.message
        call[s.start:s.end] = s.call
    return kind, msg, call


def token_labels(offsets: np.ndarray, char_kind, char_msg, char_call, ends: np.ndarray, n_chars: int):
    """Each token takes the label of the first field character it covers; a template token
    belongs to the message whose markup holds its last character. ``[pos]`` arrays."""
    idx = np.where(char_kind > 0, np.arange(n_chars), n_chars)
    nxt = np.append(np.minimum.accumulate(idx[::-1])[::-1], n_chars)  # next field character
    a = np.clip(offsets[:, 0], 0, n_chars)
    b = np.clip(np.maximum(offsets[:, 1], a + 1), 0, n_chars)
    c = nxt[a]
    has = c < b
    cc = np.minimum(c, n_chars - 1)
    owner = np.searchsorted(ends, np.maximum(b - 1, 0), side="right").astype(np.int32)
    kind = np.where(has, char_kind[cc], 0).astype(np.int8)
    message = np.where(has, char_msg[cc], owner).astype(np.int32)
    call = np.where(has, char_call[cc], -1).astype(np.int32)
    return kind, message, call

