"""Reusable probing math on activations: linear probes, directions, metrics.

Takes arrays or tensors and labels; knows nothing about how activations were obtained (it never
imports :mod:`interp`).

- :mod:`probes.linear`: :class:`LayerProbes` (a scikit-learn estimator fitting a logistic probe
  per layer of ``[n, n_layers, d]`` activations, all at once, batched in torch),
  :func:`fit_layer_probes` (a fitted LayerProbes in one call) and :class:`LinearProbe` (the
  same probe for one layer, ``[n, d]``).
- :mod:`probes.directions`: :func:`diff_in_means`, :func:`project`, :func:`cosine_similarity`,
  :func:`dprime`.
- :mod:`probes.metrics`: :func:`accuracy`, :func:`auroc`, :func:`pearson`, :func:`spearman`,
  :func:`bootstrap_ci`, :func:`bootstrap_rate` (both return an :class:`Interval`),
  :func:`grouped_train_test_split`, :func:`threshold_for`.

Names are imported lazily, so ``import probes`` does not import torch or scikit-learn.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "DEFAULT_CS": "linear",
    "LayerProbes": "linear",
    "LinearProbe": "linear",
    "fit_layer_probes": "linear",
    "cosine_similarity": "directions",
    "diff_in_means": "directions",
    "dprime": "directions",
    "project": "directions",
    "Interval": "metrics",
    "accuracy": "metrics",
    "auroc": "metrics",
    "bootstrap_ci": "metrics",
    "bootstrap_rate": "metrics",
    "grouped_train_test_split": "metrics",
    "pearson": "metrics",
    "spearman": "metrics",
    "threshold_for": "metrics",
}

__all__ = [
    "DEFAULT_CS",
    "Interval",
    "LayerProbes",
    "LinearProbe",
    "accuracy",
    "auroc",
    "bootstrap_ci",
    "bootstrap_rate",
    "cosine_similarity",
    "diff_in_means",
    "dprime",
    "fit_layer_probes",
    "grouped_train_test_split",
    "pearson",
    "project",
    "spearman",
    "threshold_for",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time names load on first use
    from .directions import cosine_similarity, diff_in_means, dprime, project
    from .linear import DEFAULT_CS, LayerProbes, LinearProbe, fit_layer_probes
    from .metrics import (
        Interval,
        accuracy,
        auroc,
        bootstrap_ci,
        bootstrap_rate,
        grouped_train_test_split,
        pearson,
        spearman,
        threshold_for,
    )


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'probes' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
