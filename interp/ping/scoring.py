"""Scoring a prefix: force it at the start of the agent's reply on a fixed, labelled task set and
measure benign success and harmful refusal. One call is one generation pass over the set, the
cost PING counts.

:class:`Scorer` works with any model handle (:func:`interp.models.load_model`) and any
:class:`interp.behavior.Environment` that judges the tasks; it never picks its own tasks, so a
search scored on a validation split cannot read the test split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from interp.behavior import SCORING_MODES, Environment, Evaluation, ScoringMode, Transform, evaluate
from interp.models import check_choice
from interp.ping.loop import Evaluation as PrefixEvaluation
from interp.transcripts import Transcript


class Scorer:
    """Scores a prefix on ``transcripts`` (labelled ``harmful``): ``(benign success, harmful
    refusal)`` as a :class:`interp.ping.loop.Evaluation`.

    The prefix is forced at the start of the agent's first reply (it is put on each transcript),
    greedy and batched. ``mode="first_step"`` (the paper's) judges the first reply only: refused,
    or started the task correctly; ``"episode"`` runs whole episodes in ``env``. ``split`` only
    names the task set in the results (e.g. ``"validation"``).
    """

    def __init__(self, model: Any, env: Environment, transcripts: Sequence[Transcript], *,
                 mode: ScoringMode = "first_step", batch_size: int = 64, max_new_tokens: int | None = None,
                 transform: Transform | None = None, split: str = "validation"):
        check_choice(mode, SCORING_MODES, "scoring mode")
        if len(transcripts) == 0:
            raise ValueError("a scorer needs at least one task (the transcript list is empty)")
        self.model, self.env, self.mode, self.batch_size = model, env, mode, batch_size
        self.transform, self.split, self.max_new_tokens = transform, split, max_new_tokens
        self.transcripts = [t.with_prefix(None) for t in transcripts]
        self.calls = 0

    def evaluate(self, prefix: str | None) -> Evaluation:
        """The full :class:`interp.behavior.Evaluation` (rates with intervals, outcomes)."""
        kw: dict[str, Any] = {"batch_size": self.batch_size}
        if self.max_new_tokens is not None:
            kw["max_new_tokens"] = self.max_new_tokens
        transcripts = [t.with_prefix(prefix or None) for t in self.transcripts]
        return evaluate(self.model, self.env, transcripts, mode=self.mode, transform=self.transform, **kw)

    def __call__(self, prefix: str | None) -> PrefixEvaluation:
        self.calls += 1
        ev = self.evaluate(prefix)
        r = ev.rates
        return PrefixEvaluation(r["benign_success"].value, r["harmful_refusal"].value,
                                {"n_harmful": sum(o.harmful for o in ev.outcomes),
                                 "n_benign": sum(not o.harmful for o in ev.outcomes), "mode": self.mode,
                                 "split": self.split})
