"""How sure to be of each number: bootstrap confidence intervals and McNemar's test between models.

- **Bootstrap CIs** (``scipy.stats.bootstrap``, percentile method): the test images are resampled with
  replacement ``analysis.bootstrap.n_resamples`` times from a generator seeded by
  ``analysis.bootstrap.seed``; the interval holds the central ``confidence`` share of the metric's
  resampled values. Labels and predictions are resampled together (paired). Accuracy is the mean of
  the per-image hits (vectorised); balanced accuracy and macro-F1 are scikit-learn's, per resample.
  The interval describes test-set sampling only, not training randomness.
- **McNemar's test** compares two models on the same test images through the discordant pairs only:
  ``b`` images that model A gets right and B wrong, ``c`` the reverse. Under the null hypothesis of
  equal accuracy each discordant image is a fair coin, so the exact p-value is the two-sided binomial
  test of ``b`` successes in ``b + c`` trials (``scipy.stats.binomtest``), and ``statistic`` is
  ``min(b, c)`` (statsmodels' convention for the exact test). The mid-p value (Fagerland et al., 2013)
  subtracts the probability of the observed count once, and is less conservative on few discordant pairs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from scipy.stats import DegenerateDataWarning, binom, binomtest, bootstrap
from sklearn.metrics import balanced_accuracy_score, f1_score

from leukofed.config import BootstrapParams

METRIC_NAMES = ("accuracy", "balanced_accuracy", "macro_f1")


def bootstrap_ci(
    data: tuple[np.ndarray, ...],
    statistic: Callable[..., float],
    params: BootstrapParams,
    *,
    vectorized: bool = False,
) -> dict:
    """Point estimate and percentile bootstrap confidence interval of ``statistic(*data)``.

    Parameters
    ----------
    data : tuple of ndarray
        Equal-length samples, resampled together (one row = one test image).
    statistic : callable
        ``statistic(*data)`` -> float; with ``vectorized``, it also takes ``axis`` and reduces along it.
    params : BootstrapParams
        ``n_resamples``, ``confidence`` and ``seed``.
    vectorized : bool
        Whether ``statistic`` handles a batch of resamples at once (much faster).

    Returns
    -------
    dict
        ``estimate`` (on the full data), ``low``, ``high`` (plain floats).
    """
    estimate = statistic(*data, axis=-1) if vectorized else statistic(*data)
    with warnings.catch_warnings():
        # All resamples equal (e.g. a perfect model): the percentile interval is that value, which is right.
        warnings.filterwarnings("ignore", category=DegenerateDataWarning)
        result = bootstrap(
            data, statistic, n_resamples=params.n_resamples, confidence_level=params.confidence,
            method="percentile", paired=True, vectorized=vectorized, rng=np.random.default_rng(params.seed),
        )
    interval = result.confidence_interval
    return {"estimate": float(estimate), "low": float(interval.low), "high": float(interval.high)}


def _accuracy(hits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Share of correct predictions along ``axis`` (= scikit-learn's ``accuracy_score``), vectorised."""
    return np.mean(hits, axis=axis)


def _metric_functions(n_classes: int) -> dict[str, Callable[[np.ndarray, np.ndarray], float]]:
    labels = list(range(n_classes))

    def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        with warnings.catch_warnings():
            # A resample may lack a class that is predicted: expected, it shows as that class missing.
            warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true", category=UserWarning)
            return balanced_accuracy_score(y_true, y_pred)

    def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        # Every class counts, as in leukofed.evaluation.metrics: undefined scores are 0.
        return f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)

    return {"balanced_accuracy": balanced_accuracy, "macro_f1": macro_f1}


def bootstrap_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, params: BootstrapParams) -> dict:
    """Bootstrap CIs of accuracy, balanced accuracy and macro-F1 of one model's test predictions.

    Parameters
    ----------
    y_true, y_pred : ndarray of shape (n_samples,)
        Class indices.
    n_classes : int
        Number of classes (macro-F1 averages over all of them).
    params : BootstrapParams

    Returns
    -------
    dict
        Metric name (:data:`METRIC_NAMES`) -> ``estimate``, ``low``, ``high``.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or len(y_true) == 0:
        raise ValueError(f"y_true and y_pred must be non-empty 1-D arrays of equal length, got {y_true.shape} and {y_pred.shape}")
    result = {"accuracy": bootstrap_ci(((y_true == y_pred).astype(float),), _accuracy, params, vectorized=True)}
    for name, function in _metric_functions(n_classes).items():
        result[name] = bootstrap_ci((y_true, y_pred), function, params)
    return result


def mcnemar_test(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """McNemar's exact test (and mid-p) of two models' correctness on the same images.

    Parameters
    ----------
    correct_a, correct_b : ndarray of shape (n_samples,), bool
        Whether model A / model B classified each image correctly.

    Returns
    -------
    dict
        ``b`` (A right, B wrong), ``c`` (A wrong, B right), ``statistic`` (``min(b, c)``),
        ``p_value`` (exact, two-sided) and ``mid_p_value``; both p-values are 1 without discordant pairs.
    """
    correct_a, correct_b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if correct_a.shape != correct_b.shape:
        raise ValueError(f"both models must be scored on the same images, got {correct_a.shape} and {correct_b.shape}")
    b, c = int(np.sum(correct_a & ~correct_b)), int(np.sum(~correct_a & correct_b))
    smaller, discordant = min(b, c), b + c
    if discordant == 0:
        return {"b": 0, "c": 0, "statistic": 0, "p_value": 1.0, "mid_p_value": 1.0}
    exact = binomtest(smaller, discordant, 0.5).pvalue
    mid_p = 2 * binom.cdf(smaller, discordant, 0.5) - binom.pmf(smaller, discordant, 0.5)
    return {"b": b, "c": c, "statistic": smaller, "p_value": float(exact), "mid_p_value": float(min(1.0, mid_p))}


def compare_models(
    predictions: dict[str, np.ndarray], y_true: np.ndarray, reference: str, n_classes: int, params: BootstrapParams
) -> dict:
    """Bootstrap CIs for every model and McNemar's test of the reference against each other model.

    Parameters
    ----------
    predictions : dict
        Model name -> predicted class indices on the same test images (same order as ``y_true``).
    y_true : ndarray of shape (n_samples,)
    reference : str
        The model every other one is tested against (the centralized baseline).
    n_classes : int
    params : BootstrapParams

    Returns
    -------
    dict
        ``models`` (name -> :func:`bootstrap_metrics`), ``mcnemar`` (other model -> :func:`mcnemar_test`
        with A = ``reference``), ``reference``, ``n_test``, ``n_resamples``, ``confidence``, ``seed``.
    """
    if reference not in predictions:
        raise ValueError(f"reference model '{reference}' has no predictions (models: {sorted(predictions)})")
    y_true = np.asarray(y_true)
    correct = {name: np.asarray(pred) == y_true for name, pred in predictions.items()}
    return {
        "models": {name: bootstrap_metrics(y_true, pred, n_classes, params) for name, pred in predictions.items()},
        "mcnemar": {name: mcnemar_test(correct[reference], hits) for name, hits in correct.items() if name != reference},
        "reference": reference,
        "n_test": len(y_true),
        "n_resamples": params.n_resamples,
        "confidence": params.confidence,
        "seed": params.seed,
    }
