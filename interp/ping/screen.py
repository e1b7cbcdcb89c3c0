"""Probe-guided screening: predict a prefix's PING score from one forward pass per task, without
generating, so the loop can rank many candidates and generate for few.

A screen reads a linear read-out of refusal at the decision position of every (task, prefix)
pair through :func:`interp.cache.cache_prefixed` (each task's context runs once; only the prefix
tokens run per candidate). The read-out is a refusal probe fitted on the agent's own activations
(:func:`fit_refusal_probe`) or an aligned model's harmful-minus-benign direction
(:func:`harm_direction`, :func:`harm_direction_screen`).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from interp.behavior import Environment, score_first_step
from interp.cache import cache_prefixed
from interp.models import Model, Site
from interp.ping.loop import PrefixGenerator, Request
from interp.transcripts import Transcript, binary_labels
from probes import diff_in_means, dprime, fit_layer_probes


def _harmful(transcripts: Sequence[Transcript]) -> np.ndarray:
    return binary_labels(transcripts, "harmful")


@dataclass(frozen=True)
class ProbeScreen:
    """Predicts a prefix's score without generating: a linear read-out of refusal at the
    decision position (layer ``layer``), ``P(refuse) = sigmoid(x · coef + intercept)``, averaged
    as ``mean over harmful tasks of P(refuse) + mean over benign tasks of (1 - P(refuse))`` on
    ``transcripts`` (validation tasks). It cannot see whether a benign task is then carried out
    correctly, only whether the agent is about to refuse: an optimistic proxy for benign success.

    ``kind`` says where the read-out came from (``"refusal_probe"`` or ``"harm_direction"``).
    """

    model: Model
    transcripts: tuple[Transcript, ...]
    layer: int
    coef: np.ndarray  # [d_model]
    intercept: float
    kind: Literal["refusal_probe", "harm_direction"]
    info: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 32

    def refusal_probability(self, prefixes: Sequence[str | None]) -> np.ndarray:
        """``[n_prefixes, n_tasks]`` predicted probability that the agent refuses."""
        x = cache_prefixed(self.model, self.transcripts, prefixes, layers=[self.layer],
                           batch_size=self.batch_size)[:, :, 0].double().numpy()
        return 1.0 / (1.0 + np.exp(-(x @ self.coef + self.intercept)))

    def predict(self, prefixes: Sequence[str | None]) -> list[tuple[float, float]]:
        """``(predicted benign non-refusal, predicted harmful refusal)`` per prefix."""
        p = self.refusal_probability(prefixes)
        h = _harmful(self.transcripts)
        return [(float(1 - row[~h].mean()), float(row[h].mean())) for row in p]

    def __call__(self, prefixes: Sequence[str]) -> list[float]:
        return [b + r for b, r in self.predict(prefixes)]


def refusal_labels(model: Model, env: Environment, transcripts: Sequence[Transcript],
                   prefixes: Sequence[str | None], *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """``[n_prefixes, n_tasks]``: did the agent refuse (first reply, greedy) with each prefix."""
    out = np.zeros((len(prefixes), len(transcripts)), dtype=bool)
    for i, p in enumerate(tqdm(prefixes, desc="probe labels", disable=not progress, leave=False)):
        oc = score_first_step(model, env, [t.with_prefix(p or None) for t in transcripts], batch_size=batch_size)
        out[i] = [o.refused for o in oc]
    return out


def fit_refusal_probe(model: Model, env: Environment, transcripts: Sequence[Transcript],
                      prefixes: Sequence[str | None], *, C: float = 1.0, batch_size: int = 64,
                      progress: bool = False) -> dict[str, Any]:
    """A logistic refusal probe on the (fine-tuned) agent's own decision-position activations.

    ``transcripts`` (training tasks) are paired with every one of ``prefixes``; the label is
    whether the agent refused with that prefix (first reply, greedy: one generation per pair,
    counted in ``task_generations``). The layer is the one whose probe is most accurate on
    prefixes it was not fitted on (two folds of whole prefixes: screening asks about new
    prefixes); the probe is then refitted on all. Returns ``layer``, ``coef`` ``[d_model]``,
    ``intercept``, ``heldout_accuracy`` per layer, ``refusal_rate`` and ``task_generations``.
    """
    y = refusal_labels(model, env, transcripts, prefixes, batch_size=batch_size, progress=progress)
    layers = list(range(model.n_layers))
    X = cache_prefixed(model, transcripts, prefixes, layers=layers)  # [P, T, L, d]
    P, T = y.shape
    flat_x, flat_y = X.reshape(P * T, *X.shape[2:]).numpy(), y.reshape(-1)
    info = {"task_generations": P * T, "refusal_rate": float(flat_y.mean()), "n_prefixes": P, "n_tasks": T}
    if flat_y.all() or not flat_y.any():
        raise ValueError(f"refusal labels are all {bool(flat_y[0])} over {P} prefixes x {T} training tasks: "
                         "a refusal probe needs both outcomes")
    fold = np.repeat(np.arange(P) % 2, T)  # two folds of whole prefixes
    correct, counted = np.zeros(len(layers)), 0
    for k in (0, 1):
        tr, te = fold != k, fold == k
        if flat_y[tr].all() or not flat_y[tr].any() or not te.any():
            continue  # a fold whose training prefixes give one outcome only cannot fit a probe
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            half = fit_layer_probes(flat_x[tr], flat_y[tr], C=C)
        correct += half.score_layers(flat_x[te], flat_y[te]) * te.sum()
        counted += int(te.sum())
    accs = correct / counted if counted else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probes = fit_layer_probes(flat_x, flat_y, C=C)
    li = int(np.argmax(accs)) if accs is not None else len(layers) - 1
    return {**info, "layer": layers[li], "coef": probes.coef_[li], "intercept": float(probes.intercept_[li]),
            "heldout_accuracy": None if accs is None else [float(a) for a in accs],
            "train_accuracy": [float(a) for a in probes.score_layers(flat_x, flat_y)]}


def harm_direction(model: Model, transcripts: Sequence[Transcript], *, layers: Sequence[int] | None = None,
                   site: Site = "resid_post", batch_size: int = 32) -> dict[str, Any]:
    """The harmful-minus-benign difference in means at the decision position (no prefix) over
    ``transcripts`` (never the test split), per layer: ``directions`` ``[n_layers, d_model]``
    (unit), ``gap`` ``[n_layers]`` (distance between the class means), ``mean_harmful`` /
    ``mean_benign`` projections and ``dprime``."""
    layers = list(range(model.n_layers)) if layers is None else model.check_layers(list(layers), site)
    X = cache_prefixed(model, transcripts, [None], layers=layers, site=site, batch_size=batch_size)[0]  # [T, L, d]
    y = _harmful(transcripts)
    raw = diff_in_means(X, y, normalize=False)  # [L, d]
    gap = raw.norm(dim=-1)
    ok = gap > 1e-6 * (1 + X.norm(dim=-1).mean(0))  # the embeddings' input (resid_pre 0) is the same for all
    unit = torch.where(ok[:, None], raw / gap.clamp(min=1e-30)[:, None], torch.zeros_like(raw))
    proj = (X * unit).sum(-1)  # [T, L]
    sep = torch.where(ok, dprime(proj, y).nan_to_num(0.0), torch.zeros_like(gap))
    yt = torch.as_tensor(y)
    return {"layers": layers, "site": site, "directions": unit, "gap": torch.where(ok, gap, torch.zeros_like(gap)),
            "mean_harmful": proj[yt].mean(0), "mean_benign": proj[~yt].mean(0), "dprime": sep,
            "n_tasks": len(transcripts)}


def harm_direction_screen(direction: Mapping[str, Any], layer: int, model: Model,
                          transcripts: Sequence[Transcript], batch_size: int = 32) -> ProbeScreen:
    """A screen from an aligned model's harmful-vs-benign direction: the logistic curve that puts
    the decision boundary midway between the class means and the means at ±2 logits."""
    li = direction["layers"].index(layer)
    r = direction["directions"][li].double().numpy()
    mh, mb = float(direction["mean_harmful"][li]), float(direction["mean_benign"][li])
    scale = 4.0 / max(mh - mb, 1e-6)
    return ProbeScreen(model, tuple(transcripts), layer, r * scale, -scale * (mh + mb) / 2, "harm_direction",
                       {"mean_harmful": mh, "mean_benign": mb}, batch_size)


def probe_training_prefixes(n: int, seed: int, generator: PrefixGenerator) -> list[str | None]:
    """No prefix, then ``n - 1`` fresh candidates of ``generator`` (a seed the search does not
    use), so the probe sees the kind of sentence it will be asked about."""
    req = Request(n=max(n - 1, 0), round=0, attempt=0, seed=random.Random(f"probe/{seed}").getrandbits(31))
    return [None] + generator.propose(req)[: n - 1]
