"""Pipeline stages: each composes the library modules for one CLI subcommand (one Snakemake rule).

A stage reads its inputs, calls the library, writes its outputs atomically and returns a one-line
summary for the terminal. Every output records the data provenance of its inputs.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from leukofed.config import FederationRun, Params
from leukofed.errors import ConfigError, DataError
from leukofed.io import write_json, write_text
from leukofed.provenance import run_tags

CENTRALIZED = "centralized"


def acquire(params: Params, dataset: str, workdir: Path) -> str:
    """Get dataset ``dataset`` and write its manifest and source record into ``workdir``."""
    from leukofed.data.acquire import acquire as acquire_dataset

    provenance = acquire_dataset(dataset, params.dataset_spec(dataset), params.data, params.download, workdir)
    return f"acquired {provenance.n_images} images from {provenance.location} (data {provenance.fingerprint[:12]})"


def preprocess(params: Params, workdir: Path, out_dir: Path) -> str:
    """Validate, group duplicates, resize and cache the acquired dataset."""
    from leukofed.data.acquire import load_source
    from leukofed.data.cache import build_cache

    root, manifest, provenance = load_source(workdir)
    meta = build_cache(root, manifest, provenance, params.data, out_dir)
    return (
        f"cached {meta['n_valid']} of {meta['n_checked']} images at {meta['image_size']} px "
        f"({meta['n_invalid']} invalid, {meta['n_groups']} duplicate-aware groups) in {out_dir}"
    )


def split(params: Params, cache_dir: Path, out_path: Path) -> str:
    """Assign every cached image to train/val/test, keeping duplicate groups on one side."""
    from leukofed.data.cache import load_cache
    from leukofed.data.split import stratified_group_split, write_split

    cache = load_cache(cache_dir)
    assignment = stratified_group_split(cache.index["label_index"].to_numpy(), cache.index["group"].to_numpy(), params.split)
    summary = write_split(cache.index, assignment, out_path, cache.provenance)
    sizes = ", ".join(f"{name} {sum(counts.values())}" for name, counts in summary["counts"].items())
    return f"split {len(assignment)} images: {sizes}"


def _split_arrays(cache, split_table: pd.DataFrame, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split part, in cache order."""
    rows = split_table.loc[split_table["split"] == part, "row"].to_numpy()
    return np.asarray(cache.images[rows]), cache.index["label_index"].to_numpy()[rows]


def _check_split_matches(cache, split_table: pd.DataFrame, split_path: Path) -> None:
    if len(split_table) != len(cache.index) or not (split_table["relpath"].to_numpy() == cache.index["relpath"].to_numpy()).all():
        raise DataError(f"{split_path}: does not match the cache it is used with; rerun the split stage")


