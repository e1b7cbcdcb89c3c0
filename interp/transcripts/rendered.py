"""A rendered transcript: token ids with a segment label on every token."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .records import KIND_INDEX, SEGMENT_KINDS, Transcript


@dataclass(frozen=True)
class Segment:
    """A contiguous run of tokens with one label: tokens ``start:end`` of a rendered transcript.

    An *empty* segment (``start == end``) is a field that renders to no token: empty content,
    whitespace the template trimmed away, or reasoning the template drops; ``note`` says which,
    and ``start`` is where it would sit.
    """

    kind: str
    message: int
    turn: int
    call: int
    start: int
    end: int
    note: str = ""

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
    call's index within its message for ``tool_call`` tokens, -1 otherwise. ``empty`` lists the
    fields that render to no token (see :class:`Segment`).
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
    empty: tuple[Segment, ...] = ()

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
        """Contiguous runs of tokens with the same (kind, message, call); empty segments are in
        :attr:`empty`."""
        n = len(self)
        if n == 0:
            return []
        key = np.stack([self.kind.astype(np.int64), self.message, self.call])
        starts = np.concatenate([[0], np.flatnonzero((key[:, 1:] != key[:, :-1]).any(axis=0)) + 1])
        ends = np.concatenate([starts[1:], [n]])
        return [Segment(SEGMENT_KINDS[self.kind[s]], int(self.message[s]), int(self.turn[s]), int(self.call[s]),
                        int(s), int(e)) for s, e in zip(starts, ends)]

    def table(self) -> list[dict]:
        """One record per token: position, id, token string, kind, message, turn, call."""
        return [
            {"pos": i, "id": int(self.input_ids[i]), "token": self.tokens[i], "kind": SEGMENT_KINDS[self.kind[i]],
             "message": int(self.message[i]), "turn": int(self.turn[i]), "call": int(self.call[i])}
            for i in range(len(self))
        ]
