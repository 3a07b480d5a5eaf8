"""Local training: the one implementation behind the centralized baseline and every federated site.

Images arrive as the decoded uint8 cache ``(N, H, W, 3)`` and are converted to float batch by batch,
so a dataset costs memory once (as bytes), and no DataLoader workers are needed. Every random draw
(shuffling, augmentation, dropout) comes from generators seeded by ``train.seed``: on CPU the same
inputs and seed give bitwise-identical weights.
"""

from __future__ import annotations

import ctypes
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from leukofed.config import AugmentParams, ModelParams, TrainParams
from leukofed.errors import ConfigError, DataError, LeukofedError
from leukofed.io import atomic_path
from leukofed.model import AttentionCNN, build_model
from leukofed.provenance import DataProvenance

if TYPE_CHECKING:
    from leukofed.privacy.dp import PrivateTraining

CHECKPOINT_FORMAT = "leukofed-checkpoint"
CHECKPOINT_VERSION = 1
META_KEYS = ("classes", "image_size", "provenance", "model_params", "extra")
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 grey level, as torchvision's colour jitter uses
# cuBLAS refuses deterministic mode without a fixed workspace (PyTorch "Reproducibility" notes).
CUBLAS_WORKSPACE = ":4096:8"
# glibc's malloc serves blocks above its mmap threshold (which grows to at most 32 MiB) with fresh
# mmap()s and unmaps them when freed, so every step's large activations (32 MiB for the first block
# at batch 32, 128 px) are faulted in page by page again (~0.7 M page faults per 1,280 images).
# Above these thresholds instead: blocks up to 1 GiB come from the heap, freed heap memory is kept for reuse.
MALLOC_MMAP_THRESHOLD = 1 << 30
MALLOC_TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt() parameter numbers (glibc <malloc.h>)


class NonFiniteLossError(LeukofedError):
    """The training loss became NaN or infinite: the weights diverged."""


class CheckpointError(LeukofedError):
    """A checkpoint file is missing or is not a leukofed checkpoint."""


@dataclass
class TrainResult:
    """What :func:`train_model` returns.

    Attributes
    ----------
    state_dict : dict
        Best-on-validation weights (the last epoch's without validation data).
    history : list of dict
        One record per epoch: epoch, train_loss, train_accuracy, val_loss, val_accuracy (None
        without validation data), lr (at the epoch's start), seconds.
    best_epoch : int
        The epoch (from 1) whose weights ``state_dict`` holds.
    """

    state_dict: dict
    history: list[dict]
    best_epoch: int


def configure_torch(threads: int, seed: int) -> None:
    """Fix torch's thread count and seed every global generator; make torch refuse non-deterministic ops.

    Also makes glibc's malloc reuse freed memory (see :func:`reuse_freed_memory`).

    Parameters
    ----------
    threads : int
        Intra-op threads (``runtime.threads``).
    seed : int
        Seed of torch's, numpy's and Python's global generators (model initialisation draws from torch's).
    """
    reuse_freed_memory()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    # Deterministic mode also NaN-fills every new tensor (a debugging aid that costs ~15% of a step);
    # no kernel we use reads uninitialised memory, and the bitwise-reproducibility test guards it.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def reuse_freed_memory() -> bool:
    """Keep large freed blocks in glibc's heap for reuse instead of unmapping them (Linux with glibc only).

    Saves the page faults of re-mapping each step's activations (see ``MALLOC_MMAP_THRESHOLD``);
    results are unchanged, and the process keeps its peak memory until it exits.

    Returns
    -------
    bool
        Whether the allocator accepted both settings (False on other platforms and C libraries).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a C library without mallopt()
        return False
    accepted = [mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD), mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)]
    return all(accepted)


def _check_images(images: np.ndarray, what: str) -> None:
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{what}: expected uint8 RGB images of shape (N, H, W, 3), got {images.dtype} {images.shape}; "
            "rebuild the image cache"
        )


def _check_dataset(images: np.ndarray, labels: np.ndarray, what: str) -> None:
    _check_images(images, what)
    if len(images) == 0 or labels.shape != (len(images),):
        raise DataError(
            f"{what}: need at least one image and one label per image, got {len(images)} images "
            f"and labels of shape {labels.shape}"
        )


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """Convert uint8 images ``(N, H, W, 3)`` to a float32 tensor ``(N, 3, H, W)`` in [0, 1].

    The result keeps the channels-last memory layout of the input (a permuted view, not a copy in
    NCHW order): CPU convolutions run ~1.5x faster on it.
    """
    _check_images(images, "images")
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)


def _chance(n: int, generator: torch.Generator) -> torch.Tensor:
    """One fair coin per sample, shaped to broadcast over ``(N, C, H, W)``."""
    return (torch.rand(n, generator=generator) < 0.5).view(n, 1, 1, 1)


def _jitter_factors(n: int, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Per-sample factors uniform in [1 - strength, 1 + strength], shaped ``(N, 1, 1, 1)``."""
    return (1 + strength * (2 * torch.rand(n, generator=generator) - 1)).view(n, 1, 1, 1)


