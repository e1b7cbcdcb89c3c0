"""Tables over many attributions: effects per segment kind, and how well a fast method ranks
segments like the exact one."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import rankdata

from interp.attribution.engine import SITE
from interp.attribution.segments import SegmentAttribution
from interp.models import hook_name
from interp.transcripts import SEGMENT_KINDS
from probes.metrics import spearman


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
    return RankAgreement({layer: spearman(ea[:, j], eb[:, j]) for j, layer in enumerate(layers)},
                         spearman(ea.ravel(), eb.ravel()), disagreements)
