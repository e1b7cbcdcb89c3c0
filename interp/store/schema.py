"""What a store's files must hold before anything in them is trusted.

:meth:`~interp.store.ActivationStore.open` (and every writer resuming a store) checks
``meta.json``, ``manifest.json`` and ``transcripts.jsonl`` against the schemas below, and each
shard's own safetensors header against both: fields present with the right types and nothing
else, layers in range and named by their hook names, shard files exactly at the store's names for
their index (so never outside the store), each shard listed once, covering the transcripts its
index covers, with the layers, site, shape and dtype the metadata says. The first problem is
reported in one line naming the file, the field and the value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import torch

from interp.models import BACKENDS, SITES, hook_name
from interp.positions import parse
from interp.store.activations import ROW_COLUMNS

FORMAT = "agent-refusal-interp/activations/2"
"""Format 2 records the layers and the site in every shard's header (format 1 did not)."""
READ_ONLY_FORMATS = ("agent-refusal-interp/activations/1",)
"""Older formats this version reads (their shards' layers are checked by shape only) but does not
resume."""

FLOAT_DTYPES: Mapping[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64,
                                           "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Storage dtypes (by the name ``meta.json`` records)."""
_SAFETENSORS_DTYPE = {"float32": "F32", "float64": "F64", "float16": "F16", "bfloat16": "BF16"}

META = {"format": str, "model": str, "backend": str, "d_model": int, "n_layers": int, "layers": list, "site": str,
        "hook_names": list, "selector": str, "dtype": str, "n_transcripts": int, "shard_size": int}
MANIFEST = {"shards": list}
ENTRY = {"index": int, "file": str, "rows": int, "transcripts": list, "bytes": int, "sha256": str}
TRANSCRIPT = {"index": int, "id": str, "labels": dict, "n_tokens": int, "truncated": int}


class StoreError(ValueError):
    """An activation store is missing, corrupt, incomplete, held by another writer, or holds a
    different run. The message names the store, the file and the field."""


def shard_name(index: int) -> str:
    """Where shard ``index`` lives, relative to the store."""
    return f"shards/{index:05d}.safetensors"


def n_shards(meta: Mapping[str, Any]) -> int:
    return (meta["n_transcripts"] + meta["shard_size"] - 1) // meta["shard_size"]


def shard_range(meta: Mapping[str, Any], index: int) -> tuple[int, int]:
    """The transcripts ``[start, stop)`` shard ``index`` holds (a fixed partition)."""
    start = index * meta["shard_size"]
    return start, min(start + meta["shard_size"], meta["n_transcripts"])


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _fields(obj: Any, schema: Mapping[str, type], where: str) -> None:
    """``obj`` is an object with exactly ``schema``'s fields, of its types (bool is not an int)."""
    if not isinstance(obj, dict):
        raise StoreError(f"{where}: expected an object, got {_short(obj)}")
    for key, kind in schema.items():
        if key not in obj:
            raise StoreError(f"{where}: missing field {key!r}")
        v = obj[key]
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise StoreError(f"{where}.{key}: expected {kind.__name__}, got {_short(v)}")
    extra = sorted(set(obj) - set(schema))
    if extra:
        raise StoreError(f"{where}: unknown field {extra[0]!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_meta(meta: Any, where: str) -> None:
    """``meta.json``'s schema; ``where`` names the file in messages."""
    _fields(meta, META, where)
    if meta["format"] not in (FORMAT, *READ_ONLY_FORMATS):
        raise StoreError(f"{where}.format: {_short(meta['format'])} is not a store format this version reads "
                         f"(it writes {FORMAT!r})")
    for key in ("d_model", "n_layers", "n_transcripts", "shard_size"):
        if meta[key] < 1:
            raise StoreError(f"{where}.{key}: must be at least 1, got {meta[key]!r}")
    for key, options in (("backend", BACKENDS), ("site", SITES), ("dtype", tuple(FLOAT_DTYPES))):
        if meta[key] not in options:
            raise StoreError(f"{where}.{key}: {_short(meta[key])} is not one of {', '.join(options)}")
    layers = meta["layers"]
    if not layers or not all(_is_int(x) and 0 <= x < meta["n_layers"] for x in layers) or layers != sorted(set(layers)):
        raise StoreError(f"{where}.layers: {_short(layers)} is not an increasing list of layer indices in "
                         f"0..{meta['n_layers'] - 1}")
    names = [hook_name(x, meta["site"]) for x in layers]
    if meta["hook_names"] != names:
        raise StoreError(f"{where}.hook_names: {_short(meta['hook_names'])} do not name layers {layers} at "
                         f"{meta['site']} ({names})")
    try:
        parse(meta["selector"])
    except ValueError as e:
        raise StoreError(f"{where}.selector: {e}") from None


def check_manifest(manifest: Any, meta: Mapping[str, Any], where: str) -> None:
    """``manifest.json``'s schema, against the (checked) metadata."""
    _fields(manifest, MANIFEST, where)
    seen: set[int] = set()
    total = n_shards(meta)
    for i, e in enumerate(manifest["shards"]):
        w = f"{where}, shards[{i}]"
        _fields(e, ENTRY, w)
        k = e["index"]
        if not 0 <= k < total:
            raise StoreError(f"{w}.index: {k} is out of range (the store has {total} shards: 0..{total - 1})")
        if k in seen:
            raise StoreError(f"{w}.index: shard {k} is listed twice")
        seen.add(k)
        if e["file"] != shard_name(k):
            raise StoreError(f"{w}.file: {_short(e['file'])} is not the store's file for shard {k} "
                             f"({shard_name(k)!r})")
        if e["transcripts"] != list(shard_range(meta, k)):
            raise StoreError(f"{w}.transcripts: {_short(e['transcripts'])}, but shard {k} holds transcripts "
                             f"{list(shard_range(meta, k))}")
        if e["rows"] < 0 or e["bytes"] < 0:
            raise StoreError(f"{w}: rows and bytes cannot be negative")
        if not re.fullmatch(r"[0-9a-f]{64}", e["sha256"]):
            raise StoreError(f"{w}.sha256: {_short(e['sha256'])} is not a sha256 hex digest")


def check_transcripts(records: list[Any], meta: Mapping[str, Any], where: str) -> None:
    """``transcripts.jsonl``: one record per transcript, in order."""
    if len(records) != meta["n_transcripts"]:
        raise StoreError(f"{where}: {len(records)} lines, but meta.json says n_transcripts "
                         f"{meta['n_transcripts']}")
    for i, rec in enumerate(records):
        _fields(rec, TRANSCRIPT, f"{where}, line {i + 1}")
        if rec["index"] != i:
            raise StoreError(f"{where}, line {i + 1}.index: {rec['index']!r}, expected {i}")


def check_shard_header(f: Any, entry: Mapping[str, Any], meta: Mapping[str, Any], where: str) -> None:
    """A shard's own header (a ``safetensors`` ``safe_open`` handle) against its manifest entry
    and the metadata: tensors, shapes, dtype, and (format 2) the layers and site it holds."""
    keys = set(f.keys())
    if keys != {"activations", *ROW_COLUMNS}:
        raise StoreError(f"{where}: holds tensors {sorted(keys)}, expected activations and {', '.join(ROW_COLUMNS)}")
    rows = entry["rows"]
    acts = f.get_slice("activations")
    want = [rows, len(meta["layers"]), meta["d_model"]]
    if list(acts.get_shape()) != want or acts.get_dtype() != _SAFETENSORS_DTYPE[meta["dtype"]]:
        raise StoreError(f"{where}: activations are {acts.get_dtype()} {list(acts.get_shape())}; manifest and "
                         f"meta.json say {_SAFETENSORS_DTYPE[meta['dtype']]} {want} ([rows, layers, d_model])")
    for col in ROW_COLUMNS:
        if list(f.get_slice(col).get_shape()) != [rows]:
            raise StoreError(f"{where}: column {col!r} does not have {rows} rows")
    header = read_header(f.metadata(), meta["format"])
    if not isinstance(header.get("selectors"), list) or len(header["selectors"]) != rows:
        raise StoreError(f"{where}: its selector list does not have {rows} entries")
    if meta["format"] == FORMAT:
        for key, said in (("layers", meta["layers"]), ("site", meta["site"])):
            if header.get(key) != said:
                raise StoreError(f"{where}: holds {key} {header.get(key)!r}, meta.json says {said!r}")


def header_metadata(meta: Mapping[str, Any], selectors: list[str]) -> dict[str, str]:
    """What a shard's header records besides its tensors (format 2): one JSON string under one
    key, since safetensors writes several keys in no fixed order (and stores must be
    byte-deterministic)."""
    return {"shard": json.dumps({"layers": meta["layers"], "selectors": selectors, "site": meta["site"]},
                                sort_keys=True)}


def read_header(metadata: Mapping[str, str] | None, fmt: str) -> dict[str, Any]:
    """A shard header's record: ``{"selectors", "layers", "site"}`` (format 1: selectors only);
    ``{}`` when it cannot be read."""
    key = "shard" if fmt == FORMAT else "selectors"
    try:
        value = json.loads((metadata or {}).get(key, "null"))
    except json.JSONDecodeError:
        return {}
    if fmt != FORMAT:
        return {"selectors": value}
    return value if isinstance(value, dict) else {}