def train_centralized(params: Params, dataset: str, cache_dir: Path, split_path: Path, out_dir: Path) -> str:
    """Train the centralized baseline on the pooled training split; track it in MLflow."""
    from leukofed.data.cache import load_cache
    from leukofed.data.split import read_split
    from leukofed.model import build_model, count_parameters
    from leukofed.tracking import RunTracker, flatten_params, registered_model_name
    from leukofed.training import configure_torch, save_checkpoint, train_model

    cache = load_cache(cache_dir)
    split_table = read_split(split_path)
    _check_split_matches(cache, split_table, split_path)
    train_images, train_labels = _split_arrays(cache, split_table, "train")
    val_images, val_labels = _split_arrays(cache, split_table, "val")

    configure_torch(params.runtime.threads, params.train.seed)
    model = build_model(params.model, len(cache.classes))
    run_params = flatten_params(
        {"model": params.model.model_dump(), "train": params.train.model_dump(), "split": params.split.model_dump(),
         "data": {"image_size": params.data.image_size, "near_duplicate": params.data.near_duplicate.model_dump()}}
    )
    tags = run_tags(dataset, cache.provenance, CENTRALIZED)
    started = time.perf_counter()
    with RunTracker(params.tracking, run_name=f"{dataset}/{CENTRALIZED}", params=run_params, tags=tags) as run:
        result = train_model(
            model, train_images, train_labels, params.train,
            val_images=val_images, val_labels=val_labels, progress=params.runtime.progress,
            on_epoch=lambda row: run.log_metrics(_numeric(row), step=row["epoch"]),
        )
        model.load_state_dict(result.state_dict)
        seconds = time.perf_counter() - started
        out_dir.mkdir(parents=True, exist_ok=True)
        history = pd.DataFrame(result.history)
        write_text(out_dir / "history.csv", history.to_csv(index=False))
        record = {
            "model": CENTRALIZED,
            "data": cache.provenance.to_dict(),
            "n_parameters": count_parameters(model),
            "n_train": int(len(train_labels)),
            "n_val": int(len(val_labels)),
            "best_epoch": result.best_epoch,
            "best_val_accuracy": history.loc[history["epoch"] == result.best_epoch, "val_accuracy"].item(),
            "seconds": round(seconds, 2),
            "params": {"model": params.model.model_dump(), "train": params.train.model_dump()},
            "mlflow_run_id": run.run_id,
            "git_commit": tags["git_commit"],
        }
        save_checkpoint(
            out_dir / "model.pt", model, model_params=params.model, classes=cache.classes,
            image_size=int(cache.meta["image_size"]), provenance=cache.provenance, extra={"training": record},
        )
        write_json(out_dir / "training.json", record)
        run.log_artifact(out_dir / "history.csv")
        run.log_artifact(out_dir / "training.json")
        version = run.log_model(
            model, name="model", registered_name=registered_model_name(params.tracking, dataset, CENTRALIZED), alias=params.tracking.model_alias
        )
    return (
        f"trained {CENTRALIZED} ({record['n_parameters']} parameters) on {record['n_train']} images in {seconds:.0f} s: "
        f"best val accuracy {record['best_val_accuracy']:.4f} at epoch {result.best_epoch}; registered version {version}"
    )


def _numeric(row: dict) -> dict[str, float]:
    """The metrics of one history row that MLflow can log (drops the step and missing values)."""
    return {key: float(value) for key, value in row.items() if key != "epoch" and value is not None}


def evaluate(
    params: Params,
    model_path: Path,
    out_dir: Path,
    *,
    cache_dir: Path | None = None,
    split_path: Path | None = None,
    data_dir: Path | None = None,
) -> str:
    """Evaluate a checkpoint on the test split of a cache, or on a labelled folder (external validation)."""
    from leukofed.evaluation.metrics import write_evaluation
    from leukofed.training import configure_torch, load_checkpoint, predict_proba

    model, meta = load_checkpoint(model_path)
    if data_dir is not None:
        cache = _cache_external(params, data_dir, out_dir)
        rows = np.arange(len(cache.index))
    else:
        from leukofed.data.cache import load_cache
        from leukofed.data.split import read_split

        cache = load_cache(cache_dir)
        split_table = read_split(split_path)
        _check_split_matches(cache, split_table, split_path)
        rows = split_table.loc[split_table["split"] == "test", "row"].to_numpy()
    _check_model_fits(model_path, meta, cache)
    configure_torch(params.runtime.threads, params.train.seed)
    proba = predict_proba(model, np.asarray(cache.images[rows]), params.train.eval_batch_size)
    model_name = model_path.parent.name
    model_info = {"name": model_name, "path": str(model_path), "trained_on": meta["provenance"], **meta.get("extra", {})}
    metrics = write_evaluation(
        out_dir, cache.index["label_index"].to_numpy()[rows], proba, cache.classes,
        cache.index["relpath"].to_numpy()[rows].tolist(), cache.provenance, model_info, title=f"{model_name} — confusion matrix",
    )
    return f"evaluated {model_name} on {metrics['n']} images: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}"


