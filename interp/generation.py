"""Greedy generation of agent replies, each from its forced prefix, batched with a key-value cache.

:func:`generate` renders each transcript for generation (its ``prefix`` right after the
generation prompt, so the reply *starts* with it), left-pads the prompts (the attention mask
hides the padding and positions count real tokens only), runs them once and decodes greedily,
stopping each row at its end-of-turn token. :func:`decode` is the decoding half alone, for
callers that prepared the key-value cache another way (:class:`interp.ping.scoring.ContextCache`
runs each task's context once and only the prefix tokens per candidate).

Early stopping (``until``) ends a row as soon as the caller's judgement of it cannot change any
more (see :func:`interp.behavior.first_step_until`); rows that ended leave the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from interp.cache import pad_batch
from interp.finetune import stop_token_ids, unwrap
from interp.models import position_ids_from_mask
from interp.transcripts import Transcript, render


@dataclass(frozen=True)
class Generation:
    """One generated reply. ``text`` is the whole reply: the forced ``prefix`` and what the
    model wrote after it (the end-of-turn token excluded); ``completion_ids`` ``[n]`` are the
    generated tokens only; ``stopped`` is False when ``max_new_tokens`` ran out first, or when
    early stopping cut the reply short (then ``settled`` is True: see :data:`Until`)."""

    transcript_id: str
    prefix: str
    text: str
    completion_ids: tuple[int, ...]
    stopped: bool
    settled: bool = False


Until = Callable[[int, str], bool]
"""Early stopping: called after each generated token of a row with the row's index (in the
transcripts given) and its reply so far (the forced prefix and every complete character written
after it); True ends that reply there."""


@dataclass(frozen=True)
class Prefill:
    """Prompts already run through the model, ready to decode: the model's key-value cache
    ``past`` (one row per transcript, in order), the ``attention_mask`` ``[batch, width]`` over
    it, the ``position`` ``[batch, 1]`` of each row's first generated token and that token,
    ``first`` ``[batch]`` (greedy)."""

    past: Any
    attention_mask: torch.Tensor
    position: torch.Tensor
    first: torch.Tensor


class ReplySource(Protocol):
    """Replies to transcripts from state prepared for them, as :func:`generate` gives them: e.g.
    :class:`interp.ping.scoring.ContextCache`, which keeps each task context's key-value cache."""

    hf_model: Any

    def generate(self, transcripts: Sequence[Transcript], *, max_new_tokens: int = 64, until: Until | None = None,
                 progress: bool = False) -> list[Generation]: ...


def _prompt_ids(transcripts: Sequence[Transcript], tokenizer, max_length: int | None) -> list[np.ndarray]:
    return [render(t, tokenizer, add_generation_prompt=True, max_length=max_length).input_ids for t in transcripts]


def _end_of_turn(model: Any, tokenizer: Any) -> tuple[set[int], int]:
    """The ids that end a reply, and the id that fills a row after its end."""
    stop_set = stop_token_ids(tokenizer, model)
    if not stop_set:
        raise ValueError("no end-of-turn token: the tokenizer has no eos_token and the model no eos_token_id")
    return stop_set, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_set)


@torch.inference_mode()
def generate(
    model: Any,
    transcripts: Sequence[Transcript],
    tokenizer: Any = None,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    progress: bool = False,
    until: Until | None = None,
    on_prefill: Callable[[np.ndarray], None] | None = None,
) -> list[Generation]:
    """Greedy replies to ``transcripts`` (each ends before the assistant's turn); a transcript's
    ``prefix`` is forced at the start of its reply.

    Args:
        model: a Hugging Face causal LM or a handle with ``.hf_model`` and ``.tokenizer``.
        max_new_tokens: generated tokens per reply at most (the prefix not counted).
        batch_size: prompts per forward pass; prompts are grouped by length.
        until: early stopping (see :data:`Until`); rows it ends leave the batch.
        on_prefill: called with the rows of each batch (indices into ``transcripts``, in batch
            order) right after the forward pass over their prompts, before any decoding: a reader
            hooked into that pass (:class:`interp.guards.ActivationMonitor`) learns whose
            decision positions (the last column: prompts are left-padded) it just saw.

    Returns:
        One :class:`Generation` per transcript, in order.
    """
    model, tokenizer = unwrap(model, tokenizer)
    if len(transcripts) == 0:
        return []
    max_pos = getattr(model.config, "max_position_embeddings", None)
    prompts = _prompt_ids(transcripts, tokenizer, None if max_pos is None else max_pos - max_new_tokens)
    stop_set, pad = _end_of_turn(model, tokenizer)
    device = next(model.parameters()).device
    order = np.argsort([len(p) for p in prompts], kind="stable")
    out: list[Generation | None] = [None] * len(prompts)
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    was_training = model.training
    model.eval()
    for idx in tqdm(batches, desc="generate", disable=not progress, leave=False):
        ids, attn, _ = pad_batch([prompts[i] for i in idx], pad, "left")
        ids, attn = ids.to(device), attn.to(device)
        pos = position_ids_from_mask(attn)  # positions count real tokens only
        res = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=None, use_cache=True)
        if on_prefill is not None:
            on_prefill(np.asarray(idx))
        state = Prefill(res.past_key_values, attn, pos[:, -1:] + 1, res.logits[:, -1].argmax(-1))
        sub = None if until is None else (lambda j, text, idx=idx: until(int(idx[j]), text))
        gens = _decode(model, tokenizer, [transcripts[i] for i in idx], state, max_new_tokens, stop_set, pad, sub)
        for i, g in zip(idx, gens):
            out[i] = g
    model.train(was_training)
    return out  # type: ignore[return-value]


