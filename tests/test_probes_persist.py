"""Specification of saving and loading probes: round trips, atomic saves, older files."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from probes import LayerProbes, LinearProbe

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    y = np.arange(100) % 2
    X = rng.standard_normal((100, 2, 6))
    X[:, :, 0] += y[:, None]
    return X, y


def files(folder: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_layer_probes_round_trip_keeps_hyper_parameters_and_predictions(tmp_path, data):
    X, y = data
    probes = LayerProbes(C=[0.5, 2.0], layers=("early", "late"), dtype=torch.float64).fit(X, y)
    probes.save(tmp_path / "p.safetensors")
    loaded = LayerProbes.load(tmp_path / "p.safetensors")
    assert loaded.get_params() == probes.get_params()
    assert loaded.layers_ == ("early", "late") and loaded.cv_scores_ is None
    np.testing.assert_array_equal(loaded.decision_function(X), probes.decision_function(X))


def test_a_save_that_fails_while_writing_leaves_the_earlier_save_and_no_other_file(
    tmp_path, data, monkeypatch
):
    X, y = data
    path = tmp_path / "p.safetensors"
    LayerProbes(C=1.0).fit(X, y).save(path)
    before = files(tmp_path)

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        LayerProbes(C=0.01).fit(X, y).save(path)
    assert files(tmp_path) == before


def test_layer_names_json_cannot_hold_are_refused_before_any_file_is_written(tmp_path, data):
    X, y = data
    probes = LayerProbes(layers=[1j, 2j]).fit(X, y)
    with pytest.raises(
        ValueError, match=r"cannot save to .*p.safetensors: .*layer names must be str or int"
    ):
        probes.save(tmp_path / "p.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_arrays_and_sidecar_of_two_different_saves_are_refused_on_load(tmp_path, data):
    X, y = data
    LayerProbes(C=1.0).fit(X, y).save(tmp_path / "a.safetensors")
    LayerProbes(C=0.1).fit(X, y).save(tmp_path / "b.safetensors")
    (tmp_path / "a.json").write_bytes((tmp_path / "b.json").read_bytes())
    with pytest.raises(ValueError, match=r"a\.json: field 'save_id' .* come from different saves"):
        LayerProbes.load(tmp_path / "a.safetensors")


def test_a_wrongly_shaped_tensor_is_named_on_load(tmp_path, data):
    X, y = data
    path = tmp_path / "p.safetensors"
    probes = LayerProbes().fit(X, y)
    probes.save(path)
    save_id = json.loads((tmp_path / "p.json").read_text())["save_id"]
    arrays = {"coef": probes.coef_, "intercept": probes.intercept_, "C": probes.C_,
              "mean": probes.mean_[:1], "scale": probes.scale_,
              "n_iter": probes.n_iter_}  # fmt: skip
    save_file(arrays, str(path), metadata={"save_id": save_id})
    with pytest.raises(
        ValueError, match=r"p.safetensors: tensor 'mean' has shape \(1, 6\); expected \(2, 6\)"
    ):
        LayerProbes.load(path)


# ----------------------------------------------------------------------------------------------
# Files written before LinearProbe became a view of LayerProbes (format version 1).


def write_v1(path: pathlib.Path, arrays: dict, meta: dict) -> None:
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({**meta, "version": 1}))


def test_version_1_layer_probes_files_load_with_their_predictions(tmp_path, data):
    X, y = data
    probes = LayerProbes(C=None, Cs=(0.1, 1.0), cv=3, layers=["a", "b"]).fit(X, y)
    arrays = {"coef": probes.coef_, "intercept": probes.intercept_, "C": probes.C_,
              "mean": probes.mean_, "scale": probes.scale_, "n_iter": probes.n_iter_,
              "cv_scores": probes.cv_scores_}  # fmt: skip
    meta = {"format": "probes.LayerProbes", "layers": ["a", "b"], "Cs": [0.1, 1.0],
            "classes": {"values": [0, 1], "dtype": "<i8"}, "standardize": True,
            "max_iter": 100, "tol": 1e-05, "random_state": 0}  # fmt: skip
    write_v1(tmp_path / "p.safetensors", arrays, meta)
    loaded = LayerProbes.load(tmp_path / "p.safetensors")
    np.testing.assert_array_equal(loaded.decision_function(X), probes.decision_function(X))
    assert loaded.layers_ == ("a", "b") and loaded.Cs_ == (0.1, 1.0) and loaded.C is None
    np.testing.assert_array_equal(loaded.cv_scores_, probes.cv_scores_)


def test_version_1_linear_probe_files_load_with_their_predictions(tmp_path, data):
    X, y = data
    probe = LinearProbe(C=0.5).fit(X[:, 1], y)
    arrays = {"coef": probe.coef_, "intercept": probe.intercept_, "mean": probe.mean_,
              "scale": probe.scale_, "n_iter": probe.n_iter_}  # fmt: skip
    meta = {"format": "probes.LinearProbe", "C_": 0.5,
            "classes": {"values": [0, 1], "dtype": "<i8"},
            "params": {"C": 0.5, "Cs": [0.001, 0.01, 0.1, 1.0, 10.0], "cv": 5, "max_iter": 100,
                       "random_state": 0, "standardize": True, "tol": 1e-05}}  # fmt: skip
    write_v1(tmp_path / "p.safetensors", arrays, meta)
    loaded = LinearProbe.load(tmp_path / "p.safetensors")
    np.testing.assert_array_equal(loaded.predict_proba(X[:, 1]), probe.predict_proba(X[:, 1]))
    assert loaded.get_params() == probe.get_params() and loaded.C_ == 0.5
