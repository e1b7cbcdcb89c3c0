"""Specification of probes.LayerProbes as a scikit-learn estimator, and of LinearProbe as its
one-layer view."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import (
    GridSearchCV,
    GroupKFold,
    StratifiedKFold,
    cross_val_score,
    cross_validate,
)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from probes import LayerProbes, LinearProbe, fit_layer_probes

torch.set_num_threads(2)


def layered(n=120, n_layers=3, d=10, seed=0):
    """[n, n_layers, d] float64 noise whose label signal grows with depth; labels [n]."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 2)
    X = rng.standard_normal((n, n_layers, d))
    X[:, :, 0] += np.linspace(0.0, 3.0, n_layers)[None] * (y - 0.5)[:, None]
    return X, y


def test_fit_layer_probes_is_layer_probes_fitted_with_the_same_arguments():
    X, y = layered()
    groups = np.arange(120) // 4
    kw = dict(Cs=(0.1, 1.0), cv=2, tol=1e-6, layers=["a", "b", "c"], dtype=torch.float64)
    by_function = fit_layer_probes(X, y, C=None, groups=groups, **kw)
    by_estimator = LayerProbes(C=None, **kw).fit(X, y, groups=groups)
    assert isinstance(by_function, LayerProbes)
    assert by_function.get_params() == by_estimator.get_params()
    np.testing.assert_array_equal(by_function.coef_, by_estimator.coef_)
    np.testing.assert_array_equal(by_function.cv_scores_, by_estimator.cv_scores_)
    assert by_function.layers_ == ("a", "b", "c")


def test_fit_returns_the_estimator_itself():
    X, y = layered()
    probes = LayerProbes()
    assert probes.fit(X, y) is probes


def test_clone_gives_an_unfitted_estimator_with_the_same_hyper_parameters():
    X, y = layered()
    probes = LayerProbes(C=[0.1, 1.0, 10.0], layers=(4, 8, 12), dtype=torch.float64).fit(X, y)
    copy = clone(probes)
    assert copy.get_params() == probes.get_params()
    assert not hasattr(copy, "coef_")
    np.testing.assert_array_equal(copy.fit(X, y).coef_, probes.coef_)


def test_using_an_unfitted_estimator_raises_not_fitted_error():
    X, _ = layered()
    with pytest.raises(NotFittedError, match="this LayerProbes is not fitted yet"):
        LayerProbes().predict(X)


def test_score_is_the_mean_over_layers_of_score_layers():
    X, y = layered()
    probes = LayerProbes().fit(X, y)
    per_layer = probes.score_layers(X, y)
    assert per_layer.shape == (3,) and per_layer[0] < per_layer[2]
    score = probes.score(X, y)
    assert isinstance(score, float) and score == pytest.approx(per_layer.mean(), abs=1e-15)


def test_score_layers_weighs_samples_by_sample_weight():
    X, y = layered()
    probes = LayerProbes().fit(X, y)
    weight = np.where(np.arange(120) < 60, 3.0, 1.0)
    correct = probes.predict(X) == y[:, None]
    np.testing.assert_allclose(
        probes.score_layers(X, y, sample_weight=weight), (weight[:, None] * correct).sum(0) / 240
    )


def test_cross_val_score_equals_fitting_and_scoring_each_fold_by_hand():
    X, y = layered()
    folds = list(StratifiedKFold(3).split(X[:, 0], y))
    scores = cross_val_score(LayerProbes(C=0.5), X, y, cv=StratifiedKFold(3))
    by_hand = [LayerProbes(C=0.5).fit(X[tr], y[tr]).score(X[te], y[te]) for tr, te in folds]
    np.testing.assert_array_equal(scores, by_hand)


def test_cross_validate_routes_groups_to_fit_for_choosing_C():
    X, y = layered()
    groups = np.arange(120) // 6
    probes = LayerProbes(C=None, Cs=(0.01, 1.0), cv=2)
    result = cross_validate(
        probes, X, y, groups=groups, cv=GroupKFold(2), params={"groups": groups},
        return_estimator=True,
    )  # fmt: skip
    for (train, _), fitted in zip(GroupKFold(2).split(X, y, groups), result["estimator"]):
        by_hand = clone(probes).fit(X[train], y[train], groups=groups[train])
        np.testing.assert_array_equal(fitted.C_, by_hand.C_)
        np.testing.assert_array_equal(fitted.cv_scores_, by_hand.cv_scores_)


def test_a_pipeline_feeds_transformed_activations_to_the_probes():
    X, y = layered(d=16)
    first_ten = FunctionTransformer(lambda X: X[:, :, :10])  # [n, L, 16] -> [n, L, 10]
    pipe = make_pipeline(first_ten, LayerProbes(C=0.5)).fit(X, y)
    alone = LayerProbes(C=0.5).fit(X[:, :, :10], y)
    np.testing.assert_array_equal(pipe.decision_function(X), alone.decision_function(X[:, :, :10]))
    assert pipe.score(X, y) == alone.score(X[:, :, :10], y)


def test_grid_search_chooses_one_C_for_all_layers_by_mean_held_out_accuracy():
    X, y = layered()
    search = GridSearchCV(LayerProbes(), {"C": [1e-3, 1.0]}, cv=StratifiedKFold(2)).fit(X, y)
    folds = StratifiedKFold(2)
    means = {C: cross_val_score(LayerProbes(C=C), X, y, cv=folds).mean() for C in (1e-3, 1.0)}
    assert search.best_score_ == max(means.values())
    assert search.best_params_["C"] == max(means, key=means.get)
    assert search.best_estimator_.C_.tolist() == [search.best_params_["C"]] * 3


# ----------------------------------------------------------------------------------------------
# LinearProbe: the one-layer view.


def test_linear_probe_is_layer_probes_on_one_layer():
    X, y = layered()
    single = LinearProbe(C=0.5, Cs=(0.1, 1.0)).fit(X[:, 2], y)
    layer = LayerProbes(C=0.5).fit(X[:, 2:], y)
    np.testing.assert_array_equal(single.coef_, layer.coef_)
    np.testing.assert_array_equal(single.intercept_, layer.intercept_)
    np.testing.assert_array_equal(single.mean_, layer.mean_[0])
    np.testing.assert_array_equal(
        single.predict_proba(X[:, 2]), layer.predict_proba(X[:, 2:])[:, 0]
    )


def test_probe_of_a_layer_carries_the_hyper_parameters_of_the_fit():
    X, y = layered()
    probes = LayerProbes(C=None, Cs=(0.1, 1.0), cv=2, tol=1e-6, rank=4, dtype=torch.float64)
    single = probes.fit(X, y).probe(1)
    expected = {k: v for k, v in probes.get_params().items() if k != "layers"}
    assert single.get_params() == {**expected, "C": probes.C_[1]}
    np.testing.assert_array_equal(single.cv_scores_, probes.cv_scores_[1])
    assert single.Cs_ == probes.Cs_ == (0.1, 1.0)
