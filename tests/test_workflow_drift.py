"""dvc.yaml and the Snakemake DAG must describe the same pipeline (the DAG is the definition)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# Settings that change how fast a run is, never what it produces: no rerun when they change.
RESULT_NEUTRAL_PARAMS = {"runtime"}


@pytest.fixture(scope="module")
def params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture(scope="module")
def dvc() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


@pytest.fixture(scope="module")
def dag_outputs(params) -> dict[str, set[str]]:
    """Output files of the DAG that `rule all` builds, for every dataset in params, by rule."""
    outputs: dict[str, set[str]] = {}
    for dataset in params["datasets"]:
        summary = subprocess.run(
            [sys.executable, "-m", "snakemake", "--summary", "--config", f"dataset={dataset}"],
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout
        for line in summary.splitlines()[1:]:
            if "\t" in line:
                path, _date, rule, *_ = line.split("\t")
                outputs.setdefault(dataset, set()).add(path)
    return outputs


def _resolve(template: str, dataset: str) -> str:
    return template.replace("${dataset}", dataset)


def _paths(entries: list) -> list[str]:
    return [next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries]


def test_one_stage_runs_snakemake(dvc):
    assert list(dvc["stages"]) == ["pipeline"]
    stage = dvc["stages"]["pipeline"]
    assert stage["cmd"].startswith("snakemake ") and "dataset=${dataset}" in stage["cmd"]
    assert {"Snakefile", "workflow", "src/leukofed"} <= set(stage["deps"])


def test_stage_params_cover_every_result_changing_section(dvc, params):
    assert set(dvc["stages"]["pipeline"]["params"]) == set(params) - RESULT_NEUTRAL_PARAMS


def test_every_dag_output_is_a_persistent_dvc_out(dvc, params, dag_outputs):
    outs = dvc["stages"]["pipeline"]["outs"]
    assert all(next(iter(out.values()))["persist"] for out in outs), "DVC would delete Snakemake's outputs"
    for dataset, files in dag_outputs.items():
        roots = [_resolve(path, dataset) for path in _paths(outs)]
        stray = sorted(path for path in files if not any(path.startswith(root + "/") for root in roots))
        assert not stray, f"{dataset}: DAG outputs outside dvc.yaml outs: {stray}"


def test_dvc_metrics_and_plots_are_dag_outputs(dvc, dag_outputs):
    for dataset, files in dag_outputs.items():
        for path in dvc["metrics"] + _paths(dvc["plots"]):
            assert _resolve(path, dataset) in files, f"{path} is not produced by the Snakemake DAG"


def test_committed_reports_are_not_dvc_cached(dvc):
    reports = next(out for out in dvc["stages"]["pipeline"]["outs"] if next(iter(out)).startswith("reports/"))
    assert next(iter(reports.values()))["cache"] is False, "reports/ are committed to git, not DVC"
