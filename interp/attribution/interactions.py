"""Interactions between segments: how segments *combine* to drive a metric at the decision
position, exactly (joint versus separate interventions) or by gradient estimates.

Write ``g(K) = f(x[K ← b])`` for the metric after the segments in ``K`` are replaced by the
baseline in the residual stream entering block ℓ (the same interventions as
:mod:`interp.attribution.segments`). The interaction of a set ``T`` of segments is its Möbius term
taken from the clean transcript down::

    I(T) = Σ_{K ⊆ T} (−1)^{|K|} g(K)
    I(S)    = f(x) − f(x[S←b])                                   (the segment's effect)
    I(S, T) = f(x) − f(x[S←b]) − f(x[T←b]) + f(x[S,T←b])          (pairwise)

``I(S, T) > 0``: removing both costs more than the two removals separately (the segments act
together, like the two halves of an AND); ``< 0``: they stand in for each other (an OR). The
terms add up to the effect of removing every candidate segment:
``f(x) − f(x[all ← b]) = Σ_{T ≠ ∅} (−1)^{|T|+1} I(T)`` when every order is computed. A segment
that cannot reach the decision position (after it, or disconnected) has interactions exactly
zero (the exact method compares rows of one batch shape, so nothing but the intervention
differs).

Methods:

- ``"exact"``: one intervened forward per subset of at most ``order`` segments (``1 + n + n(n−1)/2``
  rows per layer for pairs), batched;
- ``"grad"``: the second-order Taylor expansion at the clean point, ``I(S, T) ≈ Δ_Sᵀ H Δ_T`` with
  ``Δ = x − b`` on the segment's positions and ``H`` the metric's Hessian there (one forward and
  a double backward over ``n`` rows: a Hessian-vector product per segment); singles
  ``Δ_S·∇f − ½ Δ_SᵀHΔ_S``. Exact for quadratic metrics, blind where the metric saturates;
- ``"ig"``: integrated gradients in context: with ``IG_S(c)`` segment S's integrated gradients
  from the baseline to a context ``c`` (``steps`` midpoints), ``I(S, T) ≈ IG_S(x) − IG_S(x[T←b]) +
  IG_T(x) − IG_T(x[S←b])``: ``n + 1`` paths. Exact (up to quadrature) when S and T are the only
  segments that differ from the baseline, and in general when no third segment's attribution
  depends on both; singles from completeness, ``Σ IG(x) − Σ IG(x[S←b])``.

The estimates give orders 1 and 2; ``"exact"`` any order (``order=None``: all, for at most
:data:`MAX_EXACT_SEGMENTS` segments). ``scale="sigmoid"`` follows ``σ(metric)`` instead (for a
:class:`~interp.readouts.LogitDiff`, the probability of the first token against the second),
the scale on which an AND of behaviour is an interaction.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
from tqdm.auto import tqdm

from interp.attribution.engine import (Metric, baseline_name, baseline_values, prepare,
                                       run_metric)
from interp.attribution.segments import AttributionSegment, _decision, _groups
from interp.models import Model, check_choice
from interp.transcripts import RenderedTranscript, Transcript

InteractionMethod = Literal["exact", "grad", "ig"]
INTERACTION_METHODS: tuple[str, ...] = get_args(InteractionMethod)
Scale = Literal["raw", "sigmoid"]
SCALES: tuple[str, ...] = get_args(Scale)
MAX_EXACT_SEGMENTS = 12  # all orders of n segments take 2^n forwards per layer


# --------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True, eq=False)
class SegmentInteractions:
    """Interaction terms of the candidate segments of one transcript at every layer.

    ``terms[i]`` is a sorted tuple of segment indices (orders 1 to ``order``) and ``values[i, j]``
    its Möbius term ``I`` at ``layers[j]``: ``[n_terms, n_layers]``. ``turns`` and ``messages``
    place each segment in the conversation (agent step, message index). ``clean`` is the metric
    (on ``scale``) of the clean transcript; ``total [n_layers]`` the exact effect of replacing
    every candidate segment at once."""

    transcript: str
    labels: Mapping[str, Any]
    segments: tuple[AttributionSegment, ...]
    turns: tuple[int, ...]
    messages: tuple[int, ...]
    layers: tuple[int, ...]
    terms: tuple[tuple[int, ...], ...]
    values: np.ndarray
    clean: float
    total: np.ndarray
    decision: int
    metric: str
    scale: str
    method: str
    baseline: str
    order: int

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.segments]

    def _index(self, name: str) -> int:
        if name not in self.names:
            raise KeyError(f"no segment {name!r} in transcript {self.transcript!r} (segments: {self.names})")
        return self.names.index(name)

    def term(self, *names: str) -> np.ndarray:
        """The ``[n_layers]`` term of the segments called ``names`` (any order)."""
        key = tuple(sorted(self._index(n) for n in names))
        if key not in self.terms:
            raise KeyError(f"no term for {names} in transcript {self.transcript!r} (order {self.order} computed)")
        return self.values[self.terms.index(key)]

    @property
    def effects(self) -> np.ndarray:
        """First-order terms, ``[n_segments, n_layers]``."""
        return np.stack([self.values[self.terms.index((i,))] for i in range(len(self.segments))])

    def pairs(self) -> np.ndarray:
        """Pairwise terms as a symmetric ``[n_segments, n_segments, n_layers]`` array (diagonal 0)."""
        n = len(self.segments)
        out = np.zeros((n, n, len(self.layers)))
        for t, v in zip(self.terms, self.values):
            if len(t) == 2:
                out[t[0], t[1]] = out[t[1], t[0]] = v
        return out

    def ranked(self, layer: int, size: int = 2) -> list[tuple[tuple[str, ...], float]]:
        """Terms of ``size`` segments at ``layer``, largest first: ``[(names, value)]``."""
        j = self.layers.index(layer)
        got = [(tuple(self.names[i] for i in t), float(v[j])) for t, v in zip(self.terms, self.values)
               if len(t) == size]
        return sorted(got, key=lambda x: -x[1])

    def edges(self, layer: int, top: int = 6) -> list[dict]:
        """The ``top`` pairs with the largest ``|I|`` at ``layer`` (the graph view's edges)."""
        j = self.layers.index(layer)
        pairs = [(t, float(v[j])) for t, v in zip(self.terms, self.values) if len(t) == 2]
        pairs.sort(key=lambda x: -abs(x[1]))
        return [{"a": t[0], "b": t[1], "value": v} for t, v in pairs[:top]]

    def nodes(self) -> list[dict]:
        return [{"name": s.name, "kind": s.kind, "turn": tu, "message": m, "start": s.spans[0][0],
                 "n_tokens": len(s.positions)} for s, tu, m in zip(self.segments, self.turns, self.messages)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(labels=dict(self.labels), values=self.values.tolist(), total=self.total.tolist(),
                 terms=[list(t) for t in self.terms])
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: Mapping) -> SegmentInteractions:
        segs = tuple(AttributionSegment(s["name"], s["kind"], tuple(tuple(x) for x in s["spans"]))
                     for s in d["segments"])
        return cls(**{**d, "segments": segs, "turns": tuple(d["turns"]), "messages": tuple(d["messages"]),
                      "layers": tuple(d["layers"]), "terms": tuple(tuple(t) for t in d["terms"]),
                      "values": np.asarray(d["values"], dtype=float), "total": np.asarray(d["total"], dtype=float)})


# --------------------------------------------------------------------------------------------
# Interactions


def _subsets(n: int, order: int) -> list[tuple[int, ...]]:
    return [t for k in range(order + 1) for t in itertools.combinations(range(n), k)]


def mobius(values: Mapping[tuple[int, ...], np.ndarray], terms: Sequence[tuple[int, ...]]) -> np.ndarray:
    """``I(T) = Σ_{K⊆T} (−1)^{|K|} g(K)`` for every term, from ``g`` on every needed subset."""
    return np.stack([sum((-1) ** len(k) * values[k] for r in range(len(t) + 1)
                         for k in itertools.combinations(t, r)) for t in terms])


def _check(method, scale, order, batch_size, steps) -> None:
    check_choice(method, INTERACTION_METHODS, "interaction method")
    check_choice(scale, SCALES, "scale")
    if batch_size < 2 or steps < 1:
        raise ValueError(f"batch_size must be >= 2 and steps >= 1, got {batch_size} and {steps}")
    if order is not None and (not isinstance(order, int) or order < 1):
        raise ValueError(f"order must be a positive integer or None (every order), got {order!r}")
    if method != "exact" and order not in (1, 2):
        raise ValueError(f"the {method} method estimates orders 1 and 2 only (order={order!r}); use method='exact'")


def segment_interactions(
    model: Model,
    transcripts: Sequence[Transcript | RenderedTranscript],
    metric: Metric,
    *,
    baseline: torch.Tensor | Sequence[Transcript | RenderedTranscript | torch.Tensor],
    method: InteractionMethod = "exact",
    order: int | None = 2,
    layers: Sequence[int] | None = None,
    merge: Collection[str] = (),
    per_token: Collection[str] = (),
    exclude: Collection[str] = (),
    scale: Scale = "raw",
    batch_size: int = 32,
    steps: int = 8,
    progress: bool = True,
) -> list[SegmentInteractions]:
    """Interaction terms between the segments of each transcript, on ``metric`` at its decision
    position (see the module docstring for the definitions and methods).

    Args:
        baseline: one ``[n_layers, d_model]`` mean (:func:`~interp.attribution.mean_residual`) for
            all, or one per transcript: a matched transcript to patch from (e.g. the benign twin
            with every piece swapped) or ``[n_layers, pos, d_model]`` values.
        order: the highest order of terms (``None``: every order; exact only).
        merge, per_token: how segments are formed (as in
            :func:`~interp.attribution.segment_attributions`).
        exclude: segment kinds that are not candidates (they stay clean), e.g. ``("template",)``.
        batch_size: rows per forward; the exact method pads every batch to this many rows.
        steps: midpoints per integrated-gradient path (``"ig"``).

    Returns:
        One :class:`SegmentInteractions` per transcript.
    """
    _check(method, scale, order, batch_size, steps)
    layers, rendered, baselines = prepare(model, metric, transcripts, baseline, layers)
    out = []
    for r, b in tqdm(list(zip(rendered, baselines)), desc=f"interactions ({method})", unit="transcript",
                     disable=not progress):
        groups = [g for g in _groups(r, merge, per_token) if g.kind not in exclude]
        if not groups:
            raise ValueError(f"transcript {r.id!r} has no candidate segment (every kind is in exclude={sorted(exclude)})")
        k = len(groups) if order is None else min(order, len(groups))
        if method == "exact" and order is None and len(groups) > MAX_EXACT_SEGMENTS:
            raise ValueError(f"every order of {len(groups)} segments takes 2^{len(groups)} forwards per layer; "
                             f"pass order <= 3 or at most {MAX_EXACT_SEGMENTS} segments (merge or exclude kinds)")
        values = baseline_values(model, r, b, layers)
        decision = _decision(r)
        sig = scale == "sigmoid"
        terms = [t for t in _subsets(len(groups), k) if t]
        if method == "exact":
            clean, got, total = _exact(model, r, decision, metric, layers, groups, values, terms, sig, batch_size)
        else:
            clean, total = _clean_and_total(model, r, decision, metric, layers, groups, values, sig, batch_size)
            fn = _hessian if method == "grad" else _integrated
            got = np.stack([fn(model, r, decision, metric, layer, groups, values[j], sig, steps, batch_size)
                            for j, layer in enumerate(layers)], -1)  # [n_terms, n_layers]
            got = got[[i for i, t in enumerate(_subsets(len(groups), 2)[1:]) if len(t) <= k]]
        turns = tuple(int(r.turn[g.spans[0][0]]) for g in groups)
        msgs = tuple(int(r.message[g.spans[0][0]]) for g in groups)
        out.append(SegmentInteractions(
            transcript=r.id, labels=dict(r.transcript.labels), segments=tuple(groups), turns=turns, messages=msgs,
            layers=tuple(layers), terms=tuple(terms), values=np.asarray(got, dtype=np.float64), clean=float(clean),
            total=np.asarray(total, dtype=np.float64), decision=int(decision), metric=metric.name, scale=scale,
            method=method, baseline=baseline_name(b), order=k))
    return out


def segment_interaction(model: Model, transcript: Transcript | RenderedTranscript, metric: Metric, *,
                        baseline: torch.Tensor | Transcript | RenderedTranscript, **kwargs: Any) -> SegmentInteractions:
    """:func:`segment_interactions` of one transcript (same keyword arguments)."""
    if not (isinstance(baseline, torch.Tensor) and baseline.ndim == 2):
        baseline = [baseline]
    return segment_interactions(model, [transcript], metric, baseline=baseline, **{"progress": False, **kwargs})[0]


# --------------------------------------------------------------------------------------------
# The exact method


def _masks(r: RenderedTranscript, groups: Sequence[AttributionSegment]) -> torch.Tensor:
    """``[n_groups, pos]`` bool: the positions of each group."""
    m = torch.zeros(len(groups), len(r), dtype=torch.bool)
    for i, g in enumerate(groups):
        m[i, g.positions] = True
    return m


def _forward_rows(model, r, decision, metric, layers, values, rows, sig, batch_size) -> list[float]:
    """The metric for every ``(layer index, where [pos] bool)`` row, in batches of exactly
    ``batch_size`` rows (row 0 clean, the rest padded with clean rows): every value is computed
    in the same batch shape, so rows whose interventions cannot reach the decision give
    bit-identical values."""
    ids = torch.as_tensor(r.input_ids)[None]
    nothing = torch.zeros(len(r), dtype=torch.bool)
    per = batch_size - 1
    out: list[float] = []
    for lo in range(0, len(rows), per):
        chunk = rows[lo:lo + per]
        pad = [(chunk[0][0], nothing)] * (per - len(chunk))
        full = [(None, nothing)] + chunk + pad
        patches = {layers[j]: (torch.stack([w if jj == j else nothing for jj, w in full]), values[j][None])
                   for j in sorted({j for j, _ in chunk})}
        with torch.no_grad():
            v = run_metric(model, ids.expand(batch_size, -1), torch.ones(batch_size, len(r), dtype=torch.long),
                           [decision] * batch_size, metric, patches, ())[0]
        v = (torch.sigmoid(v) if sig else v).double().cpu().numpy()
        out += list(v[1:1 + len(chunk)])
        if lo == 0:
            out.insert(0, float(v[0]))  # the clean value, first
    return out


def _exact(model, r, decision, metric, layers, groups, values, terms, sig, batch_size):
    """Clean value, terms ``[n_terms, n_layers]`` and total ``[n_layers]``."""
    masks = _masks(r, groups)
    subsets = sorted({k for t in terms for n in range(len(t) + 1) for k in itertools.combinations(t, n)} |
                     {tuple(range(len(groups)))}, key=lambda k: (len(k), k))
    subsets = [k for k in subsets if k]
    rows = [(j, masks[list(k)].any(0)) for j in range(len(layers)) for k in subsets]
    got = _forward_rows(model, r, decision, metric, layers, values, rows, sig, batch_size)
    clean = got[0]
    g = [{(): clean, **{k: got[1 + j * len(subsets) + s] for s, k in enumerate(subsets)}} for j in range(len(layers))]
    out = np.stack([mobius(g[j], terms) for j in range(len(layers))], -1)
    total = np.asarray([clean - g[j][tuple(range(len(groups)))] for j in range(len(layers))])
    return clean, out, total


def _clean_and_total(model, r, decision, metric, layers, groups, values, sig, batch_size):
    everything = _masks(r, groups).any(0)
    got = _forward_rows(model, r, decision, metric, layers, values, [(j, everything) for j in range(len(layers))],
                        sig, batch_size)
    return got[0], np.asarray([got[0] - v for v in got[1:]])


# --------------------------------------------------------------------------------------------
# The estimates


def _with_grad(model, r, decision, metric, layer, points, sig):
    """Metric values ``[rows]`` (on the scale) at ``points [rows, pos, d]`` put in at ``layer``, and
    the leaf ``[rows, pos, d]`` they were computed from."""
    n = points.shape[0]
    ids = torch.as_tensor(r.input_ids)[None].expand(n, -1)
    where = torch.ones(n, len(r), dtype=torch.bool)
    with torch.enable_grad():
        v, acts = run_metric(model, ids, torch.ones(n, len(r), dtype=torch.long), [decision] * n, metric,
                             {layer: (where, points)}, (layer,))
        return (torch.sigmoid(v) if sig else v), acts[layer]


def _clean_residual(model, r, layer) -> torch.Tensor:
    ids = torch.as_tensor(r.input_ids)[None]
    return model.residual(ids, torch.ones_like(ids), [layer], "resid_pre")[layer][0]


def _pair_terms(singles: torch.Tensor, pair: torch.Tensor) -> np.ndarray:
    """Order-1 then order-2 terms (the order of :func:`_subsets`) from ``singles [n]`` and a
    symmetric ``pair [n, n]``."""
    n = singles.shape[0]
    return np.asarray([float(singles[i]) for i in range(n)] +
                      [float(pair[i, j]) for i, j in itertools.combinations(range(n), 2)])


def _hessian(model, r, decision, metric, layer, groups, base, sig, steps, batch_size) -> np.ndarray:
    """Second-order Taylor terms at the clean point: one Hessian-vector product per segment."""
    clean = _clean_residual(model, r, layer)
    dtype = torch.promote_types(clean.dtype, torch.float32)
    delta = (clean.to(dtype) - base.to(clean.device, dtype))  # [pos, d]
    dirs = _masks(r, groups).to(clean.device)[..., None] * delta  # [n, pos, d]
    n = len(groups)
    with torch.enable_grad():
        v, x = _with_grad(model, r, decision, metric, layer, clean.expand(n, -1, -1).to(dtype), sig)
        g = torch.autograd.grad(v.sum(), x, create_graph=True)[0]
        first = (g * dirs).sum((1, 2))
        hv = torch.autograd.grad(first.sum(), x, allow_unused=True)[0]
    hv = torch.zeros_like(x) if hv is None else hv
    m = torch.einsum("kpd,lpd->kl", hv.detach().double(), dirs.double())
    m = (m + m.T) / 2
    return _pair_terms(first.detach().double() - m.diagonal() / 2, m)


def _integrated(model, r, decision, metric, layer, groups, base, sig, steps, batch_size) -> np.ndarray:
    """Integrated gradients from the baseline to the clean context and to each context with one
    segment replaced: ``n + 1`` paths of ``steps`` midpoints."""
    clean = _clean_residual(model, r, layer)
    dtype = torch.promote_types(clean.dtype, torch.float32)
    clean, base = clean.to(dtype), base.to(clean.device, dtype)
    masks = _masks(r, groups).to(clean.device)
    contexts = torch.stack([clean] + [torch.where(m[:, None], base, clean) for m in masks])  # [n+1, pos, d]
    alphas = (torch.arange(steps, dtype=dtype, device=clean.device) + 0.5) / steps
    points = (base + alphas[None, :, None, None] * (contexts - base)[:, None]).flatten(0, 1)  # [(n+1)·steps, pos, d]
    n_rows = points.shape[0]
    pad = -n_rows % batch_size  # every batch the same shape: equal rows give bit-equal gradients
    points = torch.cat([points, points[:1].expand(pad, -1, -1)])
    grads = []
    for lo in range(0, points.shape[0], batch_size):
        v, x = _with_grad(model, r, decision, metric, layer, points[lo:lo + batch_size], sig)
        grads.append(torch.autograd.grad(v.sum(), x)[0].detach())
    mean_grad = torch.cat(grads)[:n_rows].view(len(contexts), steps, *clean.shape).mean(1)  # [n+1, pos, d]
    per_pos = ((contexts - base) * mean_grad).sum(-1).double()  # [n+1, pos]
    ig = per_pos @ masks.double().T  # [n+1 contexts, n segments]
    singles = per_pos[0].sum() - per_pos[1:].sum(1)  # completeness: f(x) − f(x[S←b])
    pair = ig[0][:, None] - ig[1:].T  # [S, T]: IG_S(x) − IG_S(x[T←b])
    return _pair_terms(singles, pair + pair.T)
