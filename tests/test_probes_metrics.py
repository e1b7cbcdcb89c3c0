"""Specification of probes.metrics: accuracy, AUROC, bootstraps, grouped splits, thresholds."""

from __future__ import annotations

import dataclasses
import doctest

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import roc_auc_score

import probes.metrics
from probes import (
    Interval,
    accuracy,
    auroc,
    bootstrap_ci,
    bootstrap_rate,
    grouped_train_test_split,
    pearson,
    spearman,
    threshold_for,
)


def test_docstring_examples_run():
    result = doctest.testmod(probes.metrics)
    assert result.attempted >= 2 and result.failed == 0


def test_interval_is_a_frozen_record_with_a_dict_form():
    interval = Interval(value=0.5, low=0.4, high=0.6)
    assert interval.to_dict() == {"value": 0.5, "low": 0.4, "high": 0.6}
    with pytest.raises(dataclasses.FrozenInstanceError):
        interval.value = 1.0


def test_accuracy_is_the_fraction_of_matches():
    assert accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    assert accuracy(np.array(["a", "b"]), np.array(["a", "b"])) == 1.0


# ----------------------------------------------------------------------------------------------
# AUROC.


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_sklearn_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    scores = rng.integers(0, 6, 300) + y  # few distinct values: ties everywhere
    assert auroc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


def test_auroc_equals_sklearn_on_continuous_scores_and_string_labels():
    rng = np.random.default_rng(0)
    y = np.where(rng.random(200) < 0.3, "refuse", "comply")  # positive class: "refuse"
    scores = rng.standard_normal(200) + (y == "refuse")
    assert auroc(y, scores) == pytest.approx(roc_auc_score(y == "refuse", scores), abs=1e-12)


def test_auroc_of_perfect_reversed_and_constant_scores():
    y = np.array([0, 0, 1, 1])
    assert auroc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auroc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert auroc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_auroc_of_a_score_matrix_is_one_value_per_column():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 100)
    scores = rng.integers(0, 4, (100, 3)) + y[:, None] * np.array([0, 1, 3])
    expected = [roc_auc_score(y, scores[:, j]) for j in range(3)]
    np.testing.assert_allclose(auroc(y, scores), expected, atol=1e-12)


def test_auroc_rejects_single_class_and_mismatched_lengths():
    with pytest.raises(ValueError, match=r"y has only one class \(1, 3 examples\)"):
        auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="scores has 2 rows but y has 3 labels"):
        auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="scores contains NaN or inf"):
        auroc([0, 1], [0.1, np.nan])


# ----------------------------------------------------------------------------------------------
# Correlation.


@pytest.mark.parametrize("seed", range(3))
def test_spearman_equals_scipy_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 5, 80)
    b = a + rng.integers(0, 4, 80)  # few distinct values on both sides
    assert spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b).statistic, abs=1e-12)


def test_pearson_equals_scipy_on_continuous_values():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(60)
    b = 0.5 * a + rng.standard_normal(60)
    assert pearson(a, b) == pytest.approx(scipy.stats.pearsonr(a, b).statistic, abs=1e-12)


def test_spearman_sees_a_monotonic_relation_that_pearson_does_not():
    a = np.arange(1.0, 11.0)
    assert spearman(a, np.exp(a)) == 1.0
    assert pearson(a, np.exp(a)) < 0.8


def test_correlation_of_matrices_is_one_value_per_pair_of_columns():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 6, (50, 3))
    b = a * np.array([1, -1, 0]) + rng.integers(0, 3, (50, 3))
    expected = [scipy.stats.spearmanr(a[:, j], b[:, j]).statistic for j in range(3)]
    np.testing.assert_allclose(spearman(a, b), expected, atol=1e-12)
    expected = [scipy.stats.pearsonr(a[:, j], b[:, j]).statistic for j in range(3)]
    np.testing.assert_allclose(pearson(a, b), expected, atol=1e-12)


