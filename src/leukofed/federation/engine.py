"""Federated training: rounds of local training at the sites and server aggregation, over any transport.

One round: the server picks ``ceil(fraction_fit * N)`` sites with its seeded generator; each starts
from the global weights and trains locally (:meth:`.site.Site.fit`: :func:`leukofed.training.train_model`
for ``local_epochs``; FedProx adds ``mu/2 * ||w - w_global||^2``); the server averages the valid
updates by training-sample count and applies its optimizer (:mod:`.aggregation`); then every site
evaluates the new global model on its local validation part. The sample-weighted mean over the
sites is the global validation score, which picks the best round.

The round loop (:func:`run_federation`) does not know where the sites are: a :class:`Transport`
carries the instructions to them and their replies back. :class:`InProcessTransport` calls
:class:`.site.Site` objects in this process (the fast default); the Flower transport
(:mod:`.flower_apps`) sends the same instructions to SuperNodes, whose ClientApp calls the same
:class:`.site.Site` code. Only model entries and scalar metrics cross a transport, never images.

Choices worth knowing:

- **Faults.** A site whose training loss becomes non-finite, whose update holds NaN/inf or does
  not match the model, or that does not answer (Flower: no reply within the round timeout, or its
  node is gone) is left out of that round's average; the round record names the site and the
  reason. With fewer than ``min_sites`` valid updates the run stops with
  :class:`InsufficientSitesError`; the checkpoint keeps the last finished round, so rerunning the
  same command resumes there. A site that does not answer the evaluation is left out of that
  round's global validation score (its entries stay None).
- **Secure aggregation.** A transport may return only the weighted average of the updates
  (:class:`AggregatedFit`, Flower with SecAgg+: :mod:`.secagg`): the engine then checks the average
  instead of each update, records the sites that dropped out, and marks the round ``secure_aggregation: true``.
- **BatchNorm.** ``global``: running statistics are averaged like the weights (plain FedAvg).
  ``local`` (FedBN): the server sends no BatchNorm entries, so each site keeps its own BatchNorm
  weights and statistics across rounds (site-held state); sites still upload them so that the
  server can form one servable global model, which uses their sample-weighted average.
- **Learning rate.** ``train.lr_schedule`` runs over the rounds: with ``cosine`` each round's local
  learning rate is ``train.lr`` scaled by a cosine of the round number, constant within the round.
- **Bytes.** Sent: the global entries a site downloads for training; received: the entries it
  uploads (0 if it has no update). Tensor payload only, as ``numel * element_size``.
- **Determinism.** All randomness comes from the server generator (``federation.seed``): the site
  selection and one training seed per selected site and round. On CPU, identical inputs give
  bitwise-identical weights, whichever transport carries them.
- **Checkpoint.** After every round, the global weights, server-optimizer state, generator state,
  best round, all round records and the transport's site states (in-process: each site's
  :meth:`.site.Site.state_dict`) are written atomically to one file. A rerun with the same settings
  and data continues after the last finished round and ends with the same weights as an
  uninterrupted run; a checkpoint made with other settings is ignored.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn

from leukofed.config import FederationParams, FederationRun, TrainParams
from leukofed.errors import LeukofedError
from leukofed.federation.aggregation import (
    batchnorm_keys,
    exchanged_keys,
    init_server_state,
    parameter_keys,
    server_step,
    state_nbytes,
    weighted_average,
)
from leukofed.federation.site import (  # SiteData and sites_from_partition: also the engine's, for its callers
    PRIVACY_METRICS,
    FitInstruction,
    FitReply,
    Site,
    SiteData,
    SiteEvaluation,
    SiteInfo,
    non_finite_reason,
    sites_from_partition,
)
from leukofed.io import atomic_path
from leukofed.training import CheckpointError, train_model

if TYPE_CHECKING:
    from leukofed.privacy.dp import PrivateTraining

CHECKPOINT_FILE = "state.pt"
CHECKPOINT_FORMAT = "leukofed-federation-checkpoint"
SEED_BOUND = 2**31 - 1  # per-site training seeds are drawn below this (a valid seed everywhere)
NO_REPLY = "no reply"


class InsufficientSitesError(LeukofedError):
    """Fewer valid site updates (or evaluations) than a round needs: the run stops, resumable from its checkpoint."""


@dataclass(frozen=True)
class AggregatedFit:
    """A transport's answer to ``fit`` when it aggregates securely: the weighted average only, no per-site update.

    The engine cannot check single updates then (a site checks its own before masking); it checks
    the average and marks the round ``secure_aggregation: true``. See :mod:`.secagg`.

    Attributes
    ----------
    entries : dict of str to Tensor, or None
        ``sum(n_i w_i) / sum(n_i)`` over ``accepted``; None when the protocol could not finish.
    accepted : list of int
        Sites whose update is in the average; the other selected sites dropped out.
    num_examples, metrics, bytes_received : dict keyed by site number
        Each accepted site's weight, scalar training metrics and upload size (all sent in the clear).
    """

    entries: dict[str, torch.Tensor] | None
    accepted: list[int]
    num_examples: dict[int, int] = field(default_factory=dict)
    metrics: dict[int, dict] = field(default_factory=dict)
    bytes_received: dict[int, int] = field(default_factory=dict)


SECURE_DROPOUT = "dropped out of secure aggregation"


class Transport(Protocol):
    """Carries a round's instructions to the sites and their replies back (model entries and metrics only)."""

    def sites(self) -> list[SiteInfo]:
        """Every site of the federation, by ascending number."""

    def fit(self, instructions: Mapping[int, FitInstruction]) -> dict[int, FitReply] | AggregatedFit:
        """Local training at the sites ``instructions`` names; a site missing from the result did not answer.

        A transport that aggregates securely returns the average alone (:class:`AggregatedFit`).
        """

    def evaluate(self, global_state: dict[str, torch.Tensor], numbers: Sequence[int], batch_size: int) -> dict[int, SiteEvaluation]:
        """The global model on the local validation part of each site in ``numbers``; missing: no answer."""

    def state_dict(self) -> dict:
        """Site-held state that the server's checkpoint must carry (empty when the sites keep it themselves)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (an empty dict: sites that never trained)."""


