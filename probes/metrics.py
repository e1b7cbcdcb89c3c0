"""Metrics for probes: accuracy, AUROC, rank and linear correlation, calibrated thresholds,
bootstrap intervals, grouped splits.

Numpy only (cheap to import). Labels are binary; the positive class is the larger of the two
label values, as in scikit-learn.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Interval",
    "accuracy",
    "auroc",
    "bootstrap_ci",
    "bootstrap_rate",
    "grouped_train_test_split",
    "pearson",
    "spearman",
    "threshold_for",
]


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile bootstrap confidence interval ``[low, high]``."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high}


# ----------------------------------------------------------------------------------------------
# Validation shared by the package (private).


def _describe(a) -> str:
    shape = getattr(a, "shape", None)
    return f"shape {tuple(shape)}" if shape is not None else f"length {len(a)}"


def _fmt(value) -> str:
    """repr of a label without numpy's wrapper (``1.0``, not ``np.float64(1.0)``)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _check_binary_labels(
    y, n: int | None = None, *, name: str = "y", min_per_class: int = 1, reason: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Validate binary labels ``[n]``; return ``(y01 [n] int64, classes [2])``.

    ``classes`` is sorted (``np.unique``); ``y01`` is 1 where ``y == classes[1]``.
    """
    if y is None:
        raise ValueError(
            f"{name} is None: a probe requires y to be passed, but the target y is None"
        )
    if hasattr(y, "detach"):  # torch tensor
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        from sklearn.exceptions import DataConversionWarning  # metrics is numpy-only until this warning

        warnings.warn(
            f"A column-vector y was passed when a 1d array was expected: {name} has shape "
            f"{y.shape}; it was flattened to [n] (pass {name}.ravel())",
            DataConversionWarning,
            stacklevel=4,
        )
        y = y.ravel()
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D [n]; got {_describe(y)}")
    if n is not None and y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} labels but X has {n} rows")
    if y.shape[0] == 0:
        raise ValueError(f"{name} is empty; need labels of two classes")
    if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
        raise ValueError(f"{name} contains NaN or inf; labels must be two finite class values")
    if y.dtype.kind in "cOV":
        if y.dtype.kind == "O":
            try:
                y = y.astype(str) if isinstance(y[0], str) else y.astype(np.float64)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{name} has dtype object that is not str or numeric") from err
        else:
            raise ValueError(f"{name} has unsupported dtype {y.dtype}")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise ValueError(
            f"{name} has only one class ({_fmt(classes[0])}, {y.shape[0]} examples); "
            "a binary probe needs examples of two classes"
        )
    if len(classes) > 2:
        shown = ", ".join(_fmt(c) for c in classes[:6]) + (", ..." if len(classes) > 6 else "")
        if y.dtype.kind == "f" and not np.all(classes == np.round(classes)):
            raise ValueError(
                f"{name} looks continuous ({len(classes)} distinct values: [{shown}]); "
                "Unknown label type: continuous. A probe needs two class labels"
            )
        raise ValueError(
            f"Only binary classification is supported: {name} has {len(classes)} classes "
            f"([{shown}]); a probe takes two"
        )
    if counts.min() < min_per_class:
        small = classes[int(np.argmin(counts))]
        why = f" ({reason})" if reason else ""
        raise ValueError(
            f"{name} has {counts.min()} example(s) of class {_fmt(small)}; "
            f"need at least {min_per_class} of each class{why}"
        )
    return (y == classes[1]).astype(np.int64), classes


def _check_scores(scores, n: int, *, name: str = "scores") -> np.ndarray:
    """Validate real scores ``[n]`` or ``[n, k]``; return a float64 array."""
    if hasattr(scores, "detach"):
        scores = scores.detach().cpu().numpy()
    s = np.asarray(scores)
    if s.ndim not in (1, 2):
        raise ValueError(f"{name} must be [n] or [n, k]; got {_describe(s)}")
    if s.shape[0] != n:
        raise ValueError(f"{name} has {s.shape[0]} rows but y has {n} labels")
    if s.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be real numbers; got dtype {s.dtype}")
    s = s.astype(np.float64, copy=False)
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} contains NaN or inf")
    return s


# ----------------------------------------------------------------------------------------------
# Point metrics.


def accuracy(y_true, y_pred) -> float:
    """Fraction of ``y_pred [n]`` equal to ``y_true [n]``."""
    a, b = np.asarray(y_true), np.asarray(y_pred)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D; got {_describe(a)} and {_describe(b)}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"y_true has {a.shape[0]} labels but y_pred has {b.shape[0]}")
    if a.shape[0] == 0:
        raise ValueError("y_true is empty; accuracy of no predictions is undefined")
    return float(np.mean(a == b))


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """Ranks (1-based) along axis 0, ties given their average rank. ``s`` is ``[n, k]``."""
    n, k = s.shape
    order = np.argsort(s, axis=0, kind="mergesort")
    sorted_s = np.take_along_axis(s, order, axis=0)
    ranks = np.empty_like(s)
    for j in range(k):
        col = sorted_s[:, j]
        # Start of each run of equal values; every member of a run gets the run's mean rank.
        starts = np.flatnonzero(np.r_[True, col[1:] != col[:-1]])
        ends = np.r_[starts[1:], n]
        run_rank = (starts + ends + 1) / 2.0
        ranks[order[:, j], j] = np.repeat(run_rank, ends - starts)
    return ranks


def auroc(y, scores) -> float | np.ndarray:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count 1/2.

    y: ``[n]`` binary labels (positive = the larger label). scores: ``[n]`` -> float, or
    ``[n, k]`` (e.g. one column per layer) -> ``[k]``. Equals ``sklearn.metrics.roc_auc_score``.
    """
    y01, _ = _check_binary_labels(y, name="y")
    s = _check_scores(scores, y01.shape[0])
    one_d = s.ndim == 1
    s2 = s[:, None] if one_d else s
    ranks = _average_ranks(s2)
    n_pos = int(y01.sum())
    n_neg = y01.shape[0] - n_pos
    # Mann-Whitney U of the positives, from their rank sum.
    u = ranks[y01 == 1].sum(axis=0) - n_pos * (n_pos + 1) / 2.0
    auc = u / (n_pos * n_neg)
    return float(auc[0]) if one_d else auc


