"""The results report: ``README.md``, ``summary.json`` and figures for every evaluated model.

The report reads only what the pipeline stages wrote, so it shows exactly the numbers DVC tracks
and is cheap to rebuild:

- every model: ``<results_dir>/<model>/eval/`` (evaluate stage);
- every federated model (a folder with ``federation.json``): its ``federation.json`` and
  ``rounds.csv`` (federate stage) and the ``heterogeneity.json`` / ``.png`` of the partition it
  trained on, ``<results_dir>/partitions/sites-<n>/`` (partition stage);
- the centralized model's ``training.json``, for its best validation accuracy as the reference
  line of the per-round curves (optional);
- the analysis stages: every model's ``calibration/`` (calibrate) and ``cam/`` (explain), and
  ``comparison/statistics.json`` (compare: bootstrap CIs, McNemar) and ``audit/shortcut.json`` (audit);
- the privacy stage's ``privacy/privacy.json`` and figures, when it has run (a "Privacy" section).

It refuses to put models evaluated on different data side by side, and says loudly when the data
is synthetic.
"""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from leukofed.data.partition import HETEROGENEITY_FILE, HETEROGENEITY_PNG_FILE
from leukofed.errors import LeukofedError
from leukofed.evaluation.calibration import CALIBRATION_FILE, RELIABILITY_PNG_FILE
from leukofed.evaluation.explain import CAM_FILE, ERRORS_PNG_FILE
from leukofed.evaluation.metrics import CONFUSION_PNG_FILE, METRICS_FILE
from leukofed.evaluation.statistics import METRIC_NAMES
from leukofed.io import atomic_path, read_json, write_json, write_text
from leukofed.plotting import new_figure, save_png, wrap_title
from leukofed.privacy.summary import FIGURES as PRIVACY_FIGURES
from leukofed.privacy.summary import PRIVACY_DIR, SWEEP_FILE, read_sweep, sweep_section, sweep_summary
from leukofed.provenance import DataProvenance

EVAL_DIR = "eval"
SUMMARY_FILE = "summary.json"
README_FILE = "README.md"
CENTRALIZED = "centralized"
TRAINING_FILE = "training.json"  # the centralized training record
FEDERATION_FILE = "federation.json"
ROUNDS_FILE = "rounds.csv"
PARTITIONS_DIR = "partitions"
CURVES_PNG_FILE = "validation_accuracy_per_round.png"
CALIBRATION_DIR = "calibration"  # per model, calibrate stage
CAM_DIR = "cam"  # per model, explain stage
STATISTICS_PATH = "comparison/statistics.json"  # compare stage
AUDIT_PATH = "audit/shortcut.json"  # audit stage

DATASET_CITATION = (
    "Aria M, Ghaderzadeh M, Bashash D, et al. Acute Lymphoblastic Leukemia (ALL) image dataset. "
    "Kaggle, 2021. [doi:10.34740/KAGGLE/DSV/2175623](https://doi.org/10.34740/KAGGLE/DSV/2175623)"
)
PAPER_CITATION = "Awan, Khan, Strakos et al., Sci Rep 16, 9768 (2026)"
SYNTHETIC_BANNER = (
    "> [!WARNING]\n"
    "> **SYNTHETIC DATA.** These numbers come from procedurally generated images, not from blood smears.\n"
    "> They show that the pipeline runs; they say nothing about leukemia classification and are not\n"
    "> comparable with the paper."
)
MISSING = "—"
PANEL_COLOURS = 256  # palette of the panel grids copied into the report (overlays stay legible)
STRATEGY_NAMES = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedavgm": "FedAvgM", "fedadam": "FedAdam"}
BYTES_PER_MB = 10**6
SECONDS_PER_MINUTE = 60

_REQUIRED_KEYS = ("n", "accuracy", "balanced_accuracy", "macro_f1", "per_class", "data")
_FEDERATION_KEYS = ("rounds", "best_round", "best", "fairness", "bytes", "sites", "timing", "params", "data")
_ROUNDS_COLUMNS = ("round", "val_accuracy", "seconds")
_HETEROGENEITY_KEYS = ("n_sites", "scheme", "pooled", "sites", "summary", "data")
_HETEROGENEITY_SITE_KEYS = ("n", "n_train", "n_val", "counts", "missing_classes", "js_divergence", "hellinger", "emd")
_DIVERGENCES = ("js_divergence", "hellinger", "emd")
_CLASS_SCORES = ("precision", "recall", "f1", "support")
_MODEL_DATA_KEYS = ("source", "fingerprint", "n_images")
_CURVE_MARKERS = ("o", "s", "^", "D", "v", "P")  # a marker per run: overlapping curves stay distinguishable
_CALIBRATION_KEYS = ("overall", "temperature", "after_scaling", "temperature_fit", "data")
_CALIBRATION_SCORES = ("ece", "mce", "brier", "nll")
_CAM_KEYS = ("methods", "target_layer", "randomisation", "randomisation_similarity", "panels", "data")
_STATISTICS_KEYS = ("models", "mcnemar", "reference", "n_test", "n_resamples", "confidence", "data")
_AUDIT_KEYS = ("border_colour", "corner_patch", "majority_class", "features", "n_train", "n_test", "data")
_SHORTCUTS = {"border_colour": "Border colour", "corner_patch": "Corner patch (scale bar)"}


@dataclass(frozen=True)
class _FederatedRun:
    """What the federate and partition stages wrote for one federated model."""

    record: dict  # federation.json
    rounds: pd.DataFrame  # rounds.csv
    partition: dict  # heterogeneity.json of the partition it trained on
    partition_name: str  # sites-<n>
    partition_figure: Path  # heterogeneity.png of that partition


@dataclass(frozen=True)
class _Analysis:
    """What the calibrate, explain, compare and audit stages wrote."""

    calibration: dict[str, dict]  # model -> calibration.json
    cam: dict[str, dict]  # model -> cam.json
    statistics: dict  # comparison/statistics.json
    audit: dict  # audit/shortcut.json