def _cache_external(params: Params, data_dir: Path, out_dir: Path):
    """Acquire, validate and cache a labelled folder so it can be evaluated like the test split."""
    from leukofed.config import DatasetSpec
    from leukofed.data.acquire import acquire as acquire_dataset
    from leukofed.data.acquire import load_source
    from leukofed.data.cache import build_cache, load_cache

    spec = DatasetSpec(source="folder", path=str(data_dir))
    with tempfile.TemporaryDirectory(prefix="leukofed-external-") as tmp:
        acquire_dataset(f"external-{Path(data_dir).name.lower()}", spec, params.data, params.download, Path(tmp))
        root, manifest, provenance = load_source(Path(tmp))
        build_cache(root, manifest, provenance, params.data, out_dir / "cache")
    return load_cache(out_dir / "cache")


def report(params: Params, results_dir: Path, out_dir: Path, command: str) -> str:
    """Build reports/<dataset>/ (summary.json, README.md, figures) from every evaluated model."""
    from leukofed.report import build_report

    summary = build_report(results_dir, out_dir, paper_accuracy=params.report.paper_accuracy, command=command)
    models = ", ".join(f"{name} {entry['accuracy']:.4f}" for name, entry in summary["models"].items())
    return f"report written to {out_dir}: {models}"


def partition(params: Params, cache_dir: Path, split_path: Path, n_sites: int, out_dir: Path) -> str:
    """Deal the pooled train+val images out to ``n_sites`` sites; write the partition and its heterogeneity."""
    from leukofed.data.cache import load_cache
    from leukofed.data.partition import partition_pool, write_partition
    from leukofed.data.split import read_split

    if n_sites not in params.partition.sites:
        raise ConfigError(f"partition: {n_sites} sites is not listed in partition.sites {params.partition.sites}; add it there")
    cache = load_cache(cache_dir)
    split_table = read_split(split_path)
    _check_split_matches(cache, split_table, split_path)
    table = partition_pool(split_table, cache.classes, params.partition, n_sites)
    stats = write_partition(table, out_dir, cache.classes, cache.provenance, params.partition)
    summary = stats["summary"]
    return (
        f"partitioned {len(table)} train+val images into {n_sites} sites of {summary['sizes']} images "
        f"(size CV {summary['size_cv']:.2f}, mean JS divergence {summary['js_divergence_mean']:.3f} bits) in {out_dir}"
    )


def federate(params: Params, dataset: str, run_name: str, cache_dir: Path, partition_path: Path, out_dir: Path) -> str:
    """Train the federated model ``federation.runs.<run_name>`` over its partition in this process; track it in MLflow.

    Writes ``model.pt`` (the best round's global model, by global validation accuracy: what the
    evaluate stage tests), ``final_model.pt`` (the last round's), ``rounds.csv`` and
    ``federation.json`` (fairness, bytes, faults, per-site figures, heterogeneity, round times), as
    the Flower ServerApp does (:func:`leukofed.federation.runner.federate_and_record`). The round time
    against the same centralized training is measured by ``benchmarks/fl_round_vs_centralized.py``.
    """
    import hashlib
    import json

    from leukofed.data.cache import load_cache
    from leukofed.data.partition import HETEROGENEITY_FILE, read_partition
    from leukofed.federation.engine import sites_from_partition
    from leukofed.federation.runner import federate_and_record
    from leukofed.io import read_json
    from leukofed.model import build_model
    from leukofed.training import configure_torch

    run = _federation_run(params, run_name)
    cache = load_cache(cache_dir)
    sites = sites_from_partition(cache, read_partition(partition_path), partition_path, run.sites)
    configure_torch(params.runtime.threads, params.train.seed)
    model = build_model(params.model, len(cache.classes))
    data_key = hashlib.sha256(Path(partition_path).read_bytes()).hexdigest() + cache.provenance.fingerprint
    privacy = None
    if params.privacy.dp.enabled:  # DP-SGD at every site; a checkpoint made with other DP settings is not resumed
        from leukofed.privacy.dp import site_privacy

        privacy = site_privacy(params.privacy.dp, {site.number: site.n_train for site in sites},
                               batch_size=params.train.batch_size, planned_epochs=run.rounds * params.federation.local_epochs)
        data_key += json.dumps(params.privacy.dp.model_dump(), sort_keys=True)
    return federate_and_record(
        params, dataset, run_name, model, sites, provenance=cache.provenance, classes=cache.classes,
        image_size=int(cache.meta["image_size"]), data_key=data_key, out_dir=Path(out_dir),
        extra={"heterogeneity": read_json(Path(partition_path).with_name(HETEROGENEITY_FILE))["summary"]},
        privacy=privacy,
    )


