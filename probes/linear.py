"""Logistic probes: a scikit-learn-compatible probe for one layer, and a batched trainer for all.

Both minimise exactly what ``sklearn.linear_model.LogisticRegression(C=C)`` minimises on the
standardised features ``z = (x - mean_) / scale_``::

    C * sum_i logloss(y_i, w . z_i + b) + 0.5 * ||w||^2        (b is not penalised)

and report ``coef_``/``intercept_`` in the original input space (``coef_ = w / scale_``), so
``X @ coef_.T + intercept_`` is the decision function on raw activations.

The solver (:func:`fit_layer_probes`, and :class:`LinearProbe` through it) fits every layer at
once in torch. It minimises the objective over a growing subspace of weight vectors: it starts
from a block of ``rank`` leading principal directions of each layer's standardised activations
(a randomized range finder with one power iteration, which takes care of the few large,
correlated directions residual streams have), then adds one direction per iteration, the current
gradient, and re-solves the small ``(intercept + subspace)`` problem exactly by batched Newton.
An iteration costs two passes over the activations, each one batched matrix product across
layers; the small problems are solved in float64. Each layer stops when its own gradient is
below ``tol`` (measured, as scikit-learn does, on the objective divided by ``C * n``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning

from .directions import _as_tensor
from .metrics import _check_binary_labels

__all__ = ["DEFAULT_CS", "LayerProbes", "LinearProbe", "fit_layer_probes"]

DEFAULT_CS: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0)
_FORMAT_VERSION = 1
_MAX_SUBSPACE = 64  # gradient directions kept per problem before the oldest are merged
_NEWTON_TOL_FACTOR = 1e-2  # inner (subspace) problems are solved to this fraction of tol
_SEED_POWER_ITERATIONS = 1  # of the randomized range finder that builds the starting block


# ----------------------------------------------------------------------------------------------
# Standardisation: a [n_layers, n, d] working copy, centred (always) and scaled (optionally).


def _standardize(
    X: torch.Tensor, rows: np.ndarray | None, standardize: bool, dtype: torch.dtype, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """X ``[n, L, d]`` -> (Xs ``[L, m, d]``, centre ``[L, d]``, scale ``[L, d]``, col_norm ``[L]``).

    Centring changes nothing in the solution (the intercept is free) but conditions the
    problem, so it is always done; ``scale`` is 1 unless ``standardize``. Zero-variance
    features keep scale 1, as in ``StandardScaler``. ``col_norm`` is the largest column norm of
    each layer's Xs (it sets the rounding level of gradients). Raises on NaN/inf (found through
    the mean). All but Xs are float64.
    """
    n, n_layers, d = X.shape
    idx = None if rows is None else torch.as_tensor(rows, device=X.device)
    m = n if idx is None else int(idx.shape[0])
    Xs = torch.empty(n_layers, m, d, dtype=dtype, device=device)
    centre = torch.empty(n_layers, d, dtype=torch.float64, device=device)
    scale = torch.ones(n_layers, d, dtype=torch.float64, device=device)
    col_norm = torch.zeros(n_layers, dtype=torch.float64, device=device)
    ones = torch.ones(1, m, dtype=dtype, device=device)
    for layer in range(n_layers):
        xl = X[:, layer, :] if idx is None else X[idx, layer, :]
        xl = xl.to(device=device, dtype=dtype)
        mu = (ones @ xl)[0] / m
        if not bool(torch.isfinite(mu).all()):
            bad = torch.nonzero(~torch.isfinite(xl))[0].tolist()
            row = bad[0] if rows is None else int(rows[bad[0]])
            raise ValueError(
                f"X contains NaN or inf (first at sample {row}, layer {layer}, feature {bad[1]})"
            )
        out = torch.sub(xl, mu, out=Xs[layer])
        centre[layer] = mu.to(torch.float64)
        sd = ((ones @ out.square())[0].to(torch.float64) / m).sqrt()
        if standardize:
            sd = torch.where(sd > 10 * torch.finfo(dtype).eps * mu.abs().to(torch.float64), sd, 1.0)
            sd = torch.where(sd > 0, sd, 1.0)
            out.div_(sd.to(dtype))
            scale[layer] = sd
            col_norm[layer] = math.sqrt(m)
        else:
            col_norm[layer] = sd.max() * math.sqrt(m)
    return Xs, centre, scale, col_norm


# ----------------------------------------------------------------------------------------------
# The batched solver.


@dataclass(frozen=True)
class _Solution:
    w: torch.Tensor  # [L, P, d] float64, standardised space
    b: torch.Tensor  # [L, P] float64
    n_iter: torch.Tensor  # [L, P] int64
    converged: torch.Tensor  # [L, P] bool
    at_rounding_floor: torch.Tensor  # [L, P] bool: stopped by the working dtype, above tol


def _newton(Z, y, lam, a, b, tol, max_steps: int = 50):
    """Batched Newton for small L2-regularised logistic problems.

    Minimises ``mean_i logloss(y_i, a . Z[:, i] + b) + lam/2 ||a||^2`` for each problem.
    Z ``[B, k, m]`` (features as rows), y ``[m]``, lam ``[B]``, a ``[B, k]``, b ``[B]``; float64.
    Returns ``(a, b, margins [B, m])``.
    """
    B, k, m = Z.shape
    Za = torch.cat([Z, Z.new_ones(B, 1, m)], 1)  # [B, k+1, m]
    theta = torch.cat([a, b[:, None]], 1)
    reg = torch.cat([lam[:, None].expand(B, k), lam.new_zeros(B, 1)], 1)

    def objective(za, th, rg):
        t = torch.bmm(th[:, None, :], za)[:, 0, :]
        return (torch.nn.functional.softplus(t) - y * t).mean(1) + 0.5 * (rg * th * th).sum(1), t

    f, t = objective(Za, theta, reg)
    active = torch.ones(B, dtype=torch.bool, device=Z.device)
    for _ in range(max_steps):
        p = torch.sigmoid(t)
        g = torch.bmm(Za, (p - y)[:, :, None])[:, :, 0] / m + reg * theta
        active &= g.abs().amax(1) > tol
        if not bool(active.any()):
            break
        ids = torch.nonzero(active)[:, 0]
        za, th, rg, ga = Za[ids], theta[ids], reg[ids], g[ids]
        dw = (p * (1 - p))[ids] / m
        H = torch.bmm(za * dw[:, None, :], za.transpose(1, 2))
        H.diagonal(dim1=1, dim2=2).add_(
            rg + 1e-13 * H.diagonal(dim1=1, dim2=2).amax(1, keepdim=True)
        )
        step = torch.linalg.solve(H, ga)
        slope = (ga * step).sum(1)
        f0, s = f[ids], torch.ones_like(f[ids])
        for _ in range(40):  # Armijo backtracking, per problem
            f1, t1 = objective(za, th - s[:, None] * step, rg)
            ok = f1 <= f0 - 1e-4 * s * slope + 1e-13 * f0.abs()
            if bool(ok.all()):
                break
            s = torch.where(ok, s, 0.5 * s)
        theta[ids] = th - s[:, None] * step
        f[ids], t[ids] = f1, t1
    return theta[:, :k], theta[:, k], t


def _rows_times_X(R: torch.Tensor, Xs: torch.Tensor, layers: torch.Tensor | None) -> torch.Tensor:
    """``R [L, P, m] @ Xs [L, m, d] -> [L, P, d]`` for the listed layers (others left zero)."""
    if layers is None:
        return torch.bmm(R, Xs)
    out = R.new_zeros(R.shape[0], R.shape[1], Xs.shape[2])
    for layer in layers.tolist():
        out[layer] = R[layer] @ Xs[layer]
    return out


def _rows_times_Xt(V: torch.Tensor, Xs: torch.Tensor, layers: torch.Tensor | None) -> torch.Tensor:
    """``V [L, P, d] @ Xs^T -> [L, P, m]`` for the listed layers (others left zero)."""
    if layers is None:
        return torch.bmm(V, Xs.transpose(1, 2))
    out = V.new_zeros(V.shape[0], V.shape[1], Xs.shape[1])
    for layer in layers.tolist():
        out[layer] = V[layer] @ Xs[layer].T
    return out


def _solve(
    Xs: torch.Tensor,
    y: torch.Tensor,
    C: torch.Tensor,
    col_norm: torch.Tensor,
    *,
    tol: float,
    max_iter: int,
    rank: int,
    seed: int,
    max_subspace: int = _MAX_SUBSPACE,
) -> _Solution:
    """Fit ``P`` logistic problems per layer (one per column of C ``[L, P]``) on Xs ``[L, m, d]``.

    y: ``[m]`` 0/1; col_norm ``[L]``: largest column norm of each layer of Xs. Returns weights in
    the (standardised) space of Xs. A problem stops when its gradient is below ``tol``, or below
    the rounding level of a gradient computed in Xs's dtype (about eps * ||r|| * col_norm),
    whichever is larger: no iteration can get under the latter.
    """
    n_layers, m, d = Xs.shape
    P = C.shape[1]
    dev, wd, f64 = Xs.device, Xs.dtype, torch.float64
    y = y.to(device=dev, dtype=f64)
    lam = 1.0 / (C.to(device=dev, dtype=f64) * m)  # [L, P]
    ybar = float(y.mean())
    b = torch.full((n_layers, P), math.log(ybar / (1 - ybar)), dtype=f64, device=dev)

    # Seed block: leading right-singular directions of each layer (randomized range finder).
    k0 = max(0, min(rank, d, m))
    if k0:
        gen = torch.Generator().manual_seed(seed)
        omega = torch.randn(n_layers, k0, m, generator=gen, dtype=wd).to(dev)
        T = torch.bmm(omega, Xs)  # random combinations of rows: inside the row space
        for _ in range(_SEED_POWER_ITERATIONS):  # towards the leading directions
            T = torch.bmm(torch.bmm(T, Xs.transpose(1, 2)), Xs)
        Q = torch.linalg.qr(T.to(f64).transpose(1, 2))[0]  # [L, d, k0]
        S0 = Q.transpose(1, 2).contiguous()  # [L, k0, d]
        Z0 = torch.bmm(S0.to(wd), Xs.transpose(1, 2)).to(f64)  # [L, k0, m]
        del omega, T, Q
    else:
        S0 = torch.zeros(n_layers, 0, d, dtype=f64, device=dev)
        Z0 = torch.zeros(n_layers, 0, m, dtype=f64, device=dev)

    jmax = max(2, max_subspace)
    E = torch.zeros(n_layers, P, jmax, d, dtype=f64, device=dev)  # orthonormal, and ⟂ S0
    Ze = torch.zeros(n_layers, P, jmax, m, dtype=f64, device=dev)  # E @ Xs^T
    a0 = torch.zeros(n_layers, P, k0, dtype=f64, device=dev)
    ae = torch.zeros(n_layers, P, jmax, dtype=f64, device=dev)
    j = 0
    w = torch.zeros(n_layers, P, d, dtype=f64, device=dev)
    t = b[:, :, None].expand(n_layers, P, m).clone()  # margins
    n_iter = torch.zeros(n_layers, P, dtype=torch.int64, device=dev)
    converged = torch.zeros(n_layers, P, dtype=torch.bool, device=dev)
    at_floor = torch.zeros(n_layers, P, dtype=torch.bool, device=dev)
    col_norm = col_norm.to(device=dev, dtype=f64)[:, None]
    eps = torch.finfo(wd).eps

    for it in range(max_iter + 1):
        r = (torch.sigmoid(t) - y) / m
        live = converged.logical_not().any(1)
        layers = None if bool(live.all()) else torch.nonzero(live)[:, 0]
        G = _rows_times_X(r.to(wd), Xs, layers).to(f64) + lam[:, :, None] * w
        gmax = torch.maximum(G.abs().amax(-1), r.sum(-1).abs())
        floor = 4 * eps * torch.linalg.vector_norm(r, dim=-1) * col_norm
        stop = ~converged & (gmax <= torch.clamp(floor, min=tol))
        at_floor |= stop & (gmax > tol)
        converged |= stop
        if bool(converged.all()) or it == max_iter:
            break
        active = ~converged
        n_iter += active.to(torch.int64)

        if j == jmax:  # merge the oldest half of the gradient directions into one
            h = jmax // 2
            drop, keep = slice(0, jmax - h), slice(jmax - h, jmax)
            u = torch.einsum("lpj,lpjd->lpd", ae[:, :, drop], E[:, :, drop])
            zu = torch.einsum("lpj,lpjm->lpm", ae[:, :, drop], Ze[:, :, drop])
            c = torch.linalg.vector_norm(ae[:, :, drop], dim=-1)
            inv = torch.where(c > 0, 1.0 / c, 0.0)[:, :, None]
            E_new, Ze_new, ae_new = torch.zeros_like(E), torch.zeros_like(Ze), torch.zeros_like(ae)
            E_new[:, :, 0], Ze_new[:, :, 0], ae_new[:, :, 0] = u * inv, zu * inv, c
            E_new[:, :, 1 : h + 1], Ze_new[:, :, 1 : h + 1] = E[:, :, keep], Ze[:, :, keep]
            ae_new[:, :, 1 : h + 1] = ae[:, :, keep]
            E, Ze, ae, j = E_new, Ze_new, ae_new, h + 1

        # New direction: the gradient, orthogonalised against the subspace (twice, for accuracy).
        v = torch.where(active[:, :, None], G, 0.0)
        gnorm = torch.linalg.vector_norm(v, dim=-1)
        for _ in range(2):
            v = v - torch.bmm(torch.bmm(v, S0.transpose(1, 2)), S0)
            if j:
                v = v - torch.einsum(
                    "lpj,lpjd->lpd", torch.einsum("lpd,lpjd->lpj", v, E[:, :, :j]), E[:, :, :j]
                )
        vnorm = torch.linalg.vector_norm(v, dim=-1)
        fresh = active & (vnorm > 1e-10 * gnorm)
        v = torch.where(fresh[:, :, None], v / vnorm.clamp_min(1e-300)[:, :, None], 0.0)
        E[:, :, j] = v
        Ze[:, :, j] = _rows_times_Xt(v.to(wd), Xs, layers).to(f64)
        j += 1

        # Exact minimisation over (intercept, S0, E[:j]) for the problems still running.
        li, pi = torch.nonzero(active, as_tuple=True)
        Z = torch.cat([Z0[li], Ze[li, pi, :j]], 1)
        coef = torch.cat([a0[li, pi], ae[li, pi, :j]], 1)
        coef, b_new, t_new = _newton(Z, y, lam[li, pi], coef, b[li, pi], tol * _NEWTON_TOL_FACTOR)
        a0[li, pi], ae[li, pi, :j], b[li, pi], t[li, pi] = coef[:, :k0], coef[:, k0:], b_new, t_new
        w[li, pi] = (
            torch.bmm(coef[:, None, :k0], S0[li])[:, 0]
            + torch.bmm(coef[:, None, k0:], E[li, pi, :j])[:, 0]
        )
    return _Solution(w=w, b=b, n_iter=n_iter, converged=converged, at_rounding_floor=at_floor)


# ----------------------------------------------------------------------------------------------
# Fitting on [n, L, d] inputs: fixed C, or C chosen per layer by cross-validation.


def _check_positive(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number; got {value!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a positive finite number; got {value!r}")
    return v


def _check_hyper(max_iter, tol, cv=None) -> None:
    if not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer; got {max_iter!r}")
    _check_positive(tol, "tol")
    if cv is not None and (not isinstance(cv, (int, np.integer)) or cv < 2):
        raise ValueError(f"cv must be an integer >= 2 (number of folds); got {cv!r}")


def _check_Cs(Cs) -> np.ndarray:
    try:
        values = [float(c) for c in Cs]
    except TypeError:
        raise ValueError(f"Cs must be a sequence of positive numbers; got {Cs!r}") from None
    if not values:
        raise ValueError("Cs is empty; give at least one candidate C")
    for c in values:
        _check_positive(c, f"each entry of Cs (Cs={tuple(Cs)!r})")
    return np.array(sorted(set(values)))


def _decision(X: torch.Tensor, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """X ``[n, L, d]``, coef ``[L, d, P]``, intercept ``[L, P]`` -> ``[n, L, P]``, in float64."""
    n, n_layers, d = X.shape
    c = torch.as_tensor(coef, dtype=torch.float64, device=X.device)
    out = np.empty((n, n_layers, coef.shape[2]))
    step = max(1, (1 << 23) // max(d, 1))  # rows per float64 chunk (~64 MiB)
    for layer in range(n_layers):
        for start in range(0, n, step):
            xl = X[start : start + step, layer, :].to(torch.float64)
            out[start : start + step, layer] = (xl @ c[layer]).cpu().numpy()
    return out + intercept[None]


def _cv_scores(
    X, y01, Cs, cv, groups, *, standardize, max_iter, tol, rank, random_state, device, dtype
) -> np.ndarray:
    """Mean held-out accuracy ``[L, len(Cs)]`` over ``cv`` (grouped or stratified) folds."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

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
        Xs, centre, scale, col_norm = _standardize(X, train, standardize, dtype, device)
        sol = _solve(
            Xs,
            torch.as_tensor(ytr),
            Cmat,
            col_norm,
            tol=tol,
            max_iter=max_iter,
            rank=rank,
            seed=random_state,
        )
        del Xs
        coef = (sol.w / scale[:, None, :]).cpu().numpy()  # [L, P, d]
        intercept = (sol.b - (sol.w / scale[:, None, :] * centre[:, None, :]).sum(-1)).cpu().numpy()
        dec = _decision(
            X[torch.as_tensor(val, device=X.device)], coef.transpose(0, 2, 1), intercept
        )
        total += ((dec > 0) == y01[val][:, None, None]).mean(0)
    return total / cv


