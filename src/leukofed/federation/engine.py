"""In-process federated training: rounds of local training at simulated sites and server aggregation.

One round: the server picks ``ceil(fraction_fit * N)`` sites with its seeded generator; each starts
from the global weights and runs :func:`leukofed.training.train_model` for ``local_epochs`` on its
local training part (FedProx adds ``mu/2 * ||w - w_global||^2``); the server averages the valid
updates by training-sample count and applies its optimizer (:mod:`.aggregation`); then it evaluates
the new global model on every site's local validation part. The sample-weighted mean over the sites
is the global validation score, which picks the best round.

Choices worth knowing:

- **Faults.** A site whose loss becomes non-finite (``NonFiniteLossError``) or whose returned weights
  hold NaN/inf is left out of that round's average; the round record names the site and the reason.
  With fewer than ``min_sites`` valid updates the round keeps the previous global weights.
- **BatchNorm.** ``global``: running statistics are averaged like the weights (plain FedAvg).
  ``local`` (FedBN): the server sends no BatchNorm entries, so each site keeps its own BatchNorm
  weights and statistics across rounds; sites still upload them so that the server can form one
  servable global model, which uses their sample-weighted average.
- **Learning rate.** ``train.lr_schedule`` runs over the rounds: with ``cosine`` each round's local
  learning rate is ``train.lr`` scaled by a cosine of the round number, constant within the round.
- **Bytes.** Sent: the global entries a site downloads; received: the entries it uploads (0 if its
  training raised). Tensor payload only, as ``numel * element_size``.
- **Determinism.** All randomness comes from the server generator (``federation.seed``): the site
  selection and one training seed per selected site and round. On CPU, identical inputs give
  bitwise-identical weights.
- **Checkpoint.** After every round, the global weights, server-optimizer state, generator state,
  best round, FedBN site states and all round records are written atomically to one file. A rerun
  with the same settings and data continues after the last finished round and ends with the same
  weights as an uninterrupted run; a checkpoint made with other settings is ignored.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from leukofed.config import FederationParams, FederationRun, TrainParams
from leukofed.federation.aggregation import (
    batchnorm_keys,
    exchanged_keys,
    init_server_state,
    non_finite_keys,
    parameter_keys,
    server_step,
    state_nbytes,
    weighted_average,
)
from leukofed.errors import DataError
from leukofed.io import atomic_path
from leukofed.training import CheckpointError, NonFiniteLossError, predict_proba, train_model

CHECKPOINT_FILE = "state.pt"
CHECKPOINT_FORMAT = "leukofed-federation-checkpoint"
SEED_BOUND = 2**31 - 1  # per-site training seeds are drawn below this (a valid seed everywhere)
_PROBABILITY_FLOOR = np.finfo(np.float32).tiny  # keeps log(p) finite for a confidently wrong prediction


@dataclass(frozen=True)
class SiteData:
    """One site's local data: uint8 images ``(n, H, W, 3)`` and class indices ``(n,)``."""

    number: int  # from 1, as in partition.csv
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray


def sites_from_partition(cache, table: pd.DataFrame, partition_path: Path, n_sites: int) -> list[SiteData]:
    """Each site's local train and validation images and labels, from a partition (``partition.csv``) of ``cache``.

    Raises
    ------
    DataError
        If the partition was made from another cache or does not hold sites ``1..n_sites``.
    """
    rows = table["row"].to_numpy()
    relpaths = cache.index["relpath"].to_numpy()
    if rows.max(initial=-1) >= len(cache.index) or not (relpaths[rows] == table["relpath"].to_numpy()).all():
        raise DataError(f"{partition_path}: does not match the cache it is used with; rerun the partition stage")
    if sorted(set(table["site"])) != list(range(1, n_sites + 1)):
        raise DataError(
            f"{partition_path}: holds sites {sorted(set(table['site']))}, not 1..{n_sites}; rerun the partition stage"
        )
    labels = cache.index["label_index"].to_numpy()
    sites = []
    for number in range(1, n_sites + 1):
        at_site = table["site"] == number
        train, val = (table.loc[at_site & (table["part"] == part), "row"].to_numpy() for part in ("train", "val"))
        sites.append(SiteData(number, np.asarray(cache.images[train]), labels[train],
                              np.asarray(cache.images[val]), labels[val]))
    return sites


