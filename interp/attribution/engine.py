"""The attribution engine: one forward that reads a metric at the decision position of each row,
optionally with patches of the residual stream entering chosen blocks, optionally with the
metric's gradients with respect to those inputs; and the baselines patches come from.

Everything attaches to the model through :meth:`interp.models.Model.hooks`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from tqdm.auto import tqdm

from interp.cache import pad_batch, render_for
from interp.models import Model
from interp.readouts import Readout, apply_readout, check_readout, read_site
from interp.transcripts import RenderedTranscript, Transcript

SITE = "resid_pre"  # where interventions happen: the residual stream entering each block

Metric = Readout
"""What attribution follows at the decision position (see :mod:`interp.readouts`)."""


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Metrics and attributions are computed in float32, or float64 for a float64 model."""
    return torch.promote_types(dtype, torch.float32)


Patches = Mapping[int, tuple[torch.Tensor, torch.Tensor]]
"""``{layer: (where [batch, pos] bool, values [batch or 1, pos, d_model])}``: the residual stream
entering block ``layer`` is replaced by ``values`` where ``where`` is True."""


def run_metric(model: Model, input_ids, attention_mask, decision, metric: Metric, patches: Patches | None,
             grad_layers: Sequence[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The metric ``[batch]`` at ``decision`` of each row after ``patches``, and the residual
    stream entering each of ``grad_layers`` (leaves of the autograd graph when grads are on)."""
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

    def enter(i: int):
        def fn(x: torch.Tensor) -> torch.Tensor:
            if i in patches:
                where, values = patches[i]
                x = torch.where(where.to(dev)[..., None], values.to(device=dev, dtype=x.dtype), x)
            if i == lowest:  # a leaf: the backward stops here, upstream layers need no graph
                x = x.detach().requires_grad_(True)
            if i in grad_layers:
                acts[i] = x
            return x
        return fn

    def read(x: torch.Tensor) -> None:
        out.append(apply_readout(model, metric, x[rows, decision].to(_work_dtype(x.dtype))))

    layer, site = read_site(model, metric)
    with ExitStack() as stack, torch.set_grad_enabled(bool(grad_layers)):
        touched = sorted(set(patches) | set(grad_layers))
        if touched:
            stack.enter_context(model.hooks({i: enter(i) for i in touched}, SITE))
        # entered after the patches, so a metric reading resid_pre of a patched layer sees the patch
        stack.enter_context(model.hooks({layer: read}, site, stop_after=layer))
        model.forward(ids, mask, **({"return_type": None} if model.backend == "bridge" else {}))
    return out[0], acts


def patched_metric(model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor, decision: torch.Tensor,
                   metric: Metric, patches: Patches | None = None) -> torch.Tensor:
    """The metric at ``decision [batch]`` (indices into the padded rows) after replacing the
    residual stream entering chosen blocks: ``patches = {layer: (where [batch, pos] bool,
    values [batch or 1, pos, d_model])}``. Positions come from the attention mask, so any
    padding side works. Returns ``[batch]`` (float32; float64 for a float64 model)."""
    check_readout(model, metric)
    if patches:
        model.check_layers(list(patches), SITE)
    with torch.no_grad():
        return run_metric(model, input_ids, attention_mask, decision, metric, patches, ())[0].detach()


def metric_gradients(model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor, decision: torch.Tensor,
                     metric: Metric, layers: Sequence[int]
                     ) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """One forward and one backward: the metric ``[batch]``, the residual stream entering each of
    ``layers`` and the metric's gradient with respect to it, ``{layer: [batch, pos, d_model]}``.
    Rows are independent (row b's gradient is that of its own metric); padded positions get
    exactly zero gradient."""
    check_readout(model, metric)
    layers = resolve_layers(model, metric, layers)
    values, acts = run_metric(model, input_ids, attention_mask, decision, metric, None, layers)
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


def baseline_values(model: Model, r: RenderedTranscript, baseline, layers: list[int]) -> torch.Tensor:
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


def baseline_name(baseline) -> str:
    if isinstance(baseline, torch.Tensor):
        return "mean" if baseline.ndim == 2 else "tensor"
    return f"patch:{baseline.id}"


def check_baseline(model: Model, baseline, r: RenderedTranscript) -> None:
    if isinstance(baseline, torch.Tensor):
        n, d = model.n_layers, model.d_model
        if tuple(baseline.shape) not in ((n, d), (n, len(r), d)):
            raise ValueError(f"baseline must be [n_layers={n}, d_model={d}] (a mean from mean_residual) or "
                             f"[n_layers={n}, pos={len(r)}, d_model={d}] (values at every position of transcript "
                             f"{r.id!r}), got {list(baseline.shape)}")
    elif not isinstance(baseline, (Transcript, RenderedTranscript)):
        raise TypeError(f"baseline must be a tensor or a matched Transcript (patching), got {type(baseline).__name__}")


def resolve_layers(model: Model, metric: Metric, layers: Sequence[int] | None) -> list[int]:
    """The blocks whose input may be intervened on: every one up to where ``metric`` is read (by
    default), or the given ones, which must not come after it."""
    last = read_site(model, metric)[0]
    if layers is None:
        return list(range(last + 1))
    layers = model.check_layers(list(layers), SITE)
    late = [i for i in layers if i > last]
    if late:
        raise ValueError(f"layers {late} come after the metric {metric.name} is read; intervening there "
                         f"cannot change it (use layers 0..{last})")
    return sorted(set(layers))


def prepare(model: Model, metric: Metric, transcripts: Sequence[Transcript | RenderedTranscript], baseline,
            layers: Sequence[int] | None) -> tuple[list[int], list[RenderedTranscript], list]:
    """What every attribution checks before it runs: the metric fits the model, the layers, the
    renderings, and one baseline per transcript (``baseline``: one shared ``[n_layers, d_model]``
    mean, or a matched transcript or ``[n_layers, pos, d_model]`` tensor each)."""
    check_readout(model, metric)
    layers = resolve_layers(model, metric, layers)
    rendered = render_for(model, transcripts)
    shared = isinstance(baseline, torch.Tensor) and baseline.ndim != 3
    baselines = [baseline] * len(rendered) if shared else list(baseline)
    if len(baselines) != len(rendered):
        raise ValueError(f"got {len(baselines)} baselines for {len(rendered)} transcripts; give one each (a matched "
                         "transcript or [n_layers, pos, d_model] tensor) or one shared mean")
    for r, b in zip(rendered, baselines):
        check_baseline(model, b, r)
    return layers, rendered, baselines
