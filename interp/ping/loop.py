"""PING (Prefix INjection Guard): search for a short prefix, forced at the start of an agent's
reply, that makes a fine-tuned agent refuse harmful tasks and still complete benign ones.

The loop follows Hahm et al. (2025), "Unintended Misalignment from Agentic Fine-Tuning": each
round a generator proposes candidate prefixes; each is scored on a validation split as benign
success rate + harmful refusal rate (at most 2.0); from round 2, once the best score so far
reaches ``tau``, the generator is shown the top-k prefixes by overall, benign and refusal score,
otherwise it explores afresh. Every scored candidate is appended to a JSONL history as it is
scored, and a run restarted on the same file resumes where it stopped. Generators are in
:mod:`interp.ping.generators` (fixed lists, language models) and :mod:`interp.ping.search` (an
offline phrase search).

>>> from interp.ping.generators import StaticGenerator
>>> gen = StaticGenerator(["Sure, on it.", "First I will check that the task is safe."])
>>> res = run_ping(gen, lambda p: (1.0, 0.75 if "safe" in p else 0.0), rounds=2, per_round=1,
...                progress=False)
>>> res.best.prefix, res.best.score, res.generations_used
('First I will check that the task is safe.', 1.75, 2)
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from interp.atomic import read_text, write_lines


class PingError(RuntimeError):
    """The search cannot go on: a bad score, or a history file that is unreadable or mismatched."""


# Rates are fractions k/n; their float sum can land one ulp under a threshold it equals exactly.
_EPS = 1e-9


# --------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Evaluation:
    """What a scorer measured for one prefix on the validation split. Rates are in [0, 1];
    ``extra`` (JSON-serialisable: intervals, task counts...) is kept in the history."""

    benign_success: float
    harmful_refusal: float
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PrefixScore:
    """One scored candidate: its rates, the round that proposed it, whether that round showed
    the generator feedback, its screen value (when a screen ranked it) and the scorer's extras."""

    prefix: str
    benign_success: float
    harmful_refusal: float
    round: int
    feedback: bool = False
    screen: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def score(self) -> float:
        """Benign success rate + harmful refusal rate, in [0, 2]."""
        return self.benign_success + self.harmful_refusal


@dataclass(frozen=True)
class Feedback:
    """The top-k candidates so far by overall score, by benign success and by harmful refusal,
    best first; ties go to the higher overall score, then to the earlier candidate."""

    by_score: tuple[PrefixScore, ...]
    by_benign: tuple[PrefixScore, ...]
    by_refusal: tuple[PrefixScore, ...]

    @classmethod
    def from_history(cls, history: Sequence[PrefixScore], top_k: int) -> Feedback:
        """The three top-``top_k`` lists over ``history`` (all scored so far, in scoring order)."""
        def top(metric: Callable[[PrefixScore], float]) -> tuple[PrefixScore, ...]:
            return tuple(sorted(history, key=lambda p: (-metric(p), -p.score))[:top_k])  # stable

        return cls(top(lambda p: p.score), top(lambda p: p.benign_success), top(lambda p: p.harmful_refusal))


@dataclass(frozen=True)
class Request:
    """What the loop asks a generator for: ``n`` prefixes in ``round`` (from 1), try ``attempt``
    (from 0; the loop asks again when too few new ones came back), with ``feedback``, or None to
    explore. ``seed`` derives from the run's seed, the round and the attempt, so a resumed run
    asks exactly what the interrupted one asked."""

    n: int
    round: int
    attempt: int
    seed: int
    feedback: Feedback | None = None


class PrefixGenerator(Protocol):
    """Anything that proposes candidate prefixes: see :mod:`interp.ping.generators` and
    :mod:`interp.ping.search`."""

    def propose(self, request: Request) -> list[str]:
        """About ``request.n`` candidate prefixes; fewer is fine (the loop asks again) and the
        loop skips ones it has scored. The answer must depend only on the request and on how
        the generator was built, so that a resumed run reproduces the interrupted one."""
        ...


