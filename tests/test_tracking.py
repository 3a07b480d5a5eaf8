"""MLflow tracking: params, metrics, tags, nested runs, run status, model registry."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from leukofed.config import TrackingParams, load_params
from leukofed.model import build_model
from leukofed.tracking import RunTracker, flatten_params, registered_model_name, resolve_tracking_uri

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"
TAGS = {"data_source": "synthetic", "data_fingerprint": "f" * 64, "dataset": "tiny", "git_commit": "abc"}


@pytest.fixture(scope="module")
def repo_params():
    return load_params(PARAMS_FILE)


@pytest.fixture()
def tracking(repo_params, tmp_path, monkeypatch) -> TrackingParams:
    """A throwaway file store, selected the way tests and CI select it: through the environment."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path}/mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    yield repo_params.tracking.model_copy(update={"tracking_uri": f"sqlite:///{tmp_path}/unused.db"})
    mlflow.set_tracking_uri(None)  # RunTracker sets MLflow's process-wide URI; do not leak it


def test_flatten_params_gives_dotted_string_values(repo_params):
    flat = flatten_params(repo_params.model_dump())

    assert flat["train.lr"] == "0.003"
    assert flat["train.augment.hflip"] == "True"
    assert flat["data.classes"] == '["Benign", "Early", "Pre", "Pro"]'
    assert flatten_params({"a": {"b": 1}}, prefix="p") == {"p.a.b": "1"}


def test_registered_model_name_follows_the_naming_rule(repo_params):
    assert registered_model_name(repo_params.tracking, "synthetic", "central") == "leukofed-synthetic-central"


def test_environment_uri_wins(tracking, tmp_path):
    assert resolve_tracking_uri(tracking) == f"file:{tmp_path}/mlruns"


def test_run_records_params_tags_and_metrics_per_step(tracking, tmp_path):
    params = {"train.lr": "0.003", "model.width": "16"}

    with RunTracker(tracking, run_name="central", params=params, tags=TAGS) as run:
        for epoch in range(1, 4):
            run.log_metrics({"train_loss": 1.0 / epoch, "val_accuracy": None}, step=epoch)

    client = MlflowClient()
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.info.run_name == "central"
    assert logged.data.params == params
    assert TAGS.items() <= logged.data.tags.items()
    history = client.get_metric_history(run.run_id, "train_loss")
    assert [(metric.step, metric.value) for metric in history] == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    assert "val_accuracy" not in logged.data.metrics
    assert client.get_experiment(logged.info.experiment_id).name == tracking.experiment
    assert (tmp_path / "mlruns").is_dir() and not (tmp_path / "unused.db").exists()


def test_many_and_long_params_are_logged(tracking):
    params = {f"p{i:03d}": str(i) for i in range(250)} | {"long": "x" * (MAX_PARAM_VAL_LENGTH + 10)}

    with RunTracker(tracking, run_name="many", params=params) as run:
        pass

    logged = MlflowClient().get_run(run.run_id).data.params
    assert len(logged) == 251
    assert len(logged["long"]) == MAX_PARAM_VAL_LENGTH and logged["long"].endswith("[truncated]")


def test_child_runs_are_nested_and_inherit_tags(tracking):
    with RunTracker(tracking, run_name="fedavg-3", tags=TAGS) as run:
        with run.child("site-0", tags={"site": "0"}) as site:
            site.log_metrics({"train_loss": 0.5}, step=1)

    client = MlflowClient()
    child = client.get_run(site.run_id)
    assert child.data.tags["mlflow.parentRunId"] == run.run_id
    assert child.data.tags["site"] == "0" and child.data.tags["data_fingerprint"] == TAGS["data_fingerprint"]
    assert child.info.experiment_id == client.get_run(run.run_id).info.experiment_id
    assert child.info.status == "FINISHED"


def test_run_ends_failed_on_exception(tracking):
    with pytest.raises(RuntimeError, match="boom"), RunTracker(tracking, run_name="broken") as run:
        raise RuntimeError("boom")

    assert MlflowClient().get_run(run.run_id).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_artifacts_are_logged(tracking, tmp_path):
    report = tmp_path / "metrics.json"
    report.write_text("{}")

    with RunTracker(tracking, run_name="artifacts") as run:
        run.log_artifact(report, artifact_path="reports")

    assert [item.path for item in MlflowClient().list_artifacts(run.run_id, "reports")] == ["reports/metrics.json"]


def test_model_is_registered_and_aliased(repo_params, tmp_path, monkeypatch):
    # The registry needs a database store: one fresh SQLite store (~7 s) for this one test.
    monkeypatch.chdir(tmp_path)  # SQLite stores put artifacts under ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    model = build_model(repo_params.model, n_classes=4).train()
    name = registered_model_name(repo_params.tracking, "tiny", "central")

    try:
        with RunTracker(repo_params.tracking, run_name="central", tags=TAGS) as run:
            first = run.log_model(model, name="model", registered_name=name, alias=repo_params.tracking.model_alias)
            second = run.log_model(model, name="model", registered_name=name, alias=repo_params.tracking.model_alias)
        client = MlflowClient()
        aliased = client.get_model_version_by_alias(name, repo_params.tracking.model_alias)
        loaded = mlflow.pytorch.load_model(f"models:/{name}@{repo_params.tracking.model_alias}")
    finally:
        mlflow.set_tracking_uri(None)

    assert (first, second) == (1, 2)
    assert int(aliased.version) == 2 and aliased.run_id == run.run_id
    assert model.training  # logging does not change the caller's model
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), model.eval()(images))
