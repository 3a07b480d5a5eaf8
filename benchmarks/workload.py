"""Inputs the benchmarks share: a dataset's uint8 image cache and split, found in a project or built.

``--project DIR`` points at a folder where the pipeline ran (``data/<dataset>/cache``,
``results/<dataset>/split.csv``); ``--cache``/``--split`` name the files directly. Without either,
the synthetic dataset of params.yaml is built in a temporary folder by the pipeline's own stages.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from leukofed import stages
from leukofed.config import Params
from leukofed.data.cache import load_cache
from leukofed.data.split import read_split
from leukofed.errors import ConfigError, DataError


def add_input_arguments(parser) -> None:
    """The options every benchmark uses to find (or build) its data."""
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("--dataset", help="dataset of params.yaml (default: its `dataset`)")
    parser.add_argument("--project", type=Path,
                        help="a project folder whose pipeline outputs to use: data/<dataset>/cache and results/<dataset>/split.csv "
                             "(default: build the synthetic data in a temp dir)")
    parser.add_argument("--cache", type=Path, help="cache folder (overrides --project)")
    parser.add_argument("--split", type=Path, help="split.csv (overrides --project)")


def add_quiet_argument(parser) -> None:
    """``--max-busy``: the CPU share other processes may use when a timed repetition starts (see :func:`wait_until_quiet`)."""
    parser.add_argument("--max-busy", type=float, default=0.25,
                        help="start each timed repetition only once other processes keep the CPUs at most this busy "
                             "(0-1; 1 disables the wait; default: 0.25)")


def cache_and_split(args, params: Params, dataset: str, workdir: Path) -> tuple[Path, Path]:
    """The cache folder and split file: given, found under ``--project``, or built in ``workdir``.

    Raises
    ------
    ConfigError
        If nothing was given and the dataset is not synthetic (real data is not fetched here).
    DataError
        If a given or expected path does not exist.
    """
    project = args.project
    cache = args.cache or (project / "data" / dataset / "cache" if project else None)
    split = args.split or (project / "results" / dataset / "split.csv" if project else None)
    if cache is None:
        if params.dataset_spec(dataset).source != "synthetic":
            raise ConfigError(f"dataset '{dataset}' is not synthetic; pass --project or --cache/--split for its pipeline outputs")
        stages.acquire(params, dataset, workdir / "data")
        cache = workdir / "data" / "cache"
        stages.preprocess(params, workdir / "data", cache)
    if split is None:
        split = workdir / "split.csv"
        stages.split(params, cache, split)
    for path in (cache, split):
        if not path.exists():
            raise DataError(f"{path}: not found; run the pipeline for dataset '{dataset}' first or pass the right path")
    return cache, split


def split_part(cache_dir: Path, split_path: Path, part: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Images (uint8, in memory), labels and class count of one split part, as the pipeline stages load them."""
    cache = load_cache(cache_dir)
    table = read_split(split_path)
    rows = table.loc[table["split"] == part, "row"].to_numpy()
    if len(rows) == 0:
        raise DataError(f"{split_path}: no '{part}' images; rerun the split stage")
    return np.asarray(cache.images[rows]), cache.index["label_index"].to_numpy()[rows], len(cache.classes)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation, as numpy's default."""
    return float(np.percentile(np.asarray(values, dtype=float), q))


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def cpu_busy_fraction(window: float) -> float:
    """Share of all cores' time spent busy (not idle or waiting on I/O) over ``window`` seconds, from /proc/stat."""
    def sample() -> tuple[int, int]:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle, iowait
        return sum(fields), idle

    total_before, idle_before = sample()
    time.sleep(window)
    total_after, idle_after = sample()
    total = total_after - total_before
    return 1 - (idle_after - idle_before) / total if total else 0.0


def wait_until_quiet(max_busy: float, window: float = 1.0, timeout: float = 300.0) -> float | None:
    """Wait until other processes keep the CPUs at most ``max_busy`` busy (this one is idle meanwhile).

    On a shared machine, a repetition started while another job runs is slowed unevenly (with two
    torch threads on two cores, by up to 10x: a thread descheduled at an OpenMP barrier stalls the
    other). Gating every repetition on a quiet moment keeps such samples out. Returns the busy share
    seen last, or None without /proc/stat (no gating then); gives up after ``timeout`` seconds.
    """
    if not Path("/proc/stat").is_file():
        return None
    deadline = time.monotonic() + timeout
    busy = cpu_busy_fraction(window)
    while busy > max_busy and time.monotonic() < deadline:
        busy = cpu_busy_fraction(window)
    return busy
