"""A tiny synthetic federation for the Flower tests: params file, cache and a 3-site partition, built once per module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from leukofed import stages
from leukofed.config import Params, load_params

REPO = Path(__file__).resolve().parents[2]
N_SITES = 3
ROUNDS = 2


@dataclass(frozen=True)
class TinyFederation:
    """Where the tiny federation's files are."""

    params_path: Path
    params: Params
    cache: Path
    partition: Path


def tiny_params() -> dict:
    """The repository's params.yaml shrunk to seconds per round: few 32 px images, a width-4 model, one thread."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["datasets"]["synthetic"]["synthetic"].update(images_per_class=16, image_size=48)
    raw["data"]["image_size"] = 32
    raw["model"]["width"] = 4
    raw["train"]["batch_size"] = 8
    raw["runtime"].update(threads=1, progress=False)
    raw["federation"]["local_epochs"] = 1
    raw["federation"]["runs"]["fedavg-3"]["rounds"] = ROUNDS
    return raw


@pytest.fixture(scope="module")
def tiny_federation(tmp_path_factory) -> TinyFederation:
    folder = tmp_path_factory.mktemp("tiny-federation")
    params_path = folder / "params.yaml"
    params_path.write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    params = load_params(params_path)
    stages.acquire(params, "synthetic", folder / "source")
    stages.preprocess(params, folder / "source", folder / "cache")
    stages.split(params, folder / "cache", folder / "split.csv")
    stages.partition(params, folder / "cache", folder / "split.csv", N_SITES, folder / "partition")
    return TinyFederation(params_path, params, folder / "cache", folder / "partition" / "partition.csv")
