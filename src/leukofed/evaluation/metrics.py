"""Classification metrics of a model on held-out images, and the artifacts the evaluate stage writes.

Every number comes from scikit-learn. This module fixes the label set to all configured classes, so
a class missing from a small test split still gets its row, and turns results into plain Python
values that serialise to JSON.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from leukofed.io import atomic_path, write_json
from leukofed.plotting import new_figure, save_png, wrap_title
from leukofed.provenance import DataProvenance

METRICS_FILE = "metrics.json"
CONFUSION_JSON_FILE = "confusion_matrix.json"
CONFUSION_PNG_FILE = "confusion_matrix.png"
PREDICTIONS_FILE = "predictions.csv"



def classification_metrics(y_true: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, balanced accuracy, precision/recall/F1, one-vs-rest ROC-AUC and the confusion matrix.

    Parameters
    ----------
    y_true : ndarray of shape (n_samples,)
        True labels as indices into ``classes``.
    proba : ndarray of shape (n_samples, n_classes)
        Predicted class probabilities; the prediction is the arg-max of each row.
    classes : list of str
        Class names, in label order.

    Returns
    -------
    dict
        ``n``, ``accuracy``, ``balanced_accuracy``, ``macro_precision``, ``macro_recall``,
        ``macro_f1``, ``weighted_f1``, ``roc_auc_ovr_macro``, ``per_class`` (name -> ``precision``,
        ``recall``, ``f1``, ``support``, ``roc_auc``) and ``confusion_matrix`` (``labels``,
        ``matrix``; rows are true classes). Plain floats and ints only.

    Notes
    -----
    Every class counts, present or not: an undefined precision or recall is 0 (``zero_division=0``),
    so a class absent from ``y_true`` lowers the macro averages. ``balanced_accuracy`` follows
    scikit-learn and averages recall over the classes present in ``y_true`` only. A class's ROC-AUC
    needs both positives and negatives, so it is None for a class absent from (or alone in)
    ``y_true``; ``roc_auc_ovr_macro`` averages the defined ones, or is None if there are none.
    """
    y_true, proba = _checked(y_true, proba, classes)
    labels = list(range(len(classes)))
    y_pred = proba.argmax(axis=1)

    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    macro_precision, macro_recall, macro_f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="macro", zero_division=0
    )
    aucs = [_one_vs_rest_auc(y_true == label, proba[:, label]) for label in labels]
    defined_aucs = [auc for auc in aucs if auc is not None]

    with warnings.catch_warnings():
        # A predicted class absent from y_true is expected on small splits and shows as support 0.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true", category=UserWarning)
        balanced_accuracy = balanced_accuracy_score(y_true, y_pred)

    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy),
        "macro_precision": float(macro_precision),
        "macro_recall": float(macro_recall),
        "macro_f1": float(macro_f1),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "roc_auc_ovr_macro": float(np.mean(defined_aucs)) if defined_aucs else None,
        "per_class": {
            name: {
                "precision": float(precision[label]),
                "recall": float(recall[label]),
                "f1": float(f1[label]),
                "support": int(support[label]),
                "roc_auc": aucs[label],
            }
            for label, name in enumerate(classes)
        },
        "confusion_matrix": {
            "labels": list(classes),
            "matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        },
    }


