"""Decode images safely and find duplicate groups.

Every image is decoded to an ``HxWx3`` uint8 RGB array whatever its colour mode, or refused with
:class:`InvalidImage` carrying a short reason (empty, not an image, truncated, too large). Images
that are byte-identical or whose perceptual hashes nearly agree are joined into one *group*, so a
split can keep repeat photos of one cell on the same side.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

# Colour modes with an alpha channel; they are composited on white (a smear's background is light).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# Single-channel modes wider than 8 bits: scaled to 8 bits by their actual range.
_WIDE_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
# Errors Pillow raises while decoding broken pixel data.
_DECODE_ERRORS = (OSError, EOFError, SyntaxError, ValueError)
# Rows of the pairwise-distance matrix computed at once: bounds memory to a few bytes * rows * N.
_DISTANCE_BLOCK_ROWS = 512


class InvalidImage(Exception):
    """A file that cannot be used as an image; ``reason`` says why in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_rgb(path: Path, max_pixels: int) -> tuple[np.ndarray, str]:
    """Decode an image file to RGB.

    The header is read first and an image with more than ``max_pixels`` pixels is refused before
    its pixels are decoded, so a decompression bomb is never allocated. Truncated files are refused
    (Pillow's ``LOAD_TRUNCATED_IMAGES`` is left off).

    Parameters
    ----------
    path : Path
        The image file.
    max_pixels : int
        Largest accepted ``width * height`` (``data.max_image_pixels``).

    Returns
    -------
    image : ndarray of shape (H, W, 3), dtype uint8
        The pixels in RGB. Grey, palette, CMYK and alpha images are converted (alpha composited
        on white); 16-bit, 32-bit and float images are scaled to 0..255 by their actual range.
    mode : str
        The file's original Pillow mode (``"RGB"``, ``"L"``, ``"I;16"``, ...).

    Raises
    ------
    InvalidImage
        If the file is empty, unreadable, not an image, truncated or corrupt, or too large.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise InvalidImage("empty file (0 bytes)")
        image = Image.open(path)
    except UnidentifiedImageError as error:
        raise InvalidImage(f"not an image: {error}") from None
    except Image.DecompressionBombError as error:
        raise InvalidImage(f"too large: {error}") from None
    except OSError as error:
        raise InvalidImage(f"cannot read: {error}") from None
    with image:
        _check_size(image, max_pixels)
        try:
            image.load()
        except _DECODE_ERRORS as error:
            raise InvalidImage(f"truncated or corrupt image: {error}") from None
        return _to_rgb(image), image.mode


def _check_size(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidImage(
            f"too large: {width}x{height} = {width * height} pixels > data.max_image_pixels={max_pixels}"
        )
    if width == 0 or height == 0:
        raise InvalidImage(f"no pixels: {width}x{height}")


def _to_rgb(image: Image.Image) -> np.ndarray:
    """The decoded image as an (H, W, 3) uint8 array."""
    if image.mode in _WIDE_MODES:
        grey = _scale_to_uint8(np.asarray(image))
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    try:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except ValueError as error:  # a mode Pillow cannot convert to RGB (e.g. LAB)
        raise InvalidImage(f"unsupported colour mode {image.mode}: {error}") from None


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map the range actually used to 0..255 (clipping would turn most 16-bit images white)."""
    values = values.astype(np.float64)
    low, high = np.nanmin(values), np.nanmax(values)
    if not high > low:  # constant (or all-NaN) image: nothing to stretch
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = np.nan_to_num((values - low) / (high - low) * 255.0)
    return np.rint(scaled).astype(np.uint8)


def perceptual_hash(image: np.ndarray, hash_size: int) -> np.ndarray:
    """The DCT perceptual hash (pHash) of an image.

    Parameters
    ----------
    image : ndarray of shape (H, W, 3), dtype uint8
    hash_size : int
        Side of the hash (``data.near_duplicate.hash_size``).

    Returns
    -------
    ndarray of shape (hash_size**2,), dtype bool
    """
    digest = imagehash.phash(Image.fromarray(image), hash_size=hash_size)
    return np.asarray(digest.hash, dtype=bool).ravel()


def duplicate_groups(sha256: Sequence[str], hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Join duplicate and near-duplicate images into groups.

    Two images are linked when their files are byte-identical (same sha256) or when their
    perceptual hashes differ in at most ``max_distance`` bits; groups are the connected components
    of these links, so linking is transitive.

    Parameters
    ----------
    sha256 : sequence of str, length N
        Content hash of each file.
    hashes : ndarray of shape (N, B), dtype bool
        Perceptual hash bits of each image (see :func:`perceptual_hash`).
    max_distance : int
        Largest Hamming distance that still links two images (``data.near_duplicate.max_distance``).

    Returns
    -------
    ndarray of shape (N,), dtype int64
        Group id of each image, ``0..G-1`` numbered in order of first appearance.
    """
    hashes = np.asarray(hashes, dtype=bool)
    if hashes.ndim != 2 or hashes.shape[0] != len(sha256):
        raise ValueError(f"hashes must have shape ({len(sha256)}, bits), got {hashes.shape}")
    n = len(sha256)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    first, second = _near_pairs(hashes, max_distance)
    # Link every file to the first file with the same content.
    _, first_of_content, content = np.unique(np.asarray(sha256, dtype=str), return_index=True, return_inverse=True)
    representative = first_of_content[content.ravel()]
    first = np.concatenate([first, np.arange(n)])
    second = np.concatenate([second, representative])
    links = coo_matrix((np.ones(len(first), dtype=bool), (first, second)), shape=(n, n))
    _, components = connected_components(links, directed=False)
    return _first_index_rank(components)


def _near_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of hashes within ``max_distance`` bits, in blocks of rows."""
    packed = _as_words(hashes)
    firsts, seconds = [], []
    for start in range(0, len(packed), _DISTANCE_BLOCK_ROWS):
        block = packed[start : start + _DISTANCE_BLOCK_ROWS]
        distance = np.zeros((len(block), len(packed)), dtype=np.int32)  # wide enough for 256 bits
        for word in range(packed.shape[1]):
            distance += np.bitwise_count(block[:, None, word] ^ packed[None, :, word])
        rows, cols = np.nonzero(distance <= max_distance)
        rows += start
        keep = rows < cols
        firsts.append(rows[keep])
        seconds.append(cols[keep])
    return np.concatenate(firsts), np.concatenate(seconds)


def _as_words(hashes: np.ndarray) -> np.ndarray:
    """Pack bit rows into uint64 words (zero-padded), so XOR + popcount handle 64 bits at a time."""
    packed = np.packbits(hashes, axis=1)
    padding = -packed.shape[1] % 8
    packed = np.pad(packed, ((0, 0), (0, padding)))
    return np.ascontiguousarray(packed).view(np.uint64)


def _first_index_rank(labels: np.ndarray) -> np.ndarray:
    """Relabel so that ids are 0..G-1 in order of each label's first appearance."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.ravel()]
