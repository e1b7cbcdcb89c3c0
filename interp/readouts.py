"""Read-outs: one number per row from the residual stream at one (layer, site), or from logits.

A read-out turns activations into the scalar an analysis follows: a linear probe's logit
(:class:`ProbeLogit`), a projection on a direction (:class:`DirectionProjection`), or the
difference of two output logits (:class:`LogitDiff`). Segment attribution uses them as its
metric at the decision position, the PING screen reads a refusal probe with one, and token-level
plots apply one at every position.

>>> import torch
>>> r = ProbeLogit(torch.tensor([1.0, 0.0]), intercept=-0.5, layer=3)
>>> r.name, float(r(torch.tensor([[2.0, 7.0]]))[0])
('probe_logit@blocks.3.hook_resid_post', 1.5)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from interp.models import Model, Site, hook_name

if TYPE_CHECKING:
    from probes import LayerProbes


def _vector(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x.detach()).float().cpu()
    if t.ndim != 1 or not torch.isfinite(t).all():
        raise ValueError(f"{name} must be a finite [d_model] vector, got shape {list(t.shape)}")
    return t


@dataclass(frozen=True, eq=False)
class ProbeLogit:
    """A linear probe's logit ``x · coef + intercept`` on the residual stream at ``layer``:
    ``[rows, d_model] -> [rows]``."""

    coef: torch.Tensor  # [d_model]
    intercept: float
    layer: int
    site: Site = "resid_post"

    def __post_init__(self):
        object.__setattr__(self, "coef", _vector(self.coef, "coef"))
        object.__setattr__(self, "intercept", float(self.intercept))

    @classmethod
    def from_probes(cls, layer_probes: LayerProbes, layer: int, site: Site = "resid_post") -> ProbeLogit:
        """The probe of ``layer`` from a :class:`probes.LayerProbes` (``layer`` is looked up in
        its ``layers_``, which must name model layers: fit on all layers, or pass ``layers=``)."""
        if layer not in layer_probes.layers_:
            raise ValueError(f"layer {layer} has no probe (the probes' layers_ are {list(layer_probes.layers_)})")
        i = list(layer_probes.layers_).index(layer)
        return cls(layer_probes.coef_[i], float(layer_probes.intercept_[i]), int(layer), site)

    @property
    def name(self) -> str:
        return f"probe_logit@{hook_name(self.layer, self.site)}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.coef.to(x) + self.intercept


@dataclass(frozen=True, eq=False)
class DirectionProjection:
    """Projection ``x · r̂`` of the residual stream at ``layer`` on the unit direction ``r̂``:
    ``[rows, d_model] -> [rows]``."""

    direction: torch.Tensor  # [d_model], normalised here
    layer: int
    site: Site = "resid_post"

    def __post_init__(self):
        r = _vector(self.direction, "direction")
        if r.norm() == 0:
            raise ValueError("direction has norm zero")
        object.__setattr__(self, "direction", r / r.norm())

    @property
    def name(self) -> str:
        return f"projection@{hook_name(self.layer, self.site)}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.direction.to(x)


@dataclass(frozen=True)
class LogitDiff:
    """Output logit of ``token_a`` minus that of ``token_b`` (e.g. the first token of a refusal
    minus the first token of a tool call) for the token after the read position:
    ``[rows, d_vocab] -> [rows]``. It is read from the last block's output through
    :meth:`interp.models.Model.unembed`."""

    token_a: int
    token_b: int
    layer = None  # reads the output logits, after every layer
    site = "logits"

    @property
    def name(self) -> str:
        return f"logit_diff[{self.token_a}-{self.token_b}]"

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, self.token_a] - logits[:, self.token_b]


Readout = ProbeLogit | DirectionProjection | LogitDiff


def check_readout(model: Model, readout: Readout) -> None:
    """Raise a ValueError naming the problem when ``readout`` does not fit ``model``."""
    if readout.layer is None:
        vocab = int(model.hf_model.get_output_embeddings().weight.shape[0])
        for t in (readout.token_a, readout.token_b):
            if not 0 <= int(t) < vocab:
                raise ValueError(f"{readout.name}: token id {t} is outside the vocabulary (0..{vocab - 1})")
        return
    try:
        model.check_layers([readout.layer], readout.site)
    except ValueError as e:
        raise ValueError(f"metric {readout.name}: {e}") from None
    size = (readout.coef if isinstance(readout, ProbeLogit) else readout.direction).shape[0]
    if size != model.d_model:
        raise ValueError(f"metric {readout.name} has a [{size}] vector; {model.name} has d_model={model.d_model}")


def read_site(model: Model, readout: Readout) -> tuple[int, Site]:
    """The (layer, site) of the residual stream a read-out is computed from (logit read-outs:
    the last block's output)."""
    if readout.layer is None:
        return model.n_layers - 1, "resid_post"
    return model.check_layers([readout.layer], readout.site)[0], readout.site


def apply_readout(model: Model, readout: Readout, x: torch.Tensor) -> torch.Tensor:
    """The read-out of ``x [rows, d_model]`` taken at :func:`read_site`: ``[rows]``."""
    return readout(model.unembed(x) if readout.layer is None else x)
