"""Secure aggregation (SecAgg+) in the Flower deployment: the coordinator sees masked updates and their weighted sum only.

Turned on by ``federation.flower.secure_aggregation.enabled``. The crypto is Flower's own: the
coordinator drives :class:`flwr.server.workflow.SecAggPlusWorkflow` over the same grid as
:class:`.flower_apps.FlowerTransport`, and each site answers through
:func:`flwr.client.mod.secaggplus_mod`, which calls :func:`legacy_fit` (the legacy ``fitins`` /
``fitres`` message format that the mod expects) around the same :meth:`.site.Site.fit`; the
ClientApp's ``train`` handler sends a message there when :func:`is_secure` says so.

Per round and selected site, the protocol's four stages (setup, share keys, collect masked vectors,
unmask) each cost one message exchange. A site clips every exchanged entry of its trained model to
``[-clipping_range, clipping_range]``, multiplies it by its weight ``n_i / max_weight`` (itself
quantized), quantizes it stochastically to ``quantization_range`` levels, and adds pairwise masks
(which cancel in the sum) and a private mask (removed at unmasking from secret shares). The
coordinator can therefore compute ``sum(n_i w_i) / sum(n_i)`` and nothing about any single ``w_i``.
Rounding error per entry of the average: at most ``N * 2 * clipping_range / quantization_range /
sum(r_i)`` with ``r_i = n_i / max_weight`` (plus the relative error ``<= 1 / (2 * r_i *
quantization_range)`` of each quantized weight), so ``max_weight`` should be close to the largest site.

What still travels in the clear: each site's sample count (``num_examples``) and its training loss
and accuracy (scalars, as in the plain deployment), and, as always, the global model the
coordinator sends out and the per-site evaluation scores. Hidden: every site's trained weights.

Consequences for the round loop (:func:`.engine.run_federation`): the transport returns one
:class:`.engine.AggregatedFit` instead of per-site replies. The coordinator cannot check a single site's
update for NaN/inf or shape; a site checks its own update before masking and drops out of the round
when it fails (the protocol then removes its masks via the other sites' shares), and the engine
checks the sum and records ``secure_aggregation: true`` in the round. A dropped site is recorded as
rejected with the reason :data:`.engine.SECURE_DROPOUT`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key as WorkflowKey

from leukofed.config import Params, SecureAggregationParams, TrainParams
from leukofed.errors import ConfigError
from leukofed.federation.engine import AggregatedFit
from leukofed.federation.site import FitInstruction, Site

TRAIN_METRICS = ("train_loss", "train_accuracy")  # what a site reports in the clear next to its masked update


class SiteUpdateError(RuntimeError):
    """A site's update cannot be masked (training failed, or NaN/inf): the site drops out of the round."""


# --- The hospital side ---------------------------------------------------------------------------------------------

def is_secure(message: Message) -> bool:
    """Whether a train message belongs to the SecAgg+ protocol (it carries the protocol's config record)."""
    return RECORD_KEY_CONFIGS in message.content.config_records


def legacy_fit(site: Site, model: torch.nn.Module, message: Message) -> RecordDict:
    """:meth:`.site.Site.fit` on a legacy ``fitins`` message; returns the ``fitres`` record for secaggplus_mod.

    Raises
    ------
    SiteUpdateError
        If training failed or the update holds NaN/inf: it must not be masked into the sum.
    """
    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    config = fitins.config
    keys = json.loads(str(config["keys"]))
    arrays = parameters_to_ndarrays(fitins.parameters)
    instruction = FitInstruction(
        round=int(config["round"]), entries={key: torch.tensor(array) for key, array in zip(keys, arrays, strict=True)},
        train=TrainParams.model_validate_json(str(config["train"])), epochs=int(config["epochs"]),
        proximal_mu=float(config["proximal-mu"]), local_keys=frozenset(json.loads(str(config["local-keys"]))),
    )
    reply = site.fit(model, instruction)
    if reply.failure is not None:
        raise SiteUpdateError(f"site {site.number}: {reply.failure}")
    order = json.loads(str(config["reply-keys"]))
    update = [reply.entries[key].detach().cpu().numpy() for key in order]
    if not all(np.isfinite(array).all() for array in update):
        raise SiteUpdateError(f"site {site.number}: its update holds NaN or inf")
    metrics = {key: float(reply.metrics[key]) for key in TRAIN_METRICS if key in reply.metrics}
    return compat.fitres_to_recorddict(FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), reply.num_examples,
                                              metrics), keep_input=True)


# --- The coordinator side ------------------------------------------------------------------------------------------

