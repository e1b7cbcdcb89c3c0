"""Cached activations in memory (:class:`Activations`) and on disk (:class:`ActivationStore`).

An activation store is a directory::

    meta.json            what was cached: model, backend, layers, hook names, site, selector, dtype
    transcripts.jsonl    one line per transcript: index, id, labels, token count
    shards/00000.safetensors   activations [rows, n_layers, d_model] plus per-row columns
    manifest.json        finished shards with their sizes and sha256

Every file is written under a temporary name and renamed, and the manifest is rewritten after
each shard, so a run killed mid-way leaves only whole shards; :func:`interp.cache.cache_activations`
pointed at the same directory resumes and ends with the same bytes as an uninterrupted run.
:meth:`ActivationStore.open` checks every shard against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from interp.atomic import TMP_SUFFIX, atomic_path, is_temporary_of, save_json, write_lines
from interp.models import hook_name
from interp.positions import Selector, parse
from interp.transcripts import SEGMENT_KINDS

FORMAT = "agent-refusal-interp/activations/1"
_OWN_FILES = ("meta.json", "manifest.json", "transcripts.jsonl")
ROW_COLUMNS = ("transcript", "position", "n_positions", "kind", "message", "turn")
"""Integer columns, one value per row: transcript index, last position, tokens averaged, and the
segment kind / message / turn of the row's last position."""


class StoreError(ValueError):
    """An activation store is missing, corrupt, incomplete, or holds a different run."""


# --------------------------------------------------------------------------------------------
# In memory


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
        """A transcript label (e.g. ``"harmful"``) per row (``[rows]``) or per transcript."""
        values = []
        for t in self.transcripts:
            if key not in t["labels"]:
                raise KeyError(f"transcript {t['id']!r} has no label {key!r} (labels: {sorted(t['labels'])})")
            values.append(t["labels"][key])
        arr = np.asarray(values)
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


