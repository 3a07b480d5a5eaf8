"""One federated site (hospital): its local data, the state it keeps between rounds, local training and evaluation.

:class:`Site` is the only code that touches a site's images. The in-process engine calls it for
every simulated site; the Flower ClientApp (:mod:`.flower_apps`) calls exactly the same methods at
a hospital. A site receives the global entries of a round in a :class:`FitInstruction` and answers
with a :class:`FitReply`: model entries, a sample count and scalar metrics, never images.

Site-held state: the entries a site keeps for itself between rounds. Today that is its BatchNorm
layers under FedBN (``federation.batchnorm: local``); :meth:`Site.state_dict` and
:meth:`Site.load_state_dict` are where further site-side state (e.g. a privacy accountant) belongs,
so that the in-process engine can checkpoint it and a Flower site can keep it between messages.
A site that trains with DP-SGD (:mod:`leukofed.privacy.dp`) keeps its privacy accountant there and
replies with its spent ``epsilon`` and ``delta`` instead of its (un-noised) training loss and accuracy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from leukofed.config import TrainParams
from leukofed.errors import DataError
from leukofed.federation.aggregation import exchanged_keys, non_finite_keys
from leukofed.training import NonFiniteLossError, predict_proba, train_model

if TYPE_CHECKING:
    from leukofed.privacy.dp import PrivateTraining

_PROBABILITY_FLOOR = np.finfo(np.float32).tiny  # keeps log(p) finite for a confidently wrong prediction
LOCAL_STATE = "local"  # state_dict() key of the entries a site keeps (FedBN: its BatchNorm layers)
PRIVACY_STATE = "privacy"  # state_dict() key of a DP site's accountant
PRIVACY_METRICS = ("epsilon", "delta")  # what a DP site adds to its reply metrics: its spent (epsilon, delta)


@dataclass(frozen=True)
class SiteData:
    """One site's local data: uint8 images ``(n, H, W, 3)`` and class indices ``(n,)``."""

    number: int  # from 1, as in partition.csv
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray

    @property
    def n_train(self) -> int:
        return len(self.train_labels)

    @property
    def n_val(self) -> int:
        return len(self.val_labels)


@dataclass(frozen=True)
class SiteInfo:
    """What the server knows of a site: its number and the sizes of its local parts (no data)."""

    number: int
    n_train: int
    n_val: int


def sites_from_partition(cache, table: pd.DataFrame, partition_path, n_sites: int) -> list[SiteData]:
    """Each site's local train and validation images and labels, from a partition (``partition.csv``) of ``cache``.

    Raises
    ------
    DataError
        If the partition was made from another cache or does not hold sites ``1..n_sites``.
    """
    if sorted(set(table["site"])) != list(range(1, n_sites + 1)):
        raise DataError(
            f"{partition_path}: holds sites {sorted(set(table['site']))}, not 1..{n_sites}; rerun the partition stage"
        )
    return [site_from_partition(cache, table, partition_path, number) for number in range(1, n_sites + 1)]


def site_from_partition(cache, table: pd.DataFrame, partition_path, number: int) -> SiteData:
    """Site ``number``'s local train and validation images and labels, from a partition of ``cache``.

    Raises
    ------
    DataError
        If the partition was made from another cache or has no site ``number``.
    """
    rows = table["row"].to_numpy()
    relpaths = cache.index["relpath"].to_numpy()
    if rows.max(initial=-1) >= len(cache.index) or not (relpaths[rows] == table["relpath"].to_numpy()).all():
        raise DataError(f"{partition_path}: does not match the cache it is used with; rerun the partition stage")
    if number not in set(table["site"]):
        raise DataError(f"{partition_path}: has no site {number} (sites {sorted(set(table['site']))}); fix the site number")
    labels = cache.index["label_index"].to_numpy()
    at_site = table["site"] == number
    train, val = (table.loc[at_site & (table["part"] == part), "row"].to_numpy() for part in ("train", "val"))
    return SiteData(number, np.asarray(cache.images[train]), labels[train], np.asarray(cache.images[val]), labels[val])


@dataclass(frozen=True)
class FitInstruction:
    """What the server sends a selected site in a round.

    Attributes
    ----------
    round : int
    entries : dict
        The global entries to start from (under FedBN without the BatchNorm entries).
    train : TrainParams
        Local training settings with the round's learning rate and the site's seed for this round.
    epochs : int
        Local epochs.
    proximal_mu : float
        FedProx weight (0: plain local training).
    local_keys : frozenset of str
        Entries the site keeps for itself between rounds (FedBN: every BatchNorm entry); the server
        does not send them. Before its first round the site starts them from the layers' own
        initialisation (BatchNorm: weight 1, bias 0, mean 0, variance 1, whatever the seed).
    """

    round: int
    entries: dict[str, torch.Tensor]
    train: TrainParams
    epochs: int
    proximal_mu: float
    local_keys: frozenset[str] = frozenset()


