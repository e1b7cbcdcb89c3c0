"""Which transcript segment drives the refusal signal at the decision position?

A *metric* is one number per transcript read at the decision position (the
:func:`~interp.positions.decision` selector): a probe's logit or a projection on a direction in
the residual stream of one layer, or the difference of two output logits. A segment's *effect*
at layer ℓ is how much the metric drops when the segment's positions of the residual stream
entering block ℓ (``resid_pre``) are replaced by a baseline and the forward pass continues::

    effect[S, ℓ] = metric(clean) − metric(x_ℓ[S] ← b_ℓ[S])

Two ways to get it:

- ``method="exact"``: one intervened forward per (segment, layer), batched;
- ``method="grad"``: attribution patching, the first-order estimate
  ``Σ_{p∈S} (x_{ℓ,p} − b_{ℓ,p}) · ∂metric/∂x_{ℓ,p}`` for every layer and segment from one
  forward and one backward per transcript (transcripts batched with padding);
- ``method="ig"``: integrated gradients along the straight path from the baseline to the
  clean residual stream of each layer (``steps`` midpoints, one forward and backward each per
  layer): the same sum with the gradient averaged over the path. Its effects add up, over all
  segments, to the effect of replacing every position (up to the quadrature error), which the
  one-point gradient does not when the metric saturates.

Baselines: mean ablation (a ``[n_layers, d_model]`` mean residual from :func:`mean_residual`,
the same vector at every position of a layer), patching from a matched benign transcript, or
any ``[n_layers, pos, d_model]`` values. Patching pairs the segments of the two renderings by
(kind, message, call, occurrence); a segment with as many tokens in both is patched position by
position, otherwise its positions are all filled with the benign segment's mean at that layer
(patching can only be positional when positions correspond).

Segments are the runs of :meth:`~interp.transcripts.RenderedTranscript.segments`, optionally
merged by kind or split per token. The run holding the decision token itself (the end of the
generation prompt, or the last prefix token) replaces what the metric reads and usually
dominates; a segment after the decision position gets exactly zero.

Example::

    mean = mean_residual(model, reference_transcripts)                # [n_layers, d_model]
    metric = ProbeLogit.from_probes(refusal_probes, layer=3)
    a = segment_attribution(model, transcript, metric, baseline=mean, method="grad")
    a.effects                                                         # [n_segments, n_layers]
    table = kind_effects(segment_attributions(model, harmful, metric, baseline=mean))
    agreement = rank_agreement(exact_results, grad_results)           # Spearman over segments
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.stats import rankdata
from tqdm.auto import tqdm

from interp.cache import pad_batch, render_for
from interp.models import Model, _first_tensor, _mid_norm_name, hook_name, position_ids_from_mask
from interp.positions import decision as decision_selector
from interp.transcripts import SEGMENT_KINDS, RenderedTranscript, Transcript

if TYPE_CHECKING:
    from probes import LayerProbes

METHODS = ("exact", "grad", "ig")
SITE = "resid_pre"  # where interventions happen: the residual stream entering each block

# --------------------------------------------------------------------------------------------
# Metrics: [batch, d_model] residual (or [batch, d_vocab] logits) at the decision position -> [batch]


def _vector(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x.detach()).float().cpu()
    if t.ndim != 1 or not torch.isfinite(t).all():
        raise ValueError(f"{name} must be a finite [d_model] vector, got shape {list(t.shape)}")
    return t


@dataclass(frozen=True, eq=False)
class ProbeLogit:
    """A linear probe's logit ``x · coef + intercept`` on the residual stream at ``layer``."""

    coef: torch.Tensor  # [d_model]
    intercept: float
    layer: int
    site: str = "resid_post"

    def __post_init__(self):
        object.__setattr__(self, "coef", _vector(self.coef, "coef"))
        object.__setattr__(self, "intercept", float(self.intercept))

    @classmethod
    def from_probes(cls, layer_probes: LayerProbes, layer: int, site: str = "resid_post") -> ProbeLogit:
        """The probe of ``layer`` from a :class:`probes.LayerProbes` (``layer`` is looked up in
        its ``layers_``, which must name model layers: fit on all layers, or pass ``layers=``)."""
        if layer not in layer_probes.layers_:
            raise ValueError(f"layer {layer} has no probe (the probes' layers_ are {list(layer_probes.layers_)})")
        i = list(layer_probes.layers_).index(layer)
        return cls(layer_probes.coef_[i], float(layer_probes.intercept_[i]), int(layer), site)

    @property
    def name(self) -> str:
        return f"probe_logit@{hook_name(self.layer, self.site)}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.coef.to(x) + self.intercept


