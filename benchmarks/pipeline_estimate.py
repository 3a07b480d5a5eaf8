"""Estimate: wall time of the whole pipeline on a dataset, from per-epoch and per-round times measured now.

Running the real-data pipeline to see what a parameter change costs takes long; this script measures
the units the training stages repeat and adds what the rest of the pipeline took last time:

- **centralized epoch**: :func:`leukofed.training.train_model` for one epoch on the training split
  with validation on the validation split, from a fresh model: the median of ``--epochs-measured``
  such calls after an untimed warm-up;
- **federated round** of every run of ``federation.runs`` (or ``--runs``): one round of the
  in-process engine over the run's partition (:func:`fl_round_vs_centralized.time_round`: local
  training at every site, aggregation, server evaluation, checkpoint), ``--rounds-measured`` times;
  its local-training part is divided by ``federation.local_epochs`` to scale with local epochs;
- **everything else**, from the last pipeline run's Snakemake benchmark files
  (``results/<dataset>/benchmarks/*.tsv``): every other stage's wall time as recorded, and, for the
  training stages, what their wall time held beyond their epochs or rounds (process start, imports,
  data loading, MLflow, checkpoints), computed against that run's ``history.csv`` and ``rounds.csv``
  (and ``federation.json``'s one-off ``centralized_equivalent`` timing run, which federate stages
  before commit 5a87cf7 made and the current stage no longer makes).

Every timed unit starts once the CPUs are quiet (``--max-busy``); the other stages' times are as
recorded, so a last run on a busy machine makes the estimate pessimistic.

A scenario (``--scenario "label: key=value,..."``, keys ``epochs`` (centralized), ``rounds`` (every
run), ``local_epochs``, ``runs`` (names joined by ``+``), ``drop`` (stages or rules left out, e.g.
``privacy``, joined by ``+``); unset keys keep params.yaml's values) is then estimated as the sum of
its stages; stages of runs a scenario leaves out are dropped too. The
sum assumes one stage at a time (``snakemake --cores 2`` with ``runtime.threads: 2``).

Usage (from the repository root, after one pipeline run on the dataset)::

    .venv/bin/python benchmarks/pipeline_estimate.py --project . --dataset all-aria2021 \\
        --scenario "10 rounds: rounds=10" --scenario "no fedprox-5: runs=fedavg-3+fedavg-5"
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import pandas as pd

from fl_round_vs_centralized import Workload, load_sites, pick_run, time_round
from machine import describe
from stage_times import collect
from workload import add_quiet_argument, cache_and_split, quiet_run, split_part

from leukofed.config import Params, load_params
from leukofed.data.partition import PARTITION_FILE
from leukofed.errors import ConfigError, DataError, LeukofedError
from leukofed.io import read_json, write_json
from leukofed.model import build_model
from leukofed.training import configure_torch, train_model

HERE = Path(__file__).resolve().parent
SCENARIO_KEYS = ("epochs", "rounds", "local_epochs", "runs", "drop")
CENTRALIZED_STAGE = "train_centralized"
FEDERATE_PREFIX = "federate_"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("--dataset", help="dataset of params.yaml (default: its `dataset`)")
    parser.add_argument("--project", type=Path, required=True,
                        help="the project folder where the pipeline ran on the dataset (cache, split, partitions, benchmark files)")
    parser.add_argument("--runs", nargs="+", help="federation runs to time (default: every entry of federation.runs)")
    parser.add_argument("--epochs-measured", type=int, default=3, help="one-epoch centralized runs timed (default: 3)")
    parser.add_argument("--rounds-measured", type=int, default=3, help="rounds timed per federation run (default: 3)")
    parser.add_argument("--threads", type=int, help="torch threads (default: runtime.threads)")
    add_quiet_argument(parser)
    parser.add_argument("--scenario", action="append", default=[],
                        help="'label: key=value,...' with keys epochs, rounds, local_epochs, runs (a+b), drop (stages or rules, a+b); repeatable")
    parser.add_argument("--note", default="", help="free text recorded with the numbers (e.g. what else ran)")
    parser.add_argument("--out", type=Path, help="result JSON (default: benchmarks/results/pipeline_estimate_<dataset>.json)")
    return parser.parse_args(argv)


def parse_scenario(text: str, params: Params) -> dict:
    """``'label: epochs=8,rounds=10'`` -> the settings of that scenario (params.yaml's for unset keys)."""
    label, _, body = text.partition(":")
    if not body.strip():
        raise ConfigError(f"--scenario {text!r}: expected 'label: key=value,...' with keys {', '.join(SCENARIO_KEYS)}")
    settings = {"label": label.strip(), "epochs": params.train.epochs, "rounds": None,
                "local_epochs": params.federation.local_epochs, "runs": list(params.federation.runs), "drop": []}
    for item in body.split(","):
        key, _, value = (part.strip() for part in item.partition("="))
        if key not in SCENARIO_KEYS or not value:
            raise ConfigError(f"--scenario {text!r}: '{item.strip()}' is not key=value with a key of {', '.join(SCENARIO_KEYS)}")
        if key == "drop":
            settings["drop"] = [name.strip() for name in value.split("+")]
        elif key == "runs":
            settings["runs"] = [name.strip() for name in value.split("+")]
            unknown = sorted(set(settings["runs"]) - set(params.federation.runs))
            if unknown:
                raise ConfigError(f"--scenario {text!r}: runs {unknown} are not in federation.runs {sorted(params.federation.runs)}")
        elif not value.isdigit() or int(value) < 1:
            raise ConfigError(f"--scenario {text!r}: {key} must be a positive integer, got {value!r}")
        else:
            settings[key] = int(value)
    return settings


def measure_centralized(params: Params, cache: Path, split: Path, threads: int, epochs: int, quiet: tuple[float, int]) -> dict:
    """Median seconds of one centralized epoch (training + validation) on the real split, over ``epochs`` gated runs."""
    images, labels, n_classes = split_part(cache, split, "train")
    val_images, val_labels, _ = split_part(cache, split, "val")
    def one_epoch() -> float:
        configure_torch(threads, params.train.seed)
        model = build_model(params.model, n_classes)
        result = train_model(model, images, labels, params.train, val_images=val_images, val_labels=val_labels, epochs=1)
        return result.history[0]["seconds"]

    one_epoch()  # warm-up (kernel set-up, allocator), not counted
    seconds = [quiet_run(one_epoch, *quiet)[0] for _ in range(epochs)]
    print(f"centralized: epochs {', '.join(f'{value:.1f}' for value in seconds)} s", flush=True)
    return {"epoch_seconds": seconds, "per_epoch_seconds": statistics.median(seconds),
            "n_train": len(labels), "n_val": len(val_labels)}


def measure_round(params: Params, project: Path, dataset: str, name: str, threads: int, repeats: int, workdir: Path,
                  quiet: tuple[float, int]) -> dict:
    """Median seconds of one round of run ``name``, split into local training per local epoch, evaluation and the rest."""
    _, run = pick_run(params, name)
    partition = project / "results" / dataset / "partitions" / f"sites-{run.sites}" / PARTITION_FILE
    if not partition.is_file():
        raise DataError(f"{partition}: not found; run the partition stage for {run.sites} sites first")
    sites, n_classes, _ = load_sites(project / "data" / dataset / "cache", partition, run.sites)
    work = Workload(params, run, sites, n_classes, threads)
    rounds = [quiet_run(lambda: time_round(work, workdir), *quiet)[0] for _ in range(repeats)]
    middle = {key: statistics.median(record[key] for record in rounds) for key in rounds[0]}
    local_epochs = params.federation.local_epochs
    print(f"{name}: round {middle['wall_seconds']:.1f} s (local training {middle['train_seconds']:.1f} s)", flush=True)
    return {
        "round_seconds": middle["wall_seconds"],
        "train_seconds_per_local_epoch": middle["train_seconds"] / local_epochs,
        "rest_seconds": middle["wall_seconds"] - middle["train_seconds"],
        "measured_local_epochs": local_epochs,
        "n_train": sum(len(site.train_labels) for site in sites),
        "samples": rounds,
    }


def fixed_costs(project: Path, dataset: str) -> list[dict]:
    """Every stage of the last run with the part of its wall time that does not scale with epochs or rounds."""
    results = project / "results" / dataset
    stages = collect(results / "benchmarks")
    for stage in stages:
        name = stage["stage"]
        if name == CENTRALIZED_STAGE:
            scaled = _sum_seconds(results / "centralized" / "history.csv")
        elif name.startswith(FEDERATE_PREFIX):
            run_dir = results / name.removeprefix(FEDERATE_PREFIX)
            scaled = _sum_seconds(run_dir / "rounds.csv") + _old_timing_run(run_dir / "federation.json")
        else:
            scaled = 0.0
        stage["fixed_seconds"] = max(0.0, stage["wall_seconds"] - scaled)
    return stages


def _old_timing_run(path: Path) -> float:
    """Seconds of the centralized timing run that federate stages before commit 5a87cf7 added (0 when absent)."""
    return float(read_json(path).get("timing", {}).get("centralized_equivalent", 0.0)) if path.is_file() else 0.0


def _sum_seconds(path: Path) -> float:
    if not path.is_file():
        raise DataError(f"{path}: not found; the benchmark file's run left no record of its epochs or rounds")
    return float(pd.read_csv(path)["seconds"].sum())


def estimate(settings: dict, centralized: dict, rounds: dict[str, dict], stages: list[dict], params: Params) -> dict:
    """Estimated wall seconds of each stage of a scenario and their sum."""
    dropped = set(params.federation.runs) - set(settings["runs"])
    run_fixed = [stage["fixed_seconds"] for stage in stages if stage["stage"].startswith(FEDERATE_PREFIX)]
    entries = {}
    for stage in stages:
        name = stage["stage"]
        if any(name.endswith(f"_{run}") for run in dropped) or name in settings["drop"] or stage.get("rule") in settings["drop"]:
            continue
        entries[name] = stage["fixed_seconds"]
    entries[CENTRALIZED_STAGE] = entries.get(CENTRALIZED_STAGE, 0.0) + settings["epochs"] * centralized["per_epoch_seconds"]
    for run in settings["runs"]:
        if run not in rounds:
            raise ConfigError(f"scenario '{settings['label']}' needs run '{run}', which was not timed; add it to --runs")
        unit = rounds[run]
        n_rounds = settings["rounds"] or params.federation.runs[run].rounds
        per_round = settings["local_epochs"] * unit["train_seconds_per_local_epoch"] + unit["rest_seconds"]
        stage = f"{FEDERATE_PREFIX}{run}"
        fixed = entries.get(stage, statistics.mean(run_fixed) if run_fixed else 0.0)
        entries[stage] = fixed + n_rounds * per_round
    total = sum(entries.values())
    return {**settings, "rounds": settings["rounds"] or {run: params.federation.runs[run].rounds for run in settings["runs"]},
            "stages_seconds": entries, "total_seconds": total, "total_minutes": total / 60}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        params = load_params(args.params)
        dataset = args.dataset or params.dataset
        threads = args.threads or params.runtime.threads
        scenarios = [parse_scenario("params.yaml: epochs=" + str(params.train.epochs), params),
                     *(parse_scenario(text, params) for text in args.scenario)]
        names = args.runs or list(params.federation.runs)
        for name in names:
            pick_run(params, name)
        stages = fixed_costs(args.project, dataset)
        inputs = argparse.Namespace(project=args.project, cache=None, split=None)
        with tempfile.TemporaryDirectory(prefix="leukofed-benchmark-") as tmp:
            cache, split = cache_and_split(inputs, params, dataset, Path(tmp))
            machine_before = describe(threads)
            quiet = (args.max_busy, args.retries)
            centralized = measure_centralized(params, cache, split, threads, args.epochs_measured, quiet)
            rounds = {name: measure_round(params, args.project, dataset, name, threads, args.rounds_measured, Path(tmp), quiet)
                      for name in names}
        estimates = [estimate(settings, centralized, rounds, stages, params) for settings in scenarios]
    except LeukofedError as error:
        print(f"pipeline_estimate: error: {error}", file=sys.stderr)
        return 2
    out = args.out or HERE / "results" / f"pipeline_estimate_{dataset}.json"
    result = {
        "benchmark": "pipeline_estimate",
        "what": "estimated pipeline wall time = every stage's fixed part (last run's Snakemake benchmark files) "
                "+ epochs x measured centralized epoch + rounds x measured round (local training scaled by local epochs)",
        "command": shlex.join(["python", "benchmarks/pipeline_estimate.py", *(sys.argv[1:] if argv is None else argv)]),
        "note": args.note,
        "machine": machine_before | {"load_average_after": describe(threads)["load_average_1_5_15min"]},
        "dataset": dataset,
        "threads": threads,
        "max_busy": args.max_busy,
        "retries": args.retries,
        "centralized": centralized,
        "federated_rounds": rounds,
        "stages_last_run": stages,
        "scenarios": estimates,
    }
    write_json(out, result)
    for entry in estimates:
        print(f"{entry['label']}: {entry['total_minutes']:.1f} min (epochs {entry['epochs']}, rounds {entry['rounds']}, "
              f"local epochs {entry['local_epochs']}, runs {'+'.join(entry['runs'])})")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