def _checked(y_true: np.ndarray, proba: np.ndarray, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``y_true`` and ``proba`` as arrays, after checking they fit each other and ``classes``."""
    y_true = np.asarray(y_true)
    proba = np.asarray(proba, dtype=float)
    if y_true.ndim != 1 or len(y_true) == 0:
        raise ValueError(f"y_true must be a non-empty 1-D array of class indices, got shape {y_true.shape}")
    if proba.shape != (len(y_true), len(classes)):
        raise ValueError(
            f"proba has shape {proba.shape}; expected (n_samples, n_classes) = ({len(y_true)}, {len(classes)})"
        )
    if not np.issubdtype(y_true.dtype, np.integer) or y_true.min() < 0 or y_true.max() >= len(classes):
        raise ValueError(f"y_true must hold integer class indices in [0, {len(classes)})")
    return y_true, proba


def _one_vs_rest_auc(is_class: np.ndarray, score: np.ndarray) -> float | None:
    """ROC-AUC of one class against the rest, or None when ``is_class`` lacks positives or negatives."""
    if is_class.all() or not is_class.any():
        return None
    return float(roc_auc_score(is_class, score))


def plot_confusion_matrix(matrix: list[list[int]], classes: list[str], path: Path, title: str) -> None:
    """Save a confusion-matrix heat map as PNG, atomically.

    Parameters
    ----------
    matrix : list of list of int
        Counts; rows are true classes, columns predicted classes, both in ``classes`` order.
    classes : list of str
        Class names.
    path : Path
        Where the PNG goes.
    title : str
        Figure title (say there if the data is synthetic).

    Notes
    -----
    Cells show the count and its share of the true class (row); the colour is that share, so a
    large class does not drown out the errors of a small one.
    """
    # Draw on an explicit Agg canvas: no display needed, and pyplot's global backend is left alone.

    counts = np.asarray(matrix, dtype=int)
    n_classes = len(classes)
    if counts.shape != (n_classes, n_classes):
        raise ValueError(f"confusion matrix has shape {counts.shape}; expected ({n_classes}, {n_classes})")
    row_totals = counts.sum(axis=1, keepdims=True)
    # A class absent from the data has an all-zero row: show 0% instead of dividing by zero.
    shares = np.divide(counts, row_totals, out=np.zeros(counts.shape), where=row_totals > 0)

    side = 2.5 + 0.9 * n_classes  # inches: room for the cell text and the tick labels
    width = side + 1.0  # and the colour bar
    figure = new_figure(width, side)
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, label="Share of the true class")
    axes.set(
        xticks=range(n_classes),
        yticks=range(n_classes),
        xticklabels=classes,
        yticklabels=classes,
        xlabel="Predicted class",
        ylabel="True class",
    )
    axes.set_title(wrap_title(title, width), fontsize="medium")
    for row, column in np.ndindex(counts.shape):
        share = shares[row, column]
        axes.text(
            column,
            row,
            f"{counts[row, column]}\n{100 * share:.1f}%",
            ha="center",
            va="center",
            color="white" if share > 0.5 else "black",  # legible on dark and light cells
        )
    save_png(figure, path)


def write_evaluation(
    out_dir: Path,
    y_true: np.ndarray,
    proba: np.ndarray,
    classes: list[str],
    relpaths: list[str],
    provenance: DataProvenance,
    model_info: dict,
    title: str,
) -> dict:
    """Write a model's evaluation on one split into ``out_dir``, each file atomically.

    Parameters
    ----------
    out_dir : Path
        Destination folder (created if missing).
    y_true, proba, classes
        As for :func:`classification_metrics`.
    relpaths : list of str
        The image of each row, relative to the dataset root.
    provenance : DataProvenance
        The data the model was evaluated on; recorded in every file.
    model_info : dict
        What produced the predictions (JSON-serialisable), e.g. ``{"name": ..., "params": {...}}``.
    title : str
        What was evaluated, e.g. ``"centralized, test split"``; the figure and JSON title is
        ``provenance.title(title)``, which starts with SYNTHETIC DATA for synthetic data.

    Returns
    -------
    dict
        The content of ``metrics.json``: the :func:`classification_metrics` result without the
        confusion matrix, plus ``data`` (the provenance) and ``model`` (``model_info``).

    Notes
    -----
    Files: ``metrics.json`` (DVC metrics), ``confusion_matrix.json`` (``labels``, ``matrix``,
    ``title``, ``data``), ``confusion_matrix.png`` and ``predictions.csv`` (``relpath``, ``actual``,
    ``predicted``, ``confidence``, then ``p_<class>`` per class; DVC's confusion plot reads
    ``actual`` and ``predicted``).
    """
    if len(relpaths) != len(y_true):
        raise ValueError(f"{len(relpaths)} relpaths for {len(y_true)} labels; expected one per image")
    out_dir = Path(out_dir)
    scores = classification_metrics(y_true, proba, classes)
    confusion = scores.pop("confusion_matrix")
    data = provenance.to_dict()
    full_title = provenance.title(title)

    write_json(out_dir / CONFUSION_JSON_FILE, {**confusion, "title": full_title, "data": data})
    plot_confusion_matrix(confusion["matrix"], classes, out_dir / CONFUSION_PNG_FILE, full_title)
    _write_predictions(out_dir / PREDICTIONS_FILE, np.asarray(y_true), np.asarray(proba), classes, relpaths)
    # Last, so a metrics.json (what the report looks for) implies the other files are complete.
    metrics = {**scores, "data": data, "model": model_info}
    write_json(out_dir / METRICS_FILE, metrics)
    return metrics


def _write_predictions(
    path: Path, y_true: np.ndarray, proba: np.ndarray, classes: list[str], relpaths: list[str]
) -> None:
    """One CSV row per image: its true and predicted class, the confidence and every class probability."""
    names = np.asarray(classes)
    table = pd.DataFrame(
        {
            "relpath": relpaths,
            "actual": names[y_true],
            "predicted": names[proba.argmax(axis=1)],
            "confidence": proba.max(axis=1),
        }
    )
    for label, name in enumerate(classes):
        table[f"p_{name}"] = proba[:, label]
    with atomic_path(path, suffix=".csv") as tmp:
        table.to_csv(tmp, index=False)