@dataclass(frozen=True, eq=False)
class DirectionProjection:
    """Projection ``x · r̂`` of the residual stream at ``layer`` on the unit direction ``r̂``."""

    direction: torch.Tensor  # [d_model], normalised here
    layer: int
    site: str = "resid_post"

    def __post_init__(self):
        r = _vector(self.direction, "direction")
        if r.norm() == 0:
            raise ValueError("direction has norm zero")
        object.__setattr__(self, "direction", r / r.norm())

    @property
    def name(self) -> str:
        return f"projection@{hook_name(self.layer, self.site)}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.direction.to(x)


@dataclass(frozen=True)
class LogitDiff:
    """Output logit of ``token_a`` minus that of ``token_b`` (e.g. the first token of a refusal
    minus the first token of a tool call) for the token after the decision position."""

    token_a: int
    token_b: int
    layer = None  # reads the output logits, after every layer
    site = "logits"

    @property
    def name(self) -> str:
        return f"logit_diff[{self.token_a}-{self.token_b}]"

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, self.token_a] - logits[:, self.token_b]


Metric = ProbeLogit | DirectionProjection | LogitDiff


def _check_metric(model: Model, metric: Metric) -> None:
    if metric.layer is None:
        vocab = int(model.hf_model.get_output_embeddings().weight.shape[0])
        for t in (metric.token_a, metric.token_b):
            if not 0 <= int(t) < vocab:
                raise ValueError(f"{metric.name}: token id {t} is outside the vocabulary (0..{vocab - 1})")
        return
    try:
        model.check_layers([metric.layer], metric.site)
    except ValueError as e:
        raise ValueError(f"metric {metric.name}: {e}") from None
    size = (metric.coef if isinstance(metric, ProbeLogit) else metric.direction).shape[0]
    if size != model.d_model:
        raise ValueError(f"metric {metric.name} has a [{size}] vector; {model.name} has d_model={model.d_model}")


