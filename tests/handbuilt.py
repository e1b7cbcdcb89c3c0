"""A model built by hand whose read-out at the decision position is a known function of which
segments are present: ground truth for interaction attribution.

Every token is embedded as one of three unit vectors: ``e0`` for the tokens of a chosen set
(say, those only in the user's request), ``e1`` for a second set (those only in one tool result),
``e2`` for everything else. Block 0 counts, causally, how many ``e0`` and ``e1`` tokens each
position has seen (``a`` and ``b``) and writes a gate into dimension 3: ``min(a, 1) · min(b, 1)``
(an AND of the two segments' presence) or ``a · b`` (bilinear). Block 1 passes the stream on.
Read-out: the projection on ``e3`` after block 0 (or 1). A third set of tokens (``e2``'s place taken
by a fourth dimension) makes a three-way AND.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch
from torch import nn

from interp.models import Model


class Gate(nn.Module):
    """``x + e_out · gate(counts)`` with counts of the marker dimensions up to each position."""

    def __init__(self, markers: Sequence[int], out: int, bilinear: bool):
        super().__init__()
        self.markers, self.out, self.bilinear = list(markers), out, bilinear

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor]:
        counts = hidden_states[..., self.markers].cumsum(1)  # [batch, pos, n_markers]
        gate = counts.prod(-1) if self.bilinear else counts.clamp(0, 1).prod(-1)
        bump = torch.zeros_like(hidden_states)
        bump[..., self.out] = gate
        return (hidden_states + bump,)


class Passthrough(nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor]:
        return (hidden_states,)


class HandBuilt(nn.Module):
    """Token id sets → marker dimensions, one gate block, one pass-through block."""

    def __init__(self, vocab_size: int, marked: Sequence[Sequence[int]], bilinear: bool = False):
        super().__init__()
        d = len(marked) + 2  # the markers, "anything else", the gate's output
        self.config = SimpleNamespace(num_hidden_layers=2, hidden_size=d, max_position_embeddings=4096)
        emb = torch.zeros(vocab_size, d)
        emb[:, len(marked)] = 1.0
        for k, ids in enumerate(marked):
            emb[list(ids)] = 0.0
            emb[list(ids), k] = 1.0
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding.from_pretrained(emb, freeze=False)
        self.model.layers = nn.ModuleList([Gate(range(len(marked)), d - 1, bilinear), Passthrough()])

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x)[0]
        return SimpleNamespace(logits=x)


def handbuilt_model(tokenizer, marked: Sequence[Sequence[int]], bilinear: bool = False) -> Model:
    """The hand-built model behind a toolkit :class:`~interp.models.Model` handle (backend ``hf``)."""
    net = HandBuilt(len(tokenizer), marked, bilinear).eval()
    return Model("handbuilt", "hf", net, tokenizer, net, layers_path="model.layers")


def only_in(rendered, names: Sequence[str]) -> list[set[int]]:
    """For each segment name, the token ids that occur in that segment and nowhere else in the
    rendering (so marking them marks exactly that segment)."""
    segs = {s.name: s for s in rendered.segments()}
    ids = [int(i) for i in rendered.input_ids]
    out = []
    for name in names:
        s = segs[name]
        inside = set(ids[s.start:s.end])
        outside = set(ids[:s.start] + ids[s.end:])
        out.append(inside - outside)
        assert out[-1], f"segment {name} has no token of its own"
    return out
