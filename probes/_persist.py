"""Saved probes (private): arrays in safetensors at ``path``, everything else in a JSON sidecar
``path.with_suffix('.json')``.

A save writes both files to temporary names in the target folder and renames them into place
only once both are complete, so a failed save leaves neither a partial file nor a temporary one
(and an earlier save at that path untouched). Both files carry the same random ``save_id``: a
pair from two different saves (a crash between the two renames) is refused on load.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# Fitted arrays with one entry per layer (first axis); saved under their names without "_".
PER_LAYER = ("coef_", "intercept_", "C_", "mean_", "scale_", "n_iter_", "cv_scores_")


def sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _temporary(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return tmp


def save(path, arrays: dict[str, np.ndarray | None], meta: dict) -> None:
    """Write ``arrays`` (None values are left out) and ``meta`` (JSON) as one saved probe."""
    from safetensors.numpy import save_file  # probes imports its dependencies on use only

    path = Path(path)
    save_id = uuid.uuid4().hex
    try:
        text = json.dumps({**meta, "save_id": save_id}, indent=2, sort_keys=True)
    except TypeError as err:  # before any file is touched
        raise ValueError(f"cannot save to {path}: {err} (layer names must be str or int)") from None
    tensors = {k: np.ascontiguousarray(v) for k, v in arrays.items() if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_arrays, tmp_meta = _temporary(path), _temporary(sidecar(path))
    try:
        save_file(tensors, tmp_arrays, metadata={"save_id": save_id})
        Path(tmp_meta).write_text(text)
        os.replace(tmp_arrays, path)
        os.replace(tmp_meta, sidecar(path))
    finally:
        for tmp in (tmp_arrays, tmp_meta):
            if os.path.exists(tmp):
                os.unlink(tmp)


def load(path, fmt: str) -> tuple[dict[str, np.ndarray], dict]:
    """``(arrays, meta)`` of a probe saved as ``fmt``; errors name the file and the field."""
    from safetensors import safe_open  # probes imports its dependencies on use only
    from safetensors.numpy import load_file

    path = Path(path)
    for p in (path, sidecar(path)):
        if not p.exists():
            raise FileNotFoundError(
                f"{p} does not exist (a saved {fmt} is {path} + {sidecar(path)})"
            )
    try:
        meta = json.loads(sidecar(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{sidecar(path)}: not valid JSON ({err})") from None
    if meta.get("format") != fmt:
        raise ValueError(
            f"{sidecar(path)}: field 'format' is {meta.get('format')!r}, expected {fmt!r}"
        )
    if meta.get("version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{sidecar(path)}: field 'version' is {meta.get('version')!r}; this code reads "
            f"versions {list(READABLE_VERSIONS)}"
        )
    if meta["version"] >= 2:
        with safe_open(str(path), "np") as f:
            arrays_id = (f.metadata() or {}).get("save_id")
        if arrays_id != meta.get("save_id"):
            raise ValueError(
                f"{sidecar(path)}: field 'save_id' is {meta.get('save_id')!r} but {path} has "
                f"{arrays_id!r}: the two files come from different saves; save the probe again"
            )
    return load_file(str(path)), meta


def upgrade_v1(arrays: dict[str, np.ndarray], meta: dict) -> tuple[dict, dict]:
    """Version 1 files (one layout per class) in the version 2 layout (one for both)."""
    if meta["format"] == "probes.LinearProbe":
        params = dict(meta["params"])
        stacked = {
            "C": np.array([meta["C_"]], dtype=np.float64),
            "mean": arrays["mean"][None],
            "scale": arrays["scale"][None],
        }
        if "cv_scores" in arrays:
            stacked["cv_scores"] = arrays["cv_scores"][None]
        Cs_ = sorted({float(c) for c in params["Cs"]}) if "cv_scores" in arrays else None
        layers = None
    else:
        keys = ("standardize", "max_iter", "tol", "random_state")
        params = {k: meta[k] for k in keys}
        params["layers"] = layers = meta["layers"]
        params["C"] = [float(c) for c in arrays["C"]] if meta["Cs"] is None else None
        if meta["Cs"] is not None:
            params["Cs"] = meta["Cs"]
        stacked, Cs_ = {}, meta["Cs"]
    upgraded = {**meta, "version": FORMAT_VERSION, "params": params, "layers": layers, "Cs_": Cs_}
    return {**arrays, **stacked}, upgraded


# ----------------------------------------------------------------------------------------------
# A fitted probe: hyper-parameters and the fitted state stacked per layer.


def _plain(v):
    """``v`` as JSON can hold it (tuples and arrays as lists, dtypes and devices as strings)."""
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v)
    if isinstance(v, (tuple, list, np.ndarray)):
        return [_plain(x) for x in v]
    return v.item() if isinstance(v, np.generic) else v


def _params_from_json(params: dict, where: Path) -> dict:
    p = dict(params)
    if p.get("dtype") is not None:
        dtype = getattr(torch, str(p["dtype"]).removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{where}: field 'params.dtype' is {p['dtype']!r}, not a torch dtype")
        p["dtype"] = dtype
    for key in ("Cs", "layers"):
        if isinstance(p.get(key), list):
            p[key] = tuple(p[key])
    return p


def _check_shapes(fitted: dict, where: Path) -> None:
    L, d = fitted["coef_"].shape
    want = {"intercept_": (L,), "C_": (L,), "mean_": (L, d), "scale_": (L, d), "n_iter_": (L,)}
    for name, shape in want.items():
        if fitted[name].shape != shape:
            raise ValueError(
                f"{where}: tensor {name[:-1]!r} has shape {fitted[name].shape}; expected {shape} "
                f"(coef is {(L, d)})"
            )


def save_probe(path, fmt: str, params: dict, fitted: dict) -> None:
    """Save a probe: ``params`` (its ``get_params()``) and ``fitted``, its state stacked per
    layer (:data:`PER_LAYER` arrays, ``classes_``, ``Cs_``, and ``layers_`` or None)."""
    arrays = {name[:-1]: fitted[name] for name in PER_LAYER}
    arrays["n_iter"] = np.asarray(arrays["n_iter"], dtype=np.int64)
    classes = fitted["classes_"]
    meta = {
        "format": fmt,
        "version": FORMAT_VERSION,
        "params": {k: _plain(v) for k, v in params.items()},
        "classes": {"values": classes.tolist(), "dtype": classes.dtype.str},
        "layers": _plain(fitted.get("layers_")),
        "Cs_": _plain(fitted["Cs_"]),
    }
    save(path, arrays, meta)


def load_probe(path, fmt: str) -> tuple[dict, dict]:
    """``(params, fitted)`` of the probe saved at ``path`` (see :func:`save_probe`)."""
    arrays, meta = load(path, fmt)
    if meta["version"] == 1:
        arrays, meta = upgrade_v1(arrays, meta)
    fitted = {name: arrays.get(name[:-1]) for name in PER_LAYER}
    _check_shapes(fitted, Path(path))
    classes = meta["classes"]
    fitted["classes_"] = np.asarray(classes["values"], dtype=np.dtype(classes["dtype"]))
    fitted["Cs_"] = None if meta["Cs_"] is None else tuple(meta["Cs_"])
    fitted["layers_"] = None if meta["layers"] is None else tuple(meta["layers"])
    return _params_from_json(meta["params"], sidecar(Path(path))), fitted
