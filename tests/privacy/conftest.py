"""Tiny data for the privacy tests: colour-coded 32 px images, as site data and as a pipeline cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from leukofed import stages
from leukofed.config import Params, load_params
from leukofed.federation.site import SiteData
from leukofed.io import write_json
from leukofed.provenance import DataProvenance

PARAMS_FILE = Path(__file__).resolve().parents[2] / "params.yaml"
SIZE = 32
COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])
THREADS = 1  # tiny models: one thread is as fast, and immune to spin-waiting when the CPU is shared


def coloured_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noisy images whose colour gives the class away."""
    noise = rng.integers(-60, 61, (len(labels), SIZE, SIZE, 3))
    return np.clip(COLOURS[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)


def tiny_sites(n_sites: int = 3, n_train: int = 16, n_val: int = 8) -> list[SiteData]:
    rng = np.random.default_rng(0)
    sites = []
    for number in range(1, n_sites + 1):
        train, val = rng.integers(0, len(COLOURS), n_train), rng.integers(0, len(COLOURS), n_val)
        sites.append(SiteData(number, coloured_images(train, rng), train, coloured_images(val, rng), val))
    return sites


def tiny_params(**dp_changes) -> Params:
    """The repository's params with a tiny GroupNorm model, small batches, seeded noise and a file MLflow store."""
    params = load_params(PARAMS_FILE)
    privacy = params.privacy.model_copy(update={"dp": params.privacy.dp.model_copy(update={"noise_seed": 0, **dp_changes})})
    return params.model_copy(update={
        "model": params.model.model_copy(update={"width": 4, "norm": "group"}),
        "train": params.train.model_copy(update={"batch_size": 4}),  # sampling rate 1/4 of 16 images: fast RDP sums
        "runtime": params.runtime.model_copy(update={"threads": THREADS, "progress": False}),
        "privacy": privacy,
    })


@pytest.fixture()
def mlflow_file_store(tmp_path, monkeypatch):
    """A throw-away MLflow file store; the registry (needs a database) only records what would be registered."""
    import mlflow

    from leukofed.tracking import RunTracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path}/mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    registered = []
    monkeypatch.setattr(RunTracker, "log_model", lambda self, model, **kwargs: registered.append(kwargs) or 1)
    yield registered
    mlflow.set_tracking_uri(None)  # RunTracker sets MLflow's process-wide URI; do not leak it


@pytest.fixture()
def tiny_project(tmp_path) -> dict[str, Path]:
    """A cache of 96 colour-coded images, its split and its 3-site partition, as the pipeline writes them."""
    params = tiny_params()
    cache = tmp_path / "cache"
    cache.mkdir()
    rng = np.random.default_rng(1)
    labels = np.arange(96) % len(COLOURS)
    np.save(cache / "images.npy", coloured_images(labels, rng))
    classes = params.data.classes
    pd.DataFrame({
        "row": range(len(labels)), "relpath": [f"{classes[label]}/{i}.png" for i, label in enumerate(labels)],
        "label": [classes[label] for label in labels], "label_index": labels,
        "sha256": [f"{i:064x}" for i in range(len(labels))], "group": range(len(labels)),
        "width": SIZE, "height": SIZE, "mode": "RGB",
    }).to_csv(cache / "index.csv", index=False)
    provenance = DataProvenance("tiny", "synthetic", "memory", "f" * 64, len(labels))
    write_json(cache / "meta.json", {"provenance": provenance.to_dict(), "image_size": SIZE, "classes": classes})
    results = tmp_path / "results"
    stages.split(params, cache, results / "split.csv")
    stages.partition(params, cache, results / "split.csv", 3, results / "partitions/sites-3")
    return {"cache": cache, "split": results / "split.csv", "partition": results / "partitions/sites-3/partition.csv",
            "results": results}
