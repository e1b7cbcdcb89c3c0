"""Cached activations in memory: :class:`Activations` (ragged rows over transcripts)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from interp.models import hook_name
from interp.positions import Selector, parse
from interp.transcripts import SEGMENT_KINDS, as_class

ROW_COLUMNS = ("transcript", "position", "n_positions", "kind", "message", "turn")
"""Integer columns, one value per row: transcript index, last position, tokens averaged, and the
segment kind / message / turn of the row's last position."""


@dataclass(frozen=True, eq=False)
class Activations:
    """Residual-stream activations, ragged over transcripts.

    ``acts`` is ``[rows, n_layers, d_model]``; row ``r`` came from transcript
    ``rows["transcript"][r]`` at ``rows["position"][r]`` (the last of ``rows["n_positions"][r]``
    tokens averaged), picked by selector ``selectors[r]``. ``layers[j]`` is the model layer
    of ``acts[:, j]``.
    """

    acts: torch.Tensor
    layers: tuple[int, ...]
    site: str
    rows: Mapping[str, np.ndarray]
    selectors: tuple[Selector, ...]
    transcripts: tuple[Mapping[str, Any], ...]  # {"index", "id", "labels", "n_tokens", "truncated"}
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.acts.shape[0]

    def __repr__(self) -> str:
        return (f"Activations({len(self)} rows from {len(self.transcripts)} transcripts, "
                f"layers={list(self.layers)}, site={self.site!r}, shape={tuple(self.acts.shape)})")

    @property
    def hook_names(self) -> list[str]:
        return [hook_name(i, self.site) for i in self.layers]

    def layer(self, layer: int) -> torch.Tensor:
        """Activations of one model layer: ``[rows, d_model]``."""
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not cached (cached: {list(self.layers)})")
        return self.acts[:, self.layers.index(layer)]

    def where(self, selector: Selector | str | None = None, mask: np.ndarray | None = None) -> Activations:
        """The rows picked by one selector part (e.g. ``positions.decision()``, or its name
        ``"decision"``) and/or a boolean ``[rows]`` mask."""
        keep = np.ones(len(self), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if selector is not None:
            selector = parse(selector)
            if selector not in set(self.selectors):
                have = sorted({s.name for s in self.selectors})
                raise KeyError(f"no rows from selector {selector.name!r} (have: {have})")
            keep &= np.asarray([s == selector for s in self.selectors])
        idx = np.flatnonzero(keep)
        return replace(self, acts=self.acts[torch.as_tensor(idx, dtype=torch.long)],
                       rows={k: v[idx] for k, v in self.rows.items()},
                       selectors=tuple(self.selectors[i] for i in idx))

    def stack(self) -> torch.Tensor:
        """``[n_transcripts, n_layers, d_model]`` when every transcript has exactly one row."""
        t = self.rows["transcript"]
        if len(t) != len(self.transcripts) or not np.array_equal(t, np.arange(len(self.transcripts))):
            raise ValueError("stack() needs exactly one row per transcript; use where(selector=...) first "
                             f"({len(t)} rows for {len(self.transcripts)} transcripts)")
        return self.acts

    def for_transcript(self, i: int) -> torch.Tensor:
        """Rows of transcript ``i``: ``[rows_i, n_layers, d_model]``."""
        return self.acts[torch.as_tensor(np.flatnonzero(self.rows["transcript"] == i), dtype=torch.long)]

    def labels(self, key: str, per: str = "row") -> np.ndarray:
        """A transcript label per row (``[rows]``) or per transcript, as stored (any JSON value);
        to use it as a class, read it with :meth:`binary_labels`."""
        values = []
        for t in self.transcripts:
            if key not in t["labels"]:
                raise KeyError(f"transcript {t['id']!r} has no label {key!r} (labels: {sorted(t['labels'])})")
            values.append(t["labels"][key])
        arr = np.asarray(values)
        return arr if per == "transcript" else arr[self.rows["transcript"]]

    def binary_labels(self, key: str, per: str = "row") -> np.ndarray:
        """A transcript label read as a class (``True``/``False`` or 1/0, the rule of
        :func:`interp.transcripts.binary_label`) per row or per transcript: ``[rows]`` bool.
        Any other value (``None``, NaN, ``"false"``...) raises ``ValueError`` naming the transcript
        and the value."""
        values = []
        for t in self.transcripts:
            if key not in t["labels"]:
                raise ValueError(f"transcript {t['id']!r} has no label {key!r} (labels: {sorted(t['labels'])})")
            try:
                values.append(as_class(t["labels"][key]))
            except ValueError as e:
                raise ValueError(f"transcript {t['id']!r}, labels.{key}: {e}") from None
        arr = np.asarray(values, dtype=bool)
        return arr if per == "transcript" else arr[self.rows["transcript"]]

    def records(self) -> list[dict]:
        """One tidy record per row: transcript id, labels, selector, position and segment info."""
        out = []
        for r in range(len(self)):
            t = self.transcripts[int(self.rows["transcript"][r])]
            rec = {"row": r, "transcript_id": t["id"], "selector": self.selectors[r].name}
            rec.update({k: int(v[r]) for k, v in self.rows.items()})
            rec["kind"] = SEGMENT_KINDS[rec["kind"]]
            rec["labels"] = dict(t["labels"])
            out.append(rec)
        return out

    def to_dataset(self):
        """The row table as a Hugging Face ``datasets.Dataset`` (labels JSON-encoded)."""
        import datasets  # deferred: importing it (pyarrow, pandas) costs seconds; only this export needs it

        recs = self.records()
        for r in recs:
            r["labels"] = json.dumps(r["labels"], sort_keys=True)
        return datasets.Dataset.from_list(recs)


def concat(parts: Sequence[Activations]) -> Activations:
    """Join activations of successive transcript chunks (row transcript indices are global)."""
    first = parts[0]
    return replace(
        first,
        acts=torch.cat([p.acts for p in parts]),
        rows={k: np.concatenate([p.rows[k] for p in parts]) for k in first.rows},
        selectors=tuple(s for p in parts for s in p.selectors),
    )