class InProcessTransport:
    """Every site in this process: :class:`.site.Site` objects sharing one model instance.

    Parameters
    ----------
    sites : sequence of Site
        Numbered ``1..N`` in any order.
    model : nn.Module
        The federation's architecture; trained and evaluated in place (its weights are overwritten).
    """

    def __init__(self, sites: Sequence[Site], model: nn.Module) -> None:
        self._sites = {site.number: site for site in sites}
        self._model = model

    def sites(self) -> list[SiteInfo]:
        return [self._sites[number].info for number in sorted(self._sites)]

    def fit(self, instructions: Mapping[int, FitInstruction]) -> dict[int, FitReply]:
        return {number: self._sites[number].fit(self._model, instruction) for number, instruction in instructions.items()}

    def evaluate(self, global_state: dict[str, torch.Tensor], numbers: Sequence[int], batch_size: int) -> dict[int, SiteEvaluation]:
        return {number: self._sites[number].evaluate(self._model, global_state, batch_size=batch_size) for number in numbers}

    def state_dict(self) -> dict:
        return {str(number): site.state_dict() for number, site in self._sites.items()}

    def load_state_dict(self, state: dict) -> None:
        for number, site in self._sites.items():
            site.load_state_dict(state.get(str(number), {}))


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
    site_states: dict = field(default_factory=dict)  # the transport's state_dict()

    @property
    def finished(self) -> int:
        return len(self.records)