def test_correlation_is_nan_for_a_constant_input_or_fewer_than_two_pairs():
    assert np.isnan(spearman([1, 2, 3], [4, 4, 4]))
    assert np.isnan(pearson([5, 5, 5], [1, 2, 3]))
    assert np.isnan(spearman([1.0], [2.0])) and np.isnan(pearson([1.0], [2.0]))
    per_column = pearson(np.array([[1, 0], [2, 0], [3, 0]]), np.array([[1, 1], [2, 2], [4, 3]]))
    assert per_column[0] == pytest.approx(scipy.stats.pearsonr([1, 2, 3], [1, 2, 4]).statistic)
    assert np.isnan(per_column[1])


def test_pearson_survives_values_of_extreme_scale():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal(40), rng.standard_normal(40)
    assert pearson(a * 1e300, b * 1e-300) == pytest.approx(pearson(a, b), abs=1e-12)


def test_correlation_rejects_mismatched_shapes_and_nan():
    with pytest.raises(ValueError, match=r"a and b must have the same shape; got \(3,\) and \(4,"):
        spearman([1, 2, 3], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="b contains NaN or inf"):
        pearson([1.0, 2.0, 3.0], [1.0, np.nan, 3.0])


# ----------------------------------------------------------------------------------------------
# Bootstrap intervals.


def test_bootstrap_rate_contains_the_rate_and_narrows_with_more_outcomes():
    rng = np.random.default_rng(0)
    small = bootstrap_rate(rng.random(50) < 0.3, seed=1)
    large = bootstrap_rate(rng.random(5000) < 0.3, seed=1)
    for interval in (small, large):
        assert interval.low <= interval.value <= interval.high
    assert (large.high - large.low) < (small.high - small.low) / 5
    # About the normal-approximation width 2 * 1.96 * sqrt(p (1 - p) / n).
    assert large.high - large.low == pytest.approx(2 * 1.96 * np.sqrt(0.21 / 5000), rel=0.1)


def test_bootstrap_rate_is_reproducible_for_a_seed():
    outcomes = np.array([1, 0, 1, 1, 0, 1, 0, 1])
    assert bootstrap_rate(outcomes, seed=3) == bootstrap_rate(outcomes, seed=3)
    assert bootstrap_rate(outcomes).value == 0.625


def test_bootstrap_rate_of_all_successes_is_a_point():
    assert bootstrap_rate([True] * 20) == Interval(1.0, 1.0, 1.0)


def test_bootstrap_rate_rejects_empty_and_non_binary_outcomes():
    with pytest.raises(ValueError, match=r"outcomes is empty \(shape \(0,\)\)"):
        bootstrap_rate([])
    with pytest.raises(ValueError, match="outcomes must be bool or 0/1; found the value 2.0"):
        bootstrap_rate([0, 1, 2])
    with pytest.raises(ValueError, match=r"outcomes must be 1-D \[n\]; got shape \(2, 2\)"):
        bootstrap_rate([[0, 1], [1, 0]])
    with pytest.raises(ValueError, match="alpha must be in"):
        bootstrap_rate([0, 1], alpha=1.5)


def test_bootstrap_ci_resamples_rows_of_all_arrays_together():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200)
    # Paired: the difference x - x is 0 on every resample; unpaired it would vary.
    assert bootstrap_ci(lambda a, b: np.mean(a - b), x, x.copy()) == Interval(0.0, 0.0, 0.0)
    spread = bootstrap_ci(np.mean, x, seed=2)
    assert spread.value == pytest.approx(x.mean())
    assert spread.low < spread.value < spread.high


def test_bootstrap_ci_of_auroc_with_strata_keeps_both_classes_in_every_resample():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(3, dtype=int), np.zeros(60, dtype=int)]  # rare positives
    scores = rng.standard_normal(63) + 2 * y
    interval = bootstrap_ci(auroc, y, scores, strata=y, n_boot=300)
    assert interval.value == pytest.approx(roc_auc_score(y, scores))
    assert 0.0 <= interval.low <= interval.value <= interval.high <= 1.0


