"""Difference-in-means directions, projections onto them, cosine similarities, separation d′.

Every function takes numpy arrays or torch tensors, per layer (``[n, n_layers, d]``) or for a
single layer (``[n, d]``), and returns torch tensors. Means and dot products are accumulated in
float64; results come back as float32, or float64 when the input is float64.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .metrics import _check_binary_labels

__all__ = ["cosine_similarity", "diff_in_means", "dprime", "project"]


def _as_tensor(x, name: str, ndims: tuple[int, ...], *, check_finite: bool = True) -> torch.Tensor:
    """``x`` as a real floating torch tensor (no copy when possible), with its ndim checked."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif hasattr(x, "nnz") and hasattr(x, "toarray"):  # scipy.sparse
        raise TypeError(
            f"{name} is a sparse {type(x).__name__} of shape {x.shape}; sparse input is not "
            f"supported: pass a dense array ({name}.toarray())"
        )
    else:
        a = np.asarray(x)
        if a.dtype.kind == "O":
            try:  # numbers stored as objects; a TypeError names a non-number
                a = a.astype(np.float64)
            except ValueError as err:
                raise ValueError(
                    f"{name} has dtype object with non-numeric values ({err})"
                ) from None
        if a.dtype.kind == "c":
            raise ValueError(
                f"{name} must hold real numbers: Complex data not supported (got dtype {a.dtype})"
            )
        if a.dtype.kind not in "biuf":
            raise ValueError(f"{name} must hold real numbers; got dtype {a.dtype}")
        if a.dtype.kind != "f":
            a = a.astype(np.float32)
        with warnings.catch_warnings():  # read-only arrays are fine: nothing here writes to X
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(np.ascontiguousarray(a))
    if t.is_complex():
        raise ValueError(
            f"{name} must hold real numbers: Complex data not supported (got dtype {t.dtype})"
        )
    if not t.is_floating_point():
        t = t.to(torch.float32)
    if t.ndim not in ndims:
        want = " or ".join(f"{k}-D" for k in ndims)
        raise ValueError(f"{name} must be {want}; got shape {tuple(t.shape)}")
    if check_finite and t.numel() and not bool(torch.isfinite(t).all()):
        bad = torch.nonzero(~torch.isfinite(t))[0].tolist()
        raise ValueError(f"{name} contains NaN or inf (first at index {tuple(bad)})")
    return t


