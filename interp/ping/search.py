"""An offline prefix generator: a seeded search over sentences built from a lexicon of phrases.

A :class:`Lexicon` holds clause templates with named slots, the phrases each slot takes, and
single words for word-level edits. :class:`PhraseSearchGenerator` explores fresh sentences until
the loop shows it feedback, then mutates and recombines the best ones. It knows nothing about
any model: a built-in model provides its lexicon (the organism's comes from its grammar).
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from interp.ping.loop import Feedback, Request, prefix_key


@dataclass(frozen=True)
class Lexicon:
    """What the offline generator builds sentences from: clause ``templates`` (the grammar's
    preamble forms of every stance), ``pools`` of phrases per slot name (a slot's values
    pooled over every form that has it) and single ``words`` for word-level edits."""

    templates: tuple[str, ...]
    pools: Mapping[str, tuple[str, ...]]
    words: tuple[str, ...]

    @property
    def phrases(self) -> tuple[str, ...]:
        """Every pooled phrase, longest first (for parsing), each once."""
        seen = dict.fromkeys(p for pool in self.pools.values() for p in pool)
        return tuple(sorted(seen, key=lambda p: (-len(p), p)))


_SLOT = re.compile(r"\{(\w+)\}")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Clause:
    """One sentence of a candidate: a template with slot values, or (after word-level edits or
    when it matches no template) plain ``words``."""

    template: str | None = None
    values: tuple[tuple[str, str], ...] = ()
    words: tuple[str, ...] = ()

    def text(self) -> str:
        if self.template is None:
            t = " ".join(self.words)
        else:
            t = self.template.format(**dict(self.values))
        return t[:1].upper() + t[1:]


class PhraseSearchGenerator:
    """An offline PING generator: a seeded search over sentences made of a :class:`Lexicon`'s
    phrases. It is not a language model and reads no meta-prompt; it does what the loop asks of
    a generator with the information the loop gives it.

    Without feedback it explores: each candidate is one to three clauses, each a grammar form
    of a random stance whose slots are filled from the pooled values (with ``cross_slot``
    chance from another slot's pool, which makes sentences no form produces). With feedback it
    exploits: with ``explore`` chance a fresh candidate, otherwise a mutation of a shown prefix
    (by overall score more often than by one rate alone) or a crossover of two shown prefixes.
    Mutations swap a phrase for another of its slot (or of any slot), swap or drop a word, add,
    drop or reorder a clause, or move a clause's values to another template.

    The proposals depend only on the request (its seed and feedback) and the settings, so a
    resumed run proposes what the interrupted one did.

    >>> lex = Lexicon(("{who} will {check} first.",), {"who": ("I", "We"), "check": ("check the task", "look")},
    ...               ("carefully",))
    >>> gen = PhraseSearchGenerator(lex)
    >>> a = gen.propose(Request(n=3, round=1, attempt=0, seed=7))
    >>> a == gen.propose(Request(n=3, round=1, attempt=0, seed=7)), len(a)
    (True, 3)
    """

    def __init__(self, lexicon: Lexicon, *, explore: float = 0.2, crossover: float = 0.25,
                 cross_slot: float = 0.08, max_clauses: int = 3, max_words: int = 40):
        for name, v in dict(explore=explore, crossover=crossover, cross_slot=cross_slot).items():
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if max_clauses < 1 or max_words < 3:
            raise ValueError("max_clauses must be at least 1 and max_words at least 3")
        self.lexicon = lexicon
        self.explore, self.crossover, self.cross_slot = explore, crossover, cross_slot
        self.max_clauses, self.max_words = max_clauses, max_words
        alt = "|".join(re.escape(p) for p in self.lexicon.phrases)
        self._parsers = []
        for tpl in self.lexicon.templates:
            parts, pos = [], 0
            for m in _SLOT.finditer(tpl):
                parts.append(re.escape(tpl[pos:m.start()]) + f"(?P<{m.group(1)}>{alt})")
                pos = m.end()
            parts.append(re.escape(tpl[pos:]))
            self._parsers.append((tpl, re.compile("^" + "".join(parts) + "$", re.IGNORECASE)))

    def __repr__(self) -> str:
        return (f"PhraseSearchGenerator(explore={self.explore}, crossover={self.crossover}, "
                f"cross_slot={self.cross_slot}, max_clauses={self.max_clauses}, max_words={self.max_words})")

    # the loop's protocol ---------------------------------------------------------------------

    def propose(self, request: Request) -> list[str]:
        rng = random.Random(request.seed)
        parents = self._parents(request.feedback)
        out: list[str] = []
        keys = {prefix_key(p) for p, _ in parents}
        for _ in range(request.n * 20):  # distinct candidates, none equal to a parent
            if len(out) == request.n:
                break
            text = self._one(parents, rng)
            k = prefix_key(text)
            if k not in keys:
                keys.add(k)
                out.append(text)
        return out

    # building blocks -------------------------------------------------------------------------

    def fresh(self, rng: random.Random) -> str:
        """A new candidate of one to three random clauses."""
        n = 1 + (rng.random() < 0.4) + (rng.random() < 0.15)
        return self._render([self._fresh_clause(rng) for _ in range(min(n, self.max_clauses))])

    def parse(self, text: str) -> list[Clause]:
        """``text`` as clauses: sentences matching a template get its slots, others are words."""
        out = []
        for sent in _SENTENCE_END.split(text.strip()):
            if not sent:
                continue
            for tpl, rx in self._parsers:
                m = rx.match(sent)
                if m:
                    out.append(Clause(tpl, tuple((k, self._canonical(k, v)) for k, v in m.groupdict().items())))
                    break
            else:
                out.append(Clause(words=tuple(sent.split())))
        return out

    def mutate(self, text: str, rng: random.Random) -> str:
        """One or two random edits of ``text``."""
        clauses = self.parse(text)
        for _ in range(1 + (rng.random() < 0.35)):
            clauses = self._edit(clauses, rng)
        return self._render(clauses)

    def cross(self, a: str, b: str, rng: random.Random) -> str:
        """A child of two candidates: a leading part of one and a trailing part of the other, or
        one with a clause of the other inserted."""
        ca, cb = self.parse(a), self.parse(b)
        if rng.random() < 0.5 and (len(ca) > 1 or len(cb) > 1):
            i, j = rng.randint(1, len(ca)), rng.randint(0, len(cb) - 1)
            child = ca[:i] + cb[j:]
        else:
            child = list(ca)
            child.insert(rng.randint(0, len(child)), rng.choice(cb))
        return self._render(child[: self.max_clauses])

    # internals -------------------------------------------------------------------------------

    def _canonical(self, slot: str, value: str) -> str:
        # A sentence-initial value is capitalised when rendered ("let me" -> "Let me"): give
        # back the lexicon's spelling, preferring the slot's own pool ("Now" vs "now").
        for pool in (self.lexicon.pools.get(slot, ()), *self.lexicon.pools.values()):
            for p in pool:
                if p.casefold() == value.casefold():
                    return p
        return value

    def _parents(self, feedback: Feedback | None) -> list[tuple[str, float]]:
        """Shown prefixes with a selection weight: by overall score twice as likely as by one rate."""
        if feedback is None:
            return []
        weights: dict[str, float] = {}
        texts: dict[str, str] = {}
        for items, w in ((feedback.by_score, 2.0), (feedback.by_benign, 1.0), (feedback.by_refusal, 1.0)):
            for p in items:
                k = prefix_key(p.prefix)
                texts.setdefault(k, p.prefix)
                weights[k] = weights.get(k, 0.0) + w
        return [(texts[k], weights[k]) for k in texts]

    def _one(self, parents: list[tuple[str, float]], rng: random.Random) -> str:
        if not parents or rng.random() < self.explore:
            return self.fresh(rng)
        texts, weights = [p for p, _ in parents], [w for _, w in parents]
        a = rng.choices(texts, weights)[0]
        if len(parents) > 1 and rng.random() < self.crossover:
            b = rng.choices(texts, weights)[0]
            if b != a:
                child = self.cross(a, b, rng)
                return self.mutate(child, rng) if rng.random() < 0.3 else child
        return self.mutate(a, rng)

    def _value(self, slot: str, rng: random.Random) -> str:
        pools = self.lexicon.pools
        if slot not in pools or rng.random() < self.cross_slot:
            return rng.choice(pools[rng.choice(sorted(pools))])
        return rng.choice(pools[slot])

    def _fill(self, tpl: str, rng: random.Random, keep: Mapping[str, str] | None = None) -> Clause:
        slots = list(dict.fromkeys(_SLOT.findall(tpl)))
        return Clause(tpl, tuple((s, (keep or {}).get(s) or self._value(s, rng)) for s in slots))

    def _fresh_clause(self, rng: random.Random) -> Clause:
        return self._fill(rng.choice(self.lexicon.templates), rng)

    def _render(self, clauses: Sequence[Clause]) -> str:
        text = " ".join(c.text() for c in clauses if c.text().strip())
        words = text.split()
        if len(words) > self.max_words:
            text = " ".join(words[: self.max_words]).rstrip(",;:") + ("" if words[self.max_words - 1][-1] in ".!?" else ".")
        return text

    def _edit(self, clauses: list[Clause], rng: random.Random) -> list[Clause]:
        clauses = list(clauses) or [self._fresh_clause(rng)]
        ops = ["phrase", "word", "drop_word", "add", "retemplate"]
        if len(clauses) > 1:
            ops += ["drop", "reorder"]
        op = rng.choices(ops, [0.4, 0.12, 0.06, 0.16, 0.1, 0.1, 0.06][: len(ops)])[0]
        i = rng.randrange(len(clauses))
        c = clauses[i]
        if op == "phrase" and c.template is not None:
            j = rng.randrange(len(c.values))
            slot = c.values[j][0]
            values = list(c.values)
            values[j] = (slot, self._value(slot, rng))
            clauses[i] = dataclasses.replace(c, values=tuple(values))
        elif op in ("phrase", "word", "drop_word"):
            words = c.text().split()
            k = rng.randrange(len(words))
            tail = re.search(r"[,.:!?]*$", words[k]).group()
            if op == "drop_word" and len(words) > 3:
                del words[k]
                if k == len(words) and tail:  # the sentence's last word went: keep its full stop
                    words[-1] = words[-1].rstrip(",.:!?") + tail
            else:
                words[k] = rng.choice(self.lexicon.words) + tail
            clauses[i] = Clause(words=tuple(words))
        elif op == "add" and len(clauses) < self.max_clauses:
            clauses.insert(rng.randint(0, len(clauses)), self._fresh_clause(rng))
        elif op == "add":
            clauses[i] = self._fresh_clause(rng)
        elif op == "retemplate":
            clauses[i] = self._fill(rng.choice(self.lexicon.templates), rng, dict(c.values))
        elif op == "drop":
            del clauses[i]
        elif op == "reorder":
            j = rng.randrange(len(clauses))
            clauses[i], clauses[j] = clauses[j], clauses[i]
        return clauses
