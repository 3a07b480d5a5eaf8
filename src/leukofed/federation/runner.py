"""A tracked federated run and its outputs, the same for every transport.

:func:`federate_and_record` is what the in-process ``federate`` stage and the Flower ServerApp both
do around :func:`.engine.run_federation`: one MLflow parent run (``step = round``) with a nested run
per site, and ``model.pt`` (best round), ``final_model.pt``, ``rounds.csv`` and ``federation.json``
in the output folder, each carrying the data provenance. The caller supplies the sites (local data
or a transport) and what it knows of the data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from leukofed.config import Params
from leukofed.federation.engine import Transport, remove_checkpoint, round_table, run_federation, summarize
from leukofed.federation.site import PRIVACY_METRICS, SiteData
from leukofed.io import write_json, write_text
from leukofed.provenance import DataProvenance, run_tags

if TYPE_CHECKING:
    from leukofed.privacy.dp import PrivateTraining

CHECKPOINT_DIR = "checkpoint"


def federate_and_record(
    params: Params,
    dataset: str,
    run_name: str,
    model: nn.Module,
    sites: Sequence[SiteData] | Transport,
    *,
    provenance: DataProvenance,
    classes: list[str],
    image_size: int,
    data_key: str,
    out_dir: Path,
    extra: dict,
    privacy: Mapping[int, PrivateTraining] | None = None,
) -> str:
    """Train ``federation.runs.<run_name>`` over ``sites``, track it in MLflow and write its outputs.

    Parameters
    ----------
    params : Params
    dataset : str
        Dataset name (MLflow run names, tags and the registered model's name).
    run_name : str
        Entry of ``federation.runs``.
    model : nn.Module
        The initial global model (seeded by the caller).
    sites : sequence of SiteData, or Transport
        See :func:`.engine.run_federation`.
    provenance : DataProvenance
        The data the model is trained on (recorded in every output and tag).
    classes : list of str
        Class names in logit order; ``image_size``: the side of the training images.
    data_key : str
        Identifies the data for the round checkpoint's signature.
    out_dir : Path
        Output folder; the round checkpoint lives in its ``checkpoint/`` until the outputs are written.
    extra : dict
        Further entries of ``federation.json`` (heterogeneity, transport, per-site data).
    privacy : mapping of int to PrivateTraining, optional
        DP-SGD set-ups of in-process sites (see :func:`.engine.run_federation`). Whatever the
        transport, sites that report ``epsilon`` log it per round in their nested MLflow runs, and
        ``federation.json`` gets ``privacy``: each site's last reported (epsilon, delta).

    Returns
    -------
    str
        A one-line summary for the terminal.
    """
    from leukofed.model import count_parameters
    from leukofed.tracking import RunTracker, flatten_params, registered_model_name
    from leukofed.training import save_checkpoint

    run = params.federation.runs[run_name]
    settings = {"run": run.model_dump(), "federation": params.federation.model_dump(exclude={"runs"}),
                "model": params.model.model_dump(), "train": params.train.model_dump()}
    if privacy:
        settings["privacy"] = params.privacy.dp.model_dump()
    tags = {**run_tags(dataset, provenance, run_name), "strategy": run.strategy, "sites": str(run.sites)}
    out_dir = Path(out_dir)
    with RunTracker(params.tracking, run_name=f"{dataset}/{run_name}", params=flatten_params(settings), tags=tags) as tracker:
        result = run_federation(
            model, sites, run, params.federation, params.train,
            checkpoint_dir=out_dir / CHECKPOINT_DIR, data_key=data_key,
            on_round=lambda record: tracker.log_metrics(round_metrics(record), step=record["round"]),
            progress=params.runtime.progress, privacy=privacy,
        )
        _log_site_runs(tracker, result.records, dataset, run_name)
        summary = summarize(result, sites.sites() if hasattr(sites, "sites") else sites)
        record = {
            "model": run_name,
            "data": provenance.to_dict(),
            "n_parameters": count_parameters(model),
            **summary,
            **extra,
            **({"privacy": spent} if (spent := privacy_spent(result.records)) else {}),
            "resumed_from_round": result.resumed_from,
            "params": settings,
            "mlflow_run_id": tracker.run_id,
            "git_commit": tags["git_commit"],
        }
        write_text(out_dir / "rounds.csv", round_table(result.records).to_csv(index=False))
        write_json(out_dir / "federation.json", record)
        for name, state in (("final_model.pt", result.final_state), ("model.pt", result.best_state)):
            model.load_state_dict(state)  # model.pt last: the model stays the best one for registration
            save_checkpoint(
                out_dir / name, model, model_params=params.model, classes=classes,
                image_size=image_size, provenance=provenance, extra={"federation": record},
            )
        tracker.log_metrics({"best_val_accuracy": summary["best"]["val_accuracy"],
                             "fairness_jain": summary["fairness"]["best"]["jain"]}, step=result.best_round)
        for name in ("rounds.csv", "federation.json"):
            tracker.log_artifact(out_dir / name)
        version = tracker.log_model(
            model, name="model", registered_name=registered_model_name(params.tracking, dataset, run_name),
            alias=params.tracking.model_alias,
        )
    remove_checkpoint(out_dir / CHECKPOINT_DIR)
    return (
        f"federated {run_name} ({run.strategy}, {run.sites} sites, {summary['rounds']} rounds) in "
        f"{summary['timing']['round_median']:.1f} s per round: best global val accuracy {summary['best']['val_accuracy']:.4f} at round "
        f"{summary['best_round']}, Jain fairness {summary['fairness']['best']['jain']:.3f}, "
        f"{(summary['bytes']['sent'] + summary['bytes']['received']) / 1e6:.1f} MB exchanged; registered version {version}"
    )


def privacy_spent(records: Sequence[dict]) -> dict[str, dict]:
    """Each DP site's last reported ``epsilon`` and ``delta`` and the round it reported them in (empty without DP)."""
    spent = {}
    for record in records:
        for site, entry in record["sites"].items():
            if entry.get("epsilon") is not None:
                spent[str(site)] = {key: entry[key] for key in PRIVACY_METRICS} | {"round": record["round"]}
    return spent


def round_metrics(record: dict) -> dict[str, float]:
    """A round's global metrics for the parent MLflow run."""
    return {
        "val_loss": record["val_loss"],
        "val_accuracy": record["val_accuracy"],
        "sites_accepted": len(record["accepted"]),
        "sites_rejected": len(record["rejected"]),
        "bytes_sent": record["bytes_sent"],
        "bytes_received": record["bytes_received"],
        "round_seconds": record["seconds"],
    }


def _log_site_runs(tracker, records: list[dict], dataset: str, run_name: str) -> None:
    """One nested MLflow run per site with its per-round metrics (step = round).

    Written once the rounds are done: MLflow keeps one active run per thread, so the sites' runs
    cannot all stay open while the parent logs each round live.
    """
    for site in records[0]["sites"]:
        with tracker.child(f"{dataset}/{run_name}/site-{site}", tags={"site": str(site)}) as child:
            for record in records:
                child.log_metrics(record["sites"][site], step=record["round"])
