"""Guards: defences that judge each step an agent proposes before it runs, and block it.

A :class:`Guard` gives every proposed step a harm score; a step scoring at least its
``threshold`` is blocked: the action does not run and the task counts as refused
(:func:`interp.behavior.evaluate` with ``guard=``). Two kinds:

- :class:`ClassifierGuard`, a second model that reads the conversation, used the way LlamaGuard
  and WildGuard are: a chat model answering "safe"/"unsafe" after its own chat template (the
  score is the next-token logit of "unsafe" minus "safe"), or a sequence classifier (the score is
  the "unsafe" minus "safe" logit). Loaded by hub id or local path like every model here.
  :func:`train_classifier_guard` trains the small one the built-in models use.
- :class:`ActivationMonitor`, a linear probe read from the *agent's own* residual stream at the
  decision position, during the same forward pass that produces the step (no second model, no
  extra forward pass). Run in episodes it reads every step: the trajectory monitor.
  :func:`fit_monitor` fits it on training tasks and picks its layer and threshold on validation
  tasks at a stated false-positive rate (a guard blocks ``score >= threshold``; the threshold is
  the next float above :func:`probes.threshold_for`'s, which flags ``score > t``).

A classifier guard reads what the agent had read before the step (every message but the system
prompt, without the proposed reply): an input classifier at the first step, a trajectory
classifier (tool observations included) after.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from interp.atomic import atomic_dir, save_json
from interp.cache import cache_prefixed, pad_batch
from interp.models import Model, Site, position_ids_from_mask
from interp.transcripts import Message, Transcript, binary_labels
from probes import auroc, fit_layer_probes, threshold_for


class GuardWatch(Protocol):
    """One step's watch: ``on_prefill`` goes to :func:`interp.generation.generate` (None when the
    guard reads no part of the agent's forward pass); ``scores(proposed)`` is the harm score
    ``[n]`` of each proposed step (the conversation with the agent's reply appended)."""

    on_prefill: Callable[[np.ndarray], None] | None

    def scores(self, proposed: Sequence[Transcript]) -> np.ndarray: ...


class Guard(Protocol):
    """A defence: ``watch(model)`` is entered around the agent's generation of each step."""

    name: str
    threshold: float

    def watch(self, model: Any) -> Any: ...  # a context manager yielding a GuardWatch


# --------------------------------------------------------------------------------------------
# Classifier guards


def _call_text(m: Message) -> str:
    return " ".join(json.dumps({"name": c.name, "arguments": c.arguments}, sort_keys=True) for c in m.tool_calls)


def guard_messages(transcript: Transcript) -> list[dict[str, str]]:
    """What a classifier guard reads of ``transcript`` before its last step, as alternating
    ``user``/``assistant`` chat messages (the form LlamaGuard's template takes): the system
    prompt is dropped, tool observations are user turns, an assistant turn is its content and
    calls, and a trailing assistant message (the proposed step) is left out."""
    msgs = list(transcript.messages)
    if msgs and msgs[-1].role == "assistant":
        msgs = msgs[:-1]
    out: list[dict[str, str]] = []
    for m in msgs:
        if m.role == "system":
            continue
        role = "assistant" if m.role == "assistant" else "user"
        text = (m.content + " " + _call_text(m)).strip() if role == "assistant" else m.content
        if m.role == "tool":
            text = f"Tool result: {text}"
        if out and out[-1]["role"] == role:
            out[-1]["content"] += "\n" + text
        else:
            out.append({"role": role, "content": text})
    if not out or out[0]["role"] != "user":
        raise ValueError(f"transcript {transcript.id!r} has no user message for a guard to read")
    return out


def guard_text(transcript: Transcript) -> str:
    """:func:`guard_messages` as plain text, one ``Role: content`` line per turn (what a sequence
    classifier reads)."""
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in guard_messages(transcript))


def _label_index(config: Any, name: str, default: int) -> int:
    for label, i in (getattr(config, "label2id", None) or {}).items():
        if str(label).lower() == name:
            return int(i)
    return default