def _grey(batch: torch.Tensor) -> torch.Tensor:
    """Luma ``(N, 1, H, W)`` of RGB images.

    Summed slice by slice rather than reduced over the channel axis: the same floats, about 3x faster
    on channels-last batches, whose channel axis is the innermost one.
    """
    red, green, blue = LUMA_WEIGHTS
    return batch[:, 0:1] * red + batch[:, 1:2] * green + batch[:, 2:3] * blue


def _blend_(batch: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """In place: ``factor * batch + (1 - factor) * other``, clamped to [0, 1] (torchvision's jitter rule)."""
    return batch.mul_(factor).add_((1 - factor) * other).clamp_(0, 1)


def _rotate_by_sample(batch: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate sample i by ``turns[i]`` quarter turns: one torch.rot90 per distinct turn count."""
    rotated = batch.clone()
    for k in range(1, 4):
        index = (turns == k).nonzero().flatten()
        if len(index):
            rotated[index] = torch.rot90(batch[index], k, dims=(2, 3))
    return rotated


def augment_batch(batch: torch.Tensor, params: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """Randomly flip, rotate and colour-jitter each image of a batch.

    Smear images have no orientation, so flips and quarter turns are label-preserving; brightness,
    contrast and saturation jitter mimic mild stain and illumination differences.

    Parameters
    ----------
    batch : torch.Tensor
        Images ``(N, 3, H, W)``, uint8 in [0, 255] or float in [0, 1]; square when ``params.rot90``
        is set. Given uint8, flips and turns move a quarter of the bytes and the pixels are converted
        after them, with the same result as augmenting the converted floats.
    params : AugmentParams
        Which transforms to apply and the jitter strengths ``s`` (factors uniform in [1-s, 1+s]).
    generator : torch.Generator
        A CPU generator: every random draw comes from it, so the output is deterministic given its state.

    Returns
    -------
    torch.Tensor
        A new float tensor of the same shape in [0, 1]; ``batch`` is left unchanged.
    """
    n = len(batch)
    if params.rot90 and batch.shape[2] != batch.shape[3]:
        raise ConfigError(
            f"train.augment.rot90 needs square images, got {batch.shape[2]}x{batch.shape[3]}; "
            "set train.augment.rot90: false or resize to a square data.image_size"
        )
    device = batch.device
    if params.hflip:
        batch = torch.where(_chance(n, generator).to(device), batch.flip(3), batch)
    if params.vflip:
        batch = torch.where(_chance(n, generator).to(device), batch.flip(2), batch)
    if params.rot90:
        batch = _rotate_by_sample(batch, torch.randint(0, 4, (n,), generator=generator).to(device))
    # The colour jitter works in place on a float copy of its own.
    batch = batch.float().div_(255) if batch.dtype == torch.uint8 else batch.clone()
    if params.brightness:  # a blend with black: (1 - factor) * 0 adds nothing
        batch.mul_(_jitter_factors(n, params.brightness, generator).to(device)).clamp_(0, 1)
    if params.contrast:
        mean_grey = _grey(batch).mean(dim=(2, 3), keepdim=True)
        _blend_(batch, mean_grey, _jitter_factors(n, params.contrast, generator).to(device))
    if params.saturation:
        _blend_(batch, _grey(batch), _jitter_factors(n, params.saturation, generator).to(device))
    return batch


def training_batch(
    images: np.ndarray, index: torch.Tensor, params: AugmentParams, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """The augmented float batch of ``images[index]`` as a training step takes it: channels-last, on ``device``.

    Augmentation starts from the uint8 pixels (see :func:`augment_batch`); the result is
    channels-last because flips and turns may leave another layout, and CPU convolutions run
    ~1.5x faster on channels-last input than on NCHW.
    """
    batch = torch.from_numpy(images[index.numpy()]).permute(0, 3, 1, 2).to(device)
    return augment_batch(batch, params, generator).contiguous(memory_format=torch.channels_last)


def _lr_factor(schedule: str, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at each optimizer step."""
    if schedule == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps))
    return lambda step: 1.0


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _train_epoch(
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
    """One pass over the shuffled training data; returns (mean loss, accuracy) on the augmented batches.

    ``penalty`` (FedProx) is added to each step's objective but not to the reported loss.
    """
    model.train()
    device = _model_device(model)
    # Accumulated on tensors: one host sync per epoch instead of one per step.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for index in torch.randperm(len(targets), generator=generator).split(params.batch_size):
        batch = training_batch(images, index, params.augment, generator, device)
        batch_targets = targets[index].to(device)
        logits = model(batch)
        loss = F.cross_entropy(logits, batch_targets, label_smoothing=params.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        (loss if penalty is None else loss + penalty()).backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * len(index)
        correct += (logits.argmax(dim=1) == batch_targets).sum()
        progress.update()
    return loss_sum.item() / len(targets), correct.item() / len(targets)


def predict_logits(model: nn.Module, images: np.ndarray, batch_size: int) -> torch.Tensor:
    """Logits for all images, in eval mode without gradients; restores the model's mode."""
    was_training = model.training
    model.eval()
    device = _model_device(model)
    with torch.no_grad():
        logits = [model(images_to_tensor(images[start : start + batch_size]).to(device)).cpu()
                  for start in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(logits)


def _evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int) -> tuple[float, float]:
    """(cross-entropy, accuracy) on held-out data; the loss is unsmoothed so it stays comparable."""
    logits = predict_logits(model, images, batch_size)
    targets = torch.as_tensor(labels, dtype=torch.long)
    return F.cross_entropy(logits, targets).item(), (logits.argmax(dim=1) == targets).double().mean().item()


def _improves(record: dict, best: dict | None) -> bool:
    """Higher validation accuracy wins, then lower validation loss; without validation the last epoch wins."""
    if best is None or record["val_accuracy"] is None:
        return True
    if record["val_accuracy"] != best["val_accuracy"]:
        return record["val_accuracy"] > best["val_accuracy"]
    return record["val_loss"] < best["val_loss"]


def _snapshot(model: nn.Module) -> dict:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _proximal_term(model: nn.Module, mu: float) -> Callable[[], torch.Tensor] | None:
    """FedProx: ``mu/2 * ||w - w_start||^2`` over the trainable parameters; None when ``mu`` is 0."""
    if mu < 0:
        raise ValueError(f"proximal_mu must be non-negative, got {mu}")
    if mu == 0:
        return None
    anchors = [(weight, weight.detach().clone()) for weight in model.parameters() if weight.requires_grad]
    return lambda: mu / 2 * sum((weight - anchor).square().sum() for weight, anchor in anchors)


def train_model(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    params: TrainParams,
    *,
    val_images: np.ndarray | None = None,
    val_labels: np.ndarray | None = None,
    epochs: int | None = None,
    progress: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
    proximal_mu: float = 0.0,
    privacy: PrivateTraining | None = None,
) -> TrainResult:
    """Train ``model`` in place, starting from its current weights.

    AdamW with a cosine (per step, to zero at the end) or constant learning rate, cross-entropy with
    label smoothing, batches reshuffled each epoch. Starting from the current weights lets a
    federated site continue from the global model; optimizer state starts fresh on every call.

    Parameters
    ----------
    model : nn.Module
        Trained in place; holds the best-on-validation weights on return.
    images, labels : np.ndarray
        Training images ``(N, H, W, 3)`` uint8 and integer class labels ``(N,)``.
    params : TrainParams
        The ``train`` section: optimizer, schedule, batch sizes, augmentation and ``seed``, which
        seeds shuffling, augmentation and dropout (the caller's global generator is left as it was).
    val_images, val_labels : np.ndarray, optional
        Validation data, evaluated after every epoch to pick the best weights.
    epochs : int, optional
        Overrides ``params.epochs`` (local epochs of a federated round).
    progress : bool
        Show a tqdm bar per epoch.
    on_epoch : callable, optional
        Called with each epoch's history record as soon as it is complete (logging, early reporting).
    proximal_mu : float
        FedProx weight ``mu``: adds ``mu/2 * ||w - w_start||^2`` to the loss, ``w_start`` being the
        weights on entry (a site's copy of the global model). 0 (default) trains exactly as without it.
    privacy : PrivateTraining, optional
        Train with DP-SGD (:mod:`leukofed.privacy.dp`): Poisson-sampled batches, clipped and noised
        per-sample gradients, every step recorded in ``privacy.accountant``. None: ordinary training.

    Returns
    -------
    TrainResult

    Raises
    ------
    NonFiniteLossError
        If an epoch's training loss is NaN or infinite.
    DataError
        If the arrays are not uint8 RGB images with one label each.
    leukofed.privacy.dp.PrivacyBudgetError
        With ``privacy``: if this call's steps would take the accountant past its epsilon budget.
    """
    labels = np.asarray(labels)
    _check_dataset(images, labels, "training data")
    validate = val_images is not None
    if validate:
        val_labels = np.asarray(val_labels)
        _check_dataset(val_images, val_labels, "validation data")
    n_epochs = params.epochs if epochs is None else epochs
    if n_epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {n_epochs}")
    steps_per_epoch = math.ceil(len(images) / params.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(params.lr_schedule, n_epochs * steps_per_epoch))
    generator = torch.Generator().manual_seed(params.seed)
    targets = torch.as_tensor(labels, dtype=torch.long)
    penalty = _proximal_term(model, proximal_mu)
    train_epoch = _train_epoch
    if privacy is not None:  # Opacus is imported only when DP is asked for
        from leukofed.privacy.dp import private_epoch

        train_epoch = private_epoch(privacy, model, len(images), params, n_epochs)
    history: list[dict] = []
    best: dict | None = None
    best_state: dict = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)  # dropout draws from the global generator
        for epoch in range(1, n_epochs + 1):
            start, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
            with tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{n_epochs}", unit="batch",
                      leave=False, disable=not progress) as bar:
                train_loss, train_accuracy = train_epoch(
                    model, images, targets, params, optimizer, scheduler, generator, bar, penalty
                )
            if not math.isfinite(train_loss):
                raise NonFiniteLossError(
                    f"training loss became {train_loss} in epoch {epoch}: the weights diverged; "
                    f"lower train.lr (now {params.lr:g})"
                )
            val_loss, val_accuracy = (
                _evaluate(model, val_images, val_labels, params.eval_batch_size) if validate else (None, None)
            )
            record = {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_accuracy": train_accuracy,
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
                "lr": lr,
                "seconds": time.perf_counter() - start,
            }
            history.append(record)
            if _improves(record, best):
                best, best_state = record, _snapshot(model)
            if on_epoch is not None:
                on_epoch(record)
    model.load_state_dict(best_state)
    return TrainResult(state_dict=best_state, history=history, best_epoch=best["epoch"])


