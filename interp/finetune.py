"""Assistant-only-loss fine-tuning of any Hugging Face causal LM on agent transcripts.

The loss covers exactly what the agent writes: its messages, its tool calls and the token that
ends its turn. Which tokens those are comes from the chat template's ``{% generation %}``
blocks when it has them (``return_assistant_tokens_mask``), else from the segment labels of
:func:`interp.transcripts.render`. Full fine-tuning by default; LoRA through ``peft`` with
``FinetuneConfig(lora_rank=...)``.

>>> FinetuneConfig(steps=10).lr
0.001
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from interp.atomic import atomic_dir, read_json, save_json
from interp.transcripts import KIND_INDEX, Transcript, TranscriptError, render

END_OF_TURN_TOKENS = ("<|end|>", "<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end_of_text|>", "<|endoftext|>")
"""Tokens that close an assistant turn in common chat templates (besides ``eos_token``)."""


def unwrap(model: Any, tokenizer: Any = None) -> tuple[Any, Any]:
    """``(hf_model, tokenizer)`` from a model handle (anything with ``.hf_model`` and
    ``.tokenizer``) or a bare ``PreTrainedModel`` plus a tokenizer."""
    if hasattr(model, "hf_model"):
        tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        model = model.hf_model
    if tokenizer is None:
        raise ValueError("no tokenizer: pass one, or a model handle with a .tokenizer")
    if not callable(getattr(model, "forward", None)):
        raise TypeError(f"expected a Hugging Face causal LM or a handle with .hf_model, got {type(model).__name__}")
    return model, tokenizer


def stop_token_ids(tokenizer: Any, model: Any = None) -> set[int]:
    """Ids that end an assistant turn: the eos token(s) of the tokenizer and of the model's
    generation config, and any known end-of-turn token in the vocabulary."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is not None:
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return ids


# --------------------------------------------------------------------------------------------
# Encoding


@dataclass(frozen=True, eq=False)
class Example:
    """One training sequence: ``input_ids`` ``[pos]`` and ``loss_mask`` ``[pos]`` (True on the
    tokens the model is trained to write)."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    id: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _has_generation_blocks(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and _GENERATION_TAG.search(template) is not None


def encode(transcript: Transcript, tokenizer, max_length: int | None = None) -> Example:
    """Token ids of a whole transcript and the mask of what the assistant writes.

    With ``{% generation %}`` blocks in the template the mask is the template's own assistant
    mask; otherwise every token from the first assistant content or tool-call token of each
    assistant message through its end-of-turn token (so tool-call tags the template adds are
    learned too). Sequences longer than ``max_length`` keep their first ``max_length`` tokens.
    """
    if transcript.prefix is not None:
        raise TranscriptError(f"transcript {transcript.id!r}: training transcripts carry no forced prefix; "
                              "put the text in the assistant message")
    if not any(m.role == "assistant" for m in transcript.messages):
        raise TranscriptError(f"transcript {transcript.id!r}: no assistant message, nothing to learn")
    if _has_generation_blocks(tokenizer):
        out = tokenizer.apply_chat_template(
            [m.to_dict() for m in transcript.messages], tools=list(transcript.tools) or None, tokenize=True,
            return_dict=True, return_assistant_tokens_mask=True)
        ids = np.asarray(out["input_ids"], dtype=np.int64)
        mask = np.asarray(out["assistant_masks"], dtype=bool)
    else:
        r = render(transcript, tokenizer, add_generation_prompt=False)
        ids, mask = r.input_ids, _mask_from_labels(r, tokenizer)
    if not mask.any():
        raise TranscriptError(f"transcript {transcript.id!r}: the assistant mask is empty")
    if max_length is not None and len(ids) > max_length:
        ids, mask = ids[:max_length], mask[:max_length]
    return Example(ids, mask, transcript.id)


def _mask_from_labels(r, tokenizer) -> np.ndarray:
    """What each assistant message writes: from the end of its generation prompt (what
    ``add_generation_prompt`` adds) through its end-of-turn token."""
    stops = stop_token_ids(tokenizer)
    written = np.isin(r.kind, [KIND_INDEX["assistant"], KIND_INDEX["tool_call"]])
    template = KIND_INDEX["template"]
    msgs = [m.to_dict() for m in r.transcript.messages]
    mask = np.zeros(len(r), dtype=bool)
    for m, msg in enumerate(msgs):
        pos = np.flatnonzero(written & (r.message == m))
        if msg["role"] != "assistant" or len(pos) == 0:
            continue
        start = int(pos[0])
        try:
            prompt = tokenizer.apply_chat_template(msgs[:m], tools=list(r.transcript.tools) or None,
                                                   add_generation_prompt=True, tokenize=False)
        except Exception:  # templates may refuse partial conversations: start at the content
            prompt = None
        if isinstance(prompt, str) and r.text.startswith(prompt):
            start = min(start, int(np.searchsorted(r.offsets[:, 0], len(prompt))))
        end = j = int(pos[-1]) + 1
        while j < len(r) and r.kind[j] == template:
            j += 1
            if int(r.input_ids[j - 1]) in stops:
                end = j
                break
        mask[start:end] = True
    return mask


def encode_all(transcripts: Sequence[Transcript], tokenizer, max_length: int | None = None,
               progress: bool = False) -> list[Example]:
    """:func:`encode` every transcript."""
    if len(transcripts) == 0:
        raise ValueError("no transcripts to encode (the list is empty)")
    it = tqdm(transcripts, desc="encode", disable=not progress, leave=False)
    return [encode(t, tokenizer, max_length) for t in it]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``loss_mask``, all ``[batch, pos]``."""
    n = max(len(e) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), n), dtype=torch.long)
    loss = torch.zeros((len(examples), n), dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, :len(e)] = torch.from_numpy(e.input_ids)
        attn[i, :len(e)] = 1
        loss[i, :len(e)] = torch.from_numpy(e.loss_mask)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def masked_loss(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokens whose ``loss_mask`` is True (scalar).

    The token at position ``p`` is predicted from positions ``< p``; nothing else counts.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target = batch["input_ids"][:, 1:]
    keep = batch["loss_mask"][:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), target[keep])