@torch.inference_mode()
def decode(model: Any, transcripts: Sequence[Transcript], state: Prefill, tokenizer: Any = None, *,
           max_new_tokens: int = 64, until: Until | None = None) -> list[Generation]:
    """Greedy replies that continue ``state``, the prompts of ``transcripts`` (prefixes forced)
    already run: what :func:`generate` does after its first forward pass, for callers that
    prepared the key-value cache another way (:class:`interp.ping.scoring.ContextCache`)."""
    model, tokenizer = unwrap(model, tokenizer)
    stop_set, pad = _end_of_turn(model, tokenizer)
    return _decode(model, tokenizer, transcripts, state, max_new_tokens, stop_set, pad, until)


def _decode(model, tokenizer, transcripts: Sequence[Transcript], state: Prefill, max_new_tokens: int,
            stop_set: set[int], pad: int, until: Until | None) -> list[Generation]:
    def text(j: int, ids: list[int]) -> str:  # the characters no later token can change
        body = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return ((transcripts[j].prefix or "") + body).rstrip("\ufffd")

    watch = None if until is None else (lambda j, ids: until(j, text(j, ids)))
    new, ends, stopped, cut = _greedy(model, state, max_new_tokens, torch.tensor(sorted(stop_set)), pad, watch)
    out = []
    for j, t in enumerate(transcripts):
        row = new[j, :int(ends[j])].tolist()
        body = row[:-1] if stopped[j] else row
        out.append(Generation(t.id, t.prefix or "", (t.prefix or "") + tokenizer.decode(
            body, skip_special_tokens=False, clean_up_tokenization_spaces=False), tuple(row), bool(stopped[j]),
            bool(cut[j])))
    return out


def _greedy(model, state: Prefill, max_new_tokens: int, stops: torch.Tensor, pad: int,
            watch: Callable[[int, list[int]], bool] | None):
    """The decoding loop: tokens ``[batch, max_new_tokens]`` (pad after a row's end), each row's
    length ``[batch]`` (its end-of-turn token included), whether it hit one, whether ``watch``
    ended it. Without ``watch`` every row stays in the batch until all have ended (as before
    early stopping existed); with it, rows that ended leave once they are a quarter of the batch."""
    past, attn, pos, tok = state.past, state.attention_mask, state.position, state.first
    n, dev = tok.shape[0], tok.device
    stops = stops.to(dev)
    new = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=dev)
    ends = torch.full((n,), max_new_tokens, dtype=torch.long)
    stopped = torch.zeros(n, dtype=torch.bool)
    cut = torch.zeros(n, dtype=torch.bool)
    live = torch.arange(n, device=dev)  # the batch rows still in the forward pass
    done = torch.zeros(n, dtype=torch.bool, device=dev)  # of the live rows
    for k in range(max_new_tokens):
        if k:
            res = model(input_ids=tok[:, None], attention_mask=attn, position_ids=pos, past_key_values=past,
                        use_cache=True)
            past, tok, pos = res.past_key_values, res.logits[:, -1].argmax(-1), pos + 1
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        new[live, k] = tok
        hit = torch.isin(tok, stops) & ~done
        for r in live[hit].tolist():
            stopped[r], ends[r] = True, k + 1
        done |= hit
        if watch is not None:
            for j in (~done).nonzero().flatten().tolist():
                r = int(live[j])
                if watch(r, new[r, :k + 1].tolist()):
                    cut[r], ends[r], done[j] = True, k + 1, True
        if bool(done.all()):
            break
        if watch is not None and 4 * int(done.sum()) >= len(done):
            keep = (~done).nonzero().flatten()
            past.batch_select_indices(keep)
            attn, pos, tok, live, done = attn[keep], pos[keep], tok[keep], live[keep], done[keep]
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
    return new.cpu(), ends, stopped, cut
