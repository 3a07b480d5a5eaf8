"""Server-side aggregation: pure functions on state dicts, shared by every transport.

A round's server step is ``average -> server optimizer``:

1. :func:`weighted_average` of the sites' exchanged entries, weighted by their training-sample
   counts (FedAvg, McMahan et al. 2017); accumulated in float64 in site order, so the result is
   deterministic and independent of the float32 rounding of partial sums.
2. :func:`server_step` turns the average into the new global weights. FedAvg and FedProx take the
   average itself; FedAvgM and FedAdam treat the pseudo-gradient ``global - average`` as a gradient
   of the trainable parameters. Buffers (BatchNorm running statistics) are statistics, not
   gradients: they always take the plain average.

Which entries travel is decided by :func:`exchanged_keys`: every floating-point entry, except the
BatchNorm entries under FedBN (``federation.batchnorm: local``, Li et al. 2021). Integer buffers
(BatchNorm's ``num_batches_tracked``) never travel: with a fixed BatchNorm momentum they are unused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from leukofed.config import FederationParams

_SERVER_OPTIMIZED = ("fedavgm", "fedadam")


def batchnorm_keys(model: nn.Module) -> frozenset[str]:
    """State-dict keys of every BatchNorm layer's weights and statistics (what FedBN keeps local)."""
    return frozenset(
        f"{name}.{key}"
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for key in module.state_dict()
    )


def parameter_keys(model: nn.Module) -> frozenset[str]:
    """State-dict keys of the trainable parameters (what a server optimizer updates)."""
    return frozenset(name for name, parameter in model.named_parameters() if parameter.requires_grad)


def exchanged_keys(state: dict[str, torch.Tensor], local_keys: Iterable[str] = ()) -> list[str]:
    """Floating-point entries of ``state`` not in ``local_keys``, in state-dict order."""
    local = set(local_keys)
    return [key for key, value in state.items() if value.is_floating_point() and key not in local]


def state_nbytes(state: dict[str, torch.Tensor], keys: Iterable[str]) -> int:
    """Bytes of the tensors ``state[key]`` for ``keys``: what sending them costs (without framing)."""
    return sum(state[key].numel() * state[key].element_size() for key in keys)


def non_finite_keys(state: dict[str, torch.Tensor], keys: Iterable[str]) -> list[str]:
    """The keys whose tensors hold a NaN or an infinity."""
    return [key for key in keys if not bool(torch.isfinite(state[key]).all())]


def weighted_average(
    states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float], keys: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Average ``keys`` over ``states``, weighting state i by ``weights[i]`` (its sample count).

    Parameters
    ----------
    states : sequence of dict
        Site state dicts (at least one), each holding every key.
    weights : sequence of float
        Non-negative weights with a positive sum, one per state.
    keys : iterable of str
        Entries to average.

    Returns
    -------
    dict
        ``key -> tensor`` in each key's original dtype.
    """
    if len(states) != len(weights) or not states:
        raise ValueError(f"need one weight per state and at least one state, got {len(states)} and {len(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must have a positive sum, got {list(weights)}")
    average = {}
    for key in keys:
        accumulated = torch.zeros_like(states[0][key], dtype=torch.float64)
        for state, weight in zip(states, weights, strict=True):
            accumulated += state[key].to(torch.float64) * (float(weight) / total)
        average[key] = accumulated.to(states[0][key].dtype)
    return average


def init_server_state(strategy: str, global_state: dict[str, torch.Tensor], keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Zeroed optimizer buffers of the server for ``keys``: momentum (FedAvgM), first and second moments (FedAdam)."""
    if strategy == "fedavgm":
        return {f"momentum/{key}": torch.zeros_like(global_state[key]) for key in keys}
    if strategy == "fedadam":
        return {f"{moment}/{key}": torch.zeros_like(global_state[key]) for moment in ("m", "v") for key in keys}
    return {}


def server_step(
    strategy: str,
    global_state: dict[str, torch.Tensor],
    average: dict[str, torch.Tensor],
    optimizer_state: dict[str, torch.Tensor],
    optimized_keys: Iterable[str],
    params: FederationParams,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The new global entries and server-optimizer state after one round.

    Parameters
    ----------
    strategy : str
        ``fedavg`` or ``fedprox``: the new global is ``average``. ``fedavgm``: momentum
        ``m = momentum * m + d`` and ``w = w - server_lr * m``. ``fedadam``: ``m = beta1 * m + (1 - beta1) * d``,
        ``v = beta2 * v + (1 - beta2) * d^2`` and ``w = w - server_lr * m / (sqrt(v) + tau)``, without
        bias correction (Reddi et al. 2021, Algorithm 2). ``d = w - average`` is the pseudo-gradient.
    global_state : dict
        The current global weights (at least every key of ``average``).
    average : dict
        From :func:`weighted_average`: the entries that were exchanged.
    optimizer_state : dict
        From :func:`init_server_state` or the previous call; not modified.
    optimized_keys : iterable of str
        The trainable parameters among ``average``'s keys; the other entries take the average.
    params : FederationParams
        ``fedavgm`` and ``fedadam`` settings.

    Returns
    -------
    new_entries : dict
        New global values for every key of ``average``.
    new_optimizer_state : dict
    """
    new_entries = dict(average)
    if strategy not in _SERVER_OPTIMIZED:
        return new_entries, optimizer_state
    new_state = dict(optimizer_state)
    for key in optimized_keys:
        if key not in average:
            continue
        pseudo_gradient = global_state[key] - average[key]
        if strategy == "fedavgm":
            momentum = params.fedavgm.momentum * optimizer_state[f"momentum/{key}"] + pseudo_gradient
            new_state[f"momentum/{key}"] = momentum
            new_entries[key] = global_state[key] - params.fedavgm.server_lr * momentum
        else:
            adam = params.fedadam
            first = adam.beta1 * optimizer_state[f"m/{key}"] + (1 - adam.beta1) * pseudo_gradient
            second = adam.beta2 * optimizer_state[f"v/{key}"] + (1 - adam.beta2) * pseudo_gradient.square()
            new_state[f"m/{key}"], new_state[f"v/{key}"] = first, second
            new_entries[key] = global_state[key] - adam.server_lr * first / (second.sqrt() + adam.tau)
    return new_entries, new_state
