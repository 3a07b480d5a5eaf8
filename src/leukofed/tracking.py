"""MLflow tracking: the one module that writes to MLflow.

Run layout: one run per pipeline job (centralized training, a federated experiment), with a nested
child run per federated site. Every run carries the tags the caller passes (``data_source``,
``data_fingerprint``, ``dataset``, ``git_commit``); children inherit their parent's tags. Models are
registered as ``<prefix>-<dataset>-<run kind>`` and marked with an alias (registry stages are
deprecated in MLflow 3).

The tracking URI is ``tracking.tracking_uri`` unless the environment variable
``MLFLOW_TRACKING_URI`` is set, which wins: tests and CI point it at a throwaway store, e.g.
``file:/tmp/x/mlruns`` together with ``MLFLOW_ALLOW_FILE_STORE=true`` (creating a fresh file store
takes ~0.1 s against ~7 s for SQLite). MLflow is imported inside the functions: it takes ~3 s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from leukofed.config import TrackingParams
from leukofed.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
TRUNCATION_MARK = "...[truncated]"


def resolve_tracking_uri(tracking: TrackingParams) -> str:
    """The tracking URI to use: ``$MLFLOW_TRACKING_URI`` if set, else ``tracking.tracking_uri``."""
    return os.environ.get(TRACKING_URI_ENV) or tracking.tracking_uri


def registered_model_name(tracking: TrackingParams, dataset: str, kind: str) -> str:
    """Registry name ``<prefix>-<dataset>-<kind>``, e.g. ``leukofed-synthetic-fedavg-3``."""
    return f"{tracking.registered_model_prefix}-{dataset}-{kind}"


def _param_text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | tuple) else str(value)


def flatten_params(obj: Mapping, prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings into dotted keys with string values.

    Parameters
    ----------
    obj : Mapping
        E.g. ``params.model_dump()``.
    prefix : str
        Prepended to every key, followed by a dot.

    Returns
    -------
    dict of str to str
        ``{'train.lr': '0.003', 'data.classes': '["Benign", "Early", "Pre", "Pro"]', ...}``; lists
        are written as JSON, everything else with ``str``.
    """
    flat: dict[str, str] = {}
    for key, value in obj.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, name))
        else:
            flat[name] = _param_text(value)
    return flat


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _fit(value: str, limit: int) -> str:
    """``value`` cut to MLflow's length limit, visibly marked when cut."""
    return value if len(value) <= limit else value[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def _experiment_id(client: Any, name: str) -> str:
    """Id of experiment ``name``, created if missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name)
    if experiment.lifecycle_stage == "deleted":
        raise ConfigError(
            f"params: tracking.experiment '{name}' is a deleted MLflow experiment; restore it "
            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or choose another name"
        )
    return experiment.experiment_id


class RunTracker:
    """An MLflow run as a context manager.

    ``with RunTracker(tracking, run_name=..., params=flat, tags={...}) as run:`` starts the run
    (creating the experiment if missing), sets the tags and logs the params; leaving the block ends
    the run FINISHED, or FAILED if an exception escapes (KILLED on Ctrl-C).

    Parameters
    ----------
    tracking : TrackingParams
        The ``tracking`` section (URI, experiment name).
    run_name : str
        Display name of the run.
    params : Mapping of str to str, optional
        Flat params (see :func:`flatten_params`); values longer than MLflow's limit are truncated
        with a visible mark.
    tags : Mapping of str to str, optional
        Run tags; callers pass data_source, data_fingerprint, dataset and git_commit.
    parent : RunTracker, optional
        Makes this a nested run; use :meth:`child` rather than passing it.

    Notes
    -----
    ``mlflow.pytorch.log_model`` reads MLflow's process-wide tracking URI and active run, so entering
    a run sets that URI, and runs must be nested as ``with`` blocks (one active run at a time per thread).
    """

    def __init__(
        self,
        tracking: TrackingParams,
        run_name: str,
        *,
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
        parent: RunTracker | None = None,
    ) -> None:
        self.tracking = tracking
        self.run_name = run_name
        self.params = dict(params or {})
        self.tags = {**(parent.tags if parent else {}), **(tags or {})}
        self.parent = parent
        self._run: Any = None
        self._client: Any = None

    @property
    def run_id(self) -> str:
        """The MLflow run id (available inside the ``with`` block)."""
        if self._run is None:
            raise RuntimeError(f"run '{self.run_name}' has not started: use it as `with RunTracker(...) as run:`")
        return self._run.info.run_id

    def __enter__(self) -> RunTracker:
        import mlflow

        uri = resolve_tracking_uri(self.tracking)
        mlflow.set_tracking_uri(uri)
        self._client = mlflow.MlflowClient(uri)
        experiment_id = (
            self.parent._run.info.experiment_id if self.parent else _experiment_id(self._client, self.tracking.experiment)
        )
        self._run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=self.run_name,
            nested=self.parent is not None,
            parent_run_id=self.parent.run_id if self.parent else None,
            tags=self.tags,
        )
        try:
            self._log_params(self.params)
        except BaseException:
            mlflow.end_run(status="FAILED")
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        import mlflow

        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
        mlflow.end_run(status=status)

    def _log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        entries = [Param(key, _fit(str(value), MAX_PARAM_VAL_LENGTH)) for key, value in params.items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=chunk)

    def log_metrics(self, metrics: Mapping[str, float | None], step: int) -> None:
        """Log metrics at ``step`` (epoch or round); None values (e.g. no validation data) are skipped."""
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        now = get_current_time_millis()
        entries = [Metric(key, float(value), now, step) for key, value in metrics.items() if value is not None]
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=chunk)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file or folder into the run's artifacts (under ``artifact_path`` if given)."""
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_model(self, model: nn.Module, *, name: str, registered_name: str, alias: str | None = None) -> int:
        """Log a PyTorch model to this run, register it and point ``alias`` at the new version.

        Parameters
        ----------
        model : nn.Module
            Logged in eval mode and pickled whole (loading it needs ``leukofed`` importable); its
            training mode is restored afterwards.
        name : str
            Name of the logged model within the run.
        registered_name : str
            Registry name (see :func:`registered_model_name`); created if missing.
        alias : str, optional
            Alias to move to the new version (``tracking.model_alias``).

        Returns
        -------
        int
            The registered version.
        """
        import mlflow.pytorch

        was_training = model.training
        model.eval()
        try:
            info = mlflow.pytorch.log_model(
                model,
                name=name,
                registered_model_name=registered_name,
                run_id=self.run_id,
                # MLflow 3's default, pt2, needs an example input to trace; the model works at any size.
                serialization_format="pickle",
                # Explicit requirements: otherwise MLflow reloads the model in a subprocess to infer them.
                pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
            )
        finally:
            model.train(was_training)
        version = int(info.registered_model_version)
        if alias:
            self._client.set_registered_model_alias(registered_name, alias, str(version))
        return version

    def child(self, run_name: str, tags: Mapping[str, str] | None = None) -> RunTracker:
        """A nested run (a federated site), to be entered inside this run's ``with`` block."""
        return RunTracker(self.tracking, run_name, tags=tags, parent=self)
