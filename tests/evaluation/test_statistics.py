"""Tests of leukofed.evaluation.statistics: CI coverage on a known distribution, McNemar by hand."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from leukofed.config import BootstrapParams
from leukofed.evaluation.statistics import METRIC_NAMES, bootstrap_ci, bootstrap_metrics, compare_models, mcnemar_test

PARAMS = BootstrapParams(n_resamples=1000, confidence=0.95, seed=0)


def test_accuracy_interval_covers_the_true_rate_about_95_percent_of_the_time():
    true_rate, n_images, n_datasets = 0.85, 200, 200
    rng = np.random.default_rng(0)
    covered = 0
    for dataset in range(n_datasets):
        hits = (rng.uniform(size=n_images) < true_rate).astype(float)
        params = BootstrapParams(n_resamples=1000, confidence=0.95, seed=dataset)
        interval = bootstrap_ci((hits,), lambda x, axis: x.mean(axis=axis), params, vectorized=True)
        covered += interval["low"] <= true_rate <= interval["high"]
    assert 0.90 <= covered / n_datasets <= 0.99


def _predictions(n: int = 300, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 4, n)
    y_pred = np.where(rng.uniform(size=n) < 0.8, y_true, rng.integers(0, 4, n))
    return y_true, y_pred


def test_metric_estimates_are_scikit_learns_and_inside_their_intervals():
    y_true, y_pred = _predictions()
    result = bootstrap_metrics(y_true, y_pred, 4, BootstrapParams(n_resamples=200, confidence=0.95, seed=0))
    assert tuple(result) == METRIC_NAMES
    assert result["accuracy"]["estimate"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert result["balanced_accuracy"]["estimate"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert result["macro_f1"]["estimate"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    for entry in result.values():
        assert 0.0 <= entry["low"] <= entry["estimate"] <= entry["high"] <= 1.0
        assert entry["high"] - entry["low"] < 0.2


def test_same_seed_same_interval_and_a_perfect_model_is_degenerate_but_valid():
    y_true, y_pred = _predictions()
    params = BootstrapParams(n_resamples=200, confidence=0.9, seed=5)
    assert bootstrap_metrics(y_true, y_pred, 4, params) == bootstrap_metrics(y_true, y_pred, 4, params)
    perfect = bootstrap_metrics(y_true, y_true, 4, params)
    assert perfect["accuracy"] == {"estimate": 1.0, "low": 1.0, "high": 1.0}


def test_mcnemar_exact_and_mid_p_on_hand_computed_counts():
    # b = 1 (A right, B wrong), c = 5 (A wrong, B right), 4 concordant pairs.
    correct_a = np.array([1, 0, 0, 0, 0, 0, 1, 1, 0, 0], dtype=bool)
    correct_b = np.array([0, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=bool)
    result = mcnemar_test(correct_a, correct_b)
    # P(X <= 1) for X ~ Bin(6, 1/2) = 7/64: exact p = 14/64; mid-p = 14/64 - P(X = 1) = 14/64 - 6/64.
    assert (result["b"], result["c"], result["statistic"]) == (1, 5, 1)
    assert result["p_value"] == pytest.approx(14 / 64)
    assert result["mid_p_value"] == pytest.approx(8 / 64)


def test_mcnemar_without_discordant_pairs_is_not_significant():
    same = np.array([True, False, True])
    assert mcnemar_test(same, same) == {"b": 0, "c": 0, "statistic": 0, "p_value": 1.0, "mid_p_value": 1.0}
    assert mcnemar_test(np.array([True]), np.array([False]))["p_value"] == 1.0


def test_compare_models_tests_the_reference_against_every_other_model():
    y_true, y_pred = _predictions()
    params = BootstrapParams(n_resamples=100, confidence=0.95, seed=0)
    result = compare_models({"centralized": y_true.copy(), "fedavg-3": y_pred}, y_true, "centralized", 4, params)
    assert set(result["models"]) == {"centralized", "fedavg-3"} and set(result["mcnemar"]) == {"fedavg-3"}
    assert result["mcnemar"]["fedavg-3"]["c"] == 0 and result["mcnemar"]["fedavg-3"]["b"] == int((y_pred != y_true).sum())
    assert (result["n_test"], result["n_resamples"], result["confidence"]) == (len(y_true), 100, 0.95)
    with pytest.raises(ValueError, match="reference"):
        compare_models({"fedavg-3": y_pred}, y_true, "centralized", 4, params)
