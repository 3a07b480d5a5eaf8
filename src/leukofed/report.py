"""The results report: ``README.md``, ``summary.json`` and confusion-matrix figures for every evaluated model.

The report reads only what the evaluate stage wrote (``<results_dir>/<model>/eval/``), so it shows
exactly the numbers DVC tracks and is cheap to rebuild. It refuses to put models evaluated on
different data side by side, and says loudly when the data is synthetic.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from leukofed.errors import LeukofedError
from leukofed.evaluation.metrics import CONFUSION_PNG_FILE, METRICS_FILE
from leukofed.io import atomic_path, read_json, write_json, write_text
from leukofed.provenance import DataProvenance

EVAL_DIR = "eval"
SUMMARY_FILE = "summary.json"
README_FILE = "README.md"

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

_REQUIRED_KEYS = ("n", "accuracy", "balanced_accuracy", "macro_f1", "per_class", "data")
_CLASS_SCORES = ("precision", "recall", "f1", "support")
_MODEL_DATA_KEYS = ("source", "fingerprint", "n_images")


def build_report(results_dir: Path, out_dir: Path, *, paper_accuracy: dict[str, float], command: str) -> dict:
    """Compare every model evaluated under ``results_dir`` in ``out_dir``, each file written atomically.

    Parameters
    ----------
    results_dir : Path
        Holds one folder per model, each with ``eval/metrics.json`` and ``eval/confusion_matrix.png``
        from the evaluate stage (e.g. ``results/<dataset>/centralized/eval/``).
    out_dir : Path
        Receives ``summary.json``, ``README.md`` and ``confusion_matrix_<model>.png`` per model.
    paper_accuracy : dict of str to float
        Published test accuracy by model name (``report.paper_accuracy``), shown beside ours.
    command : str
        The exact command that made the results; recorded in the report.

    Returns
    -------
    dict
        The content of ``summary.json``: ``dataset``, ``data`` (``source``, ``fingerprint``,
        ``n_images``, ``synthetic``), ``models`` (name -> ``accuracy``, ``balanced_accuracy``,
        ``macro_f1``, ``per_class``, ``params``, ``data``, ``command``) and ``paper``.

    Raises
    ------
    LeukofedError
        If no model has been evaluated, a ``metrics.json`` or figure is missing or malformed, or the
        models were evaluated on different data (their fingerprints differ).
    """
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    evaluations = _load_evaluations(results_dir)
    provenance = _common_provenance(results_dir, evaluations)
    summary = {
        "dataset": provenance.dataset,
        "data": {key: getattr(provenance, key) for key in _MODEL_DATA_KEYS} | {"synthetic": provenance.is_synthetic},
        "models": {name: _model_summary(metrics, command) for name, metrics in evaluations.items()},
        "paper": dict(paper_accuracy),
    }
    figures = {name: _copy_figure(results_dir, out_dir, name) for name in evaluations}
    write_json(out_dir / SUMMARY_FILE, summary)
    write_text(out_dir / README_FILE, _readme(summary, evaluations, provenance, figures, command))
    return summary


def _load_evaluations(results_dir: Path) -> dict[str, dict]:
    """Model name -> its ``metrics.json``, for every ``<model>/eval/metrics.json`` under ``results_dir``."""
    paths = sorted(results_dir.glob(f"*/{EVAL_DIR}/{METRICS_FILE}"))
    if not paths:
        raise LeukofedError(
            f"{results_dir}: no evaluated model found (expected <model>/{EVAL_DIR}/{METRICS_FILE}); "
            "run the evaluate stage first"
        )
    return {path.parent.parent.name: _read_metrics(path) for path in paths}


def _read_metrics(path: Path) -> dict:
    """A ``metrics.json`` written by the evaluate stage, checked for the keys the report uses."""
    fix = "re-run the evaluate stage for this model"
    try:
        metrics = read_json(path)
    except json.JSONDecodeError as error:
        raise LeukofedError(f"{path}: not valid JSON ({error}); {fix}") from None
    missing = [key for key in _REQUIRED_KEYS if key not in metrics]
    missing += [f"data.{key}" for key in DataProvenance.__dataclass_fields__ if key not in metrics.get("data", {})]
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


def _copy_figure(results_dir: Path, out_dir: Path, name: str) -> str:
    """Copy a model's confusion-matrix PNG next to the report; return its name (the relative link)."""
    source = results_dir / name / EVAL_DIR / CONFUSION_PNG_FILE
    if not source.is_file():
        raise LeukofedError(f"{source}: confusion-matrix figure missing; re-run the evaluate stage for '{name}'")
    target_name = f"confusion_matrix_{name}.png"
    with atomic_path(out_dir / target_name, suffix=".png") as tmp:
        shutil.copyfile(source, tmp)
    return target_name


def _readme(
    summary: dict, evaluations: dict[str, dict], provenance: DataProvenance, figures: dict[str, str], command: str
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
        f"Paper accuracy: test accuracy reported by {PAPER_CITATION} for the model of that name "
        f"({MISSING} where it reports none).",
        "",
    ]
    for name, model in summary["models"].items():
        lines += [
            f"## {name}",
            "",
            f"Evaluated on {evaluations[name]['n']} images.",
            "",
            *_per_class_table(model["per_class"]),
            "",
            f"![Confusion matrix of {name}]({figures[name]})",
            "",
        ]
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
    """One row per model: overall scores, recall per class and the paper's accuracy."""
    classes = list(dict.fromkeys(name for model in summary["models"].values() for name in model["per_class"]))
    header = ["Model", "Accuracy", "Balanced accuracy", "Macro-F1"]
    header += [f"{name} recall" for name in classes] + ["Paper accuracy"]
    rows = []
    for name, model in summary["models"].items():
        recalls = [_recall(model["per_class"].get(cls)) for cls in classes]
        scores = [_percent(model[key]) for key in ("accuracy", "balanced_accuracy", "macro_f1")]
        rows.append([name, *scores, *recalls, _percent(summary["paper"].get(name))])
    return _markdown_table(header, rows)


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


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.2f}%"


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub markdown table: the first column left-aligned (names), the others right-aligned (numbers)."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", r"\|") for cell in cells) + " |"

    return [line(header), line([":---"] + ["---:"] * (len(header) - 1)), *(line(row) for row in rows)]