def build_report(results_dir: Path, out_dir: Path, *, paper_accuracy: dict[str, float], command: str) -> dict:
    """Compare every model evaluated under ``results_dir`` in ``out_dir``, each file written atomically.

    Parameters
    ----------
    results_dir : Path
        Holds one folder per model, each with ``eval/metrics.json`` and ``eval/confusion_matrix.png``
        from the evaluate stage (e.g. ``results/<dataset>/centralized/eval/``). A federated model's
        folder also holds ``federation.json`` and ``rounds.csv``, and its partition lives in
        ``partitions/sites-<n>/`` (``heterogeneity.json``, ``heterogeneity.png``). Every model's folder
        also holds ``calibration/`` and ``cam/`` (calibrate, explain stages), and ``results_dir`` holds
        ``comparison/statistics.json`` (compare) and ``audit/shortcut.json`` (audit).
    out_dir : Path
        Receives ``summary.json``, ``README.md``, ``confusion_matrix_<model>.png`` per model,
        ``reliability_<model>.png`` of the centralized and the first other (federated) model, two Grad-CAM
        panel grids of the first model (``cam_errors_<model>.png``, ``cam_correct_<class>_<model>.png``)
        and, when there are federated models, ``heterogeneity_sites-<n>.png`` per partition and
        ``validation_accuracy_per_round.png``.
    paper_accuracy : dict of str to float
        Published test accuracy by model name (``report.paper_accuracy``), shown beside ours.
    command : str
        The exact command that made the results; recorded in the report.

    Returns
    -------
    dict
        The content of ``summary.json``: ``dataset``, ``data`` (``source``, ``fingerprint``,
        ``n_images``, ``synthetic``), ``models`` (name -> ``accuracy``, ``balanced_accuracy``,
        ``macro_f1``, ``per_class``, ``params``, ``data``, ``command``, ``ci`` (metric -> ``estimate``,
        ``low``, ``high``), ``calibration`` (``ece``, ``mce``, ``brier``, ``nll``, ``temperature``,
        ``after_scaling``), ``cam_randomisation_similarity``; every model but the centralized one also
        ``mcnemar_vs_centralized``; a federated model also ``federation``, ``heterogeneity``,
        ``fairness`` and, where the paper has one, ``paper_accuracy``), ``paper``, ``audit`` and, when the
        privacy stage has run, ``privacy`` (:func:`leukofed.privacy.summary.sweep_summary`).

    Raises
    ------
    LeukofedError
        If no model has been evaluated, a stage output the report reads is missing or malformed, or
        the models were trained or evaluated on different data (their fingerprints differ).
    """
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    evaluations = _load_evaluations(results_dir)
    provenance = _common_provenance(results_dir, evaluations)
    federated = _load_federated_runs(results_dir, list(evaluations), provenance.fingerprint)
    analysis = _load_analysis(results_dir, list(evaluations), provenance.fingerprint)
    models = {name: _model_summary(metrics, command) | _analysis_summary(name, analysis)
              for name, metrics in evaluations.items()}
    for name, run in federated.items():
        models[name] |= _federated_summary(run, paper_accuracy.get(name))
    summary = {
        "dataset": provenance.dataset,
        "data": {key: getattr(provenance, key) for key in _MODEL_DATA_KEYS} | {"synthetic": provenance.is_synthetic},
        "models": models,
        "paper": dict(paper_accuracy),
        "audit": _audit_summary(analysis.audit),
    }
    sweep_path = results_dir / PRIVACY_DIR / SWEEP_FILE
    if sweep_path.is_file():
        sweep = read_sweep(sweep_path)
        _check_fingerprint(sweep_path, sweep, provenance.fingerprint, "re-run the privacy stage")
        summary["privacy"] = sweep_summary(sweep)
    figures = {name: _copy_confusion_figure(results_dir, out_dir, name) for name in evaluations}
    if federated:
        figures |= _federation_figures(results_dir, out_dir, federated, provenance)
    figures |= _analysis_figures(results_dir, out_dir, list(evaluations), analysis.cam)
    if "privacy" in summary:
        figures |= {name: _copy_figure(results_dir / PRIVACY_DIR / name, out_dir, name,
                                       "privacy figure missing; re-run the privacy stage") for name in PRIVACY_FIGURES}
    write_json(out_dir / SUMMARY_FILE, summary)
    write_text(out_dir / README_FILE, _readme(summary, evaluations, federated, analysis, provenance, figures, command))
    return summary


def _load_evaluations(results_dir: Path) -> dict[str, dict]:
    """Model name -> its ``metrics.json``: the centralized model first, then the others by name."""
    paths = sorted(results_dir.glob(f"*/{EVAL_DIR}/{METRICS_FILE}"), key=lambda path: _model_order(path.parts[-3]))
    if not paths:
        raise LeukofedError(
            f"{results_dir}: no evaluated model found (expected <model>/{EVAL_DIR}/{METRICS_FILE}); "
            "run the evaluate stage first"
        )
    return {path.parent.parent.name: _read_metrics(path) for path in paths}


def _model_order(name: str) -> tuple[bool, str]:
    return name != CENTRALIZED, name


def _read_json_checked(path: Path, required: tuple[str, ...], fix: str) -> dict:
    """A JSON file a stage wrote, checked for the keys the report uses."""
    if not path.is_file():
        raise LeukofedError(f"{path}: not found; {fix}")
    try:
        content = read_json(path)
    except json.JSONDecodeError as error:
        raise LeukofedError(f"{path}: not valid JSON ({error}); {fix}") from None
    missing = [key for key in required if key not in content]
    if missing:
        raise LeukofedError(f"{path}: missing {', '.join(missing)}; {fix}")
    return content


def _read_metrics(path: Path) -> dict:
    """A ``metrics.json`` written by the evaluate stage, checked for the keys the report uses."""
    fix = "re-run the evaluate stage for this model"
    metrics = _read_json_checked(path, _REQUIRED_KEYS, fix)
    missing = [f"data.{key}" for key in DataProvenance.__dataclass_fields__ if key not in metrics["data"]]
    if missing:
        raise LeukofedError(f"{path}: missing {', '.join(missing)}; {fix}")
    return metrics