def privacy(params: Params, dataset: str, cache_dir: Path, split_path: Path, partition_path: Path, out_dir: Path) -> str:
    """Privacy-utility sweep: ``privacy.sweep.run`` at every ``privacy.sweep.epsilons``, tested and attacked.

    See :mod:`leukofed.privacy.sweep`; writes ``privacy.json``, ``privacy.csv``, ``privacy_utility.png``,
    ``membership_roc.png`` and one ``eps-<epsilon>/`` folder per level in ``out_dir``.
    """
    import hashlib

    from leukofed.data.cache import load_cache
    from leukofed.data.partition import read_partition
    from leukofed.data.split import read_split
    from leukofed.federation.engine import sites_from_partition
    from leukofed.privacy.sweep import SweepData, run_sweep

    sweep = params.privacy.sweep
    cache = load_cache(cache_dir)
    split_table = read_split(split_path)
    _check_split_matches(cache, split_table, split_path)
    test_images, test_labels = _split_arrays(cache, split_table, "test")
    n_sites = params.federation.runs[sweep.run].sites
    sites = sites_from_partition(cache, read_partition(partition_path), partition_path, n_sites)
    digest = hashlib.sha256(Path(partition_path).read_bytes() + Path(split_path).read_bytes()).hexdigest()
    data = SweepData(sites, test_images, test_labels, cache.classes, int(cache.meta["image_size"]), cache.provenance,
                     data_key=digest + cache.provenance.fingerprint)
    record = run_sweep(params, dataset, data, Path(out_dir))
    levels = "; ".join(
        f"{level['level']}: accuracy {level['test']['accuracy']:.3f}, attack AUC {level['attack']['calibrated']['auc']:.3f}"
        for level in record["levels"]
    )
    return f"privacy sweep of {sweep.run} ({n_sites} sites, {sweep.rounds} rounds) -> {out_dir}: {levels}"


def _federation_run(params: Params, run_name: str) -> FederationRun:
    if run_name not in params.federation.runs:
        raise ConfigError(
            f"federate: '{run_name}' is not an entry of federation.runs ({sorted(params.federation.runs)}); add it there"
        )
    return params.federation.runs[run_name]


# --- Analysis of trained models: calibration, Grad-CAM, statistics, shortcut audit, prediction -----------

PREDICT_CAM_METHOD = "gradcam"  # the overlay `leukofed predict --cam` writes


def _load_model_for(model_path: Path, cache):
    """A checkpoint's model, after checking it was trained on the cache's classes and image size."""
    from leukofed.training import load_checkpoint

    model, meta = load_checkpoint(model_path)
    _check_model_fits(model_path, meta, cache)
    return model


def _check_model_fits(model_path: Path, meta: dict, cache) -> None:
    if list(meta["classes"]) != list(cache.classes):
        raise DataError(f"{model_path}: trained on classes {meta['classes']}, but the data have {cache.classes}")
    if int(meta["image_size"]) != int(cache.meta["image_size"]):
        raise DataError(
            f"{model_path}: trained at {meta['image_size']} px but the data are cached at {cache.meta['image_size']} px; "
            "set data.image_size to the model's size"
        )


