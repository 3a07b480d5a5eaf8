"""End to end on tiny synthetic data: Snakemake builds everything, reruns only what changed, DVC wraps it."""

from __future__ import annotations

import json
import re
import sys

import pytest
import yaml
from PIL import Image

from .conftest import run, write_params

pytestmark = pytest.mark.slow
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--cores", "2"]


def test_snakemake_builds_reruns_only_what_changed(project):
    run(SNAKEMAKE, project)

    summary = json.loads((project / "reports/synthetic/summary.json").read_text())
    centralized = summary["models"]["centralized"]
    assert summary["data"]["source"] == "synthetic" and summary["data"]["synthetic"] is True
    assert 0.0 <= centralized["accuracy"] <= 1.0
    assert set(centralized["per_class"]) == {"Benign", "Early", "Pre", "Pro"}
    assert "SYNTHETIC DATA" in (project / "reports/synthetic/README.md").read_text()
    metrics = json.loads((project / "results/synthetic/centralized/eval/metrics.json").read_text())
    assert metrics["data"]["fingerprint"] == summary["data"]["fingerprint"]
    assert (project / "results/synthetic/benchmarks/train_centralized.tsv").is_file()
    assert (project / "mlflow.db").is_file()
    _check_analysis(project / "results/synthetic", summary["data"]["fingerprint"])
    _check_report(project / "reports/synthetic", summary)

    assert "Nothing to be done" in run([*SNAKEMAKE, "-n"], project).stdout
    run([*SNAKEMAKE, "--report", "report.html"], project)
    html = (project / "report.html").read_text(errors="replace")
    for figure in ("confusion_matrix.png", "heterogeneity.png", "validation_accuracy_per_round.png", "reliability.png",
                   "errors.png"):
        assert figure in html, f"snakemake --report lacks {figure}"

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["epochs"] = 1
    write_params(project, params)
    planned = run([*SNAKEMAKE, "-n"], project).stdout
    for rule in ("train_centralized", "evaluate", "report"):
        assert f"rule {rule}:" in planned
    for rule in ("acquire", "preprocess", "split"):
        assert f"rule {rule}:" not in planned


def _check_analysis(results, fingerprint: str) -> None:
    """Calibration and Grad-CAM of every model, statistics and the shortcut audit, in their documented formats."""
    models = ["centralized", *yaml.safe_load((results.parents[1] / "params.yaml").read_text())["federation"]["runs"]]
    for model in models:
        calibration = json.loads((results / model / "calibration/calibration.json").read_text())
        assert set(calibration["overall"]) == {"ece", "mce", "brier", "nll"} and calibration["temperature"] > 0
        assert calibration["temperature_fit"]["scheme"].startswith("site-wise" if model != "centralized" else "global")
        cam = json.loads((results / model / "cam/cam.json").read_text())
        assert set(cam["randomisation_similarity"]) == set(cam["methods"])
        for panel in cam["panels"]:
            assert (results / model / "cam" / panel["file"]).is_file()
        for record in (calibration, cam):
            assert record["data"]["fingerprint"] == fingerprint
    statistics = json.loads((results / "comparison/statistics.json").read_text())
    assert set(statistics["models"]) == set(models) and set(statistics["mcnemar"]) == set(models) - {"centralized"}
    audit = json.loads((results / "audit/shortcut.json").read_text())
    assert 0.0 <= audit["border_colour"]["accuracy"] <= 1.0 and 0.0 <= audit["corner_patch"]["accuracy"] <= 1.0
    for record in (statistics, audit):
        assert record["data"]["fingerprint"] == fingerprint


REPORT_SECTIONS = ("Comparison", "Heterogeneity of the site partitions", "Validation accuracy per round",
                   "Fairness across sites", "Communication and cost", "Calibration", "Grad-CAM", "Shortcut audit",
                   "Privacy", "Reproducibility")
MODEL_KEYS = {"accuracy", "balanced_accuracy", "macro_f1", "per_class", "ci", "calibration", "cam_randomisation_similarity"}


def _check_report(reports, summary: dict) -> None:
    """README.md has every section in order and every image it links opens; summary.json has the documented keys."""
    readme = (reports / "README.md").read_text()
    positions = [readme.index(f"\n## {section}\n") for section in REPORT_SECTIONS]
    assert positions == sorted(positions), "README sections out of order"
    assert readme.rstrip().endswith("Sci Rep 16, 9768 (2026)."), "the citations close the report"
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert len(images) >= 9  # confusion matrices, heterogeneity, curves, reliability, CAM panels
    assert len([name for name in images if name.startswith("cam_")]) == 2, "only a few dataset image panels"
    for name in images:
        with Image.open(reports / name) as image:
            image.verify()
    assert {"dataset", "data", "models", "paper", "audit", "privacy"} <= summary.keys()
    assert {"border_colour", "corner_patch", "majority_class"} <= summary["audit"].keys()
    for name, model in summary["models"].items():
        assert MODEL_KEYS <= model.keys(), name
        assert {"ece", "mce", "brier", "nll", "temperature", "after_scaling"} <= model["calibration"].keys()
        assert all(model["ci"][key].keys() == {"estimate", "low", "high"} for key in ("accuracy", "balanced_accuracy", "macro_f1"))
        if name != "centralized":
            assert {"federation", "heterogeneity", "fairness", "mcnemar_vs_centralized"} <= model.keys(), name


def test_dvc_repro_reruns_training_not_data(project):
    run(["git", "init", "-q"], project)
    run(["dvc", "init", "-q"], project)
    run(["dvc", "repro", "--quiet"], project)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["pipeline"]["params"]["params.yaml"]["train"]["epochs"] == 2
    acquired = (project / "data/synthetic/source.json").stat().st_mtime_ns
    trained = (project / "results/synthetic/centralized/model.pt").stat().st_mtime_ns

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["epochs"] = 1
    write_params(project, params)
    assert "pipeline" in run(["dvc", "status"], project).stdout
    run(["dvc", "repro", "--quiet"], project)

    assert (project / "data/synthetic/source.json").stat().st_mtime_ns == acquired
    assert (project / "results/synthetic/centralized/model.pt").stat().st_mtime_ns > trained
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["pipeline"]["params"]["params.yaml"]["train"]["epochs"] == 1
    assert "up to date" in run(["dvc", "status"], project).stdout
