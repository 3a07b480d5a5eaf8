"""Benchmark: one federated round of the in-process engine against the same amount of centralized training.

Both run in this one process, interleaved (the order alternates every repetition) and repeated, so
machine drift hits both alike; the medians and their ratio are what to compare across machines.

- **Federated round**: :func:`leukofed.federation.engine.run_federation` for one round over the
  partition's sites (``federation.local_epochs`` of local training per site, aggregation, server
  evaluation on every site's validation part, round checkpoint), from a freshly built model.
- **Centralized**: :func:`leukofed.federation.engine.centralized_equivalent_seconds`, i.e.
  :func:`leukofed.training.train_model` on all sites' local training images pooled, for the same
  ``local_epochs``: the same images x epochs in one place.

The engine's own round record splits the round into training, aggregation and evaluation; what is
left (checkpoint write, settings hash) is reported as ``other``.

Usage (from the repository root)::

    .venv/bin/python benchmarks/fl_round_vs_centralized.py --threads 1          # synthetic data, built in a temp dir
    .venv/bin/python benchmarks/fl_round_vs_centralized.py --project . --dataset all-aria2021 --run fedavg-5
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from machine import describe
from workload import add_quiet_argument, cache_and_split, quiet_run

from leukofed import stages
from leukofed.config import FederationRun, Params, load_params
from leukofed.data.cache import load_cache
from leukofed.data.partition import PARTITION_FILE, read_partition
from leukofed.errors import ConfigError, DataError, LeukofedError
from leukofed.federation.engine import SiteData, centralized_equivalent_seconds, run_federation, sites_from_partition
from leukofed.io import write_json
from leukofed.model import build_model
from leukofed.training import configure_torch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "fl_round_vs_centralized.json"
ROUND_PARTS = ("train_seconds", "aggregate_seconds", "eval_seconds")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("--dataset", help="dataset of params.yaml (default: its `dataset`)")
    parser.add_argument("--run", help="entry of federation.runs whose sites and strategy to time (default: the first)")
    parser.add_argument("--project", type=Path,
                        help="a project folder whose pipeline outputs to use: data/<dataset>/cache, results/<dataset>/split.csv, "
                             "results/<dataset>/partitions/sites-<n>/partition.csv (default: build the synthetic data in a temp dir)")
    parser.add_argument("--cache", type=Path, help="cache folder (overrides --project)")
    parser.add_argument("--split", type=Path, help="split.csv (overrides --project)")
    parser.add_argument("--partition", type=Path, help="partition.csv (overrides --project)")
    parser.add_argument("--threads", type=int, help="torch threads (default: runtime.threads)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of each (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions of each first (default: 1)")
    add_quiet_argument(parser)
    parser.add_argument("--note", default="", help="free text recorded with the numbers (e.g. what else ran)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result JSON (default: {DEFAULT_OUT})")
    return parser.parse_args(argv)


def pick_run(params: Params, name: str | None) -> tuple[str, FederationRun]:
    """The federation run to time: ``name`` or the first entry of ``federation.runs``."""
    runs = params.federation.runs
    if not runs:
        raise ConfigError("federation.runs: empty; add a run (sites, strategy, rounds) to benchmark")
    name = name or next(iter(runs))
    if name not in runs:
        raise ConfigError(f"federation.runs: no entry '{name}' (entries: {sorted(runs)}); pass one of them to --run")
    return name, runs[name]


def prepare_inputs(args: argparse.Namespace, params: Params, dataset: str, n_sites: int, workdir: Path) -> tuple[Path, Path, Path]:
    """Cache folder, split and partition: given, found under ``--project``, or built in ``workdir`` by the pipeline stages."""
    cache, split = cache_and_split(args, params, dataset, workdir)
    project = args.project
    partition = args.partition or (
        project / "results" / dataset / "partitions" / f"sites-{n_sites}" / PARTITION_FILE if project else None
    )
    if partition is None:
        partition = workdir / f"sites-{n_sites}" / PARTITION_FILE
        stages.partition(params, cache, split, n_sites, partition.parent)
    if not partition.exists():
        raise DataError(f"{partition}: not found; run the pipeline for dataset '{dataset}' first or pass the right path")
    return cache, split, partition


def load_sites(cache_dir: Path, partition_path: Path, n_sites: int) -> tuple[list[SiteData], int, int]:
    """Each site's local train and validation images, as the federate stage loads them; also classes and image size."""
    cache = load_cache(cache_dir)
    sites = sites_from_partition(cache, read_partition(partition_path), partition_path, n_sites)
    return sites, len(cache.classes), int(cache.meta["image_size"])


@dataclass(frozen=True)
class Workload:
    """What both sides train: the settings, the run's sites and the thread count."""

    params: Params
    run: FederationRun
    sites: list[SiteData]
    n_classes: int
    threads: int

    def fresh_model(self) -> nn.Module:
        """The initial model, identical for every repetition and both sides."""
        configure_torch(self.threads, self.params.train.seed)
        return build_model(self.params.model, self.n_classes)