def _fit_arrays(
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
    """The fitting path shared by :func:`fit_layer_probes` and :class:`LinearProbe`.

    X: ``[n, L, d]``. Returns the fitted arrays of a :class:`LayerProbes`.
    """
    n, n_layers, d = X.shape
    _check_hyper(max_iter, tol, cv if C is None else None)
    if not isinstance(rank, (int, np.integer)) or rank < 0:
        raise ValueError(f"rank must be a non-negative integer; got {rank!r}")
    if n == 0 or d == 0:
        raise ValueError(
            f"X must have at least one row and one feature; got shape {tuple(X.shape)}"
        )
    device = torch.device(device) if device is not None else X.device
    if dtype is None:
        dtype = torch.float64 if X.dtype == torch.float64 else torch.float32
    if groups is not None:
        groups = groups.detach().cpu().numpy() if hasattr(groups, "detach") else np.asarray(groups)
        if groups.shape != (n,):
            raise ValueError(f"groups must be [n] with n={n} (rows of X); got shape {groups.shape}")
    if C is None:
        Cs_arr = _check_Cs(Cs)
        y01, classes = _check_binary_labels(
            y,
            n,
            name="y",
            min_per_class=cv,
            reason=f"C=None chooses C by {cv}-fold cross-validation",
        )
        if groups is not None and len(np.unique(groups)) < cv:
            raise ValueError(
                f"groups has {len(np.unique(groups))} distinct values; {cv}-fold grouped "
                f"cross-validation (C=None) needs at least {cv}"
            )
        cv_scores = _cv_scores(
            X,
            y01,
            Cs_arr,
            cv,
            groups,
            standardize=standardize,
            max_iter=max_iter,
            tol=tol,
            rank=rank,
            random_state=random_state,
            device=device,
            dtype=dtype,
        )
        C_per_layer = Cs_arr[np.argmax(cv_scores, axis=1)]  # ties: the smallest C
    else:
        y01, classes = _check_binary_labels(
            y, n, name="y", min_per_class=2, reason="to fit a probe"
        )
        cv_scores, Cs_arr = None, None
        if np.ndim(C) == 0:
            C_per_layer = np.full(n_layers, _check_positive(C, "C"))
        else:
            C_per_layer = np.array([_check_positive(c, "each entry of C") for c in C])
            if C_per_layer.shape != (n_layers,):
                raise ValueError(
                    f"C must be a number or one value per layer ({n_layers}); "
                    f"got {len(C_per_layer)} values"
                )
    Xs, centre, scale, col_norm = _standardize(X, None, standardize, dtype, device)
    sol = _solve(
        Xs,
        torch.as_tensor(y01),
        torch.as_tensor(C_per_layer)[:, None],
        col_norm,
        tol=tol,
        max_iter=max_iter,
        rank=rank,
        seed=random_state,
    )
    del Xs
    w, b = sol.w[:, 0], sol.b[:, 0]
    coef = w / scale
    intercept = b - (coef * centre).sum(-1)
    not_conv = torch.nonzero(~sol.converged[:, 0])[:, 0].tolist()
    if not_conv:
        warnings.warn(
            f"the probe solver did not reach tol={tol} within max_iter={max_iter} iterations "
            f"for layer index(es) {not_conv}; increase max_iter",
            ConvergenceWarning,
            stacklevel=3,
        )
    floored = torch.nonzero(sol.at_rounding_floor[:, 0])[:, 0].tolist()
    if floored:
        warnings.warn(
            f"for layer index(es) {floored} the gradient reached the rounding level of {dtype} "
            f"before tol={tol}; those fits are as exact as {dtype} allows (pass "
            "dtype=torch.float64 for a tighter fit, or standardize=True)",
            ConvergenceWarning,
            stacklevel=3,
        )
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


# ----------------------------------------------------------------------------------------------
# Persistence: safetensors for arrays, a JSON sidecar for everything else.


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _save(path, tensors: dict, meta: dict) -> None:
    from safetensors.numpy import save_file

    path = Path(path)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items() if v is not None}
    _atomic_write(path, lambda tmp: save_file(arrays, tmp))
    text = json.dumps(meta, indent=2, sort_keys=True)
    _atomic_write(_sidecar(path), lambda tmp: Path(tmp).write_text(text))


