"""Specification of probes.linear: the batched all-layer trainer and the scikit-learn probe."""

from __future__ import annotations

import doctest
import json
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import (
    GridSearchCV,
    StratifiedGroupKFold,
    StratifiedKFold,
    cross_val_score,
)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks
from threadpoolctl import threadpool_limits

import probes.linear
from probes import LayerProbes, LinearProbe, fit_layer_probes

torch.set_num_threads(2)


def planted(n, n_layers, d, *, seed=0, strength=1.0, correlated=8):
    """[n, n_layers, d] float32 activations with a planted class direction per layer, correlated
    noise (a few strong shared directions), per-feature offsets and scales; labels [n]."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 2)
    X = rng.standard_normal((n, n_layers, d))
    if correlated:
        factors = rng.standard_normal((n, correlated)) * np.linspace(6, 1, correlated)
        X += np.einsum("nk,lkd->nld", factors, rng.standard_normal((n_layers, correlated, d)))
    u = rng.standard_normal((n_layers, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    X += (y - 0.5)[:, None, None] * strength * np.sqrt(d) / 4 * u[None]
    X = X * rng.uniform(0.5, 3.0, size=d) + rng.normal(0, 3.0, size=d)
    return X.astype(np.float32), y


def split(X, y, frac=0.75):
    k = int(frac * len(y))
    return X[:k], y[:k], X[k:], y[k:]


def sklearn_probe(X, y, C, standardize=True):
    """Reference (coef [d], intercept), original space: StandardScaler + LogisticRegression."""
    X = X.astype(np.float64)
    mean = X.mean(0) if standardize else np.zeros(X.shape[1])
    scale = X.std(0) if standardize else np.ones(X.shape[1])
    with threadpool_limits(limits=1):  # tiny BLAS calls: threads only add contention
        model = LogisticRegression(C=C, tol=1e-10, max_iter=100_000).fit((X - mean) / scale, y)
    coef = model.coef_[0] / scale
    return coef, model.intercept_[0] - coef @ mean


def relative_error(a, b):
    """Per-layer ||a - b|| / ||b|| of coefficient arrays [n_layers, d]."""
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


def held_out_accuracy(coef, intercept, X, y):
    return np.mean(((X.astype(np.float64) @ coef + intercept) > 0) == y)


def assert_matches_sklearn(X, y, C, *, standardize=True, coef_rtol=1e-3, dtype=None):
    Xtr, ytr, Xte, yte = split(X, y)
    probes = fit_layer_probes(
        Xtr, ytr, C=C, tol=1e-6, max_iter=500, standardize=standardize, dtype=dtype
    )
    ours = probes.score_layers(Xte, yte)
    Cs = np.broadcast_to(np.asarray(C, dtype=float), (X.shape[1],))
    for layer in range(X.shape[1]):
        coef, intercept = sklearn_probe(Xtr[:, layer], ytr, Cs[layer], standardize)
        ref = held_out_accuracy(coef, intercept, Xte[:, layer], yte)
        assert abs(ours[layer] - ref) <= 0.01, f"layer {layer}: {ours[layer]} vs sklearn {ref}"
        rel = np.linalg.norm(probes.coef_[layer] - coef) / np.linalg.norm(coef)
        assert rel < coef_rtol, f"layer {layer}: coefficient relative error {rel:.2e}"
        assert probes.intercept_[layer] == pytest.approx(intercept, rel=1e-2, abs=1e-3)
    return probes


def test_docstring_examples_run():
    result = doctest.testmod(probes.linear)
    assert result.attempted >= 8 and result.failed == 0


# ----------------------------------------------------------------------------------------------
# Agreement with scikit-learn.


def test_batched_fit_matches_sklearn_per_layer_on_noisy_data():
    X, y = planted(400, 4, 48, strength=0.6)
    probes = assert_matches_sklearn(X, y, C=1.0)
    accuracies = probes.score_layers(*split(X, y)[2:])
    assert 0.55 < accuracies.min() and accuracies.max() < 0.99  # genuinely noisy


def test_batched_fit_matches_sklearn_per_layer_on_separable_data():
    X, y = planted(300, 3, 40, strength=6.0)
    Xtr, ytr, _, _ = split(X, y)
    probes = assert_matches_sklearn(X, y, C=0.1)
    assert np.all(probes.score_layers(Xtr, ytr) == 1.0)


def test_batched_fit_matches_sklearn_when_d_exceeds_n():
    X, y = planted(160, 3, 400, strength=1.5)
    assert_matches_sklearn(X, y, C=1.0)


def test_batched_fit_matches_sklearn_with_weak_regularisation_and_d_exceeding_n():
    X, y = planted(120, 2, 300, strength=1.0, correlated=20)
    assert_matches_sklearn(X, y, C=100.0, coef_rtol=1e-2)


def test_each_layer_is_fitted_with_its_own_C():
    X, y = planted(300, 3, 32, strength=0.8)
    probes = assert_matches_sklearn(X, y, C=[0.01, 1.0, 100.0])
    np.testing.assert_array_equal(probes.C_, [0.01, 1.0, 100.0])


def test_without_standardisation_matches_sklearn_on_raw_features():
    X, y = planted(300, 2, 24, strength=0.8)
    probes = assert_matches_sklearn(X, y, C=0.05, standardize=False, dtype=torch.float64)
    np.testing.assert_array_equal(probes.scale_, np.ones_like(probes.scale_))


def test_solver_result_does_not_depend_on_the_starting_block():
    X, y = planted(150, 2, 80, strength=1.0)
    kw = dict(C=1.0, tol=1e-7, max_iter=500, dtype=torch.float64)
    with_block = fit_layer_probes(X, y, rank=32, **kw)
    without = fit_layer_probes(X, y, rank=0, **kw)
    assert without.n_iter_.min() > with_block.n_iter_.max()
    assert relative_error(with_block.coef_, without.coef_).max() < 1e-4


def test_float64_and_torch_inputs_give_the_numpy_float32_result():
    X, y = planted(200, 2, 30, strength=1.0)
    ref = fit_layer_probes(X, y, tol=1e-6)
    as_torch = fit_layer_probes(torch.from_numpy(X), torch.from_numpy(y), tol=1e-6, device="cpu")
    as_f64 = fit_layer_probes(X.astype(np.float64), y, tol=1e-9)
    np.testing.assert_array_equal(as_torch.coef_, ref.coef_)
    assert relative_error(ref.coef_, as_f64.coef_).max() < 1e-4


def test_intercept_and_coef_are_in_the_original_input_space():
    X, y = planted(200, 2, 16, strength=1.0)
    probes = fit_layer_probes(X, y)
    for layer in range(2):
        standardised = (X[:, layer].astype(np.float64) - probes.mean_[layer]) / probes.scale_[layer]
        w = probes.coef_[layer] * probes.scale_[layer]
        b = probes.intercept_[layer] + probes.coef_[layer] @ probes.mean_[layer]
        np.testing.assert_allclose(
            standardised @ w + b, probes.decision_function(X)[:, layer], rtol=1e-6, atol=1e-6
        )


def test_float32_fit_on_large_raw_features_stops_at_the_rounding_level_and_says_so():
    X, y = planted(200, 2, 24, strength=1.0)
    X = X * 1000  # raw activations with large features, not standardised
    with pytest.warns(
        ConvergenceWarning,
        match=r"layer index\(es\) \[0, 1\] the gradient reached the "
        r"rounding level of torch.float32 before tol=1e-09.*dtype=torch.float64",
    ):
        probes = fit_layer_probes(X, y, C=1.0, tol=1e-9, standardize=False, max_iter=50)
    assert probes.n_iter_.max() < 50
    exact = fit_layer_probes(X, y, C=1.0, tol=1e-9, standardize=False, dtype=torch.float64)
    assert relative_error(probes.coef_, exact.coef_).max() < 1e-3


def test_not_converging_warns_and_names_the_layers():
    X, y = planted(200, 2, 100, strength=1.0)
    with pytest.warns(ConvergenceWarning, match=r"max_iter=1 .*layer index\(es\) \[0, 1\]"):
        fit_layer_probes(X, y, max_iter=1, rank=0, tol=1e-6)


# ----------------------------------------------------------------------------------------------
# Choosing C by cross-validation.


def manual_cv_accuracy(X, y, C, splits):
    accs = []
    for train, val in splits:
        coef, intercept = sklearn_probe(X[train], y[train], C)
        accs.append(held_out_accuracy(coef, intercept, X[val], y[val]))
    return np.mean(accs)


def test_cv_scores_equal_sklearn_fits_on_the_same_stratified_folds():
    X, y = planted(200, 2, 20, strength=0.5)
    Cs = (0.001, 0.1, 10.0)
    probes = fit_layer_probes(X, y, C=None, Cs=Cs, cv=4, tol=1e-6, random_state=3)
    folds = list(StratifiedKFold(4, shuffle=True, random_state=3).split(np.zeros(200), y))
    for layer in range(2):
        for j, C in enumerate(Cs):
            ref = manual_cv_accuracy(X[:, layer], y, C, folds)
            assert probes.cv_scores_[layer, j] == pytest.approx(ref, abs=0.006)
        assert probes.C_[layer] == Cs[int(np.argmax(probes.cv_scores_[layer]))]
    assert probes.Cs_ == Cs


def test_cv_with_groups_uses_grouped_folds():
    X, y = planted(200, 1, 12, strength=0.5)
    groups = np.arange(200) // 5
    probes = fit_layer_probes(X, y, C=None, Cs=(0.01, 1.0), cv=4, groups=groups, tol=1e-6)
    folds = list(
        StratifiedGroupKFold(4, shuffle=True, random_state=0).split(np.zeros(200), y, groups)
    )
    for train, val in folds:
        assert not set(groups[train]) & set(groups[val])
    for j, C in enumerate((0.01, 1.0)):
        assert probes.cv_scores_[0, j] == pytest.approx(
            manual_cv_accuracy(X[:, 0], y, C, folds), abs=0.006
        )


def test_cv_picks_a_small_C_when_features_are_pure_noise_and_a_large_one_when_signal_is_clean():
    rng = np.random.default_rng(0)
    y = np.arange(300) % 2
    noise = rng.standard_normal((300, 40))
    clean = noise.copy()
    clean[:, 0] += 4 * (y - 0.5)
    X = np.stack([noise, clean], axis=1)
    probes = fit_layer_probes(X, y, C=None, Cs=(1e-4, 1.0), cv=3)
    assert probes.cv_scores_[1].max() > 0.9
    assert probes.C_[1] == 1.0 or probes.cv_scores_[1, 0] >= probes.cv_scores_[1, 1]


# ----------------------------------------------------------------------------------------------
# LayerProbes.


def test_layer_probes_predict_shapes_labels_and_probabilities():
    X, y = planted(200, 3, 16, strength=2.0)
    labels = np.where(y == 1, "harmful", "harmless")
    probes = fit_layer_probes(X, labels, layers=["blocks.0", "blocks.4", "blocks.8"])
    assert isinstance(probes, LayerProbes)
    assert probes.coef_.shape == (3, 16) and probes.intercept_.shape == (3,)
    np.testing.assert_array_equal(probes.classes_, ["harmful", "harmless"])
    proba = probes.predict_proba(X)
    assert proba.shape == (200, 3, 2)
    np.testing.assert_allclose(proba.sum(-1), 1.0)
    predicted = probes.predict(X)
    assert predicted.shape == (200, 3)
    # classes_[1] ("harmless") is the positive class: predicted where its probability > 1/2.
    np.testing.assert_array_equal(predicted == "harmless", proba[..., 1] > 0.5)
    np.testing.assert_allclose(
        probes.score_layers(X, labels), (predicted == labels[:, None]).mean(0)
    )


def test_probe_of_a_layer_is_a_fitted_linear_probe_with_the_same_predictions():
    X, y = planted(200, 3, 16, strength=1.0)
    probes = fit_layer_probes(X, y, C=[0.1, 1.0, 10.0], layers=[4, 8, 12])
    single = probes.probe(8)
    assert isinstance(single, LinearProbe) and single.C_ == 1.0 and single.n_features_in_ == 16
    np.testing.assert_allclose(single.decision_function(X[:, 1]), probes.decision_function(X)[:, 1])
    np.testing.assert_array_equal(single.predict(X[:, 1]), probes.predict(X)[:, 1])
    with pytest.raises(ValueError, match=r"layer 0 is not one of layers_ \[4, 8, 12\]"):
        probes.probe(0)


def test_layer_probes_save_and_load_round_trip(tmp_path):
    X, y = planted(200, 3, 16, strength=1.0)
    probes = fit_layer_probes(
        X,
        y,
        C=None,
        Cs=(0.1, 1.0),
        cv=3,
        layers=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "x"],
    )
    path = tmp_path / "probes.safetensors"
    probes.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probes.json", "probes.safetensors"]
    loaded = LayerProbes.load(path)
    np.testing.assert_array_equal(loaded.predict_proba(X), probes.predict_proba(X))
    assert loaded.layers_ == probes.layers_
    np.testing.assert_array_equal(loaded.cv_scores_, probes.cv_scores_)
    assert loaded.Cs_ == (0.1, 1.0) and loaded.classes_.dtype == probes.classes_.dtype


def test_loading_the_wrong_kind_of_file_names_the_file_and_field(tmp_path):
    X, y = planted(100, 1, 8)
    fit_layer_probes(X, y).save(tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match=r"p\.json: field 'format' is 'probes.LayerProbes'"):
        LinearProbe.load(tmp_path / "p.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
        LayerProbes.load(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------------------------
# LinearProbe as a scikit-learn estimator.


def test_linear_probe_matches_sklearn_logistic_regression():
    X, y = planted(300, 1, 32, strength=0.8)
    probe = LinearProbe(C=0.3, tol=1e-6).fit(X[:, 0], y)
    coef, intercept = sklearn_probe(X[:, 0], y, 0.3)
    np.testing.assert_allclose(probe.coef_[0], coef, rtol=1e-4)
    assert probe.intercept_[0] == pytest.approx(intercept, rel=1e-4)
    assert probe.coef_.shape == (1, 32) and probe.intercept_.shape == (1,)
    assert probe.mean_.shape == (32,) and probe.scale_.shape == (32,)


@parametrize_with_checks([LinearProbe(C=1.0)])
def test_linear_probe_passes_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_linear_probe_works_with_clone_and_cross_val_score():
    X, y = planted(200, 1, 16, strength=1.0)
    probe = LinearProbe(C=1.0, tol=1e-6)
    copy = clone(probe)
    assert copy.get_params() == probe.get_params() and not hasattr(copy, "coef_")
    scores = cross_val_score(probe, X[:, 0], y, cv=StratifiedKFold(4))
    folds = list(StratifiedKFold(4).split(X[:, 0], y))
    expected = [
        held_out_accuracy(*sklearn_probe(X[train, 0], y[train], 1.0), X[val, 0], y[val])
        for train, val in folds
    ]
    np.testing.assert_allclose(scores, expected, atol=0.021)


def test_linear_probe_in_a_pipeline_and_a_grid_search():
    X, y = planted(200, 1, 16, strength=1.0)
    pipe = make_pipeline(StandardScaler(), LinearProbe(C=1.0, standardize=False, tol=1e-6))
    pipe.fit(X[:, 0], y)
    alone = LinearProbe(C=1.0, standardize=True, tol=1e-6).fit(X[:, 0], y)
    np.testing.assert_allclose(
        pipe.decision_function(X[:, 0]), alone.decision_function(X[:, 0]), rtol=1e-4, atol=1e-4
    )
    search = GridSearchCV(LinearProbe(), {"C": [0.01, 1.0]}, cv=3).fit(X[:, 0], y)
    assert search.best_params_["C"] in (0.01, 1.0)


def test_linear_probe_with_C_none_chooses_C_by_cross_validation():
    X, y = planted(200, 1, 16, strength=1.0)
    probe = LinearProbe(Cs=(0.001, 1.0), cv=3).fit(X[:, 0], y, groups=np.arange(200) // 4)
    assert probe.C_ in (0.001, 1.0)
    assert probe.cv_scores_.shape == (2,)
    assert probe.C_ == (0.001, 1.0)[int(np.argmax(probe.cv_scores_))]


def test_linear_probe_save_load_round_trip_gives_identical_predictions(tmp_path):
    X, y = planted(200, 1, 16, strength=1.0)
    labels = np.where(y == 1, 7, -3)
    probe = LinearProbe(C=0.5).fit(X[:, 0], labels)
    probe.save(tmp_path / "probe.safetensors")
    loaded = LinearProbe.load(tmp_path / "probe.safetensors")
    np.testing.assert_array_equal(loaded.predict_proba(X[:, 0]), probe.predict_proba(X[:, 0]))
    np.testing.assert_array_equal(loaded.predict(X[:, 0]), probe.predict(X[:, 0]))
    assert loaded.get_params() == probe.get_params()
    meta = json.loads((tmp_path / "probe.json").read_text())
    assert meta["params"]["C"] == 0.5 and meta["classes"]["values"] == [-3, 7]


def test_linear_probe_predict_proba_columns_follow_classes():
    X, y = planted(200, 1, 16, strength=3.0)
    labels = np.where(y == 1, "refuse", "comply")
    probe = LinearProbe(C=1.0).fit(X[:, 0], labels)
    np.testing.assert_array_equal(probe.classes_, ["comply", "refuse"])
    proba = probe.predict_proba(X[:, 0])
    assert proba.shape == (200, 2)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    np.testing.assert_array_equal(probe.predict(X[:, 0]), probe.classes_[proba.argmax(1)])
    np.testing.assert_allclose(proba[:, 1], 1 / (1 + np.exp(-probe.decision_function(X[:, 0]))))
    assert probe.score(X[:, 0], labels) == np.mean(probe.predict(X[:, 0]) == labels) > 0.7


# ----------------------------------------------------------------------------------------------
# Bad input: a ValueError that names the argument and what was received.


@pytest.fixture
def data():
    return planted(40, 2, 6, strength=1.0)


def test_single_class_labels_are_rejected(data):
    X, _ = data
    with pytest.raises(ValueError, match=r"y has only one class \(1, 40 examples\)"):
        fit_layer_probes(X, np.ones(40, dtype=int))


def test_more_than_two_classes_are_rejected(data):
    X, _ = data
    with pytest.raises(
        ValueError,
        match=r"Only binary classification is supported: y has 3 classes \(\[0, 1, 2\]\)",
    ):
        fit_layer_probes(X, np.arange(40) % 3)


def test_continuous_labels_are_rejected_as_such(data):
    X, _ = data
    with pytest.raises(ValueError, match=r"y looks continuous \(40 distinct values"):
        fit_layer_probes(X, np.linspace(0, 1, 40))


def test_sparse_and_complex_inputs_are_rejected(data):
    from scipy.sparse import csr_matrix

    X, y = data
    with pytest.raises(
        TypeError,
        match=r"X is a sparse csr_matrix of shape \(40, 6\); sparse input is not supported",
    ):
        LinearProbe().fit(csr_matrix(X[:, 0]), y)
    with pytest.raises(ValueError, match="X must hold real numbers: Complex data not supported"):
        fit_layer_probes(X.astype(np.complex64), y)


def test_mismatched_lengths_are_rejected(data):
    X, y = data
    with pytest.raises(ValueError, match="y has 39 labels but X has 40 rows"):
        fit_layer_probes(X, y[:39])
    with pytest.raises(ValueError, match=r"groups must be \[n\] with n=40 .* got shape \(10,\)"):
        fit_layer_probes(X, y, C=None, cv=2, groups=np.arange(10))


def test_nan_and_inf_in_X_are_rejected_with_their_location(data):
    X, y = data
    X = X.copy()
    X[7, 1, 3] = np.nan
    with pytest.raises(
        ValueError, match=r"X contains NaN or inf \(first at sample 7, layer 1, feature 3\)"
    ):
        fit_layer_probes(X, y)
    X[7, 1, 3] = np.inf
    with pytest.raises(ValueError, match="X contains NaN or inf"):
        LinearProbe(C=1.0).fit(X[:, 1], y)
    probe = LinearProbe(C=1.0).fit(data[0][:, 0], y)
    with pytest.raises(ValueError, match="X contains NaN or inf"):
        probe.predict(X[:, 1])


def test_too_few_examples_per_class_are_rejected(data):
    X, _ = data
    y = np.zeros(40)
    y[0] = 1
    with pytest.raises(ValueError, match=r"y has 1 example\(s\) of class 1\.0; need at least 2"):
        fit_layer_probes(X, y)
    y[:3] = 1
    with pytest.raises(
        ValueError,
        match=r"y has 3 example\(s\).*at least 5 of each class \(C=None chooses C by 5-fold",
    ):
        fit_layer_probes(X, y, C=None, cv=5)
    with pytest.raises(ValueError, match="groups has 4 distinct values; 5-fold grouped"):
        fit_layer_probes(X, np.arange(40) % 2, C=None, cv=5, groups=np.arange(40) % 4)


def test_wrong_ndim_is_rejected_with_the_shape_received(data):
    X, y = data
    with pytest.raises(ValueError, match=r"X must be 3-D; got shape \(40, 6\)"):
        fit_layer_probes(X[:, 0], y)
    with pytest.raises(
        ValueError,
        match=r"X must be 2-D \[n, d\]; got shape \(40, 2, 6\); "
        r"for \[n, n_layers, d\] use fit_layer_probes",
    ):
        LinearProbe().fit(X, y)
    with pytest.raises(ValueError, match=r"y must be 1-D \[n\]; got shape \(40, 2\)"):
        fit_layer_probes(X, np.stack([y, y], 1))


def test_predicting_with_the_wrong_shape_is_rejected(data):
    X, y = data
    probes = fit_layer_probes(X, y)
    with pytest.raises(ValueError, match=r"X must be \[n, 2, 6\] .* got shape \(40, 3, 6\)"):
        probes.predict(np.zeros((40, 3, 6)))
    probe = LinearProbe(C=1.0).fit(X[:, 0], y)
    with pytest.raises(
        ValueError, match="X has 5 features, but LinearProbe is expecting 6 features"
    ):
        probe.predict(X[:, 0, :5])


def test_bad_hyper_parameters_are_rejected(data):
    X, y = data
    with pytest.raises(ValueError, match="C must be a positive finite number; got -1"):
        fit_layer_probes(X, y, C=-1)
    with pytest.raises(
        ValueError, match=r"C must be a number or one value per layer \(2\); got 3 values"
    ):
        fit_layer_probes(X, y, C=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="cv must be an integer >= 2"):
        fit_layer_probes(X, y, C=None, cv=1)
    with pytest.raises(ValueError, match="layers must name each of the 2 layers"):
        fit_layer_probes(X, y, layers=[0])
    with pytest.raises(ValueError, match="max_iter must be a positive integer; got 0"):
        LinearProbe(C=1.0, max_iter=0).fit(X[:, 0], y)


def test_no_warnings_on_a_normal_fit(data):
    X, y = data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_layer_probes(X, y)
