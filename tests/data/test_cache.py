"""Building, failing and loading the preprocessed cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from leukofed.config import load_params
from leukofed.data.cache import build_cache, load_cache
from leukofed.errors import DataError
from leukofed.io import read_json
from leukofed.provenance import DataProvenance, manifest_fingerprint

PARAMS_FILE = Path(__file__).resolve().parents[2] / "params.yaml"
SIZE = 32


def data_params(**overrides):
    return load_params(PARAMS_FILE).data.model_copy(update={"image_size": SIZE, **overrides})


def smooth_image(seed: int, height: int = 48, width: int = 48) -> np.ndarray:
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))


def write_image(root: Path, relpath: str, image: Image.Image | np.ndarray, **options) -> None:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path, **options)


def manifest_of(root: Path) -> pd.DataFrame:
    rows = []
    for path in sorted(root.glob("Original/*/*")):
        content = path.read_bytes()
        relpath = path.relative_to(root).as_posix()
        sha = hashlib.sha256(content).hexdigest()
        rows.append({"relpath": relpath, "label": path.parent.name, "sha256": sha, "bytes": len(content)})
    return pd.DataFrame(rows)


def provenance_of(root: Path, manifest: pd.DataFrame) -> DataProvenance:
    fingerprint = manifest_fingerprint(manifest[["relpath", "label", "sha256"]].itertuples(index=False))
    return DataProvenance("test", "folder", str(root), fingerprint, len(manifest))


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Two images per class, one exact copy, one grey PNG and one non-square image."""
    root = tmp_path / "raw"
    classes = load_params(PARAMS_FILE).data.classes
    for number, label in enumerate(classes):
        for k in range(2):
            write_image(root, f"Original/{label}/{label}-{k}.jpg", smooth_image(10 * number + k), quality=95)
    first = f"Original/{classes[0]}/{classes[0]}-0.jpg"
    (root / f"Original/{classes[0]}/{classes[0]}-copy.jpg").write_bytes((root / first).read_bytes())
    write_image(root, f"Original/{classes[1]}/grey.png", Image.new("L", (40, 40), 90))
    write_image(root, f"Original/{classes[2]}/wide.png", smooth_image(99, height=40, width=80))
    return root


def break_files(root: Path, label: str) -> list[str]:
    """Add a zero-byte image and a text file disguised as a JPEG; return their relpaths."""
    empty, text = f"Original/{label}/empty.jpg", f"Original/{label}/text.jpg"
    (root / empty).write_bytes(b"")
    (root / text).write_text("not an image")
    return [empty, text]


def build(root: Path, out: Path, **overrides) -> dict:
    manifest = manifest_of(root)
    return build_cache(root, manifest, provenance_of(root, manifest), data_params(**overrides), out)


def test_build_and_load_round_trip(dataset, tmp_path):
    out = tmp_path / "cache"
    meta = build(dataset, out)

    cache = load_cache(out)
    assert cache.images.shape == (11, SIZE, SIZE, 3) and cache.images.dtype == np.uint8
    assert isinstance(cache.images, np.memmap)
    assert cache.classes == list(data_params().classes)
    assert cache.meta == meta == read_json(out / "meta.json")
    assert cache.provenance.n_images == 11 and cache.provenance.dataset == "test"
    columns = ["row", "relpath", "label", "label_index", "sha256", "group", "width", "height", "mode"]
    assert list(cache.index.columns) == columns
    assert cache.index["row"].tolist() == list(range(11))
    assert (cache.index["label_index"] == cache.index["label"].map(cache.classes.index)).all()
    assert meta["n_checked"] == meta["n_valid"] == 11 and meta["n_invalid"] == 0
    assert meta["n_groups"] == 10 and meta["largest_group"] == 2
    assert meta["n_exact_duplicate_files"] == 2 and meta["n_near_duplicate_files"] == 0
    assert meta["converted_modes"] == {"L": 1}
    assert read_json(out / "validation.json")["invalid"] == []


