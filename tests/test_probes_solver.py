"""Specification of the batched solver behind probes.LayerProbes: the numbers it gives, and
what it does with features of extreme scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from probes import LayerProbes, LinearProbe, fit_layer_probes

torch.set_num_threads(2)


def reference_data():
    rng = np.random.default_rng(7)
    y = rng.permutation(np.arange(120) % 2)
    X = rng.standard_normal((120, 2, 10))
    X += 0.8 * (y - 0.5)[:, None, None] * rng.standard_normal((2, 10))
    return X * rng.uniform(0.5, 3.0, size=10) + 1.0, y


# Recorded with the solver as it was before LayerProbes became an estimator (commit 1138c99):
# the demo's numbers depend on the fit staying the same. This machine reproduces them bit for
# bit; 1e-12 leaves room for another float64 BLAS summing in another order.
REFERENCE = {
    "fixed C": dict(
        kw=dict(C=0.5),
        coef_sum=[2.08371097366594, 0.5675158244897773],
        intercept=[-1.8840420242199993, -0.7485659929540347],
        C=[0.5, 0.5],
        n_iter=[5, 6],
        cv_scores=None,
    ),
    "C by grouped cross-validation": dict(
        kw=dict(C=None, Cs=(0.01, 0.1, 1.0), cv=3, groups=np.arange(120) // 4),
        coef_sum=[1.3658728073013748, 0.39230916571155444],
        intercept=[-1.2537181869424041, -0.49703698055584156],
        C=[0.1, 0.1],
        n_iter=[5, 5],
        cv_scores=[
            [0.7666666666666666, 0.7916666666666666, 0.7916666666666666],
            [0.8416666666666667, 0.85, 0.85],
        ],
    ),
}


@pytest.mark.parametrize("case", REFERENCE)
def test_fits_reproduce_the_recorded_solver_output(case):
    X, y = reference_data()
    ref = REFERENCE[case]
    probes = fit_layer_probes(X, y, rank=3, dtype=torch.float64, **ref["kw"])
    np.testing.assert_allclose(probes.coef_.sum(1), ref["coef_sum"], rtol=1e-12)
    np.testing.assert_allclose(probes.intercept_, ref["intercept"], rtol=1e-12)
    assert probes.C_.tolist() == ref["C"] and probes.n_iter_.tolist() == ref["n_iter"]
    if ref["cv_scores"] is not None:
        np.testing.assert_allclose(probes.cv_scores_, ref["cv_scores"], rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# Extreme scales.


def separable(n=200, n_layers=2, d=8):
    rng = np.random.default_rng(0)
    y = np.arange(n) % 2
    X = rng.standard_normal((n, n_layers, d))
    X[:, :, 0] += 6 * (y - 0.5)[:, None]
    return X, y


@pytest.mark.parametrize("scale", [1e300, 1e-300])
def test_standardised_fit_of_separable_data_scaled_to_extremes_is_exact(scale):
    X, y = separable()
    unscaled = fit_layer_probes(X, y)
    probes = fit_layer_probes(X * scale, y)
    assert probes.score_layers(X * scale, y).tolist() == [1.0, 1.0]
    np.testing.assert_allclose(probes.coef_ * scale, unscaled.coef_, rtol=1e-9)
    np.testing.assert_allclose(probes.intercept_, unscaled.intercept_, rtol=1e-9)
    single = LinearProbe(C=1.0).fit(X[:, 0] * scale, y)
    assert single.score(X[:, 0] * scale, y) == 1.0


def test_features_of_extreme_scale_next_to_ordinary_ones_are_each_standardised():
    X, y = separable()
    unscaled = fit_layer_probes(X, y)
    mixed = X.copy()
    mixed[:, :, 0] *= 1e300
    mixed[:, :, 3] *= 1e-300
    probes = fit_layer_probes(mixed, y)
    assert probes.score_layers(mixed, y).tolist() == [1.0, 1.0]
    expected = unscaled.coef_ / np.array([1e300, 1, 1, 1e-300, 1, 1, 1, 1])
    np.testing.assert_allclose(probes.coef_, expected, rtol=1e-9)


def test_scaling_features_by_a_power_of_two_scales_coef_by_exactly_its_inverse():
    X, y = separable()
    unscaled = fit_layer_probes(X, y)
    scaled = fit_layer_probes(X * 2.0**900, y)
    np.testing.assert_array_equal(scaled.coef_ * 2.0**900, unscaled.coef_)
    np.testing.assert_array_equal(scaled.intercept_, unscaled.intercept_)


def test_unstandardised_features_too_large_for_the_dtype_raise_an_overflow_error():
    X, y = separable()
    with pytest.raises(
        ValueError,
        match=r"the fit is not finite for layer index\(es\) \[0, 1\]: torch.float64 overflowed "
        r"on features whose largest centred standard deviation is 3.26e\+300 "
        r"\(standardize=False\); pass standardize=True",
    ):
        LayerProbes(standardize=False).fit(X * 1e300, y)


def test_unstandardised_features_too_small_for_tol_warn_that_the_probe_predicts_one_class():
    X, y = separable()
    with pytest.warns(
        ConvergenceWarning,
        match=r"layer index\(es\) \[0, 1\] the solver stopped at w = 0: with standardize=False "
        r".*standard deviation 3.26e-300\), so the probe predicts one class",
    ):
        probes = LayerProbes(standardize=False).fit(X * 1e-300, y)
    assert probes.score_layers(X * 1e-300, y).tolist() == [0.5, 0.5]
