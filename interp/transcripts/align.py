"""Align the stand-in rendering with the real one, character by character.

The stand-in rendering ``S`` is template text with markers; the real rendering ``R`` must be the
same template text with each marker replaced by its piece's text, either verbatim or in one of
the forms a template can exactly produce and the labeller exactly follows: leading/trailing
whitespace trimmed (``| trim``, ``.strip('\\n')``) and JSON string encoding (``| tojson``). Anything
else (a case change, HTML escaping, a piece rendered twice, template text that changes when the
text does) raises :class:`AlignError` naming the piece and the reason, never a guess.
"""

from __future__ import annotations

import bisect
import html
import json
from dataclasses import dataclass, field

from .standin import Plan

FOLLOWED_ALWAYS = ("reasoning", "assistant")
"""Kinds a template may drop or rewrite: its documented handling of what the model wrote."""


class AlignError(Exception):
    """The real rendering is not the stand-in rendering with pieces put back."""

    def __init__(self, piece: int | None, reason: str):
        super().__init__(reason)
        self.piece, self.reason = piece, reason


@dataclass
class Alignment:
    """Where every located piece sits in ``R`` (and ``S``), and how ``S`` maps onto ``R``."""

    spans: dict[int, tuple[int, int]] = field(default_factory=dict)  # piece -> R span
    s_spans: dict[int, tuple[int, int]] = field(default_factory=dict)  # piece -> S span
    encoding: dict[int, str] = field(default_factory=dict)  # piece -> raw | json | json-ascii
    trimmed: set[int] = field(default_factory=set)
    chunk_s: list[int] = field(default_factory=list)  # template chunks: S start, S end, R start
    chunk_e: list[int] = field(default_factory=list)
    chunk_r: list[int] = field(default_factory=list)

    def to_r(self, s: int) -> int:
        """The ``R`` position of template character ``s`` of ``S`` (or of a chunk's end)."""
        k = bisect.bisect_right(self.chunk_s, s) - 1
        if k < 0 or s > self.chunk_e[k]:
            raise ValueError(f"position {s} of the stand-in rendering is inside a marker")
        return self.chunk_r[k] + s - self.chunk_s[k]

    def add_chunk(self, s0: int, s1: int, r0: int) -> None:
        self.chunk_s.append(s0)
        self.chunk_e.append(s1)
        self.chunk_r.append(r0)


def _trims(t: str) -> list[tuple[int, int]]:
    leads = {len(t) - len(t.lstrip(c)) for c in (None, "\n", " ")}
    trails = {len(t.rstrip(c)) for c in (None, "\n", " ")}
    pairs = {(a, max(a, b)) for a in leads | {0} for b in trails | {len(t)}}
    return sorted(pairs, key=lambda ab: (ab != (0, len(t)), -(ab[1] - ab[0]), ab[0]))


def candidates(t: str) -> list[tuple[str, str, int, int]]:
    """``(rendered text, encoding, a, b)``: the forms a template may make of ``t`` (``t[a:b]``
    after trimming, then encoded), most faithful first."""
    out, seen = [], set()
    for a, b in _trims(t):
        sub = t[a:b]
        for enc, form in (("raw", sub), ("json", json.dumps(sub, ensure_ascii=False)[1:-1]),
                          ("json-ascii", json.dumps(sub)[1:-1])):
            if form not in seen:
                seen.add(form)
                out.append((form, enc, a, b))
    return out


def encode(text: str, encoding: str) -> str:
    if encoding == "raw":
        return text
    return json.dumps(text, ensure_ascii=encoding == "json-ascii")[1:-1]


def _diagnose(t: str, rest: str) -> str:
    """Name the transformation that turned ``t`` into the start of ``rest``."""
    for name, form in (("case-changed", t.upper()), ("case-changed", t.lower()), ("case-changed", t.title()),
                       ("case-changed", t.capitalize()), ("HTML-escaped", html.escape(t)),
                       ("HTML-escaped", html.escape(t, quote=False)), ("trimmed inside", " ".join(t.split()))):
        if form != t and rest.startswith(form):
            return f"{name}: the template renders {form[:40]!r} for {t[:40]!r}"
    return (f"rewritten: the template renders {rest[:40]!r} where this text ({t[:40]!r}) should be; "
            "only verbatim, whitespace-trimmed and JSON-encoded text can be followed")