@dataclass
class FederationResult:
    """What :func:`run_federation` returns.

    Attributes
    ----------
    best_state, final_state : dict
        Global weights of the best round (highest global validation accuracy, then lowest loss,
        then earliest) and of the last round.
    best_round : int
    records : list of dict
        One per round, see :func:`run_federation`.
    resumed_from : int
        The last finished round found in the checkpoint (0: started fresh).
    """

    best_state: dict
    final_state: dict
    best_round: int
    records: list[dict]
    resumed_from: int


@dataclass
class _ServerState:
    """Everything a round changes; saved whole after every round."""

    signature: str
    global_state: dict
    optimizer_state: dict
    rng: np.random.Generator
    best_state: dict
    best_round: int = 0
    records: list[dict] = field(default_factory=list)
    site_local: dict[int, dict] = field(default_factory=dict)  # FedBN: each site's BatchNorm entries

    @property
    def finished(self) -> int:
        return len(self.records)


def run_federation(
    model: nn.Module,
    sites: Sequence[SiteData],
    run: FederationRun,
    federation: FederationParams,
    train: TrainParams,
    *,
    checkpoint_dir: Path,
    data_key: str,
    on_round: Callable[[dict], None] | None = None,
    progress: bool = False,
) -> FederationResult:
    """Train ``model`` federatedly over ``sites`` for ``run.rounds`` rounds, resuming from a checkpoint.

    Parameters
    ----------
    model : nn.Module
        Its current weights are the initial global model; it ends holding the best global weights.
    sites : sequence of SiteData
        Every site, each with non-empty local train and validation parts.
    run : FederationRun
        ``strategy`` and ``rounds``.
    federation : FederationParams
        ``local_epochs``, ``fraction_fit``, ``min_sites``, ``batchnorm``, ``seed`` and the strategy settings.
    train : TrainParams
        Local training settings (its ``seed`` is replaced per site and round).
    checkpoint_dir : Path
        Where the round checkpoint lives; see :func:`remove_checkpoint`.
    data_key : str
        Identifies the data (e.g. the partition file's hash); part of the checkpoint's signature.
    on_round : callable, optional
        Called with each round's record once the round is checkpointed; after a resume, first with
        every restored record, so a fresh tracking run receives the whole history.
    progress : bool
        Show local training progress bars.

    Returns
    -------
    FederationResult
        Each record holds ``round``, ``selected``, ``accepted``, ``rejected`` (site -> reason),
        ``kept_previous``, ``lr`` (the round's local learning rate), ``val_loss``, ``val_accuracy``, ``bytes_sent``, ``bytes_received``,
        ``seconds``, ``train_seconds``, ``aggregate_seconds``, ``eval_seconds`` and ``sites``
        (site number -> ``train_loss``, ``train_accuracy``, ``val_loss``, ``val_accuracy``,
        ``bytes_sent``, ``bytes_received``; training entries None when not selected or rejected).
    """
    local_keys = batchnorm_keys(model) if federation.batchnorm == "local" else frozenset()
    initial = _snapshot(model.state_dict())
    signature = _signature(initial, run, federation, train, sites, data_key)
    path = Path(checkpoint_dir) / CHECKPOINT_FILE
    state = _load_checkpoint(path, signature) or _fresh_state(initial, signature, run.strategy, federation, model)
    resumed_from = state.finished
    for record in state.records if on_round is not None else []:
        on_round(record)
    mu = federation.fedprox.mu if run.strategy == "fedprox" else 0.0
    for round_number in range(state.finished + 1, run.rounds + 1):
        record = _run_round(model, sites, state, round_number, run, federation, train, local_keys, mu, progress)
        _save_checkpoint(path, state)
        if on_round is not None:
            on_round(record)
    model.load_state_dict(state.best_state)
    return FederationResult(
        best_state=state.best_state, final_state=state.global_state, best_round=state.best_round,
        records=state.records, resumed_from=resumed_from,
    )


