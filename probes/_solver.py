"""The batched logistic solver behind :mod:`probes.linear` (private).

It minimises, for every layer at once and for one or more C per layer, what
``sklearn.linear_model.LogisticRegression(C=C)`` minimises on the (optionally standardised)
features::

    C * sum_i logloss(y_i, w . z_i + b) + 0.5 * ||w||^2        (b is not penalised)

over a growing subspace of weight vectors: it starts from a block of ``rank`` leading principal
directions of each layer's standardised activations (a randomized range finder with one power
iteration, which takes care of the few large, correlated directions residual streams have),
then adds one direction per iteration, the current gradient, and re-solves the small
``(intercept + subspace)`` problem exactly by batched Newton. An iteration costs two passes
over the activations, each one batched matrix product across layers; the small problems are
solved in float64. Each problem stops when its own gradient is below ``tol`` (measured, as
scikit-learn does, on the objective divided by ``C * n``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

_MAX_SUBSPACE = 64  # gradient directions kept per problem before the oldest are merged
_NEWTON_TOL_FACTOR = 1e-2  # inner (subspace) problems are solved to this fraction of tol
_SEED_POWER_ITERATIONS = 1  # of the randomized range finder that builds the starting block


# ----------------------------------------------------------------------------------------------
# Standardisation: a [n_layers, n, d] working copy, centred (always) and scaled (optionally).


@dataclass(frozen=True)
class WorkingCopy:
    """The solver's input: ``X [L, m, d]`` in the working dtype, and how it was made."""

    X: torch.Tensor  # [L, m, d] centred, and divided by scale when standardising
    centre: torch.Tensor  # [L, d] float64, original units
    scale: torch.Tensor  # [L, d] float64, original units (1 unless standardising)
    col_norm: torch.Tensor  # [L] float64: largest column norm of X (sets the gradient's rounding)
    spread: torch.Tensor  # [L] float64: largest centred feature standard deviation, original units


def _centre_into(out: torch.Tensor, xl: torch.Tensor, ones: torch.Tensor, f=None):
    """Write ``xl / f`` ``[m, d]`` centred into ``out`` (the working dtype and device); return
    ``(xl / f in the working dtype, its mean [d], its standard deviation [d] float64)``."""
    if f is not None:
        xl = xl / f.to(device=xl.device, dtype=xl.dtype)
    xl = xl.to(device=out.device, dtype=out.dtype)
    mu = (ones @ xl)[0] / xl.shape[0]
    torch.sub(xl, mu, out=out)
    sd = ((ones @ out.square())[0].to(torch.float64) / xl.shape[0]).sqrt()
    return xl, mu, sd


