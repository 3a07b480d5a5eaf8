"""DP-SGD and the per-site accountant: epsilon grows with steps, budgets refuse, delta rule, model checks."""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from leukofed.config import DPParams, load_params, parse_params
from leukofed.errors import ConfigError
from leukofed.model import build_model
from leukofed.privacy.dp import (
    PrivacyAccountant,
    PrivacyBudgetError,
    PrivateTraining,
    _per_sample_gradients,
    noise_multiplier_for,
    private_training,
    resolve_delta,
    sample_rate,
    steps_per_epoch,
)
from leukofed.training import configure_torch, train_model

PARAMS_FILE = Path(__file__).resolve().parents[2] / "params.yaml"
SIZE = 32
N_IMAGES = 40
BATCH = 8
DELTA = 1e-3
WIDTH = 4  # a tiny CNN: DP-SGD costs per-sample gradients of every weight


@pytest.fixture(scope="module")
def repo_params():
    return load_params(PARAMS_FILE)


@pytest.fixture(autouse=True)
def _deterministic_torch(repo_params):
    configure_torch(repo_params.runtime.threads, seed=0)


def _dp(repo_params, **changes) -> DPParams:
    return DPParams.model_validate({**repo_params.privacy.dp.model_dump(), "noise_seed": 0, **changes})


def _train(repo_params, **changes):
    return repo_params.train.model_copy(update={"batch_size": BATCH, **changes})


def _model(repo_params, norm: str = "group"):
    torch.manual_seed(0)
    return build_model(repo_params.model.model_copy(update={"norm": norm, "width": WIDTH}), 2)


def _data(n: int = N_IMAGES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Reddish (label 0) and bluish (label 1) noisy images."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    colours = np.where(labels[:, None] == 0, [200, 40, 40], [40, 40, 200])
    noise = rng.integers(-40, 41, (n, SIZE, SIZE, 3))
    return np.clip(colours[:, None, None, :] + noise, 0, 255).astype(np.uint8), labels


def _private(noise_multiplier: float = 1.0, budget: float | None = None, noise_seed: int | None = 0) -> PrivateTraining:
    return PrivateTraining(noise_multiplier=noise_multiplier, max_grad_norm=1.0,
                           accountant=PrivacyAccountant(owner="site 2", delta=DELTA, budget=budget), noise_seed=noise_seed)


def _states_equal(left: dict, right: dict) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[key], right[key]) for key in left)


# --- accountant ------------------------------------------------------------------------------------


def test_epsilon_starts_at_zero_and_grows_with_every_step():
    accountant = PrivacyAccountant(owner="site 1", delta=DELTA, budget=None)
    assert accountant.epsilon() == 0 and accountant.steps == 0
    epsilons = []
    for _ in range(3):
        for _ in range(10):
            accountant.record(1.0, 0.1)
        epsilons.append(accountant.epsilon())
    assert accountant.steps == 30
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2] < math.inf
    assert accountant.epsilon(delta=DELTA / 10) > accountant.epsilon()  # a smaller delta costs epsilon


def test_projection_matches_recording_and_budget_refuses_only_past_it():
    accountant = PrivacyAccountant(owner="site 4", delta=DELTA, budget=None)
    projected = accountant.projected_epsilon(1.0, 0.1, 20)
    for _ in range(20):
        accountant.record(1.0, 0.1)
    assert accountant.epsilon() == pytest.approx(projected)
    capped = PrivacyAccountant(owner="site 4", delta=DELTA, budget=projected * 1.01)
    capped.check_budget(1.0, 0.1, 20)  # fits
    with pytest.raises(PrivacyBudgetError) as error:
        capped.check_budget(1.0, 0.1, 21)
    assert "site 4" in str(error.value) and "privacy.dp.epsilon_budget" in str(error.value)


def test_accountant_state_survives_a_checkpoint_and_resumes_the_ledger():
    uninterrupted = PrivacyAccountant(owner="site 1", delta=DELTA, budget=None)
    first = PrivacyAccountant(owner="site 1", delta=DELTA, budget=None)
    for accountant in (uninterrupted, first):
        for _ in range(5):
            accountant.record(1.2, 0.2)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = PrivacyAccountant(owner="site 1", delta=DELTA, budget=None)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.epsilon() == first.epsilon() and resumed.steps == 5
    for accountant in (uninterrupted, resumed):
        for _ in range(5):
            accountant.record(0.8, 0.2)
    assert resumed.epsilon() == pytest.approx(uninterrupted.epsilon())
    with pytest.raises(ValueError, match="accountant state"):
        resumed.load_state_dict({"mechanism": "prv", "history": []})