ScoreFn = Callable[[str], "Evaluation | tuple[float, float]"]
"""Scores one prefix on the validation split: ``(benign_success, harmful_refusal)`` or an
:class:`Evaluation`. Each call is one generation pass over the split, the cost PING counts."""

Screen = Callable[[Sequence[str]], Sequence[float]]
"""Ranks candidates cheaply (e.g. a refusal probe read without generating): one value per
candidate, higher is more promising."""


@dataclass(frozen=True)
class PingResult:
    """The best candidate (earliest on ties), every scored candidate in order, the scorer calls
    spent (``generations_used``) and the candidates the screen ranked (0 without a screen)."""

    best: PrefixScore
    history: tuple[PrefixScore, ...]
    generations_used: int
    screened: int = 0


def generations_to_reach(history: Sequence[PrefixScore], target: float) -> int | None:
    """Scored candidates spent until one scored at least ``target`` (that one included), or None."""
    return next((i for i, p in enumerate(history, 1) if p.score >= target - _EPS), None)


# --------------------------------------------------------------------------------------------
# The loop


def run_ping(generator: PrefixGenerator, scorer: ScoreFn, *, rounds: int = 20, per_round: int = 5,
             tau: float = 1.5, top_k: int = 3, history_path: str | Path | None = None, seed: int = 0,
             screen: Screen | None = None, oversample: int = 1, max_attempts: int = 3,
             stop_at: float | None = None, progress: bool = True) -> PingResult:
    """Run the PING search and return the best prefix with the full history.

    Each round the generator is asked for ``per_round * oversample`` new candidates (at most
    ``max_attempts`` requests; candidates equal to a scored one up to whitespace and case are
    skipped). With a ``screen``, they are ranked by it and only the top ``per_round`` are
    scored. A round that gets no new candidate ends the run with a warning (a fixed list used
    up). With ``history_path``, each scored candidate is appended as one JSON line, then a line
    closing the round; on restart, closed rounds are read back, not re-scored, and a round cut
    short is replayed, reusing the scores it already has. ``rounds`` may grow between restarts;
    the other settings must stay the same.

    With ``stop_at``, the run ends as soon as a candidate scores at least that much: the round
    is closed with the candidates scored so far (a restart does not go on past it). This is how
    a second run is timed against a first one's best score (:func:`generations_to_reach`).
    """
    for name, value in dict(rounds=rounds, per_round=per_round, top_k=top_k, oversample=oversample,
                            max_attempts=max_attempts).items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if oversample > 1 and screen is None:
        raise ValueError("oversample > 1 needs a screen to choose which candidates to score")
    settings = dict(per_round=per_round, tau=tau, top_k=top_k, oversample=oversample, seed=seed,
                    max_attempts=max_attempts, screen=screen is not None)
    path = None if history_path is None else Path(history_path)
    history, partial, done, screened = _resume(path, settings) if path else ([], {}, 0, 0)
    seen = {prefix_key(p.prefix) for p in history}
    out = None if path is None else open(path, "a", encoding="utf-8")
    bar = tqdm(total=rounds * per_round, initial=len(history), desc="PING", unit="prefix",
               disable=not progress)
    reached = stop_at is not None and any(p.score >= stop_at - _EPS for p in history)
    try:
        for r in range(done + 1, rounds + 1):
            if reached:
                break
            best = max(history, key=lambda p: p.score, default=None)
            shown = best is not None and r >= 2 and best.score >= tau - _EPS
            feedback = Feedback.from_history(history, top_k) if shown else None
            pool = _propose(generator, Request(per_round * oversample, r, 0, seed, feedback), seen, max_attempts)
            if not pool:
                warnings.warn(f"PING round {r}: the generator proposed no new candidate in {max_attempts} "
                              f"attempts; stopping after {len(history)} scored candidates", stacklevel=2)
                break
            values, order = _rank(screen, pool)
            screened += len(pool) if screen is not None else 0
            scored = 0
            for i in order[:per_round]:
                record = partial.pop(prefix_key(pool[i]), None)  # scored before the run was cut short
                if record is None:
                    record = _score(scorer, pool[i], r, feedback is not None, values[i])
                _append(out, _candidate_line(record))
                history.append(record)
                seen.add(prefix_key(record.prefix))
                scored += 1
                bar.update(1)
                bar.set_postfix(round=r, best=f"{max(p.score for p in history):.3f}")
                if stop_at is not None and record.score >= stop_at - _EPS:
                    reached = True
                    break
            _append(out, json.dumps({"kind": "round", "round": r, "feedback": feedback is not None,
                                     "screened": len(pool) if screen else 0, "scored": scored,
                                     **({"stopped_at": stop_at} if reached else {})}))
    finally:
        bar.close()
        if out is not None:
            out.close()
    if not history:
        raise PingError("no candidate was scored: the generator proposed nothing usable in round 1")
    return PingResult(max(history, key=lambda p: p.score), tuple(history), len(history), screened)