@dataclass
class ClassifierGuard:
    """A second model that classifies the conversation (see the module docstring); ``threshold``
    0 is the classifier's own verdict (``unsafe`` more likely than ``safe``)."""

    hf_model: Any
    tokenizer: Any
    threshold: float = 0.0
    name: str = "classifier_guard"
    max_length: int = 1024
    batch_size: int = 16

    @classmethod
    def load(cls, name_or_path: str | Path, **kwargs: Any) -> ClassifierGuard:
        """A guard from a hub id or local folder: a ``*ForSequenceClassification`` checkpoint, or
        a causal LM whose chat template asks for a safe/unsafe answer (LlamaGuard, WildGuard)."""
        from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification,
                                  AutoTokenizer)

        config = AutoConfig.from_pretrained(name_or_path)
        seq = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
        auto = AutoModelForSequenceClassification if seq else AutoModelForCausalLM
        model = auto.from_pretrained(name_or_path, dtype=torch.float32).eval()
        return cls(model, AutoTokenizer.from_pretrained(name_or_path), **kwargs)

    @property
    def is_sequence_classifier(self) -> bool:
        return not hasattr(self.hf_model, "get_output_embeddings") or self.hf_model.get_output_embeddings() is None

    def _answer_ids(self) -> tuple[int, int]:
        ids = [self.tokenizer.encode(w, add_special_tokens=False) for w in ("unsafe", "safe")]
        if not ids[0] or not ids[1] or ids[0][0] == ids[1][0]:
            raise ValueError("the guard's tokenizer does not tell 'unsafe' from 'safe' by their first token")
        return ids[0][0], ids[1][0]

    @torch.inference_mode()
    def scores(self, transcripts: Sequence[Transcript]) -> np.ndarray:
        """``[n]`` harm scores: the ``unsafe`` minus ``safe`` logit for each transcript."""
        seq = self.is_sequence_classifier
        if seq:
            texts = [self.tokenizer.encode(guard_text(t), add_special_tokens=True) for t in transcripts]
            cfg = self.hf_model.config
            pick = (_label_index(cfg, "unsafe", 1), _label_index(cfg, "safe", 0))
        else:
            texts = [list(self.tokenizer.apply_chat_template(guard_messages(t), add_generation_prompt=True,
                                                             tokenize=True, return_dict=True)["input_ids"])
                     for t in transcripts]
            pick = self._answer_ids()
        for t, ids in zip(transcripts, texts):
            if len(ids) > self.max_length:
                raise ValueError(f"transcript {t.id!r} is {len(ids)} tokens for the guard, over its "
                                 f"max_length {self.max_length}")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = np.empty(len(texts))
        for s in range(0, len(texts), self.batch_size):
            rows = texts[s:s + self.batch_size]
            ids, mask, _ = pad_batch(rows, pad, "left")
            logits = self.hf_model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
            last = logits if seq else logits[:, -1]
            out[s:s + len(rows)] = (last[:, pick[0]] - last[:, pick[1]]).float().numpy()
        return out

    @contextmanager
    def watch(self, model: Any) -> Iterator[GuardWatch]:
        yield _Scored(None, self.scores)


@dataclass
class _Scored:
    on_prefill: Callable[[np.ndarray], None] | None
    score_fn: Callable[[Sequence[Transcript]], np.ndarray]

    def scores(self, proposed: Sequence[Transcript]) -> np.ndarray:
        return self.score_fn(proposed)


