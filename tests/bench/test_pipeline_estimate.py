"""benchmarks/pipeline_estimate.py: scenarios and the arithmetic of the estimate (nothing is timed here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from leukofed.config import load_params
from leukofed.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import pipeline_estimate  # noqa: E402


@pytest.fixture(scope="module")
def params():
    return load_params(ROOT / "params.yaml")


def _stage(name: str, fixed: float) -> dict:
    return {"stage": name, "fixed_seconds": fixed}


def test_a_scenario_keeps_params_values_for_unset_keys(params):
    settings = pipeline_estimate.parse_scenario("short: rounds=4, runs=fedavg-3+fedavg-5", params)

    assert settings == {"label": "short", "epochs": params.train.epochs, "rounds": 4,
                        "local_epochs": params.federation.local_epochs, "runs": ["fedavg-3", "fedavg-5"], "drop": []}


@pytest.mark.parametrize("text, named", [
    ("no body", "label: key=value"),
    ("x: speed=3", "speed=3"),
    ("x: rounds=0", "rounds must be a positive integer"),
    ("x: runs=fedavg-3+nope", "['nope']"),
])
def test_bad_scenarios_are_refused_naming_the_problem(params, text, named):
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        pipeline_estimate.parse_scenario(text, params)


def test_estimate_adds_fixed_parts_epochs_and_rounds_and_drops_left_out_runs(params):
    runs = list(params.federation.runs)
    stages = [_stage("preprocess", 10), _stage("train_centralized", 20), _stage("evaluate_centralized", 5)]
    stages += [_stage(f"federate_{run}", 30) for run in runs] + [_stage(f"evaluate_{run}", 5) for run in runs]
    centralized = {"per_epoch_seconds": 7.0}
    rounds = {run: {"train_seconds_per_local_epoch": 6.0, "rest_seconds": 1.0} for run in runs}
    kept = runs[:2]
    stages.append({"stage": "privacy", "rule": "privacy", "fixed_seconds": 400})
    settings = {"label": "t", "epochs": 10, "rounds": 5, "local_epochs": 2, "runs": kept, "drop": ["privacy"]}

    result = pipeline_estimate.estimate(settings, centralized, rounds, stages, params)

    assert result["stages_seconds"]["train_centralized"] == pytest.approx(20 + 10 * 7)
    assert all(result["stages_seconds"][f"federate_{run}"] == pytest.approx(30 + 5 * (2 * 6 + 1)) for run in kept)
    assert not any(name.endswith(f"_{runs[2]}") for name in result["stages_seconds"])
    assert "privacy" not in result["stages_seconds"]
    assert result["total_seconds"] == pytest.approx(10 + 90 + 5 + 2 * (95 + 5))


def test_fixed_costs_leave_out_the_recorded_epochs_rounds_and_old_timing_run(tmp_path):
    results = tmp_path / "results" / "demo"
    bench = results / "benchmarks"
    bench.mkdir(parents=True)
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for stage, seconds in (("train_centralized", 100), ("federate_fedavg-3", 200), ("report", 5)):
        (bench / f"{stage}.tsv").write_text(header + f"{seconds}\t0:00:00\t1\t1\t1\t1\t0\t0\t99\t{seconds}\n")
    (results / "centralized").mkdir()
    (results / "centralized" / "history.csv").write_text("epoch,seconds\n1,40\n2,45\n")
    (results / "fedavg-3").mkdir()
    (results / "fedavg-3" / "rounds.csv").write_text("round,seconds\n1,80\n2,90\n")
    (results / "fedavg-3" / "federation.json").write_text('{"timing": {"centralized_equivalent": 20}}')

    stages = {entry["stage"]: entry["fixed_seconds"] for entry in pipeline_estimate.fixed_costs(tmp_path, "demo")}

    assert stages == {"train_centralized": pytest.approx(15), "federate_fedavg-3": pytest.approx(10), "report": pytest.approx(5)}
