"""The in-process federated engine: rounds, faults, determinism, checkpoint/resume, fairness."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient

import leukofed.federation.engine as engine
import leukofed.federation.site as site_module
from leukofed import stages
from leukofed.config import load_params, parse_params
from leukofed.errors import ConfigError
from leukofed.federation.aggregation import batchnorm_keys, exchanged_keys, state_nbytes
from leukofed.federation.engine import (
    CHECKPOINT_FILE,
    InProcessTransport,
    InsufficientSitesError,
    SiteData,
    fairness,
    run_federation,
)
from leukofed.federation.runner import CHECKPOINT_DIR
from leukofed.federation.site import FitReply, Site
from leukofed.io import read_json, write_json
from leukofed.model import build_model
from leukofed.provenance import DataProvenance
from leukofed.tracking import RunTracker
from leukofed.training import NonFiniteLossError, configure_torch, load_checkpoint

PARAMS_FILE = Path(__file__).resolve().parents[2] / "params.yaml"
PARAMS = load_params(PARAMS_FILE)
TRAIN = PARAMS.train.model_copy(update={"batch_size": 8})
MODEL = PARAMS.model.model_copy(update={"width": 4})
SIZE = 32
N_CLASSES = 4
# Site 1 never sees class 0, site 3 sees only classes 0 and 3: label skew, including a missing class.
SITE_CLASSES = {1: [1, 2, 3], 2: [0, 1, 2, 3], 3: [0, 3]}
ROUNDS = 3
CRASH_AFTER = 2
THREADS = 1  # tiny models: one thread is as fast, and immune to spin-waiting when the CPU is shared


def _images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noisy images whose colour gives the class away."""
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])
    noise = rng.integers(-60, 61, (len(labels), SIZE, SIZE, 3))
    return np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)


def make_sites() -> list[SiteData]:
    rng = np.random.default_rng(0)
    sites = []
    for number, classes in SITE_CLASSES.items():
        train_labels, val_labels = rng.choice(classes, 16), rng.choice(classes, 8)
        sites.append(SiteData(number, _images(train_labels, rng), train_labels, _images(val_labels, rng), val_labels))
    return sites


def federation(**changes):
    return PARAMS.federation.model_copy(update=changes)


def a_run(strategy: str = "fedavg", rounds: int = ROUNDS):
    return PARAMS.federation.runs["fedavg-3"].model_copy(update={"strategy": strategy, "rounds": rounds})


def federate(checkpoint_dir: Path, *, run=None, params=None, on_round=None, transport=None):
    """A fresh seeded tiny model trained federatedly over make_sites() (or over ``transport(model)``)."""
    configure_torch(THREADS, seed=0)
    model = build_model(MODEL, N_CLASSES)
    result = run_federation(
        model, make_sites() if transport is None else transport(model), run or a_run(), params or federation(), TRAIN,
        checkpoint_dir=checkpoint_dir, data_key="test", on_round=on_round,
    )
    return model, result


