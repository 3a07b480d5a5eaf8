"""Benchmark: DP-SGD local training against non-private training of the same model, and the sweep it implies.

For every site of a partition, one local epoch of :func:`leukofed.training.train_model` is timed in
three variants, interleaved (the order rotates every repetition) in this one process:

- ``batchnorm``: the pipeline's default model (``model.norm: batch``), non-private;
- ``group``: the same CNN with GroupNorm (the DP model), non-private: the baseline of the DP ratio;
- ``group-dp``: the GroupNorm CNN with DP-SGD (Opacus per-sample gradients, clipping, noise, Poisson
  sampling; ``privacy.dp.max_grad_norm``, noise multiplier 1: the noise level does not change the cost).

Throughput is local training images per second summed over the sites (a DP epoch draws ``n`` images
in expectation). The CPU time of this process is recorded beside the wall time. Every figure is
given twice: from the medians over the repetitions, and from each site's least disturbed repetition
(its minimum), which on a shared machine comes closest to what an idle one does. Inference (one forward pass over every site's training images) is timed as well,
to project the privacy sweep's wall time: per epsilon level ``rounds x (local_epochs x epoch time
of all sites + server evaluation on the validation parts)``, plus the membership audits (8 views
of every queried member, at most ``privacy.attack.max_members``, and test image per audited model).

Usage (from the repository root, on a finished pipeline run)::

    .venv/bin/python benchmarks/dp_throughput.py --dataset all-aria2021 --sites 5 --repeats 2
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from machine import describe

from leukofed.config import Params, load_params
from leukofed.data.cache import load_cache
from leukofed.data.partition import PARTITION_FILE, read_partition
from leukofed.errors import DataError, LeukofedError
from leukofed.io import write_json
from leukofed.model import build_model
from leukofed.privacy.attacks import QUARTER_TURNS
from leukofed.privacy.dp import PrivacyAccountant, PrivateTraining
from leukofed.training import configure_torch, predict_logits, train_model

HERE = Path(__file__).resolve().parent
VARIANTS = ("batchnorm", "group", "group-dp")
BENCHMARK_NOISE = 1.0  # the noise multiplier does not change the work of a DP step
VIEWS = 2 * QUARTER_TURNS  # the membership audit queries every image in 8 orientations


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("--dataset", help="dataset of params.yaml (default: its `dataset`)")
    parser.add_argument("--project", type=Path, default=Path("."), help="project folder with the pipeline outputs")
    parser.add_argument("--sites", type=int, default=5, help="which partition (sites-<n>) to time (default: 5)")
    parser.add_argument("--threads", type=int, help="torch threads (default: runtime.threads)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions (default: 2)")
    parser.add_argument("--note", default="", help="free text recorded with the numbers (e.g. what else ran)")
    parser.add_argument("--out", type=Path, help="result JSON (default: results/dp_throughput_<dataset>.json)")
    return parser.parse_args(argv)


def load_sites(project: Path, dataset: str, n_sites: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[np.ndarray], int, int]:
    """(train images, labels) per site, validation images per site, test images and classes."""
    cache = load_cache(project / "data" / dataset / "cache")
    partition_path = project / "results" / dataset / "partitions" / f"sites-{n_sites}" / PARTITION_FILE
    split_path = project / "results" / dataset / "split.csv"
    for path in (partition_path, split_path):
        if not path.is_file():
            raise DataError(f"{path}: not found; run the pipeline for dataset '{dataset}' first")
    table = read_partition(partition_path)
    labels = cache.index["label_index"].to_numpy()
    train, val = [], []
    for site in range(1, n_sites + 1):
        rows = {part: table.loc[(table["site"] == site) & (table["part"] == part), "row"].to_numpy() for part in ("train", "val")}
        train.append((np.asarray(cache.images[rows["train"]]), labels[rows["train"]]))
        val.append(np.asarray(cache.images[rows["val"]]))
    n_test = int((pd.read_csv(split_path)["split"] == "test").sum())
    return train, val, n_test, len(cache.classes)


def time_epoch(params: Params, variant: str, images: np.ndarray, labels: np.ndarray, n_classes: int,
               threads: int) -> tuple[float, float]:
    """Wall and CPU seconds (all threads of this process) of one local epoch of ``variant`` from a fresh model."""
    configure_torch(threads, params.train.seed)
    model = build_model(params.model.model_copy(update={"norm": "batch" if variant == "batchnorm" else "group"}), n_classes)
    privacy = None
    if variant == "group-dp":
        privacy = PrivateTraining(noise_multiplier=BENCHMARK_NOISE, max_grad_norm=params.privacy.dp.max_grad_norm,
                                  accountant=PrivacyAccountant(owner="benchmark", delta=1 / (10 * len(images)), budget=None),
                                  noise_seed=0)
    started, cpu_started = time.perf_counter(), time.process_time()
    train_model(model, images, labels, params.train, epochs=1, privacy=privacy)
    return time.perf_counter() - started, time.process_time() - cpu_started


def time_inference(params: Params, images: list[np.ndarray], n_classes: int, threads: int) -> float:
    """Seconds of one forward pass over ``images`` (the GroupNorm model, eval batches)."""
    configure_torch(threads, params.train.seed)
    model = build_model(params.model.model_copy(update={"norm": "group"}), n_classes)
    started = time.perf_counter()
    for part in images:
        predict_logits(model, part, params.train.eval_batch_size)
    return time.perf_counter() - started


def _times(samples: list[dict], key: str, pick) -> dict[str, float]:
    """Per variant: ``pick`` (min or median) over the repetitions of each site's time, summed over the sites."""
    n_sites = len(samples[0][key][VARIANTS[0]])
    return {variant: sum(pick([s[key][variant][site] for s in samples]) for site in range(n_sites)) for variant in VARIANTS}