# --- settings: delta, noise, sampling ----------------------------------------------------------------


def test_auto_delta_is_below_one_over_n_of_every_site(repo_params):
    dp = _dp(repo_params, delta="auto", auto_delta_fraction=0.1)
    sizes = [120, 300, 80]
    delta = resolve_delta(dp, sizes)
    assert delta == pytest.approx(0.1 / 500)
    assert all(delta < 1 / n for n in sizes)


def test_explicit_delta_must_be_below_one_over_n_of_the_largest_site(repo_params):
    assert resolve_delta(_dp(repo_params, delta=1e-4), [100, 900]) == 1e-4
    with pytest.raises(ConfigError, match=r"privacy\.dp\.delta"):
        resolve_delta(_dp(repo_params, delta=0.005), [100, 900])  # below 1/100 but not below 1/900


def test_target_epsilon_sets_the_noise_for_the_planned_steps(repo_params):
    dp = _dp(repo_params, noise_multiplier=None, target_epsilon=3.0, epsilon_budget=3.0)
    setup = private_training(dp, owner="site 1", n_images=200, batch_size=20, planned_epochs=5, delta=DELTA)
    planned = 5 * steps_per_epoch(200, 20)
    reached = setup.accountant.projected_epsilon(setup.noise_multiplier, sample_rate(200, 20), planned)
    assert 2.9 < reached <= 3.0
    setup.accountant.check_budget(setup.noise_multiplier, sample_rate(200, 20), planned)
    # more planned steps need more noise for the same target
    longer = private_training(dp, owner="site 1", n_images=200, batch_size=20, planned_epochs=20, delta=DELTA)
    assert longer.noise_multiplier > setup.noise_multiplier
    stricter = private_training(_dp(repo_params, noise_multiplier=None, target_epsilon=1.0, epsilon_budget=1.0),
                                owner="site 1", n_images=200, batch_size=20, planned_epochs=5, delta=DELTA)
    assert stricter.noise_multiplier > setup.noise_multiplier
    assert noise_multiplier_for(_dp(repo_params, noise_multiplier=1.7, target_epsilon=None),
                                delta=DELTA, sample_rate=0.1, steps=10) == 1.7


def test_unreachable_target_epsilon_is_refused(repo_params):
    dp = _dp(repo_params, noise_multiplier=None, target_epsilon=1e-6, epsilon_budget=None)
    with pytest.raises(ConfigError, match=r"privacy\.dp\.target_epsilon"):
        noise_multiplier_for(dp, delta=DELTA, sample_rate=1.0, steps=1000)


def test_sampling_rate_and_epoch_length():
    assert sample_rate(40, 8) == 0.2 and steps_per_epoch(40, 8) == 5
    assert sample_rate(5, 8) == 1.0 and steps_per_epoch(41, 8) == 6


@pytest.mark.parametrize(
    ("mutate", "says"),
    [
        (lambda r: r["privacy"]["dp"].update(enabled=True), "model.norm: group"),
        (lambda r: r["privacy"]["dp"].update(noise_multiplier=1.0), "exactly one of noise_multiplier and target_epsilon"),
        (lambda r: r["privacy"]["dp"].update(target_epsilon=None), "exactly one of noise_multiplier and target_epsilon"),
        (lambda r: r["privacy"]["dp"].update(target_epsilon=10.0, epsilon_budget=5.0), "exceeds epsilon_budget"),
        (lambda r: r["privacy"]["dp"].update(delta=1.5), "privacy.dp.delta"),
        (lambda r: r["privacy"]["dp"].update(target_epsilon=float("inf")), "privacy.dp.target_epsilon"),
        (lambda r: r["privacy"]["sweep"].update(run="nope"), "privacy.sweep.run 'nope'"),
        (lambda r: r["privacy"]["sweep"].update(epsilons=[]), "privacy.sweep.epsilons"),
        (lambda r: r["privacy"]["sweep"].update(epsilons=[8.0, 8.0]), "lists a level twice"),
        (lambda r: r["privacy"]["attack"].update(fprs=[0.0]), "privacy.attack.fprs"),
    ],
)
def test_bad_privacy_params_name_their_key(mutate, says):
    raw = yaml.safe_load(PARAMS_FILE.read_text())
    bad = copy.deepcopy(raw)
    mutate(bad)
    with pytest.raises(ConfigError) as error:
        parse_params(bad, source="params.yaml")
    assert says in str(error.value)


def test_dp_with_group_norm_is_valid():
    raw = yaml.safe_load(PARAMS_FILE.read_text())
    raw["privacy"]["dp"]["enabled"] = True
    raw["model"]["norm"] = "group"
    assert parse_params(raw).privacy.dp.enabled


