"""Secure aggregation (SecAgg+) over the in-memory grid: the sum equals FedAvg, a single masked update reveals nothing."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.common import bytes_to_ndarray
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from pydantic import ValidationError

from leukofed.config import SecureAggregationParams
from leukofed.errors import ConfigError
from leukofed.federation.aggregation import exchanged_keys, weighted_average
from leukofed.federation.engine import SECURE_DROPOUT, AggregatedFit, run_federation
from leukofed.federation.flower_apps import FlowerTransport
from leukofed.federation.secagg import check_secure_aggregation
from leukofed.federation.site import FitInstruction, Site

from conftest import N_SITES, ROUNDS
from test_flower_apps import InMemoryGrid, _fresh_model, _node_config, task_identity  # noqa: F401 (fixture)

MAX_WEIGHT = 64  # above every tiny site's training-set size, close to it (keeps the weight quantization fine)


class SecAggGrid(InMemoryGrid):
    """The in-memory grid with the blocking exchange SecAggPlusWorkflow uses; keeps every masked vector it carries."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.masked: dict[int, np.ndarray] = {}  # node -> its masked vector as the coordinator receives it
        self.received = []  # every reply of the protocol's exchanges

    def _deliver(self, message):
        message = message_from_proto(message_to_proto(message))  # serialized as on the wire: the workflow shares content
        super()._deliver(message)
        reply = self.replies[message.metadata.message_id]
        reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id  # as a SuperLink stamps it

    def send_and_receive(self, messages, *, timeout=None):
        replies = self.pull_messages(self.push_messages(list(messages)))
        self.received += replies
        for reply in replies:
            configs = reply.content.config_records.get(RECORD_KEY_CONFIGS, {}) if not reply.has_error() else {}
            if Key.MASKED_PARAMETERS in configs:
                arrays = [bytes_to_ndarray(chunk) for chunk in configs[Key.MASKED_PARAMETERS]]
                self.masked[reply.metadata.src_node_id] = np.concatenate([array.ravel() for array in arrays[1:]])  # [0]: weight
        return replies


def _params(tiny_federation, *, secure: bool, **changes):
    params = tiny_federation.params
    secagg = params.federation.flower.secure_aggregation.model_copy(update={"enabled": secure, "max_weight": MAX_WEIGHT})
    flower = params.federation.flower.model_copy(update={"secure_aggregation": secagg})
    federation = params.federation.model_copy(update={"flower": flower, **changes})
    return params.model_copy(update={"federation": federation})


def _transport(tiny_federation, params, broken=None):
    grid = SecAggGrid({100 + site: _node_config(tiny_federation, site) for site in range(1, N_SITES + 1)}, broken)
    transport = FlowerTransport(grid, N_SITES, params)
    transport.connect()
    return transport, grid


def _instructions(params) -> dict[int, FitInstruction]:
    state = _fresh_model(params).state_dict()
    sent = {key: state[key] for key in exchanged_keys(state)}
    return {site: FitInstruction(1, sent, params.train.model_copy(update={"seed": 10 + site, "lr_schedule": "constant"}), 1, 0.0)
            for site in range(1, N_SITES + 1)}


