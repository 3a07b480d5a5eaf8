"""End to end on tiny synthetic data: Snakemake builds everything, reruns only what changed, DVC wraps it."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

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

    assert "Nothing to be done" in run([*SNAKEMAKE, "-n"], project).stdout

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