# --- training --------------------------------------------------------------------------------------


def test_batchnorm_model_is_refused(repo_params):
    images, labels = _data()
    with pytest.raises(ConfigError, match="model.norm: group"):
        train_model(_model(repo_params, norm="batch"), images, labels, _train(repo_params), epochs=1, privacy=_private())


def test_private_training_changes_weights_reports_epsilon_and_leaves_a_plain_model(repo_params):
    images, labels = _data()
    model = _model(repo_params)
    before = copy.deepcopy(model.state_dict())
    inplace = [getattr(module, "inplace", None) for module in model.modules()]
    privacy = _private()

    result = train_model(model, images, labels, _train(repo_params), epochs=2, privacy=privacy)

    assert result.state_dict.keys() == before.keys()
    assert not _states_equal(result.state_dict, before)
    assert all(math.isfinite(record["train_loss"]) for record in result.history)
    assert privacy.accountant.steps == 2 * steps_per_epoch(N_IMAGES, BATCH)
    assert 0 < privacy.accountant.epsilon() < math.inf
    assert not any(hasattr(parameter, "grad_sample") for parameter in model.parameters())
    assert [getattr(module, "inplace", None) for module in model.modules()] == inplace  # in-place ReLUs restored


def test_epsilon_grows_with_rounds_and_the_round_past_the_budget_is_refused(repo_params):
    images, labels = _data()
    params = _train(repo_params)
    one_round = steps_per_epoch(N_IMAGES, BATCH)
    probe = PrivacyAccountant(owner="site 2", delta=DELTA, budget=None)
    budget = (probe.projected_epsilon(1.0, sample_rate(N_IMAGES, BATCH), 2 * one_round)
              + probe.projected_epsilon(1.0, sample_rate(N_IMAGES, BATCH), 3 * one_round)) / 2
    privacy = _private(budget=budget)
    model = _model(repo_params)
    epsilons = []
    for _ in range(2):
        train_model(model, images, labels, params, epochs=1, privacy=privacy)
        epsilons.append(privacy.accountant.epsilon())
    assert 0 < epsilons[0] < epsilons[1] <= budget
    weights = copy.deepcopy(model.state_dict())
    with pytest.raises(PrivacyBudgetError) as error:
        train_model(model, images, labels, params, epochs=1, privacy=privacy)
    assert "site 2" in str(error.value) and "privacy.dp.epsilon_budget" in str(error.value)
    assert _states_equal(model.state_dict(), weights) and privacy.accountant.steps == 2 * one_round


def test_seeded_noise_reproduces_and_secret_noise_differs(repo_params):
    images, labels = _data()
    params = _train(repo_params)

    def weights(noise_seed):
        model = _model(repo_params)
        train_model(model, images, labels, params, epochs=1, privacy=_private(noise_seed=noise_seed))
        return model.state_dict()

    assert _states_equal(weights(0), weights(0))
    assert not _states_equal(weights(0), weights(1))
    assert not _states_equal(weights(None), weights(None))


def test_fedprox_label_smoothing_and_empty_batches_work_under_dp(repo_params):
    """batch_size 1 over 12 images: Poisson sampling leaves some steps empty; they still count."""
    images, labels = _data(12)
    params = _train(repo_params, batch_size=1, label_smoothing=0.1)

    def run(mu):
        model, privacy = _model(repo_params), _private()
        result = train_model(model, images, labels, params, epochs=1, privacy=privacy, proximal_mu=mu)
        return model.state_dict(), result, privacy

    plain, result, privacy = run(0.0)
    proximal, _, _ = run(10.0)
    assert privacy.accountant.steps == 12 and math.isfinite(result.history[0]["train_loss"])
    assert not _states_equal(plain, proximal)


def test_per_sample_gradients_match_one_image_at_a_time(repo_params):
    """The hooks see the shared CBAM MLP twice per image and the in-place ReLUs are switched off."""
    model = _model(repo_params)
    model.dropout.p = 0.0
    model.train()
    batch, targets = torch.rand(4, 3, SIZE, SIZE), torch.tensor([0, 1, 1, 0])
    with _per_sample_gradients(model):
        F.cross_entropy(model(batch), targets).backward()
        per_sample = {name: parameter.grad_sample.clone() for name, parameter in model.named_parameters()}
    for index in range(len(batch)):
        model.zero_grad()
        F.cross_entropy(model(batch[index : index + 1]), targets[index : index + 1]).backward()
        for name, parameter in model.named_parameters():
            torch.testing.assert_close(per_sample[name][index], parameter.grad, atol=1e-5, rtol=1e-4)
