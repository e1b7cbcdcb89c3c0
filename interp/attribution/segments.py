"""Segment attribution: how much each segment of a transcript drives a metric at its decision
position, exactly (intervened forwards) or by gradients (attribution patching, integrated
gradients). See :mod:`interp.attribution` for the definitions."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
from tqdm.auto import tqdm

from interp.attribution.engine import SITE, Metric, baseline_name, baseline_values, metric_gradients, prepare, run_metric
from interp.cache import pad_batch
from interp.models import Model, check_choice, hook_name
from interp.positions import decision as decision_selector
from interp.transcripts import SEGMENT_KINDS, RenderedTranscript, Transcript

Method = Literal["exact", "grad", "ig"]
METHODS: tuple[str, ...] = get_args(Method)


# --------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class AttributionSegment:
    """A group of token positions attributed together: ``spans`` are ``(start, end)`` runs of the
    rendered transcript (one run, or several when runs of a kind are merged)."""

    name: str
    kind: str
    spans: tuple[tuple[int, int], ...]

    @property
    def positions(self) -> list[int]:
        return [p for a, b in self.spans for p in range(a, b)]


@dataclass(frozen=True, eq=False)
class SegmentAttribution:
    """Effects of every segment of one transcript on the metric at every layer.

    ``effects[i, j]`` is ``metric(clean) − metric(segment i replaced by the baseline in the
    residual stream entering block layers[j])``, exact or its gradient estimate:
    ``[n_segments, n_layers]``. ``total [n_layers]`` is the same with every position replaced at
    once (exact: one more forward per layer; grad: the sum over segments).
    """

    transcript: str
    labels: Mapping[str, Any]
    segments: tuple[AttributionSegment, ...]
    layers: tuple[int, ...]
    effects: np.ndarray  # [n_segments, n_layers]
    total: np.ndarray  # [n_layers]
    clean: float
    decision: int
    metric: str
    method: str
    baseline: str

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.segments]

    @property
    def kinds(self) -> list[str]:
        return [s.kind for s in self.segments]

    def effect(self, name: str) -> np.ndarray:
        """The ``[n_layers]`` effects of the segment called ``name``."""
        if name not in self.names:
            raise KeyError(f"no segment {name!r} in transcript {self.transcript!r} (segments: {self.names})")
        return self.effects[self.names.index(name)]

    def records(self) -> list[dict]:
        """One tidy row per (segment, layer)."""
        return [{"transcript": self.transcript, "segment": s.name, "kind": s.kind, "start": s.spans[0][0],
                 "end": s.spans[-1][1], "n_tokens": len(s.positions), "layer": layer,
                 "hook": hook_name(layer, SITE), "effect": float(self.effects[i, j]), "clean": self.clean,
                 "metric": self.metric, "method": self.method, "baseline": self.baseline}
                for i, s in enumerate(self.segments) for j, layer in enumerate(self.layers)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(labels=dict(self.labels), effects=self.effects.tolist(), total=self.total.tolist(),
                 hooks=[hook_name(i, SITE) for i in self.layers])
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: Mapping) -> SegmentAttribution:
        d = {k: v for k, v in d.items() if k != "hooks"}
        segs = tuple(AttributionSegment(s["name"], s["kind"], tuple(tuple(x) for x in s["spans"]))
                     for s in d["segments"])
        return cls(**{**d, "segments": segs, "layers": tuple(d["layers"]), "effects": np.asarray(d["effects"]),
                      "total": np.asarray(d["total"])})


# --------------------------------------------------------------------------------------------
# Attribution


def _groups(r: RenderedTranscript, merge: Collection[str], per_token: Collection[str]) -> list[AttributionSegment]:
    for name, kinds in (("merge", merge), ("per_token", per_token)):
        bad = [k for k in kinds if k not in SEGMENT_KINDS]
        if bad:
            raise ValueError(f"{name}: unknown segment kind(s) {bad} (expected {', '.join(SEGMENT_KINDS)})")
    if set(merge) & set(per_token):
        raise ValueError(f"kinds {sorted(set(merge) & set(per_token))} are both merged and split per token")
    out, merged = [], {}
    for s in r.segments():
        if s.kind in per_token:
            out += [AttributionSegment(f"{s.name}#{k}", s.kind, ((p, p + 1),)) for k, p in enumerate(range(s.start, s.end))]
        elif s.kind in merge:
            merged.setdefault(s.kind, []).append((s.start, s.end))
        else:
            out.append(AttributionSegment(s.name, s.kind, ((s.start, s.end),)))
    out += [AttributionSegment(k, k, tuple(spans)) for k, spans in merged.items()]
    return sorted(out, key=lambda g: g.spans[0][0])

def _decision(r: RenderedTranscript) -> int:
    picks = decision_selector().select(r)
    if not picks:
        raise ValueError(f"transcript {r.id!r} has no decision position (it ends with an assistant message "
                         "that writes nothing); segment attribution reads the metric there")
    return picks[0].position


def segment_attributions(
    model: Model,
    transcripts: Sequence[Transcript | RenderedTranscript],
    metric: Metric,
    *,
    baseline: torch.Tensor | Sequence[Transcript | RenderedTranscript | torch.Tensor],
    method: Method = "exact",
    layers: Sequence[int] | None = None,
    merge: Collection[str] = (),
    per_token: Collection[str] = (),
    batch_size: int = 16,
    steps: int = 8,
    progress: bool = True,
) -> list[SegmentAttribution]:
    """:func:`segment_attribution` of every transcript. ``baseline`` is one ``[n_layers, d_model]``
    mean for all, or one baseline per transcript (a matched benign transcript or a
    ``[n_layers, pos, d_model]`` tensor). The grad method batches ``batch_size`` transcripts per
    forward (left-padded; positions from the attention mask; it keeps every layer's activations
    and gradients, so lower it for large models); the exact method runs ``batch_size − 1``
    interventions of one transcript and a clean reference row per forward; the ig method batches
    like grad and runs ``steps`` forwards and backwards per layer."""
    check_choice(method, METHODS, "method")
    if batch_size < 1 or steps < 1:
        raise ValueError(f"batch_size and steps must be positive, got {batch_size} and {steps}")
    layers, rendered, baselines = prepare(model, metric, transcripts, baseline, layers)
    decisions = [_decision(r) for r in rendered]
    groups = [_groups(r, merge, per_token) for r in rendered]
    if method == "exact":
        n_forwards = sum(-(-len(layers) * (len(g) + 1) // max(batch_size - 1, 1)) for g in groups)
    else:
        n_forwards = -(-len(rendered) // batch_size) * (steps * len(layers) if method == "ig" else 1)
    bar = tqdm(total=n_forwards, desc=f"attribution ({method})", unit="forward", disable=not progress)
    out: list[SegmentAttribution | None] = [None] * len(rendered)
    try:
        if method == "exact":
            for k, r in enumerate(rendered):
                b = baseline_values(model, r, baselines[k], layers)
                clean, effects, total = _exact(model, r, decisions[k], metric, layers, groups[k], b, batch_size, bar)
                out[k] = _record(r, groups[k], layers, effects, total, clean, decisions[k], metric, method, baselines[k])
        else:
            for lo in range(0, len(rendered), batch_size):
                idx = list(range(lo, min(lo + batch_size, len(rendered))))
                b = [baseline_values(model, rendered[k], baselines[k], layers) for k in idx]
                got = _grad(model, [rendered[k] for k in idx], [decisions[k] for k in idx], metric, layers,
                            [groups[k] for k in idx], b, steps if method == "ig" else 0, bar)
                for k, (clean, effects) in zip(idx, got):
                    out[k] = _record(rendered[k], groups[k], layers, effects, effects.sum(0), clean, decisions[k],
                                     metric, method, baselines[k])
    finally:
        bar.close()
    return out


def segment_attribution(
    model: Model,
    transcript: Transcript | RenderedTranscript,
    metric: Metric,
    *,
    baseline: torch.Tensor | Transcript | RenderedTranscript,
    method: Method = "exact",
    layers: Sequence[int] | None = None,
    merge: Collection[str] = (),
    per_token: Collection[str] = (),
    batch_size: int = 16,
    steps: int = 8,
    progress: bool = False,
) -> SegmentAttribution:
    """How much each segment of ``transcript`` drives ``metric`` at its decision position.

    Args:
        model: any backend's handle (hooks go on its ``hf_model``).
        transcript: the transcript (rendered here with the model's chat template) or a rendering.
        metric: :class:`ProbeLogit`, :class:`DirectionProjection` or :class:`LogitDiff`.
        baseline: a ``[n_layers, d_model]`` mean residual (:func:`mean_residual`; mean ablation),
            a matched benign transcript to patch from (see the module docstring), or the values
            to patch in at every position, ``[n_layers, pos, d_model]``.
        method: ``"exact"`` (one intervened forward per segment and layer), ``"grad"``
            (attribution patching: one forward + one backward for all layers and segments) or
            ``"ig"`` (integrated gradients: ``steps`` forwards + backwards per layer).
        layers: blocks whose input is intervened on (default: every block up to where the
            metric is read; later ones cannot change it and raise).
        merge: segment kinds whose runs are attributed as one segment named for the kind (e.g.
            ``("template",)``).
        per_token: segment kinds split into one segment per token (e.g. ``("prefix",)``), named
            ``prefix[5]#0``, ``prefix[5]#1``, ...
        batch_size: rows per forward (see :func:`segment_attributions`).

    Returns:
        A :class:`SegmentAttribution` with ``effects [n_segments, n_layers]``.
    """
    if not (isinstance(baseline, torch.Tensor) and baseline.ndim == 2):
        baseline = [baseline]
    return segment_attributions(model, [transcript], metric, baseline=baseline, method=method, layers=layers,
                                merge=merge, per_token=per_token, batch_size=batch_size, steps=steps,
                                progress=progress)[0]


def _record(r, groups, layers, effects, total, clean, decision, metric, method, baseline) -> SegmentAttribution:
    return SegmentAttribution(
        transcript=r.id, labels=dict(r.transcript.labels), segments=tuple(groups), layers=tuple(layers),
        effects=np.asarray(effects, dtype=np.float64), total=np.asarray(total, dtype=np.float64), clean=float(clean),
        decision=int(decision), metric=metric.name, method=method, baseline=baseline_name(baseline))


def _exact(model, r, decision, metric, layers, groups, baseline, batch_size, bar):
    """Clean value, effects ``[n_groups, n_layers]`` and total ``[n_layers]``, batching
    (layer, group) interventions of one transcript; the last group of each layer is everything.

    Row 0 of every batch is left clean and effects are taken against it: kernels may round
    differently for different batch sizes, and a segment that cannot reach the decision
    position must get exactly zero."""
    ids = torch.as_tensor(r.input_ids)[None]
    where_of = [torch.zeros(len(r), dtype=torch.bool) for _ in groups] + [torch.ones(len(r), dtype=torch.bool)]
    for w, g in zip(where_of, groups):
        w[g.positions] = True
    nothing = torch.zeros(len(r), dtype=torch.bool)
    jobs = [(j, g) for j in range(len(layers)) for g in range(len(where_of))]
    per_batch = max(batch_size - 1, 1)
    drop = np.zeros((len(where_of), len(layers)))
    clean = None
    for lo in range(0, len(jobs), per_batch):
        chunk = jobs[lo:lo + per_batch]
        patches = {layers[j]: (torch.stack([nothing] + [where_of[g] if jj == j else nothing for jj, g in chunk]),
                               baseline[j][None])
                   for j in sorted({j for j, _ in chunk})}
        n = len(chunk) + 1
        with torch.no_grad():
            values = run_metric(model, ids.expand(n, -1), torch.ones(n, len(r), dtype=torch.long), [decision] * n,
                              metric, patches, ())[0].cpu().numpy()
        clean = values[0] if clean is None else clean
        for (j, g), v in zip(chunk, values[1:]):
            drop[g, j] = values[0] - v
        bar.update(1)
    return float(clean), drop[:-1], drop[-1]


def _grad(model, rendered, decisions, metric, layers, groups, baselines, steps, bar):
    """``[(clean, effects [n_groups, n_layers])]`` for a left-padded batch of transcripts: the
    gradient at the clean point (``steps=0``) or averaged over ``steps`` midpoints of the path
    from the baseline (integrated gradients, one layer at a time)."""
    ids, mask, offsets = pad_batch(rendered, model.tokenizer.pad_token_id, "left")
    dec = torch.as_tensor(decisions) + torch.as_tensor(offsets)
    values, acts, grads = metric_gradients(model, ids, mask, dec, metric, layers)
    reals = [slice(int(offsets[k]), int(offsets[k]) + len(r)) for k, r in enumerate(rendered)]
    base = {}
    for j, i in enumerate(layers):
        base[i] = acts[i].clone()
        for k, real in enumerate(reals):
            base[i][k, real] = baselines[k][j].to(acts[i])
    if steps:
        where = torch.as_tensor(mask).bool()
        for i in layers:
            total = torch.zeros_like(acts[i])
            for s in range(steps):
                point = base[i] + (s + 0.5) / steps * (acts[i] - base[i])
                v, a = run_metric(model, ids, mask, dec, metric, {i: (where, point)}, (i,))
                total += torch.autograd.grad(v.sum(), a[i])[0]
                bar.update(1)
            grads[i] = total / steps
    else:
        bar.update(1)
    out = []
    for k, real in enumerate(reals):
        per_pos = torch.stack([((acts[i][k, real] - base[i][k, real]) * grads[i][k, real]).sum(-1).cpu()
                               for i in layers], -1)  # [pos, n_layers]
        effects = torch.stack([per_pos[g.positions].sum(0) for g in groups[k]]).double().numpy()
        out.append((values[k].item(), effects))
    return out