def _logits(model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Raw logits (float64): temperature scaling needs them, not probabilities."""
    from leukofed.training import predict_logits

    return predict_logits(model, np.asarray(images), batch_size).double().numpy()


def _split_rows(split_table: pd.DataFrame, part: str) -> np.ndarray:
    return split_table.loc[split_table["split"] == part, "row"].to_numpy()


def _analysis_inputs(params: Params, model_path: Path, cache_dir: Path, split_path: Path):
    """The cache, its split table and the model to analyse, checked against each other; torch configured."""
    from leukofed.data.cache import load_cache
    from leukofed.data.split import read_split
    from leukofed.training import configure_torch

    cache = load_cache(cache_dir)
    split_table = read_split(split_path)
    _check_split_matches(cache, split_table, split_path)
    model = _load_model_for(model_path, cache)
    configure_torch(params.runtime.threads, params.train.seed)
    return cache, split_table, model


def _site_validation_rows(cache, partition_path: Path) -> dict[int, np.ndarray]:
    """Each site's local validation rows (cache rows) from a partition of this cache."""
    from leukofed.data.partition import read_partition

    table = read_partition(partition_path)
    rows = table["row"].to_numpy()
    if rows.max(initial=-1) >= len(cache.index) or not (cache.index["relpath"].to_numpy()[rows] == table["relpath"].to_numpy()).all():
        raise DataError(f"{partition_path}: does not match the cache it is used with; rerun the partition stage")
    validation = table[table["part"] == "val"]
    return {int(site): part["row"].to_numpy() for site, part in validation.groupby("site")}


def calibrate(params: Params, model_path: Path, cache_dir: Path, split_path: Path, out_dir: Path,
              partition_path: Path | None = None) -> str:
    """Calibration of a model on the test split, before and after temperature scaling.

    The temperature is fitted on the global validation split, or, with ``partition_path`` (a federated
    model), on the sites' local validation parts without pooling data (see
    :mod:`leukofed.evaluation.calibration`).
    """
    from leukofed.evaluation.calibration import federated_temperature, temperature_record, write_calibration

    cache, split_table, model = _analysis_inputs(params, model_path, cache_dir, split_path)
    labels = cache.index["label_index"].to_numpy()
    batch, bounds = params.train.eval_batch_size, params.analysis.temperature_bounds
    if partition_path is None:
        rows = _split_rows(split_table, "val")
        fit = {"scheme": "global validation split",
               **temperature_record(_logits(model, cache.images[rows], batch), labels[rows], bounds)}
    else:
        site_rows = _site_validation_rows(cache, partition_path)
        site_logits = {site: (_logits(model, cache.images[rows], batch), labels[rows]) for site, rows in site_rows.items()}
        fit = {"scheme": "site-wise: the server minimises the sum of the sites' NLLs on their local validation parts",
               "partition": str(partition_path), **federated_temperature(site_logits, bounds)}
    test_rows = _split_rows(split_table, "test")
    name = Path(model_path).parent.name
    record = write_calibration(
        out_dir, labels[test_rows], _logits(model, cache.images[test_rows], batch), fit, cache.classes,
        params.analysis.ece_bins, cache.provenance, {"name": name, "path": str(model_path)},
    )
    return (
        f"calibrated {name} on {record['n_test']} test images: ECE {record['overall']['ece']:.4f} -> "
        f"{record['after_scaling']['ece']:.4f}, NLL {record['overall']['nll']:.4f} -> {record['after_scaling']['nll']:.4f} "
        f"at T = {record['temperature']:.3f} ({fit['scheme'].split(':')[0]})"
    )


def explain(params: Params, model_path: Path, cache_dir: Path, split_path: Path, out_dir: Path) -> str:
    """Class-activation-map panels of a model's test images and the randomisation check (cam.json)."""
    from leukofed.evaluation.explain import explain_model
    from leukofed.training import predict_proba

    cache, split_table, model = _analysis_inputs(params, model_path, cache_dir, split_path)
    rows = _split_rows(split_table, "test")
    images = np.asarray(cache.images[rows])
    batch = params.train.eval_batch_size
    name = Path(model_path).parent.name
    record = explain_model(
        model, images, cache.index["label_index"].to_numpy()[rows], predict_proba(model, images, batch),
        cache.index["relpath"].to_numpy()[rows].tolist(), cache.classes, params.analysis.cam, out_dir,
        cache.provenance, {"name": name, "path": str(model_path)}, batch,
    )
    similarity = ", ".join(f"{method} {'n/a' if value is None else f'{value:.2f}'}"
                           for method, value in record["randomisation_similarity"].items())
    return (
        f"explained {name}: {len(record['panels'])} panel grids in {out_dir} ({record['n_errors']} misclassified test "
        f"images); map similarity to a re-initialised model: {similarity}"
    )


def audit(params: Params, cache_dir: Path, split_path: Path, out_path: Path) -> str:
    """Shortcut audit: linear models on border colour and on a corner patch, train split -> test split."""
    from leukofed.data.cache import load_cache
    from leukofed.data.split import read_split
    from leukofed.evaluation.audit import shortcut_audit

    cache = load_cache(cache_dir)
    split_table = read_split(split_path)
    _check_split_matches(cache, split_table, split_path)
    result = shortcut_audit(cache.images, cache.index["label_index"].to_numpy(), _split_rows(split_table, "train"),
                            _split_rows(split_table, "test"), params.analysis.audit)
    write_json(out_path, {**result, "params": params.analysis.audit.model_dump(), "data": cache.provenance.to_dict()})
    return (
        f"shortcut audit on {result['n_test']} test images: border colour accuracy {result['border_colour']['accuracy']:.4f}, "
        f"corner patch {result['corner_patch']['accuracy']:.4f}, majority class {result['majority_class']['accuracy']:.4f}"
    )


def _read_predictions(results_dir: Path, model: str, classes: list[str]) -> tuple[pd.DataFrame, dict]:
    """A model's test predictions (relpath, actual and predicted class indices) and its data provenance."""
    from leukofed.evaluation.metrics import METRICS_FILE, PREDICTIONS_FILE
    from leukofed.io import read_json

    folder = Path(results_dir) / model / "eval"
    paths = [folder / PREDICTIONS_FILE, folder / METRICS_FILE]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise DataError(f"{', '.join(missing)}: not found; run the evaluate stage for model '{model}' first")
    table = pd.read_csv(paths[0], keep_default_na=False, dtype={"relpath": str, "actual": str, "predicted": str})
    unknown = sorted((set(table["actual"]) | set(table["predicted"])) - set(classes))
    if unknown:
        raise DataError(f"{paths[0]}: classes {unknown} are not in data.classes {classes}; re-evaluate the model")
    index = {name: label for label, name in enumerate(classes)}
    return table.assign(actual=table["actual"].map(index), predicted=table["predicted"].map(index)), read_json(paths[1])["data"]


def compare(params: Params, results_dir: Path, out_path: Path) -> str:
    """Bootstrap CIs of every model's test metrics and McNemar's test of the centralized model against each other one."""
    from leukofed.evaluation.statistics import compare_models

    models = [CENTRALIZED, *params.federation.runs]
    tables, data = {}, {}
    for model in models:
        tables[model], data[model] = _read_predictions(results_dir, model, params.data.classes)
    test_images = tables[CENTRALIZED][["relpath", "actual"]]
    for model, table in tables.items():
        if data[model]["fingerprint"] != data[CENTRALIZED]["fingerprint"] or not table[["relpath", "actual"]].equals(test_images):
            raise DataError(
                f"{Path(results_dir) / model / 'eval'}: evaluated on other test images than {CENTRALIZED}; "
                "rerun the evaluate stage of every model on the same split"
            )
    result = compare_models({model: table["predicted"].to_numpy() for model, table in tables.items()},
                            tables[CENTRALIZED]["actual"].to_numpy(), CENTRALIZED, len(params.data.classes),
                            params.analysis.bootstrap)
    write_json(out_path, {**result, "data": data[CENTRALIZED]})
    accuracies = ", ".join(f"{model} {entry['accuracy']['estimate']:.4f} [{entry['accuracy']['low']:.4f}, "
                           f"{entry['accuracy']['high']:.4f}]" for model, entry in result["models"].items())
    return f"compared {len(models)} models on {result['n_test']} test images: accuracy {accuracies}"


def _read_temperature(path: Path) -> float:
    from leukofed.io import read_json

    try:
        temperature = read_json(path)["temperature"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path}: not a readable calibration.json ({error!r}); pass the calibrate stage's calibration.json") from None
    if not isinstance(temperature, int | float) or not temperature > 0:
        raise DataError(f"{path}: 'temperature' must be a positive number, got {temperature!r}; rerun the calibrate stage")
    return float(temperature)


def _decode_for_model(paths: list[Path], max_pixels: int, size: int) -> np.ndarray:
    """Decode and square-resize every image like the cache does; refuse all unreadable ones at once."""
    from leukofed.data.cache import square_resize
    from leukofed.data.validate import InvalidImage, decode_rgb

    images, problems = [], []
    for path in paths:
        try:
            images.append(square_resize(decode_rgb(path, max_pixels)[0], size))
        except InvalidImage as error:  # also a missing file or a folder
            problems.append(f"{path}: {error.reason}")
    if problems:
        raise DataError("cannot use these images:\n  " + "\n  ".join(problems))
    return np.stack(images)


def predict(params: Params, image_paths: list[Path], model_path: Path, cam_dir: Path | None = None,
            temperature_path: Path | None = None) -> str:
    """Classify image files with a checkpoint; optionally calibrate the probabilities and write Grad-CAM overlays."""
    from leukofed.evaluation.calibration import probabilities
    from leukofed.training import configure_torch, load_checkpoint

    image_paths = [Path(path) for path in image_paths]
    stems = pd.Series([path.stem for path in image_paths])
    if cam_dir is not None and stems.duplicated().any():
        raise DataError(f"images {sorted(set(stems[stems.duplicated()]))} share a file name: their overlays would "
                        f"overwrite each other in {cam_dir}; predict them in separate calls")
    model, meta = load_checkpoint(model_path)
    temperature = 1.0 if temperature_path is None else _read_temperature(temperature_path)
    images = _decode_for_model(image_paths, params.data.max_image_pixels, int(meta["image_size"]))
    configure_torch(params.runtime.threads, params.train.seed)
    proba = probabilities(_logits(model, images, params.train.eval_batch_size), temperature)
    classes = list(meta["classes"])
    if cam_dir is not None:
        _write_overlays(model, images, proba.argmax(axis=1), image_paths, Path(cam_dir), params.train.eval_batch_size)
    how = f"calibrated with T = {temperature:.3f} from {temperature_path}" if temperature_path else "uncalibrated softmax"
    lines = [f"probabilities ({how}): " + ", ".join(classes)]
    for path, row in zip(image_paths, proba, strict=True):
        scores = " ".join(f"{name}={p:.4f}" for name, p in zip(classes, row, strict=True))
        lines.append(f"{path}: {classes[int(row.argmax())]}  {scores}")
    if cam_dir is not None:
        lines.append(f"{PREDICT_CAM_METHOD} overlays written to {cam_dir}")
    return "\n".join(lines)


def _write_overlays(model, images: np.ndarray, predicted: np.ndarray, paths: list[Path], cam_dir: Path, batch_size: int) -> None:
    """One ``<image stem>_gradcam.png`` per image: the map of its predicted class over the model's input."""
    from PIL import Image

    from leukofed.evaluation.explain import compute_cams, overlay
    from leukofed.io import atomic_path

    cams = compute_cams(model, images, predicted, PREDICT_CAM_METHOD, batch_size)
    for path, image, cam in zip(paths, images, cams, strict=True):
        with atomic_path(cam_dir / f"{path.stem}_{PREDICT_CAM_METHOD}.png", suffix=".png") as tmp:
            Image.fromarray(overlay(image, cam)).save(tmp, format="PNG")