class _Collector(Strategy):
    """The legacy strategy the workflow needs: hands out the prepared instructions and keeps the unmasked result."""

    def __init__(self, fitins: Mapping[GridClientProxy, FitIns]) -> None:
        self._fitins = fitins
        self.average: list[np.ndarray] | None = None
        self.results: list[tuple[GridClientProxy, FitRes]] = []

    def configure_fit(self, server_round, parameters, client_manager):
        return list(self._fitins.items())

    def aggregate_fit(self, server_round, results, failures):
        """``results``' parameters are already the unmasked weighted average (the workflow put it into each)."""
        self.results = list(results)
        if results:
            self.average = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _ObservedGrid:
    """The grid as the workflow uses it, noting the bytes of every masked vector a site sends."""

    def __init__(self, grid) -> None:
        self._grid = grid
        self.masked_bytes: dict[int, int] = {}

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.common.secure_aggregation.secaggplus_constants import Key

        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if not reply.has_error() and Key.MASKED_PARAMETERS in reply.content.config_records.get(RECORD_KEY_CONFIGS, {}):
                masked = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
                self.masked_bytes[reply.metadata.src_node_id] = sum(len(chunk) for chunk in masked)
        return replies


def check_secure_aggregation(settings: SecureAggregationParams, n_train: Mapping[int, int], min_sites: int) -> None:
    """Refuse settings under which SecAgg+ cannot work or would overflow.

    Raises
    ------
    ConfigError
        If a site holds more training images than ``max_weight``, or ``federation.min_sites`` is
        below ``reconstruction_threshold`` (a round with fewer sites cannot be unmasked).
    """
    key = "federation.flower.secure_aggregation"
    largest = max(n_train.values())
    if largest > settings.max_weight:
        raise ConfigError(f"{key}.max_weight={settings.max_weight:g} is below the largest site's training-set size "
                          f"({largest}): the masked sums could overflow; raise it to at least {largest}")
    if min_sites < settings.reconstruction_threshold:
        raise ConfigError(f"federation.min_sites={min_sites} is below {key}.reconstruction_threshold="
                          f"{settings.reconstruction_threshold}: a round with fewer sites cannot be unmasked; raise min_sites")


def secure_fit(grid, node_ids: Mapping[int, int], instructions: Mapping[int, FitInstruction], params: Params,
               settings_json: str, reply_keys: Mapping[str, torch.dtype]) -> AggregatedFit:
    """One round of local training with SecAgg+ over ``grid``: Flower's workflow, our instructions.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
    node_ids : mapping of int to int
        Site number -> the SuperNode serving it.
    instructions : mapping of int to FitInstruction
        The selected sites' instructions (at least two sites: SecAgg+ needs a crowd).
    params : Params
        ``federation.flower`` (secure aggregation settings, round timeout).
    settings_json : str
        :class:`.flower_apps.SiteSettings` as JSON: what a site needs to load its data.
    reply_keys : mapping of str to torch.dtype
        The entries each site returns, in this order (every exchanged entry of the model), and their dtypes.
    """
    flower = params.federation.flower
    settings = flower.secure_aggregation
    if len(instructions) < settings.reconstruction_threshold:
        raise ConfigError(f"{len(instructions)} site(s) selected, fewer than federation.flower.secure_aggregation."
                          f"reconstruction_threshold={settings.reconstruction_threshold}: raise federation.fraction_fit")
    numbers = {node_ids[number]: number for number in instructions}
    proxies, fitins = {}, {}
    for number, item in instructions.items():
        keys = list(item.entries)
        config = {"params": settings_json, "round": item.round, "train": item.train.model_dump_json(), "epochs": item.epochs,
                  "proximal-mu": float(item.proximal_mu), "local-keys": json.dumps(sorted(item.local_keys)),
                  "keys": json.dumps(keys), "reply-keys": json.dumps(list(reply_keys))}
        parameters: Parameters = ndarrays_to_parameters([item.entries[key].detach().cpu().numpy() for key in keys])
        proxy = GridClientProxy(node_ids[number], grid, run_id=0)
        proxies[number], fitins[proxy] = proxy, FitIns(parameters, config)
    collector = _Collector(fitins)
    round_number = next(iter(instructions.values())).round
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=round_number), strategy=collector,
                            client_manager=SimpleClientManager())
    context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_number})
    context.state[MAIN_PARAMS_RECORD] = ArrayRecord()
    observed = _ObservedGrid(grid)
    workflow = SecAggPlusWorkflow(
        num_shares=settings.num_shares, reconstruction_threshold=settings.reconstruction_threshold,
        max_weight=settings.max_weight, clipping_range=settings.clipping_range,
        quantization_range=settings.quantization_range, timeout=flower.round_timeout_s,
    )
    workflow(observed, context)
    if collector.average is None:
        return AggregatedFit(None, [])
    accepted = sorted(numbers[proxy.node_id] for proxy, _ in collector.results)
    results = {numbers[proxy.node_id]: result for proxy, result in collector.results}
    entries = {key: torch.from_numpy(np.asarray(array)).to(dtype)  # dequantized in float64: back to the model's dtype
               for (key, dtype), array in zip(reply_keys.items(), collector.average, strict=True)}
    return AggregatedFit(
        entries, accepted,
        num_examples={number: int(results[number].num_examples) for number in accepted},
        metrics={number: {key: float(value) for key, value in results[number].metrics.items()} for number in accepted},
        bytes_received={number: observed.masked_bytes.get(node_ids[number], 0) for number in accepted},
    )

