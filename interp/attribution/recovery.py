"""Whether interaction attribution recovers a planted connection: the rank of the planted pair
(or triple) among all terms of its size, how often it comes first, and how well a fast estimate
ranks pairs like the exact method.

A task's *planted* segments are the ones its ground truth names (for the organism's
distributed-harm tasks, ``transcript.metadata["locations"]``). Its planted terms are every
subset of them of the given size: the one pair of a two-piece task, the three pairs (and the
triple) of a three-piece one. The planted term comes first when its largest value is strictly
above every other term of that size (ties count against it), on the signed value: the pieces of a
harmful AND raise the refusal signal together, a positive interaction.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from interp.attribution.interactions import SegmentInteractions
from probes.metrics import bootstrap_rate, spearman


def planted_rank(x: SegmentInteractions, planted: Sequence[str], layer: int, size: int = 2) -> int:
    """1 + the number of non-planted terms of ``size`` segments whose value at ``layer`` is at least
    the best planted term's (1: the planted connection comes first)."""
    missing = [p for p in planted if p not in x.names]
    if missing:
        raise KeyError(f"planted segments {missing} are not candidates of transcript {x.transcript!r} "
                       f"(candidates: {x.names})")
    if len(planted) < size:
        raise ValueError(f"{len(planted)} planted segments make no term of size {size}")
    if size > x.order:
        raise ValueError(f"transcript {x.transcript!r} has terms up to order {x.order}, not {size}")
    mine = {tuple(sorted(x.names.index(p) for p in c)) for c in itertools.combinations(planted, size)}
    j = x.layers.index(layer)
    vals = [(t in mine, float(v[j])) for t, v in zip(x.terms, x.values) if len(t) == size]
    best = max(v for is_planted, v in vals if is_planted)
    return 1 + sum(1 for is_planted, v in vals if not is_planted and v >= best)


@dataclass(frozen=True)
class Recovery:
    """Per layer: how often the planted term comes first (``top1``, with a 95% bootstrap interval)
    and its mean rank, over ``n`` transcripts, for terms of ``size`` segments."""

    method: str
    size: int
    layers: tuple[int, ...]
    top1: tuple[dict, ...]
    mean_rank: tuple[float, ...]
    n: int
    n_terms: float  # mean number of terms of that size per transcript

    def to_dict(self) -> dict:
        return {"method": self.method, "size": self.size, "layers": list(self.layers), "top1": list(self.top1),
                "mean_rank": list(self.mean_rank), "n": self.n, "n_terms": self.n_terms}


def recovery(results: Sequence[SegmentInteractions], planted: Sequence[Sequence[str]], size: int = 2) -> Recovery:
    """:func:`planted_rank` of every transcript at every layer, summarised."""
    if not results or len(results) != len(planted):
        raise ValueError(f"need one planted list per result, got {len(results)} results and {len(planted)} lists")
    layers = results[0].layers
    ranks = np.asarray([[planted_rank(x, p, layer, size) for layer in layers] for x, p in zip(results, planted)])
    n_terms = float(np.mean([sum(len(t) == size for t in x.terms) for x in results]))
    return Recovery(results[0].method, size, tuple(layers),
                    tuple(bootstrap_rate(ranks[:, j] == 1).to_dict() for j in range(len(layers))),
                    tuple(float(ranks[:, j].mean()) for j in range(len(layers))), len(results), n_terms)


def pair_agreement(exact: Sequence[SegmentInteractions], fast: Sequence[SegmentInteractions]) -> dict:
    """How well ``fast`` ranks pairs like ``exact``, per layer: Spearman over the pairs of all
    transcripts pooled, and the median of the per-transcript Spearman correlations (NaN
    correlations, from constant rankings, left out of the median)."""
    if len(exact) != len(fast) or not exact:
        raise ValueError(f"need the same non-zero number of results on both sides, got {len(exact)} and {len(fast)}")
    for a, b in zip(exact, fast):
        if (a.transcript, a.names, a.layers) != (b.transcript, b.names, b.layers):
            raise ValueError(f"results for {a.transcript!r} and {b.transcript!r} do not cover the same transcript, "
                             "segments and layers")
    out: dict[str, dict] = {"pooled": {}, "median_per_transcript": {}}
    for j, layer in enumerate(exact[0].layers):
        xa, xb, per = [], [], []
        for a, b in zip(exact, fast):
            va = np.asarray([v[j] for t, v in zip(a.terms, a.values) if len(t) == 2])
            vb = np.asarray([v[j] for t, v in zip(b.terms, b.values) if len(t) == 2])
            xa.append(va)
            xb.append(vb)
            per.append(spearman(va, vb))
        per_ok = [p for p in per if not np.isnan(p)]
        out["pooled"][str(layer)] = float(spearman(np.concatenate(xa), np.concatenate(xb)))
        out["median_per_transcript"][str(layer)] = float(np.median(per_ok)) if per_ok else float("nan")
    return out


def planted_of(results: Sequence[SegmentInteractions], locations: Mapping[str, Mapping[str, str]]) -> list[list[str]]:
    """The planted segment names of each result from ``{transcript id: {piece: segment name}}``."""
    try:
        return [list(locations[x.transcript].values()) for x in results]
    except KeyError as e:
        raise KeyError(f"no ground truth (locations) for transcript {e.args[0]!r}") from None