def time_round(work: Workload, workdir: Path) -> dict:
    """Wall seconds of one federated round from a fresh model, and the engine's split of it."""
    model = work.fresh_model()
    one_round = work.run.model_copy(update={"rounds": 1})
    with tempfile.TemporaryDirectory(dir=workdir) as checkpoint_dir:  # a fresh checkpoint: no resume
        started = time.perf_counter()
        result = run_federation(model, work.sites, one_round, work.params.federation, work.params.train,
                                checkpoint_dir=Path(checkpoint_dir), data_key="benchmark")
        wall = time.perf_counter() - started
    record = result.records[0]
    return {"wall_seconds": wall, **{key: record[key] for key in ROUND_PARTS}, "other_seconds": wall - record["seconds"]}


def time_centralized(work: Workload) -> float:
    """Seconds of centralized training on the pooled site training images for ``local_epochs``."""
    params = work.params
    return centralized_equivalent_seconds(work.fresh_model(), work.sites, params.train, params.federation.local_epochs)


def measure(work: Workload, repeats: int, warmup: int, workdir: Path, max_busy: float = 1.0, retries: int = 0) -> list[dict]:
    """Interleaved repetitions; the order alternates so neither side always runs on a warmer machine.

    Each side runs on a quiet CPU (:func:`workload.quiet_run`; ``max_busy`` 1: no checks).
    """
    def round_() -> dict:
        return quiet_run(lambda: time_round(work, workdir), max_busy, retries)[0]

    def centralized_() -> float:
        return quiet_run(lambda: time_centralized(work), max_busy, retries)[0]

    samples = []
    for index in range(warmup + repeats):
        federated_first = index % 2 == 0
        if federated_first:
            federated_round, centralized = round_(), centralized_()
        else:
            centralized, federated_round = centralized_(), round_()
        sample = {"federated_first": federated_first, "federated_round": federated_round, "centralized_seconds": centralized}
        sample["ratio"] = sample["federated_round"]["wall_seconds"] / sample["centralized_seconds"]
        if index >= warmup:
            samples.append(sample | {"repeat": index - warmup + 1})
        print(f"{'warm-up' if index < warmup else f'repeat {index - warmup + 1}'}: federated round "
              f"{sample['federated_round']['wall_seconds']:.2f} s, centralized {sample['centralized_seconds']:.2f} s, "
              f"ratio {sample['ratio']:.3f}", flush=True)
    return samples


def summarise(samples: list[dict]) -> dict:
    """Medians over the repetitions and the ratios that matter."""
    median = {key: statistics.median(sample["federated_round"][key] for sample in samples)
              for key in ("wall_seconds", *ROUND_PARTS, "other_seconds")}
    centralized = statistics.median(sample["centralized_seconds"] for sample in samples)
    return {
        "federated_round_median": median,
        "centralized_median_seconds": centralized,
        "round_to_centralized": median["wall_seconds"] / centralized,  # ratio of the medians
        "round_to_centralized_paired_median": statistics.median(sample["ratio"] for sample in samples),
        "local_training_to_centralized": median["train_seconds"] / centralized,  # the round without server work
        "overhead_share_of_round": (median["wall_seconds"] - median["train_seconds"]) / median["wall_seconds"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        params = load_params(args.params)
        dataset = args.dataset or params.dataset
        run_name, run = pick_run(params, args.run)
        threads = args.threads or params.runtime.threads
        with tempfile.TemporaryDirectory(prefix="leukofed-benchmark-") as tmp:
            cache, split, partition = prepare_inputs(args, params, dataset, run.sites, Path(tmp))
            sites, n_classes, image_size = load_sites(cache, partition, run.sites)
            machine_before = describe(threads)
            work = Workload(params, run, sites, n_classes, threads)
            samples = measure(work, args.repeats, args.warmup, Path(tmp), args.max_busy, args.retries)
            built = args.project is None and args.cache is None
    except LeukofedError as error:
        print(f"fl_round_vs_centralized: error: {error}", file=sys.stderr)
        return 2
    result = {
        "benchmark": "fl_round_vs_centralized",
        "what": "one federated round (local training at every site, aggregation, server evaluation, checkpoint) vs "
                "centralized training on the same pooled images for the same epochs; same process, interleaved",
        "command": shlex.join(["python", "benchmarks/fl_round_vs_centralized.py", *(sys.argv[1:] if argv is None else argv)]),
        "note": args.note,
        "machine": machine_before | {"load_average_after": describe(threads)["load_average_1_5_15min"]},
        "data": {
            "dataset": dataset,
            "inputs": "synthetic, built in a temp dir by the pipeline stages" if built else
                      {"cache": str(cache), "split": str(split), "partition": str(partition)},
            "image_size": image_size,
            "sites": [{"site": site.number, "n_train": len(site.train_labels), "n_val": len(site.val_labels)} for site in sites],
            "n_train_total": sum(len(site.train_labels) for site in sites),
        },
        "params": {
            "run": {"name": run_name, **run.model_dump(), "rounds_timed": 1},
            "federation": params.federation.model_dump(exclude={"runs"}),
            "train": params.train.model_dump(),
            "model": params.model.model_dump(),
            "threads": threads,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "max_busy": args.max_busy,
            "retries": args.retries,
        },
        "samples": samples,
        "summary": summarise(samples),
    }
    write_json(args.out, result)
    summary = result["summary"]
    print(f"median federated round {summary['federated_round_median']['wall_seconds']:.2f} s, centralized "
          f"{summary['centralized_median_seconds']:.2f} s: ratio {summary['round_to_centralized']:.3f} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
