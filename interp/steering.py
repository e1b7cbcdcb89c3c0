"""Steering along a direction: activation addition and directional ablation (Arditi et al. 2024).

Both are context managers that hook the model's decoder layers for as long as the block runs,
so they apply to any forward or generation of the handle's ``hf_model`` (every backend wraps the
same model)::

    with add_direction(model, refusal_dir, layers=[4], coefficient=8.0):
        replies = generate(model, transcripts)       # more refusal, at what cost?
    with ablate_direction(model, refusal_dir):
        replies = generate(model, transcripts)       # does the aligned model stop refusing?

:func:`coefficient_sweep` runs a measurement at each of several coefficients.

A direction is ``[d_model]`` (the same at every layer) or ``[n_layers, d_model]`` (row ``i`` at
layer ``i``); it is unit-normalised here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TypeVar

import torch

from interp.models import Model, Site

T = TypeVar("T")


def _unit(direction: torch.Tensor, layer: int) -> torch.Tensor:
    r = direction[layer] if direction.ndim == 2 else direction
    return r / r.norm()


def _check_direction(model: Model, direction: torch.Tensor) -> torch.Tensor:
    direction = torch.as_tensor(direction, dtype=torch.float32)
    ok = (direction.ndim == 1 and direction.shape[0] == model.d_model) or (
        direction.ndim == 2 and direction.shape == (model.n_layers, model.d_model))
    if not ok:
        raise ValueError(f"direction must be [d_model={model.d_model}] or [n_layers={model.n_layers}, "
                         f"d_model={model.d_model}], got {list(direction.shape)}")
    if not torch.isfinite(direction).all() or (direction.norm(dim=-1) == 0).any():
        raise ValueError("direction has a zero norm or non-finite values")
    return direction


def project_out(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``x - (x · r) r`` for a unit vector ``r``: ``[..., d_model]``."""
    r = r.to(x.dtype)
    return x - (x @ r)[..., None] * r


@contextmanager
def add_direction(model: Model, direction: torch.Tensor, layers: Sequence[int], coefficient: float
                  ) -> Iterator[None]:
    """Add ``coefficient`` × unit direction to the residual stream entering each of ``layers``
    (``resid_pre``), at every position. Coefficient 0 is the identity."""
    direction = _check_direction(model, direction)
    layers = model.check_layers(list(layers), "resid_pre")
    shifts = {i: (coefficient * _unit(direction, i)).to(model.device) for i in layers}
    with model.hooks({i: lambda x, s=s: x + s.to(x.dtype) for i, s in shifts.items()}, "resid_pre"):
        yield


@contextmanager
def ablate_direction(model: Model, direction: torch.Tensor, layers: Sequence[int] | None = None
                     ) -> Iterator[None]:
    """Project the direction out of the residual stream at every point a block reads or writes
    it: each layer's input (``resid_pre``), what its MLP reads after attention (``resid_mid``,
    where the architecture has a second norm) and the last block's output. ``layers`` restricts it."""
    direction = _check_direction(model, direction).to(model.device)
    layers = list(range(model.n_layers)) if layers is None else model.check_layers(list(layers), "resid_pre")
    units = {i: _unit(direction, i) for i in layers}

    def fns(which: Sequence[int]) -> dict[int, Callable[[torch.Tensor], torch.Tensor]]:
        return {i: lambda x, r=units[i]: project_out(x, r) for i in which}

    sites: list[tuple[Site, Sequence[int]]] = [("resid_pre", layers)]
    try:
        model.check_layers(layers, "resid_mid")
        sites.append(("resid_mid", layers))
    except ValueError:  # no second norm to read resid_mid at: nothing reads it there
        pass
    if model.n_layers - 1 in layers:
        sites.append(("resid_post", [model.n_layers - 1]))
    with ExitStack() as stack:
        for site, which in sites:
            stack.enter_context(model.hooks(fns(which), site))
        yield


def residual_projection(model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        direction: torch.Tensor, layers: Sequence[int], site: Site = "resid_post") -> torch.Tensor:
    """Projections of the residual stream onto the unit direction: ``[batch, pos, n_layers]``."""
    direction = _check_direction(model, direction)
    got = model.residual(input_ids, attention_mask, layers, site)
    layers = sorted(set(model.check_layers(list(layers), site)))
    return torch.stack([got[i].float() @ _unit(direction, i).to(got[i].device) for i in layers], -1)


def coefficient_sweep(model: Model, direction: torch.Tensor, layers: Sequence[int], coefficients: Sequence[float],
                      measure: Callable[[], T]) -> list[tuple[float, T]]:
    """``measure()`` under :func:`add_direction` at each coefficient, in the order given:
    ``[(coefficient, result), ...]``. Report what steering costs, not only what it buys: let
    ``measure`` return benign success as well as harmful refusal::

        sweep = coefficient_sweep(model, r, [2], [0, 4, 8], lambda: evaluate(model, env, tasks).rates)
    """
    out = []
    for c in coefficients:
        with add_direction(model, direction, layers, float(c)):
            out.append((float(c), measure()))
    return out