def test_cached_pixels_match_the_source(dataset, tmp_path):
    build(dataset, tmp_path / "cache")
    cache = load_cache(tmp_path / "cache")
    row = cache.index.set_index("relpath").loc
    grey = cache.images[row["Original/Early/grey.png", "row"]]
    assert (grey == 90).all()
    wide = row["Original/Pre/wide.png"]
    assert (wide["width"], wide["height"], wide["mode"]) == (80, 40, "RGB")
    centre_square = smooth_image(99, height=40, width=80)[:, 20:60]
    centre = Image.fromarray(centre_square).resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    assert np.abs(cache.images[wide["row"]].astype(int) - np.asarray(centre)).mean() < 1


def test_exact_copies_share_a_group(dataset, tmp_path):
    build(dataset, tmp_path / "cache")
    index = load_cache(tmp_path / "cache").index
    copies = index[index["sha256"].duplicated(keep=False)]
    assert len(copies) == 2 and copies["group"].nunique() == 1


def test_invalid_images_fail_without_leaving_a_cache(dataset, tmp_path):
    bad = break_files(dataset, "Pro")
    out = tmp_path / "cache"

    with pytest.raises(DataError) as caught:
        build(dataset, out, on_invalid="fail")

    message = str(caught.value)
    assert all(relpath in message for relpath in bad)
    assert "2 invalid" in message and "data.on_invalid: skip" in message and str(out / "validation.json") in message
    assert not (out / "images.npy").exists()
    report = read_json(out / "validation.json")
    reasons = {item["relpath"]: item["reason"] for item in report["invalid"]}
    assert reasons[bad[0]] == "empty file (0 bytes)" and reasons[bad[1]].startswith("not an image")
    with pytest.raises(DataError, match="run the preprocess stage"):
        load_cache(out)


def test_failed_build_removes_a_stale_cache(dataset, tmp_path):
    out = tmp_path / "cache"
    build(dataset, out)
    break_files(dataset, "Pro")
    with pytest.raises(DataError):
        build(dataset, out, on_invalid="fail")
    assert not (out / "images.npy").exists()


def test_invalid_images_are_skipped_and_counted(dataset, tmp_path):
    bad = break_files(dataset, "Pro")
    meta = build(dataset, tmp_path / "cache", on_invalid="skip")

    assert meta["n_checked"] == 13 and meta["n_valid"] == 11 and meta["n_invalid"] == 2
    assert meta["provenance"]["n_images"] == 11
    cache = load_cache(tmp_path / "cache")
    assert len(cache.images) == 11 and not set(bad) & set(cache.index["relpath"])
    report = read_json(tmp_path / "cache" / "validation.json")
    assert sorted(item["relpath"] for item in report["invalid"]) == sorted(bad)
    assert report["n_invalid"] == 2 and report["n_groups"] == meta["n_groups"]


def test_no_valid_image_is_an_error(tmp_path):
    root = tmp_path / "raw"
    (root / "Original/Pro").mkdir(parents=True)
    break_files(root, "Pro")
    with pytest.raises(DataError, match="none of the 2 images is valid"):
        build(root, tmp_path / "cache", on_invalid="skip")


def test_unknown_label_in_manifest_is_an_error(dataset, tmp_path):
    manifest = manifest_of(dataset).assign(label="Unknown")
    with pytest.raises(DataError, match="data.classes"):
        build_cache(dataset, manifest, provenance_of(dataset, manifest), data_params(), tmp_path / "cache")


def test_missing_cache_is_an_error(tmp_path):
    with pytest.raises(DataError) as caught:
        load_cache(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(caught.value) and "run the preprocess stage" in str(caught.value)


def test_inconsistent_cache_is_an_error(dataset, tmp_path):
    out = tmp_path / "cache"
    build(dataset, out)
    np.save(out / "images.npy", np.zeros((3, SIZE, SIZE, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="11 rows but images.npy holds 3"):
        load_cache(out)