def test_the_secure_sum_equals_fedavg_and_one_masked_update_reveals_nothing(tiny_federation):
    plain_params, secure_params = _params(tiny_federation, secure=False), _params(tiny_federation, secure=True)
    instructions = _instructions(plain_params)
    plain, _ = _transport(tiny_federation, plain_params)
    replies = plain.fit(instructions)
    keys = exchanged_keys(replies[1].entries)
    expected = weighted_average([replies[n].entries for n in sorted(replies)], [replies[n].num_examples for n in sorted(replies)],
                                keys)

    secure, grid = _transport(tiny_federation, secure_params)
    result = secure.fit(instructions)
    assert isinstance(result, AggregatedFit) and result.accepted == [1, 2, 3]
    assert result.num_examples == {n: replies[n].num_examples for n in replies}
    assert all(result.metrics[n] == replies[n].metrics for n in replies)  # scalars in the clear, as documented

    # (a) within the quantization bound: each site's rounding error <= 2c/Q, weights quantized to 1/Q, sum divided by sum(r)
    settings = secure_params.federation.flower.secure_aggregation
    c, q = settings.clipping_range, settings.quantization_range
    ratios = np.array([replies[n].num_examples for n in sorted(replies)]) / settings.max_weight
    largest = max(float(expected[key].abs().max()) for key in keys)
    assert largest < c  # nothing clipped: the bound below applies
    bound = N_SITES * (2 * c / q + largest / q) / ratios.sum()
    errors = torch.cat([(result.entries[key].double() - expected[key].double()).abs().ravel() for key in keys])
    assert set(result.entries) == set(keys) and all(result.entries[key].dtype == expected[key].dtype for key in keys)
    assert 0 < float(errors.max()) <= bound

    # (b) what the coordinator holds of site 1 is uncorrelated with its true update (thousands of entries)
    true = torch.cat([replies[1].entries[key].double().ravel() for key in keys]).numpy()
    masked = grid.masked[101].astype(np.float64)
    assert masked.shape == true.shape and true.size > 1000
    assert abs(np.corrcoef(masked, true)[0, 1]) < 5 / np.sqrt(true.size)
    assert grid.received and not any(len(record) for reply in grid.received for record in reply.content.array_records.values())


def test_a_secure_federation_runs_rounds_and_drops_a_failing_site(tiny_federation, tmp_path, monkeypatch):
    params = _params(tiny_federation, secure=True)
    transport, _ = _transport(tiny_federation, params)
    result = run_federation(_fresh_model(params), transport, params.federation.runs["fedavg-3"], params.federation, params.train,
                            checkpoint_dir=tmp_path / "ok", data_key="tiny")
    assert len(result.records) == ROUNDS and all(record["secure_aggregation"] for record in result.records)
    assert all(record["accepted"] == [1, 2, 3] and record["sites"][1]["bytes_received"] > 0 for record in result.records)
    assert all(record["sites"][2]["train_loss"] is not None for record in result.records)

    fit = Site.fit

    def nan_at_site_2(site, model, instruction):  # site 2's update turns non-finite: it must not enter the masked sum
        reply = fit(site, model, instruction)
        entries = {key: torch.full_like(value, float("nan")) for key, value in reply.entries.items()}
        return replace(reply, entries=entries) if site.number == 2 else reply

    monkeypatch.setattr(Site, "fit", nan_at_site_2)
    transport, _ = _transport(tiny_federation, params)
    record = run_federation(_fresh_model(params), transport, params.federation.runs["fedavg-3"], params.federation,
                            params.train, checkpoint_dir=tmp_path / "drop", data_key="tiny").records[0]
    assert record["accepted"] == [1, 3] and record["rejected"] == {2: SECURE_DROPOUT}


def test_secure_aggregation_settings_that_cannot_work_are_refused(tiny_federation):
    settings = _params(tiny_federation, secure=True).federation.flower.secure_aggregation
    with pytest.raises(ConfigError, match="max_weight=5 is below the largest site's training-set size \\(9\\)"):
        check_secure_aggregation(settings.model_copy(update={"max_weight": 5}), {1: 9, 2: 3}, 2)
    with pytest.raises(ConfigError, match="federation.min_sites=1 is below .*reconstruction_threshold=2"):
        check_secure_aggregation(settings, {1: 9, 2: 3}, 1)
    with pytest.raises(ValidationError, match="exceeds num_shares"):
        SecureAggregationParams.model_validate(settings.model_dump() | {"reconstruction_threshold": 4, "num_shares": 3})
    with pytest.raises(ConfigError, match="min_sites=1 is below"):
        _transport(tiny_federation, _params(tiny_federation, secure=True, min_sites=1))