def _load(path, fmt: str) -> tuple[dict, dict]:
    from safetensors.numpy import load_file

    path = Path(path)
    for p in (path, _sidecar(path)):
        if not p.exists():
            raise FileNotFoundError(
                f"{p} does not exist (a saved {fmt} is {path} + {_sidecar(path)})"
            )
    try:
        meta = json.loads(_sidecar(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{_sidecar(path)}: not valid JSON ({err})") from None
    if meta.get("format") != fmt:
        raise ValueError(
            f"{_sidecar(path)}: field 'format' is {meta.get('format')!r}, expected {fmt!r}"
        )
    if meta.get("version") != _FORMAT_VERSION:
        raise ValueError(
            f"{_sidecar(path)}: field 'version' is {meta.get('version')!r}; this code reads "
            f"version {_FORMAT_VERSION}"
        )
    return load_file(str(path)), meta


def _classes_to_json(classes: np.ndarray) -> dict:
    return {"values": classes.tolist(), "dtype": classes.dtype.str}


def _classes_from_json(d: dict) -> np.ndarray:
    return np.asarray(d["values"], dtype=np.dtype(d["dtype"]))


# ----------------------------------------------------------------------------------------------
# Public API.


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def _check_finite_output(dec: np.ndarray) -> None:
    if not np.all(np.isfinite(dec)):
        raise ValueError("X contains NaN or inf (the decision function is not finite)")


@dataclass(frozen=True, eq=False)
class LayerProbes:
    """One fitted logistic probe per layer (see :func:`fit_layer_probes`).

    Arrays are float64, in the original input space: the decision function of layer ``i`` is
    ``X[:, i, :] @ coef_[i] + intercept_[i]``.
    """

    coef_: np.ndarray  # [n_layers, d]
    intercept_: np.ndarray  # [n_layers]
    classes_: np.ndarray  # [2]; classes_[1] is the positive class
    C_: np.ndarray  # [n_layers] the C each layer was fitted with
    mean_: np.ndarray  # [n_layers, d] standardisation: z = (x - mean_) / scale_
    scale_: np.ndarray  # [n_layers, d]
    n_iter_: np.ndarray  # [n_layers] solver iterations
    layers_: tuple = ()  # a name per layer (default 0..n_layers-1)
    standardize: bool = True
    max_iter: int = 100
    tol: float = 1e-5
    random_state: int = 0
    Cs_: tuple | None = None  # candidate Cs, when C was chosen by cross-validation
    cv_scores_: np.ndarray | None = field(default=None)  # [n_layers, len(Cs_)] CV accuracy

    def __post_init__(self) -> None:
        L, d = self.coef_.shape
        if not self.layers_:
            object.__setattr__(self, "layers_", tuple(range(L)))
        for name, shape in (
            ("intercept_", (L,)),
            ("C_", (L,)),
            ("mean_", (L, d)),
            ("scale_", (L, d)),
            ("n_iter_", (L,)),
        ):
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} must have shape {shape}; got {getattr(self, name).shape}")
        if len(self.layers_) != L:
            raise ValueError(f"layers_ must name {L} layers; got {len(self.layers_)}")

    @property
    def n_layers(self) -> int:
        return self.coef_.shape[0]

    @property
    def n_features_in_(self) -> int:
        return self.coef_.shape[1]

    def _check_X(self, X) -> torch.Tensor:
        x = _as_tensor(X, "X", (3,), check_finite=False)
        if tuple(x.shape[1:]) != (self.n_layers, self.n_features_in_):
            raise ValueError(
                f"X must be [n, {self.n_layers}, {self.n_features_in_}] (n_layers, d of the fit); "
                f"got shape {tuple(x.shape)}"
            )
        return x

    def decision_function(self, X) -> np.ndarray:
        """X ``[n, n_layers, d]`` -> logits of the positive class ``[n, n_layers]``."""
        x = self._check_X(X)
        dec = _decision(x, self.coef_[:, :, None], self.intercept_[:, None])[:, :, 0]
        _check_finite_output(dec)
        return dec

    def predict_proba(self, X) -> np.ndarray:
        """X ``[n, n_layers, d]`` -> ``[n, n_layers, 2]``: P(classes_[0]), P(classes_[1])."""
        p1 = _sigmoid(self.decision_function(X))
        return np.stack([1.0 - p1, p1], axis=-1)

    def predict(self, X) -> np.ndarray:
        """X ``[n, n_layers, d]`` -> predicted labels ``[n, n_layers]``."""
        return self.classes_[(self.decision_function(X) > 0).astype(np.int64)]

    def score(self, X, y) -> np.ndarray:
        """Accuracy per layer ``[n_layers]`` on X ``[n, n_layers, d]``, y ``[n]``."""
        x = self._check_X(X)
        yy = np.asarray(y.detach().cpu().numpy() if hasattr(y, "detach") else y)
        if yy.shape != (x.shape[0],):
            raise ValueError(f"y must be [n] with n={x.shape[0]} (rows of X); got shape {yy.shape}")
        return (self.predict(x) == yy[:, None]).mean(0)

    def _index(self, layer) -> int:
        if layer in self.layers_:
            return self.layers_.index(layer)
        raise ValueError(f"layer {layer!r} is not one of layers_ {list(self.layers_)}")

    def probe(self, layer) -> LinearProbe:
        """The fitted :class:`LinearProbe` of ``layer`` (an entry of ``layers_``)."""
        i = self._index(layer)
        p = LinearProbe(
            C=float(self.C_[i]),
            Cs=self.Cs_ if self.Cs_ is not None else DEFAULT_CS,
            standardize=self.standardize,
            max_iter=self.max_iter,
            tol=self.tol,
            random_state=self.random_state,
        )
        p.coef_ = self.coef_[i][None].copy()
        p.intercept_ = self.intercept_[i : i + 1].copy()
        p.classes_ = self.classes_.copy()
        p.C_ = float(self.C_[i])
        p.mean_ = self.mean_[i].copy()
        p.scale_ = self.scale_[i].copy()
        p.n_features_in_ = self.n_features_in_
        p.n_iter_ = np.array([int(self.n_iter_[i])])
        return p

    def save(self, path) -> None:
        """Write ``path`` (safetensors: arrays) and ``path.with_suffix('.json')`` (the rest)."""
        layers = [x.item() if isinstance(x, np.generic) else x for x in self.layers_]
        meta = {
            "format": "probes.LayerProbes",
            "version": _FORMAT_VERSION,
            "layers": layers,
            "classes": _classes_to_json(self.classes_),
            "standardize": self.standardize,
            "max_iter": self.max_iter,
            "tol": self.tol,
            "random_state": self.random_state,
            "Cs": None if self.Cs_ is None else list(self.Cs_),
        }
        tensors = {
            "coef": self.coef_,
            "intercept": self.intercept_,
            "C": self.C_,
            "mean": self.mean_,
            "scale": self.scale_,
            "n_iter": np.asarray(self.n_iter_, dtype=np.int64),
            "cv_scores": self.cv_scores_,
        }
        _save(path, tensors, meta)

    @classmethod
    def load(cls, path) -> LayerProbes:
        t, meta = _load(path, "probes.LayerProbes")
        return cls(
            coef_=t["coef"],
            intercept_=t["intercept"],
            classes_=_classes_from_json(meta["classes"]),
            C_=t["C"],
            mean_=t["mean"],
            scale_=t["scale"],
            n_iter_=t["n_iter"],
            layers_=tuple(meta["layers"]),
            standardize=meta["standardize"],
            max_iter=meta["max_iter"],
            tol=meta["tol"],
            random_state=meta["random_state"],
            Cs_=None if meta["Cs"] is None else tuple(meta["Cs"]),
            cv_scores_=t.get("cv_scores"),
        )


def fit_layer_probes(
    X,
    y,
    C: float | Sequence[float] | None = 1.0,
    *,
    Cs: Sequence[float] = DEFAULT_CS,
    cv: int = 5,
    groups=None,
    standardize: bool = True,
    max_iter: int = 100,
    tol: float = 1e-5,
    rank: int = 64,
    layers: Sequence | None = None,
    random_state: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> LayerProbes:
    """Fit one L2-regularised logistic probe per layer, all layers at once.

    X: ``[n, n_layers, d]`` activations (numpy or torch, any float dtype). y: ``[n]`` two classes.
    C: inverse regularisation strength, as in ``LogisticRegression(C=C)``: one number, one per
    layer, or None to choose it per layer by ``cv``-fold cross-validated accuracy over ``Cs``
    (folds stratified by class, and grouped by ``groups [n]`` when given; ties go to the
    smallest C). standardize: scale each feature to unit variance first (the penalty then acts
    on standardised weights). rank: size of the block of leading principal directions the
    solver starts from (0 disables it; any value gives the same optimum). layers: a name per
    layer, kept in ``layers_``. device/dtype: where and in which precision the ``[n_layers, n,
    d]`` working copy lives (default: X's device; float32 unless X is float64); small problems
    are solved in float64.

    Returns a :class:`LayerProbes`. Warns (``ConvergenceWarning``) for any layer whose gradient
    did not fall below ``tol`` within ``max_iter`` iterations.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = np.arange(200) % 2
    >>> X = rng.standard_normal((200, 3, 16)).astype(np.float32)  # [n, n_layers, d]
    >>> X[:, 2, 0] += 3 * y  # only layer 2 carries the label
    >>> probes = fit_layer_probes(X, y, C=1.0)
    >>> probes.coef_.shape, probes.intercept_.shape
    ((3, 16), (3,))
    >>> [bool(acc > 0.9) for acc in probes.score(X, y)]
    [False, False, True]
    >>> probes.probe(2).predict(X[:4, 2]).tolist()
    [0, 1, 0, 1]
    """
    x = _as_tensor(X, "X", (3,), check_finite=False)
    n_layers = x.shape[1]
    if layers is not None:
        layers = tuple(layers)
        if len(layers) != n_layers or len(set(layers)) != n_layers:
            raise ValueError(
                f"layers must name each of the {n_layers} layers of X once; got {list(layers)!r}"
            )
    fitted = _fit_arrays(
        x,
        y,
        C,
        Cs=Cs,
        cv=cv,
        groups=groups,
        standardize=standardize,
        max_iter=max_iter,
        tol=tol,
        rank=rank,
        random_state=random_state,
        device=device,
        dtype=dtype,
    )
    return LayerProbes(
        layers_=layers or tuple(range(n_layers)),
        standardize=standardize,
        max_iter=max_iter,
        tol=tol,
        random_state=random_state,
        **fitted,
    )


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Binary L2-regularised logistic probe on one layer's activations; a scikit-learn estimator.

    The objective is ``LogisticRegression(C=C)``'s on standardised features (see the module
    docstring); ``C=None`` chooses C by ``cv``-fold cross-validated accuracy over ``Cs``
    (grouped when ``fit`` gets ``groups``, else stratified). Works with ``clone``,
    ``cross_val_score``, ``Pipeline`` and ``GridSearchCV``.

    Fitted attributes: ``coef_ [1, d]`` and ``intercept_ [1]`` in the original input space,
    ``classes_ [2]``, ``C_``, ``mean_ [d]``, ``scale_ [d]``, ``n_features_in_``, ``n_iter_``,
    and ``cv_scores_ [len(Cs)]`` when C was chosen by cross-validation.

    >>> import numpy as np
    >>> from sklearn.model_selection import cross_val_score
    >>> rng = np.random.default_rng(0)
    >>> y = np.array(["comply", "refuse"] * 50)
    >>> X = rng.standard_normal((100, 8)) + 2.0 * (y == "refuse")[:, None]
    >>> probe = LinearProbe(Cs=(0.01, 1.0), cv=3).fit(X, y)
    >>> probe.classes_.tolist(), probe.coef_.shape, probe.C_ in (0.01, 1.0)
    (['comply', 'refuse'], (1, 8), True)
    >>> bool(cross_val_score(LinearProbe(C=1.0), X, y, cv=3).min() > 0.9)
    True
    """

    def __init__(
        self,
        C: float | None = None,
        Cs: Sequence[float] = DEFAULT_CS,
        cv: int = 5,
        standardize: bool = True,
        max_iter: int = 100,
        tol: float = 1e-5,
        random_state: int = 0,
    ):
        self.C = C
        self.Cs = Cs
        self.cv = cv
        self.standardize = standardize
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        return tags

    def fit(self, X, y, groups=None) -> LinearProbe:
        """X ``[n, d]``, y ``[n]`` (two classes), groups ``[n]`` (only used when C is None)."""
        x = self._check_2d(X)
        if x.shape[1] == 0 or x.shape[0] == 0:
            what = "feature" if x.shape[1] == 0 else "sample"
            raise ValueError(
                f"X has 0 {what}(s) (shape={tuple(x.shape)}) while a minimum of 1 is required."
            )
        fitted = _fit_arrays(
            x[:, None, :],
            y,
            self.C,
            Cs=self.Cs,
            cv=self.cv,
            groups=groups,
            standardize=self.standardize,
            max_iter=self.max_iter,
            tol=self.tol,
            rank=64,
            random_state=self.random_state,
            device=None,
            dtype=None,
        )
        self.coef_ = fitted["coef_"]
        self.intercept_ = fitted["intercept_"]
        self.classes_ = fitted["classes_"]
        self.C_ = float(fitted["C_"][0])
        self.mean_ = fitted["mean_"][0]
        self.scale_ = fitted["scale_"][0]
        self.n_iter_ = fitted["n_iter_"]
        self.n_features_in_ = x.shape[1]
        if fitted["cv_scores_"] is not None:
            self.cv_scores_ = fitted["cv_scores_"][0]
        return self

    @staticmethod
    def _check_2d(X) -> torch.Tensor:
        x = _as_tensor(X, "X", (0, 1, 2, 3), check_finite=False)
        if x.ndim == 3:
            raise ValueError(
                f"X must be 2-D [n, d]; got shape {tuple(x.shape)}; for [n, n_layers, d] use "
                "fit_layer_probes"
            )
        if x.ndim != 2:
            raise ValueError(
                f"X must be 2-D [n, d]; got shape {tuple(x.shape)}. Reshape your data: "
                "X.reshape(-1, 1) for one feature, X.reshape(1, -1) for one sample"
            )
        return x

    def _check_fitted_X(self, X) -> torch.Tensor:
        if not hasattr(self, "coef_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("this LinearProbe is not fitted yet; call fit(X, y) first")
        x = self._check_2d(X)
        if x.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {x.shape[1]} features, but LinearProbe is expecting "
                f"{self.n_features_in_} features as input (got shape {tuple(x.shape)})"
            )
        return x

    def decision_function(self, X) -> np.ndarray:
        """X ``[n, d]`` -> logits of ``classes_[1]`` ``[n]``."""
        x = self._check_fitted_X(X)
        dec = _decision(x[:, None, :], self.coef_[:, :, None], self.intercept_[:, None])[:, 0, 0]
        _check_finite_output(dec)
        return dec

    def predict_proba(self, X) -> np.ndarray:
        """X ``[n, d]`` -> ``[n, 2]``: P(classes_[0]), P(classes_[1])."""
        p1 = _sigmoid(self.decision_function(X))
        return np.stack([1.0 - p1, p1], axis=1)

    def predict(self, X) -> np.ndarray:
        """X ``[n, d]`` -> labels ``[n]``."""
        positive = self.decision_function(X) > 0
        return self.classes_[positive.astype(np.int64)]

    def save(self, path) -> None:
        """Write ``path`` (safetensors: arrays) and ``path.with_suffix('.json')`` (the rest)."""
        if not hasattr(self, "coef_"):
            raise ValueError("this LinearProbe is not fitted; nothing to save")
        params = self.get_params()
        params["Cs"] = [float(c) for c in params["Cs"]]
        meta = {
            "format": "probes.LinearProbe",
            "version": _FORMAT_VERSION,
            "params": params,
            "classes": _classes_to_json(self.classes_),
            "C_": self.C_,
        }
        tensors = {
            "coef": self.coef_,
            "intercept": self.intercept_,
            "mean": self.mean_,
            "scale": self.scale_,
            "n_iter": np.asarray(self.n_iter_, dtype=np.int64),
            "cv_scores": getattr(self, "cv_scores_", None),
        }
        _save(path, tensors, meta)

    @classmethod
    def load(cls, path) -> LinearProbe:
        t, meta = _load(path, "probes.LinearProbe")
        params = dict(meta["params"])
        params["Cs"] = tuple(params["Cs"])
        probe = cls(**params)
        probe.coef_ = t["coef"]
        probe.intercept_ = t["intercept"]
        probe.mean_ = t["mean"]
        probe.scale_ = t["scale"]
        probe.n_iter_ = t["n_iter"]
        probe.classes_ = _classes_from_json(meta["classes"])
        probe.C_ = float(meta["C_"])
        probe.n_features_in_ = int(probe.coef_.shape[1])
        if "cv_scores" in t:
            probe.cv_scores_ = t["cv_scores"]
        return probe