# ----------------------------------------------------------------------------------------------
# Correlation of paired values.


def _check_pairs(a, b) -> tuple[np.ndarray, np.ndarray, bool]:
    """``a``, ``b`` as float64 ``[n, k]`` arrays, and whether they came as ``[n]``."""
    arrays = []
    for name, v in (("a", a), ("b", b)):
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        v = np.asarray(v)
        if v.ndim not in (1, 2):
            raise ValueError(f"{name} must be [n] or [n, k]; got {_describe(v)}")
        if v.dtype.kind not in "biuf":
            raise ValueError(f"{name} must be real numbers; got dtype {v.dtype}")
        v = v.astype(np.float64)
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{name} contains NaN or inf")
        arrays.append(v)
    x, y = arrays
    if x.shape != y.shape:
        raise ValueError(f"a and b must have the same shape; got {x.shape} and {y.shape}")
    one_d = x.ndim == 1
    return (x[:, None], y[:, None], True) if one_d else (x, y, False)


def _column_correlation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column of x ``[n, k]`` with that of y -> ``[k]``; NaN for
    fewer than two rows or a constant column."""
    out = np.full(x.shape[1], np.nan)
    if x.shape[0] < 2:
        return out
    defined = (np.ptp(x, axis=0) > 0) & (np.ptp(y, axis=0) > 0)
    x, y = x[:, defined], y[:, defined]
    # Correlation ignores each column's scale; dividing by the largest |value| first keeps
    # sums of squares finite for values like 1e300 and non-zero for values like 1e-300.
    x = x / np.abs(x).max(0)
    y = y / np.abs(y).max(0)
    dx, dy = x - x.mean(0), y - y.mean(0)
    dx, dy = dx / np.abs(dx).max(0), dy / np.abs(dy).max(0)
    r = (dx * dy).sum(0) / np.sqrt((dx * dx).sum(0) * (dy * dy).sum(0))
    out[defined] = np.clip(r, -1.0, 1.0)
    return out


def pearson(a, b) -> float | np.ndarray:
    """Pearson correlation of paired values: ``a, b [n]`` -> float, or ``[n, k]`` -> ``[k]``
    (column j of a with column j of b). Equals ``scipy.stats.pearsonr(a, b).statistic``.

    NaN where it is undefined: fewer than two pairs, or a constant ``a`` or ``b`` (column).
    NaN, not None, so that per-layer results stay one float array; a JSON writer that wants
    ``null`` converts with ``None if math.isnan(r) else r``. Raises on NaN or inf in the input.

    >>> pearson([1, 2, 3, 4], [2, 4, 6, 8])
    1.0
    >>> pearson([1, 2, 3], [5, 5, 5])
    nan
    """
    x, y, one_d = _check_pairs(a, b)
    r = _column_correlation(x, y)
    return float(r[0]) if one_d else r


def spearman(a, b) -> float | np.ndarray:
    """Spearman rank correlation of paired values: the Pearson correlation of their ranks, ties
    given their mean rank. ``a, b [n]`` -> float, or ``[n, k]`` -> ``[k]`` (column j of a with
    column j of b). Equals ``scipy.stats.spearmanr(a, b).statistic``.

    NaN where it is undefined, as in :func:`pearson`: fewer than two pairs, or a constant
    ``a`` or ``b`` (column). Raises on NaN or inf in the input.

    >>> spearman([1, 2, 3, 4], [1, 4, 9, 16])  # monotonic, not linear
    1.0
    >>> spearman([1, 2, 2, 3], [3, 2, 2, 1])  # ties share their mean rank
    -1.0
    """
    x, y, one_d = _check_pairs(a, b)
    r = _column_correlation(_average_ranks(x), _average_ranks(y))
    return float(r[0]) if one_d else r


# ----------------------------------------------------------------------------------------------
# Bootstrap intervals.


def _check_bootstrap_args(n_boot: int, alpha: float) -> None:
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer; got {n_boot!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1); got {alpha!r}")


def bootstrap_rate(outcomes, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> Interval:
    """Rate of successes with a ``1 - alpha`` percentile bootstrap interval.

    outcomes: ``[n]`` bool or 0/1. ``value`` is the mean; ``low``/``high`` are percentiles of
    the means of ``n_boot`` resamples of the ``n`` outcomes (with replacement).

    >>> interval = bootstrap_rate([True, True, False, True] * 25)
    >>> interval.value, interval.low < 0.75 < interval.high
    (0.75, True)
    """
    _check_bootstrap_args(n_boot, alpha)
    if hasattr(outcomes, "detach"):
        outcomes = outcomes.detach().cpu().numpy()
    x = np.asarray(outcomes)
    if x.ndim != 1:
        raise ValueError(f"outcomes must be 1-D [n]; got {_describe(x)}")
    if x.size == 0:
        raise ValueError("outcomes is empty (shape (0,)); need at least one outcome for a rate")
    if x.dtype.kind not in "biuf":
        raise ValueError(f"outcomes must be bool or 0/1; got dtype {x.dtype}")
    x = x.astype(np.float64)
    if not np.all((x == 0) | (x == 1)):
        bad = x[(x != 0) & (x != 1)][0]
        raise ValueError(f"outcomes must be bool or 0/1; found the value {_fmt(bad)}")
    rng = np.random.default_rng(seed)
    # Resampling n Bernoulli outcomes with replacement = drawing Binomial(n, mean) successes.
    means = rng.binomial(x.size, x.mean(), size=n_boot) / x.size
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Interval(float(x.mean()), float(low), float(high))


def bootstrap_ci(
    statistic: Callable[..., float],
    *arrays,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    strata=None,
) -> Interval:
    """``statistic(*arrays)`` with a percentile bootstrap interval over rows resampled jointly.

    arrays: each ``[n, ...]``; the same row indices are drawn for every array (paired
    resampling). strata: optional ``[n]`` labels; rows are then resampled within each stratum,
    keeping its size (use ``strata=y`` so that every resample of an AUROC has both classes).
    Resamples whose statistic is NaN are dropped.
    """
    _check_bootstrap_args(n_boot, alpha)
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array after the statistic")
    arrs = [a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a) for a in arrays]
    n = arrs[0].shape[0] if arrs[0].ndim else 0
    for i, a in enumerate(arrs):
        if a.ndim == 0 or a.shape[0] != n:
            raise ValueError(
                f"arrays must share their first dimension; arrays[0] has {n} rows but "
                f"arrays[{i}] has {_describe(a)}"
            )
    if n == 0:
        raise ValueError("arrays are empty; need at least one row to bootstrap")
    rng = np.random.default_rng(seed)
    if strata is None:
        index_sets = [np.arange(n)]
    else:
        st = np.asarray(strata)
        if st.shape != (n,):
            raise ValueError(f"strata must be [n] with n={n}; got {_describe(st)}")
        index_sets = [np.flatnonzero(st == v) for v in np.unique(st)]
    value = float(statistic(*arrs))
    stats = np.empty(n_boot)
    for b in range(n_boot):
        idx = np.concatenate([s[rng.integers(0, s.size, size=s.size)] for s in index_sets])
        stats[b] = float(statistic(*(a[idx] for a in arrs)))
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        raise ValueError("statistic was NaN on every bootstrap resample")
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return Interval(value, float(low), float(high))


# ----------------------------------------------------------------------------------------------
# Splits and thresholds.


def grouped_train_test_split(
    groups, test_size: float = 0.25, seed: int = 0, y=None, n_tries: int = 200
) -> tuple[np.ndarray, np.ndarray]:
    """Split rows so that no group has rows on both sides; return ``(train_idx, test_idx)``.

    groups: ``[n]`` group id per row (e.g. the transcript or task a row came from). Whole
    groups, in a seeded random order, go to the test side until it holds about ``test_size``
    of the rows (never all groups, never none). With ``y [n]``, further seeded orders (up to
    ``n_tries``) are tried until one leaves both classes on both sides; if none does, a
    warning is given and the split closest to ``test_size`` is returned. Indices are sorted
    ``int64``.
    """
    if hasattr(groups, "detach"):
        groups = groups.detach().cpu().numpy()
    g = np.asarray(groups)
    if g.ndim != 1:
        raise ValueError(f"groups must be 1-D [n]; got {_describe(g)}")
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be a fraction in (0, 1); got {test_size!r}")
    uniq, inverse, sizes = np.unique(g, return_inverse=True, return_counts=True)
    if len(uniq) < 2:
        raise ValueError(f"groups has {len(uniq)} distinct value(s); a split needs at least 2")
    y01 = None
    if y is not None:
        y01, _ = _check_binary_labels(y, g.shape[0], name="y")
    n = g.shape[0]
    target = test_size * n
    rng = np.random.default_rng(seed)
    closest, closest_gap = None, np.inf
    for _ in range(n_tries if y01 is not None else 1):
        order = rng.permutation(len(uniq))
        cum = np.cumsum(sizes[order])
        # The shortest prefix of groups reaching the target, or one group fewer if closer.
        k = min(int(np.searchsorted(cum, target)) + 1, len(uniq) - 1)
        if k > 1 and abs(cum[k - 2] - target) <= abs(cum[k - 1] - target):
            k -= 1
        is_test = np.zeros(len(uniq), dtype=bool)
        is_test[order[:k]] = True
        test_rows = is_test[inverse]
        if y01 is None or all(len(np.unique(y01[m])) == 2 for m in (test_rows, ~test_rows)):
            closest = test_rows
            break
        if abs(cum[k - 1] - target) < closest_gap:
            closest, closest_gap = test_rows, abs(cum[k - 1] - target)
    else:
        warnings.warn(
            f"no split of the {len(uniq)} groups among {n_tries} seeded orders leaves both classes "
            "of y on both sides; returning the one closest to test_size",
            stacklevel=2,
        )
    return np.flatnonzero(~closest).astype(np.int64), np.flatnonzero(closest).astype(np.int64)


def threshold_for(scores, y, target: str | float = "balanced_accuracy") -> float:
    """A decision threshold on ``scores [n]``: predict the positive class when ``score > t``.

    target:
    - ``"balanced_accuracy"`` (default): maximise (TPR + TNR) / 2;
    - ``"accuracy"``: maximise accuracy;
    - a float ``fpr`` in [0, 1): the lowest threshold whose false-positive rate (fraction of
      negatives with ``score > t``) is at most ``fpr``.

    Candidates are the midpoints between consecutive distinct scores, plus one below the
    minimum (flags everything) and the maximum (flags nothing). Among equally good candidates
    the lowest is returned.
    """
    y01, _ = _check_binary_labels(y, name="y")
    s = _check_scores(scores, y01.shape[0])
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D [n]; got {_describe(s)}")
    u = np.unique(s)
    candidates = np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2.0, [u[-1]]])
    pos, neg = s[y01 == 1], s[y01 == 0]
    # Counts of scores strictly above each candidate, via sorted search.
    tp = pos.size - np.searchsorted(np.sort(pos), candidates, side="right")
    fp = neg.size - np.searchsorted(np.sort(neg), candidates, side="right")
    tpr, fpr = tp / pos.size, fp / neg.size
    if isinstance(target, str):
        if target == "balanced_accuracy":
            objective = (tpr + 1.0 - fpr) / 2.0
        elif target == "accuracy":
            objective = (tp + (neg.size - fp)) / s.size
        else:
            raise ValueError(
                f"target must be 'balanced_accuracy', 'accuracy' or a false-positive rate in "
                f"[0, 1); got {target!r}"
            )
        return float(candidates[int(np.argmax(objective))])
    rate = float(target)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"target false-positive rate must be in [0, 1); got {target!r}")
    ok = np.flatnonzero(fpr <= rate)
    return float(candidates[ok[0]])