def _run_round(
    model: nn.Module,
    sites: Sequence[SiteData],
    state: _ServerState,
    round_number: int,
    run: FederationRun,
    federation: FederationParams,
    train: TrainParams,
    local_keys: frozenset[str],
    mu: float,
    progress: bool,
) -> dict:
    """One round: local training at the selected sites, aggregation, server-side evaluation."""
    started = time.perf_counter()
    n_selected = math.ceil(federation.fraction_fit * len(sites))
    selected = np.sort(state.rng.choice(len(sites), size=n_selected, replace=False))
    seeds = state.rng.integers(0, SEED_BOUND, size=n_selected)
    local_train = train.model_copy(update={"lr": round_lr(train, round_number, run.rounds), "lr_schedule": "constant"})
    sent_keys = exchanged_keys(state.global_state, local_keys)
    received_keys = exchanged_keys(state.global_state)
    site_records = {site.number: _idle_site() for site in sites}
    accepted, updates, weights, rejected = [], [], [], {}
    for index, seed in zip(selected, seeds, strict=True):
        site = sites[index]
        entry = site_records[site.number]
        entry["bytes_sent"] = state_nbytes(state.global_state, sent_keys)
        update, history, reason = _train_site(model, site, state, local_train.model_copy(update={"seed": int(seed)}),
                                              federation.local_epochs, mu, progress)
        if update is not None:
            entry["bytes_received"] = state_nbytes(update, received_keys)
            reason = reason or _non_finite_reason(update, received_keys)
        if reason is not None:
            rejected[site.number] = reason
            continue
        entry |= {"train_loss": history["train_loss"], "train_accuracy": history["train_accuracy"]}
        accepted.append(site.number)
        updates.append(update)
        weights.append(len(site.train_labels))
    train_seconds = time.perf_counter() - started

    kept_previous = len(updates) < federation.min_sites
    if not kept_previous:
        for number, update in zip(accepted, updates, strict=True):
            if local_keys:  # FedBN: the site keeps the BatchNorm entries it trained
                state.site_local[number] = {key: update[key] for key in local_keys}
        average = weighted_average(updates, weights, received_keys)
        optimized = parameter_keys(model) & set(average)
        entries, state.optimizer_state = server_step(
            run.strategy, state.global_state, average, state.optimizer_state, optimized, federation
        )
        state.global_state = {**state.global_state, **entries}
    aggregate_seconds = time.perf_counter() - started - train_seconds

    model.load_state_dict(state.global_state)
    val_loss, val_accuracy = _evaluate_sites(model, sites, train.eval_batch_size, site_records)
    record = {
        "round": round_number,
        "selected": [sites[index].number for index in selected],
        "accepted": accepted,
        "rejected": rejected,
        "kept_previous": kept_previous,
        "lr": local_train.lr,
        "val_loss": val_loss,
        "val_accuracy": val_accuracy,
        "bytes_sent": sum(entry["bytes_sent"] for entry in site_records.values()),
        "bytes_received": sum(entry["bytes_received"] for entry in site_records.values()),
        "seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "aggregate_seconds": aggregate_seconds,
        "eval_seconds": time.perf_counter() - started - train_seconds - aggregate_seconds,
        "sites": site_records,
    }
    state.records.append(record)
    if _improves(record, state.records[state.best_round - 1] if state.best_round else None):
        state.best_round, state.best_state = round_number, state.global_state
    return record


def round_lr(train: TrainParams, round_number: int, rounds: int) -> float:
    """The local learning rate of a round: ``train.lr_schedule`` applied over the rounds.

    ``cosine`` decays it from ``train.lr`` in round 1 towards 0 by the last round, as the centralized
    run decays it over its steps; within a round it stays constant. (Restarting a cosine inside every
    short round would halve the mean step size and never let the late rounds settle.)
    """
    if train.lr_schedule == "cosine":
        return train.lr * 0.5 * (1 + math.cos(math.pi * (round_number - 1) / rounds))
    return train.lr


def _idle_site() -> dict:
    return {"train_loss": None, "train_accuracy": None, "val_loss": None, "val_accuracy": None,
            "bytes_sent": 0, "bytes_received": 0}


def _train_site(
    model: nn.Module, site: SiteData, state: _ServerState, params: TrainParams, epochs: int, mu: float, progress: bool
) -> tuple[dict | None, dict | None, str | None]:
    """Local training from the global weights (FedBN: with the site's own BatchNorm entries).

    Returns the site's weights and last-epoch history record, or (None, None, reason) if training diverged.
    """
    model.load_state_dict(state.global_state)
    if site.number in state.site_local:
        model.load_state_dict(state.site_local[site.number], strict=False)
    try:
        result = train_model(
            model, site.train_images, site.train_labels, params, epochs=epochs, proximal_mu=mu, progress=progress
        )
    except NonFiniteLossError as error:
        return None, None, f"non-finite training loss ({error})"
    return result.state_dict, result.history[-1], None


def _non_finite_reason(update: dict, keys: list[str]) -> str | None:
    bad = non_finite_keys(update, keys)
    return f"non-finite values in the update ({', '.join(bad)})" if bad else None


