"""Shortcut audit: how much of the task trivial image cues explain.

A standardised logistic regression (scikit-learn) is fitted on the train split and scored on the test
split of the same cache, on two feature sets that say nothing about the cell:

- **border colour**: mean and standard deviation of each RGB channel over a band of
  ``analysis.audit.border_width`` pixels along the image's edges (the background: stain, illumination,
  camera white balance), 6 features;
- **corner patch**: the ``corner_size`` x ``corner_size`` pixels of one corner (``corner``: where the
  scale bar is), block-averaged to ``corner_grid`` x ``corner_grid`` pixels, 3 x ``corner_grid``^2 features.

A majority-class baseline (scikit-learn's ``DummyClassifier``) gives chance level beside them. If a
linear model on such cues comes close to the CNN, the CNN's accuracy alone says little about what it
has learned about leukocytes.
"""

from __future__ import annotations

import numpy as np
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from leukofed.config import AuditParams
from leukofed.errors import ConfigError


def border_features(images: np.ndarray, width: int) -> np.ndarray:
    """Mean and standard deviation of each RGB channel over the border band of every image.

    Parameters
    ----------
    images : ndarray of shape (n, S, S, 3), dtype uint8
    width : int
        Band width in pixels (``analysis.audit.border_width``), less than half the side.

    Returns
    -------
    ndarray of shape (n, 6)
        ``[mean_R, mean_G, mean_B, std_R, std_G, std_B]`` in 0..255 units.
    """
    side = min(images.shape[1:3])
    if not 0 < 2 * width < side:
        raise ConfigError(
            f"analysis.audit.border_width={width} leaves no interior in {side} px images; use less than {side // 2}"
        )
    band = np.ones(images.shape[1:3], dtype=bool)
    band[width:-width, width:-width] = False
    pixels = np.asarray(images)[:, band, :].astype(np.float64)  # (n, band pixels, 3)
    return np.concatenate([pixels.mean(axis=1), pixels.std(axis=1)], axis=1)


def corner_features(images: np.ndarray, corner: str, size: int, grid: int) -> np.ndarray:
    """One corner's ``size`` x ``size`` patch of every image, block-averaged to ``grid`` x ``grid`` pixels.

    Parameters
    ----------
    images : ndarray of shape (n, S, S, 3), dtype uint8
    corner : {"top-left", "top-right", "bottom-left", "bottom-right"}
    size : int
        Patch side in pixels (``analysis.audit.corner_size``), at most the image side.
    grid : int
        Output side (``analysis.audit.corner_grid``), a divisor of ``size``.

    Returns
    -------
    ndarray of shape (n, grid * grid * 3)
    """
    height, width = images.shape[1:3]
    if size > min(height, width):
        raise ConfigError(f"analysis.audit.corner_size={size} exceeds the {height}x{width} px cached images; make it smaller")
    vertical, horizontal = corner.split("-")
    rows = slice(0, size) if vertical == "top" else slice(height - size, height)
    cols = slice(0, size) if horizontal == "left" else slice(width - size, width)
    patch = np.asarray(images)[:, rows, cols, :].astype(np.float64)
    block = size // grid
    blocks = patch.reshape(len(patch), grid, block, grid, block, 3).mean(axis=(2, 4))
    return blocks.reshape(len(patch), -1)


def _scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    return {"accuracy": float(accuracy_score(y_true, y_pred)), "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred))}


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, max_iter: int) -> dict:
    """Accuracy and balanced accuracy on the test set of a standardised logistic regression fitted on the train set."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    model.fit(train_x, train_y)
    return _scores(test_y, model.predict(test_x))


def shortcut_audit(images: np.ndarray, labels: np.ndarray, train_rows: np.ndarray, test_rows: np.ndarray,
                   params: AuditParams) -> dict:
    """Fit and score the linear shortcut models on every feature set.

    Parameters
    ----------
    images : ndarray of shape (N, S, S, 3), dtype uint8
        The cached images (a memory map is fine: only the rows used are read).
    labels : ndarray of shape (N,)
        Class index of every image.
    train_rows, test_rows : ndarray of int
        Rows of the train and test splits.
    params : AuditParams

    Returns
    -------
    dict
        ``border_colour``, ``corner_patch`` and ``majority_class`` (each ``accuracy``,
        ``balanced_accuracy``), ``features`` (set -> description and count), ``n_train``, ``n_test``.
    """
    labels = np.asarray(labels)
    train_images, test_images = np.asarray(images[train_rows]), np.asarray(images[test_rows])
    train_y, test_y = labels[train_rows], labels[test_rows]
    extractors = {
        "border_colour": lambda batch: border_features(batch, params.border_width),
        "corner_patch": lambda batch: corner_features(batch, params.corner, params.corner_size, params.corner_grid),
    }
    result, features = {}, {}
    for name, extract in extractors.items():
        train_x, test_x = extract(train_images), extract(test_images)
        result[name] = linear_probe(train_x, train_y, test_x, test_y, params.max_iter)
        features[name] = {"count": int(train_x.shape[1]), "description": _describe(name, params)}
    majority = DummyClassifier(strategy="most_frequent").fit(np.zeros((len(train_y), 1)), train_y)
    result["majority_class"] = _scores(test_y, majority.predict(np.zeros((len(test_y), 1))))
    return {**result, "features": features, "n_train": len(train_y), "n_test": len(test_y)}


def _describe(name: str, params: AuditParams) -> str:
    if name == "border_colour":
        return f"mean and std of each RGB channel over a {params.border_width} px border band"
    return (f"{params.corner} {params.corner_size}x{params.corner_size} px patch, block-averaged to "
            f"{params.corner_grid}x{params.corner_grid} RGB pixels")