def run_federation(
    model: nn.Module,
    sites: Sequence[SiteData] | Transport,
    run: FederationRun,
    federation: FederationParams,
    train: TrainParams,
    *,
    checkpoint_dir: Path,
    data_key: str,
    on_round: Callable[[dict], None] | None = None,
    progress: bool = False,
    privacy: Mapping[int, PrivateTraining] | None = None,
) -> FederationResult:
    """Train ``model`` federatedly over ``sites`` for ``run.rounds`` rounds, resuming from a checkpoint.

    Parameters
    ----------
    model : nn.Module
        Its current weights are the initial global model; it ends holding the best global weights.
    sites : sequence of SiteData, or Transport
        Every site's local data (each with non-empty train and validation parts), trained in this
        process through :class:`InProcessTransport`; or a transport that reaches the sites elsewhere.
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
        Show local training progress bars (in-process sites).
    privacy : mapping of int to PrivateTraining, optional
        In-process sites that train with DP-SGD (:func:`leukofed.privacy.dp.site_privacy`), by
        number; their accountants are checkpointed with the site states. Put the DP settings into
        ``data_key`` so that a checkpoint made with others is not resumed.

    Returns
    -------
    FederationResult
        Each record holds ``round``, ``selected``, ``accepted``, ``rejected`` (site -> reason),
        ``lr`` (the round's local learning rate), ``val_loss``, ``val_accuracy``, ``bytes_sent``, ``bytes_received``,
        ``seconds``, ``train_seconds``, ``aggregate_seconds``, ``eval_seconds`` and ``sites``
        (site number -> ``train_loss``, ``train_accuracy``, ``val_loss``, ``val_accuracy``,
        ``bytes_sent``, ``bytes_received``; training entries None when not selected or rejected;
        DP sites send ``epsilon`` and ``delta`` spent so far instead of their training loss and accuracy);
        rounds aggregated securely (:class:`AggregatedFit`) also hold ``secure_aggregation: True``.

    Raises
    ------
    InsufficientSitesError
        If a round gets fewer than ``federation.min_sites`` valid updates, or no site evaluates;
        the checkpoint then holds the round before it.
    leukofed.privacy.dp.PrivacyBudgetError
        If a DP site's next round would pass its epsilon budget; the checkpoint holds the round before it.
    """
    local_keys = batchnorm_keys(model) if federation.batchnorm == "local" else frozenset()
    if not hasattr(sites, "fit"):
        privacy = privacy or {}
        sites = InProcessTransport([Site(data, progress=progress, privacy=privacy.get(data.number))
                                    for data in sites], model)
    transport: Transport = sites
    infos = transport.sites()
    initial = _snapshot(model.state_dict())
    signature = _signature(initial, run, federation, train, infos, data_key)
    path = Path(checkpoint_dir) / CHECKPOINT_FILE
    state = _load_checkpoint(path, signature) or _fresh_state(initial, signature, run.strategy, federation, model)
    transport.load_state_dict(state.site_states)
    resumed_from = state.finished
    for record in state.records if on_round is not None else []:
        on_round(record)
    mu = federation.fedprox.mu if run.strategy == "fedprox" else 0.0
    for round_number in range(state.finished + 1, run.rounds + 1):
        record = _run_round(model, transport, infos, state, round_number, run, federation, train, local_keys, mu)
        state.site_states = transport.state_dict()
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
    transport: Transport,
    infos: Sequence[SiteInfo],
    state: _ServerState,
    round_number: int,
    run: FederationRun,
    federation: FederationParams,
    train: TrainParams,
    local_keys: frozenset[str],
    mu: float,
) -> dict:
    """One round: local training at the selected sites, aggregation, evaluation at every site."""
    started = time.perf_counter()
    n_selected = math.ceil(federation.fraction_fit * len(infos))
    selected = [infos[index].number for index in np.sort(state.rng.choice(len(infos), size=n_selected, replace=False))]
    seeds = state.rng.integers(0, SEED_BOUND, size=n_selected)
    local_train = train.model_copy(update={"lr": round_lr(train, round_number, run.rounds), "lr_schedule": "constant"})
    sent_keys = exchanged_keys(state.global_state, local_keys)
    sent = {key: state.global_state[key] for key in sent_keys}
    site_records = {info.number: _idle_site() for info in infos}
    instructions = {}
    for number, seed in zip(selected, seeds, strict=True):
        instructions[number] = FitInstruction(round_number, sent, local_train.model_copy(update={"seed": int(seed)}),
                                              federation.local_epochs, mu, local_keys)
        site_records[number]["bytes_sent"] = state_nbytes(state.global_state, sent_keys)
    replies = transport.fit(instructions)
    secure = isinstance(replies, AggregatedFit)

    received_keys = exchanged_keys(state.global_state)
    accepted, updates, weights, rejected = [], [], [], {}
    if secure:
        accepted, rejected = _secure_sites(replies, selected, state.global_state, received_keys, site_records)
    for number in selected if not secure else []:
        reply = replies.get(number)
        reason = NO_REPLY if reply is None else reply.failure
        if reason is None:
            site_records[number]["bytes_received"] = state_nbytes(reply.entries, reply.entries)
            reason = _invalid_update_reason(reply, state.global_state, received_keys)
        if reason is not None:
            rejected[number] = reason
            continue
        site_records[number] |= {key: reply.metrics.get(key) for key in ("train_loss", "train_accuracy")}  # DP: withheld
        site_records[number] |= {key: reply.metrics[key] for key in PRIVACY_METRICS if key in reply.metrics}
        accepted.append(number)
        updates.append(reply.entries)
        weights.append(reply.num_examples)
    train_seconds = time.perf_counter() - started
    if len(accepted) < federation.min_sites:
        raise InsufficientSitesError(
            f"round {round_number}: {len(accepted)} valid update(s) (sites {accepted or 'none'}; rejected: "
            f"{_rejections(rejected)}), fewer than federation.min_sites={federation.min_sites}; the run stopped and its "
            f"checkpoint keeps round {round_number - 1}: bring the sites back and rerun the same command to resume"
        )

    average = replies.entries if secure else weighted_average(updates, weights, received_keys)
    optimized = parameter_keys(model) & set(average)
    entries, state.optimizer_state = server_step(
        run.strategy, state.global_state, average, state.optimizer_state, optimized, federation
    )
    state.global_state = {**state.global_state, **entries}
    aggregate_seconds = time.perf_counter() - started - train_seconds

    val_loss, val_accuracy = _evaluate_sites(transport, state.global_state, train.eval_batch_size, site_records, round_number)
    record = {
        "round": round_number,
        "selected": selected,
        "accepted": accepted,
        "rejected": rejected,
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
    } | ({"secure_aggregation": True} if secure else {})
    state.records.append(record)
    if _improves(record, state.records[state.best_round - 1] if state.best_round else None):
        state.best_round, state.best_state = round_number, state.global_state
    return record


