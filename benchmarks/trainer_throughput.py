"""Benchmark: images/s of the project's trainer and predictor against a bare PyTorch loop on the same work.

Everything runs in this one process on the same uint8 images (a split part of the cache, held in
memory as the stages hold it), the same freshly initialised model and the same batch sizes; the
variants are interleaved (the order rotates every repetition) and the medians compared.

Training (``train.batch_size``, ``--epochs`` per timed call, no validation data):

- **trainer**: :func:`leukofed.training.train_model`: shuffling, augmentation, AdamW with the
  learning-rate schedule, plus its bookkeeping: per-epoch loss/accuracy, the tqdm bar (disabled, as
  with ``runtime.progress: false``), the history record, the best-weights snapshot, the seeded
  generator fork.
- **bare loop**: the textbook loop on the same pieces: per batch, :func:`leukofed.training.training_batch`
  (the same uint8 indexing, augmentation and channels-last conversion as the trainer, so augmentation
  costs both sides alike), forward, cross-entropy, ``zero_grad``, backward, AdamW step, scheduler
  step. Nothing else: no metrics, no history, no snapshot.
- **bare loop without augmentation** (context only): the uint8 batch converted to float
  channels-last, no flips, turns or jitter: what augmentation costs.

Inference (``train.eval_batch_size``): :func:`leukofed.training.predict_logits` against a bare
``torch.no_grad()`` loop of ``model(images_to_tensor(batch))`` over the same images, in eval mode.

Usage (from the repository root)::

    .venv/bin/python benchmarks/trainer_throughput.py --project . --dataset all-aria2021     # the real cache
    .venv/bin/python benchmarks/trainer_throughput.py                                       # synthetic, built in a temp dir
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from machine import describe
from workload import add_input_arguments, add_quiet_argument, cache_and_split, median, quiet_run, split_part

from leukofed.config import Params, TrainParams, load_params
from leukofed.errors import LeukofedError
from leukofed.io import write_json
from leukofed.model import build_model
from leukofed.training import configure_torch, images_to_tensor, predict_logits, train_model, training_batch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "trainer_throughput.json"
GOAL_RATIO = 0.9  # the goal: the trainer within 10% of the bare loop


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_input_arguments(parser)
    add_quiet_argument(parser)
    parser.add_argument("--part", default="train", choices=("train", "val", "test"), help="split part to train and predict on (default: train)")
    parser.add_argument("--images", type=int, help="use only the first N images of the part (default: all)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per timed training call (default: 1)")
    parser.add_argument("--threads", type=int, help="torch threads (default: runtime.threads)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions of each variant (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions of each variant first (default: 1)")
    parser.add_argument("--note", default="", help="free text recorded with the numbers (e.g. what else ran)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result JSON (default: {DEFAULT_OUT})")
    return parser.parse_args(argv)


def fresh_model(params: Params, n_classes: int, threads: int) -> torch.nn.Module:
    """The same initial weights for every variant and repetition."""
    configure_torch(threads, params.train.seed)
    return build_model(params.model, n_classes)


def run_trainer(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, train: TrainParams, epochs: int) -> None:
    train_model(model, images, labels, train, epochs=epochs)


def run_bare(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, train: TrainParams, epochs: int,
             augment: bool = True) -> None:
    """The bare training loop (see the module docstring for what it includes)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    total_steps = epochs * math.ceil(len(images) / train.batch_size)
    cosine = train.lr_schedule == "cosine"
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)) if cosine else 1.0
    )
    generator = torch.Generator().manual_seed(train.seed)
    targets = torch.as_tensor(labels, dtype=torch.long)
    device = torch.device("cpu")
    for _ in range(epochs):
        for index in torch.randperm(len(images), generator=generator).split(train.batch_size):
            if augment:
                batch = training_batch(images, index, train.augment, generator, device)
            else:
                batch = images_to_tensor(images[index.numpy()]).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(batch), targets[index], label_smoothing=train.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()


def run_predict(model: torch.nn.Module, images: np.ndarray, batch_size: int) -> None:
    predict_logits(model, images, batch_size)


def run_bare_predict(model: torch.nn.Module, images: np.ndarray, batch_size: int) -> None:
    model.eval()
    with torch.no_grad():
        torch.cat([model(images_to_tensor(images[start : start + batch_size])) for start in range(0, len(images), batch_size)])


