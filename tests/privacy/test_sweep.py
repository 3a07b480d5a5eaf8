"""The privacy stage (DP sweep + membership audit) and its report section."""

from __future__ import annotations

import pandas as pd
import pytest

import leukofed.privacy.sweep as sweep_module
from leukofed import stages
from leukofed.errors import LeukofedError
from leukofed.io import read_json, write_json
from leukofed.privacy.summary import FIGURES, SWEEP_FILE, TABLE_FILE, read_sweep, sweep_section, sweep_summary

from .conftest import tiny_params

TARGET = 4.0


def _sweep_params(epsilons):
    params = tiny_params()
    privacy = params.privacy.model_copy(update={
        "sweep": params.privacy.sweep.model_copy(update={"run": "fedavg-3", "epsilons": epsilons, "rounds": 2, "local_epochs": 1}),
        "attack": params.privacy.attack.model_copy(update={"max_members": 30}),
    })
    return params.model_copy(update={"privacy": privacy})


def _run(params, project, out):
    return stages.privacy(params, "tiny", project["cache"], project["split"], project["partition"], out)


def test_the_privacy_stage_trains_tests_and_attacks_every_level(tiny_project, mlflow_file_store, tmp_path, monkeypatch):
    out = tmp_path / "privacy"
    message = _run(_sweep_params([TARGET, float("inf")]), tiny_project, out)

    assert "eps-4" in message and "eps-inf" in message
    record = read_json(out / SWEEP_FILE)
    private, plain = record["levels"]
    assert private["private"] and private["target_epsilon"] == TARGET and not plain["private"]
    assert set(private["epsilon_spent"]) == {"1", "2", "3"}
    assert all(0 < epsilon <= TARGET for epsilon in private["epsilon_spent"].values())
    assert plain["epsilon_spent"] is None and plain["noise_multiplier"] is None
    assert record["delta"] == private["delta"] < 1 / sum(site["n_train"] for site in record["sites"].values())
    for level in record["levels"]:
        assert 0 <= level["test"]["accuracy"] <= 1
        assert level["attack"]["loss"]["n_members"] == 30 and 0 <= level["attack"]["calibrated"]["auc"] <= 1
    table = pd.read_csv(out / TABLE_FILE)
    assert list(table["level"]) == ["eps-4", "eps-inf"] and table["target_epsilon"].isna().tolist() == [False, True]
    assert all((out / name).stat().st_size > 0 for name in FIGURES)
    assert [entry["registered_name"] for entry in mlflow_file_store] == ["leukofed-tiny-privacy-eps-4",
                                                                          "leukofed-tiny-privacy-eps-inf"]
    assert read_json(out / "eps-4/federation.json")["params"]["model"]["norm"] == "group"

    # a rerun with the same settings reuses the finished levels; a new epsilon trains only its own level
    trained = []
    original = sweep_module.federate_and_record
    monkeypatch.setattr(sweep_module, "federate_and_record", lambda *a, **k: trained.append(a[2]) or original(*a, **k))
    _run(_sweep_params([TARGET, float("inf")]), tiny_project, out)
    assert trained == []
    _run(_sweep_params([2.0, float("inf")]), tiny_project, out)
    assert trained == ["privacy-eps-2"]


def _record(levels=None) -> dict:
    attack = {"auc": 0.6, "advantage": 0.2, "tpr_at_fpr": [{"fpr": 0.01, "tpr": 0.05}], "n_members": 30,
              "n_nonmembers": 10, "min_resolvable_fpr": 0.1}
    level = {"level": "eps-3", "private": True, "target_epsilon": 3.0, "epsilon_spent": {"1": 2.5, "2": 2.9},
             "test": {"accuracy": 0.8, "balanced_accuracy": 0.75, "macro_f1": 0.7}, "best_round": 2,
             "attack": {name: attack for name in ("loss", "confidence", "calibrated")} | {"n_reference": 10}}
    plain = level | {"level": "eps-inf", "private": False, "target_epsilon": None, "epsilon_spent": None}
    return {"data": {"fingerprint": "f"}, "run": "fedavg-5", "strategy": "fedavg", "sites": {"1": {}, "2": {}},
            "n_test": 20, "rounds": 4, "local_epochs": 1, "delta": 1e-5, "levels": levels or [level, plain]}


def test_report_section_shows_every_level():
    summary = sweep_summary(_record())
    assert [level["epsilon_spent_max"] for level in summary["levels"]] == [2.9, None]
    lines = sweep_section(summary, {name: name for name in FIGURES},
                          lambda header, rows: ["|".join(header), *("|".join(row) for row in rows)])
    text = "\n".join(lines)
    assert text.startswith("## Privacy") and "δ = 1e-05" in text
    assert "3|2.90|80.00%|0.700|0.600|0.600|0.600|5.0%" in text and "∞ (no DP)|—|" in text
    assert all(f"]({name})" in text for name in FIGURES)


def test_a_malformed_sweep_record_is_refused(tmp_path):
    path = tmp_path / SWEEP_FILE
    write_json(path, {"run": "fedavg-5"})
    with pytest.raises(LeukofedError, match="re-run the privacy stage"):
        read_sweep(path)
    broken = _record()
    del broken["levels"][0]["attack"]
    write_json(path, broken)
    with pytest.raises(LeukofedError, match=r"levels\[0\]\.attack"):
        read_sweep(path)