def _computed_in_range(mu: torch.Tensor, sd: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every feature's mean and standard deviation came out finite and far enough from
    the underflow of ``dtype`` (their squares were summed)."""
    size = torch.maximum(mu.abs().to(torch.float64), sd)
    tiny = (size > 0) & (size < torch.finfo(dtype).tiny ** 0.25)
    return bool(torch.isfinite(size).all()) and not bool(tiny.any())


def _power_of_two_scale(xl: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A power of two per feature ``[d]`` (float64) that brings ``xl [m, d]`` near 1, where
    its magnitude is so far from 1 that sums of squares in ``dtype`` would overflow or
    underflow; 1 elsewhere (and for all-zero or non-finite columns). Dividing by a power of
    two is exact, and so is every later step of the standardisation up to that factor."""
    low, high = xl.aminmax(dim=0)
    amax = torch.maximum(low.abs(), high.abs()).to(torch.float64)
    info = torch.finfo(dtype)
    extreme = (amax < info.tiny**0.25) | (amax > info.max**0.25)
    extreme &= torch.isfinite(amax) & (amax > 0)
    exponent = torch.frexp(amax).exponent - 1  # amax in [2**exponent, 2**(exponent + 1))
    return torch.where(extreme, torch.ldexp(torch.ones_like(amax), exponent), 1.0)


def _raise_on_nonfinite(xl: torch.Tensor, rows: np.ndarray | None, layer: int) -> None:
    found = torch.nonzero(~torch.isfinite(xl))
    if not len(found):
        raise ValueError(f"the mean of layer {layer} of X overflowed {xl.dtype}; rescale X")
    bad = found[0].tolist()
    row = bad[0] if rows is None else int(rows[bad[0]])
    raise ValueError(
        f"X contains NaN or inf (first at sample {row}, layer {layer}, feature {bad[1]})"
    )


def working_copy(
    X: torch.Tensor, rows: np.ndarray | None, standardize: bool, dtype: torch.dtype, device
) -> WorkingCopy:
    """X ``[n, L, d]`` (rows ``rows`` only, when given) -> the solver's :class:`WorkingCopy`.

    Centring changes nothing in the solution (the intercept is free) but conditions the
    problem, so it is always done; ``scale`` is 1 unless ``standardize``. Zero-variance
    features keep scale 1, as in ``StandardScaler``. A layer whose mean or variance overflows
    or underflows (features like 1e300 or 1e-300) is computed again on its features divided by
    a power of two (:func:`_power_of_two_scale`). Raises on NaN/inf (found through the mean).
    """
    n, n_layers, d = X.shape
    idx = None if rows is None else torch.as_tensor(rows, device=X.device)
    m = n if idx is None else int(idx.shape[0])
    Xs = torch.empty(n_layers, m, d, dtype=dtype, device=device)
    centre = torch.empty(n_layers, d, dtype=torch.float64, device=device)
    scale = torch.ones(n_layers, d, dtype=torch.float64, device=device)
    col_norm = torch.zeros(n_layers, dtype=torch.float64, device=device)
    spread = torch.zeros(n_layers, dtype=torch.float64, device=device)
    ones = torch.ones(1, m, dtype=dtype, device=device)
    for layer in range(n_layers):
        xl = X[:, layer, :] if idx is None else X[idx, layer, :]
        out, f = Xs[layer], torch.ones(d, dtype=torch.float64, device=device)
        xw, mu, sd = _centre_into(out, xl, ones)
        prescaled = not _computed_in_range(mu, sd, dtype)
        if prescaled:
            f = _power_of_two_scale(xl, dtype)
            xw, mu, sd = _centre_into(out, xl, ones, f)
            f = f.to(device)
        if not bool(torch.isfinite(mu).all()):
            _raise_on_nonfinite(xw, rows, layer)
        centre[layer] = mu.to(torch.float64) * f
        spread[layer] = (sd * f).max()
        if standardize:
            unit = 1.0 / f  # scale 1 in original units
            noise = 10 * torch.finfo(dtype).eps * mu.abs().to(torch.float64)
            sd = torch.where(sd > noise, sd, unit)
            sd = torch.where(sd > 0, sd, unit)
            out.div_(sd.to(dtype))
            scale[layer] = sd * f
            col_norm[layer] = math.sqrt(m)
        else:
            if prescaled:
                out.mul_(f.to(dtype))
            col_norm[layer] = (sd * f).max() * math.sqrt(m)
    return WorkingCopy(Xs, centre, scale, col_norm, spread)


# ----------------------------------------------------------------------------------------------
# Small problems: batched Newton.


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


# ----------------------------------------------------------------------------------------------
# The growing subspace.


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


def _seed_block(Xs: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading right-singular directions of each layer of Xs ``[L, m, d]`` (randomized range
    finder): ``(S0 [L, k0, d], S0 @ Xs^T [L, k0, m])``, float64, orthonormal rows."""
    n_layers, m, d = Xs.shape
    dev, wd, f64 = Xs.device, Xs.dtype, torch.float64
    k0 = max(0, min(rank, d, m))
    if not k0:
        return (
            torch.zeros(n_layers, 0, d, dtype=f64, device=dev),
            torch.zeros(n_layers, 0, m, dtype=f64, device=dev),
        )
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(n_layers, k0, m, generator=gen, dtype=wd).to(dev)
    T = torch.bmm(omega, Xs)  # random combinations of rows: inside the row space
    for _ in range(_SEED_POWER_ITERATIONS):  # towards the leading directions
        T = torch.bmm(torch.bmm(T, Xs.transpose(1, 2)), Xs)
    Q = torch.linalg.qr(T.to(f64).transpose(1, 2))[0]  # [L, d, k0]
    S0 = Q.transpose(1, 2).contiguous()  # [L, k0, d]
    return S0, torch.bmm(S0.to(wd), Xs.transpose(1, 2)).to(f64)


class _Subspace:
    """Per problem ``(layer, p)``: the layer's seed block ``S0`` and up to ``jmax`` gradient
    directions ``E`` (orthonormal, and orthogonal to ``S0``), their products with Xs^T, and the
    weights' coordinates in them (``a0``, ``ae``). Weights are ``a0 @ S0 + ae @ E``."""

    def __init__(self, S0, Z0, P: int, jmax: int, m: int):
        n_layers, k0, d = S0.shape
        kw = dict(dtype=torch.float64, device=S0.device)
        self.S0, self.Z0, self.k0, self.jmax, self.j = S0, Z0, k0, jmax, 0
        self.E = torch.zeros(n_layers, P, jmax, d, **kw)
        self.Ze = torch.zeros(n_layers, P, jmax, m, **kw)  # E @ Xs^T
        self.a0 = torch.zeros(n_layers, P, k0, **kw)
        self.ae = torch.zeros(n_layers, P, jmax, **kw)

    def merge_oldest_half(self) -> None:
        """Replace the oldest half of the gradient directions by their weighted sum (one)."""
        E, Ze, ae, jmax = self.E, self.Ze, self.ae, self.jmax
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
        self.E, self.Ze, self.ae, self.j = E_new, Ze_new, ae_new, h + 1

    def add_direction(self, G, active, Xs, layers) -> None:
        """Add the gradient G ``[L, P, d]`` of the active problems, orthogonalised against the
        subspace (twice, for accuracy); a zero direction where nothing new is left."""
        S0, j = self.S0, self.j
        v = torch.where(active[:, :, None], G, 0.0)
        gnorm = torch.linalg.vector_norm(v, dim=-1)
        for _ in range(2):
            v = v - torch.bmm(torch.bmm(v, S0.transpose(1, 2)), S0)
            if j:
                E = self.E[:, :, :j]
                v = v - torch.einsum("lpj,lpjd->lpd", torch.einsum("lpd,lpjd->lpj", v, E), E)
        vnorm = torch.linalg.vector_norm(v, dim=-1)
        fresh = active & (vnorm > 1e-10 * gnorm)
        v = torch.where(fresh[:, :, None], v / vnorm.clamp_min(1e-300)[:, :, None], 0.0)
        self.E[:, :, j] = v
        self.Ze[:, :, j] = _rows_times_Xt(v.to(Xs.dtype), Xs, layers).to(torch.float64)
        self.j = j + 1

    def minimise(self, active, y, lam, b, t, w, tol: float) -> None:
        """Solve the active problems exactly over ``(intercept, S0, E)``; update b ``[L, P]``,
        margins t ``[L, P, m]`` and weights w ``[L, P, d]`` in place."""
        j, k0 = self.j, self.k0
        li, pi = torch.nonzero(active, as_tuple=True)
        Z = torch.cat([self.Z0[li], self.Ze[li, pi, :j]], 1)
        coef = torch.cat([self.a0[li, pi], self.ae[li, pi, :j]], 1)
        coef, b_new, t_new = _newton(Z, y, lam[li, pi], coef, b[li, pi], tol * _NEWTON_TOL_FACTOR)
        self.a0[li, pi], self.ae[li, pi, :j] = coef[:, :k0], coef[:, k0:]
        b[li, pi], t[li, pi] = b_new, t_new
        w[li, pi] = (
            torch.bmm(coef[:, None, :k0], self.S0[li])[:, 0]
            + torch.bmm(coef[:, None, k0:], self.E[li, pi, :j])[:, 0]
        )


# ----------------------------------------------------------------------------------------------
# The batched solver.


@dataclass(frozen=True)
class Solution:
    w: torch.Tensor  # [L, P, d] float64, standardised space
    b: torch.Tensor  # [L, P] float64
    n_iter: torch.Tensor  # [L, P] int64
    converged: torch.Tensor  # [L, P] bool
    at_rounding_floor: torch.Tensor  # [L, P] bool: stopped by the working dtype, above tol


def solve(
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
) -> Solution:
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
    sub = _Subspace(*_seed_block(Xs, rank, seed), P=P, jmax=max(2, max_subspace), m=m)
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
        if sub.j == sub.jmax:
            sub.merge_oldest_half()
        sub.add_direction(G, active, Xs, layers)
        sub.minimise(active, y, lam, b, t, w, tol)
    return Solution(w=w, b=b, n_iter=n_iter, converged=converged, at_rounding_floor=at_floor)


def decision(X: torch.Tensor, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
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