def measure(variants: dict[str, Callable[[], None]], repeats: int, warmup: int, n_images: int, label: str,
            max_busy: float, retries: int) -> dict[str, list[float]]:
    """Images/s of each variant per repetition; the order rotates so no variant always runs first; each run on a quiet CPU."""
    names = list(variants)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup + repeats):
        shift = index % len(names)
        line = []
        for name in names[shift:] + names[:shift]:
            _, seconds, _ = quiet_run(variants[name], max_busy, retries)
            rate = n_images / seconds
            line.append(f"{name} {rate:.0f}")
            if index >= warmup:
                rates[name].append(rate)
        print(f"{label} {'warm-up' if index < warmup else f'repeat {index - warmup + 1}'}: images/s " + ", ".join(line), flush=True)
    return rates


def summarise(rates: dict[str, list[float]], subject: str, baseline: str) -> dict:
    medians = {name: median(values) for name, values in rates.items()}
    paired = [mine / base for mine, base in zip(rates[subject], rates[baseline], strict=True)]
    return {
        "images_per_second_median": medians,
        "images_per_second_samples": rates,
        "ratio_of_medians": medians[subject] / medians[baseline],
        "ratio_paired_median": median(paired),
        "goal_ratio_at_least": GOAL_RATIO,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        params = load_params(args.params)
        dataset = args.dataset or params.dataset
        threads = args.threads or params.runtime.threads
        with tempfile.TemporaryDirectory(prefix="leukofed-benchmark-") as tmp:
            cache, split = cache_and_split(args, params, dataset, Path(tmp))
            images, labels, n_classes = split_part(cache, split, args.part)
        if args.images:
            images, labels = images[: args.images], labels[: args.images]
    except LeukofedError as error:
        print(f"trainer_throughput: error: {error}", file=sys.stderr)
        return 2
    train = params.train
    n_train = len(images) * args.epochs
    machine_before = describe(threads)

    def trained(runner: Callable, **kwargs) -> Callable[[], None]:
        return lambda: runner(fresh_model(params, n_classes, threads), images, labels, train, args.epochs, **kwargs)

    training = measure(
        {"trainer": trained(run_trainer), "bare_loop": trained(run_bare), "bare_loop_no_augmentation": trained(run_bare, augment=False)},
        args.repeats, args.warmup, n_train, "training", args.max_busy, args.retries,
    )
    model = fresh_model(params, n_classes, threads)
    inference = measure(
        {"predict_logits": lambda: run_predict(model, images, train.eval_batch_size),
         "bare_loop": lambda: run_bare_predict(model, images, train.eval_batch_size)},
        args.repeats, args.warmup, len(images), "inference", args.max_busy, args.retries,
    )
    result = {
        "benchmark": "trainer_throughput",
        "what": "images/s of leukofed.training.train_model and predict_logits vs a bare PyTorch loop on the same model, "
                "images and batch sizes; same process, interleaved; ratio = project / bare (1.0: no overhead)",
        "bare_loop_includes": {
            "training": "per batch: training_batch (uint8 indexing, the same augmentation, channels-last), forward, "
                        "cross-entropy, zero_grad, backward, AdamW step, LambdaLR cosine step; no metrics, history or snapshot",
            "training_no_augmentation": "as the bare loop, but the batch is only converted to float channels-last (context: the cost of augmentation)",
            "inference": "eval mode, torch.no_grad, model(images_to_tensor(batch)) per batch, logits concatenated",
        },
        "command": shlex.join(["python", "benchmarks/trainer_throughput.py", *(sys.argv[1:] if argv is None else argv)]),
        "note": args.note,
        "machine": machine_before | {"load_average_after": describe(threads)["load_average_1_5_15min"]},
        "data": {"dataset": dataset, "cache": str(cache) if args.project or args.cache else "synthetic, built in a temp dir",
                 "part": args.part, "n_images": len(images), "image_size": int(images.shape[1])},
        "params": {"train": train.model_dump(), "model": params.model.model_dump(), "epochs_per_call": args.epochs,
                   "threads": threads, "repeats": args.repeats, "warmup": args.warmup, "max_busy": args.max_busy,
                   "retries": args.retries},
        "training": summarise(training, "trainer", "bare_loop"),
        "inference": summarise(inference, "predict_logits", "bare_loop"),
    }
    training_medians = result["training"]["images_per_second_median"]
    result["training"]["augmentation_share_of_bare_step"] = 1 - training_medians["bare_loop"] / training_medians["bare_loop_no_augmentation"]
    write_json(args.out, result)
    for part in ("training", "inference"):
        summary = result[part]
        print(f"{part}: " + ", ".join(f"{name} {rate:.0f} img/s" for name, rate in summary["images_per_second_median"].items())
              + f"; project/bare {summary['ratio_of_medians']:.3f}")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