@dataclass(frozen=True)
class FitReply:
    """A site's answer to a :class:`FitInstruction`.

    Attributes
    ----------
    entries : dict or None
        Every floating-point entry of the locally trained model; None if training failed.
    num_examples : int
        Local training images: the site's weight in the average.
    metrics : dict
        ``train_loss`` and ``train_accuracy`` of the last local epoch (empty on failure); a DP site
        sends ``epsilon`` and ``delta`` (:data:`PRIVACY_METRICS`), its privacy spent so far, instead:
        its training loss and accuracy are computed on its private images without noise.
    failure : str or None
        Why the site has no update (None when it has one).
    """

    entries: dict[str, torch.Tensor] | None
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    failure: str | None = None


class SiteEvaluation(NamedTuple):
    """A model's cross-entropy and accuracy on a site's local validation part, and its size."""

    loss: float
    accuracy: float
    n: int


def non_finite_reason(entries: dict[str, torch.Tensor], keys: Iterable[str]) -> str | None:
    """The rejection reason for an update holding NaN or infinite values, or None if it is finite."""
    bad = non_finite_keys(entries, keys)
    return f"non-finite values in the update ({', '.join(bad)})" if bad else None


class Site:
    """One site: local data plus the state it keeps between rounds.

    Parameters
    ----------
    data : SiteData
        The site's local training and validation parts.
    progress : bool
        Show local training progress bars.
    privacy : PrivateTraining, optional
        Train with DP-SGD; its accountant is site-held state (None: ordinary training).
    """

    def __init__(self, data: SiteData, *, progress: bool = False, privacy: PrivateTraining | None = None) -> None:
        self.data = data
        self.progress = progress
        self.privacy = privacy
        self._local: dict[str, torch.Tensor] = {}

    @property
    def number(self) -> int:
        return self.data.number

    @property
    def info(self) -> SiteInfo:
        return SiteInfo(self.data.number, self.data.n_train, self.data.n_val)

    def state_dict(self) -> dict:
        """The state the site keeps between rounds (tensors and plain values, loadable with ``weights_only``)."""
        privacy = {} if self.privacy is None else {PRIVACY_STATE: self.privacy.accountant.state_dict()}
        return {LOCAL_STATE: dict(self._local), **privacy}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (an empty dict: the state of a site that never trained)."""
        self._local = dict(state.get(LOCAL_STATE, {}))
        if self.privacy is not None:
            self.privacy.accountant.load_state_dict(state.get(PRIVACY_STATE, {}))

    def fit(self, model: nn.Module, instruction: FitInstruction) -> FitReply:
        """Train ``model`` locally from the instruction's global entries; keep the local entries on success.

        ``model`` must have the federation's architecture; its entries that neither the instruction
        nor the site's state hold (integer buffers, unused with BatchNorm's fixed momentum) are left as they are.
        """
        unknown = sorted(set(instruction.entries) - set(model.state_dict()))
        if unknown:
            raise ValueError(f"site {self.number}: the instruction holds entries the model lacks: {unknown[:5]}")
        model.load_state_dict(instruction.entries, strict=False)
        if instruction.local_keys:
            self._start_local_entries(model, instruction.local_keys)
        data = self.data
        try:
            result = train_model(model, data.train_images, data.train_labels, instruction.train,
                                 epochs=instruction.epochs, proximal_mu=instruction.proximal_mu, progress=self.progress,
                                 privacy=self.privacy)
        except NonFiniteLossError as error:
            return FitReply(None, data.n_train, failure=f"non-finite training loss ({error})")
        keys = exchanged_keys(result.state_dict)
        entries = {key: result.state_dict[key] for key in keys}
        reason = non_finite_reason(entries, keys)
        if reason is not None:  # never keep, nor send, diverged weights
            return FitReply(None, data.n_train, failure=reason)
        self._local = {key: result.state_dict[key] for key in instruction.local_keys}
        last = result.history[-1]
        metrics = {"train_loss": float(last["train_loss"]), "train_accuracy": float(last["train_accuracy"])}
        if self.privacy is not None:  # un-noised statistics of the private images would fall outside (epsilon, delta)
            metrics = {"epsilon": self.privacy.accountant.epsilon(), "delta": self.privacy.accountant.delta}
        return FitReply(entries, data.n_train, metrics)

    def _start_local_entries(self, model: nn.Module, local_keys: frozenset[str]) -> None:
        """Load the entries the site keeps, or reset their layers before the site's first round."""
        if set(self._local) == local_keys:
            model.load_state_dict(self._local, strict=False)
            return
        for name, module in model.named_modules():
            own = [key for key, _ in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))]
            if any(f"{name}.{key}" in local_keys for key in own):
                module.reset_parameters()

    def evaluate(self, model: nn.Module, global_state: dict[str, torch.Tensor], *, batch_size: int) -> SiteEvaluation:
        """Cross-entropy (floored probabilities, float64) and accuracy of the global model on the local validation part."""
        model.load_state_dict(global_state)
        data = self.data
        proba = predict_proba(model, data.val_images, batch_size)
        picked = np.maximum(proba[np.arange(data.n_val), data.val_labels], _PROBABILITY_FLOOR)
        loss = float(-np.log(picked.astype(np.float64)).mean())
        correct = int((proba.argmax(axis=1) == data.val_labels).sum())
        return SiteEvaluation(loss, correct / data.n_val, data.n_val)
