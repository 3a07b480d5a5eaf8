"""Tests of leukofed.evaluation.calibration: hand-computed ECE, scikit-learn cross-checks, temperature fits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, log_loss

from leukofed.evaluation.calibration import (
    calibration_errors,
    calibration_metrics,
    confidence_histograms,
    federated_temperature,
    fit_temperature,
    probabilities,
    reliability_bins,
    temperature_record,
    write_calibration,
)
from leukofed.provenance import DataProvenance

CLASSES = ["Benign", "Early", "Pre", "Pro"]
BOUNDS = [0.05, 20.0]


def test_ece_and_mce_on_a_hand_computed_case():
    # 4 bins. Bin [0.5, 0.75): scores 0.6, 0.7, hits 1, 0 -> |0.5 - 0.65| = 0.15, weight 2/5.
    # Bin [0.75, 1]: scores 0.8, 0.9, 1.0, hits 1, 1, 1 -> |1 - 0.9| = 0.10, weight 3/5.
    scores = np.array([0.6, 0.7, 0.8, 0.9, 1.0])
    hits = np.array([1, 0, 1, 1, 1])
    ece, mce = calibration_errors(scores, hits, n_bins=4)
    assert ece == pytest.approx(2 / 5 * 0.15 + 3 / 5 * 0.10)
    assert mce == pytest.approx(0.15)


def test_perfectly_calibrated_data_has_ece_near_zero():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 1, 200_000)
    hits = rng.uniform(0, 1, scores.size) < scores  # an event of probability p happens with frequency p
    ece, _ = calibration_errors(scores, hits, n_bins=15)
    assert ece < 0.005


def test_bins_match_scikit_learn_calibration_curve():
    rng = np.random.default_rng(1)
    scores = np.round(rng.uniform(0, 1, 500), 1)  # many scores exactly on bin edges
    hits = rng.uniform(0, 1, 500) < scores
    bins = reliability_bins(scores, hits, n_bins=10)
    prob_true, prob_pred = calibration_curve(hits, scores, n_bins=10, strategy="uniform")
    filled = [i for i, n in enumerate(bins["count"]) if n]
    np.testing.assert_allclose([bins["accuracy"][i] for i in filled], prob_true)
    np.testing.assert_allclose([bins["confidence"][i] for i in filled], prob_pred)
    assert sum(bins["count"]) == 500 and len(bins["edges"]) == 11
    assert all(bins["accuracy"][i] is None for i, n in enumerate(bins["count"]) if not n)


def _toy(n: int = 400, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), n)
    logits = rng.normal(0, 1, (n, len(CLASSES)))
    logits[np.arange(n), labels] += 1.5
    return logits, labels


def test_brier_and_nll_agree_with_scikit_learn():
    logits, labels = _toy()
    proba = probabilities(logits)
    scores = calibration_metrics(labels, proba, CLASSES, n_bins=10)
    one_hot = np.eye(len(CLASSES))[labels]
    assert scores["overall"]["brier"] == pytest.approx(np.mean(np.sum((proba - one_hot) ** 2, axis=1)))
    assert scores["overall"]["nll"] == pytest.approx(log_loss(labels, proba))
    for label, name in enumerate(CLASSES):
        assert scores["per_class"][name]["brier"] == pytest.approx(brier_score_loss(labels == label, proba[:, label]))
    assert sum(entry["brier"] for entry in scores["per_class"].values()) == pytest.approx(scores["overall"]["brier"])


def test_a_class_absent_from_the_labels_still_gets_scores():
    logits, labels = _toy()
    labels[labels == 3] = 0
    scores = calibration_metrics(labels, probabilities(logits), CLASSES, n_bins=10)
    assert set(scores["per_class"]) == set(CLASSES)
    assert 0.0 <= scores["per_class"]["Pro"]["ece"] <= 1.0


def test_confidence_histograms_split_correct_and_incorrect():
    proba = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55]])
    histograms = confidence_histograms(np.array([0, 1, 1, 0]), proba, n_bins=2)
    assert histograms["correct"] == [0, 2]  # 0.9 and 0.8, both in [0.5, 1]
    assert histograms["incorrect"] == [0, 2]  # 0.6 and 0.55


@pytest.mark.parametrize("true_temperature", [0.5, 2.5])
def test_temperature_recovers_the_scale_of_the_logits(true_temperature):
    rng = np.random.default_rng(3)
    base = rng.normal(0, 2, (5000, len(CLASSES)))
    # Labels drawn from softmax(base): base is calibrated, so base * T is calibrated at temperature T.
    cumulative = probabilities(base).cumsum(axis=1)
    labels = (rng.uniform(0, 1, (len(base), 1)) > cumulative).sum(axis=1)
    fitted = fit_temperature(base * true_temperature, labels, BOUNDS)
    assert fitted == pytest.approx(true_temperature, rel=0.1)


def test_temperature_scaling_keeps_predictions_and_lowers_nll():
    logits, labels = _toy()
    overconfident = 4 * logits
    temperature = fit_temperature(overconfident, labels, BOUNDS)
    assert temperature > 1
    before, after = probabilities(overconfident), probabilities(overconfident, temperature)
    assert (before.argmax(axis=1) == after.argmax(axis=1)).all()
    assert log_loss(labels, after) < log_loss(labels, before)


def test_a_validation_set_without_errors_runs_into_the_lower_bound():
    logits, labels = _toy()
    right = logits.argmax(axis=1) == labels
    record = temperature_record(logits[right], labels[right], BOUNDS)
    assert record["at_bound"] and record["fitted_temperature"] == pytest.approx(BOUNDS[0], rel=1e-3)
    assert record["temperature"] == 1.0, "an unidentifiable temperature must not be applied"
    assert not temperature_record(logits, labels, BOUNDS)["at_bound"]


def test_federated_temperature_equals_the_pooled_fit():
    logits, labels = _toy()
    fit = federated_temperature({2: (4 * logits[:100], labels[:100]), 1: (4 * logits[100:], labels[100:])}, BOUNDS)
    assert [site["site"] for site in fit["sites"]] == [1, 2] and fit["n_val"] == len(labels)
    assert fit["temperature"] == pytest.approx(fit_temperature(4 * logits, labels, BOUNDS), rel=1e-3)
    assert not fit["at_bound"]


def test_a_site_without_errors_does_not_drag_the_federation_to_the_bound():
    logits, labels = _toy()
    right = logits.argmax(axis=1) == labels
    fit = federated_temperature({1: (logits[right][:20], labels[right][:20]), 2: (logits, labels)}, BOUNDS)
    assert fit["sites"][0]["at_bound"]
    assert not fit["at_bound"] and fit["temperature"] > 2 * BOUNDS[0]


def test_write_calibration_writes_the_documented_files(tmp_path):
    logits, labels = _toy(120)
    provenance = DataProvenance("toy", "synthetic", "/data/toy", "ab" * 32, 120)
    record = write_calibration(
        tmp_path, labels, 3 * logits, {"scheme": "global-val", "temperature": 2.0}, CLASSES, 10, provenance, {"name": "m"}
    )
    on_disk = json.loads((tmp_path / "calibration.json").read_text())
    assert on_disk == record
    assert set(on_disk["overall"]) == {"ece", "mce", "brier", "nll"} and set(on_disk["per_class"]) == set(CLASSES)
    assert on_disk["temperature"] == 2.0 and on_disk["bins"] == 10 and on_disk["n_test"] == 120
    assert set(on_disk["after_scaling"]) == {"ece", "mce", "brier", "nll", "per_class"}
    assert on_disk["data"]["fingerprint"] == "ab" * 32
    for name in ("reliability.png", "confidence.png"):
        assert Image.open(tmp_path / name).size[0] > 500