def _equal(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def _without_timings(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if not key.endswith("seconds")} for record in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: the weights every variant must reproduce."""
    return federate(tmp_path_factory.mktemp("reference"))


def test_rounds_record_global_and_per_site_metrics(reference):
    model, result = reference
    assert [record["round"] for record in result.records] == list(range(1, ROUNDS + 1))
    state_bytes = state_nbytes(result.final_state, exchanged_keys(result.final_state))
    for record in result.records:
        assert record["selected"] == record["accepted"] == [1, 2, 3] and record["rejected"] == {}
        assert 0.0 <= record["val_accuracy"] <= 1.0 and np.isfinite(record["val_loss"])
        for entry in record["sites"].values():
            assert entry["bytes_sent"] == entry["bytes_received"] == state_bytes
            assert 0.0 <= entry["train_accuracy"] <= 1.0 and 0.0 <= entry["val_accuracy"] <= 1.0
        assert record["bytes_sent"] == 3 * state_bytes
        assert record["lr"] == engine.round_lr(TRAIN, record["round"], ROUNDS)
    best = result.records[result.best_round - 1]
    assert best["val_accuracy"] == max(record["val_accuracy"] for record in result.records)
    assert _equal(model.state_dict(), result.best_state)


def test_identical_seeds_give_bitwise_identical_weights(reference, tmp_path):
    _, again = federate(tmp_path / "again")
    assert _equal(again.final_state, reference[1].final_state)
    _, reseeded = federate(tmp_path / "reseeded", params=federation(seed=1))
    assert not _equal(reseeded.final_state, reference[1].final_state)


def test_fraction_fit_selects_the_rounded_up_share_of_sites(tmp_path):
    _, result = federate(tmp_path, params=federation(fraction_fit=0.5))
    for record in result.records:
        assert len(record["selected"]) == 2  # ceil(0.5 * 3)
        (idle,) = set(SITE_CLASSES) - set(record["selected"])
        assert record["sites"][idle]["bytes_sent"] == 0 and record["sites"][idle]["train_loss"] is None
        assert record["sites"][idle]["val_accuracy"] is not None  # the server still evaluates every site


def _failing_at(monkeypatch, site_number: int, failure, rounds=range(1, ROUNDS + 1)):
    """Make local training at one site (recognised by its data) fail as ``failure`` says in ``rounds``."""
    target = make_sites()[site_number - 1].train_labels
    real = site_module.train_model
    calls = []

    def train_model(model, images, labels, *args, **kwargs):
        result = real(model, images, labels, *args, **kwargs)
        if np.array_equal(labels, target):
            calls.append(1)  # the site trains once per round (fraction_fit 1)
            if len(calls) in rounds:
                return failure(result)
        return result

    monkeypatch.setattr(site_module, "train_model", train_model)


def _diverge(result):
    raise NonFiniteLossError("training loss became nan in epoch 1")


def _poison(result):
    key = next(iter(result.state_dict))
    result.state_dict[key] = torch.full_like(result.state_dict[key], float("nan"))
    return result


@pytest.mark.parametrize(("failure", "says"), [(_diverge, "non-finite training loss"), (_poison, "non-finite values")])
def test_a_non_finite_site_is_rejected_and_the_round_goes_on(monkeypatch, tmp_path, failure, says):
    _failing_at(monkeypatch, 2, failure)
    _, result = federate(tmp_path)
    for record in result.records:
        assert record["accepted"] == [1, 3] and list(record["rejected"]) == [2]
        assert says in record["rejected"][2]
        assert record["sites"][2]["train_loss"] is None
    assert all(bool(torch.isfinite(value.float()).all()) for value in result.final_state.values())


def test_too_few_valid_updates_stop_the_run_and_a_rerun_resumes(reference, monkeypatch, tmp_path):
    strict = federation(min_sites=3)
    with monkeypatch.context() as patch:
        _failing_at(patch, 2, _diverge, rounds=[CRASH_AFTER])
        with pytest.raises(InsufficientSitesError) as error:
            federate(tmp_path, params=strict)
    message = str(error.value)
    assert f"round {CRASH_AFTER}: 2 valid update(s) (sites [1, 3]" in message and "site 2: non-finite training loss" in message
    assert "min_sites=3" in message and f"keeps round {CRASH_AFTER - 1}" in message
    _, resumed = federate(tmp_path, params=strict)  # the site is fixed: the rerun continues
    assert resumed.resumed_from == CRASH_AFTER - 1
    assert _equal(resumed.final_state, reference[1].final_state)  # min_sites changes nothing when every site answers


class _Unreliable(InProcessTransport):
    """In-process sites behind a faulty link: site 2 never answers; site 3's update arrives as ``garble`` makes it."""

    def __init__(self, model, garble):
        super().__init__([Site(data) for data in make_sites()], model)
        self.garble = garble

    def fit(self, instructions):
        replies = super().fit({number: item for number, item in instructions.items() if number != 2})
        replies[3] = FitReply(self.garble(replies[3].entries), replies[3].num_examples, replies[3].metrics)
        return replies

    def evaluate(self, global_state, numbers, batch_size):
        return super().evaluate(global_state, [number for number in numbers if number != 2], batch_size)


def _drop_first(entries):
    return dict(list(entries.items())[1:])


def _nan_first(entries):
    key = next(iter(entries))
    return entries | {key: torch.full_like(entries[key], float("nan"))}


def _as_double(entries):
    return {key: value.double() for key, value in entries.items()}


@pytest.mark.parametrize(("garble", "says"), [(_drop_first, "does not match the model (missing"),
                                              (_as_double, "shape or dtype"), (_nan_first, "non-finite values")])
def test_silent_sites_and_invalid_updates_are_rejected(tmp_path, garble, says):
    _, result = federate(tmp_path, params=federation(min_sites=1), transport=lambda model: _Unreliable(model, garble))
    for record in result.records:
        assert record["accepted"] == [1] and record["rejected"][2] == engine.NO_REPLY and says in record["rejected"][3]
        assert record["sites"][2]["val_accuracy"] is None and record["sites"][3]["val_accuracy"] is not None
        assert record["sites"][3]["bytes_received"] > 0 and record["sites"][2]["bytes_received"] == 0
    summary = engine.summarize(result, make_sites())
    assert summary["sites"][2]["rounds_rejected"] == ROUNDS and summary["fairness"]["final"]["jain"] is not None


def test_a_crash_resumes_from_the_last_finished_round_with_the_same_weights(reference, tmp_path):
    class Crash(Exception):
        pass

    def crash(record):
        if record["round"] == CRASH_AFTER:
            raise Crash

    with pytest.raises(Crash):
        federate(tmp_path, on_round=crash)
    assert (tmp_path / CHECKPOINT_FILE).is_file()
    seen = []
    _, resumed = federate(tmp_path, on_round=lambda record: seen.append(record["round"]))
    assert resumed.resumed_from == CRASH_AFTER
    assert seen == list(range(1, ROUNDS + 1))  # restored rounds are replayed to the callback
    assert _equal(resumed.final_state, reference[1].final_state)
    assert _equal(resumed.best_state, reference[1].best_state)
    assert _without_timings(resumed.records) == _without_timings(reference[1].records)


def kill_after_round(checkpoint_dir: str) -> None:
    """Run in a subprocess: SIGKILL itself once round CRASH_AFTER is checkpointed."""
    def kill(record):
        if record["round"] == CRASH_AFTER:
            os.kill(os.getpid(), signal.SIGKILL)

    federate(Path(checkpoint_dir), on_round=kill)


def test_a_killed_process_resumes_with_the_same_weights(reference, tmp_path):
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_engine; test_engine.kill_after_round(sys.argv[1])"
    killed = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    _, resumed = federate(tmp_path)
    assert resumed.resumed_from == CRASH_AFTER
    assert _equal(resumed.final_state, reference[1].final_state)


def test_a_checkpoint_of_other_settings_is_not_resumed(reference, tmp_path):
    federate(tmp_path, run=a_run(rounds=1))
    _, result = federate(tmp_path, params=federation(seed=5))
    assert result.resumed_from == 0


def test_fedbn_keeps_batchnorm_at_the_sites(tmp_path):
    _, result = federate(tmp_path, params=federation(batchnorm="local"))
    configure_torch(THREADS, seed=0)
    model = build_model(MODEL, N_CLASSES)
    local = batchnorm_keys(model)
    shared = exchanged_keys(result.final_state, local)
    entry = result.records[0]["sites"][1]
    assert entry["bytes_sent"] == state_nbytes(result.final_state, shared)
    assert entry["bytes_received"] == state_nbytes(result.final_state, exchanged_keys(result.final_state))
    assert entry["bytes_sent"] < entry["bytes_received"]
    checkpoint = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    site_states = {site: state["local"] for site, state in checkpoint["site_states"].items()}
    assert set(site_states) == {"1", "2", "3"} and all(set(state) == local for state in site_states.values())
    assert not torch.equal(site_states["1"]["features.0.1.running_mean"], site_states["3"]["features.0.1.running_mean"])


@pytest.mark.parametrize("strategy", ["fedprox", "fedavgm", "fedadam"])
def test_each_strategy_trains_to_finite_weights_of_its_own(reference, tmp_path, strategy):
    _, result = federate(tmp_path, run=a_run(strategy))
    assert all(bool(torch.isfinite(value.float()).all()) for value in result.final_state.values())
    assert not _equal(result.final_state, reference[1].final_state)


def test_the_learning_rate_schedule_runs_over_the_rounds():
    cosine = [engine.round_lr(TRAIN, number, 10) for number in range(1, 11)]
    assert cosine[0] == TRAIN.lr and all(a > b > 0 for a, b in zip(cosine, cosine[1:]))
    constant = TRAIN.model_copy(update={"lr_schedule": "constant"})
    assert {engine.round_lr(constant, number, 10) for number in range(1, 11)} == {TRAIN.lr}


def test_fairness_statistics():
    even = fairness([0.9, 0.9, 0.9])
    assert even["gap"] == 0.0 and even["std"] == 0.0 and even["cv"] == 0.0 and even["jain"] == pytest.approx(1.0)
    skewed = fairness([1.0, 0.0])
    assert skewed["jain"] == pytest.approx(0.5) and skewed["gap"] == 1.0 and skewed["mean"] == 0.5
    assert fairness([0.8, 0.6])["cv"] == pytest.approx(0.1 / 0.7)
    assert fairness([0.0, 0.0])["jain"] is None


@pytest.mark.parametrize(
    ("mutate", "says"),
    [
        (lambda f, p: f.update(min_sites=4), "min_sites=4 exceeds the 3 site(s) run 'fedavg-3'"),
        (lambda f, p: f["runs"].update(centralized={"sites": 3, "strategy": "fedavg", "rounds": 1}), "runs.centralized"),
        (lambda f, p: f["runs"].update(**{"fl-7": {"sites": 7, "strategy": "fedavg", "rounds": 1}}), "add it to partition.sites"),
        (lambda f, p: f["runs"]["fedavg-3"].update(strategy="scaffold"), "federation.runs.fedavg-3.strategy"),
        (lambda f, p: f.update(fraction_fit=0.0), "federation.fraction_fit"),
        (lambda f, p: f["fedprox"].update(mu=0.0), "federation.fedprox.mu"),
        (lambda f, p: f.update(batchnorm="none"), "federation.batchnorm"),
    ],
)
def test_impossible_federation_params_name_their_key(mutate, says):
    raw = copy.deepcopy(yaml.safe_load(PARAMS_FILE.read_text()))
    mutate(raw["federation"], raw["partition"])
    with pytest.raises(ConfigError) as error:
        parse_params(raw, source="params.yaml")
    assert says in str(error.value)


def _tiny_cache(folder: Path) -> None:
    """A cache folder as the preprocess stage writes it: 96 colour-coded 32 px images, singleton groups."""
    rng = np.random.default_rng(1)
    labels = np.arange(96) % N_CLASSES
    np.save(folder / "images.npy", _images(labels, rng))
    classes = PARAMS.data.classes
    index = pd.DataFrame({
        "row": range(len(labels)), "relpath": [f"{classes[label]}/{i}.png" for i, label in enumerate(labels)],
        "label": [classes[label] for label in labels], "label_index": labels, "sha256": [f"{i:064x}" for i in range(len(labels))],
        "group": range(len(labels)), "width": SIZE, "height": SIZE, "mode": "RGB",
    })
    index.to_csv(folder / "index.csv", index=False)
    provenance = DataProvenance("tiny", "synthetic", "memory", "f" * 64, len(labels))
    write_json(folder / "meta.json", {"provenance": provenance.to_dict(), "image_size": SIZE, "classes": classes})


def test_the_federate_stage_writes_evaluable_models_and_tracks_sites(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path}/mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    registered = {}
    # The registry needs a database store (tested in test_tracking.py); record what would be registered.
    monkeypatch.setattr(RunTracker, "log_model", lambda self, model, **kwargs: registered.update(kwargs) or 1)
    runs = {"fedavg-3": PARAMS.federation.runs["fedavg-3"].model_copy(update={"rounds": 2})}
    params = PARAMS.model_copy(update={
        "model": MODEL, "train": TRAIN, "federation": federation(runs=runs),
        "runtime": PARAMS.runtime.model_copy(update={"threads": THREADS, "progress": False}),
    })
    cache, results = tmp_path / "cache", tmp_path / "results"
    cache.mkdir()
    _tiny_cache(cache)
    stages.split(params, cache, results / "split.csv")
    stages.partition(params, cache, results / "split.csv", 3, results / "partitions/sites-3")
    out = results / "fedavg-3"
    message = stages.federate(params, "tiny", "fedavg-3", cache, results / "partitions/sites-3/partition.csv", out)

    assert "federated fedavg-3" in message and not (out / CHECKPOINT_DIR).exists()
    record = read_json(out / "federation.json")
    assert record["rounds"] == 2 and set(record["fairness"]["best"]) >= {"mean", "std", "cv", "gap", "jain"}
    assert record["bytes"]["sent"] > 0 and record["timing"]["round_median"] > 0
    assert record["heterogeneity"]["sizes"] == [site["n_train"] + site["n_val"] for site in record["sites"].values()]
    assert len(pd.read_csv(out / "rounds.csv")) == 2
    _, meta = load_checkpoint(out / "model.pt")
    assert meta["extra"]["federation"]["best_round"] == record["best_round"]
    assert registered["registered_name"] == "leukofed-tiny-fedavg-3" and registered["alias"] == params.tracking.model_alias
    stages.evaluate(params, out / "model.pt", out / "eval", cache_dir=cache, split_path=results / "split.csv")
    assert read_json(out / "eval/metrics.json")["model"]["federation"]["model"] == "fedavg-3"

    client = MlflowClient()
    parent = client.get_run(record["mlflow_run_id"])
    assert [metric.step for metric in client.get_metric_history(parent.info.run_id, "val_accuracy")] == [1, 2]
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(child.data.tags["site"] for child in children) == ["1", "2", "3"]
    assert all(len(client.get_metric_history(child.info.run_id, "val_accuracy")) == 2 for child in children)
    mlflow.set_tracking_uri(None)  # RunTracker sets MLflow's process-wide URI; do not leak it