def _evaluate_sites(model: nn.Module, sites: Sequence[SiteData], batch_size: int, site_records: dict) -> tuple[float, float]:
    """Loss and accuracy of ``model`` on each site's validation part; returns their sample-weighted means."""
    losses, correct, total = 0.0, 0, 0
    for site in sites:
        proba = predict_proba(model, site.val_images, batch_size)
        picked = np.maximum(proba[np.arange(len(site.val_labels)), site.val_labels], _PROBABILITY_FLOOR)
        site_loss = float(-np.log(picked.astype(np.float64)).mean())
        site_correct = int((proba.argmax(axis=1) == site.val_labels).sum())
        site_records[site.number] |= {"val_loss": site_loss, "val_accuracy": site_correct / len(site.val_labels)}
        losses += site_loss * len(site.val_labels)
        correct += site_correct
        total += len(site.val_labels)
    return losses / total, correct / total


def _improves(record: dict, best: dict | None) -> bool:
    """Higher global validation accuracy wins, then lower loss; ties keep the earlier round."""
    if best is None:
        return True
    if record["val_accuracy"] != best["val_accuracy"]:
        return record["val_accuracy"] > best["val_accuracy"]
    return record["val_loss"] < best["val_loss"]


def fairness(accuracies: Sequence[float]) -> dict:
    """How evenly a model serves the sites: statistics of its per-site accuracies.

    Parameters
    ----------
    accuracies : sequence of float
        Accuracy on each site's local validation part.

    Returns
    -------
    dict
        ``mean``, ``std`` (population), ``cv`` (std / mean), ``min``, ``max``, ``gap`` (max - min) and
        ``jain`` (Jain's index ``(sum a)^2 / (n * sum a^2)``: 1 when equal, ``1/n`` when one site has it all).
    """
    values = np.asarray(accuracies, dtype=float)
    mean = float(values.mean())
    squares = float(np.square(values).sum())
    return {
        "mean": mean,
        "std": float(values.std()),
        "cv": float(values.std() / mean) if mean > 0 else None,
        "min": float(values.min()),
        "max": float(values.max()),
        "gap": float(values.max() - values.min()),
        "jain": float(values.sum() ** 2 / (len(values) * squares)) if squares > 0 else None,
    }


def _snapshot(state: dict) -> dict:
    return {key: value.detach().clone() for key, value in state.items()}


def _signature(
    initial: dict, run: FederationRun, federation: FederationParams, train: TrainParams, sites: Sequence[SiteData],
    data_key: str,
) -> str:
    """A hash of everything the result depends on: a checkpoint with another signature is not resumed."""
    digest = hashlib.sha256()
    settings = {"run": run.model_dump(), "federation": federation.model_dump(), "train": train.model_dump(),
                "data": data_key, "sites": [(site.number, len(site.train_labels), len(site.val_labels)) for site in sites]}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for key, value in initial.items():
        digest.update(key.encode())
        digest.update(value.cpu().numpy().tobytes())
    return digest.hexdigest()


def _fresh_state(initial: dict, signature: str, strategy: str, federation: FederationParams, model: nn.Module) -> _ServerState:
    return _ServerState(
        signature=signature,
        global_state=initial,
        optimizer_state=init_server_state(strategy, initial, parameter_keys(model)),
        rng=np.random.default_rng(federation.seed),
        best_state=initial,
    )


def _save_checkpoint(path: Path, state: _ServerState) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "signature": state.signature,
        "global_state": state.global_state,
        "optimizer_state": state.optimizer_state,
        "rng": json.dumps(state.rng.bit_generator.state),  # 128-bit integers: JSON keeps them exact
        "best_state": state.best_state,
        "best_round": state.best_round,
        "records": state.records,
        "site_local": {str(site): entries for site, entries in state.site_local.items()},
    }
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)


