"""The attention CNN: parameter budget, variants, shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import leukofed.model
from leukofed.config import ModelParams, load_params
from leukofed.errors import ConfigError
from leukofed.model import build_model, count_parameters

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"
N_CLASSES = 4


@pytest.fixture(scope="module")
def default_params() -> ModelParams:
    return load_params(PARAMS_FILE).model


def _variant(params: ModelParams, **changes) -> ModelParams:
    return ModelParams.model_validate({**params.model_dump(), **changes})


def test_default_model_fits_the_parameter_budget(default_params):
    count = count_parameters(build_model(default_params, N_CLASSES))

    assert 25_000 <= count <= 40_000


def test_module_docstring_states_the_default_parameter_count(default_params):
    count = count_parameters(build_model(default_params, N_CLASSES))

    assert f"**{count:,}**" in leukofed.model.__doc__


@pytest.mark.parametrize("attention", ["cbam", "se", "none"])
@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("size", [(32, 32), (40, 56)])
def test_forward_gives_one_logit_per_class(default_params, attention, norm, size):
    model = build_model(_variant(default_params, attention=attention, norm=norm), N_CLASSES)

    logits = model(torch.rand(3, 3, *size))

    assert logits.shape == (3, N_CLASSES)
    assert torch.isfinite(logits).all()


def test_attention_variants_differ_only_in_the_attention_module(default_params):
    counts = {
        attention: count_parameters(build_model(_variant(default_params, attention=attention), N_CLASSES).attention)
        for attention in ("cbam", "se", "none")
    }

    assert counts["cbam"] > counts["se"] > counts["none"] == 0


def test_group_norm_model_keeps_no_batch_statistics(default_params):
    model = build_model(_variant(default_params, norm="group"), N_CLASSES)

    assert not any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())
    assert any(isinstance(module, nn.GroupNorm) for module in model.modules())
    assert not any(name.endswith("running_mean") for name in model.state_dict())


def test_group_count_must_divide_the_width(default_params):
    with pytest.raises(ConfigError, match="model.group_norm_groups"):
        build_model(_variant(default_params, norm="group", width=10, group_norm_groups=4), N_CLASSES)


def test_width_scales_the_model(default_params):
    small = count_parameters(build_model(_variant(default_params, width=8), N_CLASSES))
    default = count_parameters(build_model(default_params, N_CLASSES))

    assert small < default


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_pooling_before_relu_gives_the_same_outputs_and_gradients(default_params, norm):
    """Each conv block pools before its ReLU (cheaper); the block must equal conv -> norm -> ReLU -> pool."""
    torch.manual_seed(0)
    block = build_model(_variant(default_params, norm=norm), N_CLASSES).features[0]
    conv, norm_layer, pool, relu = block
    assert isinstance(pool, nn.MaxPool2d) and isinstance(relu, nn.ReLU)
    x = torch.randn(4, 3, 16, 16)
    x[:, :, :6, :6] = 0.5  # a constant patch: pooling windows of equal values (ties) after the conv
    reference = nn.Sequential(conv, norm_layer, nn.ReLU(), nn.MaxPool2d(pool.kernel_size))

    out = block(x)
    gradients = torch.autograd.grad(out.square().sum(), list(block.parameters()))
    expected = reference(x)
    expected_gradients = torch.autograd.grad(expected.square().sum(), list(reference.parameters()))

    assert torch.equal(out, expected)
    assert all(torch.equal(got, want) for got, want in zip(gradients, expected_gradients, strict=True))
