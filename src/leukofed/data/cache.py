"""Validate and preprocess a dataset into a compact uint8 cache.

The cache folder holds:

- ``images.npy``: ``(N, S, S, 3)`` uint8 RGB, ``S = data.image_size``. Square images are resized;
  non-square ones are centre-cropped to a square first (the cell sits in the middle of a smear
  photo, and cropping keeps its aspect ratio, unlike stretching).
- ``index.csv``: one row per cached image (``row`` is its position in ``images.npy``) with its
  file, class, content hash, duplicate group, original size and colour mode.
- ``meta.json``: provenance, classes and validation/duplicate counts.
- ``validation.json``: the invalid files with their reasons, and the same counts.

The folder is replaced atomically, so a crash never leaves a half-written cache.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from leukofed.config import DataParams
from leukofed.data.validate import InvalidImage, decode_rgb, duplicate_groups, perceptual_hash
from leukofed.errors import DataError
from leukofed.io import atomic_dir, read_json, write_json
from leukofed.provenance import DataProvenance

IMAGES_FILE = "images.npy"
INDEX_FILE = "index.csv"
META_FILE = "meta.json"
VALIDATION_FILE = "validation.json"
MANIFEST_COLUMNS = ("relpath", "label", "sha256")  # the ones used (a manifest also has "bytes")
INDEX_COLUMNS = ("row", "relpath", "label", "label_index", "sha256", "group", "width", "height", "mode")
_INDEX_TEXT_COLUMNS = {"relpath": str, "label": str, "sha256": str, "mode": str}
# How many invalid files a fail-fast error message lists (the report lists them all).
_SHOWN_INVALID = 5
# High-quality filter for the (mostly downscaling) resize.
_RESAMPLE = Image.Resampling.LANCZOS


@dataclass(frozen=True)
class Cache:
    """A loaded cache: images are memory-mapped, not read into memory."""

    images: np.ndarray  # (N, S, S, 3) uint8, read-only memory map
    index: pd.DataFrame  # INDEX_COLUMNS, one row per image, in images order
    meta: dict
    provenance: DataProvenance
    classes: list[str]


@dataclass
class _Decoded:
    """What decoding the manifest produced, before duplicate grouping."""

    images: np.ndarray  # (n_valid, S, S, 3)
    hashes: np.ndarray  # (n_valid, hash_size**2) bool
    rows: list[dict]  # index rows of the valid images (without row and group)
    invalid: list[dict]  # {"relpath", "reason"}


def build_cache(
    root: Path, manifest: pd.DataFrame, provenance: DataProvenance, data: DataParams, out_dir: Path
) -> dict:
    """Decode, validate, resize and group every image of a dataset into a cache folder.

    Parameters
    ----------
    root : Path
        Folder the manifest's ``relpath`` values are relative to.
    manifest : DataFrame
        Columns ``relpath, label, sha256, bytes``, one row per file.
    provenance : DataProvenance
        Where the data came from; recorded with the count of valid images.
    data : DataParams
        ``classes``, ``image_size``, ``on_invalid``, ``max_image_pixels`` and ``near_duplicate``.
    out_dir : Path
        The cache folder; replaced as a whole.

    Returns
    -------
    dict
        The cache's ``meta.json`` content.

    Raises
    ------
    DataError
        If the manifest is malformed, if invalid images exist and ``data.on_invalid`` is ``fail``
        (then ``out_dir`` holds only ``validation.json``), or if no image is valid.
    """
    root, out_dir = Path(root), Path(out_dir)
    _check_manifest(manifest, data)
    decoded = _decode_all(root, manifest, data)
    report_path = out_dir / VALIDATION_FILE
    if decoded.invalid and data.on_invalid == "fail":
        _write_failure_report(out_dir, provenance, decoded, len(manifest))
        raise DataError(_invalid_message(decoded.invalid, report_path))
    if not decoded.rows:
        _write_failure_report(out_dir, provenance, decoded, len(manifest))
        raise DataError(
            f"{root}: none of the {len(manifest)} images is valid (reasons in {report_path}); "
            f"check the path of datasets.{provenance.dataset} in params.yaml"
        )
    sha256 = [row["sha256"] for row in decoded.rows]
    groups = duplicate_groups(sha256, decoded.hashes, data.near_duplicate.max_distance)
    index = _index_frame(decoded.rows, groups, data)
    meta = _meta(index, provenance, data, decoded, len(manifest))
    with atomic_dir(out_dir) as tmp:
        np.save(tmp / IMAGES_FILE, decoded.images)
        index.to_csv(tmp / INDEX_FILE, index=False)
        write_json(tmp / META_FILE, meta)
        write_json(tmp / VALIDATION_FILE, _validation_report(meta, decoded.invalid))
    return meta


def _check_manifest(manifest: pd.DataFrame, data: DataParams) -> None:
    missing = [column for column in MANIFEST_COLUMNS if column not in manifest.columns]
    if missing:
        raise DataError(f"manifest: missing columns {missing}; run the acquire stage again to rebuild it")
    unknown = sorted(set(manifest["label"]) - set(data.classes))
    if unknown:
        raise DataError(
            f"manifest: labels {unknown} are not in data.classes {data.classes}; "
            "add them to data.classes or fix data.class_folders"
        )


def _decode_all(root: Path, manifest: pd.DataFrame, data: DataParams) -> _Decoded:
    """Decode every manifest row; invalid files are collected, not raised."""
    size, hash_size = data.image_size, data.near_duplicate.hash_size
    # Filled in place and trimmed at the end: one array of the final size, no list of copies.
    images = np.empty((len(manifest), size, size, 3), dtype=np.uint8)
    hashes = np.empty((len(manifest), hash_size**2), dtype=bool)
    rows, invalid = [], []
    records = manifest.to_dict("records")
    for record in tqdm(records, desc="validate + preprocess", unit="img", disable=None):
        try:
            image, mode = decode_rgb(root / record["relpath"], data.max_image_pixels)
        except InvalidImage as error:
            invalid.append({"relpath": record["relpath"], "reason": error.reason})
            continue
        position = len(rows)
        images[position] = square_resize(image, size)
        hashes[position] = perceptual_hash(images[position], hash_size)
        height, width = image.shape[:2]
        rows.append({**_identity(record), "width": width, "height": height, "mode": mode})
    return _Decoded(images[: len(rows)], hashes[: len(rows)], rows, invalid)


def _identity(record: dict) -> dict:
    return {"relpath": record["relpath"], "label": record["label"], "sha256": record["sha256"]}


def square_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop an (H, W, 3) image to a square and resize it to ``size x size``.

    Parameters
    ----------
    image : ndarray of shape (H, W, 3), dtype uint8
    size : int
        Output side length (``data.image_size``).

    Returns
    -------
    ndarray of shape (size, size, 3), dtype uint8
    """
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[top : top + side, left : left + side]
    if side == size:
        return square
    return np.asarray(Image.fromarray(square).resize((size, size), _RESAMPLE))


