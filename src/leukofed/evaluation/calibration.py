"""How far a model's probabilities can be trusted: reliability, ECE/MCE, Brier, NLL and temperature scaling.

Definitions (``B`` equal-width bins over [0, 1], ``analysis.ece_bins``; binning as scikit-learn's
``calibration_curve(strategy="uniform")``, so a score on an inner edge falls in the lower bin):

- **ECE** = sum over bins of ``n_b / n * |accuracy_b - confidence_b|``; **MCE** = the largest
  ``|accuracy_b - confidence_b|`` over non-empty bins. Overall they use the top-label confidence
  (max probability) and whether the prediction is right; per class, one-vs-rest, the class's
  probability and whether the image is of that class.
- **Brier** (multiclass) = mean over images of ``sum_k (p_k - y_k)^2`` (0 best, 2 worst); per class the
  one-vs-rest ``mean (p_k - y_k)^2`` (scikit-learn's ``brier_score_loss``), so the per-class scores sum
  to the overall one. **NLL** = scikit-learn's ``log_loss``.

**Temperature scaling** (Guo et al., 2017) divides the logits by one scalar ``T`` fitted by minimising
the NLL on validation data; it never changes a prediction, only its confidence. ``T`` is searched on
``log T`` (bounded by ``analysis.temperature_bounds``), where over- and under-confidence are symmetric.

**Federated models** are calibrated without pooling site data: the server searches ``T`` to minimise
the sum of the sites' NLLs; for each candidate ``T`` it proposes, every site answers with one number,
its summed NLL on its local validation part. The optimum is the one pooled validation data would give,
and a site whose validation part has no error (its own fit would run into the lower bound) cannot drag
the federation there. Each site's own fit is reported beside it as a heterogeneity diagnostic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, log_loss

from leukofed.io import write_json
from leukofed.plotting import new_figure, save_png, wrap_title
from leukofed.provenance import DataProvenance

CALIBRATION_FILE = "calibration.json"
RELIABILITY_PNG_FILE = "reliability.png"
CONFIDENCE_PNG_FILE = "confidence.png"

_BOUND_TOLERANCE = 1e-3  # in log T: the bounded search ends within ~1e-5 of a bound it runs into


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax of ``logits / temperature`` in float64 (rows sum to 1 within rounding)."""
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def _bin_index(scores: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each score in [0, 1]: scikit-learn's ``calibration_curve`` uniform binning."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], scores)


def reliability_bins(scores: np.ndarray, hits: np.ndarray, n_bins: int) -> dict:
    """Count, mean score and hit rate of each of ``n_bins`` equal-width score bins.

    Parameters
    ----------
    scores : ndarray of shape (n_samples,)
        Predicted probabilities in [0, 1] (the top-label confidence, or one class's probability).
    hits : ndarray of shape (n_samples,)
        Whether each prediction came true (1/0 or bool).
    n_bins : int

    Returns
    -------
    dict
        ``edges`` (``n_bins + 1`` floats), and per bin ``count``, ``confidence`` (mean score) and
        ``accuracy`` (hit rate); the last two are None for an empty bin.
    """
    scores, hits = np.asarray(scores, dtype=float), np.asarray(hits, dtype=float)
    index = _bin_index(scores, n_bins)
    count = np.bincount(index, minlength=n_bins)
    score_sum = np.bincount(index, weights=scores, minlength=n_bins)
    hit_sum = np.bincount(index, weights=hits, minlength=n_bins)

    def _mean(sums: np.ndarray) -> list[float | None]:
        return [float(total / n) if n else None for total, n in zip(sums, count, strict=True)]

    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "count": count.tolist(),
        "confidence": _mean(score_sum),
        "accuracy": _mean(hit_sum),
    }


def calibration_errors(scores: np.ndarray, hits: np.ndarray, n_bins: int) -> tuple[float, float]:
    """(ECE, MCE) of ``scores`` against ``hits`` over ``n_bins`` equal-width bins (see the module notes)."""
    bins = reliability_bins(scores, hits, n_bins)
    gaps = [(n, abs(acc - conf)) for n, acc, conf in zip(bins["count"], bins["accuracy"], bins["confidence"], strict=True) if n]
    ece = sum(n * gap for n, gap in gaps) / len(np.asarray(scores))
    return float(ece), float(max(gap for _, gap in gaps))


