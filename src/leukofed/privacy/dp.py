"""DP-SGD for local training (Opacus) and one site's privacy accountant.

A site that trains with DP-SGD releases weights that are (epsilon, delta)-differentially private with
respect to one image of its local training data: whatever the coordinator or anybody who sees the
model learns about one image is bounded by (epsilon, delta), composed over every step the site ever
took. The mechanism, as Opacus implements it (Abadi et al., 2016):

- **Poisson sampling.** Each step draws its batch by including every local image independently with
  probability ``q = batch_size / n`` (the sampling that the RDP accountant's amplification bound
  assumes); an epoch is ``ceil(n / batch_size)`` such steps, as many as a non-private epoch.
- **Clipping and noise.** Per-sample gradients (Opacus hooks) are clipped to L2 norm ``max_grad_norm``
  ``C``, summed, perturbed with Gaussian noise of std ``noise_multiplier * C`` and divided by the
  expected batch size ``q * n``; the optimizer (AdamW) then post-processes this private gradient.
- **Accounting.** :class:`PrivacyAccountant` records every noisy step in Opacus' RDP accountant and
  converts to epsilon at the configured delta. Before training it refuses (``PrivacyBudgetError``)
  any call whose steps would take the site past ``privacy.dp.epsilon_budget``.

Choices worth knowing:

- ``delta: auto`` is ``auto_delta_fraction / N`` with ``N`` the training images of all sites
  together: one delta for every site, below ``1/n`` of each (the usual rule ``delta << 1/n`` binds
  hardest at the largest data set; using the union bounds the chance that *any* image of the
  federation is exposed). An explicit delta must be below ``1/n`` of the largest site.
- ``target_epsilon`` derives the noise multiplier with Opacus' ``get_noise_multiplier`` for the
  site's planned total steps (every round it could be selected in), so it ends at or below the target.
- FedProx: the proximal gradient ``mu * (w - w_global)`` does not read data, so it is added to the
  already private gradient (post-processing) instead of being clipped and noised with the loss.
- The noise comes from its own generator: seeded from OS entropy (``noise_seed: null``, secret) or
  from ``noise_seed`` and the training seed (reproducible, but whoever knows both can subtract the
  noise: for experiments only). Opacus' ``secure_mode`` (floating-point attacks) needs torchcsprng,
  which is not installed.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn
from tqdm import tqdm

from leukofed.config import DPParams, TrainParams
from leukofed.errors import ConfigError, LeukofedError
from leukofed.training import training_batch

ACCOUNTANT = "rdp"  # Opacus' Renyi-DP accountant: its state is a plain (sigma, q, steps) history
# Opacus' parameter attributes, removed after each private epoch so the model is an ordinary module again.
_OPACUS_ATTRIBUTES = ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample")


class PrivacyBudgetError(LeukofedError):
    """Training would take a site's epsilon past ``privacy.dp.epsilon_budget``."""


