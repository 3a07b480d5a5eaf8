"""Benchmark: seconds per inference batch (the paper's style of measurement) and images/s.

The model classifies batches of cached test images (uint8, ``data.image_size`` px) with
:func:`leukofed.training.predict_logits`, i.e. as the evaluate stage does: uint8 -> float
conversion, eval mode, no gradients. Each batch is timed on its own, after ``--warmup`` untimed
batches; the report gives the median, p90 and mean seconds per batch and the images/s of the median.
The baseline, timed batch by batch interleaved with it, is the model alone: ``model(x)`` in
``torch.inference_mode`` on the same batch already converted to float (channels-last), so the ratio
shows what the project's predictor adds around the network.

Threads are ``runtime.threads`` (or ``--threads``). The weights do not change the speed; the model
is the checkpoint ``--model`` (default: ``results/<dataset>/centralized/model.pt`` under
``--project`` when it exists), else a freshly initialised one (recorded in the result).

Usage (from the repository root)::

    .venv/bin/python benchmarks/inference_latency.py --project . --dataset all-aria2021               # batch 32
    .venv/bin/python benchmarks/inference_latency.py --project . --dataset all-aria2021 --batch-size 1 32 128
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from machine import describe
from workload import add_input_arguments, add_quiet_argument, cache_and_split, median, percentile, split_part, wait_until_quiet

from leukofed.config import load_params
from leukofed.errors import DataError, LeukofedError
from leukofed.io import write_json
from leukofed.model import build_model
from leukofed.training import configure_torch, images_to_tensor, load_checkpoint, predict_logits

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "inference_latency.json"
DEFAULT_BATCH = 32
QUIET_WINDOW = 0.25  # seconds of CPU idleness sampled before each timed batch pair


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_input_arguments(parser)
    add_quiet_argument(parser, retries=False)
    parser.add_argument("--model", type=Path, help="checkpoint to time (default: the project's centralized model, else a fresh model)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[DEFAULT_BATCH],
                        help=f"images per inference batch; several give one entry each (default: {DEFAULT_BATCH})")
    parser.add_argument("--batches", type=int, default=50, help="timed batches per batch size (default: 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first (default: 5)")
    parser.add_argument("--threads", type=int, help="torch threads (default: runtime.threads)")
    parser.add_argument("--note", default="", help="free text recorded with the numbers (e.g. what else ran)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result JSON (default: {DEFAULT_OUT})")
    return parser.parse_args(argv)


def pick_model(args: argparse.Namespace, params, dataset: str, n_classes: int, threads: int) -> tuple[torch.nn.Module, str]:
    """The checkpoint to time (given or the project's centralized model) or a fresh model; and what it is."""
    path = args.model or (args.project / "results" / dataset / "centralized" / "model.pt" if args.project else None)
    configure_torch(threads, params.train.seed)
    if path is not None and path.is_file():
        model, meta = load_checkpoint(path)
        if len(meta["classes"]) != n_classes:
            raise DataError(f"{path}: a model of {len(meta['classes'])} classes, but the data have {n_classes}; pass --model for this dataset")
        return model, str(path)
    if args.model is not None:
        raise DataError(f"{args.model}: checkpoint not found; pass an existing model.pt or leave --model out")
    return build_model(params.model, n_classes).eval(), "freshly initialised (weights do not change the speed)"


def batches_of(images: np.ndarray, size: int, count: int) -> list[np.ndarray]:
    """``count`` batches of ``size`` consecutive images, wrapping around the part."""
    if size > len(images):
        raise DataError(f"batch size {size} is larger than the {len(images)} test images; pass a smaller --batch-size")
    starts = [(index * size) % (len(images) - size + 1) for index in range(count)]
    return [images[start : start + size] for start in starts]


def time_batches(model: torch.nn.Module, batches: list[np.ndarray], warmup: int, max_busy: float) -> dict[str, list[float]]:
    """Seconds per batch of the predictor and of the bare model, alternating which goes first; each pair waits for a quiet CPU."""
    seconds: dict[str, list[float]] = {"predict_logits": [], "model_only": []}
    for index, batch in enumerate(batches):
        floats = images_to_tensor(batch).contiguous(memory_format=torch.channels_last)
        wait_until_quiet(max_busy, window=QUIET_WINDOW)
        timings = {}
        for name in (("predict_logits", "model_only") if index % 2 == 0 else ("model_only", "predict_logits")):
            started = time.perf_counter()
            if name == "predict_logits":
                predict_logits(model, batch, len(batch))
            else:
                with torch.inference_mode():
                    model(floats)
            timings[name] = time.perf_counter() - started
        if index >= warmup:
            for name, value in timings.items():
                seconds[name].append(value)
    return seconds


def summarise(seconds: list[float], batch_size: int) -> dict:
    middle = median(seconds)
    return {
        "seconds_per_batch_median": middle,
        "seconds_per_batch_p90": percentile(seconds, 90),
        "seconds_per_batch_mean": float(np.mean(seconds)),
        "images_per_second_median": batch_size / middle,
        "samples_seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        params = load_params(args.params)
        dataset = args.dataset or params.dataset
        threads = args.threads or params.runtime.threads
        with tempfile.TemporaryDirectory(prefix="leukofed-benchmark-") as tmp:
            cache, split = cache_and_split(args, params, dataset, Path(tmp))
            images, _, n_classes = split_part(cache, split, "test")
        model, model_source = pick_model(args, params, dataset, n_classes, threads)
        runs = {size: batches_of(images, size, args.warmup + args.batches) for size in args.batch_size}
    except LeukofedError as error:
        print(f"inference_latency: error: {error}", file=sys.stderr)
        return 2
    machine_before = describe(threads)
    entries = {}
    for size, batches in runs.items():
        seconds = time_batches(model, batches, args.warmup, args.max_busy)
        project, bare = (summarise(seconds[name], size) for name in ("predict_logits", "model_only"))
        entries[str(size)] = {
            "predict_logits": project,
            "model_only": bare,
            "ratio_of_medians": project["seconds_per_batch_median"] / bare["seconds_per_batch_median"],
        }
        print(f"batch {size}: {project['seconds_per_batch_median']:.4f} s/batch median, {project['seconds_per_batch_p90']:.4f} p90, "
              f"{project['images_per_second_median']:.0f} images/s; model alone {bare['seconds_per_batch_median']:.4f} s/batch "
              f"(ratio {entries[str(size)]['ratio_of_medians']:.3f})", flush=True)
    result = {
        "benchmark": "inference_latency",
        "what": "seconds per inference batch of predict_logits (uint8 -> float, eval mode, no grad) on cached test images, "
                "after warm-up; baseline: the model alone on the pre-converted batch in inference_mode, interleaved batch by batch",
        "command": shlex.join(["python", "benchmarks/inference_latency.py", *(sys.argv[1:] if argv is None else argv)]),
        "note": args.note,
        "machine": machine_before | {"load_average_after": describe(threads)["load_average_1_5_15min"]},
        "data": {"dataset": dataset, "cache": str(cache) if args.project or args.cache else "synthetic, built in a temp dir",
                 "part": "test", "n_images": len(images), "image_size": int(images.shape[1])},
        "model": {"source": model_source, "params": params.model.model_dump()},
        "params": {"threads": threads, "batches": args.batches, "warmup": args.warmup, "max_busy": args.max_busy},
        "batch_sizes": entries,
    }
    write_json(args.out, result)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