def calibration_metrics(y_true: np.ndarray, proba: np.ndarray, classes: list[str], n_bins: int) -> dict:
    """ECE, MCE, Brier score and NLL, overall and per class (one-vs-rest).

    Parameters
    ----------
    y_true : ndarray of shape (n_samples,)
        Class indices into ``classes``.
    proba : ndarray of shape (n_samples, n_classes)
        Predicted probabilities (rows sum to 1).
    classes : list of str
    n_bins : int
        ``analysis.ece_bins``.

    Returns
    -------
    dict
        ``overall`` (``ece``, ``mce``, ``brier``, ``nll``) and ``per_class`` (name -> ``ece``, ``mce``,
        ``brier``), plain floats.
    """
    y_true, proba = np.asarray(y_true), np.asarray(proba, dtype=float)
    labels = list(range(len(classes)))
    ece, mce = calibration_errors(proba.max(axis=1), proba.argmax(axis=1) == y_true, n_bins)
    per_class = {}
    for label, name in enumerate(classes):
        is_class = y_true == label
        class_ece, class_mce = calibration_errors(proba[:, label], is_class, n_bins)
        per_class[name] = {
            "ece": class_ece,
            "mce": class_mce,
            "brier": float(brier_score_loss(is_class, proba[:, label], pos_label=True)),
        }
    return {
        "overall": {
            "ece": ece,
            "mce": mce,
            "brier": float(brier_score_loss(y_true, proba, labels=labels)),
            "nll": float(log_loss(y_true, proba, labels=labels)),
        },
        "per_class": per_class,
    }


def confidence_histograms(y_true: np.ndarray, proba: np.ndarray, n_bins: int) -> dict:
    """Counts of top-label confidences of correct and of incorrect predictions per confidence bin.

    Returns
    -------
    dict
        ``edges`` and ``correct``, ``incorrect`` (``n_bins`` counts each), binned as :func:`reliability_bins`.
    """
    proba = np.asarray(proba, dtype=float)
    confidence, correct = proba.max(axis=1), proba.argmax(axis=1) == np.asarray(y_true)
    index = _bin_index(confidence, n_bins)
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "correct": np.bincount(index[correct], minlength=n_bins).tolist(),
        "incorrect": np.bincount(index[~correct], minlength=n_bins).tolist(),
    }