def _index_frame(rows: list[dict], groups: np.ndarray, data: DataParams) -> pd.DataFrame:
    index = pd.DataFrame(rows)
    index["row"] = np.arange(len(index))
    index["label_index"] = index["label"].map(data.classes.index).astype(np.int64)
    index["group"] = groups
    return index[list(INDEX_COLUMNS)]


def _meta(index: pd.DataFrame, provenance: DataProvenance, data: DataParams, decoded: _Decoded, n_checked: int) -> dict:
    group_sizes = index["group"].value_counts()
    return {
        "provenance": provenance.with_count(len(index)).to_dict(),
        "image_size": data.image_size,
        "classes": list(data.classes),
        "n_checked": n_checked,
        "n_valid": len(index),
        "n_invalid": len(decoded.invalid),
        "n_groups": len(group_sizes),
        "n_exact_duplicate_files": int(index["sha256"].duplicated(keep=False).sum()),
        "n_near_duplicate_files": _near_duplicate_files(index),
        "largest_group": int(group_sizes.max()),
        "converted_modes": dict(sorted(Counter(mode for mode in index["mode"] if mode != "RGB").items())),
    }


def _near_duplicate_files(index: pd.DataFrame) -> int:
    """Files in groups that the perceptual hash joined: groups holding more than one distinct content."""
    contents_per_group = index.groupby("group")["sha256"].transform("nunique")
    return int((contents_per_group > 1).sum())