def predict_proba(model: nn.Module, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities ``(N, n_classes)`` (softmax) for uint8 images ``(N, H, W, 3)``, in eval mode."""
    return torch.softmax(predict_logits(model, images, batch_size), dim=1).numpy()


def _check_plain(value: object, where: str) -> None:
    """Refuse what ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, where)
            _check_plain(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for position, item in enumerate(value):
            _check_plain(item, f"{where}[{position}]")
    elif not isinstance(value, str | int | float | bool | torch.Tensor | None):
        raise TypeError(f"checkpoint {where}: {type(value).__name__} is not a tensor or plain Python value")


def save_checkpoint(
    path: Path,
    model: AttentionCNN,
    *,
    model_params: ModelParams,
    classes: list[str],
    image_size: int,
    provenance: DataProvenance,
    extra: dict | None = None,
) -> None:
    """Write weights and everything needed to rebuild and interpret the model, atomically.

    Only tensors and plain Python values are stored, so :func:`load_checkpoint` can read the file
    with ``torch.load(weights_only=True)`` (no code runs on load).

    Parameters
    ----------
    path : Path
        Destination file.
    model : AttentionCNN
        The model whose ``state_dict`` is stored.
    model_params : ModelParams
        The parameters ``model`` was built with.
    classes : list of str
        Class names, in logit order.
    image_size : int
        Side of the images the model was trained on.
    provenance : DataProvenance
        The data the model was trained on.
    extra : dict, optional
        Further plain values (metrics, round, epoch).
    """
    _check_plain(extra, "extra")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "state_dict": model.state_dict(),
        "model_params": model_params.model_dump(),
        "classes": list(classes),
        "image_size": image_size,
        "provenance": provenance.to_dict(),
        "extra": extra or {},
    }
    with atomic_path(path, suffix=Path(path).suffix) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> tuple[AttentionCNN, dict]:
    """Rebuild the model stored by :func:`save_checkpoint`.

    Returns
    -------
    model : AttentionCNN
        With the stored weights, on CPU, in eval mode.
    meta : dict
        ``classes``, ``image_size``, ``provenance`` (dict), ``model_params`` (dict), ``extra``.

    Raises
    ------
    CheckpointError
        If the file is missing, unreadable or not a leukofed checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; run the training stage that writes it first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for foreign or corrupt files
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({error}); delete it and retrain") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a leukofed checkpoint; pass a file written by leukofed training")
    try:
        model = build_model(ModelParams.model_validate(payload["model_params"]), n_classes=len(payload["classes"]))
        model.load_state_dict(payload["state_dict"])
        meta = {key: payload[key] for key in META_KEYS}
    except (KeyError, ValueError, RuntimeError) as error:  # pydantic's ValidationError is a ValueError
        raise CheckpointError(
            f"{path}: written by an incompatible leukofed version ({error}); retrain to rewrite it"
        ) from None
    return model.eval(), meta