def _nll_sum(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Summed negative log-likelihood of ``labels`` under ``softmax(logits / temperature)`` (exact log-softmax)."""
    log_proba = log_softmax(logits / temperature, axis=1)
    return float(-log_proba[np.arange(len(labels)), labels].sum())


def _minimise_over_log_t(nll_sum, bounds: list[float]) -> float:
    """The ``T`` in ``bounds`` minimising ``nll_sum(T)``, searched on ``log T``."""
    result = minimize_scalar(lambda log_t: nll_sum(float(np.exp(log_t))), bounds=tuple(np.log(bounds)), method="bounded")
    return float(np.exp(result.x))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: list[float]) -> float:
    """The temperature that minimises the NLL of ``labels`` under ``softmax(logits / T)``.

    Parameters
    ----------
    logits : ndarray of shape (n_samples, n_classes)
        Validation logits (any per-row shift, e.g. log-probabilities, gives the same ``T``).
    labels : ndarray of shape (n_samples,)
        Class indices.
    bounds : [low, high]
        Search range of ``T`` (``analysis.temperature_bounds``); the search runs on ``log T``.

    Returns
    -------
    float
        ``T > 1`` softens over-confident predictions, ``T < 1`` sharpens under-confident ones.
    """
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if len(labels) == 0 or logits.shape[0] != len(labels):
        raise ValueError(f"need one label per logit row and at least one row, got {logits.shape} and {labels.shape}")
    return _minimise_over_log_t(lambda t: _nll_sum(logits, labels, t), bounds)


def _at_bound(temperature: float, bounds: list[float]) -> bool:
    """Whether the fit stopped at a bound of the search, i.e. the NLL kept falling beyond it."""
    return bool(np.isclose(np.log(temperature), np.log(bounds), atol=_BOUND_TOLERANCE).any())


def _applied(fitted: float, bounds: list[float]) -> dict:
    """The temperature to apply: the fit, or 1 (no scaling) when the fit ran into a bound.

    A fit at a bound means the NLL keeps falling beyond it: validation data without a single error
    always prefer sharper probabilities (``T -> 0``). The optimum is then not identifiable from
    these data, and applying the arbitrary bound would only make test probabilities over-confident.
    """
    at_bound = _at_bound(fitted, bounds)
    return {"temperature": 1.0 if at_bound else fitted, "fitted_temperature": fitted, "at_bound": at_bound}


def temperature_record(logits: np.ndarray, labels: np.ndarray, bounds: list[float]) -> dict:
    """``n_val`` and the :func:`_applied` temperature (``temperature``, ``fitted_temperature``, ``at_bound``)."""
    return {"n_val": len(labels), **_applied(fit_temperature(logits, labels, bounds), bounds)}


def federated_temperature(site_logits: dict[int, tuple[np.ndarray, np.ndarray]], bounds: list[float]) -> dict:
    """Fit one temperature for all sites without pooling data: minimise the sum of the sites' NLLs.

    Parameters
    ----------
    site_logits : dict
        Site number -> (validation logits, labels) of that site.
    bounds : [low, high]
        As for :func:`fit_temperature`.

    Returns
    -------
    dict
        ``temperature`` (the :func:`_applied` federated fit), ``fitted_temperature``, ``at_bound``, ``n_val`` (total) and ``sites`` (list of
        ``site`` with its own :func:`temperature_record`, a diagnostic). What leaves a site is one
        summed NLL per candidate temperature, never a logit or a label.
    """
    validation = [(np.asarray(logits, dtype=np.float64), np.asarray(labels)) for logits, labels in site_logits.values()]
    fitted = _minimise_over_log_t(lambda t: sum(_nll_sum(logits, labels, t) for logits, labels in validation), bounds)
    sites = [{"site": int(site), **temperature_record(logits, labels, bounds)}
             for site, (logits, labels) in sorted(site_logits.items())]
    return {**_applied(fitted, bounds), "n_val": sum(s["n_val"] for s in sites), "sites": sites}


def plot_reliability(y_true: np.ndarray, before: np.ndarray, after: np.ndarray, classes: list[str],
                     n_bins: int, path: Path, title: str) -> None:
    """Reliability diagrams (top-label, before and after temperature scaling) and per-class curves, as PNG.

    Parameters
    ----------
    y_true : ndarray of shape (n_samples,)
    before, after : ndarray of shape (n_samples, n_classes)
        Probabilities without and with temperature scaling.
    classes : list of str
    n_bins : int
    path : Path
        Where the PNG goes (written atomically).
    title : str
    """

    y_true = np.asarray(y_true)
    figure = new_figure(15, 5)
    top_label, per_class = figure.subplots(1, 2, width_ratios=(1, 1))
    width = 1.0 / n_bins
    for proba, label, colour, offset in ((before, "before scaling", "tab:blue", 0.0), (after, "after scaling", "tab:orange", 0.5)):
        bins = reliability_bins(proba.max(axis=1), proba.argmax(axis=1) == y_true, n_bins)
        lefts = np.asarray(bins["edges"][:-1])
        accuracy = np.array([np.nan if a is None else a for a in bins["accuracy"]])
        ece, _ = calibration_errors(proba.max(axis=1), proba.argmax(axis=1) == y_true, n_bins)
        top_label.bar(lefts + offset * width, accuracy, width=width / 2, align="edge", color=colour,
                      label=f"{label} (ECE {ece:.3f})")
    top_label.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    top_label.set(xlim=(0, 1), ylim=(0, 1), xlabel="Confidence (top-label probability)",
                  ylabel="Accuracy in the bin", title="Top label, test split")
    top_label.legend(loc="upper left")
    for label, name in enumerate(classes):
        fraction, mean_score = calibration_curve(y_true == label, before[:, label], n_bins=n_bins, strategy="uniform")
        per_class.plot(mean_score, fraction, marker="o", label=name)
    per_class.plot([0, 1], [0, 1], color="grey", linestyle="--")
    per_class.set(xlim=(0, 1), ylim=(0, 1), xlabel="Predicted probability of the class",
                  ylabel="Share of images of the class", title="Per class (one-vs-rest), before scaling")
    per_class.legend(loc="upper left")
    _save(figure, path, title)


def plot_confidence(y_true: np.ndarray, before: np.ndarray, after: np.ndarray, n_bins: int, path: Path, title: str) -> None:
    """Histograms of the confidence of correct and of incorrect predictions, before and after scaling, as PNG."""

    figure = new_figure(12, 4.5)
    for axes, proba, when in zip(figure.subplots(1, 2, sharey=True), (before, after), ("before", "after"), strict=True):
        histograms = confidence_histograms(y_true, proba, n_bins)
        lefts, width = np.asarray(histograms["edges"][:-1]), 1.0 / n_bins
        for key, colour in (("correct", "tab:green"), ("incorrect", "tab:red")):
            counts = np.asarray(histograms[key])
            # Shares within each group: errors are few, and raw counts would hide their distribution.
            shares = counts / counts.sum() if counts.sum() else counts
            axes.bar(lefts, shares, width=width, align="edge", color=colour, alpha=0.6, label=f"{key} (n = {counts.sum()})")
        axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="Confidence (top-label probability)",
                 ylabel="Share of the group's test images", title=f"{when} temperature scaling")
        axes.legend(loc="upper left")
    _save(figure, path, title)


def _save(figure, path: Path, title: str) -> None:
    width = figure.get_figwidth()
    figure.suptitle(wrap_title(title, width), fontsize="medium")
    save_png(figure, path)


def write_calibration(
    out_dir: Path,
    y_true: np.ndarray,
    logits: np.ndarray,
    fit: dict,
    classes: list[str],
    n_bins: int,
    provenance: DataProvenance,
    model_info: dict,
) -> dict:
    """Write ``calibration.json``, ``reliability.png`` and ``confidence.png`` for one model's test logits.

    Parameters
    ----------
    out_dir : Path
    y_true : ndarray of shape (n_samples,)
        Test labels.
    logits : ndarray of shape (n_samples, n_classes)
        Test logits.
    fit : dict
        How the temperature was fitted: at least ``temperature``; e.g. :func:`federated_temperature`'s
        result plus a ``scheme`` name.
    classes : list of str
    n_bins : int
    provenance : DataProvenance
        The test data; recorded as ``data``.
    model_info : dict
        What was calibrated (name, path).

    Returns
    -------
    dict
        The content of ``calibration.json``: ``overall`` and ``per_class`` (before scaling),
        ``temperature``, ``after_scaling`` (``overall`` keys plus ``per_class``), ``bins``,
        ``temperature_fit`` (``fit``), ``reliability`` (:func:`reliability_bins` of the top label,
        ``before`` and ``after``), ``confidence_histograms`` (``before``, ``after``), ``n_test``,
        ``model`` and ``data``.
    """
    out_dir = Path(out_dir)
    temperature = fit["temperature"]
    before, after = probabilities(logits), probabilities(logits, temperature)
    scores_before = calibration_metrics(y_true, before, classes, n_bins)
    scores_after = calibration_metrics(y_true, after, classes, n_bins)
    title = provenance.title(f"{model_info['name']} — calibration on the test split, T = {temperature:.3f}")
    plot_reliability(y_true, before, after, classes, n_bins, out_dir / RELIABILITY_PNG_FILE, title)
    plot_confidence(y_true, before, after, n_bins, out_dir / CONFIDENCE_PNG_FILE, title)

    def _top_label(proba: np.ndarray) -> dict:
        return reliability_bins(proba.max(axis=1), proba.argmax(axis=1) == np.asarray(y_true), n_bins)

    record = {
        **scores_before,
        "temperature": temperature,
        "after_scaling": {**scores_after["overall"], "per_class": scores_after["per_class"]},
        "bins": n_bins,
        "temperature_fit": fit,
        "reliability": {"before": _top_label(before), "after": _top_label(after)},
        "confidence_histograms": {"before": confidence_histograms(y_true, before, n_bins),
                                  "after": confidence_histograms(y_true, after, n_bins)},
        "n_test": len(y_true),
        "model": model_info,
        "data": provenance.to_dict(),
    }
    write_json(out_dir / CALIBRATION_FILE, record)  # last: its presence implies the figures are complete
    return record