# --------------------------------------------------------------------------------------------
# On disk


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ActivationStore:
    """A directory of activation shards. Open one with :meth:`open`; make one with
    ``cache_activations(..., store=path)``."""

    def __init__(self, path: Path, meta: dict, manifest: dict, transcripts: list[dict]):
        self.path = path
        self.meta = meta
        self.manifest = manifest
        self.transcripts = transcripts

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"{len(self.manifest['shards'])}/{self.n_shards} shards"
        return f"ActivationStore({str(self.path)!r}, {self.meta['model']!r}, layers={self.meta['layers']}, {state})"

    # -- reading

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> ActivationStore:
        """Open and validate a store. ``verify`` checks every shard's sha256 (else sizes only)."""
        path = Path(path)
        if not path.is_dir():
            raise StoreError(f"no activation store at {path}")
        meta = cls._read_json(path, "meta.json")
        if meta.get("format") != FORMAT:
            raise StoreError(f"store {path}: meta.json has format {meta.get('format')!r}, expected {FORMAT!r}")
        manifest = cls._read_json(path, "manifest.json")
        try:
            lines = (path / "transcripts.jsonl").read_text(encoding="utf-8").splitlines()
            transcripts = [json.loads(x) for x in lines if x.strip()]
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"store {path}: transcripts.jsonl is missing or corrupt ({e})") from None
        if len(transcripts) != meta["n_transcripts"]:
            raise StoreError(f"store {path}: transcripts.jsonl has {len(transcripts)} lines, meta.json says "
                             f"{meta['n_transcripts']}")
        store = cls(path, meta, manifest, transcripts)
        for entry in manifest["shards"]:
            store._check_shard(entry, verify)
        return store

    @staticmethod
    def _read_json(path: Path, name: str) -> dict:
        try:
            return json.loads((path / name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreError(f"store {path}: {name} is missing") from None
        except json.JSONDecodeError as e:
            raise StoreError(f"store {path}: {name} is corrupt ({e.msg})") from None

    def _check_shard(self, entry: dict, verify: bool) -> None:
        f = self.path / entry["file"]
        hint = f"; delete it and rerun cache_activations(..., store={str(self.path)!r}) to recompute it"
        if not f.exists():
            raise StoreError(f"store {self.path}: shard {entry['file']} is missing" + hint)
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise StoreError(f"store {self.path}: shard {entry['file']} is corrupt ({size} bytes, "
                             f"manifest says {entry['bytes']})" + hint)
        if verify:
            digest = _sha256(f)
            if digest != entry["sha256"]:
                raise StoreError(f"store {self.path}: shard {entry['file']} is corrupt (sha256 {digest[:12]}…, "
                                 f"manifest says {entry['sha256'][:12]}…)" + hint)

    @property
    def n_shards(self) -> int:
        n, s = self.meta["n_transcripts"], self.meta["shard_size"]
        return (n + s - 1) // s

    @property
    def complete(self) -> bool:
        return len(self.manifest["shards"]) == self.n_shards

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.meta["layers"])

    def load(self, layers: Sequence[int] | None = None, allow_partial: bool = False) -> Activations:
        """Read activations (optionally only some layers) into memory."""
        if not self.complete and not allow_partial:
            raise StoreError(f"store {self.path} is incomplete ({len(self.manifest['shards'])} of "
                             f"{self.n_shards} shards); resume it with cache_activations(..., store=...)")
        all_layers = self.layers
        layers = tuple(all_layers if layers is None else layers)
        missing = [layer for layer in layers if layer not in all_layers]
        if missing:
            raise KeyError(f"layers {missing} are not in store {self.path} (stored: {list(all_layers)})")
        cols = [all_layers.index(layer) for layer in layers]
        acts, rows, selectors = [], {k: [] for k in ROW_COLUMNS}, []
        for entry in sorted(self.manifest["shards"], key=lambda e: e["index"]):
            with safe_open(self.path / entry["file"], framework="pt") as f:
                a = f.get_tensor("activations")
                acts.append(a[:, cols] if cols != list(range(len(all_layers))) else a)
                for k in ROW_COLUMNS:
                    rows[k].append(f.get_tensor(k).numpy())
                selectors.extend(parse(name) for name in json.loads(f.metadata()["selectors"]))
        d = self.meta["d_model"]
        return Activations(
            acts=torch.cat(acts) if acts else torch.empty(0, len(layers), d),
            layers=layers, site=self.meta["site"],
            rows={k: (np.concatenate(v) if v else np.zeros(0, dtype=np.int64)) for k, v in rows.items()},
            selectors=tuple(selectors), transcripts=tuple(self.transcripts), meta=dict(self.meta),
        )

    def rows(self):
        """The row table (transcript id, labels, selector, position, segment) as a ``datasets.Dataset``."""
        return self.load(layers=self.layers[:1], allow_partial=True).to_dataset()

    # -- writing (used by cache_activations)

    @classmethod
    def create_or_resume(cls, path: str | Path, meta: dict, transcripts: list[dict]) -> ActivationStore:
        """Start a store at ``path``, or reopen it to resume when it holds the same run."""
        path = Path(path)
        meta = {"format": FORMAT, **meta}
        if path.exists() and any(path.iterdir()):
            for folder in (path, path / "shards"):  # leftovers of a killed write, and only ours
                for tmp in folder.glob(f".*{TMP_SUFFIX}"):
                    if any(is_temporary_of(tmp, folder / name) for name in _OWN_FILES) or (
                            folder.name == "shards" and tmp.name.startswith(".") and ".safetensors." in tmp.name):
                        tmp.unlink()
            old = cls._read_json(path, "meta.json")
            if old != meta:
                diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
                raise StoreError(f"store {path} holds a different run (differs in: {', '.join(diff)}); "
                                 "use a new path or delete it")
            store = cls.open(path, verify=True)
            if store.transcripts != transcripts:
                raise StoreError(f"store {path} was made from different transcripts; use a new path")
            return store
        created = not path.exists()
        try:
            (path / "shards").mkdir(parents=True, exist_ok=True)
            write_lines(path / "transcripts.jsonl",
                        [json.dumps(t, sort_keys=True, ensure_ascii=False) for t in transcripts])
            save_json({"shards": []}, path / "manifest.json", indent=1, sort_keys=True)
            save_json(meta, path / "meta.json", indent=1, sort_keys=True)  # last: its presence marks a started store
        except BaseException:
            if created:
                shutil.rmtree(path, ignore_errors=True)
            raise
        return cls(path, meta, {"shards": []}, transcripts)

    def done(self) -> set[int]:
        """Indices of finished shards."""
        return {e["index"] for e in self.manifest["shards"]}

    def write_shard(self, index: int, part: Activations, transcript_range: tuple[int, int]) -> None:
        """Write one shard atomically, then record it in the manifest."""
        name = f"shards/{index:05d}.safetensors"
        tensors = {"activations": part.acts.contiguous()}
        for k in ROW_COLUMNS:
            tensors[k] = torch.as_tensor(np.ascontiguousarray(part.rows[k]), dtype=torch.int64)
        final = self.path / name
        with atomic_path(final) as tmp:
            save_file(tensors, str(tmp), metadata={"selectors": json.dumps([sel.name for sel in part.selectors])})
        entry = {"index": index, "file": name, "rows": len(part), "transcripts": list(transcript_range),
                 "bytes": final.stat().st_size, "sha256": _sha256(final)}
        shards = [e for e in self.manifest["shards"] if e["index"] != index] + [entry]
        self.manifest = {"shards": sorted(shards, key=lambda e: e["index"])}
        save_json(self.manifest, self.path / "manifest.json", indent=1, sort_keys=True)