def _out_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def diff_in_means(X, y, normalize: bool = True) -> torch.Tensor:
    """Mean of the positive class minus mean of the negative class, per layer.

    X: ``[n, n_layers, d]`` -> ``[n_layers, d]``, or ``[n, d]`` -> ``[d]``.
    y: ``[n]`` binary labels (positive = the larger label).
    normalize: return unit-norm directions (default) or the raw mean difference.

    >>> import numpy as np
    >>> X = np.array([[0, 0], [4, 0], [0, 1], [4, 1]], dtype=np.float32)  # [n, d]
    >>> diff_in_means(X, [0, 1, 0, 1], normalize=False)
    tensor([4., 0.])
    >>> diff_in_means(X, [0, 1, 0, 1])
    tensor([1., 0.])
    """
    x = _as_tensor(X, "X", (2, 3))
    y01, _ = _check_binary_labels(y, x.shape[0], name="y")
    pos = torch.from_numpy(y01.astype(bool)).to(x.device)
    # Mean via a float64 weighted sum: no float64 copy of X is made.
    w = torch.where(pos, 1.0 / pos.sum(), -1.0 / (~pos).sum()).to(torch.float64)
    flat = x.reshape(x.shape[0], -1)
    diff = torch.empty(flat.shape[1], dtype=torch.float64, device=x.device)
    chunk = max(256, (1 << 23) // max(flat.shape[0], 1))  # float64 chunks of about 64 MiB
    for start in range(0, flat.shape[1], chunk):
        diff[start : start + chunk] = w @ flat[:, start : start + chunk].to(torch.float64)
    diff = diff.reshape(x.shape[1:])
    if normalize:
        norm = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
        if bool((norm == 0).any()):
            where = "" if x.ndim == 2 else f" at layer {int(torch.nonzero(norm[:, 0] == 0)[0])}"
            raise ValueError(
                f"the class means of X are identical{where}; no direction to normalise"
            )
        diff = diff / norm
    return diff.to(_out_dtype(x))


def project(X, directions) -> torch.Tensor:
    """Dot products of each row of ``X`` with each layer's direction.

    X ``[n, n_layers, d]`` with directions ``[n_layers, d]`` -> ``[n, n_layers]``;
    X ``[n, d]`` with a direction ``[d]`` -> ``[n]``. With unit directions (the default of
    :func:`diff_in_means`) these are scalar projections.
    """
    x = _as_tensor(X, "X", (2, 3))
    v = _as_tensor(directions, "directions", (1, 2)).to(device=x.device)
    if v.ndim != x.ndim - 1 or tuple(v.shape) != tuple(x.shape[1:]):
        raise ValueError(
            f"directions must have shape {tuple(x.shape[1:])} to match X of shape "
            f"{tuple(x.shape)}; got {tuple(v.shape)}"
        )
    v64 = v.to(torch.float64)
    if x.ndim == 2:
        return (x.to(torch.float64) @ v64).to(_out_dtype(x))
    out = torch.empty(x.shape[0], x.shape[1], dtype=torch.float64, device=x.device)
    for layer in range(x.shape[1]):
        out[:, layer] = x[:, layer, :].to(torch.float64) @ v64[layer]
    return out.to(_out_dtype(x))


def cosine_similarity(a, b) -> torch.Tensor:
    """Cosine similarity of matching rows: ``a, b [n_layers, d]`` -> ``[n_layers]``;
    ``a, b [d]`` -> a 0-d tensor. Raises on a zero-norm row."""
    ta = _as_tensor(a, "a", (1, 2))
    tb = _as_tensor(b, "b", (1, 2)).to(device=ta.device)
    if ta.shape != tb.shape:
        raise ValueError(
            f"a and b must have the same shape; got {tuple(ta.shape)} and {tuple(tb.shape)}"
        )
    a64, b64 = ta.to(torch.float64), tb.to(torch.float64)
    na = torch.linalg.vector_norm(a64, dim=-1)
    nb = torch.linalg.vector_norm(b64, dim=-1)
    for name, norms in (("a", na), ("b", nb)):
        if bool((norms == 0).any()):
            where = "" if norms.ndim == 0 else f" at row {int(torch.nonzero(norms == 0)[0])}"
            raise ValueError(f"{name} has a zero vector{where}; its cosine similarity is undefined")
    cos = (a64 * b64).sum(-1) / (na * nb)
    return cos.clamp(-1.0, 1.0).to(torch.promote_types(_out_dtype(ta), _out_dtype(tb)))


def dprime(projections, y) -> torch.Tensor:
    """Separation d′ = (mean₁ − mean₀) / pooled standard deviation, per column.

    projections: ``[n, n_layers]`` -> ``[n_layers]``, or ``[n]`` -> a 0-d tensor.
    y: ``[n]`` binary labels with at least 2 examples per class; class 1 is the larger label.
    The pooled variance is ((n₀−1)·s₀² + (n₁−1)·s₁²) / (n₀ + n₁ − 2) with sample variances s².
    Zero pooled variance gives ±inf (or NaN when the means are equal too).
    """
    p = _as_tensor(projections, "projections", (1, 2))
    y01, _ = _check_binary_labels(
        y, p.shape[0], name="y", min_per_class=2, reason="d′ needs a variance per class"
    )
    pos = torch.from_numpy(y01.astype(bool)).to(p.device)
    p64 = p.to(torch.float64)
    x1, x0 = p64[pos], p64[~pos]
    n1, n0 = x1.shape[0], x0.shape[0]
    pooled = ((n1 - 1) * x1.var(dim=0) + (n0 - 1) * x0.var(dim=0)) / (n1 + n0 - 2)
    return ((x1.mean(dim=0) - x0.mean(dim=0)) / pooled.sqrt()).to(_out_dtype(p))
