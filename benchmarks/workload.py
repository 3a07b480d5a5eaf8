"""Inputs the benchmarks share: a dataset's uint8 image cache and split, found in a project or built.

``--project DIR`` points at a folder where the pipeline ran (``data/<dataset>/cache``,
``results/<dataset>/split.csv``); ``--cache``/``--split`` name the files directly. Without either,
the synthetic dataset of params.yaml is built in a temporary folder by the pipeline's own stages.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

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


def add_quiet_argument(parser, retries: bool = True) -> None:
    """``--max-busy`` (and ``--retries``): how quiet the CPUs must be around a timed repetition (see :func:`quiet_run`)."""
    if not retries:
        parser.add_argument("--max-busy", type=float, default=0.25,
                            help="start each timed batch pair only once other processes keep the CPUs at most this busy "
                                 "(0-1; 1: no wait; default: 0.25)")
        return
    parser.add_argument("--max-busy", type=float, default=0.25,
                        help="other processes may use at most this share of the CPUs before and during a timed repetition; "
                             "a disturbed repetition is run again (0-1; 1: no checks; default: 0.25)")
    parser.add_argument("--retries", type=int, default=3, help="reruns of a disturbed repetition (default: 3)")


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


PROC_STAT = Path("/proc/stat")
T = TypeVar("T")


def _cpu_seconds() -> tuple[float, float]:
    """(busy, total) seconds of all cores since boot: /proc/stat's user..steal fields, idle and iowait not busy."""
    fields = [int(value) for value in PROC_STAT.read_text().split("\n", 1)[0].split()[1:9]]
    ticks = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - fields[3] - fields[4]) / ticks, sum(fields) / ticks


def cpu_busy_fraction(window: float) -> float:
    """Share of all cores' time spent busy over ``window`` seconds (this process sleeps meanwhile)."""
    busy_before, total_before = _cpu_seconds()
    time.sleep(window)
    busy_after, total_after = _cpu_seconds()
    total = total_after - total_before
    return (busy_after - busy_before) / total if total else 0.0


def wait_until_quiet(max_busy: float, window: float = 1.0, timeout: float = 300.0) -> float | None:
    """Wait until other processes keep the CPUs at most ``max_busy`` busy (this one is idle meanwhile).

    On a shared machine, a repetition started while another job runs is slowed unevenly (with two
    torch threads on two cores, by up to 10x: a thread descheduled at an OpenMP barrier stalls the
    other). Returns the busy share seen last, or None without /proc/stat (no gating then); gives up
    after ``timeout`` seconds.
    """
    if max_busy >= 1 or not PROC_STAT.is_file():
        return None
    deadline = time.monotonic() + timeout
    busy = cpu_busy_fraction(window)
    while busy > max_busy and time.monotonic() < deadline:
        busy = cpu_busy_fraction(window)
    return busy


def quiet_run(run: Callable[[], T], max_busy: float, retries: int) -> tuple[T, float, float | None]:
    """Run ``run`` on a quiet CPU and check that it stayed quiet; repeat a disturbed run up to ``retries`` times.

    Each attempt starts after :func:`wait_until_quiet`; afterwards, the CPU time other processes used
    during it (all cores' busy time minus this process's CPU time, as a share of all cores' time) must
    be at most ``max_busy``, else the attempt is discarded and run again (the last one is kept anyway).

    Returns
    -------
    result, seconds, others_busy
        ``run``'s result, its wall seconds, and the other processes' CPU share during it (None
        without /proc/stat).
    """
    attempt = 0
    while True:
        wait_until_quiet(max_busy)
        measurable = max_busy < 1 and PROC_STAT.is_file()
        if measurable:
            busy_before, total_before = _cpu_seconds()
        own_before, started = time.process_time(), time.perf_counter()
        result = run()
        seconds, own = time.perf_counter() - started, time.process_time() - own_before
        if not measurable:
            return result, seconds, None
        busy_after, total_after = _cpu_seconds()
        total = total_after - total_before
        others = max(0.0, busy_after - busy_before - own) / total if total else 0.0
        if others <= max_busy or attempt >= retries:
            return result, seconds, others
        attempt += 1
        print(f"  (discarded: other processes used {others:.0%} of the CPUs during it; running it again)", flush=True)
