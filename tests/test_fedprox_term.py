"""FedProx's proximal term in local training: off by default, and it holds the weights near their start."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from leukofed.config import load_params
from leukofed.model import build_model
from leukofed.training import configure_torch, train_model

PARAMS = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
TRAIN = PARAMS.train.model_copy(update={"batch_size": 8})
MODEL = PARAMS.model.model_copy(update={"width": 4})
STRONG_MU = 100.0  # large enough to dominate the cross-entropy gradient
THREADS = 1  # tiny models: one thread is as fast, and immune to spin-waiting when the CPU is shared


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8), np.arange(24) % 4


def _trained(**kwargs) -> tuple[dict, dict]:
    """(start weights, weights after two epochs) of a freshly seeded tiny model."""
    configure_torch(THREADS, seed=0)
    model = build_model(MODEL, 4)
    start = {key: value.clone() for key, value in model.state_dict().items()}
    images, labels = _data()
    return start, train_model(model, images, labels, TRAIN, epochs=2, **kwargs).state_dict


def _distance(first: dict, second: dict) -> float:
    """Euclidean distance over the trainable parameters (the term does not touch BatchNorm statistics)."""
    keys = [name for name, _ in build_model(MODEL, 4).named_parameters()]
    return sum(float((first[key] - second[key]).square().sum()) for key in keys) ** 0.5


def test_mu_zero_trains_bitwise_as_without_the_term():
    _, plain = _trained()
    _, zero = _trained(proximal_mu=0.0)
    assert all(torch.equal(plain[key], zero[key]) for key in plain)


def test_the_term_keeps_the_weights_near_their_start():
    start, plain = _trained()
    _, proximal = _trained(proximal_mu=STRONG_MU)
    assert _distance(start, proximal) < 0.5 * _distance(start, plain)


def test_a_negative_mu_is_refused():
    with pytest.raises(ValueError, match="proximal_mu"):
        _trained(proximal_mu=-1.0)
