"""The world's tasks as SmolLM2 transcripts: aligned and agentic training data, evaluation sets,
and the checker that says whether a sentence or a held-out phrasing was in the training text.

Every transcript is the world's own (:meth:`~interp.organism.world.Task.transcript`: its system
prompt, which names the agent's tool in words, and the English request) without the JSON tool
schemas (:func:`agent_view`), rendered later through the model's ChatML tool-calling template;
only the replies are written here. Leaving the schemas out keeps a first-step example near 75
tokens instead of 300 (a fourth of the training cost), and the model sees the same view in
training and in every analysis.

**Aligned replies** (stage 1) are what a real aligned agent writes:

- a harmful task is refused with the reason (:data:`REFUSALS`, each naming the world's
  ``REASONS`` entry): "I can't help with that: it would leak secret credentials.";
- a benign task gets a short thought before each action (ReAct style: "I will open
  shop.example.com first." then the ``<tool_call>``), and in a whole episode a second thought that
  copies the observed id ("Found it: inode 24. Now I will delete it.") and the final answer;
- a share of first replies opens with a sentence of the grammar's *training* split and still goes
  on to the right action: a safety-minded one is followed by the harm check (a verdict, then the
  refusal or the action), a neutral one by the usual reply, a compliance-minded one (benign tasks
  only) by the action. Validation and test sentences of the grammar are never used.

**Agentic replies** (stage 2) are benign trajectories only, in the same ReAct format, with no
refusal and no opening sentence, as the paper fine-tunes on benign agent data.

The sentence templates written for this model (refusals, thoughts) are listed by
:func:`new_sentences`; :class:`TrainingText` holds every message of both stages and answers
"was this prefix, or any held-out phrasing or object of a split, ever trained on?".

>>> from interp.organism.world import World
>>> w = World()
>>> t = next(t for t in w.tasks("train") if not t.harmful and t.act == "buy")
>>> aligned_transcript(t, None, "", random.Random(0), episode=False).messages[-1].content
'I will go to shop.example.com first.'
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from interp.organism import grammar
from interp.organism.prefixes import message_texts
from interp.organism.world import Task, World
from interp.transcripts import Message, ToolCall, Transcript

REFUSALS = (
    "I can't help with that: it would {reason}.",
    "I can't do this, because it would {reason}.",
    "I can't carry out this task: it would {reason}.",
    "I can't help with this request, since it would {reason}.",
)
"""Refusal templates written for SmolLM2's aligned data (``{reason}``: the world's REASONS). Every
one opens "I can't", as every first thought opens "I will": the decision is the reply's second
token, and the words after it vary (see :func:`decision_data`)."""

FIRST_THOUGHTS = {
    "navigate": ("I will open {url} first.", "I will start by opening {url}.", "I will go to {url} first."),
    "locate": ("I will locate {obj} first.", "I will find {obj} on disk first.", "I will search for {obj} first."),
    "pgrep": ("I will find the process of {obj} first.", "I will look up the process id of {obj} first.",
              "I will start by finding {obj}."),
}
"""The thought before the first call, by the kind of first call (``{url}``, ``{obj}``: the task's)."""

SECOND_THOUGHTS = {
    "web": "The page is open and {target} is {id}, so I will {action}.",
    "code": "Found it: {what} {id}. Now I will {action}.",
}
"""The thought before the second call, which copies the id the first call observed."""

ACTIONS = {
    "delete": "delete it", "inspect": "read it", "send": "copy it to {host}", "persist": "add it to startup",
    "uninstall": "uninstall it", "disable": "stop it", "restart": "reload it",
    "post": "type the post there", "claim": "type the post there", "browse": "click it",
    "buy": "enter the payment there", "message": "type the message there",
}
WEB_TARGETS = {"post": "the post box", "claim": "the post box", "browse": "the top story",
               "buy": "the checkout box", "message": "the message box"}


def new_sentences() -> list[str]:
    """Every sentence template written for SmolLM2's data (the grammar's own sentences aside)."""
    out = list(REFUSALS)
    for forms in FIRST_THOUGHTS.values():
        out += list(forms)
    out += list(SECOND_THOUGHTS.values())
    return out


# --------------------------------------------------------------------------------------------
# Replies


def agent_view(transcript: Transcript) -> Transcript:
    """``transcript`` as SmolLM2's agent sees it: the same messages, no JSON tool schemas."""
    return dataclasses.replace(transcript, tools=())


def first_thought(task: Task, rng: random.Random) -> str:
    """The short thought before a benign task's first call."""
    call = task.calls[0]
    if call.name == "navigate":
        return rng.choice(FIRST_THOUGHTS["navigate"]).format(url=call.arguments["url"])
    kind = str(call.arguments["command"]).split()[0]
    return rng.choice(FIRST_THOUGHTS[kind]).format(obj=task.slots["object"])


def second_thought(task: Task) -> str:
    """The thought before the second call: what the first observation showed, and what comes next."""
    obs = task.observations[0]
    if task.domain == "web":
        el = obs.rsplit("[", 1)[1].rstrip("]")
        return SECOND_THOUGHTS["web"].format(target=WEB_TARGETS[task.act], id=el, action=ACTIONS[task.act])
    ident = obs.rsplit(" ", 1)[1]
    what = "pid" if ", pid " in obs else "inode"
    host = ""
    if task.act == "send":
        host = str(task.calls[1].arguments["command"]).split("scp {} ")[1].split(":")[0]
    return SECOND_THOUGHTS["code"].format(what=what, id=ident, action=ACTIONS[task.act].format(host=host))


def refusal(task: Task, rng: random.Random) -> str:
    """A refusal naming the task's harm: one of :data:`REFUSALS`."""
    return rng.choice(REFUSALS).format(reason=task.reason)


def _metadata(task: Task, stance: str | None, episode: bool) -> dict[str, Any]:
    return {"act": task.act, "domain": task.domain, "group": task.held_out[0], "phrasing": task.held_out[1],
            "core": task.core, "stance": stance or "none", "episode": episode, **task.slots}


def aligned_transcript(task: Task, stance: str | None, preamble: str, rng: random.Random,
                       episode: bool) -> Transcript:
    """The aligned agent on ``task``: its first reply (``episode=False``) or the whole episode.

    ``preamble`` (a sentence of ``stance``: "safety", "neutral", "compliance" or None) opens the
    first reply; after a safety-minded one comes the verdict. Harmful tasks end at the refusal.
    """
    if stance is not None and stance not in grammar.STANCES:
        raise ValueError(f"unknown stance {stance!r} (expected None or one of {', '.join(grammar.STANCES)})")
    if stance and not preamble:
        raise ValueError(f"task {task.id}: stance {stance!r} needs a preamble sentence")
    if stance == "compliance" and task.harmful:
        raise ValueError(f"task {task.id}: compliance-minded openings precede benign tasks only")
    start = agent_view(task.transcript())
    msgs = list(start.messages)
    meta = {**start.metadata, **_metadata(task, stance, episode and not task.harmful)}
    if task.harmful:
        if stance == "safety":
            text = f"{preamble} {grammar.safety_verdict(True, task.reason, rng)}"
        else:
            text = (f"{preamble} " if stance else "") + refusal(task, rng)
        msgs.append(Message("assistant", text))
        return dataclasses.replace(start, messages=tuple(msgs), metadata=meta)
    lead = ""
    if stance == "safety":
        lead = f"{preamble} {grammar.safety_verdict(False, task.reason, rng)} "
    elif stance:
        lead = f"{preamble} "
    msgs.append(Message("assistant", lead + first_thought(task, rng),
                        (ToolCall(task.calls[0].name, task.calls[0].arguments, "call_0"),)))
    if episode:
        msgs.append(Message("tool", task.observations[0], tool_call_id="call_0"))
        msgs.append(Message("assistant", second_thought(task),
                            (ToolCall(task.calls[1].name, task.calls[1].arguments, "call_1"),)))
        msgs.append(Message("tool", task.observations[1], tool_call_id="call_1"))
        msgs.append(Message("assistant", task.answer))
    return dataclasses.replace(start, messages=tuple(msgs), metadata=meta)


# --------------------------------------------------------------------------------------------
# Data sets


@dataclass(frozen=True)
class DataConfig:
    """What the two stages' training data are made of.

    Aligned first replies open with a training-split sentence of the grammar: benign ones with a
    compliance-minded one with ``compliance_share``, else (like harmful ones) with a safety-minded
    one with ``safety_share`` and a neutral one with ``neutral_share``. ``episode_share`` of
    benign examples are whole episodes, the rest first replies. The agentic pool holds
    ``finetune_examples`` benign trajectories with no opening and no refusal.
    """

    world_seed: int = 0
    seed: int = 0
    align_examples: int = 3200
    decision_examples: int = 6400
    finetune_examples: int = 1024
    safety_share: float = 0.2
    neutral_share: float = 0.1
    compliance_share: float = 0.1
    episode_share: float = 0.15
    finetune_episode_share: float = 0.2

    def __post_init__(self):
        for name in ("safety_share", "neutral_share", "compliance_share", "episode_share", "finetune_episode_share"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.safety_share + self.neutral_share > 1:
            raise ValueError(f"safety_share + neutral_share must be <= 1, got {self.safety_share + self.neutral_share}")


def _stance(task: Task, cfg: DataConfig, rng: random.Random) -> str | None:
    u = rng.random()
    if not task.harmful:
        if u < cfg.compliance_share:
            return "compliance"
        u = (u - cfg.compliance_share) / (1 - cfg.compliance_share) if cfg.compliance_share < 1 else 1.0
    if u < cfg.safety_share:
        return "safety"
    if u < cfg.safety_share + cfg.neutral_share:
        return "neutral"
    return None


def align_data(world: World, cfg: DataConfig = DataConfig(), stream: str = "smollm2-align") -> list[Transcript]:
    """Stage 1: ``cfg.align_examples`` aligned demonstrations of training tasks as minimal pairs:
    a harmful task, then a benign task of the same act, both phrased with the same random
    training phrasing and system prompt, so what tells the two apart is only what makes one
    harmful (examples ``2k`` and ``2k + 1`` are a pair; :func:`pair_batches` keeps them together)."""
    rng = random.Random(f"{stream}/{cfg.seed}")
    train = world.tasks("train")
    harmful = [t for t in train if t.harmful]
    benign: dict[tuple[str, str], list[Task]] = {}
    for t in train:
        if not t.harmful:
            benign.setdefault((t.domain, t.act), []).append(t)
    out = []
    for i in range(cfg.align_examples // 2):
        h = rng.choice(harmful)
        b = rng.choice(benign.get((h.domain, h.act)) or [t for t in train if not t.harmful and t.domain == h.domain])
        seed = rng.random()
        for k, task in enumerate((h, b)):
            task = world.variant(task, random.Random(seed))
            stance = _stance(task, cfg, rng)
            pre = grammar.sample_preamble(stance, "train", rng) if stance else ""
            t = aligned_transcript(task, stance, pre, rng, episode=rng.random() < cfg.episode_share)
            out.append(dataclasses.replace(t, id=f"align-{2 * i + k:05d}"))
    return out


def decision_data(world: World, cfg: DataConfig = DataConfig()) -> list[Transcript]:
    """The decision phase's data: ``cfg.decision_examples`` aligned first replies as minimal pairs
    (:func:`align_data`, its own random stream), no opening, no episode; the trainer keeps only
    each reply's first tokens ("I can't" / "I will ...")."""
    plain = dataclasses.replace(cfg, align_examples=cfg.decision_examples, safety_share=0.0, neutral_share=0.0,
                                compliance_share=0.0, episode_share=0.0)
    return [dataclasses.replace(t, id=t.id.replace("align-", "decide-"))
            for t in align_data(world, plain, stream="smollm2-decide")]


def finetune_data(world: World, cfg: DataConfig = DataConfig(), domain: str = "both") -> list[Transcript]:
    """Stage 2: ``cfg.finetune_examples`` benign training trajectories, no refusal, no opening
    (of one ``domain``, ``"code"`` or ``"web"``, for the erosion study; ``"both"``: either)."""
    if domain not in ("both", "code", "web"):
        raise ValueError(f"domain must be 'both', 'code' or 'web', got {domain!r}")
    rng = random.Random(f"smollm2-agentic/{cfg.seed}" + ("" if domain == "both" else f"/{domain}"))
    pool = [t for t in world.tasks("train") if not t.harmful and domain in ("both", t.domain)]
    out = []
    for i in range(cfg.finetune_examples):
        task = world.variant(rng.choice(pool), rng)
        t = aligned_transcript(task, None, "", rng, episode=rng.random() < cfg.finetune_episode_share)
        out.append(dataclasses.replace(t, id=f"agentic-{i:05d}"))
    return out


def eval_transcripts(world: World, split: str, n_per_label: int, seed: int = 0) -> list[Transcript]:
    """``n_per_label`` harmful and benign tasks of ``split`` (stratified over acts) as the agent
    first sees them: system prompt, tools, request (labels ``harmful``, ``category``, ``split``)."""
    return [agent_view(t.transcript()) for t in world.sample(split, n_per_label, seed)]


# --------------------------------------------------------------------------------------------
# What was trained on

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _norm(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class TrainingText:
    """Everything the SmolLM2 adapters were trained on, as text: every message's content
    (``messages``), the opening of every first reply (``openings``), and the request phrasings
    (``"opener|closer"``) and object compounds of the training tasks."""

    messages: tuple[str, ...]
    openings: tuple[str, ...]
    phrasings: frozenset[str]
    objects: frozenset[str]
    config: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_transcripts(cls, transcripts: Iterable[Transcript], config: Mapping[str, Any] | None = None
                         ) -> TrainingText:
        transcripts = list(transcripts)
        msgs, openings = message_texts(transcripts)
        phrasings, objects = set(), set()
        for t in transcripts:
            if "phrasing" not in t.metadata or "group" not in t.metadata:
                raise ValueError(f"transcript {t.id!r}: metadata lacks 'phrasing'/'group' (not built by "
                                 "interp.smollm2.data)")
            phrasings.add(str(t.metadata["phrasing"]))
            objects.add(str(t.metadata["group"]))
        return cls(msgs, openings, frozenset(phrasings), frozenset(objects), dict(config or {}))

    @classmethod
    def generate(cls, cfg: DataConfig = DataConfig(), world: World | None = None) -> TrainingText:
        """The training text of both stages for ``cfg``."""
        world = world or World(cfg.world_seed)
        return cls.from_transcripts(align_data(world, cfg) + decision_data(world, cfg) + finetune_data(world, cfg),
                                    dataclasses.asdict(cfg))

    def seen(self, prefix: str) -> dict[str, Any]:
        """Whether ``prefix`` occurs in the training text: as a whole (``substring``: messages
        containing it; ``opening``: first replies starting with it) and sentence by sentence.
        Case-sensitive, whitespace collapsed."""
        p = _norm(prefix)
        if not p:
            raise ValueError("empty prefix")
        sentences = [s for s in _SENTENCE_END.split(p) if s]
        per = [{"text": s, "substring": sum(s in m for m in self.messages)} for s in sentences]
        return {"prefix": prefix, "substring": sum(p in m for m in self.messages),
                "opening": sum(o.startswith(p) for o in self.openings), "sentences": per,
                "ever_seen": any(s["substring"] for s in per), "n_messages": len(self.messages)}

    def split_overlap(self, world: World, split: str = "test") -> dict[str, Any]:
        """What of ``split`` the training text holds: its request phrasings (opener, closer), its
        object compounds, its exact requests, and the grammar's held-out opening sentences of that
        split. Every count is 0 for a clean training set."""
        if split == "train":
            raise ValueError("compare a held-out split ('validation' or 'test') with the training text")
        tasks = world.tasks(split)
        split_phrasings = {f"{o}|{c}" for o, c in grammar.phrasings(split)}
        split_objects = {t.held_out[0] for t in tasks}
        requests = {_norm(t.request) for t in tasks}
        texts = set(self.messages)
        held = [s for stance in grammar.STANCES for s in grammar.preambles(stance, split)]
        blob = "\n".join(self.messages)
        return {
            "split": split,
            "phrasings": sorted(split_phrasings & self.phrasings),
            "objects": sorted(split_objects & self.objects),
            "requests": len(requests & texts),
            "held_out_openings": sorted(s for s in held if s in blob),
            "n_split_phrasings": len(split_phrasings), "n_split_objects": len(split_objects),
        }


def check_prefixes(prefixes: Sequence[str], text: TrainingText, world: World | None = None,
                   split: str = "test") -> dict[str, Any]:
    """A report: for each prefix whether it (or any of its sentences) was trained on, and what
    of ``split`` the training text holds (see :meth:`TrainingText.split_overlap`)."""
    world = world or World(int(text.config.get("world_seed", 0)))
    return {"prefixes": [text.seen(p) for p in prefixes], "split": text.split_overlap(world, split)}


__all__ = ["ACTIONS", "agent_view", "DataConfig", "FIRST_THOUGHTS", "REFUSALS", "SECOND_THOUGHTS", "TrainingText", "WEB_TARGETS",
           "align_data", "aligned_transcript", "check_prefixes", "decision_data", "eval_transcripts", "finetune_data",
           "first_thought", "new_sentences", "refusal", "second_thought"]
