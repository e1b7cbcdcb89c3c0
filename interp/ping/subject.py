"""What the PING study needs to know about a model pair and its task world: a :class:`Subject`.

The PING package knows no particular model. Each built-in model registers a factory for its
subject under its name (the organism as ``"organism"``, SmolLM2 as ``"smollm2"``) when it is
imported, and ``python -m interp.ping --subject NAME`` looks it up here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from interp.behavior import Environment
from interp.ping.loop import PrefixGenerator
from interp.transcripts import Transcript

Split = str  # "train", "validation" or "test"


@dataclass(frozen=True)
class Subject:
    """An aligned and a fine-tuned model (names or paths :func:`interp.models.load_model` takes),
    the environment that judges their tasks, and the subject-specific inputs of the study.

    - ``tasks(split, n_per_label, seed)``: labelled transcripts of a split (``n_per_label`` of
      each label drawn with ``seed``; 0 or less: the whole split);
    - ``generator``: the offline prefix generator of the search;
    - ``demonstrations(seed)``: whole example trajectories for the few-shot baseline;
    - ``safety_preamble`` / ``neutral_opening``: hand-written openings the models never saw;
    - ``seen_in_training(prefix)``: whether a prefix occurs in the training data (a record);
    - ``tool_intent_tasks(split, n_per_label, seed)``: the same kind of tasks with the request
      carried by a tool observation instead of the user turn (the guard study's robustness check);
    - ``settings``: what identifies the subject (checkpoints, fingerprints...), recorded with a
      run and checked when it resumes; ``fingerprints``: one per model, keys of cached results.
    """

    name: str
    aligned: str
    finetuned: str
    env: Environment
    tasks: Callable[[Split, int, int], list[Transcript]]
    generator: PrefixGenerator
    demonstrations: Callable[[int], list[Transcript]]
    safety_preamble: str
    neutral_opening: str
    seen_in_training: Callable[[str], Mapping[str, Any]] | None = None
    tool_intent_tasks: Callable[[Split, int, int], list[Transcript]] | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    fingerprints: Mapping[str, str] = field(default_factory=dict)


SubjectFactory = Callable[..., Subject]
"""Builds a subject; called with ``checkpoints`` (a folder or None) and ``world_seed`` (or None)."""

_SUBJECTS: dict[str, SubjectFactory] = {}


def register_subject(name: str, factory: SubjectFactory) -> None:
    """Make ``python -m interp.ping --subject NAME`` use ``factory``."""
    _SUBJECTS[name] = factory


def subject_names() -> tuple[str, ...]:
    return tuple(_SUBJECTS)


def make_subject(name: str, **options: Any) -> Subject:
    """The registered subject ``name`` built with ``options``."""
    if name not in _SUBJECTS:
        raise ValueError(f"unknown PING subject {name!r} (registered: {', '.join(_SUBJECTS) or 'none'})")
    return _SUBJECTS[name](**options)
