"""Benchmark: the same federated training in-process, on a Flower deployment over loopback, and on Flower's simulation runtime.

The work: one entry of ``federation.runs`` (default ``fedavg-3``: 3 sites) for ``--rounds`` rounds on
the synthetic default data (built in a temp dir by the pipeline stages) or a given cache/partition.

- **In-process**: :func:`leukofed.federation.engine.run_federation` over the sites' data in this
  process (no MLflow). After an untimed warm-up run, ``--repeats`` runs before and as many after
  the Flower run; their median is the baseline (drift of a shared machine shows in their spread).
- **Flower deployment**: :class:`leukofed.federation.deploy.LocalFederation`, i.e. what
  ``leukofed federation local`` runs: a SuperLink and one SuperNode per site on 127.0.0.1 with TLS
  and SuperNode authentication, ``flwr run --stream`` of ``deploy/flower``. Reported as the whole
  deployment (certificates, process start, node registration, the run with its MLflow tracking
  and outputs, shutdown) and as the round loop alone (the sum of the engine's per-round seconds
  that the ServerApp writes to ``rounds.csv``: the same quantity as the in-process figure).
- **Flower simulation runtime**: needs Ray (``flwr[simulation]``); recorded as not installed when
  Ray is absent.

Usage (from the repository root)::

    .venv/bin/python benchmarks/engine_vs_flower.py --rounds 2 --note "..."
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from machine import describe

from leukofed.config import load_params
from leukofed.data.cache import load_cache
from leukofed.data.partition import read_partition
from leukofed.errors import LeukofedError
from leukofed.federation.deploy import LocalFederation, NodeData, default_app, pick_run, processes_with_env, trial_data
from leukofed.federation.engine import run_federation, sites_from_partition
from leukofed.io import write_json
from leukofed.model import build_model
from leukofed.training import configure_torch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "engine_vs_flower.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("--run", default="fedavg-3", help="entry of federation.runs (default: fedavg-3)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each side (default: 2)")
    parser.add_argument("--cache", type=Path, help="cache folder (default: data/<dataset>/cache, else built synthetic)")
    parser.add_argument("--partition", type=Path, help="partition.csv of --cache")
    parser.add_argument("--repeats", type=int, default=3, help="in-process runs before and after the Flower run (default: 3)")
    parser.add_argument("--note", default="", help="free text recorded with the numbers (e.g. what else ran)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result JSON (default: {DEFAULT_OUT})")
    return parser.parse_args(argv)


def time_in_process(params, run, cache_dir: Path, partition_path: Path, workdir: Path) -> dict:
    """Wall seconds of ``run_federation`` in this process, and the engine's own sum of round seconds."""
    cache = load_cache(cache_dir)
    sites = sites_from_partition(cache, read_partition(partition_path), partition_path, run.sites)
    configure_torch(params.runtime.threads, params.train.seed)
    model = build_model(params.model, len(cache.classes))
    with tempfile.TemporaryDirectory(dir=workdir) as checkpoint_dir:
        started = time.perf_counter()
        result = run_federation(model, sites, run, params.federation, params.train,
                                checkpoint_dir=Path(checkpoint_dir), data_key="benchmark")
        wall = time.perf_counter() - started
    return {"wall_seconds": wall, "rounds_seconds": sum(record["seconds"] for record in result.records),
            "final_val_accuracy": result.records[-1]["val_accuracy"]}


def time_flower(params_path: Path, params, run_name: str, run, cache_dir: Path, partition_path: Path, workdir: Path) -> dict:
    """Wall seconds of a whole loopback deployment and of its ``flwr run``; the ServerApp's round seconds."""
    nodes = [NodeData(site, {"cache": str(cache_dir), "partition": str(partition_path)}) for site in range(1, run.sites + 1)]
    out = workdir / "flower-out"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    started = time.perf_counter()
    with LocalFederation(nodes, params.federation.flower, workdir / "flower", env=env, cwd=workdir) as federation:
        ready = time.perf_counter()
        federation.run(default_app(), {"params": str(params_path), "run": run_name, "dataset": params.dataset,
                                       "out-dir": str(out)}, echo=False)
        ran = time.perf_counter()
    stopped = time.perf_counter()
    rounds = pd.read_csv(out / "rounds.csv")
    return {
        "wall_seconds": stopped - started,
        "startup_seconds": ready - started,
        "flwr_run_seconds": ran - ready,
        "shutdown_seconds": stopped - ran,
        "rounds_seconds": float(rounds["seconds"].sum()),
        "round_train_seconds_mean": float(rounds["train_seconds"].mean()),
        "round_eval_seconds_mean": float(rounds["eval_seconds"].mean()),
        "final_val_accuracy": float(rounds["val_accuracy"].iloc[-1]),
        "leftover_processes": len(processes_with_env(str(workdir / "flower" / "flwr-home"))),
    }