def _branch_error(piece: int | None, s_text: str, r_text: str) -> AlignError:
    return AlignError(piece, "the chat template renders its own text differently when this text is replaced "
                             "by a stand-in (it tests the text itself, e.g. with startswith, 'in' or trim), so "
                             f"its tokens cannot be located (stand-in rendering has {s_text[:40]!r}, real "
                             f"rendering {r_text[:40]!r})")


def _occurrences(plan: Plan, S: str) -> list[tuple[int, int, int]]:
    """``(start, end, piece)`` of every marker in ``S``, in order; a piece found twice raises."""
    out, seen = [], set()
    for m in plan.marker_regex().finditer(S):
        k = int(m.group(1))
        if k >= len(plan.pieces) or plan.pieces[k].marker != m.group():
            raise AlignError(None, f"the stand-in rendering holds an unknown marker {m.group()!r}")
        if k in seen:
            raise AlignError(k, "duplicated: the template renders this text more than once")
        seen.add(k)
        out.append((m.start(), m.end(), k))
    return out


def align(plan: Plan, R: str, S: str) -> Alignment:
    """Walk ``S``; every template chunk must match ``R`` exactly and every marker one candidate
    form of its piece. Raises :class:`AlignError` on the first disagreement."""
    occ = _occurrences(plan, S)
    found, lowered = {k for _, _, k in occ}, S.lower()
    for k, p in enumerate(plan.pieces):
        if p.marker and k not in found and p.marker.lower() in lowered:
            raise AlignError(k, "case-changed: the template changes the case of this text")
    al = Alignment()
    r = s = 0
    for n, (m0, m1, k) in enumerate(occ):
        chunk = S[s:m0]
        if not R.startswith(chunk, r):
            raise _branch_error(k, chunk, R[r:r + len(chunk)])
        al.add_chunk(s, m0, r)
        r += len(chunk)
        ahead = S[m1:occ[n + 1][0] if n + 1 < len(occ) else len(S)]
        piece = plan.pieces[k]
        for form, enc, a, b in candidates(piece.text):
            if R.startswith(form, r) and R.startswith(ahead, r + len(form)):
                break
        else:
            raise AlignError(k, _diagnose(piece.text, R[r:]))
        al.spans[k], al.s_spans[k], al.encoding[k] = (r, r + len(form)), (m0, m1), enc
        if (a, b) != (0, len(piece.text)):
            al.trimmed.add(k)
        r += len(form)
        s = m1
    if R[r:] != S[s:]:
        raise _branch_error(occ[-1][2] if occ else None, S[s:], R[r:])
    al.add_chunk(s, len(S), r)
    return al


def claim_literals(plan: Plan, al: Alignment, S: str) -> dict[int, tuple[int, int]]:
    """R spans of kept (unmarked) pieces that sit in ``S`` right against their field's located
    markers, in the field's own order and encoding: those are the field's text, not the template's."""
    claimed: dict[int, tuple[int, int]] = {}  # piece -> S span
    for f in plan.fields:
        located = [k for k in f.pieces if k in al.s_spans]
        if not located:
            continue
        enc = al.encoding[located[0]]
        for forward in (True, False):
            at = None  # S position against the previous piece, walking in this direction
            for k in f.pieces if forward else f.pieces[::-1]:
                span = al.s_spans.get(k, claimed.get(k))
                if span is not None:
                    at = span[1] if forward else span[0]
                    continue
                lit = encode(plan.pieces[k].text, enc)
                lo, hi = (at, (at or 0) + len(lit)) if forward else ((at or 0) - len(lit), at)
                if at is not None and lo >= 0 and S[lo:hi] == lit:
                    claimed[k] = (lo, hi)
                    at = hi if forward else lo
                else:
                    at = None
    return {k: (al.to_r(lo), al.to_r(lo) + hi - lo) for k, (lo, hi) in claimed.items()}
