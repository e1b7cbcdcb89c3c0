"""Fitting on ``[n, L, d]`` inputs (private): hyper-parameter checks, C per layer (given, or
chosen by cross-validation), the final fit, and what it warns about."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

from ._solver import decision, solve, working_copy
from .metrics import _check_binary_labels

_PACKAGE_DIR = str(Path(__file__).resolve().parent)


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` pointing at the first caller outside this package."""
    frame, level = sys._getframe(0), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(
        _PACKAGE_DIR
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


# ----------------------------------------------------------------------------------------------
# Hyper-parameters.


def check_positive(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number; got {value!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a positive finite number; got {value!r}")
    return v


def check_hyper(max_iter, tol, cv=None, rank=0) -> None:
    if not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer; got {max_iter!r}")
    check_positive(tol, "tol")
    if cv is not None and (not isinstance(cv, (int, np.integer)) or cv < 2):
        raise ValueError(f"cv must be an integer >= 2 (number of folds); got {cv!r}")
    if not isinstance(rank, (int, np.integer)) or rank < 0:
        raise ValueError(f"rank must be a non-negative integer; got {rank!r}")


def check_Cs(Cs) -> np.ndarray:
    """Sorted distinct candidate Cs."""
    try:
        values = [float(c) for c in Cs]
    except TypeError:
        raise ValueError(f"Cs must be a sequence of positive numbers; got {Cs!r}") from None
    if not values:
        raise ValueError("Cs is empty; give at least one candidate C")
    for c in values:
        check_positive(c, f"each entry of Cs (Cs={tuple(Cs)!r})")
    return np.array(sorted(set(values)))


def _C_per_layer(C, n_layers: int) -> np.ndarray:
    if np.ndim(C) == 0:
        return np.full(n_layers, check_positive(C, "C"))
    values = np.array([check_positive(c, "each entry of C") for c in C])
    if values.shape != (n_layers,):
        raise ValueError(
            f"C must be a number or one value per layer ({n_layers}); got {len(values)} values"
        )
    return values


def _check_groups(groups, n: int) -> np.ndarray | None:
    if groups is None:
        return None
    groups = groups.detach().cpu().numpy() if hasattr(groups, "detach") else np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must be [n] with n={n} (rows of X); got shape {groups.shape}")
    return groups


# ----------------------------------------------------------------------------------------------
# Choosing C by cross-validation.


def _labels_for_cv(y, n: int, Cs, cv: int, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(y01, classes, candidate Cs)`` for C=None, checked for ``cv``-fold cross-validation."""
    Cs_arr = check_Cs(Cs)
    y01, classes = _check_binary_labels(
        y, n, name="y", min_per_class=cv, reason=f"C=None chooses C by {cv}-fold cross-validation"
    )
    if groups is not None and len(np.unique(groups)) < cv:
        raise ValueError(
            f"groups has {len(np.unique(groups))} distinct values; {cv}-fold grouped "
            f"cross-validation (C=None) needs at least {cv}"
        )
    return y01, classes, Cs_arr


def _cv_scores(
    X, y01, Cs, cv, groups, *, standardize, max_iter, tol, rank, random_state, device, dtype
) -> np.ndarray:
    """Mean held-out accuracy ``[L, len(Cs)]`` over ``cv`` (grouped or stratified) folds."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold  # probes imports sklearn on use only

    n = X.shape[0]
    if groups is None:
        splitter = StratifiedKFold(n_splits=cv, shuffle=True, random_state=random_state)
        splits = splitter.split(np.zeros(n), y01)
    else:
        splitter = StratifiedGroupKFold(n_splits=cv, shuffle=True, random_state=random_state)
        splits = splitter.split(np.zeros(n), y01, groups)
    Cmat = torch.as_tensor(Cs, dtype=torch.float64)[None, :].expand(X.shape[1], -1)
    total = np.zeros((X.shape[1], len(Cs)))
    for fold, (train, val) in enumerate(splits):
        ytr = y01[train]
        if ytr.min() == ytr.max():
            raise ValueError(
                f"cross-validation fold {fold} has a single class in its training rows; "
                "use fewer folds (cv) or groups that mix the classes"
            )
        wc = working_copy(X, train, standardize, dtype, device)
        sol = solve(
            wc.X,
            torch.as_tensor(ytr),
            Cmat,
            wc.col_norm,
            tol=tol,
            max_iter=max_iter,
            rank=rank,
            seed=random_state,
        )
        centre, scale = wc.centre, wc.scale
        del wc
        coef = (sol.w / scale[:, None, :]).cpu().numpy()  # [L, P, d]
        intercept = (sol.b - (sol.w / scale[:, None, :] * centre[:, None, :]).sum(-1)).cpu().numpy()
        dec = decision(X[torch.as_tensor(val, device=X.device)], coef.transpose(0, 2, 1), intercept)
        total += ((dec > 0) == y01[val][:, None, None]).mean(0)
    return total / cv


# ----------------------------------------------------------------------------------------------
# The fit.


def _check_solution(sol, coef, intercept, spread, *, standardize, tol, max_iter, dtype) -> None:
    """Raise where the fit is not finite; warn where it stopped short of ``tol`` or at w = 0."""
    bad = torch.nonzero(~(torch.isfinite(coef).all(-1) & torch.isfinite(intercept)))[:, 0]
    if len(bad):
        remedies = [] if standardize else ["standardize=True (scale-free)"]
        remedies += [] if dtype == torch.float64 else ["dtype=torch.float64"]
        raise ValueError(
            f"the fit is not finite for layer index(es) {bad.tolist()}: {dtype} overflowed "
            f"on features whose largest centred standard deviation is "
            f"{float(spread[bad].max()):.3g} (standardize={standardize}); pass "
            + " or ".join(remedies + ["rescaled X"])
        )
    # Unstandardised features far from unit scale can leave the gradient at w = 0 below tol
    # (tiny features) or below the working dtype's rounding level (huge ones).
    at_zero = (sol.n_iter[:, 0] == 0) & sol.converged[:, 0] & (spread > 0) & (not standardize)
    not_conv = torch.nonzero(~sol.converged[:, 0])[:, 0].tolist()
    if not_conv:
        warn(
            f"the probe solver did not reach tol={tol} within max_iter={max_iter} iterations "
            f"for layer index(es) {not_conv}; increase max_iter",
            ConvergenceWarning,
        )
    floored = torch.nonzero(sol.at_rounding_floor[:, 0] & ~at_zero)[:, 0].tolist()
    if floored:
        warn(
            f"for layer index(es) {floored} the gradient reached the rounding level of {dtype} "
            f"before tol={tol}; those fits are as exact as {dtype} allows (pass "
            "dtype=torch.float64 for a tighter fit, or standardize=True)",
            ConvergenceWarning,
        )
    stuck = torch.nonzero(at_zero)[:, 0]
    if len(stuck):
        warn(
            f"for layer index(es) {stuck.tolist()} the solver stopped at w = 0: with "
            f"standardize=False the gradient there is already below tol={tol} or the rounding "
            f"level of {dtype} (largest centred feature standard deviation "
            f"{float(spread[stuck].max()):.3g}), so the probe predicts one class; pass "
            "standardize=True (scale-free) or rescale X",
            ConvergenceWarning,
        )


def _labels_and_C(X, y, C, Cs, cv, groups, opts: dict) -> tuple:
    """``(y01 [n], classes [2], C per layer [L], cv_scores [L, len(Cs_)] or None, Cs_ or
    None)``: C as given, or chosen per layer by cross-validation when it is None."""
    n, n_layers, _ = X.shape
    if C is None:
        y01, classes, Cs_arr = _labels_for_cv(y, n, Cs, cv, groups)
        cv_scores = _cv_scores(X, y01, Cs_arr, cv, groups, **opts)
        C_per_layer = Cs_arr[np.argmax(cv_scores, axis=1)]  # ties: the smallest C
        return y01, classes, C_per_layer, cv_scores, Cs_arr
    y01, classes = _check_binary_labels(y, n, name="y", min_per_class=2, reason="to fit a probe")
    return y01, classes, _C_per_layer(C, n_layers), None, None


def fit_arrays(
    X: torch.Tensor,
    y,
    C,
    *,
    Cs,
    cv,
    groups,
    standardize: bool,
    max_iter: int,
    tol: float,
    rank: int,
    random_state: int,
    device,
    dtype,
) -> dict:
    """Fit one probe per layer of X ``[n, L, d]``; return the fitted arrays, stacked per layer:
    ``coef_ [L, d]``, ``intercept_ [L]``, ``classes_ [2]``, ``C_ [L]``, ``mean_ [L, d]``,
    ``scale_ [L, d]``, ``n_iter_ [L]``, ``cv_scores_ [L, len(Cs_)]`` and ``Cs_`` (None unless
    C is None)."""
    n, n_layers, d = X.shape
    check_hyper(max_iter, tol, cv if C is None else None, rank)
    if n == 0 or d == 0:
        raise ValueError(
            f"X must have at least one row and one feature; got shape {tuple(X.shape)}"
        )
    device = torch.device(device) if device is not None else X.device
    if dtype is None:
        dtype = torch.float64 if X.dtype == torch.float64 else torch.float32
    groups = _check_groups(groups, n)
    opts = dict(standardize=standardize, max_iter=max_iter, tol=tol, rank=rank,
                random_state=random_state, device=device, dtype=dtype)  # fmt: skip
    y01, classes, C_per_layer, cv_scores, Cs_arr = _labels_and_C(X, y, C, Cs, cv, groups, opts)
    wc = working_copy(X, None, standardize, dtype, device)
    sol = solve(
        wc.X,
        torch.as_tensor(y01),
        torch.as_tensor(C_per_layer)[:, None],
        wc.col_norm,
        tol=tol,
        max_iter=max_iter,
        rank=rank,
        seed=random_state,
    )
    centre, scale, spread = wc.centre, wc.scale, wc.spread
    del wc
    w, b = sol.w[:, 0], sol.b[:, 0]
    coef = w / scale
    intercept = b - (coef * centre).sum(-1)
    _check_solution(
        sol, coef, intercept, spread, standardize=standardize, tol=tol, max_iter=max_iter,
        dtype=dtype,
    )  # fmt: skip
    return {
        "coef_": coef.cpu().numpy(),
        "intercept_": intercept.cpu().numpy(),
        "classes_": classes,
        "C_": np.asarray(C_per_layer, dtype=np.float64),
        "mean_": centre.cpu().numpy() if standardize else np.zeros((n_layers, d)),
        "scale_": scale.cpu().numpy(),
        "n_iter_": sol.n_iter[:, 0].cpu().numpy(),
        "cv_scores_": cv_scores,
        "Cs_": None if Cs_arr is None else tuple(float(c) for c in Cs_arr),
    }