def train_classifier_guard(tokenizer: Any, transcripts: Sequence[Transcript], out: str | Path, *,
                           steps: int = 300, batch_size: int = 32, lr: float = 3e-3, d_model: int = 64,
                           n_layers: int = 2, seed: int = 0) -> Path:
    """Train a small sequence-classifier guard (a ``LlamaForSequenceClassification`` of
    ``n_layers`` × ``d_model`` with ``tokenizer``'s vocabulary) on :func:`guard_text` of labelled
    ``transcripts`` (``harmful``); save it with the tokenizer in ``out`` (safetensors) for
    :meth:`ClassifierGuard.load`. The built-in models' stand-in for LlamaGuard: what it shows is
    how a text classifier compares with other kinds of guard, not how LlamaGuard does."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    y = binary_labels(transcripts, "harmful")
    if y.all() or not y.any():
        raise ValueError("a guard classifier needs harmful and benign transcripts (the labels are all one class)")
    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    texts = [tokenizer.encode(guard_text(t), add_special_tokens=True) for t in transcripts]
    width = max(len(r) for r in texts)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=2 * d_model,
                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=max(width, 64), pad_token_id=pad, num_labels=2,
                      id2label={0: "safe", 1: "unsafe"}, label2id={"safe": 0, "unsafe": 1})
    model = LlamaForSequenceClassification(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    labels = torch.as_tensor(y.astype(np.int64))
    model.train()
    for _ in range(steps):
        rows = rng.choice(len(texts), size=min(batch_size, len(texts)), replace=False)
        ids, mask, _ = pad_batch([texts[i] for i in rows], pad, "left")
        loss = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                     labels=labels[rows]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with atomic_dir(out) as tmp:  # a reader sees the whole folder or none
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        save_json({"n_transcripts": len(texts), "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                   "final_loss": float(loss.detach())}, tmp / "guard_training.json")
    return Path(out)


# --------------------------------------------------------------------------------------------
# The activation monitor


@dataclass
class ActivationMonitor:
    """A linear read-out of the agent's own residual stream at ``layer``/``site`` at the decision
    position: harm score ``x · coef + intercept`` (a logit). It hooks the agent's generation
    (through :meth:`interp.models.Model.hooks`) and keeps the last position of each prompt
    forward, so it costs no forward pass. ``info`` records how it was fitted."""

    model: Model
    layer: int
    coef: np.ndarray  # [d_model]
    intercept: float
    threshold: float
    site: Site = "resid_post"
    name: str = "activation_monitor"
    info: dict[str, Any] = field(default_factory=dict)

    def at_fpr(self, fpr: float) -> ActivationMonitor:
        """The same probe with the threshold that flags at most ``fpr`` of the benign validation
        tasks it was fitted with (:func:`fit_monitor` keeps their scores)."""
        s, y = self.info.get("validation_scores"), self.info.get("validation_harmful")
        if s is None or y is None:
            raise ValueError("this monitor keeps no validation scores to choose a threshold from")
        t = math.nextafter(threshold_for(np.asarray(s), np.asarray(y), fpr), math.inf)
        return dataclasses.replace(self, threshold=t, info={**self.info, "fpr": fpr})

    def score_activations(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """``[n]`` scores of decision-position activations ``[n, d_model]``."""
        return np.asarray(x, dtype=np.float64) @ np.asarray(self.coef, dtype=np.float64) + self.intercept

    @contextmanager
    def watch(self, model: Any) -> Iterator[GuardWatch]:
        if model is not self.model and getattr(model, "hf_model", None) is not self.model.hf_model:
            raise ValueError("an activation monitor reads the agent it was fitted on: it was given another model")
        last: list[torch.Tensor] = []
        seen: dict[int, np.ndarray] = {}

        def keep(x: torch.Tensor) -> None:
            last[:] = [x[:, -1].detach().float().cpu()]

        def on_prefill(rows: np.ndarray) -> None:
            if not last:
                raise RuntimeError("the agent's forward pass did not run through the monitor's hook")
            for r, v in zip(rows.tolist(), self.score_activations(last[0])):
                seen[int(r)] = v

        def scores(proposed: Sequence[Transcript]) -> np.ndarray:
            missing = [i for i in range(len(proposed)) if i not in seen]
            if missing:
                raise RuntimeError(f"the monitor saw no prompt forward for {len(missing)} of {len(proposed)} rows "
                                   "(replies taken from cached contexts or a served agent: generate them locally)")
            return np.array([seen[i] for i in range(len(proposed))])

        with self.model.hooks({self.layer: keep}, self.site):
            yield _Scored(on_prefill, scores)


def decision_activations(model: Model, transcripts: Sequence[Transcript], layers: Sequence[int],
                         site: Site = "resid_post", batch_size: int = 32) -> torch.Tensor:
    """``[n, n_layers, d_model]``: the residual stream at each transcript's decision position (the
    last token of its generation prompt, or of its forced prefix), what a monitor reads during
    generation, through :func:`interp.cache.cache_prefixed` (transcripts grouped by prefix)."""
    out = torch.empty(len(transcripts), len(layers), model.d_model)
    for prefix in dict.fromkeys(t.prefix for t in transcripts):
        rows = [i for i, t in enumerate(transcripts) if t.prefix == prefix]
        out[rows] = cache_prefixed(model, [transcripts[i].with_prefix(None) for i in rows], [prefix],
                                   layers=list(layers), site=site, batch_size=batch_size)[0]
    return out


def fit_monitor(model: Model, train: Sequence[Transcript], validation: Sequence[Transcript], *,
                fpr: float = 0.01, layers: Sequence[int] | None = None, site: Site = "resid_post",
                C: float = 1.0, batch_size: int = 32, read_from: Model | None = None) -> ActivationMonitor:
    """A harm monitor for ``model``: a logistic probe (harmful vs benign) on decision-position
    activations of ``train`` (after each one's forced prefix, if any: fit the monitor on the
    condition it will watch) at each of ``layers`` (default all), the layer with the best AUROC on
    ``validation``, and the threshold that flags at most ``fpr`` of the benign ``validation``
    tasks. ``read_from`` fits the probe on another model's activations (e.g. the aligned model's,
    for transfer) while the monitor reads ``model``; the layer and threshold are still chosen on
    ``model``'s validation activations. The test split is never read."""
    layers = list(range(model.n_layers)) if layers is None else model.check_layers(list(layers), site)
    y_tr, y_va = binary_labels(train, "harmful"), binary_labels(validation, "harmful")
    for what, y in (("training", y_tr), ("validation", y_va)):
        if y.all() or not y.any():
            raise ValueError(f"the {what} tasks are all {'harmful' if y[0] else 'benign'}: a monitor needs both")
    X_tr = decision_activations(read_from or model, train, layers, site, batch_size)
    X_va = decision_activations(model, validation, layers, site, batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probes = fit_layer_probes(X_tr.numpy(), y_tr, C=C)
    dec = np.stack([X_va[:, i].double().numpy() @ probes.coef_[i].astype(np.float64) + probes.intercept_[i]
                    for i in range(len(layers))], axis=1)  # [n_val, L]
    aucs = [float(auroc(y_va, dec[:, i])) for i in range(len(layers))]
    li = int(np.nanargmax(aucs))
    monitor = ActivationMonitor(
        model, layers[li], probes.coef_[li].astype(np.float64), float(probes.intercept_[li]), math.inf, site,
        info={"validation_auroc": aucs, "layers": layers, "n_train": len(train), "n_validation": len(validation),
              "validation_scores": dec[:, li].tolist(), "validation_harmful": y_va.tolist(),
              "fitted_on": "another model" if read_from is not None else "the agent"})
    return monitor.at_fpr(fpr)