# --------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters. ``schedule`` is ``"cosine"`` (warm-up, then cosine decay to
    ``min_lr_ratio * lr``) or ``"constant"`` (warm-up, then ``lr``)."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    max_length: int | None = None
    seed: int = 0
    lora_rank: int | None = None
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: str | tuple[str, ...] = "all-linear"

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"steps must be >= 0 and batch_size >= 1 (got {self.steps}, {self.batch_size})")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    def lr_at(self, step: int) -> float:
        """Learning rate of update ``step`` (0-based)."""
        return scheduled_lr(step, self.lr, self.steps, self.warmup_steps, self.schedule, self.min_lr_ratio)


@dataclass(frozen=True)
class FinetuneResult:
    """The trained model (a ``PeftModel`` under LoRA), the loss of every update, wall time."""

    model: Any
    losses: tuple[float, ...]
    seconds: float


def scheduled_lr(step: int, lr: float, steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """The learning rate of update ``step`` (0-based): linear warm-up over ``warmup_steps``, then
    ``lr`` ("constant") or a cosine from ``lr`` down to ``min_lr_ratio * lr`` at ``steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def epoch_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, window: int = 50) -> list[np.ndarray]:
    """One epoch of index batches: a random order, in windows of ``window`` batches sorted by
    length so a batch pads little, the batches shuffled; only full batches (all of them when
    there are fewer examples than ``batch_size``)."""
    n = len(lengths)
    order = rng.permutation(n)
    chunk = window * batch_size
    batches = []
    for s in range(0, n, chunk):
        part = order[s:s + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[j] for j in rng.permutation(len(batches)) if len(batches[j]) == batch_size or n < batch_size]


def _batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, window: int = 50) -> Iterator[np.ndarray]:
    """Endless :func:`epoch_batches`."""
    while True:
        yield from epoch_batches(lengths, batch_size, rng, window)


def finetune(
    model: Any,
    data: Sequence[Transcript] | Sequence[Example],
    tokenizer: Any = None,
    config: FinetuneConfig = FinetuneConfig(),
    *,
    callback: Callable[[int, Any], None] | None = None,
    callback_steps: Sequence[int] = (),
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    progress: bool = True,
    desc: str = "finetune",
) -> FinetuneResult:
    """Train ``model`` to write the assistant turns of ``data`` (assistant-only loss).

    Args:
        model: a Hugging Face causal LM, or a handle with ``.hf_model`` and ``.tokenizer``.
        data: transcripts (encoded here) or :class:`Example` s.
        config: hyper-parameters and seed (data order and any random init depend on it).
        callback: called as ``callback(step, model)`` after ``step`` updates for every step in
            ``callback_steps`` (0: before training), with the model in eval mode.
        checkpoint_dir: with ``checkpoint_every > 0``, a checkpoint ``step-NNNNN`` is saved there
            every that many updates (:func:`save_checkpoint`), with the trainer's state
            (trainable weights, optimiser, losses: ``trainer_state.pt``) beside the weights.
        resume: continue from the latest checkpoint in ``checkpoint_dir`` that has a trainer
            state (none: start from step 0); the batches drawn and the updates equal an
            uninterrupted run's.

    Returns:
        A :class:`FinetuneResult`; the model is trained in place (wrapped when LoRA).
    """
    model, tokenizer = unwrap(model, tokenizer)
    if len(data) == 0:
        raise ValueError("no training data (the list is empty)")
    max_length = config.max_length or getattr(model.config, "max_position_embeddings", None)
    examples = [d if isinstance(d, Example) else encode(d, tokenizer, max_length) for d in data]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad batches with")
    torch.manual_seed(config.seed)
    model = _with_lora(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)
    batches = _batches(np.array([len(e) for e in examples]), config.batch_size, rng)
    wanted = set(callback_steps)

    def call_back(step: int):
        if callback is not None and step in wanted:
            model.eval()
            with torch.no_grad():
                callback(step, model)

    start, losses = _resume(model, opt, Path(checkpoint_dir), config, batches) if resume and checkpoint_dir else (0, [])
    t0 = time.time()
    if start == 0:
        call_back(0)
    bar = tqdm(range(start, config.steps), desc=desc, disable=not progress, dynamic_ncols=True,
               initial=start, total=config.steps)
    for step in bar:
        model.train()
        for g in opt.param_groups:
            g["lr"] = config.lr_at(step)
        batch = collate([examples[i] for i in next(batches)], pad_id)
        loss = masked_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if checkpoint_dir is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            _save_state(model, tokenizer, opt, losses, config, Path(checkpoint_dir))
        call_back(step + 1)
    model.eval()
    return FinetuneResult(model, tuple(losses), time.time() - t0)


# --------------------------------------------------------------------------------------------
# Files


def save_checkpoint(model: Any, tokenizer: Any, path: str | Path, metadata: Mapping[str, Any] | None = None,
                    trainer_state: Mapping[str, Any] | None = None) -> Path:
    """``save_pretrained`` (safetensors) the model and tokenizer into ``path`` atomically: written
    to a temporary folder beside it, then renamed over any previous checkpoint there.
    ``metadata`` goes to ``training.json`` in the checkpoint, ``trainer_state`` (what
    :func:`finetune` resumes from) to ``trainer_state.pt``."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if metadata is not None:
            save_json(dict(metadata), tmp / "training.json")
        if trainer_state is not None:
            torch.save(dict(trainer_state), tmp / TRAINER_STATE)
    return path


TRAINER_STATE = "trainer_state.pt"


def _with_lora(model: Any, config: FinetuneConfig) -> Any:
    """``model`` wrapped with the LoRA adapters ``config`` asks for (as it is without)."""
    if not config.lora_rank:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules if isinstance(config.lora_target_modules, str)
        else list(config.lora_target_modules), task_type="CAUSAL_LM"))