# --------------------------------------------------------------------------------------------
# The engine: one forward reading the metric at the decision position, with optional patches of
# resid_pre and optional gradients with respect to it.


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Metrics and attributions are computed in float32, or float64 for a float64 model."""
    return torch.promote_types(dtype, torch.float32)


class _Stop(Exception):
    """Raised once the metric has been read: later blocks cannot change it."""


Patches = Mapping[int, tuple[torch.Tensor, torch.Tensor]]
"""``{layer: (where [batch, pos] bool, values [batch or 1, pos, d_model])}``: the residual stream
entering block ``layer`` is replaced by ``values`` where ``where`` is True."""


def _replace_input(args, kwargs, x):
    if args:
        return (x, *args[1:]), kwargs
    return args, dict(kwargs, hidden_states=x)


def _forward(model: Model, input_ids, attention_mask, decision, metric: Metric, patches: Patches | None,
             grad_layers: Sequence[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    dev = model.device
    ids, mask = torch.as_tensor(input_ids).to(dev), torch.as_tensor(attention_mask).to(dev)
    decision = torch.as_tensor(decision, dtype=torch.long).to(dev)
    if ids.ndim != 2 or mask.shape != ids.shape or decision.shape != (ids.shape[0],):
        raise ValueError(f"input_ids and attention_mask must be [batch, pos] and decision [batch]; got "
                         f"{list(ids.shape)}, {list(mask.shape)}, {list(decision.shape)}")
    rows = torch.arange(ids.shape[0], device=dev)
    patches = dict(patches or {})
    lowest = min(grad_layers, default=None)
    acts: dict[int, torch.Tensor] = {}
    out: list[torch.Tensor] = []

    def pre(i: int):
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if i in patches:
                where, values = patches[i]
                x = torch.where(where.to(dev)[..., None], values.to(device=dev, dtype=x.dtype), x)
            if i == lowest:  # a leaf: the backward stops here, upstream layers need no graph
                x = x.detach().requires_grad_(True)
            if i in grad_layers:
                acts[i] = x
            return _replace_input(args, kwargs, x)
        return hook

    def read(x: torch.Tensor) -> None:
        out.append(metric(x[rows, decision].to(_work_dtype(x.dtype))))
        raise _Stop

    handles = [model.layers[i].register_forward_pre_hook(pre(i), with_kwargs=True)
               for i in sorted(set(patches) | set(grad_layers))]
    # registered after the patches so a metric reading resid_pre of a patched layer sees the patch
    if metric.layer is None:  # feed the head only the decision positions: [batch, 1, d_vocab]
        handles.append(model.hf_model.get_output_embeddings().register_forward_pre_hook(
            lambda mod, args: (args[0][rows, decision][:, None], *args[1:])))
    elif metric.site == "resid_pre":
        handles.append(model.layers[metric.layer].register_forward_pre_hook(
            lambda mod, args, kwargs: read(args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
    elif metric.site == "resid_mid":
        block = model.layers[metric.layer]
        handles.append(getattr(block, _mid_norm_name(block)).register_forward_pre_hook(
            lambda mod, args: read(args[0])))
    else:
        handles.append(model.layers[metric.layer].register_forward_hook(
            lambda mod, args, output: read(_first_tensor(output))))
    try:
        with torch.set_grad_enabled(bool(grad_layers)):
            logits = model.hf_model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                    use_cache=False).logits
            out.append(metric(logits[:, -1].to(_work_dtype(logits.dtype))))
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return out[0], acts


def patched_metric(model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor, decision: torch.Tensor,
                   metric: Metric, patches: Patches | None = None) -> torch.Tensor:
    """The metric at ``decision [batch]`` (indices into the padded rows) after replacing the
    residual stream entering chosen blocks: ``patches = {layer: (where [batch, pos] bool,
    values [batch or 1, pos, d_model])}``. Positions come from the attention mask, so any
    padding side works. Returns ``[batch]`` (float32; float64 for a float64 model)."""
    _check_metric(model, metric)
    if patches:
        model.check_layers(list(patches), SITE)
    with torch.no_grad():
        return _forward(model, input_ids, attention_mask, decision, metric, patches, ())[0].detach()


def metric_gradients(model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor, decision: torch.Tensor,
                     metric: Metric, layers: Sequence[int]
                     ) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """One forward and one backward: the metric ``[batch]``, the residual stream entering each of
    ``layers`` and the metric's gradient with respect to it, ``{layer: [batch, pos, d_model]}``.
    Rows are independent (row b's gradient is that of its own metric); padded positions get
    exactly zero gradient."""
    _check_metric(model, metric)
    layers = _resolve_layers(model, metric, layers)
    values, acts = _forward(model, input_ids, attention_mask, decision, metric, None, layers)
    grads = torch.autograd.grad(values.sum(), [acts[i] for i in layers], allow_unused=True)
    grads = {i: torch.zeros_like(acts[i]) if g is None else g for i, g in zip(layers, grads)}
    return values.detach(), {i: a.detach() for i, a in acts.items()}, grads


# --------------------------------------------------------------------------------------------
# Baselines


@torch.no_grad()
def mean_residual(model: Model, transcripts: Sequence[Transcript | RenderedTranscript], *, batch_size: int = 8,
                  progress: bool = True) -> torch.Tensor:
    """Mean residual stream entering every block over all real tokens of ``transcripts`` (the
    mean-ablation baseline): ``[n_layers, d_model]`` float32."""
    rendered = render_for(model, transcripts)
    layers = list(range(model.n_layers))
    total = torch.zeros(model.n_layers, model.d_model, dtype=torch.float64)
    count = 0
    for lo in tqdm(range(0, len(rendered), batch_size), desc="mean residual", unit="batch", disable=not progress):
        ids, mask, _ = pad_batch(rendered[lo:lo + batch_size], model.tokenizer.pad_token_id)
        keep = mask.to(model.device).bool()[..., None]  # where, not a product: padded rows may hold NaN
        got = model.residual(ids, mask, layers, SITE, gather=lambda x: torch.where(keep, x.double(), 0).sum((0, 1)).cpu())
        total += torch.stack([got[i] for i in layers])
        count += int(mask.sum())
    return (total / count).float()


def _segment_key(r: RenderedTranscript) -> dict[tuple, Any]:
    """Segments keyed by (kind, message, call, occurrence): what 'the same segment' means in two
    renderings of transcripts with the same structure."""
    seen: dict[tuple, int] = {}
    out = {}
    for s in r.segments():
        k = (s.kind, s.message, s.call)
        seen[k] = seen.get(k, -1) + 1
        out[(*k, seen[k])] = s
    return out


def _baseline_values(model: Model, r: RenderedTranscript, baseline, layers: list[int]) -> torch.Tensor:
    """The baseline at every position of ``r``: ``[len(layers), pos, d_model]``."""
    dtype = _work_dtype(next(model.hf_model.parameters()).dtype)
    if isinstance(baseline, torch.Tensor):
        b = baseline[layers].to("cpu", dtype)
        return b[:, None, :].expand(-1, len(r), -1) if b.ndim == 2 else b
    benign = render_for(model, [baseline])[0]
    ids = torch.as_tensor(benign.input_ids)[None]
    got = model.residual(ids, torch.ones_like(ids), layers, SITE)
    acts = torch.stack([got[i][0].to("cpu", dtype) for i in layers])  # [n_layers, pos_benign, d]
    values = torch.empty(len(layers), len(r), model.d_model, dtype=dtype)
    theirs = _segment_key(benign)
    for key, s in _segment_key(r).items():
        if key not in theirs:
            raise ValueError(f"baseline transcript {benign.id!r} has no segment matching {s.name} "
                             f"(occurrence {key[3]}) of transcript {r.id!r}; patching needs matched transcripts")
        b = theirs[key]
        src = acts[:, b.start:b.end]
        values[:, s.start:s.end] = src if b.end - b.start == s.end - s.start else src.mean(1, keepdim=True)
    return values


def _baseline_name(baseline) -> str:
    if isinstance(baseline, torch.Tensor):
        return "mean" if baseline.ndim == 2 else "tensor"
    return f"patch:{baseline.id}"


def _check_baseline(model: Model, baseline, r: RenderedTranscript) -> None:
    if isinstance(baseline, torch.Tensor):
        n, d = model.n_layers, model.d_model
        if tuple(baseline.shape) not in ((n, d), (n, len(r), d)):
            raise ValueError(f"baseline must be [n_layers={n}, d_model={d}] (a mean from mean_residual) or "
                             f"[n_layers={n}, pos={len(r)}, d_model={d}] (values at every position of transcript "
                             f"{r.id!r}), got {list(baseline.shape)}")
    elif not isinstance(baseline, (Transcript, RenderedTranscript)):
        raise TypeError(f"baseline must be a tensor or a matched Transcript (patching), got {type(baseline).__name__}")


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


def _resolve_layers(model: Model, metric: Metric, layers: Sequence[int] | None) -> list[int]:
    last = model.n_layers - 1 if metric.layer is None else model.check_layers([metric.layer], metric.site)[0]
    if layers is None:
        return list(range(last + 1))
    layers = model.check_layers(list(layers), SITE)
    late = [i for i in layers if i > last]
    if late:
        raise ValueError(f"layers {late} come after the metric {metric.name} is read; intervening there "
                         f"cannot change it (use layers 0..{last})")
    return sorted(set(layers))


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
    method: str = "exact",
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
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (expected one of {', '.join(METHODS)})")
    if batch_size < 1 or steps < 1:
        raise ValueError(f"batch_size and steps must be positive, got {batch_size} and {steps}")
    _check_metric(model, metric)
    layers = _resolve_layers(model, metric, layers)
    rendered = render_for(model, transcripts)
    shared = isinstance(baseline, torch.Tensor) and baseline.ndim != 3
    baselines = [baseline] * len(rendered) if shared else list(baseline)
    if len(baselines) != len(rendered):
        raise ValueError(f"got {len(baselines)} baselines for {len(rendered)} transcripts; patching needs one "
                         "matched transcript (or [n_layers, pos, d_model] tensor) each")
    for r, b in zip(rendered, baselines):
        _check_baseline(model, b, r)
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
                b = _baseline_values(model, r, baselines[k], layers)
                clean, effects, total = _exact(model, r, decisions[k], metric, layers, groups[k], b, batch_size, bar)
                out[k] = _record(r, groups[k], layers, effects, total, clean, decisions[k], metric, method, baselines[k])
        else:
            for lo in range(0, len(rendered), batch_size):
                idx = list(range(lo, min(lo + batch_size, len(rendered))))
                b = [_baseline_values(model, rendered[k], baselines[k], layers) for k in idx]
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
    method: str = "exact",
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
        decision=int(decision), metric=metric.name, method=method, baseline=_baseline_name(baseline))


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
            values = _forward(model, ids.expand(n, -1), torch.ones(n, len(r), dtype=torch.long), [decision] * n,
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
                v, a = _forward(model, ids, mask, dec, metric, {i: (where, point)}, (i,))
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


# --------------------------------------------------------------------------------------------
# Tables over many transcripts, and the fast method against the exact one


@dataclass(frozen=True, eq=False)
class KindEffects:
    """Effects summed over the segments of each kind within a transcript, then averaged over
    transcripts having that kind: ``mean``/``sem`` ``[n_kinds, n_layers]``, ``n [n_kinds]``."""

    kinds: tuple[str, ...]
    layers: tuple[int, ...]
    mean: np.ndarray
    sem: np.ndarray
    n: np.ndarray
    metric: str
    method: str
    baseline: str

    def records(self) -> list[dict]:
        return [{"kind": k, "layer": layer, "hook": hook_name(layer, SITE), "mean": float(self.mean[i, j]),
                 "sem": float(self.sem[i, j]), "n": int(self.n[i]), "metric": self.metric, "method": self.method,
                 "baseline": self.baseline}
                for i, k in enumerate(self.kinds) for j, layer in enumerate(self.layers)]

    def to_dict(self) -> dict:
        return {"kinds": list(self.kinds), "layers": list(self.layers), "mean": self.mean.tolist(),
                "sem": self.sem.tolist(), "n": self.n.tolist(), "metric": self.metric, "method": self.method,
                "baseline": self.baseline}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)


def kind_effects(attributions: Sequence[SegmentAttribution]) -> KindEffects:
    """Average attributions of many transcripts per segment kind (the segments × layers heatmap;
    call it once for harmful and once for benign tasks)."""
    if not attributions:
        raise ValueError("no attributions given (the list is empty)")
    first = attributions[0]
    for a in attributions:
        if (a.layers, a.metric, a.method) != (first.layers, first.metric, first.method):
            raise ValueError(f"attribution of {a.transcript!r} has layers/metric/method {a.layers}, {a.metric}, "
                             f"{a.method}; the first has {first.layers}, {first.metric}, {first.method}")
    per_kind: dict[str, list[np.ndarray]] = {}
    for a in attributions:
        for kind in dict.fromkeys(a.kinds):
            rows = [i for i, k in enumerate(a.kinds) if k == kind]
            per_kind.setdefault(kind, []).append(a.effects[rows].sum(0))
    kinds = tuple(k for k in SEGMENT_KINDS if k in per_kind)
    stacks = [np.stack(per_kind[k]) for k in kinds]  # each [n_transcripts_with_kind, n_layers]
    sem = [s.std(0, ddof=1) / np.sqrt(len(s)) if len(s) > 1 else np.full(s.shape[1], np.nan) for s in stacks]
    baselines = {a.baseline.split(":")[0] for a in attributions}
    return KindEffects(kinds, first.layers, np.stack([s.mean(0) for s in stacks]), np.stack(sem),
                       np.asarray([len(s) for s in stacks]), first.metric, first.method, "/".join(sorted(baselines)))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")  # undefined for fewer than two values or a constant ranking
    return float(np.corrcoef(rankdata(a), rankdata(b))[0, 1])


@dataclass(frozen=True)
class RankAgreement:
    """Spearman correlation between two attributions' effects over segments: per layer (segments
    of all transcripts pooled) and pooled over layers; ``disagreements`` are the (transcript,
    segment, layer) cells with the largest ``|a − b|``, largest first."""

    per_layer: Mapping[int, float]
    pooled: float
    disagreements: tuple[dict, ...] = field(default=())

    def to_dict(self) -> dict:
        return {"per_layer": {str(k): v for k, v in self.per_layer.items()}, "pooled": self.pooled,
                "disagreements": list(self.disagreements)}


def rank_agreement(a: SegmentAttribution | Sequence[SegmentAttribution],
                   b: SegmentAttribution | Sequence[SegmentAttribution], top: int = 10) -> RankAgreement:
    """How well ``b`` (e.g. the grad method) ranks segments like ``a`` (e.g. the exact method).
    Pairs must cover the same transcripts, segments and layers. NaN where a ranking is constant."""
    a = [a] if isinstance(a, SegmentAttribution) else list(a)
    b = [b] if isinstance(b, SegmentAttribution) else list(b)
    if len(a) != len(b) or not a:
        raise ValueError(f"need the same non-zero number of attributions on both sides, got {len(a)} and {len(b)}")
    for x, y in zip(a, b):
        if (x.transcript, x.segments, x.layers) != (y.transcript, y.segments, y.layers):
            raise ValueError(f"attributions of {x.transcript!r} and {y.transcript!r} do not cover the same "
                             "transcript, segments and layers")
    ea, eb = np.concatenate([x.effects for x in a]), np.concatenate([y.effects for y in b])  # [Σ segments, n_layers]
    layers = a[0].layers
    ra, rb = (np.stack([rankdata(-e[:, j]) for j in range(len(layers))], 1) for e in (ea, eb))
    cells = [(x.transcript, s.name, s.kind) for x in a for s in x.segments]
    worst = np.argsort(-np.abs(ea - eb), axis=None)[:top]
    disagreements = tuple(
        {"transcript": cells[i][0], "segment": cells[i][1], "kind": cells[i][2], "layer": layers[j],
         "a": float(ea[i, j]), "b": float(eb[i, j]), "abs_diff": float(abs(ea[i, j] - eb[i, j])),
         "rank_a": int(ra[i, j]), "rank_b": int(rb[i, j])}
        for i, j in zip(*np.unravel_index(worst, ea.shape)))
    return RankAgreement({layer: _spearman(ea[:, j], eb[:, j]) for j, layer in enumerate(layers)},
                         _spearman(ea.ravel(), eb.ravel()), disagreements)
