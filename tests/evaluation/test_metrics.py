"""Tests of leukofed.evaluation.metrics: the numbers, and the files the evaluate stage writes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import f1_score, roc_auc_score

from leukofed.evaluation.metrics import classification_metrics, plot_confusion_matrix, write_evaluation
from leukofed.provenance import DataProvenance

CLASSES = ["Benign", "Early", "Pre", "Pro"]
EVALUATION_FILES = {"metrics.json", "confusion_matrix.json", "confusion_matrix.png", "predictions.csv"}


def _proba(y_pred: list[int], y_true: list[int], n_classes: int = len(CLASSES)) -> np.ndarray:
    """Probabilities whose arg-max is ``y_pred``, with ranks that vary with ``y_true`` (for AUC)."""
    proba = np.full((len(y_pred), n_classes), 0.1)
    proba[np.arange(len(y_pred)), y_true] += 0.2
    proba[np.arange(len(y_pred)), y_pred] += 0.5
    return proba / proba.sum(axis=1, keepdims=True)


# Hand-checked case: 8 images, 2 errors (a Benign called Early, a Pre called Pro).
Y_TRUE = [0, 0, 0, 1, 1, 2, 2, 3]
Y_PRED = [0, 0, 1, 1, 1, 2, 3, 3]


def _provenance(source: str = "synthetic") -> DataProvenance:
    return DataProvenance("toy", source, "/data/toy", "ab" * 32, 100)


def _all_plain(value) -> bool:
    """True if ``value`` holds only JSON-native Python types (no numpy scalars)."""
    if isinstance(value, dict):
        return all(isinstance(key, str) and _all_plain(item) for key, item in value.items())
    if isinstance(value, list):
        return all(_all_plain(item) for item in value)
    return value is None or type(value) in (int, float, str, bool)


def test_metrics_match_hand_computed_values():
    metrics = classification_metrics(np.array(Y_TRUE), _proba(Y_PRED, Y_TRUE), CLASSES)

    assert metrics["n"] == 8
    assert metrics["accuracy"] == pytest.approx(6 / 8)
    # Recalls 2/3, 1, 1/2, 1; precisions 1, 2/3, 1, 1/2; F1s 0.8, 0.8, 2/3, 2/3.
    assert metrics["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 1 / 2 + 1) / 4)
    assert metrics["macro_precision"] == pytest.approx((1 + 2 / 3 + 1 + 1 / 2) / 4)
    assert metrics["macro_f1"] == pytest.approx((0.8 + 0.8 + 2 / 3 + 2 / 3) / 4)
    assert metrics["weighted_f1"] == pytest.approx(f1_score(Y_TRUE, Y_PRED, average="weighted"))
    assert metrics["per_class"]["Benign"] == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3, "roc_auc": 1.0}
    )
    assert metrics["confusion_matrix"] == {
        "labels": CLASSES,
        "matrix": [[2, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]],
    }


def test_roc_auc_matches_sklearn_one_vs_rest():
    rng = np.random.default_rng(0)
    y_true = np.tile(np.arange(4), 10)
    proba = rng.dirichlet(np.ones(4), size=len(y_true))

    metrics = classification_metrics(y_true, proba, CLASSES)

    expected = roc_auc_score(y_true, proba, multi_class="ovr", average="macro")
    assert metrics["roc_auc_ovr_macro"] == pytest.approx(expected)


def test_class_absent_from_y_true_keeps_its_row_and_has_no_auc():
    y_true = [0, 0, 1, 1, 2, 2]  # no Pro
    y_pred = [0, 3, 1, 1, 2, 2]  # but one image is called Pro
    proba = _proba(y_pred, y_true)

    metrics = classification_metrics(np.array(y_true), proba, CLASSES)

    pro = metrics["per_class"]["Pro"]
    assert pro["support"] == 0 and pro["roc_auc"] is None
    assert pro["precision"] == 0.0 and pro["recall"] == 0.0  # zero_division=0
    present_aucs = [roc_auc_score(np.array(y_true) == k, proba[:, k]) for k in range(3)]
    assert metrics["roc_auc_ovr_macro"] == pytest.approx(np.mean(present_aucs))
    assert metrics["confusion_matrix"]["matrix"][3] == [0, 0, 0, 0]
    assert [row[3] for row in metrics["confusion_matrix"]["matrix"]] == [1, 0, 0, 0]


def test_single_class_has_no_auc_at_all():
    metrics = classification_metrics(np.zeros(3, dtype=int), _proba([0, 0, 1], [0, 0, 0]), CLASSES)

    assert metrics["roc_auc_ovr_macro"] is None
    assert all(scores["roc_auc"] is None for scores in metrics["per_class"].values())


def test_perfect_predictions_score_one_everywhere():
    y_true = [0, 1, 2, 3, 0, 1, 2, 3]

    metrics = classification_metrics(np.array(y_true), _proba(y_true, y_true), CLASSES)

    for key in ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_f1"):
        assert metrics[key] == 1.0, key
    assert metrics["roc_auc_ovr_macro"] == 1.0
    assert all(scores["f1"] == 1.0 and scores["roc_auc"] == 1.0 for scores in metrics["per_class"].values())


def test_metrics_are_plain_json_values():
    metrics = classification_metrics(np.array([0, 1, 2, 2]), _proba([0, 1, 2, 3], [0, 1, 2, 2]), CLASSES)

    assert _all_plain(metrics)
    json.dumps(metrics, allow_nan=False)


@pytest.mark.parametrize(
    ("y_true", "proba_shape"),
    [([0, 1], (3, 4)), ([0, 1], (2, 3)), ([0, 4], (2, 4)), ([0.0, 1.0], (2, 4)), ([], (0, 4))],
    ids=["rows", "columns", "label-range", "float-labels", "empty"],
)
def test_inconsistent_inputs_are_refused(y_true, proba_shape):
    with pytest.raises(ValueError):
        classification_metrics(np.array(y_true), np.full(proba_shape, 0.25), CLASSES)


def test_confusion_matrix_png_with_an_empty_row(tmp_path):
    path = tmp_path / "cm.png"

    plot_confusion_matrix([[3, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 1, 4]], CLASSES, path, "toy")

    with Image.open(path) as image:
        assert image.format == "PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["cm.png"]  # no temporary file left behind


@pytest.mark.parametrize("source", ["synthetic", "folder"])
def test_write_evaluation_writes_four_files(tmp_path, source):
    out = tmp_path / "eval"
    relpaths = [f"Original/{CLASSES[label]}/{i}.jpg" for i, label in enumerate(Y_TRUE)]
    proba = _proba(Y_PRED, Y_TRUE)

    metrics = write_evaluation(
        out, np.array(Y_TRUE), proba, CLASSES, relpaths, _provenance(source), {"name": "toy"}, "toy, test split"
    )

    assert {path.name for path in out.iterdir()} == EVALUATION_FILES
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert "confusion_matrix" not in metrics
    assert metrics["data"] == _provenance(source).to_dict() and metrics["model"] == {"name": "toy"}
    assert metrics["accuracy"] == pytest.approx(6 / 8)

    confusion = json.loads((out / "confusion_matrix.json").read_text())
    assert confusion["labels"] == CLASSES and confusion["matrix"][0] == [2, 1, 0, 0]
    assert confusion["data"] == metrics["data"]
    assert confusion["title"].startswith("SYNTHETIC DATA") == (source == "synthetic")
    assert "toy, test split" in confusion["title"]

    with Image.open(out / "confusion_matrix.png") as image:
        image.verify()
        assert image.format == "PNG"

    predictions = pd.read_csv(out / "predictions.csv")
    assert list(predictions.columns) == ["relpath", "actual", "predicted", "confidence"] + [
        f"p_{name}" for name in CLASSES
    ]
    assert predictions["relpath"].tolist() == relpaths
    assert predictions["actual"].tolist() == [CLASSES[label] for label in Y_TRUE]
    assert predictions["predicted"].tolist() == [CLASSES[label] for label in Y_PRED]
    np.testing.assert_allclose(predictions["confidence"], proba.max(axis=1))
    np.testing.assert_allclose(predictions[[f"p_{name}" for name in CLASSES]], proba)


def test_write_evaluation_needs_one_relpath_per_image(tmp_path):
    with pytest.raises(ValueError, match="relpaths"):
        write_evaluation(
            tmp_path, np.array(Y_TRUE), _proba(Y_PRED, Y_TRUE), CLASSES, ["a.jpg"], _provenance(), {}, "toy"
        )
