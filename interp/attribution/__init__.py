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

How segments *combine* (pairwise and higher-order interaction terms, exact or estimated, and
whether a planted connection is recovered) is :mod:`interp.attribution.interactions` and
:mod:`interp.attribution.recovery`::

    x = segment_interaction(model, transcript, metric, baseline=null_twin, exclude=("template",))
    x.ranked(layer=0)[:3]                                             # the strongest pairs
"""

from interp.attribution.engine import SITE, Metric, Patches, mean_residual, metric_gradients, patched_metric
from interp.attribution.interactions import (INTERACTION_METHODS, InteractionMethod, SegmentInteractions,
                                             segment_interaction, segment_interactions)
from interp.attribution.recovery import Recovery, pair_agreement, planted_of, planted_rank, recovery
from interp.attribution.segments import (METHODS, AttributionSegment, Method, SegmentAttribution,
                                         segment_attribution, segment_attributions)
from interp.attribution.tables import KindEffects, RankAgreement, kind_effects, rank_agreement
from interp.readouts import DirectionProjection, LogitDiff, ProbeLogit

__all__ = [
    "INTERACTION_METHODS", "METHODS", "SITE", "AttributionSegment", "DirectionProjection", "InteractionMethod",
    "KindEffects", "LogitDiff", "Method", "Metric", "Patches", "ProbeLogit", "RankAgreement", "Recovery",
    "SegmentAttribution", "SegmentInteractions", "kind_effects", "mean_residual", "metric_gradients", "pair_agreement",
    "patched_metric", "planted_of", "planted_rank", "rank_agreement", "recovery", "segment_attribution",
    "segment_attributions", "segment_interaction", "segment_interactions",
]