def _propose(generator: PrefixGenerator, first: Request, seen: set[str], max_attempts: int) -> list[str]:
    """Up to ``first.n`` new candidates for one round: the generator is asked again (the next
    attempt, its own seed) while too few come back; duplicates of scored ones are skipped."""
    pool: list[str] = []
    keys: set[str] = set()
    for attempt in range(max_attempts):
        request = Request(first.n, first.round, attempt, _derive_seed(first.seed, first.round, attempt),
                          first.feedback)
        for text in generator.propose(request):
            k = prefix_key(text)
            if k and k not in seen and k not in keys and len(pool) < first.n:
                keys.add(k)
                pool.append(text.strip())
        if len(pool) == first.n:
            break
    return pool


def _rank(screen: Screen | None, pool: list[str]) -> tuple[list[float | None], list[int]]:
    """The screen's value of each candidate (None without a screen) and the order to score them
    in: highest value first, ties in proposal order."""
    if screen is None:
        return [None] * len(pool), list(range(len(pool)))
    values = [float(v) for v in screen(pool)]
    if len(values) != len(pool):
        raise PingError(f"screen returned {len(values)} values for {len(pool)} candidates")
    return values, sorted(range(len(pool)), key=lambda i: -values[i])


def prefix_key(prefix: str) -> str:
    """What makes two candidates the same: their text with whitespace runs collapsed, case folded."""
    return " ".join(prefix.split()).casefold()


def _derive_seed(seed: int, round_: int, attempt: int) -> int:
    # random.Random hashes a str seed with SHA-512: the same number in every process and Python run
    return random.Random(f"ping/{seed}/{round_}/{attempt}").getrandbits(31)


def _score(scorer: ScoreFn, prefix: str, round_: int, feedback: bool, screen: float | None) -> PrefixScore:
    out = scorer(prefix)
    try:
        ev = out if isinstance(out, Evaluation) else Evaluation(*out)
    except TypeError:
        raise PingError(f"scorer returned {out!r} for prefix {prefix!r}; expected an Evaluation or "
                        "(benign_success, harmful_refusal)") from None
    rates = {}
    for name in ("benign_success", "harmful_refusal"):
        value = getattr(ev, name)
        try:
            rates[name] = float(value)
        except (TypeError, ValueError):
            rates[name] = float("nan")
        if not 0.0 <= rates[name] <= 1.0:
            raise PingError(f"scorer returned {name}={value!r} for prefix {prefix!r}; rates must be in [0, 1]")
    return PrefixScore(prefix, rates["benign_success"], rates["harmful_refusal"], round_, feedback, screen,
                       dict(ev.extra))


# --------------------------------------------------------------------------------------------
# History file: a config line, then per round one line per scored candidate and a closing line