def _secure_sites(
    result: AggregatedFit, selected: Sequence[int], global_state: dict, keys: list[str], site_records: dict
) -> tuple[list[int], dict[int, str]]:
    """The accepted sites and rejections of a securely aggregated round; fills the sites' clear-text records.

    Only the average can be checked here: if it does not match the model or holds NaN/inf, every
    site in it is rejected with that reason.
    """
    rejected = {number: SECURE_DROPOUT for number in selected if number not in result.accepted}
    if result.entries is None:
        return [], {number: SECURE_DROPOUT for number in selected}
    reason = _invalid_update_reason(FitReply(result.entries, sum(result.num_examples.values())), global_state, keys)
    if reason is not None:
        return [], rejected | {number: f"secure aggregate: {reason}" for number in result.accepted}
    for number in result.accepted:
        site_records[number] |= {key: result.metrics[number].get(key) for key in ("train_loss", "train_accuracy")}
        site_records[number]["bytes_received"] = result.bytes_received.get(number, 0)
    return list(result.accepted), rejected


def _rejections(rejected: dict[int, str]) -> str:
    return "; ".join(f"site {site}: {reason}" for site, reason in rejected.items()) or "none"


def _invalid_update_reason(reply: FitReply, global_state: dict, keys: list[str]) -> str | None:
    """Why a reply's entries cannot be averaged (other keys, shapes or dtypes than the model's; NaN/inf), or None."""
    entries = reply.entries
    if set(entries) != set(keys):
        missing, extra = sorted(set(keys) - set(entries)), sorted(set(entries) - set(keys))
        return f"update does not match the model (missing {missing[:3]}, unexpected {extra[:3]})"
    wrong = [key for key in keys if entries[key].shape != global_state[key].shape or entries[key].dtype != global_state[key].dtype]
    if wrong:
        return f"update does not match the model (shape or dtype of {', '.join(wrong[:3])})"
    if not reply.num_examples > 0:
        return f"update claims {reply.num_examples} training examples"
    return non_finite_reason(entries, keys)


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