def simulation_runtime() -> dict:
    """Flower's simulation runtime needs Ray; without it there is nothing to time."""
    if importlib.util.find_spec("ray") is None:
        return {"status": "not installed", "why": "Ray (flwr[simulation]) is not installed in this environment"}
    return {"status": "not measured", "why": "Ray is installed, but this benchmark times only the deployment runtime"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        params = load_params(args.params)
        run_name = pick_run(params, None, args.run)
        run = params.federation.runs[run_name].model_copy(update={"rounds": args.rounds})
        params = params.model_copy(update={"federation": params.federation.model_copy(
            update={"runs": {**params.federation.runs, run_name: run}})})
        with tempfile.TemporaryDirectory(prefix="leukofed-engine-vs-flower-") as tmp:
            workdir = Path(tmp)
            params_path = workdir / "params.yaml"  # the ServerApp reads the same effective params
            params_path.write_text(yaml.safe_dump(params.model_dump(), sort_keys=False), encoding="utf-8")
            cache_dir, partition_path = trial_data(params, params.dataset, run.sites, args.cache, args.partition, workdir)
            time_in_process(params, run, cache_dir, partition_path, workdir)  # warm-up: one-off kernel set-up, page cache
            machine_before = describe(params.runtime.threads)
            before = [time_in_process(params, run, cache_dir, partition_path, workdir) for _ in range(args.repeats)]
            print(f"in-process: {[round(sample['wall_seconds'], 2) for sample in before]} s", flush=True)
            flower = time_flower(params_path, params, run_name, run, cache_dir, partition_path, workdir)
            print(f"Flower deployment: {flower['wall_seconds']:.2f} s (round loop {flower['rounds_seconds']:.2f} s)", flush=True)
            after = [time_in_process(params, run, cache_dir, partition_path, workdir) for _ in range(args.repeats)]
            print(f"in-process again: {[round(sample['wall_seconds'], 2) for sample in after]} s", flush=True)
            n_train = sum(site.n_train for site in sites_from_partition(
                load_cache(cache_dir), read_partition(partition_path), partition_path, run.sites))
    except LeukofedError as error:
        print(f"engine_vs_flower: error: {error}", file=sys.stderr)
        return 2
    baseline = {key: statistics.median(sample[key] for sample in before + after) for key in ("wall_seconds", "rounds_seconds")}
    result = {
        "benchmark": "engine_vs_flower",
        "what": "the same federated run (sites, rounds, seeds) in-process vs a Flower deployment on loopback "
                "(TLS + SuperNode auth, one flwr-clientapp process per message); Flower simulation runtime if installed",
        "command": shlex.join(["python", "benchmarks/engine_vs_flower.py", *(sys.argv[1:] if argv is None else argv)]),
        "note": args.note,
        "machine": machine_before | {"load_average_after": describe(params.runtime.threads)["load_average_1_5_15min"]},
        "work": {"run": run_name, "strategy": run.strategy, "sites": run.sites, "rounds": run.rounds,
                 "local_epochs": params.federation.local_epochs, "n_train_total": n_train,
                 "image_size": params.data.image_size, "model_width": params.model.width,
                 "dataset": params.dataset, "threads": params.runtime.threads},
        "in_process": {"before": before, "after": after, "median": baseline},
        "flower_deployment": flower,
        "flower_simulation": simulation_runtime(),
        "ratios": {
            "deployment_wall_to_in_process": flower["wall_seconds"] / baseline["wall_seconds"],
            "deployment_round_loop_to_in_process": flower["rounds_seconds"] / baseline["rounds_seconds"],
            "deployment_seconds_per_round": flower["rounds_seconds"] / run.rounds,
            "in_process_seconds_per_round": baseline["rounds_seconds"] / run.rounds,
        },
        "same_result": flower["final_val_accuracy"] == before[0]["final_val_accuracy"],
    }
    write_json(args.out, result)
    ratios = result["ratios"]
    print(f"Flower deployment / in-process: {ratios['deployment_wall_to_in_process']:.1f}x (whole), "
          f"{ratios['deployment_round_loop_to_in_process']:.1f}x (round loop) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