def _common_provenance(results_dir: Path, evaluations: dict[str, dict]) -> DataProvenance:
    """The data every model was evaluated on; refuse to compare models evaluated on different data."""
    models_by_fingerprint: dict[str, list[str]] = {}
    for name, metrics in evaluations.items():
        models_by_fingerprint.setdefault(metrics["data"]["fingerprint"], []).append(name)
    if len(models_by_fingerprint) > 1:
        groups = "; ".join(
            f"data {fingerprint[:12]}: {', '.join(names)}" for fingerprint, names in models_by_fingerprint.items()
        )
        raise LeukofedError(
            f"{results_dir}: models were evaluated on different data ({groups}); their numbers are not "
            "comparable. Re-run the evaluate stage for every model on the current data, or remove the stale results"
        )
    first = next(iter(evaluations.values()))
    return DataProvenance.from_dict(first["data"])


def _load_federated_runs(results_dir: Path, names: list[str], fingerprint: str) -> dict[str, _FederatedRun]:
    """The federate- and partition-stage outputs of every evaluated model that has a ``federation.json``."""
    return {name: _read_federated_run(results_dir, name, fingerprint)
            for name in names if (results_dir / name / FEDERATION_FILE).is_file()}


def _read_federated_run(results_dir: Path, name: str, fingerprint: str) -> _FederatedRun:
    fix = f"re-run the federate stage for '{name}'"
    record_path = results_dir / name / FEDERATION_FILE
    record = _read_json_checked(record_path, _FEDERATION_KEYS, fix)
    _check_fingerprint(record_path, record, fingerprint, f"re-run the federate and evaluate stages for '{name}'")
    rounds = _read_rounds(results_dir / name / ROUNDS_FILE, fix)
    partition_name = f"sites-{record['params']['run']['sites']}"
    partition_dir = results_dir / PARTITIONS_DIR / partition_name
    partition_fix = f"run the partition stage for {partition_name}, then the federate stage for '{name}'"
    partition = _read_json_checked(partition_dir / HETEROGENEITY_FILE, _HETEROGENEITY_KEYS, partition_fix)
    _check_fingerprint(partition_dir / HETEROGENEITY_FILE, partition, fingerprint, partition_fix)
    return _FederatedRun(record, rounds, partition, partition_name, partition_dir / HETEROGENEITY_PNG_FILE)


def _check_fingerprint(path: Path, content: dict, fingerprint: str, fix: str) -> None:
    found = content["data"].get("fingerprint")
    if found != fingerprint:
        raise LeukofedError(
            f"{path}: made from data {str(found)[:12]}, but the models were evaluated on data {fingerprint[:12]}; {fix}"
        )


def _read_rounds(path: Path, fix: str) -> pd.DataFrame:
    """A ``rounds.csv`` written by the federate stage, checked for the columns the report uses."""
    if not path.is_file():
        raise LeukofedError(f"{path}: not found; {fix}")
    try:
        rounds = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise LeukofedError(f"{path}: unreadable ({error}); {fix}") from None
    missing = [column for column in _ROUNDS_COLUMNS if column not in rounds.columns]
    if missing or rounds.empty:
        raise LeukofedError(f"{path}: {'missing columns ' + ', '.join(missing) if missing else 'no rounds'}; {fix}")
    return rounds.sort_values("round", kind="stable")


