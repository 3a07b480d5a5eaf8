"""Tests of leukofed.report on results trees made by the real evaluate-stage writer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from leukofed.errors import LeukofedError
from leukofed.evaluation.metrics import write_evaluation
from leukofed.provenance import DataProvenance
from leukofed.report import build_report

CLASSES = ["Benign", "Early", "Pre", "Pro"]
MODELS = ["centralized", "fedavg-3"]
PAPER = {"fedavg-3": 0.9570, "fedavg-5": 0.9656}
COMMAND = "snakemake --cores 2 --config dataset=toy"
FINGERPRINT = "cd" * 32


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory) -> dict[str, Path]:
    """One evaluate-stage output folder per data source, written once (plotting is the slow part)."""
    y_true = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    y_pred = np.array([0, 1, 1, 1, 2, 2, 3, 0])
    proba = np.full((len(y_true), len(CLASSES)), 0.1)
    proba[np.arange(len(y_true)), y_pred] = 0.7
    relpaths = [f"img{i}.jpg" for i in range(len(y_true))]
    folders = {}
    for source in ("synthetic", "folder"):
        folders[source] = tmp_path_factory.mktemp(source) / "eval"
        provenance = DataProvenance("toy", source, "/data/toy", FINGERPRINT, 400)
        model_info = {"name": "toy", "params": {"epochs": 3}}
        write_evaluation(folders[source], y_true, proba, CLASSES, relpaths, provenance, model_info, "toy")
    return folders


def _results(tmp_path: Path, eval_dir: Path, models: list[str] = MODELS) -> Path:
    results = tmp_path / "results" / "toy"
    for name in models:
        shutil.copytree(eval_dir, results / name / "eval")
    return results


def test_summary_has_the_documented_structure(tmp_path, evaluations):
    results, out = _results(tmp_path, evaluations["synthetic"]), tmp_path / "reports"

    summary = build_report(results, out, paper_accuracy=PAPER, command=COMMAND)

    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary.keys() == {"dataset", "data", "models", "paper"}
    assert summary["dataset"] == "toy"
    assert summary["data"] == {"source": "synthetic", "fingerprint": FINGERPRINT, "n_images": 400, "synthetic": True}
    assert summary["paper"] == PAPER
    assert list(summary["models"]) == MODELS
    model = summary["models"]["fedavg-3"]
    assert model.keys() == {"accuracy", "balanced_accuracy", "macro_f1", "per_class", "params", "data", "command"}
    assert model["accuracy"] == pytest.approx(6 / 8)
    assert model["per_class"]["Benign"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert model["params"] == {"epochs": 3}
    assert model["data"] == {"source": "synthetic", "fingerprint": FINGERPRINT, "n_images": 400}
    assert model["command"] == COMMAND


def test_readme_compares_models_and_links_their_figures(tmp_path, evaluations):
    results, out = _results(tmp_path, evaluations["synthetic"]), tmp_path / "reports"

    build_report(results, out, paper_accuracy=PAPER, command=COMMAND)

    readme = (out / "README.md").read_text()
    assert readme.startswith("# SYNTHETIC DATA")
    assert "> **SYNTHETIC DATA.**" in readme
    rows = {line.split(" | ")[0].lstrip("| "): line for line in readme.splitlines() if line.startswith("| ")}
    assert rows["fedavg-3"].endswith("| 95.70% |")
    assert rows["centralized"].endswith("| — |")
    assert "| 75.00% |" in rows["centralized"]  # accuracy with 2 decimals
    for name in MODELS:
        assert f"## {name}" in readme
        assert f"](confusion_matrix_{name}.png)" in readme
        copied = out / f"confusion_matrix_{name}.png"
        assert copied.read_bytes() == (results / name / "eval" / "confusion_matrix.png").read_bytes()
    assert FINGERPRINT in readme and COMMAND in readme
    assert "doi:10.34740/KAGGLE/DSV/2175623" in readme and "Sci Rep 16, 9768 (2026)" in readme


def test_real_data_has_no_synthetic_banner(tmp_path, evaluations):
    results, out = _results(tmp_path, evaluations["folder"]), tmp_path / "reports"

    summary = build_report(results, out, paper_accuracy=PAPER, command=COMMAND)

    assert summary["data"]["synthetic"] is False
    readme = (out / "README.md").read_text()
    assert "SYNTHETIC" not in readme
    assert readme.startswith("# leukofed results (toy, 400 images, data cdcdcdcdcdcd)")


def test_no_results_is_an_error_that_names_the_folder_and_fix(tmp_path):
    results = tmp_path / "results" / "toy"
    results.mkdir(parents=True)

    with pytest.raises(LeukofedError, match="evaluate stage") as error:
        build_report(results, tmp_path / "reports", paper_accuracy=PAPER, command=COMMAND)
    assert str(results) in str(error.value)
    assert not (tmp_path / "reports").exists()


def test_models_on_different_data_are_refused(tmp_path, evaluations):
    results = _results(tmp_path, evaluations["synthetic"])
    metrics_path = results / "fedavg-3" / "eval" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["data"]["fingerprint"] = "ef" * 32
    metrics_path.write_text(json.dumps(metrics))

    with pytest.raises(LeukofedError, match="different data") as error:
        build_report(results, tmp_path / "reports", paper_accuracy=PAPER, command=COMMAND)
    assert "centralized" in str(error.value) and "fedavg-3" in str(error.value)


def test_malformed_metrics_names_the_file(tmp_path, evaluations):
    results = _results(tmp_path, evaluations["synthetic"])
    metrics_path = results / "centralized" / "eval" / "metrics.json"
    metrics_path.write_text(json.dumps({"accuracy": 0.5}))

    with pytest.raises(LeukofedError, match="missing") as error:
        build_report(results, tmp_path / "reports", paper_accuracy=PAPER, command=COMMAND)
    assert str(metrics_path) in str(error.value)


def test_recall_of_a_class_absent_from_the_evaluation_shows_a_dash(tmp_path, evaluations):
    results, out = _results(tmp_path, evaluations["folder"], ["centralized"]), tmp_path / "reports"
    metrics_path = results / "centralized" / "eval" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["per_class"]["Pro"].update(support=0, recall=0.0)  # what zero_division=0 stores
    metrics_path.write_text(json.dumps(metrics))

    build_report(results, out, paper_accuracy=PAPER, command=COMMAND)

    readme = (out / "README.md").read_text()
    comparison_row = next(line for line in readme.splitlines() if line.startswith("| centralized |"))
    pro_recall = comparison_row.strip("| ").split(" | ")[7]  # model, 3 scores, Benign..Pro recall
    assert pro_recall == "—"
    assert "| Pro | 100.00% | — | " in readme
