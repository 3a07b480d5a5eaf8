"""Aggregation: weighted FedAvg, server optimizers and which entries travel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from leukofed.config import load_params
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
from leukofed.model import build_model

PARAMS = load_params(Path(__file__).resolve().parents[2] / "params.yaml")


def _state(weight: list[float], mean: list[float], tracked: int = 0) -> dict[str, torch.Tensor]:
    return {
        "layer.weight": torch.tensor(weight),
        "bn.running_mean": torch.tensor(mean),
        "bn.num_batches_tracked": torch.tensor(tracked),
    }


def test_weighted_average_weights_by_sample_count():
    states = [_state([1.0, 2.0], [0.0, 4.0]), _state([5.0, 6.0], [8.0, 0.0])]
    average = weighted_average(states, [10, 30], ["layer.weight", "bn.running_mean"])
    assert torch.equal(average["layer.weight"], torch.tensor([4.0, 5.0]))
    assert torch.equal(average["bn.running_mean"], torch.tensor([6.0, 1.0]))
    assert average["layer.weight"].dtype == torch.float32


def test_averaging_identical_states_is_exact():
    state = {"w": torch.randn(64, generator=torch.Generator().manual_seed(0))}
    assert torch.equal(weighted_average([state, state, state], [3, 7, 11], ["w"])["w"], state["w"])


def test_weighted_average_refuses_bad_weights():
    with pytest.raises(ValueError, match="positive sum"):
        weighted_average([_state([1.0], [1.0])], [0], ["layer.weight"])
    with pytest.raises(ValueError, match="one weight per state"):
        weighted_average([_state([1.0], [1.0])], [1, 2], ["layer.weight"])


def test_integer_buffers_and_local_keys_do_not_travel():
    state = _state([1.0], [1.0], tracked=5)
    assert exchanged_keys(state) == ["layer.weight", "bn.running_mean"]
    assert exchanged_keys(state, {"bn.running_mean"}) == ["layer.weight"]
    assert state_nbytes(state, exchanged_keys(state)) == 2 * 4  # two float32 values


def test_batchnorm_keys_are_exactly_the_batchnorm_entries():
    model = build_model(PARAMS.model.model_copy(update={"width": 4}), 4)
    keys = batchnorm_keys(model)
    assert keys and all(key in model.state_dict() for key in keys)
    suffixes = {key.rsplit(".", 1)[1] for key in keys}
    assert suffixes == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    assert "classifier.weight" not in keys and "features.0.0.weight" not in keys  # linear head, first conv
    group_norm = build_model(PARAMS.model.model_copy(update={"width": 4, "norm": "group"}), 4)
    assert batchnorm_keys(group_norm) == frozenset()
    assert parameter_keys(model) == {name for name, _ in model.named_parameters()}


def test_non_finite_entries_are_found():
    state = _state([1.0, float("nan")], [float("inf"), 0.0])
    assert non_finite_keys(state, ["layer.weight", "bn.running_mean"]) == ["layer.weight", "bn.running_mean"]
    assert non_finite_keys(_state([1.0], [1.0]), ["layer.weight", "bn.running_mean"]) == []


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_plain_strategies_take_the_average(strategy):
    current, average = _state([1.0, 1.0], [0.0, 0.0]), {"layer.weight": torch.tensor([0.5, 2.0])}
    entries, optimizer = server_step(strategy, current, average, {}, {"layer.weight"}, PARAMS.federation)
    assert entries["layer.weight"] is average["layer.weight"] and optimizer == {}


def test_fedavgm_accumulates_momentum_on_the_pseudo_gradient():
    params = PARAMS.federation
    lr, beta = params.fedavgm.server_lr, params.fedavgm.momentum
    current = {"layer.weight": torch.tensor([1.0], dtype=torch.float64)}
    optimizer = init_server_state("fedavgm", current, ["layer.weight"])
    entries, optimizer = server_step("fedavgm", current, {"layer.weight": torch.tensor([0.8], dtype=torch.float64)},
                                     optimizer, {"layer.weight"}, params)
    first = 1.0 - lr * 0.2
    assert entries["layer.weight"].item() == pytest.approx(first)
    entries, _ = server_step("fedavgm", entries, {"layer.weight": torch.tensor([first - 0.1], dtype=torch.float64)},
                             optimizer, {"layer.weight"}, params)
    assert entries["layer.weight"].item() == pytest.approx(first - lr * (beta * 0.2 + 0.1))


def test_fedadam_step_and_buffers_take_the_plain_average():
    params = PARAMS.federation
    adam = params.fedadam
    current = {"layer.weight": torch.tensor([1.0, -1.0], dtype=torch.float64), "bn.running_mean": torch.tensor([3.0])}
    average = {"layer.weight": torch.tensor([0.9, -1.2], dtype=torch.float64), "bn.running_mean": torch.tensor([2.0])}
    optimizer = init_server_state("fedadam", current, ["layer.weight"])
    before = {key: value.clone() for key, value in optimizer.items()}
    entries, new_optimizer = server_step("fedadam", current, average, optimizer, {"layer.weight"}, params)
    delta = current["layer.weight"] - average["layer.weight"]
    first, second = (1 - adam.beta1) * delta, (1 - adam.beta2) * delta**2
    expected = current["layer.weight"] - adam.server_lr * first / (second.sqrt() + adam.tau)
    assert torch.allclose(entries["layer.weight"], expected)
    assert torch.equal(entries["bn.running_mean"], average["bn.running_mean"])  # statistics are not gradients
    assert all(torch.equal(optimizer[key], before[key]) for key in optimizer), "input state was modified"
    assert torch.allclose(new_optimizer["v/layer.weight"], second)
