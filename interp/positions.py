"""Position selectors: which token positions of a rendered transcript to keep.

A selector maps a :class:`~interp.transcripts.RenderedTranscript` to a list of :class:`Pick`
rows. A pick is one kept row: one position, or several averaged (a segment mean). Different
transcripts may give different numbers of rows (every prefix token, say): results are ragged
and carry, per row, which transcript and which positions they came from.

Selectors compose with ``+`` and have a short name that :func:`parse` reads back (the CLI
syntax, and what stores record):

>>> str(decision() + every("prefix"))
'decision+every:prefix'
>>> parse("last:user+mean:tool_result").name
'last:user+mean:tool_result'
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from interp.transcripts import KIND_INDEX, SEGMENT_KINDS, RenderedTranscript


class PositionError(ValueError):
    """A selector matched no token of a transcript."""


@dataclass(frozen=True)
class Pick:
    """One kept row: the token positions averaged into it (one position for most selectors)."""

    positions: tuple[int, ...]
    selector: Selector  # the selector that made it, e.g. every("prefix")

    @property
    def position(self) -> int:
        """The last position of the pick (where a causal model has read all of it)."""
        return self.positions[-1]


class Selector:
    """Base class: subclasses set ``name`` and implement ``select``."""

    name: str

    def select(self, r: RenderedTranscript) -> list[Pick]:
        raise NotImplementedError

    def __call__(self, r: RenderedTranscript) -> list[Pick]:
        picks = self.select(r)
        if not picks:
            raise PositionError(f"selector {self.name!r} matches no token in transcript {r.id!r}{_empty_note(self, r)}")
        return picks

    def __add__(self, other: Selector) -> Selector:
        return Concat(tuple(_parts(self)) + tuple(_parts(other)))

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<selector {self.name}>"


def _empty_note(s: Selector, r: RenderedTranscript) -> str:
    """Why a kind has no token, when the transcript has such segments that render to nothing."""
    empty = [e for e in getattr(r, "empty", ()) if e.kind == getattr(s, "kind", None)]
    return f": its {s.kind} segments are empty ({'; '.join(f'{e.name}: {e.note}' for e in empty)})" if empty else ""


def _parts(s: Selector) -> tuple[Selector, ...]:
    return s.parts if isinstance(s, Concat) else (s,)


def _check_kind(kind: str) -> None:
    if kind not in KIND_INDEX:
        raise ValueError(f"unknown segment kind {kind!r} (expected one of {', '.join(SEGMENT_KINDS)})")


def _kind_positions(r: RenderedTranscript, kind: str) -> np.ndarray:
    return np.flatnonzero(r.kind == KIND_INDEX[kind])


@dataclass(frozen=True, repr=False)
class Last(Selector):
    """The last token of a segment kind (e.g. the last ``user`` token)."""

    kind: str

    def __post_init__(self):
        _check_kind(self.kind)

    @property
    def name(self) -> str:
        return f"last:{self.kind}"

    def select(self, r):
        pos = _kind_positions(r, self.kind)
        return [Pick((int(pos[-1]),), self)] if len(pos) else []


@dataclass(frozen=True, repr=False)
class Mean(Selector):
    """The mean over all tokens of a segment kind: one row."""

    kind: str

    def __post_init__(self):
        _check_kind(self.kind)

    @property
    def name(self) -> str:
        return f"mean:{self.kind}"

    def select(self, r):
        pos = _kind_positions(r, self.kind)
        return [Pick(tuple(int(p) for p in pos), self)] if len(pos) else []


@dataclass(frozen=True, repr=False)
class Every(Selector):
    """Every token of a segment kind (e.g. every ``prefix`` token): one row each."""

    kind: str

    def __post_init__(self):
        _check_kind(self.kind)

    @property
    def name(self) -> str:
        return f"every:{self.kind}"

    def select(self, r):
        return [Pick((int(p),), self) for p in _kind_positions(r, self.kind)]


_WRITTEN = [KIND_INDEX[k] for k in ("assistant", "tool_call", "reasoning")]  # what an assistant writes


@dataclass(frozen=True, repr=False)
class Decision(Selector):
    """The decision position: the last token before the first token the assistant writes.

    For a transcript rendered for generation this is the end of the generation prompt, or the
    last prefix token when a prefix is forced. For one ending in an assistant reply, it is the
    token just before the reply's first written token (its reasoning, text or tool call).
    """

    @property
    def name(self) -> str:
        return "decision"

    def select(self, r):
        n_messages = len(r.transcript.messages)
        if r.message[-1] == n_messages:  # rendered with a generation prompt (and maybe a prefix)
            return [Pick((len(r) - 1,), self)]
        last = r.message[-1]
        written = np.flatnonzero((r.message == last) & np.isin(r.kind, _WRITTEN))
        if len(written) == 0 or written[0] == 0:
            return []
        return [Pick((int(written[0]) - 1,), self)]


@dataclass(frozen=True, repr=False)
class AllTokens(Selector):
    """Every token of the transcript: one row each."""

    @property
    def name(self) -> str:
        return "all"

    def select(self, r):
        return [Pick((i,), self) for i in range(len(r))]


@dataclass(frozen=True, repr=False)
class At(Selector):
    """Explicit positions; negative ones count from the end."""

    indices: tuple[int, ...]

    @property
    def name(self) -> str:
        return "at:" + ",".join(str(i) for i in self.indices)

    def select(self, r):
        n = len(r)
        out = []
        for i in self.indices:
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise PositionError(f"position {i} is outside transcript {r.id!r} ({n} tokens)")
            out.append(Pick((j,), self))
        return out


@dataclass(frozen=True, repr=False)
class Concat(Selector):
    """Rows of several selectors, in order; every part must match."""

    parts: tuple[Selector, ...]

    @property
    def name(self) -> str:
        return "+".join(p.name for p in self.parts)

    def select(self, r):
        return [pick for part in self.parts for pick in part(r)]


def last(kind: str) -> Selector:
    """Last token of a segment kind."""
    return Last(kind)


def mean(kind: str) -> Selector:
    """Mean over a segment kind."""
    return Mean(kind)


def every(kind: str) -> Selector:
    """Every token of a segment kind."""
    return Every(kind)


def decision() -> Selector:
    """The decision position (see :class:`Decision`)."""
    return Decision()


def all_tokens() -> Selector:
    """Every token."""
    return AllTokens()


def at(*indices: int) -> Selector:
    """Explicit positions (negative from the end)."""
    return At(tuple(int(i) for i in indices))


def parse(spec: str | Selector) -> Selector:
    """Read a selector from its name: ``decision``, ``all``, ``last:KIND``, ``mean:KIND``,
    ``every:KIND``, ``at:I,J``, joined with ``+``."""
    if isinstance(spec, Selector):
        return spec
    parts = []
    for item in str(spec).split("+"):
        item = item.strip()
        head, _, arg = item.partition(":")
        if head == "decision" and not arg:
            parts.append(decision())
        elif head == "all" and not arg:
            parts.append(all_tokens())
        elif head in ("last", "mean", "every") and arg:
            parts.append({"last": last, "mean": mean, "every": every}[head](arg))
        elif head == "at" and arg:
            try:
                parts.append(at(*(int(x) for x in arg.split(","))))
            except ValueError:
                raise ValueError(f"bad position list in selector {item!r}") from None
        else:
            raise ValueError(
                f"unknown position selector {item!r} (expected decision, all, last:KIND, mean:KIND, "
                f"every:KIND or at:I,J; KIND one of {', '.join(SEGMENT_KINDS)})")
    return parts[0] if len(parts) == 1 else Concat(tuple(parts))
