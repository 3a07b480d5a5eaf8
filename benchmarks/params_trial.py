"""Trial: test accuracy and wall time of one model trained with fewer epochs, rounds or local epochs.

Evidence for a cheaper default: trains one model of the pipeline as its stage would (the centralized
baseline on the training split with validation, or a federation run of ``federation.runs`` over its
partition with the in-process engine, best round by global validation accuracy), with
``--epochs``/``--rounds``/``--local-epochs`` overriding params.yaml, then tests it on the test split
as the evaluate stage does. No MLflow, no files other than the result JSON. The learning-rate
schedule follows the overridden length (cosine over the epochs, or over the rounds).

Without ``--project`` (or ``--cache``/``--split``) the synthetic dataset of params.yaml is built,
split and partitioned in a temporary folder.

Usage (from the repository root, after the pipeline has built the cache, split and partitions)::

    .venv/bin/python benchmarks/params_trial.py --project . --dataset all-aria2021 --model fedavg-5 --rounds 10
    .venv/bin/python benchmarks/params_trial.py --project . --dataset all-aria2021 --model centralized --epochs 8
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fl_round_vs_centralized import load_sites, pick_run
from machine import describe
from workload import add_input_arguments, cache_and_split, split_part

from leukofed import stages
from leukofed.config import load_params
from leukofed.data.partition import PARTITION_FILE
from leukofed.errors import DataError, LeukofedError
from leukofed.federation.engine import run_federation
from leukofed.io import write_json
from leukofed.model import build_model
from leukofed.training import configure_torch, predict_proba, train_model

HERE = Path(__file__).resolve().parent
CENTRALIZED = "centralized"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_input_arguments(parser)
    parser.add_argument("--model", default=CENTRALIZED, help="'centralized' or an entry of federation.runs (default: centralized)")
    parser.add_argument("--epochs", type=int, help="centralized epochs (default: train.epochs)")
    parser.add_argument("--rounds", type=int, help="federated rounds (default: the run's rounds)")
    parser.add_argument("--local-epochs", type=int, help="local epochs per round (default: federation.local_epochs)")
    parser.add_argument("--threads", type=int, help="torch threads (default: runtime.threads)")
    parser.add_argument("--note", default="", help="free text recorded with the numbers (e.g. what else ran)")
    parser.add_argument("--out", type=Path, help="result JSON (default: benchmarks/results/params_trial_<model>_<settings>.json)")
    return parser.parse_args(argv)


def _progress(unit: str, number: int, val_accuracy: float, started: float) -> None:
    print(f"{unit} {number}: val accuracy {val_accuracy:.4f} at {time.perf_counter() - started:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        params = load_params(args.params)
        dataset = args.dataset or params.dataset
        threads = args.threads or params.runtime.threads
        with tempfile.TemporaryDirectory(prefix="leukofed-trial-") as tmp:
            cache, split = cache_and_split(args, params, dataset, Path(tmp))
            test_images, test_labels, n_classes = split_part(cache, split, "test")
            machine_before = describe(threads)
            configure_torch(threads, params.train.seed)
            model = build_model(params.model, n_classes)
            started = time.perf_counter()
            if args.model == CENTRALIZED:
                epochs = args.epochs or params.train.epochs
                settings = {"epochs": epochs}
                images, labels, _ = split_part(cache, split, "train")
                val_images, val_labels, _ = split_part(cache, split, "val")
                result = train_model(model, images, labels, params.train, val_images=val_images, val_labels=val_labels, epochs=epochs,
                                     on_epoch=lambda record: _progress("epoch", record["epoch"], record["val_accuracy"], started))
                best = {"epoch": result.best_epoch, "val_accuracy": result.history[result.best_epoch - 1]["val_accuracy"]}
                curve = [record["val_accuracy"] for record in result.history]
            else:
                name, run = pick_run(params, args.model)
                run = run.model_copy(update={"rounds": args.rounds or run.rounds})
                federation = params.federation.model_copy(update={"local_epochs": args.local_epochs or params.federation.local_epochs})
                settings = {"rounds": run.rounds, "local_epochs": federation.local_epochs}
                if args.project is None:  # data built in the temp dir: partition it there too
                    partition = Path(tmp) / f"sites-{run.sites}" / PARTITION_FILE
                    stages.partition(params, cache, split, run.sites, partition.parent)
                else:
                    partition = args.project / "results" / dataset / "partitions" / f"sites-{run.sites}" / PARTITION_FILE
                if not partition.is_file():
                    raise DataError(f"{partition}: not found; run the partition stage for {run.sites} sites first")
                sites, _, _ = load_sites(cache, partition, run.sites)
                result = run_federation(model, sites, run, federation, params.train, checkpoint_dir=Path(tmp) / "checkpoint",
                                        data_key="params-trial",
                                        on_round=lambda record: _progress("round", record["round"], record["val_accuracy"], started))
                record = result.records[result.best_round - 1]
                best = {"round": result.best_round, "val_accuracy": record["val_accuracy"]}
                curve = [entry["val_accuracy"] for entry in result.records]
            seconds = time.perf_counter() - started
            proba = predict_proba(model, test_images, params.train.eval_batch_size)
    except LeukofedError as error:
        print(f"params_trial: error: {error}", file=sys.stderr)
        return 2
    accuracy = float((proba.argmax(axis=1) == test_labels).mean())
    goal = params.report.paper_accuracy.get(args.model)
    label = "_".join(f"{key}-{value}" for key, value in settings.items())
    out = args.out or HERE / "results" / f"params_trial_{args.model}_{label}.json"
    result_record = {
        "benchmark": "params_trial",
        "what": "one pipeline model trained with overridden epochs/rounds/local epochs, tested on the test split; "
                "training wall time (no MLflow, no process start)",
        "command": shlex.join(["python", "benchmarks/params_trial.py", *(sys.argv[1:] if argv is None else argv)]),
        "note": args.note,
        "machine": machine_before | {"load_average_after": describe(threads)["load_average_1_5_15min"]},
        "dataset": dataset,
        "model": args.model,
        "settings": settings,
        "training_seconds": seconds,
        "best": best,
        "val_accuracy_curve": curve,
        "test": {"n": len(test_labels), "accuracy": accuracy,
                 "paper_accuracy": goal, "at_least_paper": None if goal is None else bool(accuracy >= goal)},
        "threads": threads,
    }
    write_json(out, result_record)
    print(f"{args.model} {settings}: test accuracy {accuracy:.4f} ({int(np.round(accuracy * len(test_labels)))}/{len(test_labels)})"
          f"{'' if goal is None else f', paper {goal:.4f}'}; best {best}; training {seconds:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
