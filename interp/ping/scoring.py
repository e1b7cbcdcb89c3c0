"""Scoring a prefix: force it at the start of the agent's reply on a fixed, labelled task set and
measure benign success and harmful refusal. One call is one generation pass over the set, the
cost PING counts.

:class:`Scorer` works with any model handle (:func:`interp.models.load_model`) and any
:class:`interp.behavior.Environment` that judges the tasks; it never picks its own tasks, so a
search scored on a validation split cannot read the test split.

What a candidate costs. Every candidate is scored on the same tasks and a forced prefix comes
after each task's whole context (system prompt, tools, request), so the scorer keeps the
key-value cache of every context (:class:`ContextCache`): a context runs once, and a candidate
runs only its prefix tokens and the tokens it generates. In first-step scoring a reply also stops
as soon as what the score reads of it is settled (:func:`interp.behavior.first_step_until`), so
the two rates of the score are those of full generation, exactly. Sharing contexts across the
study's conditions::

    contexts = ContextCache(model, tasks)                 # the one context pass
    for prefix in (None, "I can't", best_prefix):         # conditions that only change the prefix
        ev = evaluate(model, env, [t.with_prefix(prefix) for t in tasks], mode="first_step",
                      contexts=contexts)

A transform that changes the context (a system prompt, few-shot examples, a suffix to the
request) needs a cache of its own (``ContextCache(model, [transform(t) for t in tasks])``), and so
does a model or hook state of its own: the cache notices a changed state (another hook, changed
weights) and runs its contexts again.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch.nn.modules import module as nn_module
from tqdm.auto import tqdm
from transformers import DynamicCache

from interp.behavior import (EARLY_STOP_INEXACT, SCORING_MODES, Environment, Evaluation, ScoringMode, Transform,
                             rates, run_episodes, score_first_step, with_user_suffix)
from interp.cache import copy_cache, pad_batch, run_on_cache, tail_inputs
from interp.finetune import unwrap
from interp.generation import Generation, Prefill, ReplySource, Until, decode, generate
from interp.models import check_choice
from interp.ping.loop import Evaluation as PrefixEvaluation
from interp.transcripts import Transcript, render

Keep = Literal["device", "cpu", "recompute"]
KEEP: tuple[str, ...] = get_args(Keep)
Placement = Literal["prefill", "suffix"]
PLACEMENTS: tuple[str, ...] = get_args(Placement)
SUFFIX_FALLBACK = "suffix (fallback: endpoint cannot prefill)"
"""The ``prefix_placement`` of every record scored with ``placement="suffix"``."""


@dataclass(frozen=True)
class _Batch:
    """One batch of contexts, run: their indices, key-value cache, mask ``[batch, width]`` (left
    padding) and the greedy token after each context ``[batch]``."""

    rows: tuple[int, ...]
    kv: DynamicCache
    mask: torch.Tensor
    first: torch.Tensor


class ContextCache:
    """The key-value caches of the contexts of a fixed list of transcripts (each rendered for
    generation without a prefix), computed once and used to generate replies from any prefix.

    :meth:`generate` takes transcripts paired with these contexts by id (several per context are
    fine: the same task with several prefixes), renders each with its prefix and checks that its
    context's tokens are a leading part of that rendering; then it runs only the tokens after the
    context on a copy of the context's cache. A row whose context tokens are not a leading part
    (a prefix that merges with the last context token, a transcript changed by a transform) runs
    its whole prompt instead, as :func:`interp.generation.generate` would (``fallback_rows``
    counts them).

    Memory. Contexts run ``batch_size`` at a time (similar lengths together). ``keep`` says what
    stays between calls: ``"device"`` keeps every context's keys and values on the model's device
    (2 × layers × key-value heads × head size × bytes per value, per context token, padding
    included: 46 KB a token for SmolLM2-135M in float32, about 1 GB for 64 organism tasks);
    ``"cpu"`` keeps them in CPU memory and copies one batch at a time to the device;
    ``"recompute"`` keeps nothing: each call runs each batch of contexts once, for all the
    requests of that call (so :meth:`Scorer.score_many` still shares them). Besides, a call holds
    one working copy of the batch it generates from (``batch_size`` rows of context, prefix and
    generated tokens). :attr:`nbytes` is what is kept now.
    """

    def __init__(self, model: Any, transcripts: Sequence[Transcript], tokenizer: Any = None, *,
                 batch_size: int = 64, keep: Keep = "device"):
        self.hf_model, self.tokenizer = unwrap(model, tokenizer)
        check_choice(keep, KEEP, "context keeping policy")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if len(transcripts) == 0:
            raise ValueError("a context cache needs at least one transcript (the list is empty)")
        self.transcripts = tuple(t.with_prefix(None) for t in transcripts)
        self._index = {t.id: i for i, t in enumerate(self.transcripts)}
        if len(self._index) < len(self.transcripts):
            seen = [t.id for t in self.transcripts]
            raise ValueError(f"transcript ids must be unique to pair replies with contexts; "
                             f"{next(i for i in seen if seen.count(i) > 1)!r} repeats")
        self.batch_size, self.keep = batch_size, keep
        limit = getattr(self.hf_model.config, "max_position_embeddings", None)
        self._ids = [render(t, self.tokenizer, add_generation_prompt=True, max_length=limit).input_ids.tolist()
                     for t in self.transcripts]
        order = sorted(range(len(self._ids)), key=lambda i: len(self._ids[i]))
        self._batches = [tuple(order[s:s + batch_size]) for s in range(0, len(order), batch_size)]
        self._where = {i: (b, j) for b, rows in enumerate(self._batches) for j, i in enumerate(rows)}
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._last_only = "logits_to_keep" in inspect.signature(self.hf_model.forward).parameters
        self._stored: dict[int, _Batch] = {}
        self._state: tuple | None = None
        self.context_passes = 0
        """Forward passes over a batch of contexts so far (each batch once, unless recomputed)."""
        self.fallback_rows = 0
        """Replies generated from their whole prompt, their context not being a leading part of it."""

    @property
    def nbytes(self) -> int:
        """Bytes of key-value cache kept now."""
        return sum(t.numel() * t.element_size() for b in self._stored.values() for layer in b.kv.layers
                   for t in (layer.keys, layer.values))

    @torch.inference_mode()
    def prepare(self, progress: bool = False) -> ContextCache:
        """Run every batch of contexts now (unless kept already), so that later calls only
        generate (with ``keep="recompute"``, only the next call)."""
        self._check_state()
        was_training = self.hf_model.training
        self.hf_model.eval()
        for b in tqdm(range(len(self._batches)), desc="contexts", disable=not progress, leave=False):
            self._run_batch(b)
        self.hf_model.train(was_training)
        return self

    @torch.inference_mode()
    def generate(self, transcripts: Sequence[Transcript], *, max_new_tokens: int = 64, until: Until | None = None,
                 progress: bool = False) -> list[Generation]:
        """Greedy replies to ``transcripts`` (each with its forced prefix), equal to
        :func:`interp.generation.generate`'s; ``until`` stops rows early (its row index is the
        position in ``transcripts``)."""
        slots = [self._slot(t) for t in transcripts]
        self._check_state()
        limit = getattr(self.hf_model.config, "max_position_embeddings", None)
        prompts = [render(t, self.tokenizer, add_generation_prompt=True,
                          max_length=None if limit is None else limit - max_new_tokens).input_ids.tolist()
                   for t in transcripts]
        by_batch: dict[int, list[int]] = {}
        fallback = []
        for r, (c, ids) in enumerate(zip(slots, prompts)):
            if ids[:len(self._ids[c])] == self._ids[c]:
                by_batch.setdefault(self._where[c][0], []).append(r)
            else:
                fallback.append(r)
        out: list[Generation | None] = [None] * len(transcripts)
        was_training = self.hf_model.training
        self.hf_model.eval()
        for b in tqdm(sorted(by_batch), desc="generate (cached contexts)", disable=not progress, leave=False):
            batch = self._run_batch(b)
            requests = sorted(by_batch[b], key=lambda r: len(prompts[r]) - len(self._ids[slots[r]]))
            for s in range(0, len(requests), self.batch_size):
                chunk = requests[s:s + self.batch_size]
                state = self._prefill(batch, [self._where[slots[r]][1] for r in chunk],
                                      [prompts[r][len(self._ids[slots[r]]):] for r in chunk])
                sub = None if until is None else (lambda j, text, chunk=chunk: until(chunk[j], text))
                gens = decode(self.hf_model, [transcripts[r] for r in chunk], state, self.tokenizer,
                              max_new_tokens=max_new_tokens, until=sub)
                for r, g in zip(chunk, gens):
                    out[r] = g
            if self.keep == "recompute":
                del self._stored[b]
        if fallback:
            self.fallback_rows += len(fallback)
            sub = None if until is None else (lambda j, text: until(fallback[j], text))
            gens = generate(self.hf_model, [transcripts[r] for r in fallback], self.tokenizer,
                            max_new_tokens=max_new_tokens, batch_size=self.batch_size, until=sub)
            for r, g in zip(fallback, gens):
                out[r] = g
        self.hf_model.train(was_training)
        return out  # type: ignore[return-value]

    def _slot(self, t: Transcript) -> int:
        if t.id not in self._index:
            raise ValueError(f"transcript {t.id!r} has no context in this cache (it holds {len(self._index)} "
                             f"transcripts, e.g. {next(iter(self._index))!r})")
        return self._index[t.id]

    def _check_state(self) -> None:
        """Forget the contexts when the model changed since they ran: other forward hooks (steering,
        ablation), other weights."""
        hf = self.hf_model
        state = (tuple((tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for m in hf.modules()),
                 tuple(nn_module._global_forward_hooks), tuple(nn_module._global_forward_pre_hooks),
                 tuple((p.data_ptr(), p._version) for p in hf.parameters()))
        if state != self._state:
            self._stored.clear()
            self._state = state

    def _run_batch(self, b: int) -> _Batch:
        """Batch ``b`` of contexts, run now unless kept."""
        if b in self._stored:
            return self._stored[b]
        rows = self._batches[b]
        ids, mask, _ = pad_batch([self._ids[i] for i in rows], self._pad, "left")
        kv = DynamicCache()
        out = run_on_cache(self.hf_model, ids, mask, kv, **({"logits_to_keep": 1} if self._last_only else {}))
        self.context_passes += 1
        batch = _Batch(rows, copy_cache(kv, device="cpu") if self.keep == "cpu" else kv, mask,
                       out.logits[:, -1].argmax(-1).cpu())
        self._stored[b] = batch
        return batch

    def _prefill(self, batch: _Batch, rows: list[int], tails: list[list[int]]) -> Prefill:
        """Rows ``rows`` of a batch of contexts continued by their tails (the prefix tokens), on a
        copy of the contexts' key-value cache, ready to decode."""
        dev = next(self.hf_model.parameters()).device
        sel = torch.tensor(rows)
        kv = copy_cache(batch.kv, None if rows == list(range(len(batch.rows))) else sel, dev)
        mask, first = batch.mask[sel], batch.first[sel].to(dev)
        lengths = torch.tensor([len(t) for t in tails], device=dev)
        if not any(tails):
            return Prefill(kv, mask.to(dev), mask.sum(1, keepdim=True).to(dev), first)
        ids, attn, pos, ends = tail_inputs(mask, tails, self._pad, dev)
        res = run_on_cache(self.hf_model, ids, attn, kv, position_ids=pos)
        last = res.logits[torch.arange(len(rows), device=dev), ends].argmax(-1)
        return Prefill(res.past_key_values, attn, (mask.to(dev).sum(1) + lengths)[:, None],
                       torch.where(lengths > 0, last, first))