def _projection(params: Params, epoch: dict[str, float], val_eval: float, audit_seconds: float) -> dict:
    """The privacy sweep's wall time at ``privacy.sweep``'s settings, from per-epoch and evaluation times."""
    sweep = params.privacy.sweep
    per_level = {
        str(epsilon): sweep.rounds * (sweep.local_epochs * epoch["group" if np.isinf(epsilon) else "group-dp"] + val_eval)
        for epsilon in sweep.epsilons
    }
    return {"rounds": sweep.rounds, "local_epochs": sweep.local_epochs, "training_seconds_per_level": per_level,
            "audit_seconds": audit_seconds, "total_minutes": (sum(per_level.values()) + audit_seconds) / 60}


def summarise(samples: list[dict], params: Params, *, n_train: int, n_test: int) -> dict:
    """Throughput, DP ratios and the projected sweep, twice: from the medians over the repetitions and from the
    least disturbed repetition of each site (its minimum: on a shared machine, the closest to an idle one)."""
    members = n_train if params.privacy.attack.max_members is None else min(n_train, params.privacy.attack.max_members)
    summary = {}
    for name, pick in (("median", statistics.median), ("least_disturbed", min)):
        wall = _times(samples, "epoch_seconds_per_site", pick)
        cpu = _times(samples, "epoch_cpu_seconds_per_site", pick)
        val_eval = pick([s["val_inference_seconds"] for s in samples])
        inference_rate = n_train / pick([s["train_inference_seconds"] for s in samples])
        audit_seconds = len(params.privacy.sweep.epsilons) * VIEWS * (members + n_test) / inference_rate
        summary[name] = {
            "images_per_second": {variant: n_train / wall[variant] for variant in VARIANTS},
            "dp_wall_ratio_vs_group": wall["group-dp"] / wall["group"],  # the DP cost on the same model
            "dp_cpu_ratio_vs_group": cpu["group-dp"] / cpu["group"],  # CPU time of this process: steadier when shared
            "dp_wall_ratio_vs_batchnorm": wall["group-dp"] / wall["batchnorm"],
            "group_vs_batchnorm_wall": wall["group"] / wall["batchnorm"],
            "epoch_seconds_all_sites": wall,
            "epoch_cpu_seconds_all_sites": cpu,
            "inference_images_per_second": inference_rate,
            "projected_sweep": _projection(params, wall, val_eval, audit_seconds),
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        params = load_params(args.params)
        dataset = args.dataset or params.dataset
        threads = args.threads or params.runtime.threads
        train, val, n_test, n_classes = load_sites(args.project, dataset, args.sites)
    except LeukofedError as error:
        print(f"dp_throughput: error: {error}", file=sys.stderr)
        return 2
    machine = describe(threads)
    samples = []
    for repeat in range(args.repeats):
        order = VARIANTS[repeat % len(VARIANTS):] + VARIANTS[: repeat % len(VARIANTS)]
        seconds, cpu = {variant: [] for variant in VARIANTS}, {variant: [] for variant in VARIANTS}
        for images, labels in train:
            for variant in order:
                wall, used = time_epoch(params, variant, images, labels, n_classes, threads)
                seconds[variant].append(wall)
                cpu[variant].append(used)
        sample = {"repeat": repeat + 1, "order": list(order), "epoch_seconds_per_site": seconds,
                  "epoch_cpu_seconds_per_site": cpu,
                  "val_inference_seconds": time_inference(params, val, n_classes, threads),
                  "train_inference_seconds": time_inference(params, [images for images, _ in train], n_classes, threads)}
        samples.append(sample)
        print(f"repeat {repeat + 1}: " + ", ".join(
            f"{key} {sum(seconds[key]):.1f} s ({sum(cpu[key]):.1f} s CPU)" for key in VARIANTS), flush=True)
    result_summary = summarise(samples, params, n_train=sum(len(labels) for _, labels in train), n_test=n_test)
    result = {
        "benchmark": "dp_throughput",
        "what": "one local epoch at every site of a partition: BatchNorm CNN, GroupNorm CNN, GroupNorm CNN with DP-SGD "
                "(Opacus); same process, interleaved; ratios against the GroupNorm model",
        "command": shlex.join(["python", "benchmarks/dp_throughput.py", *(sys.argv[1:] if argv is None else argv)]),
        "note": args.note,
        "machine": machine | {"load_average_after": describe(threads)["load_average_1_5_15min"]},
        "data": {"dataset": dataset, "sites": [len(labels) for _, labels in train],
                 "n_train_total": sum(len(labels) for _, labels in train),
                 "n_val_total": sum(len(part) for part in val), "n_test": n_test,
                 "image_size": int(train[0][0].shape[1])},
        "params": {"train": params.train.model_dump(), "model": params.model.model_dump(),
                   "max_grad_norm": params.privacy.dp.max_grad_norm, "threads": threads, "repeats": args.repeats},
        "samples": samples,
        "summary": result_summary,
    }
    out = args.out or HERE / "results" / f"dp_throughput_{dataset}.json"
    write_json(out, result)
    best = result_summary["least_disturbed"]
    print(f"least disturbed: images/s {', '.join(f'{k} {v:.0f}' for k, v in best['images_per_second'].items())}; DP "
          f"{best['dp_wall_ratio_vs_group']:.2f}x wall, {best['dp_cpu_ratio_vs_group']:.2f}x CPU (vs GroupNorm); projected "
          f"sweep {best['projected_sweep']['total_minutes']:.1f} min -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