def _save_state(model: Any, tokenizer: Any, opt: torch.optim.Optimizer, losses: list[float], config: FinetuneConfig,
                checkpoint_dir: Path) -> None:
    """The checkpoint after ``len(losses)`` updates, with what :func:`_resume` needs."""
    step = len(losses)
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    save_checkpoint(model, tokenizer, checkpoint_dir / f"step-{step:05d}", {"step": step, "config": asdict(config)},
                    {"model": trainable, "optimizer": opt.state_dict(), "losses": losses, "step": step,
                     "torch_rng": torch.get_rng_state()})


def _resume(model: Any, opt: torch.optim.Optimizer, checkpoint_dir: Path, config: FinetuneConfig,
            batches: Iterator[np.ndarray]) -> tuple[int, list[float]]:
    """Load the latest trainer state under ``checkpoint_dir`` into ``model`` and ``opt`` and draw
    the batches the interrupted run drew: (its step, the losses so far); (0, []) when there is
    none. A state of another configuration is refused."""
    done = sorted(checkpoint_dir.glob(f"step-*/{TRAINER_STATE}"))
    if not done:
        return 0, []
    meta = read_json(done[-1].parent / "training.json")
    if meta.get("config") != json.loads(json.dumps(asdict(config))):
        raise ValueError(f"{done[-1].parent}: a checkpoint of another training configuration; resume with the "
                         "same one, or start in an empty folder")
    try:
        state = torch.load(done[-1], weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{done[-1]}: unreadable trainer state ({e}); delete that checkpoint folder to resume "
                         "from the one before it") from None
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["model"].items():
            params[name].copy_(value)
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    for _ in range(int(state["step"])):
        next(batches)
    return int(state["step"]), list(state["losses"])
