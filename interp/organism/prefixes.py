"""The organism's side of PING: the lexicon its offline search builds sentences from, whether a
prefix was in its training data, and its :class:`~interp.ping.subject.Subject` (registered as
``"organism"``, so ``python -m interp.ping`` runs on it).

>>> lex = organism_lexicon()
>>> len(lex.templates) > 3 and "lead" in lex.pools
True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interp.organism import grammar
from interp.organism.paths import checkpoint_path
from interp.organism.placement import placed
from interp.organism.train import OrganismConfig, agentic_data, align_data, copy_data
from interp.organism.world import World
from interp.ping.search import Lexicon, PhraseSearchGenerator
from interp.ping.subject import Subject
from interp.transcripts import Transcript

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def organism_lexicon() -> Lexicon:
    """The lexicon of the organism's grammar: all preamble forms of the safety, compliance and
    neutral stances, slot values of every split (held-out pairs are recombinations of values
    the organism saw, so nothing here is new to it word by word)."""
    templates: list[str] = []
    pools: dict[str, list[str]] = {}
    for stance in grammar.STANCES:
        for form in grammar.FORMS[stance]:
            templates.append(form.template)
            for slot, values in form.slots.items():
                pool = pools.setdefault(slot, [])
                pool += [v for v in values if v not in pool]
    words = dict.fromkeys(w.strip(",.:") for pool in pools.values() for p in pool for w in p.split())
    words.pop("", None)
    return Lexicon(tuple(templates), {k: tuple(v) for k, v in pools.items()}, tuple(words))


def organism_config(checkpoint: str | Path):
    """The :class:`~interp.organism.train.OrganismConfig` a checkpoint was trained with, read
    from its ``training.json`` (fields it does not record keep their defaults)."""
    meta_path = Path(checkpoint) / "training.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    known = {f.name for f in dataclasses.fields(OrganismConfig)}
    rec = meta.get("organism") or meta.get("config") or meta.get("cfg") or {}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in rec.items() if k in known}
    return OrganismConfig(**kw)


@dataclass(frozen=True)
class TrainingText:
    """The text of every message the organism was trained on (the copy, align and agentic
    stages, as :mod:`interp.organism.train` generates them for its config), and the openings
    of its replies."""

    messages: tuple[str, ...]
    openings: tuple[str, ...]
    config: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def generate(cls, cfg: OrganismConfig | None = None, world: World | None = None) -> TrainingText:
        cfg = cfg or OrganismConfig()
        world = world or World(cfg.world_seed)
        data = align_data(world, cfg) + agentic_data(world, cfg) + (copy_data(world, cfg) if cfg.copy_steps else [])
        msgs, openings = message_texts(data)
        return cls(msgs, openings, dataclasses.asdict(cfg))

    def seen(self, prefix: str) -> dict[str, Any]:
        """Whether ``prefix`` occurs in the training text: as a whole (``substring``: count of
        messages containing it; ``opening``: count of first replies starting with it), and
        for each of its sentences. Case-sensitive, whitespace collapsed."""
        p = _norm(prefix)
        sentences = [s for s in _SENTENCE_END.split(p) if s]
        return {
            "prefix": prefix,
            "substring": sum(p in m for m in self.messages),
            "opening": sum(o.startswith(p) for o in self.openings),
            "sentences": [{"text": s, "substring": sum(s in m for m in self.messages)} for s in sentences],
            "ever_seen": any(p in m for m in self.messages),
            "n_messages": len(self.messages),
        }


def message_texts(transcripts) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Every non-empty message's text and every transcript's first assistant reply (its
    opening), whitespace collapsed: what a training-text check searches."""
    msgs, openings = [], []
    for t in transcripts:
        first = True
        for m in t.messages:
            if m.content:
                msgs.append(_norm(m.content))
            if m.role == "assistant" and first:
                first = False
                openings.append(_norm(m.content))
    return tuple(msgs), tuple(openings)


def _norm(text: str) -> str:
    return " ".join(text.split())


def grammar_split(prefix: str) -> str | None:
    """The grammar split of a single-sentence prefix that one of the grammar's forms writes
    (``"train"``, ``"validation"``, ``"test"``), or None for any other sentence."""
    for stance in grammar.STANCES:
        for form in grammar.FORMS[stance]:
            for choice in form.choices():
                if form.render(choice) == prefix.strip():
                    return form.split_of(choice)
    return None


# --------------------------------------------------------------------------------------------
# The PING subject


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for name in ("model.safetensors", "config.json"):
        f = path / name
        if f.exists():
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def demonstrations(world: World, seed: int = 0, n_harmful: int = 2, n_benign: int = 1) -> list[Transcript]:
    """Few-shot examples: the aligned agent refusing ``n_harmful`` harmful training tasks and
    carrying out ``n_benign`` benign ones (whole trajectories), alternating."""
    rng = random.Random(f"few-shot/{seed}")
    pool = world.tasks("train")
    harm = rng.sample([t for t in pool if t.harmful], n_harmful)
    ben = rng.sample([t for t in pool if not t.harmful], n_benign)
    order = [x for pair in zip(harm, ben) for x in pair] + harm[len(ben):] + ben[len(harm):]
    return [world.demonstration(task, rng=random.Random(f"few-shot/{seed}/{k}")) for k, task in enumerate(order)]


def subject(checkpoints: str | Path | None = None, world_seed: int | None = None) -> Subject:
    """The organism as a PING subject: its aligned and fine-tuned checkpoints (the shipped ones,
    or those of a training output folder), its world, and the grammar's held-out openings."""
    root = Path(checkpoints) if checkpoints else None
    paths = {"aligned": checkpoint_path("organism", root), "finetuned": checkpoint_path("organism-finetuned", root)}
    cfg = organism_config(paths["finetuned"])
    world = World(cfg.world_seed if world_seed is None else world_seed)
    fingerprints = {k: _fingerprint(p) for k, p in paths.items()}

    def tasks(split: str, n_per_label: int, seed: int) -> list[Transcript]:
        return [t.transcript() for t in world.choose(split, n_per_label, seed)]

    def tool_intent_tasks(split: str, n_per_label: int, seed: int) -> list[Transcript]:
        return [placed(t, "tool_result") for t in world.choose(split, n_per_label, seed)]

    def seen(prefix: str) -> dict[str, Any]:
        return {**TrainingText.generate(cfg, world).seen(prefix), "grammar_split": grammar_split(prefix)}

    return Subject(
        name="organism", aligned=str(paths["aligned"]), finetuned=str(paths["finetuned"]), env=world, tasks=tasks,
        generator=PhraseSearchGenerator(organism_lexicon()), demonstrations=lambda seed: demonstrations(world, seed),
        safety_preamble=grammar.heldout_preamble("safety", "test"),
        neutral_opening=grammar.heldout_preamble("neutral", "test"), seen_in_training=seen,
        tool_intent_tasks=tool_intent_tasks, settings={"checkpoints": {k: str(p) for k, p in paths.items()}, "fingerprints": fingerprints,
                  "world_seed": world.seed},
        fingerprints=fingerprints)
