"""Specification of probes.directions: difference-in-means directions and measurements on them."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch

import probes.directions
from probes import cosine_similarity, diff_in_means, dprime, project

torch.set_num_threads(2)


def planted_direction(n=400, n_layers=3, d=64, seed=0, strength=3.0):
    """Isotropic noise plus ±strength/2 along a known unit direction per layer; labels [n]."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 2)
    u = rng.standard_normal((n_layers, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    X = rng.standard_normal((n, n_layers, d)) + (y - 0.5)[:, None, None] * strength * u[None]
    return X.astype(np.float32), y, u


def test_docstring_examples_run():
    result = doctest.testmod(probes.directions)
    assert result.attempted >= 3 and result.failed == 0


def test_diff_in_means_recovers_a_planted_direction_per_layer():
    X, y, u = planted_direction(n=4000, d=64, strength=3.0)
    directions = diff_in_means(X, y)
    assert directions.shape == (3, 64) and directions.dtype == torch.float32
    cos = cosine_similarity(directions, u)
    assert torch.all(cos > 0.99), cos


def test_diff_in_means_points_from_the_negative_to_the_positive_class():
    X, y, u = planted_direction()
    labels = np.where(y == 1, "harmful", "harmless")  # positive class = "harmless" (the larger)
    directions = diff_in_means(X, labels)
    assert torch.all(cosine_similarity(directions, -u) > 0.9)


def test_diff_in_means_is_unit_norm_unless_raw_is_asked_for():
    X, y, _ = planted_direction()
    unit = diff_in_means(X, y)
    torch.testing.assert_close(torch.linalg.vector_norm(unit, dim=-1), torch.ones(3))
    raw = diff_in_means(X, y, normalize=False)
    X64 = X.astype(np.float64)
    expected = X64[y == 1].mean(0) - X64[y == 0].mean(0)
    np.testing.assert_allclose(raw.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_diff_in_means_of_one_layer_returns_a_vector_and_keeps_float64():
    X, y, u = planted_direction(n=2000, n_layers=1)
    direction = diff_in_means(X[:, 0].astype(np.float64), y)
    assert direction.shape == (64,) and direction.dtype == torch.float64
    assert float(cosine_similarity(direction, u[0])) > 0.99


def test_diff_in_means_accumulates_in_float64():
    # A large offset with integer jitter: float32 running sums lose the third decimal here.
    rng = np.random.default_rng(0)
    n = 10_000
    y = np.arange(n) % 2
    X = (1e5 + rng.integers(-64, 64, size=(n, 1, 2))).astype(np.float32)
    X[y == 1, 0, 0] += 0.5
    X64 = X.astype(np.float64)
    expected = X64[y == 1].mean(0) - X64[y == 0].mean(0)
    np.testing.assert_allclose(diff_in_means(X, y, normalize=False).numpy(), expected, atol=1e-6)


def test_project_gives_dot_products_with_each_layers_direction():
    X = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 0.0], [0.5, 0.5]]])  # [n=2, L=2, d=2]
    directions = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    torch.testing.assert_close(project(X, directions), torch.tensor([[1.0, 8.0], [-1.0, 1.0]]))
    torch.testing.assert_close(project(X[:, 1], directions[1]), torch.tensor([8.0, 1.0]))


def test_project_onto_diff_in_means_separates_the_classes():
    X, y, _ = planted_direction()
    scores = project(X, diff_in_means(X, y))
    assert scores.shape == (400, 3)
    assert torch.all(scores[y == 1].mean(0) - scores[y == 0].mean(0) > 2.5)


def test_cosine_similarity_of_known_vectors():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [2.0, 3.0]])
    b = torch.tensor([[5.0, 0.0], [-1.0, 0.0], [0.0, 3.0], [1.0, 0.0], [4.0, 6.0]])
    torch.testing.assert_close(
        cosine_similarity(a, b), torch.tensor([1.0, -1.0, 0.0, math.sqrt(0.5), 1.0])
    )
    assert float(cosine_similarity(np.array([3.0, 4.0]), np.array([4.0, 3.0]))) == pytest.approx(
        24 / 25
    )


def test_dprime_of_known_values():
    # class 0: {0, 2} (mean 1, variance 2); class 1: {4, 6} (mean 5, variance 2) -> d' = 4 / sqrt(2)
    projections = torch.tensor([0.0, 4.0, 2.0, 6.0])
    y = np.array([0, 1, 0, 1])
    assert float(dprime(projections, y)) == pytest.approx(4 / math.sqrt(2))
    per_layer = dprime(torch.stack([projections, -projections, 2 * projections], 1), y)
    torch.testing.assert_close(per_layer, torch.tensor([1.0, -1.0, 1.0]) * 4 / math.sqrt(2))


def test_dprime_pools_unequal_class_sizes():
    projections = np.array([0.0, 1.0, 2.0, 10.0, 12.0])  # class 0: 3 rows, class 1: 2 rows
    y = np.array([0, 0, 0, 1, 1])
    pooled = (2 * 1.0 + 1 * 2.0) / 3
    assert float(dprime(projections, y)) == pytest.approx((11.0 - 1.0) / math.sqrt(pooled))


# ----------------------------------------------------------------------------------------------
# Bad input.


def test_mismatched_shapes_are_rejected_with_the_shapes_received():
    X = np.zeros((5, 3, 4))
    with pytest.raises(
        ValueError,
        match=r"directions must have shape \(3, 4\) to match X of shape \(5, 3, 4\); got \(3, 5\)",
    ):
        project(X, np.zeros((3, 5)))
    with pytest.raises(
        ValueError, match=r"a and b must have the same shape; got \(3, 4\) and \(2, 4\)"
    ):
        cosine_similarity(np.ones((3, 4)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="y has 4 labels but X has 5 rows"):
        diff_in_means(X, [0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"X must be 2-D or 3-D; got shape \(5,\)"):
        diff_in_means(np.zeros(5), [0, 1, 0, 1, 0])


def test_degenerate_inputs_are_rejected():
    with pytest.raises(ValueError, match="b has a zero vector at row 1"):
        cosine_similarity(np.ones((2, 3)), np.array([[1.0, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"y has only one class \(0, 4 examples\)"):
        diff_in_means(np.zeros((4, 3)), [0, 0, 0, 0])
    with pytest.raises(ValueError, match="class means of X are identical at layer 0"):
        diff_in_means(np.zeros((4, 2, 3)), [0, 1, 0, 1])
    with pytest.raises(
        ValueError, match=r"y has 1 example\(s\) of class 1; need at least 2 of each class"
    ):
        dprime(np.arange(4.0), [0, 0, 0, 1])
    with pytest.raises(ValueError, match=r"X contains NaN or inf \(first at index \(1, 2\)\)"):
        diff_in_means(np.array([[0.0, 1, 2], [3, 4, np.nan]]), [0, 1])