def sample_rate(n_images: int, batch_size: int) -> float:
    """Poisson sampling rate ``q``: the chance that one image joins a step's batch (expected batch ``batch_size``)."""
    return min(1.0, batch_size / n_images)


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Steps of one private epoch: as many as a non-private epoch, so ``train.epochs`` means the same work."""
    return math.ceil(n_images / batch_size)


def resolve_delta(dp: DPParams, site_sizes: Sequence[int]) -> float:
    """The delta every site is accounted at.

    Parameters
    ----------
    dp : DPParams
        ``delta`` (a number or ``auto``) and ``auto_delta_fraction``.
    site_sizes : sequence of int
        Training images at each site.

    Returns
    -------
    float
        ``auto_delta_fraction / sum(site_sizes)`` for ``auto``, else ``dp.delta``.

    Raises
    ------
    ConfigError
        If an explicit delta is not below ``1/n`` of the largest site (such a delta admits
        mechanisms that publish a whole image).
    """
    if dp.delta == "auto":
        return dp.auto_delta_fraction / sum(site_sizes)
    largest = max(site_sizes)
    if dp.delta >= 1 / largest:
        raise ConfigError(
            f"params: privacy.dp.delta={dp.delta:g} is not below 1/n = {1 / largest:.3g} of the largest site "
            f"({largest} training images); lower it or use delta: auto"
        )
    return dp.delta


def noise_multiplier_for(dp: DPParams, *, delta: float, sample_rate: float, steps: int) -> float:
    """``dp.noise_multiplier``, or the smallest one that keeps ``steps`` steps within ``dp.target_epsilon``.

    Raises
    ------
    ConfigError
        If no noise multiplier reaches the target (Opacus gives up above sigma = 1e6).
    """
    if dp.noise_multiplier is not None:
        return dp.noise_multiplier
    try:
        return get_noise_multiplier(target_epsilon=dp.target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                    steps=steps, accountant=ACCOUNTANT)
    except ValueError as error:
        raise ConfigError(
            f"params: privacy.dp.target_epsilon={dp.target_epsilon:g} is unreachable for {steps} steps at sampling "
            f"rate {sample_rate:.3g} and delta {delta:.3g} ({error}); raise it or train fewer rounds"
        ) from None


class PrivacyAccountant:
    """One site's privacy ledger: every DP-SGD step it took, converted to epsilon at a fixed delta.

    Parameters
    ----------
    owner : str
        Who spends the budget (e.g. ``site 3``): named in errors.
    delta : float
        The delta epsilon is reported at.
    budget : float or None
        The largest epsilon this site may reach (``privacy.dp.epsilon_budget``); None: no cap.
    """

    def __init__(self, *, owner: str, delta: float, budget: float | None) -> None:
        self.owner = owner
        self.delta = delta
        self.budget = budget
        self._rdp = RDPAccountant()

    @property
    def steps(self) -> int:
        """Noisy steps recorded so far."""
        return sum(steps for _, _, steps in self._rdp.history)

    def record(self, noise_multiplier: float, sample_rate: float) -> None:
        """Account one noisy step."""
        self._rdp.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at ``delta`` (default: the accountant's); 0 before the first step."""
        return float(self._rdp.get_epsilon(delta=self.delta if delta is None else delta))

    def projected_epsilon(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon at the accountant's delta after ``steps`` more steps with these settings."""
        future = RDPAccountant()
        future.history = [*self._rdp.history, (noise_multiplier, sample_rate, steps)]
        return float(future.get_epsilon(delta=self.delta))

    def check_budget(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Refuse training that would take this site past its budget.

        Raises
        ------
        PrivacyBudgetError
            If ``steps`` more steps would raise epsilon above ``budget``.
        """
        if self.budget is None:
            return
        projected = self.projected_epsilon(noise_multiplier, sample_rate, steps)
        if projected > self.budget:
            raise PrivacyBudgetError(
                f"{self.owner}: {steps} more DP-SGD steps would raise its epsilon from {self.epsilon():.3g} to "
                f"{projected:.3g} (delta {self.delta:.3g}), past privacy.dp.epsilon_budget={self.budget:g}; "
                "raise the budget, train fewer rounds or epochs, or add noise"
            )

    def state_dict(self) -> dict:
        """The step history as plain values (``torch.load(weights_only=True)`` reads it back)."""
        return {"mechanism": ACCOUNTANT, "history": [[float(s), float(q), int(n)] for s, q, n in self._rdp.history]}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (a resumed site continues its ledger); ``{}``: no step yet.

        Raises
        ------
        ValueError
            If ``state`` was not written by this accountant type.
        """
        if not state:
            self._rdp.history = []
            return
        if state.get("mechanism") != ACCOUNTANT or not isinstance(state.get("history"), list):
            raise ValueError(f"not a {ACCOUNTANT} accountant state: {sorted(state)}")
        self._rdp.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]


@dataclass(frozen=True)
class PrivateTraining:
    """What :func:`leukofed.training.train_model` needs to train with DP-SGD.

    Attributes
    ----------
    noise_multiplier : float
        Noise std divided by ``max_grad_norm``.
    max_grad_norm : float
        Per-sample clipping norm.
    accountant : PrivacyAccountant
        The site's ledger: every step is recorded in it (it outlives the call).
    noise_seed : int or None
        None: secret noise; an int: reproducible noise (combined with ``train.seed``).
    """

    noise_multiplier: float
    max_grad_norm: float
    accountant: PrivacyAccountant
    noise_seed: int | None


def private_training(
    dp: DPParams, *, owner: str, n_images: int, batch_size: int, planned_epochs: int, delta: float
) -> PrivateTraining:
    """Set up DP-SGD for one site: its noise multiplier and a fresh accountant.

    Parameters
    ----------
    dp : DPParams
        ``privacy.dp``.
    owner : str
        Names the site in budget errors.
    n_images, batch_size : int
        The site's training images and ``train.batch_size`` (they fix the sampling rate).
    planned_epochs : int
        Local epochs over the whole training (rounds x local epochs): a target epsilon is spread over them.
    delta : float
        From :func:`resolve_delta`.
    """
    rate = sample_rate(n_images, batch_size)
    steps = planned_epochs * steps_per_epoch(n_images, batch_size)
    return PrivateTraining(
        noise_multiplier=noise_multiplier_for(dp, delta=delta, sample_rate=rate, steps=steps),
        max_grad_norm=dp.max_grad_norm,
        accountant=PrivacyAccountant(owner=owner, delta=delta, budget=dp.epsilon_budget),
        noise_seed=dp.noise_seed,
    )


def site_privacy(
    dp: DPParams, site_sizes: Mapping[int, int], *, batch_size: int, planned_epochs: int
) -> dict[int, PrivateTraining]:
    """Every site's DP-SGD set-up for a federated run; refuses to start a run whose plan exceeds the budget.

    Parameters
    ----------
    dp : DPParams
        ``privacy.dp``.
    site_sizes : mapping of int to int
        Site number -> local training images.
    batch_size : int
        ``train.batch_size``.
    planned_epochs : int
        Local epochs a site trains if selected in every round (rounds x local epochs).

    Returns
    -------
    dict
        Site number -> :class:`PrivateTraining` with a fresh accountant named ``site <number>``.

    Raises
    ------
    PrivacyBudgetError
        If a site selected in every round would pass ``privacy.dp.epsilon_budget``.
    """
    delta = resolve_delta(dp, list(site_sizes.values()))
    setups = {}
    for number, n_images in site_sizes.items():
        setup = private_training(dp, owner=f"site {number}", n_images=n_images, batch_size=batch_size,
                                 planned_epochs=planned_epochs, delta=delta)
        setup.accountant.check_budget(setup.noise_multiplier, sample_rate(n_images, batch_size),
                                      planned_epochs * steps_per_epoch(n_images, batch_size))
        setups[number] = setup
    return setups


def check_private_model(model: nn.Module) -> None:
    """Refuse a model whose per-sample gradients Opacus cannot compute.

    Raises
    ------
    ConfigError
        For BatchNorm (it mixes the samples of a batch) or any other layer Opacus' validator rejects.
    """
    if any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules()):
        raise ConfigError(
            "params: DP-SGD (privacy.dp) needs model.norm: group; BatchNorm normalises each image with its "
            "batch-mates' statistics, so per-sample gradients and the privacy guarantee are undefined"
        )
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ConfigError(f"DP-SGD cannot train this model: {'; '.join(str(error) for error in errors)}")


