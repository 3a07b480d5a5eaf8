"""The training-step pieces as they were before the issue-7 optimisations, kept as the "before" of ``optimisations.py``.

Copied from ``src/leukofed/{training,model}.py`` at commit 5a87cf7; the package no longer uses them.
Both the old and the current code give bitwise-identical batches and weights (``optimisations.py``
checks this every run), so only the speed differs.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch
from torch import nn

from leukofed.config import AugmentParams
from leukofed.training import LUMA_WEIGHTS, _M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD, _chance, _jitter_factors, _rotate_by_sample, images_to_tensor

# glibc's defaults once its dynamic rule has settled: the mmap threshold rises to the largest block freed
# so far, up to DEFAULT_MMAP_THRESHOLD_MAX (32 MiB on 64-bit), and the trim threshold follows at twice it.
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20
GLIBC_TRIM_THRESHOLD = 2 * GLIBC_MMAP_THRESHOLD_MAX


def _grey(batch: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(LUMA_WEIGHTS, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    return (batch * weights).sum(dim=1, keepdim=True)


def _blend(batch: torch.Tensor, other: torch.Tensor | float, factor: torch.Tensor) -> torch.Tensor:
    return (factor * batch + (1 - factor) * other).clamp_(0, 1)


def augment_batch(batch: torch.Tensor, params: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """Flips, quarter turns and colour jitter on float images, out of place (the old implementation)."""
    n = len(batch)
    if params.hflip:
        batch = torch.where(_chance(n, generator), batch.flip(3), batch)
    if params.vflip:
        batch = torch.where(_chance(n, generator), batch.flip(2), batch)
    if params.rot90:
        batch = _rotate_by_sample(batch, torch.randint(0, 4, (n,), generator=generator))
    if params.brightness:
        batch = _blend(batch, 0.0, _jitter_factors(n, params.brightness, generator))
    if params.contrast:
        mean_grey = _grey(batch).mean(dim=(2, 3), keepdim=True)
        batch = _blend(batch, mean_grey, _jitter_factors(n, params.contrast, generator))
    if params.saturation:
        batch = _blend(batch, _grey(batch), _jitter_factors(n, params.saturation, generator))
    return batch


def training_batch(images: np.ndarray, index: torch.Tensor, params: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """The old step input: convert to float first, then augment, then make it channels-last."""
    batch = augment_batch(images_to_tensor(images[index.numpy()]), params, generator)
    return batch.contiguous(memory_format=torch.channels_last)


def relu_before_pool(model: nn.Module) -> nn.Module:
    """Put each conv block back in the old order conv -> norm -> ReLU -> maxpool (in place; same weights and keys)."""
    for block in model.features:
        layers = list(block)
        if len(layers) == 4 and isinstance(layers[2], nn.MaxPool2d) and isinstance(layers[3], nn.ReLU):
            block[2], block[3] = layers[3], layers[2]
    return model


def glibc_default_malloc() -> None:
    """Approximate glibc's default allocator settings again (undoing :func:`leukofed.training.reuse_freed_memory`).

    Blocks above 32 MiB are mmapped and unmapped on free, as by default; the dynamic threshold
    itself cannot be restored within a process. Linux with glibc only.
    """
    mallopt = ctypes.CDLL(None).mallopt
    mallopt(_M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)
    mallopt(_M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD)
