"""A few dozen real images through every stage, via the CLI (skipped where the dataset is absent)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

from .conftest import REPO, run, tiny_params, write_params

REAL = REPO.parent / "shared" / "datasets" / "all-aria2021"
IMAGES_PER_CLASS = 10

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (REAL / "MANIFEST.csv").is_file(), reason="real dataset not present")]


def _subset(dest: Path) -> None:
    """Copy the first few images of every class, in the official layout (the mirror is read-only)."""
    manifest = pd.read_csv(REAL / "MANIFEST.csv")
    for _label, rows in manifest.groupby("label"):
        for relpath in rows["relpath"].sort_values().head(IMAGES_PER_CLASS):
            target = dest / relpath
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REAL / relpath, target)


def test_real_subset_runs_every_stage(tmp_path):
    _subset(tmp_path / "subset")
    params = tiny_params()
    params["datasets"]["real-subset"] = {"source": "folder", "path": str(tmp_path / "subset")}
    params["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    write_params(tmp_path, params)
    leukofed = [sys.executable, "-m", "leukofed"]
    data, results = Path("data/real-subset"), Path("results/real-subset")

    run([*leukofed, "acquire", "--dataset", "real-subset", "--workdir", str(data)], tmp_path)
    run([*leukofed, "preprocess", "--workdir", str(data), "--out-dir", str(data / "cache")], tmp_path)
    run([*leukofed, "split", "--cache", str(data / "cache"), "--out", str(results / "split.csv")], tmp_path)
    run([*leukofed, "train", "--dataset", "real-subset", "--cache", str(data / "cache"), "--split", str(results / "split.csv"),
         "--out-dir", str(results / "centralized")], tmp_path)
    run([*leukofed, "evaluate", "--model", str(results / "centralized/model.pt"), "--data", str(tmp_path / "subset"),
         "--out-dir", str(results / "external")], tmp_path)

    meta = json.loads((tmp_path / data / "cache/meta.json").read_text())
    assert meta["n_valid"] == 4 * IMAGES_PER_CLASS and meta["provenance"]["source"] == "folder"
    metrics = json.loads((tmp_path / results / "external/metrics.json").read_text())
    assert metrics["n"] == 4 * IMAGES_PER_CLASS
    assert metrics["data"]["fingerprint"] == meta["provenance"]["fingerprint"]
