"""DP-SGD in the federation: site-held accountants, per-round epsilon in the records, budgets, resume, tracking."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from leukofed import stages
from leukofed.federation.engine import run_federation
from leukofed.federation.runner import privacy_spent
from leukofed.federation.site import PRIVACY_STATE, Site
from leukofed.io import read_json
from leukofed.model import build_model
from leukofed.privacy.dp import PrivacyAccountant, PrivacyBudgetError, PrivateTraining, site_privacy, steps_per_epoch
from leukofed.training import configure_torch

from .conftest import THREADS, tiny_params, tiny_sites

ROUNDS = 2
TARGET = 4.0


def _setups(params, sites, *, planned_epochs=ROUNDS):
    return site_privacy(params.privacy.dp, {site.number: site.n_train for site in sites},
                        batch_size=params.train.batch_size, planned_epochs=planned_epochs)


def _federate(checkpoint_dir, *, planned_epochs=ROUNDS, on_round=None):
    params = tiny_params(target_epsilon=TARGET, epsilon_budget=TARGET)
    sites = tiny_sites()
    setups = _setups(params, sites, planned_epochs=planned_epochs)
    configure_torch(THREADS, seed=0)
    model = build_model(params.model, 4)
    run = params.federation.runs["fedavg-3"].model_copy(update={"rounds": ROUNDS})
    federation = params.federation.model_copy(update={"local_epochs": 1})
    result = run_federation(model, sites, run, federation, params.train, checkpoint_dir=checkpoint_dir,
                            data_key="test", on_round=on_round, privacy=setups)
    return result, setups


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted DP run and its site set-ups."""
    return _federate(tmp_path_factory.mktemp("reference"))


def test_sites_report_growing_epsilon_every_round_up_to_the_target(reference):
    result, setups = reference
    epsilons = {site: [record["sites"][site]["epsilon"] for record in result.records] for site in (1, 2, 3)}
    for site, values in epsilons.items():
        assert 0 < values[0] < values[1] <= TARGET
        assert values[1] == pytest.approx(setups[site].accountant.epsilon())
        assert {record["sites"][site]["delta"] for record in result.records} == {setups[site].accountant.delta}
        # the un-noised training loss and accuracy stay at the site
        assert all(record["sites"][site]["train_loss"] is None for record in result.records)
    spent = privacy_spent(result.records)
    assert set(spent) == {"1", "2", "3"} and all(entry["round"] == ROUNDS for entry in spent.values())
    assert spent["2"]["epsilon"] == epsilons[2][1]


def test_a_resumed_run_continues_each_sites_ledger(reference, tmp_path):
    def crash(record):
        if record["round"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _federate(tmp_path, on_round=crash)
    resumed, setups = _federate(tmp_path)  # fresh accountants: round 1's steps come from the checkpoint
    assert setups[1].accountant.steps == ROUNDS * steps_per_epoch(16, 4)
    assert [record["sites"][1]["epsilon"] for record in resumed.records] == \
        [record["sites"][1]["epsilon"] for record in reference[0].records]
    assert all(torch.equal(resumed.final_state[key], reference[0].final_state[key]) for key in reference[0].final_state)


def test_a_plan_past_the_budget_is_refused_before_any_training():
    params = tiny_params(noise_multiplier=0.5, target_epsilon=None, epsilon_budget=2.0)
    with pytest.raises(PrivacyBudgetError) as error:
        _setups(params, tiny_sites(), planned_epochs=10)
    assert "site 1" in str(error.value) and "privacy.dp.epsilon_budget=2" in str(error.value)


def test_the_round_past_the_budget_stops_the_run_and_keeps_the_round_before(tmp_path):
    """Noise calibrated for one round, two rounds run: round 2 would pass the budget."""
    with pytest.raises(PrivacyBudgetError, match="privacy.dp.epsilon_budget"):
        _federate(tmp_path, planned_epochs=1)
    assert len(torch.load(tmp_path / "state.pt", weights_only=True)["records"]) == 1


def _private() -> PrivateTraining:
    return PrivateTraining(noise_multiplier=1.0, max_grad_norm=1.0,
                           accountant=PrivacyAccountant(owner="site 1", delta=1e-3, budget=None), noise_seed=0)


def test_site_state_carries_the_accountant():
    data = tiny_sites()[0]
    site = Site(data, privacy=_private())
    site.privacy.accountant.record(1.0, 0.5)
    state = site.state_dict()
    fresh = Site(data, privacy=_private())
    fresh.load_state_dict(state)
    assert fresh.privacy.accountant.epsilon() == site.privacy.accountant.epsilon() > 0
    fresh.load_state_dict({})  # a site that never trained
    assert fresh.privacy.accountant.steps == 0
    assert PRIVACY_STATE not in Site(data).state_dict()


def test_the_federate_stage_logs_each_sites_epsilon_per_round(tiny_project, mlflow_file_store, tmp_path):
    params = tiny_params(enabled=True, target_epsilon=TARGET, epsilon_budget=TARGET)
    runs = {"fedavg-3": params.federation.runs["fedavg-3"].model_copy(update={"rounds": ROUNDS})}
    params = params.model_copy(update={"federation": params.federation.model_copy(update={"runs": runs, "local_epochs": 1})})
    out = tmp_path / "fedavg-3"
    stages.federate(params, "tiny", "fedavg-3", tiny_project["cache"], tiny_project["partition"], out)

    record = read_json(out / "federation.json")
    assert set(record["privacy"]) == {"1", "2", "3"}
    assert all(0 < entry["epsilon"] <= TARGET and entry["delta"] < 1 / 96 for entry in record["privacy"].values())
    rounds = pd.read_csv(out / "rounds.csv")
    assert (rounds["site1_epsilon"].diff().dropna() > 0).all()
    client = MlflowClient()
    parent = client.get_run(record["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    for child in children:
        history = client.get_metric_history(child.info.run_id, "epsilon")
        assert [metric.step for metric in history] == [1, 2] and math.isclose(
            history[-1].value, record["privacy"][child.data.tags["site"]]["epsilon"])