class Scorer:
    """Scores a prefix on ``transcripts`` (labelled ``harmful``): ``(benign success, harmful
    refusal)`` as a :class:`interp.ping.loop.Evaluation`.

    The prefix is forced at the start of the agent's first reply (it is put on each transcript),
    greedy and batched. ``mode="first_step"`` (the paper's) judges the first reply only: refused,
    or started the task correctly; ``"episode"`` runs whole episodes in ``env``. ``split`` only
    names the task set in the results (e.g. ``"validation"``).

    ``contexts`` keeps the key-value caches of the (transformed) tasks' contexts with that policy
    (:class:`ContextCache`; None: every call generates from whole prompts). ``early_stop`` (the
    default in first-step mode; episodes need whole replies) ends each reply once the score's
    judgement of it is settled: the two rates of the score are exact, attack success and benign
    over-refusal are judged on the cut replies (the evaluation's ``inexact``).

    ``contexts`` may instead be any :class:`interp.generation.ReplySource`, e.g. an agent behind a
    server (:class:`interp.served.ServedAgent`; ``model`` None then, the server holds it), whose
    replies are whole (``early_stop`` defaults to off). ``placement="suffix"`` is the paper's
    fallback where the reply cannot be prefilled: the prefix text is appended to the user's request
    instead, and every record says so (``prefix_placement``: :data:`SUFFIX_FALLBACK`).
    """

    def __init__(self, model: Any, env: Environment, transcripts: Sequence[Transcript], *,
                 mode: ScoringMode = "first_step", batch_size: int = 64, max_new_tokens: int | None = None,
                 transform: Transform | None = None, split: str = "validation",
                 contexts: Keep | ReplySource | None = "device", early_stop: bool | None = None,
                 placement: Placement = "prefill"):
        check_choice(mode, SCORING_MODES, "scoring mode")
        check_choice(placement, PLACEMENTS, "prefix placement")
        source = None if contexts is None or isinstance(contexts, str) else contexts
        if contexts is not None and source is None:
            check_choice(contexts, KEEP, "context keeping policy")
        if model is None and source is None:
            raise ValueError("model is None: pass a model handle, or as contexts a reply source that holds the "
                             "model (interp.served.ServedAgent)")
        if early_stop and mode == "episode":
            raise ValueError("early_stop applies to first-step scoring only (an episode needs whole replies)")
        if len(transcripts) == 0:
            raise ValueError("a scorer needs at least one task (the transcript list is empty)")
        self.model, self.env, self.mode, self.batch_size = model, env, mode, batch_size
        self.transform, self.split, self.max_new_tokens = transform, split, max_new_tokens
        self.keep = None if source is not None else contexts
        self.early_stop = (mode == "first_step" and getattr(source, "stops_early", True)) if early_stop is None \
            else early_stop
        self.placement = placement
        self.transcripts = [t.with_prefix(None) for t in transcripts]
        self.calls = 0
        self._contexts: ContextCache | ReplySource | None = source

    @property
    def contexts(self) -> ContextCache | ReplySource | None:
        """The tasks' contexts (run at the first score) or the reply source given, or None when the
        scorer keeps none."""
        if self.keep is not None and self._contexts is None:
            starts = [self.transform(t) if self.transform else t for t in self.transcripts]
            self._contexts = ContextCache(self.model, starts, batch_size=self.batch_size, keep=self.keep)
        return self._contexts

    def evaluate_many(self, prefixes: Sequence[str | None]) -> list[Evaluation]:
        """The full :class:`interp.behavior.Evaluation` (rates with intervals, outcomes) of each
        prefix, generated together (with ``contexts="recompute"``, on one run of each context)."""
        kw: dict[str, Any] = {"batch_size": self.batch_size, "contexts": self.contexts}
        if self.max_new_tokens is not None:
            kw["max_new_tokens"] = self.max_new_tokens
        if self.mode == "first_step":
            kw["early_stop"] = self.early_stop
        transform, flat = self.transform, [t.with_prefix(p or None) for p in prefixes for t in self.transcripts]
        if self.placement == "suffix":
            starts = [transform(t) if transform else t for t in self.transcripts]
            transform, flat = None, [with_user_suffix(p)(t) if p else t for p in prefixes for t in starts]
        fn = score_first_step if self.mode == "first_step" else run_episodes
        outcomes = fn(self.model, self.env, flat, transform=transform, **kw)
        n, inexact = len(self.transcripts), EARLY_STOP_INEXACT if self.early_stop else ()
        placed = SUFFIX_FALLBACK if self.placement == "suffix" else None
        return [Evaluation(rates(outcomes[i:i + n]), tuple(outcomes[i:i + n]), inexact, placed)
                for i in range(0, len(outcomes), n)]

    def evaluate(self, prefix: str | None) -> Evaluation:
        """The full :class:`interp.behavior.Evaluation` (rates with intervals, outcomes)."""
        return self.evaluate_many([prefix])[0]

    def score_many(self, prefixes: Sequence[str | None]) -> list[PrefixEvaluation]:
        """What :meth:`__call__` gives for each prefix (one scored call each)."""
        self.calls += len(prefixes)
        return [PrefixEvaluation(ev.rates["benign_success"].value, ev.rates["harmful_refusal"].value,
                                 {"n_harmful": sum(o.harmful for o in ev.outcomes),
                                  "n_benign": sum(not o.harmful for o in ev.outcomes), "mode": self.mode,
                                  "split": self.split,
                                  **({"prefix_placement": ev.prefix_placement} if ev.prefix_placement else {})})
                for ev in self.evaluate_many(prefixes)]

    def __call__(self, prefix: str | None) -> PrefixEvaluation:
        return self.score_many([prefix])[0]