def _validation_report(meta: dict, invalid: list[dict]) -> dict:
    counts = {key: value for key, value in meta.items() if key.startswith(("n_", "largest_", "converted_"))}
    return {"provenance": meta["provenance"], "invalid": invalid, **counts}


def _write_failure_report(out_dir: Path, provenance: DataProvenance, decoded: _Decoded, n_checked: int) -> None:
    """Replace the cache folder by one holding only the validation report (an old cache is stale)."""
    report = {
        "provenance": provenance.with_count(len(decoded.rows)).to_dict(),
        "invalid": decoded.invalid,
        "n_checked": n_checked,
        "n_valid": len(decoded.rows),
        "n_invalid": len(decoded.invalid),
    }
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / VALIDATION_FILE, report)


def _invalid_message(invalid: list[dict], report_path: Path) -> str:
    shown = "\n".join(f"  - {item['relpath']}: {item['reason']}" for item in invalid[:_SHOWN_INVALID])
    more = f"\n  ... and {len(invalid) - _SHOWN_INVALID} more" if len(invalid) > _SHOWN_INVALID else ""
    return (
        f"{len(invalid)} invalid image(s) (all listed in {report_path}):\n{shown}{more}\n"
        "fix or remove them, or set data.on_invalid: skip"
    )


def load_cache(cache_dir: Path) -> Cache:
    """Open a cache folder written by :func:`build_cache`.

    Parameters
    ----------
    cache_dir : Path

    Returns
    -------
    Cache
        Images memory-mapped read-only, the index, meta, provenance and classes.

    Raises
    ------
    DataError
        If the folder is missing, incomplete or inconsistent.
    """
    cache_dir = Path(cache_dir)
    missing = [name for name in (IMAGES_FILE, INDEX_FILE, META_FILE) if not (cache_dir / name).is_file()]
    if missing:
        what = "does not exist" if not cache_dir.is_dir() else f"is incomplete (missing {', '.join(missing)})"
        raise DataError(f"{cache_dir}: the preprocessed cache {what}; run the preprocess stage")
    try:
        images = np.load(cache_dir / IMAGES_FILE, mmap_mode="r")
        index = pd.read_csv(cache_dir / INDEX_FILE, keep_default_na=False, dtype=_INDEX_TEXT_COLUMNS)
        meta = read_json(cache_dir / META_FILE)
        provenance = DataProvenance.from_dict(meta["provenance"])
        classes = list(meta["classes"])
    except (OSError, ValueError, KeyError, TypeError, pd.errors.ParserError) as error:
        raise DataError(f"{cache_dir}: the cache is unreadable ({error}); run the preprocess stage again") from None
    _check_consistent(cache_dir, images, index)
    return Cache(images=images, index=index, meta=meta, provenance=provenance, classes=classes)


def _check_consistent(cache_dir: Path, images: np.ndarray, index: pd.DataFrame) -> None:
    problem = None
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        problem = f"{IMAGES_FILE} has shape {images.shape} and dtype {images.dtype}, expected (N, S, S, 3) uint8"
    elif missing := [column for column in INDEX_COLUMNS if column not in index.columns]:
        problem = f"{INDEX_FILE} lacks columns {missing}"
    elif len(index) != len(images):
        problem = f"{INDEX_FILE} has {len(index)} rows but {IMAGES_FILE} holds {len(images)} images"
    if problem:
        raise DataError(f"{cache_dir}: inconsistent cache: {problem}; run the preprocess stage again")
