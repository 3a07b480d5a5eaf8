"""Tests of leukofed.evaluation.audit on constructed images whose cues do or do not encode the class."""

from __future__ import annotations

import numpy as np
import pytest

from leukofed.config import AuditParams
from leukofed.errors import ConfigError
from leukofed.evaluation.audit import border_features, corner_features, shortcut_audit

SIDE, N_CLASSES, PER_CLASS = 32, 4, 40
PARAMS = AuditParams(border_width=4, corner="bottom-right", corner_size=8, corner_grid=4, max_iter=500)


def _images(border_encodes_class: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images; the border band's colour is the class's colour, or random."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(N_CLASSES), PER_CLASS)
    images = rng.integers(0, 256, (len(labels), SIDE, SIDE, 3), dtype=np.uint8)
    palette = rng.integers(0, 256, (N_CLASSES, 3))
    colours = palette[labels] if border_encodes_class else rng.integers(0, 256, (len(labels), 3))
    border = np.ones((SIDE, SIDE), dtype=bool)
    border[PARAMS.border_width:-PARAMS.border_width, PARAMS.border_width:-PARAMS.border_width] = False
    noise = rng.integers(-10, 11, (len(labels), int(border.sum()), 3))
    images[:, border, :] = np.clip(colours[:, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels


def _split(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2 :])


def test_border_colour_that_encodes_the_class_is_found():
    images, labels = _images(border_encodes_class=True)
    result = shortcut_audit(images, labels, *_split(len(labels)), PARAMS)
    assert result["border_colour"]["accuracy"] >= 0.95
    assert result["border_colour"]["balanced_accuracy"] >= 0.95
    assert result["corner_patch"]["accuracy"] >= 0.95  # the corner lies in the border band here
    assert result["n_train"] + result["n_test"] == len(labels)
    assert result["features"]["border_colour"]["count"] == 6
    assert result["features"]["corner_patch"]["count"] == 4 * 4 * 3


def test_uninformative_cues_stay_near_chance():
    images, labels = _images(border_encodes_class=False)
    result = shortcut_audit(images, labels, *_split(len(labels)), PARAMS)
    chance = 1 / N_CLASSES
    for name in ("border_colour", "corner_patch"):
        assert result[name]["balanced_accuracy"] < chance + 0.2
    assert result["majority_class"]["balanced_accuracy"] == pytest.approx(chance)


def test_border_features_are_channel_means_and_stds_of_the_band():
    images = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    images[0, :, :, 0] = 200  # red everywhere
    images[0, 0, :, 1] = 100  # green on the top row only: 8 of the 64 - 16 = 48 band pixels
    features = border_features(images, width=2)[0]
    band_green = np.r_[np.full(8, 100.0), np.zeros(40)]
    np.testing.assert_allclose(features, [200, band_green.mean(), 0, 0, band_green.std(), 0])


def test_corner_patch_is_taken_from_the_named_corner_and_block_averaged():
    images = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    images[0, 6:, 6:, :] = 80  # a 2x2 mark at the bottom-right
    assert corner_features(images, "bottom-right", 4, 2)[0].reshape(2, 2, 3)[1, 1].tolist() == [80, 80, 80]
    assert not corner_features(images, "top-left", 4, 2).any()


def test_settings_that_do_not_fit_the_images_name_the_key():
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(ConfigError, match="border_width"):
        border_features(images, width=4)
    with pytest.raises(ConfigError, match="corner_size"):
        corner_features(images, "top-left", 16, 4)