@contextmanager
def _out_of_place_activations(model: nn.Module) -> Iterator[None]:
    """Switch in-place activations off: an in-place op on a hooked layer's output breaks Opacus' backward hooks."""
    switched = [module for module in model.modules() if getattr(module, "inplace", False)]
    for module in switched:
        module.inplace = False
    try:
        yield
    finally:
        for module in switched:
            module.inplace = True


@contextmanager
def _per_sample_gradients(model: nn.Module) -> Iterator[None]:
    """Opacus' per-sample gradient hooks on ``model`` itself (no wrapper, so ``state_dict`` keys stay as they are)."""
    with _out_of_place_activations(model), warnings.catch_warnings():
        # The first layer's input needs no gradient; PyTorch warns that its full backward hook fires anyway.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean")
        hooks.forbid_grad_accumulation()  # Poisson sampling: one backward pass per step
        try:
            yield
        finally:
            hooks.remove_hooks()
            for parameter in model.parameters():
                for name in _OPACUS_ATTRIBUTES:
                    if hasattr(parameter, name):
                        delattr(parameter, name)


def _noise_generator(privacy: PrivateTraining, train_seed: int, device: torch.device) -> torch.Generator:
    """The Gaussian noise's own generator: secret unless ``noise_seed`` is set."""
    if privacy.noise_seed is None:
        seed = secrets.randbits(63)
    else:
        digest = hashlib.sha256(f"{privacy.noise_seed}:{train_seed}".encode()).digest()
        seed = int.from_bytes(digest[:8], "little") >> 1  # below 2**63: any int seed, negative ones included
    return torch.Generator(device=device).manual_seed(seed)


