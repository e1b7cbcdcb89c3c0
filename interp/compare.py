"""The three-way comparison: the aligned model, the fine-tuned model, and the fine-tuned model
with a forced prefix, layer by layer and token by token.

For every cached layer it reports:

- **within**: a harmful-vs-benign probe trained and tested inside each condition (grouped
  held-out split, so no task template is on both sides): does the model *represent* harm?
- **transfer**: the aligned model's probe and difference-in-means direction applied to the
  fine-tuned model's activations, without and with the prefix: is harm still written where the
  aligned model *read* it?
- **refusal**: a probe whose label is what the model actually did (refused or acted, from the
  behaviour judges), since harm and refusal come apart after fine-tuning;
- **decision logit**: the mean refusal-probe logit over harmful test tasks at the decision
  position of each condition (the paper's −4.87 → +2.29 for Llama-3.1-8B), with intervals;
- **cosine** between the aligned and the fine-tuned models' refusal directions;

and, token by token along the prefix, the refusal-probe logit on harmful test tasks.

:func:`compare` works on cached :class:`~interp.store.Activations` (from memory or a store), so
results can be recomputed without re-running models; :func:`cache_conditions` makes them.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from interp.cache import cache_activations, render_for
from interp.models import Model, Site
from interp.positions import Selector, every, parse
from interp.store import Activations
from interp.transcripts import SEGMENT_KINDS, Transcript
from probes import (Interval, auroc, bootstrap_ci, cosine_similarity, diff_in_means, dprime, fit_layer_probes,
                    grouped_train_test_split, project)

CONDITIONS = ("aligned", "finetuned", "prefix")
CV_FOLDS = 5
"""Folds of the cross-validation that chooses a probe's C (``fit_layer_probes``' default)."""


@dataclass(frozen=True, eq=False)
class Comparison:
    """Results of :func:`compare`: tidy per-layer records and the per-token prefix logits.

    ``layers[i]`` is a dict with keys ``layer``, ``aligned`` / ``finetuned`` / ``prefix``
    (the within-condition harmful probe), ``transfer_to_finetuned`` /
    ``transfer_to_prefix`` (the aligned probe: ``{"acc", "acc_low", "acc_high", "auroc"}``, the
    accuracy with its 95% bootstrap interval), ``direction`` (the aligned
    direction's AUROC and d′ per condition, and the aligned/fine-tuned cosine), ``refusal``
    (the refusal probe's held-out ``{"acc", "auroc", "n"}``, or None) and ``decision_logit``
    (``{condition: {"value", "low", "high"}}``).

    ``probes`` holds the fitted :class:`probes.LayerProbes`: ``harmful_{condition}`` and
    ``logit_{condition}`` (the probe behind each condition's decision logits), for reuse (token
    logits, attribution metrics); ``split`` the train and test rows.
    """

    layers: list[dict]
    prefix_tokens: list[str]
    prefix_logits: list[dict]  # per layer: {"layer", "positions": [{"token", "value", "low", "high"}]}
    logit_probe: str  # "refusal" (behaviour-labelled), "aligned refusal" (the aligned model's for every
    # condition: the fine-tuned model's behaviour had one class) or "harmful" (no behaviour given)
    n_train: int
    n_test: int
    meta: Mapping[str, Any] = field(default_factory=dict)
    probes: Mapping[str, Any] = field(default_factory=dict)  # fitted LayerProbes (not serialised)
    split: tuple[np.ndarray, np.ndarray] | None = None  # train and test row indices

    def layer(self, layer: int) -> dict:
        for rec in self.layers:
            if rec["layer"] == layer:
                return rec
        raise KeyError(f"layer {layer} not in the comparison (layers: {[r['layer'] for r in self.layers]})")

    def to_dict(self) -> dict:
        return {"layers": self.layers, "prefix_tokens": self.prefix_tokens, "prefix_logits": self.prefix_logits,
                "logit_probe": self.logit_probe, "n_train": self.n_train, "n_test": self.n_test, "meta": dict(self.meta)}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)


def _acc_auroc(scores: np.ndarray, y: np.ndarray, threshold: float = 0.0, n_boot: int = 2000, seed: int = 0) -> dict:
    """``scores [n, L]`` logits → per-layer accuracy at ``threshold`` with a 95% bootstrap interval
    over test rows (resampled within each class), and AUROC: ``{"acc", "acc_low", "acc_high", "auroc"}``,
    each ``[L]``."""
    correct = (scores > threshold) == y[:, None].astype(bool)  # [n, L]
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(y == c), size=((y == c).sum(), n_boot)) for c in np.unique(y)])
    boot = correct[idx].mean(0)  # [n_boot, L]
    return {"acc": correct.mean(0), "acc_low": np.percentile(boot, 2.5, axis=0),
            "acc_high": np.percentile(boot, 97.5, axis=0), "auroc": np.asarray(auroc(y, scores))}


def _summary(m: dict, j: int) -> dict:
    return {k: float(m[k][j]) for k in ("acc", "acc_low", "acc_high", "auroc")}


def _mean_interval(values: np.ndarray, seed: int) -> Interval:
    return bootstrap_ci(lambda v: float(v.mean()), values, seed=seed)


def check_prefix(prefix: str) -> str:
    """``prefix`` if it holds text; an empty or whitespace-only prefix (which would probe only
    whitespace tokens, or none) raises ``ValueError``."""
    if not isinstance(prefix, str) or not prefix.strip():
        raise ValueError(f"the prefix {prefix!r} is empty or only whitespace; a forced prefix needs text")
    return prefix


def class_array(values: Any, name: str) -> np.ndarray:
    """``values`` as a ``[n]`` bool array if they are booleans or 0/1 integers; anything else
    (strings, floats, None) raises ``ValueError`` rather than being coerced."""
    arr = np.asarray(values)
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind in "iu" and np.isin(arr, (0, 1)).all():
        return arr.astype(bool)
    shown = ", ".join(repr(v) for v in arr.ravel()[:3].tolist())
    raise ValueError(f"{name} must be booleans (or 0/1), got dtype {arr.dtype} ({shown}...); read labels with "
                     "interp.transcripts.binary_labels")


def check_split(harmful: Any, groups: Any, *, test_size: float = 0.3, seed: int = 0, C: float | None = None,
                cv: int = CV_FOLDS) -> tuple[np.ndarray, np.ndarray]:
    """The held-out split :func:`compare` makes, ``(train, test)`` row indices, checked before any
    work: both classes on both sides and, when C is chosen by ``cv``-fold grouped
    cross-validation (``C=None``), at least ``cv`` of each class in ``cv`` groups on the training
    side. Raises ``ValueError`` with the counts and what they must reach."""
    harmful, groups = class_array(harmful, "harmful"), np.asarray(groups)
    n, n_groups = len(harmful), len(np.unique(groups))
    if n_groups < 2:
        raise ValueError(f"the {n} transcripts form {n_groups} group (groups are transcript ids unless labels or "
                         "metadata give a 'group'): are all the ids the same? A held-out split needs 2 groups")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, test = grouped_train_test_split(groups, test_size=test_size, seed=seed, y=harmful)
    need = cv if C is None else 1
    for side, idx, k in (("training", train, need), ("test", test, 1)):
        h, b, g = int(harmful[idx].sum()), int((~harmful[idx]).sum()), len(np.unique(groups[idx]))
        if min(h, b) < k or (side == "training" and g < need):
            why = (f"choosing C by {cv}-fold grouped cross-validation needs {cv} of each in {cv} groups there"
                   if need > 1 and side == "training" else "a split needs both classes on both sides")
            raise ValueError(f"{n} transcripts ({int(harmful.sum())} harmful) in {n_groups} groups leave {h} harmful "
                             f"and {b} benign in {g} groups on the {side} side (test_size {test_size}); {why}: "
                             "give more transcripts or groups" + (f" ({caught[0].message})" if caught else ""))
    return train, test


def cache_conditions(
    aligned: Model,
    finetuned: Model,
    transcripts: Sequence[Transcript],
    prefix: str,
    *,
    layers: str | Sequence[int] = "all",
    site: Site = "resid_post",
    positions: Selector | str = "decision",
    batch_size: int = 16,
    progress: bool = True,
    truncate: bool = False,
) -> dict[str, Activations]:
    """Activations of the three conditions at ``positions`` (default the decision position),
    plus every prefix token in the prefix condition: ``{"aligned", "finetuned", "prefix"} ->
    Activations``. The prefix condition is ``transcripts`` each carrying ``prefix`` (text: an
    empty or whitespace-only prefix raises ``ValueError``). ``truncate`` keeps the last tokens
    of transcripts longer than a model's context."""
    positions = parse(positions)
    with_prefix = [t.with_prefix(check_prefix(prefix)) for t in transcripts]
    kw = dict(layers=layers, site=site, batch_size=batch_size, progress=progress, truncate=truncate)
    return {
        "aligned": cache_activations(aligned, transcripts, positions=positions, **kw),
        "finetuned": cache_activations(finetuned, transcripts, positions=positions, **kw),
        "prefix": cache_activations(finetuned, with_prefix, positions=every("prefix") + positions, **kw),
    }


def compare(
    acts: Mapping[str, Activations],
    harmful: np.ndarray,
    groups: np.ndarray,
    refused: Mapping[str, np.ndarray] | None = None,
    *,
    test_size: float = 0.3,
    C: float | None = None,
    seed: int = 0,
    prefix_tokens: Sequence[str] | None = None,
    at: Selector | str = "decision",
) -> Comparison:
    """Compare the three conditions at every cached layer.

    Args:
        acts: ``{"aligned", "finetuned", "prefix"}`` → activations of the same transcripts, in
            the same order, with one ``decision`` row each (the prefix condition may also hold
            ``every:prefix`` rows), as :func:`cache_conditions` makes them.
        harmful: ``[n]`` task labels (True = harmful).
        groups: ``[n]`` task-template ids; the held-out split never puts a group on both sides.
        refused: optional ``{condition: [n] bool}``, what the model did (from the behaviour
            judges). When given, decision logits come from refusal probes: the aligned model's
            own, and one fit on the fine-tuned model's rows with and without the prefix.
        C: probe regularisation (None: chosen by grouped cross-validation on the train split).
        prefix_tokens: token strings of the prefix, for labelling per-token logits.
        at: the selector whose rows are compared (one per transcript; default ``decision()``).
    """
    at = parse(at)
    X, harmful, groups, layers = _stacked(acts, harmful, groups, at)
    train, test = check_split(harmful, groups, test_size=test_size, seed=seed, C=C)
    y_tr, y_te = harmful[train], harmful[test]
    fit = dict(C=C, groups=groups[train] if C is None else None, layers=layers, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on near-separable layers
        probes = {c: fit_layer_probes(X[c][train], y_tr, **fit) for c in CONDITIONS}
    within = {c: _acc_auroc(probes[c].decision_function(X[c][test]), y_te) for c in CONDITIONS}
    transfer = {c: _acc_auroc(probes["aligned"].decision_function(X[c][test]), y_te) for c in ("finetuned", "prefix")}
    direction = _direction_summary(X, train, test, y_tr, y_te)
    logit_probe, logit_probes, refusal_summary = _logit_probes(X, refused, probes, train, test, groups, fit)
    harmful_test = test[y_te]
    dlogit = {c: logit_probes[c].decision_function(X[c][harmful_test]) for c in CONDITIONS}  # [n_h, L]
    records = [_layer_record(j, layer, within, transfer, direction, refusal_summary, dlogit, seed)
               for j, layer in enumerate(layers)]
    prefix_logits, tokens = _prefix_logits(acts["prefix"], harmful_test, logit_probes["prefix"], layers, seed,
                                           prefix_tokens)
    return Comparison(layers=records, prefix_tokens=tokens, prefix_logits=prefix_logits, logit_probe=logit_probe,
                      n_train=int(len(train)), n_test=int(len(test)),
                      meta={"site": acts["aligned"].site, "at": at.name, "test_size": test_size, "seed": seed,
                            "n_harmful_test": int(len(harmful_test))},
                      probes={**{f"harmful_{c}": probes[c] for c in CONDITIONS},
                              **{f"logit_{c}": logit_probes[c] for c in CONDITIONS}},
                      split=(train, test))


def _stacked(acts: Mapping[str, Activations], harmful, groups, at: Selector):
    """Each condition's ``at`` rows as ``[n, L, d]`` float tensors, checked against each other and
    against the labels: ``(X, harmful [n] bool, groups [n], layers)``."""
    missing = [c for c in CONDITIONS if c not in acts]
    if missing:
        raise ValueError(f"acts lacks conditions {missing} (need {', '.join(CONDITIONS)})")
    dec = {c: acts[c].where(selector=at) for c in CONDITIONS}
    n = len(dec["aligned"].transcripts)
    harmful = class_array(harmful, "harmful")
    groups = np.asarray(groups)
    if harmful.shape != (n,) or groups.shape != (n,):
        raise ValueError(f"harmful and groups must be [n={n}], got {harmful.shape} and {groups.shape}")
    layers = dec["aligned"].layers
    for c in CONDITIONS:
        if len(dec[c].transcripts) != n or dec[c].layers != layers:
            raise ValueError(f"condition {c!r} holds {len(dec[c].transcripts)} transcripts at layers "
                             f"{list(dec[c].layers)}; expected {n} at {list(layers)}")
    return {c: dec[c].stack().float() for c in CONDITIONS}, harmful, groups, layers


def _direction_summary(X, train, test, y_tr, y_te) -> dict[str, Any]:
    """The aligned model's difference-in-means direction on each condition's test rows (AUROC, d′
    per layer) and its cosine with the fine-tuned model's own direction."""
    direction = {c: diff_in_means(X[c][train], y_tr) for c in ("aligned", "finetuned")}  # [L, d]
    proj = {c: project(X[c][test], direction["aligned"]).double().numpy() for c in CONDITIONS}
    return {"cos": cosine_similarity(direction["aligned"], direction["finetuned"]).numpy(),
            "auroc": {c: np.asarray(auroc(y_te, proj[c])) for c in CONDITIONS},
            "dprime": {c: dprime(torch.as_tensor(proj[c]), y_te).numpy() for c in CONDITIONS}}


def _logit_probes(X, refused, probes, train, test, groups, fit) -> tuple[str, dict, dict | None]:
    """The probes behind each condition's decision logits: refusal probes when behaviour is known
    (the aligned model's own; one fit on the fine-tuned rows with and without the prefix), else
    the harmful probes. Returns their kind, the probes and the refusal probe's held-out summary."""
    if refused is None:
        return "harmful", {"aligned": probes["aligned"], "finetuned": probes["finetuned"],
                           "prefix": probes["finetuned"]}, None
    r = {c: class_array(refused[c], f"refused[{c!r}]") for c in CONDITIONS}
    aligned_probe = _fit_or_none(X["aligned"][train], r["aligned"][train], fit)
    ft_rows = torch.cat([X["finetuned"][train], X["prefix"][train]])
    ft_y = np.concatenate([r["finetuned"][train], r["prefix"][train]])
    ft_fit = dict(fit, groups=np.concatenate([groups[train]] * 2) if fit["C"] is None else None)
    ft_probe = _fit_or_none(ft_rows, ft_y, ft_fit)
    summary = None
    if ft_probe is not None:
        te_rows = torch.cat([X["finetuned"][test], X["prefix"][test]])
        te_y = np.concatenate([r["finetuned"][test], r["prefix"][test]])
        if len(np.unique(te_y)) == 2:
            summary = _acc_auroc(ft_probe.decision_function(te_rows), te_y)
            summary["n"] = int(len(te_y))
    if ft_probe is None and aligned_probe is not None:
        warnings.warn("the fine-tuned model's refusal labels (with and without the prefix) have a single class; "
                      "every condition's decision logits use the aligned model's refusal probe", stacklevel=3)
        return "aligned refusal", dict.fromkeys(CONDITIONS, aligned_probe), summary
    if aligned_probe is None or ft_probe is None:
        warnings.warn("refusal labels have a single class in some condition; its decision logits use the "
                      "harmful probe instead", stacklevel=3)
    return "refusal", {"aligned": aligned_probe or probes["aligned"], "finetuned": ft_probe or probes["finetuned"],
                       "prefix": ft_probe or probes["finetuned"]}, summary


def _layer_record(j, layer, within, transfer, direction, refusal_summary, dlogit, seed) -> dict:
    rec: dict[str, Any] = {"layer": int(layer)}
    for c in CONDITIONS:
        rec[c] = _summary(within[c], j)
    for c in ("finetuned", "prefix"):
        rec[f"transfer_to_{c}"] = _summary(transfer[c], j)
    rec["direction"] = {
        "auroc": {c: float(direction["auroc"][c][j]) for c in CONDITIONS},
        "dprime": {c: float(direction["dprime"][c][j]) for c in CONDITIONS},
        "cosine_aligned_finetuned": float(direction["cos"][j]),
    }
    rec["refusal"] = None if refusal_summary is None else {**_summary(refusal_summary, j), "n": refusal_summary["n"]}
    rec["decision_logit"] = {c: _mean_interval(dlogit[c][:, j], seed).to_dict() for c in CONDITIONS}
    return rec


def _fit_or_none(X, y, fit):
    """A probe, or None when a class has too few rows (for C=None, fewer than its folds)."""
    y = np.asarray(y, dtype=bool)
    if min(y.sum(), (~y).sum()) < (CV_FOLDS if fit["C"] is None else 2):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit_layer_probes(X, y, **fit)


def _prefix_logits(prefix_acts: Activations, harmful_test: np.ndarray, probe, layers, seed,
                   prefix_tokens) -> tuple[list[dict], list[str]]:
    """Mean probe logit (with intervals) at each prefix token over harmful test transcripts."""
    if every("prefix") not in set(prefix_acts.selectors):
        return [], []
    rows = prefix_acts.where(selector=every("prefix"))
    t = rows.rows["transcript"]
    keep = np.isin(t, harmful_test)
    counts = np.bincount(t[keep], minlength=len(prefix_acts.transcripts))[harmful_test]
    if len(set(counts.tolist())) != 1:
        raise ValueError("transcripts hold different numbers of prefix tokens; per-token logits need one prefix")
    k = int(counts[0])
    logits = probe.decision_function(rows.acts[torch.as_tensor(np.flatnonzero(keep))].float())  # [n_h * k, L]
    logits = logits.reshape(len(harmful_test), k, len(layers))
    tokens = list(prefix_tokens) if prefix_tokens is not None and len(prefix_tokens) == k else [str(i) for i in range(k)]
    out = []
    for j, layer in enumerate(layers):
        out.append({"layer": int(layer), "positions": [
            {"token": tokens[i], **_mean_interval(logits[:, i, j], seed).to_dict()} for i in range(k)]})
    return out, tokens


def pca_projection(acts: Mapping[str, Activations], layer: int, harmful: np.ndarray,
                   refused: Mapping[str, np.ndarray] | None = None, at: Selector | str = "decision") -> dict:
    """Each condition's ``at`` activations at ``layer`` on the aligned model's first two
    principal components (one basis for all, so shifts between conditions show):
    ``{"layer", "site", "explained_variance_ratio", "basis", "conditions": {c: {"x", "y",
    "harmful", "refused"}}}``."""
    at = parse(at)
    X = {c: acts[c].where(selector=at).layer(layer).double() for c in CONDITIONS}  # [n, d]
    mean = X["aligned"].mean(0)
    _, s, v = torch.linalg.svd(X["aligned"] - mean, full_matrices=False)
    var = (s ** 2) / (s ** 2).sum()
    out = {"layer": int(layer), "site": acts["aligned"].site, "basis": "aligned",
           "explained_variance_ratio": [float(var[0]), float(var[1])], "conditions": {}}
    for c in CONDITIONS:
        xy = (X[c] - mean) @ v[:2].T
        out["conditions"][c] = {"x": xy[:, 0].tolist(), "y": xy[:, 1].tolist(),
                                "harmful": [bool(h) for h in harmful],
                                "refused": None if refused is None else [bool(r) for r in refused[c]]}
    return out


def token_logits(model: Model, transcripts: Sequence[Transcript], coef: np.ndarray, intercept: float, layer: int,
                 *, site: Site = "resid_post", batch_size: int = 16, progress: bool = False) -> list[dict]:
    """A linear probe's logit at every token of each transcript:
    ``[{"id", "tokens", "kinds", "logits"}]`` (``coef [d_model]`` on ``site`` of ``layer``)."""
    rendered = render_for(model, transcripts)
    acts = cache_activations(model, rendered, layers=[layer], site=site, positions="all", batch_size=batch_size,
                             progress=progress)
    logits = (acts.layer(layer).double() @ torch.as_tensor(coef, dtype=torch.float64) + float(intercept)).numpy()
    out = []
    for i, r in enumerate(rendered):
        rows = acts.rows["transcript"] == i
        out.append({"id": r.id, "tokens": [model.tokenizer.decode([t]) for t in r.input_ids],
                    "kinds": [SEGMENT_KINDS[k] for k in r.kind], "logits": logits[rows].tolist()})
    return out