def test_bootstrap_ci_rejects_arrays_of_different_lengths():
    with pytest.raises(
        ValueError, match=r"arrays\[0\] has 3 rows but arrays\[1\] has shape \(4,\)"
    ):
        bootstrap_ci(lambda a, b: 0.0, np.zeros(3), np.zeros(4))


# ----------------------------------------------------------------------------------------------
# Grouped splits.


def test_grouped_split_never_puts_a_group_on_both_sides():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 40, 500)  # 40 groups of uneven size
    for seed in range(200):
        train, test = grouped_train_test_split(groups, test_size=0.25, seed=seed)
        assert not set(groups[train]) & set(groups[test])
        np.testing.assert_array_equal(np.sort(np.r_[train, test]), np.arange(500))
        assert 0.15 < len(test) / 500 < 0.35


def test_grouped_split_keeps_both_classes_on_both_sides_when_given_labels():
    groups = np.repeat(np.arange(20), 5)
    y = (np.arange(100) // 5 < 4).astype(int)  # only the first 4 groups are positive
    for seed in range(50):
        train, test = grouped_train_test_split(groups, seed=seed, y=y)
        assert set(y[train]) == {0, 1} and set(y[test]) == {0, 1}
        assert not set(groups[train]) & set(groups[test])


def test_grouped_split_warns_when_no_split_can_keep_both_classes_on_both_sides():
    groups = np.repeat(np.arange(4), 5)
    y = (groups == 0).astype(int)  # all positives in one group
    with pytest.warns(UserWarning, match="no split of the 4 groups among 200 seeded orders"):
        train, test = grouped_train_test_split(groups, y=y)
    assert not set(groups[train]) & set(groups[test])


def test_grouped_split_takes_about_test_size_of_the_rows():
    groups = np.repeat(np.arange(100), 3)
    train, test = grouped_train_test_split(groups, test_size=0.2, seed=5)
    assert len(test) == 60 and len(train) == 240


def test_grouped_split_rejects_a_single_group_and_bad_sizes():
    with pytest.raises(
        ValueError, match=r"groups has 1 distinct value\(s\); a split needs at least 2"
    ):
        grouped_train_test_split(np.zeros(10))
    with pytest.raises(ValueError, match=r"test_size must be a fraction in \(0, 1\); got 1.5"):
        grouped_train_test_split(np.arange(10), test_size=1.5)


# ----------------------------------------------------------------------------------------------
# Thresholds.


def test_threshold_for_balanced_accuracy_separates_separable_scores():
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8])
    y = np.array([0, 0, 0, 1, 1])
    t = threshold_for(scores, y)
    assert t == pytest.approx(0.5)
    assert accuracy(y, (scores > t).astype(int)) == 1.0


def test_threshold_for_balanced_accuracy_weighs_the_rare_class():
    # 1 positive (0.8) among 9 negatives, two of which score higher. Plain accuracy is best
    # flagging nothing; balanced accuracy flags the positive at the cost of two false positives.
    scores = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.85, 0.9, 0.8])
    y = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    assert threshold_for(scores, y) == pytest.approx(0.7)
    assert threshold_for(scores, y, target="accuracy") == 0.9


def test_threshold_for_a_false_positive_rate_is_the_lowest_that_meets_it():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 1000)
    scores = rng.standard_normal(1000) + y
    t = threshold_for(scores, y, target=0.05)
    negatives = scores[y == 0]
    assert np.mean(negatives > t) <= 0.05
    lower = np.max(negatives[negatives <= t])  # the next candidate down lets one more through
    assert np.mean(negatives > lower - 1e-9) > 0.05


def test_threshold_for_rejects_an_unknown_target():
    with pytest.raises(
        ValueError, match="target must be 'balanced_accuracy', 'accuracy' or a false-positive rate"
    ):
        threshold_for([0.1, 0.9], [0, 1], target="f1")
    with pytest.raises(
        ValueError, match=r"target false-positive rate must be in \[0, 1\); got 1.0"
    ):
        threshold_for([0.1, 0.9], [0, 1], target=1.0)