def _empty_step(optimizer: DPOptimizer) -> None:
    """A step that sampled no image still adds noise (the accountant counts it): give it zero per-sample gradients."""
    for parameter in optimizer.params:
        parameter.grad_sample = torch.zeros((0, *parameter.shape), dtype=parameter.dtype, device=parameter.device)


def private_epoch(
    privacy: PrivateTraining, model: nn.Module, n_images: int, params: TrainParams, epochs: int
) -> Callable[..., tuple[float, float]]:
    """Check the model and the budget, then return the DP-SGD counterpart of ``training._train_epoch``.

    Parameters
    ----------
    privacy : PrivateTraining
        Noise, clipping and the site's accountant.
    model : nn.Module
        The model about to be trained.
    n_images : int
        Local training images.
    params : TrainParams
        ``batch_size`` (expected batch), ``seed`` (with ``privacy.noise_seed``), augmentation, smoothing.
    epochs : int
        Epochs about to be trained: all their steps must fit in the budget.

    Returns
    -------
    callable
        ``epoch(model, images, targets, params, optimizer, scheduler, generator, progress, penalty)``
        -> (mean loss, accuracy) over the images the epoch sampled; ``generator`` draws the Poisson
        batches and augmentation; ``optimizer`` is the plain optimizer, wrapped here.

    Raises
    ------
    ConfigError
        If the model has BatchNorm or other layers Opacus cannot handle.
    PrivacyBudgetError
        If ``epochs`` epochs would take the site past its budget.
    """
    check_private_model(model)
    rate = sample_rate(n_images, params.batch_size)
    n_steps = steps_per_epoch(n_images, params.batch_size)
    privacy.accountant.check_budget(privacy.noise_multiplier, rate, epochs * n_steps)
    device = next(model.parameters()).device
    noise = _noise_generator(privacy, params.seed, device)

    def epoch(
        model: nn.Module,
        images: np.ndarray,
        targets: torch.Tensor,
        params: TrainParams,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        generator: torch.Generator,
        progress: tqdm,
        penalty: Callable[[], torch.Tensor] | None = None,
    ) -> tuple[float, float]:
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        with _per_sample_gradients(model):
            private = DPOptimizer(optimizer, noise_multiplier=privacy.noise_multiplier,
                                  max_grad_norm=privacy.max_grad_norm, expected_batch_size=rate * n_images,
                                  loss_reduction="mean", generator=noise)
            for _ in range(n_steps):
                index = (torch.rand(n_images, generator=generator) < rate).nonzero().flatten()
                private.zero_grad(set_to_none=True)
                if len(index):
                    batch = training_batch(images, index, params.augment, generator, device)
                    batch_targets = targets[index].to(device)
                    logits = model(batch)
                    loss = F.cross_entropy(logits, batch_targets, label_smoothing=params.label_smoothing)
                    loss.backward()
                    loss_sum += loss.detach() * len(index)
                    correct += (logits.argmax(dim=1) == batch_targets).sum()
                    seen += len(index)
                else:
                    _empty_step(private)
                private.pre_step()  # clip, sum, add noise, divide by the expected batch size
                if penalty is not None:
                    penalty().backward()  # data-free: added to the private gradient
                optimizer.step()
                privacy.accountant.record(privacy.noise_multiplier, rate)
                scheduler.step()
                progress.update()
            private.zero_grad(set_to_none=True)
        return loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1)

    return epoch