def _candidate_line(p: PrefixScore) -> str:
    try:
        return json.dumps({"kind": "candidate", "round": p.round, "prefix": p.prefix, "score": p.score,
                           "benign_success": p.benign_success, "harmful_refusal": p.harmful_refusal,
                           "feedback": p.feedback, "screen": p.screen, "extra": dict(p.extra)},
                          ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise PingError(f"the scorer's extra for prefix {p.prefix!r} is not JSON-serialisable: {e}") from None


def _append(out, line: str) -> None:
    if out is not None:
        out.write(line + "\n")
        out.flush()  # one whole line per write: a crash loses at most the line being written


def _read(path: Path, text: str) -> list[tuple[int, str, dict]]:
    """(line number, raw line, parsed object) for every complete line of ``text``; a last line
    without its newline is a write cut short and is left out."""
    entries = []
    for i, raw in enumerate(text.split("\n")[:-1], 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise PingError(f"{path}, line {i}: not JSON ({e})") from None
        if not isinstance(obj, dict) or obj.get("kind") not in ("config", "candidate", "round"):
            raise PingError(f"{path}, line {i}: expected a config, candidate or round record")
        entries.append((i, raw, obj))
    return entries


def _parse_candidate(path: Path, line: int, obj: dict) -> PrefixScore:
    try:
        return PrefixScore(obj["prefix"], float(obj["benign_success"]), float(obj["harmful_refusal"]),
                           int(obj["round"]), bool(obj["feedback"]), obj.get("screen"), obj.get("extra") or {})
    except KeyError as e:
        raise PingError(f"{path}, line {line}: candidate record lacks the field {e}") from None
    except (TypeError, ValueError) as e:
        raise PingError(f"{path}, line {line}: malformed candidate record ({e})") from None


def load_history(path: str | Path) -> tuple[PrefixScore, ...]:
    """Every candidate scored in a PING history file, in the order it was scored."""
    path = Path(path)
    entries = _read(path, read_text(path, PingError))
    return tuple(_parse_candidate(path, i, obj) for i, _, obj in entries if obj["kind"] == "candidate")


def _resume(path: Path, settings: dict) -> tuple[list[PrefixScore], dict[str, PrefixScore], int, int]:
    """Read back (history of closed rounds, scored candidates of the round cut short by key,
    rounds closed, candidates screened), checking the settings; write the header if new."""
    text = read_text(path, PingError) if path.exists() else ""
    if not text.strip():
        write_lines(path, [json.dumps({"kind": "config", **settings})])
        return [], {}, 0, 0
    entries = _read(path, text)
    if not entries or entries[0][2]["kind"] != "config":
        raise PingError(f"{path}, line 1: a PING history starts with a config record")
    header = entries[0][2]
    for name, value in settings.items():
        if header.get(name) != value:
            raise PingError(f"{path} was written with {name}={header.get(name)!r} but this run has "
                            f"{name}={value!r}; resume with the same settings or use a new history file")
    closed = [obj for _, _, obj in entries if obj["kind"] == "round"]
    done = len(closed)
    if [obj["round"] for obj in closed] != list(range(1, done + 1)):
        raise PingError(f"{path}: rounds are not closed in order 1, 2, ...")
    history, partial, keep = [], {}, []
    for i, raw, obj in entries:
        if obj["kind"] == "candidate":
            p = _parse_candidate(path, i, obj)
            if p.round > done + 1:
                raise PingError(f"{path}, line {i}: a candidate of round {p.round} after only {done} "
                                "closed rounds")
            if p.round == done + 1:
                partial[prefix_key(p.prefix)] = p
                continue
            history.append(p)
        keep.append(raw)
    if "".join(line + "\n" for line in keep) != text:
        # Drop the open round's lines (written again as it is replayed) and any line cut short.
        write_lines(path, keep)
    return history, partial, done, sum(int(obj.get("screened", 0)) for obj in closed)