def _model_summary(metrics: dict, command: str) -> dict:
    """One model's entry in ``summary.json``."""
    return {
        "accuracy": metrics["accuracy"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "macro_f1": metrics["macro_f1"],
        "per_class": {
            name: {key: scores[key] for key in _CLASS_SCORES} for name, scores in metrics["per_class"].items()
        },
        "params": (metrics.get("model") or {}).get("params"),
        "data": {key: metrics["data"][key] for key in _MODEL_DATA_KEYS},
        "command": command,
    }


def _federated_summary(run: _FederatedRun, paper_accuracy: float | None) -> dict:
    """What a federated model's ``summary.json`` entry adds: federation, heterogeneity, fairness."""
    entry = {
        "federation": _federation_entry(run),
        "heterogeneity": _heterogeneity_entry(run.partition, run.partition_name),
        "fairness": _fairness_entry(run.record),
    }
    return entry | ({"paper_accuracy": paper_accuracy} if paper_accuracy is not None else {})


def _federation_entry(run: _FederatedRun) -> dict:
    """Settings and costs of a federated run; ``wall_seconds`` sums its rounds (training, aggregation, evaluation)."""
    record, settings = run.record, run.record["params"]
    return {
        "sites": settings["run"]["sites"],
        "strategy": settings["run"]["strategy"],
        "rounds": record["rounds"],
        "local_epochs": settings["federation"]["local_epochs"],
        "best_round": record["best_round"],
        "best_val_accuracy": record["best"]["val_accuracy"],
        "bytes_sent": record["bytes"]["sent"],
        "bytes_received": record["bytes"]["received"],
        "bytes_per_round": _bytes_per_round(record),
        "wall_seconds": float(run.rounds["seconds"].sum()),
        "round_seconds_median": record["timing"]["round_median"],
    }


def _bytes_per_round(record: dict) -> dict[str, dict[str, float | None]]:
    """Site -> mean bytes ``sent`` to it and ``received`` from it per round it took part in."""
    return {
        site: {
            direction: entry[f"bytes_{direction}"] / entry["rounds_selected"] if entry["rounds_selected"] else None
            for direction in ("sent", "received")
        }
        for site, entry in record["sites"].items()
    }


def _heterogeneity_entry(partition: dict, partition_name: str) -> dict:
    """Per-site class counts and label/quantity skew of the partition a run trained on."""
    summary = partition["summary"]
    return {
        "partition": partition_name,
        "scheme": partition["scheme"],
        "pooled": partition["pooled"],
        "sites": {str(site["site"]): {key: site[key] for key in _HETEROGENEITY_SITE_KEYS} for site in partition["sites"]},
        **{f"{key}_{stat}": summary[f"{key}_{stat}"] for key in _DIVERGENCES for stat in ("mean", "max")},
        "sizes": summary["sizes"],
        "quantity_cv": summary["size_cv"],
    }


def _fairness_entry(record: dict) -> dict:
    """Fairness of the evaluated (best-round) global model over the sites' local validation parts."""
    best = record["fairness"]["best"]
    return {
        "round": record["best_round"],
        "evaluated_on": "each site's local validation part",
        "per_site": {site: entry["val_accuracy_best"] for site, entry in record["sites"].items()},
        "mean": best["mean"],
        "std": best["std"],
        "cv": best["cv"],
        "min_max_gap": best["gap"],
        "jain_index": best["jain"],
    }


def _load_analysis(results_dir: Path, names: list[str], fingerprint: str) -> _Analysis:
    """The calibrate, explain, compare and audit outputs for ``names``, each checked against the evaluated data."""
    calibration = {name: _read_analysis(results_dir / name / CALIBRATION_DIR / CALIBRATION_FILE, _CALIBRATION_KEYS,
                                        f"the calibrate stage for '{name}'", fingerprint) for name in names}
    cam = {name: _read_analysis(results_dir / name / CAM_DIR / CAM_FILE, _CAM_KEYS, f"the explain stage for '{name}'",
                                fingerprint) for name in names}
    statistics_path = results_dir / STATISTICS_PATH
    statistics = _read_analysis(statistics_path, _STATISTICS_KEYS, "the compare stage", fingerprint)
    absent = [name for name in names if name not in statistics["models"]
              or (name != statistics["reference"] and name not in statistics["mcnemar"])]
    if absent or statistics["reference"] != CENTRALIZED:
        raise LeukofedError(
            f"{statistics_path}: compares {sorted(statistics['models'])} against '{statistics['reference']}', but the "
            f"report needs every evaluated model ({', '.join(names)}) against '{CENTRALIZED}'; re-run the compare stage"
        )
    audit = _read_analysis(results_dir / AUDIT_PATH, _AUDIT_KEYS, "the audit stage", fingerprint)
    return _Analysis(calibration, cam, statistics, audit)


def _read_analysis(path: Path, required: tuple[str, ...], stage: str, fingerprint: str) -> dict:
    """An analysis stage's JSON, checked for the keys the report uses and for the evaluated data."""
    content = _read_json_checked(path, required, f"run {stage}")
    _check_fingerprint(path, content, fingerprint, f"re-run {stage}")
    return content


def _analysis_summary(name: str, analysis: _Analysis) -> dict:
    """What a model's ``summary.json`` entry gains from the analysis stages."""
    calibration = analysis.calibration[name]
    entry = {
        "ci": {metric: analysis.statistics["models"][name][metric] for metric in METRIC_NAMES},
        "calibration": {
            **{key: calibration["overall"][key] for key in _CALIBRATION_SCORES},
            "temperature": calibration["temperature"],
            "temperature_fit": calibration["temperature_fit"]["scheme"],
            "after_scaling": {key: calibration["after_scaling"][key] for key in _CALIBRATION_SCORES},
        },
        "cam_randomisation_similarity": analysis.cam[name]["randomisation_similarity"],
    }
    if name != CENTRALIZED:
        entry["mcnemar_vs_centralized"] = analysis.statistics["mcnemar"][name]
    return entry


def _audit_summary(audit: dict) -> dict:
    """The shortcut audit's test scores and feature sets."""
    return {key: audit[key] for key in (*_SHORTCUTS, "majority_class", "features", "n_train", "n_test")}


def _copy_figure(source: Path, out_dir: Path, target_name: str, problem: str) -> str:
    """Copy a stage's PNG next to the report; return its name (the relative link)."""
    if not source.is_file():
        raise LeukofedError(f"{source}: {problem}")
    with atomic_path(out_dir / target_name, suffix=".png") as tmp:
        shutil.copyfile(source, tmp)
    return target_name


def _copy_panel_grid(source: Path, out_dir: Path, target_name: str, problem: str) -> str:
    """Copy a Grad-CAM panel grid as a 256-colour PNG: the committed report stays small (about a third)."""
    from PIL import Image

    if not source.is_file():
        raise LeukofedError(f"{source}: {problem}")
    with Image.open(source) as image, atomic_path(out_dir / target_name, suffix=".png") as tmp:
        palette = image.convert("RGB").quantize(colors=PANEL_COLOURS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        palette.save(tmp, format="PNG", optimize=True)
    return target_name


def _copy_confusion_figure(results_dir: Path, out_dir: Path, name: str) -> str:
    return _copy_figure(results_dir / name / EVAL_DIR / CONFUSION_PNG_FILE, out_dir, f"confusion_matrix_{name}.png",
                        f"confusion-matrix figure missing; re-run the evaluate stage for '{name}'")


def _federation_figures(
    results_dir: Path, out_dir: Path, federated: dict[str, _FederatedRun], provenance: DataProvenance
) -> dict[str, str]:
    """Copy each partition's stacked-bar figure and draw the per-round curves; figure key -> file name."""
    figures = {}
    for run in federated.values():
        figures[run.partition_name] = _copy_figure(
            run.partition_figure, out_dir, f"heterogeneity_{run.partition_name}.png",
            f"heterogeneity figure missing; re-run the partition stage for {run.partition_name}",
        )
    reference = _centralized_best_val_accuracy(results_dir)
    curves = {name: (run.rounds["round"].tolist(), run.rounds["val_accuracy"].tolist(), run.record["best_round"])
              for name, run in federated.items()}
    labels = {name: _run_label(run.record) for name, run in federated.items()}
    title = provenance.title("Global validation accuracy per communication round")
    plot_validation_curves(curves, labels, reference, out_dir / CURVES_PNG_FILE, title)
    figures[CURVES_PNG_FILE] = CURVES_PNG_FILE
    return figures


def _analysis_figures(
    results_dir: Path, out_dir: Path, names: list[str], cams: dict[str, dict]
) -> dict[str, str]:
    """Copy the reliability diagrams of the centralized and the first other model, and two CAM panel grids.

    Only two panel grids of dataset images (the first model's misclassified images and the correct
    images of its best-filled class) go into the report: the dataset's terms allow showing a few.
    """
    figures = {}
    for name in _reliability_models(names):
        figures[f"reliability:{name}"] = _copy_figure(
            results_dir / name / CALIBRATION_DIR / RELIABILITY_PNG_FILE, out_dir, f"reliability_{name}.png",
            f"reliability diagram missing; re-run the calibrate stage for '{name}'",
        )
    name = names[0]
    correct = _fullest_correct_panel(cams[name])
    for key, source, target in (("cam:errors", ERRORS_PNG_FILE, f"cam_errors_{name}.png"),
                                ("cam:correct", correct["file"], f"cam_correct_{correct['class']}_{name}.png")):
        figures[key] = _copy_panel_grid(results_dir / name / CAM_DIR / source, out_dir, target,
                                        f"Grad-CAM panel grid missing; re-run the explain stage for '{name}'")
    return figures


def _reliability_models(names: list[str]) -> list[str]:
    """The models whose reliability diagram the report shows: the centralized one and the first other (federated) one."""
    others = [name for name in names if name != CENTRALIZED]
    return [name for name in names if name == CENTRALIZED] + others[:1]


def _fullest_correct_panel(cam: dict) -> dict:
    """The panel grid of correctly classified images with the most images (the first such class on a tie)."""
    correct = [panel for panel in cam["panels"] if panel["kind"] == "correct"]
    return max(correct, key=lambda panel: len(panel["images"]))


def _centralized_best_val_accuracy(results_dir: Path) -> float | None:
    """The centralized model's best validation accuracy, or None where it was not trained here."""
    path = results_dir / CENTRALIZED / TRAINING_FILE
    if not path.is_file():
        return None
    return _read_json_checked(path, ("best_val_accuracy",), "re-run the train_centralized stage")["best_val_accuracy"]


def plot_validation_curves(
    curves: dict[str, tuple[list[int], list[float], int]],
    labels: dict[str, str],
    reference: float | None,
    path: Path,
    title: str,
) -> None:
    """Save every federated run's global validation accuracy per round as a line chart (PNG, atomically).

    Parameters
    ----------
    curves : dict
        Run name -> (round numbers, global validation accuracy in [0, 1] per round, best round).
    labels : dict of str to str
        Run name -> its legend description (strategy, sites).
    reference : float or None
        The centralized model's best validation accuracy in [0, 1]: a dashed horizontal line.
    path : Path
        Where the PNG goes.
    title : str
        Figure title (say there if the data is synthetic).

    Notes
    -----
    Two panels: all rounds, and the second half of the rounds zoomed in, where the runs settle within
    a point or two of each other and of the reference. A star marks each run's best round: that
    round's global model is the one the evaluate stage tests.
    """
    # An explicit Agg canvas: no display needed, and pyplot's global backend is left alone.

    width = 12.0  # inches: two panels of a few dozen rounds each, the legend below them
    figure = new_figure(width, 5.5)
    full, zoom = figure.subplots(1, 2)
    last_round = max(rounds[-1] for rounds, _, _ in curves.values())
    zoom_from = last_round // 2 + 1
    _draw_curves(full, curves, labels, reference, first_round=1)
    _draw_curves(zoom, curves, labels, reference, first_round=zoom_from)
    full.set_title("All rounds")
    zoom.set_title(f"Rounds {zoom_from}–{last_round}, zoomed in")
    handles, names = full.get_legend_handles_labels()
    figure.legend(handles, names, loc="outside lower center", frameon=False, title="★ best round (the tested model)")
    figure.suptitle(wrap_title(title, width), fontsize="medium")
    save_png(figure, path)


def _draw_curves(
    axes, curves: dict[str, tuple[list[int], list[float], int]], labels: dict[str, str], reference: float | None,
    first_round: int,
) -> None:
    """One panel of :func:`plot_validation_curves`: the rounds from ``first_round`` on, in percent."""
    from matplotlib.ticker import MaxNLocator

    for (name, (rounds, accuracy, best_round)), marker in zip(curves.items(), itertools.cycle(_CURVE_MARKERS)):
        shown = [(number, 100 * value) for number, value in zip(rounds, accuracy, strict=True) if number >= first_round]
        (line,) = axes.plot([number for number, _ in shown], [value for _, value in shown], marker=marker, markersize=4,
                            linewidth=1.5, label=f"{name}: {labels[name]}, best round {best_round}")
        if best_round >= first_round:
            axes.plot(best_round, 100 * accuracy[rounds.index(best_round)], marker="*", markersize=14,
                      color=line.get_color(), markeredgecolor="black", linestyle="none")
    if reference is not None:
        axes.axhline(100 * reference, color="black", linestyle="--", linewidth=1.2,
                     label=f"centralized: best validation accuracy {100 * reference:.2f}%")
    axes.set(xlabel="Communication round", ylabel="Global validation accuracy (%)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(True, alpha=0.3)


def _run_label(record: dict) -> str:
    """E.g. ``FedProx (mu 0.01), 5 sites``."""
    settings = record["params"]
    strategy = settings["run"]["strategy"]
    name = STRATEGY_NAMES.get(strategy, strategy)
    if strategy == "fedprox":
        name += f" (μ {settings['federation']['fedprox']['mu']:g})"
    return f"{name}, {settings['run']['sites']} sites"


def _readme(
    summary: dict,
    evaluations: dict[str, dict],
    federated: dict[str, _FederatedRun],
    analysis: _Analysis,
    provenance: DataProvenance,
    figures: dict[str, str],
    command: str,
) -> str:
    """The markdown report."""
    lines = [f"# {provenance.title('leukofed results')}", ""]
    if provenance.is_synthetic:
        lines += [SYNTHETIC_BANNER, ""]
    lines += [
        "## Comparison",
        "",
        *_comparison_table(summary),
        "",
        f"Test-split scores on {analysis.statistics['n_test']} images, with "
        f"{_percent(analysis.statistics['confidence'], digits=0)} percentile-bootstrap confidence intervals in "
        f"parentheses ({analysis.statistics['n_resamples']} resamples of the test images). "
        "Δ vs centralized: accuracy minus the centralized model's, in percentage points. McNemar p: exact two-sided "
        "p-value of McNemar's test of the model against the centralized one on the same test images (small: "
        "they err on different images more often than chance explains). "
        f"Paper accuracy: test accuracy reported by {PAPER_CITATION} for the model of that name "
        f"({MISSING} where it reports none).",
        "",
        *_run_legend(federated),
    ]
    if federated:
        lines += _federation_sections(summary, federated, figures)
    lines += _calibration_section(summary["models"], analysis.calibration, figures)
    lines += _cam_section(summary["models"], analysis.cam, figures, provenance)
    lines += _audit_section(summary, analysis.audit)
    if "privacy" in summary:
        lines += sweep_section(summary["privacy"], figures, _markdown_table)
    for name, model in summary["models"].items():
        lines += [f"## {name}", "", f"Evaluated on {evaluations[name]['n']} images.", ""]
        if "federation" in model:
            lines += [_federated_model_line(model["federation"], federated[name].record), ""]
        lines += [*_per_class_table(model["per_class"]), "", f"![Confusion matrix of {name}]({figures[name]})", ""]
    lines += [
        "## Reproducibility",
        "",
        f"- Dataset: `{provenance.dataset}` (source: {provenance.source}), {provenance.n_images} images",
        f"- Data fingerprint: `{provenance.fingerprint}`",
        "- Made by:",
        "",
        "```sh",
        command,
        "```",
        "",
        "---",
        "",
        f"Dataset: {DATASET_CITATION}.  ",
        f"Paper: {PAPER_CITATION}.",
    ]
    return "\n".join(lines) + "\n"


def _comparison_table(summary: dict) -> list[str]:
    """One row per model: overall scores, recall per class, the gap to centralized and the paper's accuracy."""
    classes = list(dict.fromkeys(name for model in summary["models"].values() for name in model["per_class"]))
    header = ["Model", "Accuracy (95% CI)", "Balanced accuracy (95% CI)", "Macro-F1 (95% CI)"]
    header += [f"{name} recall" for name in classes]
    header += ["Δ vs centralized (points)", "McNemar p vs centralized", "Paper accuracy"]
    centralized = summary["models"].get(CENTRALIZED)
    rows = []
    for name, model in summary["models"].items():
        recalls = [_recall(model["per_class"].get(cls)) for cls in classes]
        scores = [_with_ci(model[key], model["ci"][key]) for key in METRIC_NAMES]
        gap = MISSING if centralized is None or name == CENTRALIZED else _points(model["accuracy"] - centralized["accuracy"])
        mcnemar = model.get("mcnemar_vs_centralized")
        p_value = MISSING if mcnemar is None else _p_value(mcnemar["p_value"])
        rows.append([name, *scores, *recalls, gap, p_value, _percent(summary["paper"].get(name))])
    return _markdown_table(header, rows)


def _with_ci(value: float, ci: dict) -> str:
    """A share in percent with its confidence interval, e.g. ``98.86% (97.7–99.5)``."""
    return f"{_percent(value)} ({100 * ci['low']:.1f}–{100 * ci['high']:.1f})"


def _p_value(value: float) -> str:
    """A p-value with three significant digits, ``< 0.001`` below that."""
    return "< 0.001" if value < 1e-3 else f"{value:.3g}"


def _run_legend(federated: dict[str, _FederatedRun]) -> list[str]:
    """One line per federated model: how it was trained."""
    lines = [
        f"- `{name}`: {_run_label(run.record)}, {run.record['rounds']} rounds of "
        f"{_count(run.record['params']['federation']['local_epochs'], 'local epoch')} each; the tested model is the global model "
        f"of round {run.record['best_round']} (highest global validation accuracy)."
        for name, run in federated.items()
    ]
    return [*lines, ""] if lines else []


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _federated_model_line(federation: dict, record: dict) -> str:
    return (
        f"Federated: {_run_label(record)}; global model of round {federation['best_round']} of {federation['rounds']} "
        f"(global validation accuracy {_percent(federation['best_val_accuracy'])})."
    )


def _federation_sections(summary: dict, federated: dict[str, _FederatedRun], figures: dict[str, str]) -> list[str]:
    """Heterogeneity, per-round curves, fairness and communication of the federated models."""
    models = summary["models"]
    lines = [
        "## Heterogeneity of the site partitions",
        "",
        "Each site's images (its local train and validation parts; the test split stays global). "
        "JS divergence (bits, 0 = the pooled mix, 1 = disjoint), Hellinger distance (0–1) and earth "
        "mover's distance (in class steps along Benign < Early < Pre < Pro) compare the site's class mix "
        "with the pooled one; quantity CV is the coefficient of variation of the site sizes.",
        "",
    ]
    for partition_name, names in _runs_by_partition(federated).items():
        lines += _heterogeneity_section(models[names[0]]["heterogeneity"], names, figures[partition_name])
    reference = "" if CENTRALIZED not in models else (
        " The dashed line is the centralized model's best accuracy on the global validation split (other "
        "images than the sites' validation parts, so a reference level, not a paired comparison)."
    )
    lines += [
        "## Validation accuracy per round",
        "",
        "Global validation accuracy after each round: the global model's accuracy over all sites' local "
        "validation parts (sample-weighted)." + reference,
        "",
        f"![Global validation accuracy per round]({figures[CURVES_PNG_FILE]})",
        "",
        "## Fairness across sites",
        "",
        "Accuracy of each tested global model (its best round) on each site's local validation part. "
        "Std and min–max gap in percentage points (population std); CV = std / mean; Jain's index "
        "(Σa)² / (n·Σa²) is 1 when every site is served equally and 1/n when one site gets everything.",
        "",
        *_fairness_table(models, list(federated)),
        "",
        "## Communication and cost",
        "",
        "Payload of the model entries exchanged (tensor bytes; 1 MB = 10⁶ bytes). "
        "Per site and round: mean over the rounds the site took part in. Wall time: the sum of the rounds "
        "(local training, aggregation, server evaluation). A round's cost against the same centralized "
        "training is measured by `benchmarks/fl_round_vs_centralized.py` (repeated, interleaved).",
        "",
        *_communication_table(models, list(federated)),
        "",
    ]
    return lines


def _runs_by_partition(federated: dict[str, _FederatedRun]) -> dict[str, list[str]]:
    """Partition name -> the federated models trained on it, partitions by site count."""
    groups: dict[str, list[str]] = {}
    for name, run in sorted(federated.items(), key=lambda item: (item[1].partition["n_sites"], item[0])):
        groups.setdefault(run.partition_name, []).append(name)
    return groups


def _heterogeneity_section(heterogeneity: dict, names: list[str], figure: str) -> list[str]:
    """Class counts and skew of one partition's sites, with its stacked-bar figure."""
    classes = list(heterogeneity["pooled"])
    header = ["Site", *classes, "Images", "Local train", "Local val", "JS divergence", "Hellinger", "EMD"]
    rows = [
        [f"site {site}", *(str(entry["counts"][label]) for label in classes), str(entry["n"]), str(entry["n_train"]),
         str(entry["n_val"]), *(f"{entry[key]:.3f}" for key in _DIVERGENCES)]
        for site, entry in heterogeneity["sites"].items()
    ]
    sites = heterogeneity["sites"].values()
    pooled = heterogeneity["pooled"]
    rows.append(["pooled", *(str(pooled[label]) for label in classes), str(sum(pooled.values())),
                 str(sum(entry["n_train"] for entry in sites)), str(sum(entry["n_val"] for entry in sites)),
                 *([MISSING] * len(_DIVERGENCES))])
    used_by = ", ".join(f"`{name}`" for name in names)
    lines = [
        f"### {len(heterogeneity['sites'])} sites (`{heterogeneity['partition']}`, scheme {heterogeneity['scheme']}; "
        f"used by {used_by})",
        "",
        *_markdown_table(header, rows),
        "",
        f"Quantity CV {heterogeneity['quantity_cv']:.3f}; mean (max) JS divergence "
        f"{heterogeneity['js_divergence_mean']:.3f} ({heterogeneity['js_divergence_max']:.3f}) bits, Hellinger "
        f"{heterogeneity['hellinger_mean']:.3f} ({heterogeneity['hellinger_max']:.3f}), EMD "
        f"{heterogeneity['emd_mean']:.3f} ({heterogeneity['emd_max']:.3f}).",
    ]
    lines += [f"**Site {site} has no {', '.join(entry['missing_classes'])} images.**"
              for site, entry in heterogeneity["sites"].items() if entry["missing_classes"]]
    return [*lines, "", f"![Class counts and mix per site, {heterogeneity['partition']}]({figure})", ""]


def _fairness_table(models: dict, names: list[str]) -> list[str]:
    """One row per federated model: per-site accuracy, then its spread."""
    n_sites = max(len(models[name]["fairness"]["per_site"]) for name in names)
    header = ["Model", "Round", *(f"Site {site}" for site in range(1, n_sites + 1)),
              "Mean", "Std (points)", "CV", "Min–max gap (points)", "Jain index"]
    rows = []
    for name in names:
        fairness = models[name]["fairness"]
        per_site = [_percent(fairness["per_site"].get(str(site))) for site in range(1, n_sites + 1)]
        rows.append([name, str(fairness["round"]), *per_site, _percent(fairness["mean"]), _points(fairness["std"], sign=False),
                     _decimal(fairness["cv"]), _points(fairness["min_max_gap"], sign=False),
                     _decimal(fairness["jain_index"], digits=4)])
    return _markdown_table(header, rows)


def _communication_table(models: dict, names: list[str]) -> list[str]:
    """One row per federated model: bytes per site and round, totals and wall time."""
    header = ["Model", "Sites", "Rounds", "Sent per site per round", "Received per site per round",
              "Total sent (MB)", "Total received (MB)", "Total (MB)", "Wall time"]
    rows = []
    for name in names:
        federation = models[name]["federation"]
        per_round = federation["bytes_per_round"].values()
        total = federation["bytes_sent"] + federation["bytes_received"]
        rows.append([
            name, str(federation["sites"]), str(federation["rounds"]),
            _byte_range([entry["sent"] for entry in per_round]), _byte_range([entry["received"] for entry in per_round]),
            _megabytes(federation["bytes_sent"]), _megabytes(federation["bytes_received"]), _megabytes(total),
            f"{_duration(federation['wall_seconds'])} ({_duration(federation['round_seconds_median'])} per round, median)",
        ])
    return _markdown_table(header, rows)


def _calibration_section(models: dict, calibrations: dict[str, dict], figures: dict[str, str]) -> list[str]:
    """ECE, MCE, Brier and NLL before and after temperature scaling, how T was fitted, and reliability diagrams."""
    n_bins = next(iter(calibrations.values()))["bins"]
    header = ["Model", "ECE", "MCE", "Brier", "NLL", "Temperature T", "T fitted on"]
    rows = []
    for name, calibration in calibrations.items():
        scores = models[name]["calibration"]
        rows.append([name, *(f"{scores[key]:.4f} → {scores['after_scaling'][key]:.4f}" for key in _CALIBRATION_SCORES),
                     f"{scores['temperature']:.3f}", _temperature_fit(calibration["temperature_fit"])])
    lines = [
        "## Calibration",
        "",
        f"Test split, before → after temperature scaling (probabilities softmax(logits / T)). ECE and MCE: expected "
        f"and maximum gap between confidence and accuracy of the top label over {n_bins} equal-width confidence bins; "
        "Brier score and NLL (negative log-likelihood) of the full probability vector. Lower is better for all four. "
        "T minimises the NLL on validation data; where that fit runs into the search bound (e.g. validation data "
        "without an error), T = 1 is applied instead. How each model's T was fitted:",
        "",
        *(f"- {scheme}: {', '.join(f'`{name}`' for name in names)}" for scheme, names in _fit_schemes(calibrations).items()),
        "",
        *_markdown_table(header, rows),
        "",
    ]
    for name in calibrations:
        if f"reliability:{name}" in figures:
            lines += [f"![Reliability diagram of {name}, before and after temperature scaling]"
                      f"({figures[f'reliability:{name}']})", ""]
    return lines


def _fit_schemes(calibrations: dict[str, dict]) -> dict[str, list[str]]:
    """Temperature-fitting scheme (as the calibrate stage describes it) -> the models fitted that way."""
    schemes: dict[str, list[str]] = {}
    for name, calibration in calibrations.items():
        schemes.setdefault(calibration["temperature_fit"]["scheme"], []).append(name)
    return schemes


def _temperature_fit(fit: dict) -> str:
    """Where a model's temperature was fitted, e.g. ``3 sites' local validation parts, 120 images``."""
    where = (f"{_count(len(fit['sites']), 'site')}' local validation parts" if "sites" in fit
             else "global validation split")
    bound = f"; fit at the search bound (T {fit['fitted_temperature']:.3g}), so not scaled" if fit.get("at_bound") else ""
    return f"{where}, {fit['n_val']} images{bound}"


def _cam_section(models: dict, cams: dict[str, dict], figures: dict[str, str], provenance: DataProvenance) -> list[str]:
    """The randomisation-test similarity per method and model, two panel grids and the images' source."""
    first = next(iter(cams.values()))
    methods = first["methods"]
    rows = [[name, *(_decimal(models[name]["cam_randomisation_similarity"].get(method), digits=2) for method in methods)]
            for name in cams]
    shown = next(iter(cams))
    source = ("Images: procedurally generated (synthetic data)." if provenance.is_synthetic
              else f"Images: {DATASET_CITATION}.")
    return [
        "## Grad-CAM",
        "",
        f"Class-activation maps (pytorch-grad-cam) of the predicted class on the `{first['target_layer']}` layer's "
        f"output. Model-parameter randomisation test: {first['randomisation']['measure']} between the trained model "
        f"and a {first['randomisation']['variant']} of it, over {first['randomisation']['n_images']} test images. "
        "Near 0: the maps depend on the learned weights; near 1: they would look the same untrained, so they do not "
        f"explain the model ({MISSING}: undefined, e.g. constant maps).",
        "",
        *_markdown_table(["Model", *methods], rows),
        "",
        f"Panels of `{shown}` (each row: the test image, then one overlay per method; true and predicted class and "
        "confidence above it). Misclassified test images, most confident first:",
        "",
        f"![Grad-CAM panels of misclassified test images, {shown}]({figures['cam:errors']})",
        "",
        "Correctly classified test images of one class, most confident first:",
        "",
        f"![Grad-CAM panels of correctly classified test images, {shown}]({figures['cam:correct']})",
        "",
        source,
        "",
    ]


def _audit_section(summary: dict, audit: dict) -> list[str]:
    """Accuracy of linear models on trivial cues next to the CNN's and the majority-class baseline."""
    cnn_name = CENTRALIZED if CENTRALIZED in summary["models"] else next(iter(summary["models"]))
    cnn = summary["models"][cnn_name]
    rows = [[label, f"{audit['features'][key]['description']} ({audit['features'][key]['count']} features)",
             _percent(audit[key]["accuracy"]), _percent(audit[key]["balanced_accuracy"])]
            for key, label in _SHORTCUTS.items()]
    rows += [["Majority class", "none: always the most frequent training class",
              _percent(audit["majority_class"]["accuracy"]), _percent(audit["majority_class"]["balanced_accuracy"])],
             [f"CNN (`{cnn_name}`)", "the whole image", _percent(cnn["accuracy"]), _percent(cnn["balanced_accuracy"])]]
    return [
        "## Shortcut audit",
        "",
        f"Standardised logistic regressions fitted on the train split ({audit['n_train']} images) using only trivial "
        f"cues, scored on the test split ({audit['n_test']} images).",
        "",
        *_markdown_table(["Predictor", "Features", "Accuracy", "Balanced accuracy"], rows),
        "",
        _audit_verdict(audit, cnn["accuracy"]),
        "",
    ]


def _audit_verdict(audit: dict, cnn_accuracy: float) -> str:
    """One sentence: how much of the CNN's gain over the majority-class baseline the best trivial cue reaches."""
    best = max(_SHORTCUTS, key=lambda key: audit[key]["accuracy"])
    cue, majority = audit[best]["accuracy"], audit["majority_class"]["accuracy"]
    opening = f"The best trivial cue, {_SHORTCUTS[best].lower()}, reaches {_percent(cue)} accuracy"
    if cnn_accuracy <= majority:
        return f"{opening}; the CNN does not beat the majority-class baseline, so the audit cannot say what it relies on."
    if cue >= cnn_accuracy:
        return (f"{opening}, as much as the CNN's {_percent(cnn_accuracy)} or more: non-morphological cues (stain, "
                "background, scale bar) alone could explain the CNN's score, so its accuracy is no evidence that it reads the cells.")
    share = max(cue - majority, 0.0) / (cnn_accuracy - majority)
    return (f"{opening}, {share:.0%} of the way from the majority-class baseline to the CNN: the larger this share, "
            "the more of the task such non-morphological cues (stain, background, scale bar) could explain on their own.")


def _byte_range(values: list[float | None]) -> str:
    """Bytes as ``123,456 B``, or ``low–high B`` where the sites differ."""
    present = [round(value) for value in values if value is not None]
    if not present:
        return MISSING
    low, high = min(present), max(present)
    return f"{low:,} B" if low == high else f"{low:,}–{high:,} B"


def _duration(seconds: float) -> str:
    """``42.0 s`` under a minute, else ``12.3 min``."""
    return f"{seconds:.1f} s" if seconds < SECONDS_PER_MINUTE else f"{seconds / SECONDS_PER_MINUTE:.1f} min"


def _megabytes(n_bytes: int) -> str:
    return f"{n_bytes / BYTES_PER_MB:.2f}"


def _per_class_table(per_class: dict[str, dict]) -> list[str]:
    """Precision, recall, F1 and support of each class."""
    rows = [
        [name, _percent(scores["precision"]), _recall(scores), _percent(scores["f1"]), str(scores["support"])]
        for name, scores in per_class.items()
    ]
    return _markdown_table(["Class", "Precision", "Recall", "F1", "Support"], rows)


def _recall(scores: dict | None) -> str:
    """A class's recall, or a dash where it is undefined (the class is absent from the evaluated images)."""
    # The metrics store 0 for an undefined recall (zero_division=0); printing 0.00% would read as a failure.
    return MISSING if scores is None or scores["support"] == 0 else _percent(scores["recall"])


def _percent(value: float | None, digits: int = 2) -> str:
    return MISSING if value is None else f"{100 * value:.{digits}f}%"


def _points(value: float | None, sign: bool = True) -> str:
    """A difference of two shares in percentage points, e.g. ``+0.35``."""
    return MISSING if value is None else f"{100 * value:{'+' if sign else ''}.2f}"


def _decimal(value: float | None, digits: int = 3) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub markdown table: the first column left-aligned (names), the others right-aligned (numbers)."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", r"\|") for cell in cells) + " |"

    return [line(header), line([":---"] + ["---:"] * (len(header) - 1)), *(line(row) for row in rows)]