def _evaluate_sites(
    transport: Transport, global_state: dict, batch_size: int, site_records: dict, round_number: int
) -> tuple[float, float]:
    """Every site's loss and accuracy of the global model; returns their sample-weighted means over the sites that answered."""
    results = transport.evaluate(global_state, list(site_records), batch_size)
    if not results:
        raise InsufficientSitesError(
            f"round {round_number}: no site answered the evaluation; the run stopped and its checkpoint keeps round "
            f"{round_number - 1}: bring the sites back and rerun the same command to resume"
        )
    losses, correct, total = 0.0, 0, 0
    for number in site_records:
        if number not in results:
            continue
        loss, accuracy, n = results[number]
        site_records[number] |= {"val_loss": loss, "val_accuracy": accuracy}
        losses += loss * n
        correct += round(accuracy * n)  # accuracy is correct / n: the count is recovered exactly
        total += n
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
    initial: dict, run: FederationRun, federation: FederationParams, train: TrainParams, sites: Sequence[SiteInfo],
    data_key: str,
) -> str:
    """A hash of everything the result depends on: a checkpoint with another signature is not resumed."""
    digest = hashlib.sha256()
    settings = {"run": run.model_dump(), "federation": federation.model_dump(), "train": train.model_dump(),
                "data": data_key, "sites": [(site.number, site.n_train, site.n_val) for site in sites]}
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
        "site_states": state.site_states,
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
        site_states=payload["site_states"],
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


def summarize(result: FederationResult, sites: Sequence[SiteData | SiteInfo]) -> dict:
    """What a federated run achieved and cost: scores, fairness, bytes, faults and timings.

    Sites that did not answer a round's evaluation are left out of its fairness statistics.

    Returns
    -------
    dict
        ``rounds``, ``best_round``, ``best`` and ``final`` (global ``val_accuracy``, ``val_loss``),
        ``fairness`` (``best``, ``final``: :func:`fairness` of the per-site validation accuracies),
        ``bytes`` (``sent``, ``received``: totals over all rounds and sites), ``sites`` (site ->
        ``n_train``, ``n_val``, ``rounds_selected``, ``rounds_rejected``, ``bytes_sent``,
        ``bytes_received``, ``val_accuracy_best``, ``val_accuracy_final``), ``rejections`` (``round``,
        ``site``, ``reason``) and ``timing`` (seconds per round: ``round_mean``, ``round_median``
        (robust to the first round's one-off kernel set-up), ``train_mean``, ``aggregate_mean``, ``eval_mean``).
    """
    records = result.records
    best, final = records[result.best_round - 1], records[-1]
    per_site = {}
    for site in sites:
        entries = [record["sites"][site.number] for record in records]
        per_site[site.number] = {
            "n_train": site.n_train,
            "n_val": site.n_val,
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
            name: fairness([entry["val_accuracy"] for entry in record["sites"].values() if entry["val_accuracy"] is not None])
            for name, record in (("best", best), ("final", final))
        },
        "bytes": {key: sum(record[f"bytes_{key}"] for record in records) for key in ("sent", "received")},
        "sites": per_site,
        "rejections": [
            {"round": record["round"], "site": site, "reason": reason}
            for record in records for site, reason in record["rejected"].items()
        ],
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
