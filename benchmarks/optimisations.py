"""Benchmark: before/after of each training-step optimisation of issue 7, in one process, interleaved.

A training step (batch from the uint8 cache, augmentation, forward, cross-entropy, backward, AdamW
step) is timed over the same ``--steps`` batches for each variant, from the same initial weights; the
order of the variants rotates every repetition, and the medians are compared with ``before``.

Variants (``train.batch_size``, the threads of ``--threads`` unless named):

- ``before``: the code of commit 5a87cf7 (:mod:`reference`): images converted to float first, then
  augmented out of place (luma as a reduction over the channel axis); conv blocks conv -> norm -> ReLU
  -> maxpool; glibc's default allocator settings (approximated, see :func:`reference.glibc_default_malloc`).
- ``augmentation_only``: the current :func:`leukofed.training.training_batch` (flips and turns on the
  uint8 pixels, colour jitter in place, luma from channel slices), otherwise as ``before``.
- ``block_order_only``: the current blocks (conv -> norm -> maxpool -> ReLU), otherwise as ``before``.
- ``allocator_only``: :func:`leukofed.training.reuse_freed_memory` (freed blocks stay in the heap),
  otherwise as ``before``.
- ``after``: all three, i.e. the trainer's step now.
- ``after_nchw_input``: ``after`` with the batch in NCHW (contiguous) instead of channels-last.
- ``after_channels_last_weights``: ``after`` with the model's weights also converted to channels-last.
- ``after_1_thread``: ``after`` with one torch thread (left out when ``--threads`` is 1).

Besides the speed, every run checks that the optimisations change nothing: the old and the new
batch preparation give bitwise-identical batches, and the old and new block order give
bitwise-identical logits and gradients on them.

Also timed: the augmentation alone (ms per batch, old vs new) and inference (eval mode, no grad,
``train.eval_batch_size``) with the old block order and allocator vs the new ones.

Usage (from the repository root)::

    .venv/bin/python benchmarks/optimisations.py --project . --dataset all-aria2021
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import reference
from machine import describe
from workload import add_input_arguments, add_quiet_argument, cache_and_split, median, quiet_run, split_part

from leukofed.config import Params, load_params
from leukofed.errors import LeukofedError
from leukofed.io import write_json
from leukofed.model import build_model
from leukofed.training import configure_torch, images_to_tensor, training_batch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "optimisations.json"
CPU = torch.device("cpu")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_input_arguments(parser)
    add_quiet_argument(parser)
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed repetition (default: 10)")
    parser.add_argument("--threads", type=int, help="torch threads (default: runtime.threads)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions of each variant (default: 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions of each variant first (default: 1)")
    parser.add_argument("--note", default="", help="free text recorded with the numbers (e.g. what else ran)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result JSON (default: {DEFAULT_OUT})")
    return parser.parse_args(argv)


class Bench:
    """The shared inputs: settings, the training images and the batch indices every variant uses."""

    def __init__(self, params: Params, images: np.ndarray, labels: np.ndarray, n_classes: int, threads: int, steps: int):
        self.params, self.images, self.n_classes, self.threads = params, images, n_classes, threads
        self.targets = torch.as_tensor(labels, dtype=torch.long)
        batch_size = params.train.batch_size
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        self.batches = list(order[: steps * batch_size].split(batch_size))

    def model(self, old_blocks: bool, threads: int | None = None, channels_last_weights: bool = False,
              default_malloc: bool = False) -> torch.nn.Module:
        """A fresh model; also sets threads and the allocator (the project's, or glibc's defaults)."""
        configure_torch(threads or self.threads, self.params.train.seed)
        if default_malloc:
            reference.glibc_default_malloc()
        model = build_model(self.params.model, self.n_classes)
        if old_blocks:
            reference.relu_before_pool(model)
        return model.to(memory_format=torch.channels_last) if channels_last_weights else model

    def prepare(self, old_augmentation: bool) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
        augment = self.params.train.augment
        if old_augmentation:
            return lambda index, generator: reference.training_batch(self.images, index, augment, generator)
        return lambda index, generator: training_batch(self.images, index, augment, generator, CPU)

    def train_steps(self, model: torch.nn.Module, prepare: Callable, layout: torch.memory_format = torch.channels_last) -> None:
        train = self.params.train
        optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        generator = torch.Generator().manual_seed(train.seed)
        model.train()
        for index in self.batches:
            batch = prepare(index, generator).contiguous(memory_format=layout)
            loss = F.cross_entropy(model(batch), self.targets[index], label_smoothing=train.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def step_variants(bench: Bench) -> dict[str, Callable[[], None]]:
    old_aug, new_aug = bench.prepare(True), bench.prepare(False)
    variants = {
        "before": lambda: bench.train_steps(bench.model(old_blocks=True, default_malloc=True), old_aug),
        "augmentation_only": lambda: bench.train_steps(bench.model(old_blocks=True, default_malloc=True), new_aug),
        "block_order_only": lambda: bench.train_steps(bench.model(old_blocks=False, default_malloc=True), old_aug),
        "allocator_only": lambda: bench.train_steps(bench.model(old_blocks=True), old_aug),
        "after": lambda: bench.train_steps(bench.model(old_blocks=False), new_aug),
        "after_nchw_input": lambda: bench.train_steps(bench.model(old_blocks=False), new_aug, torch.contiguous_format),
        "after_channels_last_weights": lambda: bench.train_steps(bench.model(old_blocks=False, channels_last_weights=True), new_aug),
    }
    if bench.threads != 1:
        variants["after_1_thread"] = lambda: bench.train_steps(bench.model(old_blocks=False, threads=1), new_aug)
    return variants


def augmentation_variants(bench: Bench) -> dict[str, Callable[[], None]]:
    def run(prepare: Callable) -> Callable[[], None]:
        def go() -> None:
            configure_torch(bench.threads, bench.params.train.seed)
            generator = torch.Generator().manual_seed(0)
            for index in bench.batches:
                prepare(index, generator)
        return go
    return {"before": run(bench.prepare(True)), "after": run(bench.prepare(False))}


def inference_variants(bench: Bench) -> dict[str, Callable[[], None]]:
    size = bench.params.train.eval_batch_size
    images = bench.images[: size * max(1, len(bench.batches) // 2)]

    def run(before: bool) -> Callable[[], None]:
        def go() -> None:
            model = bench.model(old_blocks=before, default_malloc=before).eval()
            with torch.no_grad():
                for start in range(0, len(images), size):
                    model(images_to_tensor(images[start : start + size]))
        return go
    return {"before": run(True), "after": run(False)}


def measure(variants: dict[str, Callable[[], None]], repeats: int, warmup: int, label: str, max_busy: float,
            retries: int) -> dict[str, list[float]]:
    """Seconds of each variant per repetition; the order rotates every repetition, each run on a quiet CPU."""
    names = list(variants)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup + repeats):
        shift = index % len(names)
        line = []
        for name in names[shift:] + names[:shift]:
            _, elapsed, _ = quiet_run(variants[name], max_busy, retries)
            line.append(f"{name} {elapsed:.2f}")
            if index >= warmup:
                seconds[name].append(elapsed)
        print(f"{label} {'warm-up' if index < warmup else f'repeat {index - warmup + 1}'}: s " + ", ".join(line), flush=True)
    return seconds


def summarise(seconds: dict[str, list[float]], n_images: int) -> dict:
    """Median seconds, images/s and speed-up against ``before`` (ratio of medians and median of paired ratios)."""
    medians = {name: median(values) for name, values in seconds.items()}
    return {
        name: {
            "median_seconds": medians[name],
            "images_per_second": n_images / medians[name],
            "speedup_vs_before": medians["before"] / medians[name],
            "speedup_vs_before_paired_median": median([b / s for b, s in zip(seconds["before"], values, strict=True)]),
            "samples_seconds": values,
        }
        for name, values in seconds.items()
    }


def equivalence(bench: Bench) -> dict:
    """Old vs new batch preparation and block order on the benchmark's batches: bitwise equal?"""
    old_generator, new_generator = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    old_prepare, new_prepare = bench.prepare(True), bench.prepare(False)
    batches_equal = all(torch.equal(old_prepare(index, old_generator), new_prepare(index, new_generator)) for index in bench.batches)
    index = bench.batches[0]
    batch = new_prepare(index, torch.Generator().manual_seed(2))
    results = []
    for old_blocks in (True, False):
        model = bench.model(old_blocks)
        torch.manual_seed(3)  # the same dropout mask for both
        logits = model(batch)
        F.cross_entropy(logits, bench.targets[index]).backward()
        results.append((logits.detach(), [parameter.grad for parameter in model.parameters()]))
    (old_logits, old_grads), (new_logits, new_grads) = results
    return {
        "batches_bitwise_equal": batches_equal,
        "logits_bitwise_equal": torch.equal(old_logits, new_logits),
        "gradients_bitwise_equal": all(torch.equal(a, b) for a, b in zip(old_grads, new_grads, strict=True)),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        params = load_params(args.params)
        dataset = args.dataset or params.dataset
        threads = args.threads or params.runtime.threads
        with tempfile.TemporaryDirectory(prefix="leukofed-benchmark-") as tmp:
            cache, split = cache_and_split(args, params, dataset, Path(tmp))
            images, labels, n_classes = split_part(cache, split, "train")
    except LeukofedError as error:
        print(f"optimisations: error: {error}", file=sys.stderr)
        return 2
    bench = Bench(params, images, labels, n_classes, threads, args.steps)
    n_step_images = sum(len(index) for index in bench.batches)
    machine_before = describe(threads)
    checks = equivalence(bench)
    print(f"equivalence: {checks}", flush=True)
    quiet = (args.max_busy, args.retries)
    steps = summarise(measure(step_variants(bench), args.repeats, args.warmup, "training step", *quiet), n_step_images)
    augmentation = summarise(measure(augmentation_variants(bench), args.repeats, args.warmup, "augmentation", *quiet),
                             n_step_images)
    n_inference = params.train.eval_batch_size * max(1, len(bench.batches) // 2)
    inference = summarise(measure(inference_variants(bench), args.repeats, args.warmup, "inference", *quiet),
                          min(n_inference, len(images)))
    result = {
        "benchmark": "optimisations",
        "what": "before/after of each training-step optimisation (see the script's docstring); same process, interleaved; "
                "speedup = median seconds of `before` / median seconds of the variant",
        "command": shlex.join(["python", "benchmarks/optimisations.py", *(sys.argv[1:] if argv is None else argv)]),
        "note": args.note,
        "machine": machine_before | {"load_average_after": describe(threads)["load_average_1_5_15min"]},
        "data": {"dataset": dataset, "cache": str(cache) if args.project or args.cache else "synthetic, built in a temp dir",
                 "n_images_per_repeat": n_step_images, "image_size": int(images.shape[1])},
        "params": {"train": params.train.model_dump(), "model": params.model.model_dump(), "steps": args.steps,
                   "threads": threads, "repeats": args.repeats, "warmup": args.warmup, "max_busy": args.max_busy,
                   "retries": args.retries},
        "equivalence": checks,
        "training_step": steps,
        "augmentation_only": {name: entry | {"ms_per_batch": 1000 * entry["median_seconds"] / len(bench.batches)}
                              for name, entry in augmentation.items()},
        "inference": inference,
    }
    write_json(args.out, result)
    for part in ("training_step", "augmentation_only", "inference"):
        print(f"{part}: " + ", ".join(f"{name} x{entry['speedup_vs_before']:.2f}" for name, entry in result[part].items()))
    print(f"-> {args.out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
