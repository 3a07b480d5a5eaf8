"""Decoding every kind of input image, and duplicate grouping."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from leukofed.data.validate import InvalidImage, decode_rgb, duplicate_groups, perceptual_hash

MAX_PIXELS = 1_000_000
HASH_SIZE = 8
NEAR = 4  # the repository default of data.near_duplicate.max_distance


def smooth_image(seed: int, size: int = 64) -> np.ndarray:
    """A smooth random RGB image: distinct seeds give clearly different perceptual hashes."""
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))


def save(array_or_image, path: Path, **options) -> Path:
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    image.save(path, **options)
    return path


def refused(path: Path, max_pixels: int = MAX_PIXELS) -> str:
    with pytest.raises(InvalidImage) as caught:
        decode_rgb(path, max_pixels)
    return caught.value.reason


def test_rgb_jpeg_round_trips(tmp_path):
    original = smooth_image(0)
    image, mode = decode_rgb(save(original, tmp_path / "a.jpg", quality=95), MAX_PIXELS)
    assert mode == "RGB" and image.dtype == np.uint8 and image.shape == (64, 64, 3)
    assert np.abs(image.astype(int) - original).mean() < 3


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert refused(path) == "empty file (0 bytes)"


def test_truncated_jpeg_is_refused(tmp_path):
    data = save(smooth_image(1), tmp_path / "full.jpg").read_bytes()
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    assert refused(path).startswith("truncated or corrupt image")
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_text_file_is_refused(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    assert refused(path).startswith("not an image")


def test_missing_file_is_refused(tmp_path):
    assert refused(tmp_path / "gone.jpg").startswith("cannot read")


def test_too_large_is_refused_before_decoding(tmp_path, monkeypatch):
    path = save(smooth_image(2, size=40), tmp_path / "big.png")

    def forbidden_load(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", forbidden_load)
    reason = refused(path, max_pixels=1000)
    assert reason == "too large: 40x40 = 1600 pixels > data.max_image_pixels=1000"


def test_grayscale_becomes_rgb(tmp_path):
    path = save(Image.new("L", (10, 8), 100), tmp_path / "grey.png")
    image, mode = decode_rgb(path, MAX_PIXELS)
    assert mode == "L" and image.shape == (8, 10, 3) and image.dtype == np.uint8
    assert (image == 100).all()


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:2] = (200, 0, 0, 255)  # opaque red top half, fully transparent bottom half
    image, mode = decode_rgb(save(rgba, tmp_path / "alpha.png"), MAX_PIXELS)
    assert mode == "RGBA" and image.shape == (4, 4, 3)
    assert (image[:2] == (200, 0, 0)).all() and (image[2:] == 255).all()


def test_palette_with_transparency_is_composited(tmp_path):
    palette_image = Image.new("P", (4, 4), 0)
    palette_image.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    image, mode = decode_rgb(save(palette_image, tmp_path / "p.png", transparency=0), MAX_PIXELS)
    assert mode == "P" and (image == 255).all()


def test_cmyk_becomes_rgb(tmp_path):
    path = save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    image, mode = decode_rgb(path, MAX_PIXELS)
    assert mode == "CMYK" and image.shape == (16, 16, 3) and image.dtype == np.uint8
    red, green, blue = image.reshape(-1, 3).mean(axis=0)
    assert red > 240 and green < 15 and blue < 15


def test_16bit_is_scaled_by_its_range_not_clipped(tmp_path):
    ramp = np.linspace(1000, 5000, 64, dtype=np.uint16).reshape(8, 8)  # all above 255
    image, mode = decode_rgb(save(ramp, tmp_path / "deep.png"), MAX_PIXELS)
    assert mode.startswith("I;16") and image.shape == (8, 8, 3) and image.dtype == np.uint8
    assert image.min() == 0 and image.max() == 255
    flat = image[:, :, 0].ravel()
    assert (np.diff(flat.astype(int)) >= 0).all() and len(np.unique(flat)) > 32


def test_constant_16bit_image_does_not_divide_by_zero(tmp_path):
    image, _ = decode_rgb(save(np.full((4, 4), 777, dtype=np.uint16), tmp_path / "flat.png"), MAX_PIXELS)
    assert image.shape == (4, 4, 3) and image.dtype == np.uint8


def test_perceptual_hash_has_hash_size_squared_bits():
    bits = perceptual_hash(smooth_image(3), HASH_SIZE)
    assert bits.shape == (HASH_SIZE**2,) and bits.dtype == bool


def decoded_hash(path: Path) -> np.ndarray:
    return perceptual_hash(decode_rgb(path, MAX_PIXELS)[0], HASH_SIZE)


def test_planted_duplicates_share_a_group_and_distinct_images_do_not(tmp_path):
    paths = [save(smooth_image(seed), tmp_path / f"img{seed}.jpg", quality=95) for seed in range(6)]
    exact_copy = tmp_path / "copy_of_img1.jpg"
    exact_copy.write_bytes(paths[1].read_bytes())
    brighter = np.clip(smooth_image(4).astype(int) + 2, 0, 255).astype(np.uint8)
    near_copy = save(brighter, tmp_path / "img4_reencoded.jpg", quality=85)
    files = [*paths, exact_copy, near_copy]
    sha = [hashlib.sha256(path.read_bytes()).hexdigest() for path in files]

    groups = duplicate_groups(sha, np.stack([decoded_hash(path) for path in files]), NEAR)

    assert groups.tolist() == [0, 1, 2, 3, 4, 5, 1, 4]


def test_identical_bytes_join_even_at_distance_zero():
    hashes = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=bool)  # 2+ bits apart
    assert duplicate_groups(["a", "b", "b"], hashes, max_distance=0).tolist() == [0, 1, 1]
    hashes[1] = hashes[0]
    assert duplicate_groups(["a", "b", "c"], hashes, max_distance=0).tolist() == [0, 0, 1]


def test_256_bit_hashes_that_differ_everywhere_stay_apart():
    hashes = np.zeros((2, 16**2), dtype=bool)
    hashes[1] = True  # 256 differing bits must not wrap around to distance 0
    assert duplicate_groups(["a", "b"], hashes, max_distance=0).tolist() == [0, 1]


def test_grouping_is_transitive_and_numbered_by_first_appearance():
    hashes = np.zeros((4, 8), dtype=bool)
    hashes[0, :8] = True  # row 0 far from the chain 1 - 2 - 3
    hashes[2, 0] = True  # 1 bit from row 1
    hashes[3, :2] = True  # 1 bit from row 2, 2 bits from row 1
    groups = duplicate_groups(["w", "x", "y", "z"], hashes, max_distance=1)
    assert groups.tolist() == [0, 1, 1, 1]


def test_grouping_4000_images_is_fast():
    rng = np.random.default_rng(0)
    hashes = rng.random((4000, HASH_SIZE**2)) < 0.5
    started = time.perf_counter()
    groups = duplicate_groups([f"{i}" for i in range(4000)], hashes, NEAR)
    assert time.perf_counter() - started < 3
    assert groups.max() == 3999  # random 64-bit hashes are never within 4 bits
