"""The lightweight attention CNN of Awan et al. (Sci Rep 2026) and its variants.

Architecture at width ``w`` (``model.width``; ``w = 16`` by default), for a float NCHW input in
[0, 1] of any side >= 32 (the stem's normalisation layer absorbs the input scale, so no dataset
mean/std is needed):

====================  ===========================================================  ==========
block                 layers                                                       params w=16
====================  ===========================================================  ==========
stem                  conv3x3 3->w, norm, ReLU, maxpool 2                                 464
conv block 1          conv3x3 w->2w, norm, ReLU, maxpool 2                              4,672
conv block 2          conv3x3 2w->4w, norm, ReLU, maxpool 2                            18,560
cheap block           depthwise conv3x3 4w, norm, ReLU, pointwise 4w->4w, norm, ReLU    4,928
attention ``cbam``    channel gate: shared MLP 4w->4w/r->4w over the avg- and           1,096
                      max-pooled descriptors; spatial gate: conv kxk over the             + 99
                      [mean, max] channel maps (r = attention_reduction, k = 7)
head                  global average pool, dropout, linear 4w->n_classes                  260
====================  ===========================================================  ==========

Total at the defaults (``cbam``, ``batch`` norm, 4 classes): **30,079** trainable parameters
(``se``: 29,980, ``none``: 28,884; GroupNorm has as many affine parameters as BatchNorm).

``attention``: ``cbam`` is the channel gate followed by the spatial gate (Woo et al., 2018);
``se`` is squeeze-and-excitation (Hu et al., 2018): the channel gate over the average-pooled
descriptor alone; ``none`` is the identity. ``norm``: ``batch`` is BatchNorm2d; ``group`` is
GroupNorm, which keeps no batch statistics, so per-sample gradients are well defined (Opacus DP-SGD).
Convolutions followed by a normalisation layer carry no bias (the norm's shift replaces it).
"""

from __future__ import annotations

import torch
from torch import nn

from leukofed.config import ModelParams
from leukofed.errors import ConfigError

POOL = 2  # each conv block halves the feature map: a 32 px input ends at 4x4


def _norm(channels: int, params: ModelParams) -> nn.Module:
    """The normalisation layer ``params.norm`` asks for."""
    if params.norm == "group":
        return nn.GroupNorm(params.group_norm_groups, channels)
    return nn.BatchNorm2d(channels)


def _conv_block(in_channels: int, out_channels: int, params: ModelParams) -> nn.Sequential:
    """conv3x3 -> norm -> ReLU -> maxpool: one resolution step.

    The ReLU runs after the pooling: ReLU is monotone, so ``relu(maxpool(x)) == maxpool(relu(x))``
    exactly (outputs and gradients), on a quarter of the values: 5-15% off a training step at 128 px
    (benchmarks/optimisations.py). The ReLU and pooling layers hold no weights, so state-dict keys stay the same.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        _norm(out_channels, params),
        nn.MaxPool2d(POOL),
        nn.ReLU(inplace=True),
    )


def _separable_block(channels: int, params: ModelParams) -> nn.Sequential:
    """Depthwise-separable conv3x3 at constant width: extra depth for ~1/9 of a full conv's parameters."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=3, padding=1, groups=channels, bias=False),
        _norm(channels, params),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, kernel_size=1, bias=False),
        _norm(channels, params),
        nn.ReLU(inplace=True),
    )


class ChannelAttention(nn.Module):
    """Reweights channels by a gate computed from pooled descriptors through a shared MLP.

    Parameters
    ----------
    channels : int
        Channels of the feature map.
    reduction : int
        Bottleneck ratio of the MLP (hidden size ``channels // reduction``, at least 1).
    use_max_pool : bool
        Add the max-pooled descriptor to the average-pooled one (CBAM) or not (squeeze-and-excitation).
    """

    def __init__(self, channels: int, reduction: int, use_max_pool: bool) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        self.use_max_pool = use_max_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        if self.use_max_pool:
            logits = logits + self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return x * torch.sigmoid(logits)


class SpatialAttention(nn.Module):
    """Reweights positions by a gate convolved from the channel-wise mean and max maps.

    Parameters
    ----------
    kernel_size : int
        Odd side of the convolution, so the gate keeps the feature map's size.
    """

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size=kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(maps))


def _attention(channels: int, params: ModelParams) -> nn.Module:
    """The attention module ``params.attention`` names."""
    if params.attention == "cbam":
        return nn.Sequential(
            ChannelAttention(channels, params.attention_reduction, use_max_pool=True),
            SpatialAttention(params.spatial_kernel),
        )
    if params.attention == "se":
        return ChannelAttention(channels, params.attention_reduction, use_max_pool=False)
    return nn.Identity()


class AttentionCNN(nn.Module):
    """Three conv blocks, a depthwise-separable block, an attention module and a linear head.

    Parameters
    ----------
    params : ModelParams
        Width, attention variant, normalisation and dropout (``model`` in params.yaml).
    n_classes : int
        Number of output logits.

    Attributes
    ----------
    features : nn.Sequential
        Stem, two conv blocks and the separable block (the last feature map: a Grad-CAM target).
    attention : nn.Module
        The attention module applied to the last feature map.
    classifier : nn.Linear
        Maps the pooled features to ``n_classes`` logits.
    """

    def __init__(self, params: ModelParams, n_classes: int) -> None:
        super().__init__()
        width = params.width
        self.features = nn.Sequential(
            _conv_block(3, width, params),
            _conv_block(width, 2 * width, params),
            _conv_block(2 * width, 4 * width, params),
            _separable_block(4 * width, params),
        )
        self.attention = _attention(4 * width, params)
        self.dropout = nn.Dropout(params.dropout)
        self.classifier = nn.Linear(4 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, n_classes)`` for images ``(N, 3, H, W)`` in [0, 1]."""
        features = self.attention(self.features(x))
        return self.classifier(self.dropout(features.mean(dim=(2, 3))))


def build_model(params: ModelParams, n_classes: int) -> AttentionCNN:
    """Build the CNN that ``params`` describes, with freshly initialised weights.

    Parameters
    ----------
    params : ModelParams
        The ``model`` section of params.yaml.
    n_classes : int
        Number of classes (``len(data.classes)``).

    Returns
    -------
    AttentionCNN
        Initialised from torch's global generator: seed it (``training.configure_torch``) first.

    Raises
    ------
    ConfigError
        If GroupNorm's group count does not divide the channel counts.
    """
    if params.norm == "group" and params.width % params.group_norm_groups:
        raise ConfigError(
            f"params: model.group_norm_groups={params.group_norm_groups} must divide model.width="
            f"{params.width} (GroupNorm splits every block's channels into that many groups); "
            "pick a divisor of model.width"
        )
    return AttentionCNN(params, n_classes)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters of ``model``."""
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