def _load_checkpoint(path: Path, signature: str) -> _ServerState | None:
    """The saved state, or None if there is none or it was made with other settings or data."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt files
        raise CheckpointError(f"{path}: unreadable federation checkpoint ({error}); delete it to start over") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT or payload["signature"] != signature:
        return None
    rng = np.random.default_rng()
    rng.bit_generator.state = json.loads(payload["rng"])
    return _ServerState(
        signature=signature,
        global_state=payload["global_state"],
        optimizer_state=payload["optimizer_state"],
        rng=rng,
        best_state=payload["best_state"],
        best_round=payload["best_round"],
        records=payload["records"],
        site_local={int(site): entries for site, entries in payload["site_local"].items()},
    )


def round_table(records: Sequence[dict]) -> pd.DataFrame:
    """One row per round: the global columns, then ``site<k>_<metric>`` for every site.

    ``rejected`` reads ``"<site>: <reason>"`` joined by ``"; "`` (empty when none was rejected);
    ``selected`` and ``accepted`` are site numbers joined by spaces.
    """
    rows = []
    for record in records:
        row = {key: value for key, value in record.items() if key not in ("sites", "selected", "accepted", "rejected")}
        row |= {
            "selected": " ".join(map(str, record["selected"])),
            "accepted": " ".join(map(str, record["accepted"])),
            "rejected": "; ".join(f"{site}: {reason}" for site, reason in record["rejected"].items()),
        }
        for site, entry in record["sites"].items():
            row |= {f"site{site}_{key}": value for key, value in entry.items()}
        rows.append(row)
    return pd.DataFrame(rows)


def summarize(result: FederationResult, sites: Sequence[SiteData]) -> dict:
    """What a federated run achieved and cost: scores, fairness, bytes, faults and timings.

    Returns
    -------
    dict
        ``rounds``, ``best_round``, ``best`` and ``final`` (global ``val_accuracy``, ``val_loss``),
        ``fairness`` (``best``, ``final``: :func:`fairness` of the per-site validation accuracies),
        ``bytes`` (``sent``, ``received``: totals over all rounds and sites), ``sites`` (site ->
        ``n_train``, ``n_val``, ``rounds_selected``, ``rounds_rejected``, ``bytes_sent``,
        ``bytes_received``, ``val_accuracy_best``, ``val_accuracy_final``), ``rejections`` (``round``,
        ``site``, ``reason``), ``kept_previous_rounds`` and ``timing`` (seconds per round: ``round_mean``, ``round_median``
        (robust to the first round's one-off kernel set-up), ``train_mean``, ``aggregate_mean``, ``eval_mean``).
    """
    records = result.records
    best, final = records[result.best_round - 1], records[-1]
    per_site = {}
    for site in sites:
        entries = [record["sites"][site.number] for record in records]
        per_site[site.number] = {
            "n_train": len(site.train_labels),
            "n_val": len(site.val_labels),
            "rounds_selected": sum(site.number in record["selected"] for record in records),
            "rounds_rejected": sum(site.number in record["rejected"] for record in records),
            "bytes_sent": sum(entry["bytes_sent"] for entry in entries),
            "bytes_received": sum(entry["bytes_received"] for entry in entries),
            "val_accuracy_best": best["sites"][site.number]["val_accuracy"],
            "val_accuracy_final": final["sites"][site.number]["val_accuracy"],
        }
    return {
        "rounds": len(records),
        "best_round": result.best_round,
        "best": {key: best[key] for key in ("val_accuracy", "val_loss")},
        "final": {key: final[key] for key in ("val_accuracy", "val_loss")},
        "fairness": {
            name: fairness([entry["val_accuracy"] for entry in record["sites"].values()])
            for name, record in (("best", best), ("final", final))
        },
        "bytes": {key: sum(record[f"bytes_{key}"] for record in records) for key in ("sent", "received")},
        "sites": per_site,
        "rejections": [
            {"round": record["round"], "site": site, "reason": reason}
            for record in records for site, reason in record["rejected"].items()
        ],
        "kept_previous_rounds": [record["round"] for record in records if record["kept_previous"]],
        "timing": {
            f"{name}_mean": float(np.mean([record[key] for record in records]))
            for name, key in (("round", "seconds"), ("train", "train_seconds"),
                              ("aggregate", "aggregate_seconds"), ("eval", "eval_seconds"))
        } | {"round_median": float(np.median([record["seconds"] for record in records]))},
    }


def centralized_equivalent_seconds(model: nn.Module, sites: Sequence[SiteData], train: TrainParams, epochs: int) -> float:
    """Seconds that centralized training of ``model`` on all sites' local training parts takes for ``epochs``.

    With ``fraction_fit = 1`` this is the training work of one round done in one place: the
    denominator of the round-time ratio. ``model`` is trained in place; pass a copy.
    """
    images = np.concatenate([site.train_images for site in sites])
    labels = np.concatenate([site.train_labels for site in sites])
    started = time.perf_counter()
    train_model(model, images, labels, train, epochs=epochs)
    return time.perf_counter() - started


def remove_checkpoint(checkpoint_dir: Path) -> None:
    """Delete the round checkpoint once the run's outputs are written (a later run then starts fresh)."""
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
