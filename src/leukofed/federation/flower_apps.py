"""Flower (1.42, Message API) ClientApp and ServerApp: one SuperNode per hospital, a coordinator that never sees images.

Both apps are thin wrappers. The ClientApp answers the coordinator with :class:`.site.Site`, the code
every in-process site runs; the ServerApp runs the same round loop as the in-process engine
(:func:`.engine.run_federation`) through :class:`FlowerTransport`, and records it like the
``federate`` stage (:func:`.runner.federate_and_record`: MLflow parent run with a nested run per
site, ``model.pt``, ``final_model.pt``, ``rounds.csv``, ``federation.json``). Only the ServerApp
writes MLflow.

Messages (every reply carries only model arrays and scalar metrics, never images):

- ``query``: the ServerApp's settings for the sites (``params``: JSON of the params sections a site
  needs) -> ``site``: the site's number, local train/validation sizes, classes, image size and a
  fingerprint of its data (hashes, not content). Sent once to every SuperNode when the run starts.
- ``train``: ``arrays`` (the global entries) + ``config`` (round, local training settings with the
  round's learning rate and the site's seed, epochs, FedProx mu) -> ``arrays`` (every floating-point
  entry of the trained model) + ``metrics`` (``train_loss``, ``train_accuracy``, ``num-examples``),
  or ``metrics`` (``num-examples``) + ``failure`` (the reason) when training failed.
- ``evaluate``: ``arrays`` (the whole global model) -> ``metrics`` (``loss``, ``accuracy``, ``num-examples``).

Run config (``[tool.flwr.app.config]`` of ``deploy/flower/pyproject.toml``; override with
``flwr run ... --run-config 'key="value"'``): ``params`` (path of params.yaml), ``run`` (an entry of
``federation.runs``), ``dataset`` (name for MLflow and the outputs; empty: the params' ``dataset``),
``out-dir`` (empty: ``results/<dataset>/flower/<run>``). Relative paths resolve against the
SuperLink's working directory, where the ServerApp runs.

Node config (``flower-supernode --node-config``): ``site=<n>`` and either ``data-dir="<folder>"
work-dir="<folder>"`` (a hospital's images in the official layout ``Original/<Class>/*.jpg``:
validated and cached into the work folder when a run starts, then split group-aware into local
train and validation parts) or ``cache="<cache folder>" partition="<partition.csv>"`` (a site of a
partitioned shared cache, for local trials).

Secure aggregation (``federation.flower.secure_aggregation.enabled``): ``train`` messages then follow
Flower's SecAgg+ protocol instead (:mod:`.secagg`); ``query`` and ``evaluate`` are unchanged.

Site-held state (FedBN's BatchNorm entries) lives in the SuperNode's context of the run; a run that
is resumed from the coordinator's checkpoint starts it afresh (in-process runs checkpoint it).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from leukofed.config import (
    DataParams,
    DatasetSpec,
    DownloadParams,
    ModelParams,
    Params,
    PartitionParams,
    RuntimeParams,
    TrainParams,
)
from leukofed.errors import ConfigError, DataError, LeukofedError
from leukofed.federation.engine import AggregatedFit
from leukofed.federation.site import FitInstruction, FitReply, Site, SiteData, SiteEvaluation, SiteInfo
from leukofed.provenance import DataProvenance

QUERY, TRAIN, EVALUATE = "query", "train", "evaluate"
NUM_EXAMPLES = "num-examples"  # the MetricRecord key Flower's strategies weight by
SITE_STATE = "leukofed-site"  # context.state record of the site's state between messages
LEGACY_FIT_CONFIG = "fitins.config"  # where a SecAgg+ train message (legacy format) carries its config
SITE_SECTIONS = ("data", "download", "partition", "model", "runtime")  # params sections a site needs
POLL_SECONDS = 1.0  # how often the ServerApp looks for SuperNodes while it waits for them
PULL_SECONDS = 0.5  # how often the ServerApp asks the SuperLink for replies (a cheap local request)
# Node config keys
SITE_KEY, CACHE_KEY, PARTITION_KEY, DATA_DIR_KEY, WORK_DIR_KEY = "site", "cache", "partition", "data-dir", "work-dir"
NODE_CONFIG_HELP = (
    'give each SuperNode --node-config \'site=<n> data-dir="<hospital folder>" work-dir="<folder>"\' '
    'or, for a local trial, \'site=<n> cache="<cache folder>" partition="<partition.csv>"\''
)


# --- What a site needs to know, sent with every message (each message runs in a fresh ClientApp process) ----------

@dataclass(frozen=True)
class SiteSettings:
    """The params sections a site works with, as the coordinator sent them."""

    data: DataParams
    download: DownloadParams
    partition: PartitionParams
    model: ModelParams
    runtime: RuntimeParams

    @classmethod
    def from_params(cls, params: Params) -> SiteSettings:
        return cls(**{name: getattr(params, name) for name in SITE_SECTIONS})

    def to_json(self) -> str:
        return json.dumps({name: getattr(self, name).model_dump() for name in SITE_SECTIONS})

    @classmethod
    def from_json(cls, text: str) -> SiteSettings:
        raw = json.loads(text)
        types = {"data": DataParams, "download": DownloadParams, "partition": PartitionParams, "model": ModelParams,
                 "runtime": RuntimeParams}
        return cls(**{name: types[name].model_validate(raw[name]) for name in SITE_SECTIONS})


# --- The hospital side ---------------------------------------------------------------------------------------------

def _node_value(node_config: Mapping, key: str) -> str | None:
    value = node_config.get(key)
    return None if value is None else str(value)


def site_number(node_config: Mapping) -> int:
    """The ``site=<n>`` of a SuperNode's node config."""
    raw = _node_value(node_config, SITE_KEY)
    if raw is None or not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"--node-config: site={raw!r} is not a site number >= 1; {NODE_CONFIG_HELP}")
    return int(raw)


def _existing(node_config: Mapping, key: str, *, folder: bool) -> Path:
    raw = _node_value(node_config, key)
    if raw is None:
        raise ConfigError(f"--node-config: {key}=... is missing; {NODE_CONFIG_HELP}")
    path = Path(raw).expanduser()
    if not (path.is_dir() if folder else path.is_file()):
        raise DataError(f"--node-config {key}={raw}: no such {'folder' if folder else 'file'} on this SuperNode; fix the path")
    return path


def load_site_data(node_config: Mapping, settings: SiteSettings, *, prepare: bool) -> tuple[SiteData, DataProvenance]:
    """This SuperNode's local data and its provenance, from its node config.

    Parameters
    ----------
    node_config : mapping
        ``site`` and either ``cache`` + ``partition`` or ``data-dir`` + ``work-dir``.
    settings : SiteSettings
    prepare : bool
        With ``data-dir``: validate the hospital's folder and (re)build its cache in ``work-dir`` when
        its content changed (done when a run starts); otherwise use the cache already there.

    Raises
    ------
    ConfigError, DataError
        Naming the node-config key and path that cannot be used.
    """
    number = site_number(node_config)
    if CACHE_KEY in node_config or PARTITION_KEY in node_config:
        return _partition_site(number, _existing(node_config, CACHE_KEY, folder=True),
                               _existing(node_config, PARTITION_KEY, folder=False), settings)
    if DATA_DIR_KEY in node_config:
        data_dir = _existing(node_config, DATA_DIR_KEY, folder=True)
        work_raw = _node_value(node_config, WORK_DIR_KEY)
        if work_raw is None:
            raise ConfigError(f"--node-config: {WORK_DIR_KEY}=... is missing (where this site caches its validated images); "
                              f"{NODE_CONFIG_HELP}")
        return _folder_site(number, data_dir, Path(work_raw).expanduser(), settings, prepare)
    raise ConfigError(f"--node-config names no data; {NODE_CONFIG_HELP}")


def _partition_site(number: int, cache_dir: Path, partition_path: Path, settings: SiteSettings) -> tuple[SiteData, DataProvenance]:
    """Site ``number`` of a partition of a shared cache (local trials)."""
    from leukofed.data.cache import load_cache
    from leukofed.data.partition import read_partition
    from leukofed.federation.site import site_from_partition

    cache = load_cache(cache_dir)
    _check_cache_fits(cache, settings.data, cache_dir)
    data = site_from_partition(cache, read_partition(partition_path), partition_path, number)
    digest = hashlib.sha256(f"{cache.provenance.fingerprint}\n{number}\n".encode() + partition_path.read_bytes())
    provenance = DataProvenance(cache.provenance.dataset, cache.provenance.source,
                                f"{cache.provenance.location} (site {number} of {partition_path.name})",
                                digest.hexdigest(), data.n_train + data.n_val)
    return data, provenance


def _folder_site(number: int, data_dir: Path, work_dir: Path, settings: SiteSettings, prepare: bool) -> tuple[SiteData, DataProvenance]:
    """A hospital's own folder: validated and cached in ``work_dir``, split into local train/val by duplicate groups."""
    from leukofed.data.acquire import acquire, load_source
    from leukofed.data.cache import build_cache, load_cache
    from leukofed.data.partition import assign_parts

    cache_dir = work_dir / "cache"
    if prepare:
        provenance = acquire(f"site-{number}", DatasetSpec(source="folder", path=str(data_dir)), settings.data,
                             settings.download, work_dir / "source")
        current = _cached_provenance(cache_dir)
        if current is None or current.fingerprint != provenance.fingerprint or not _cache_matches(cache_dir, settings.data):
            root, manifest, source = load_source(work_dir / "source")
            build_cache(root, manifest, source, settings.data, cache_dir)
    elif not cache_dir.is_dir():
        raise DataError(f"--node-config {WORK_DIR_KEY}={work_dir}: holds no validated cache; restart the run so the site prepares it")
    cache = load_cache(cache_dir)
    _check_cache_fits(cache, settings.data, cache_dir)
    labels = cache.index["label_index"].to_numpy()
    rng = np.random.default_rng([settings.partition.seed, number])
    parts = assign_parts(labels, cache.index["group"].to_numpy(), settings.partition.site_val_fraction, len(cache.classes), rng)
    train, val = (np.flatnonzero(parts == name) for name in ("train", "val"))
    if not len(train) or not len(val):
        raise DataError(f"--node-config {DATA_DIR_KEY}={data_dir}: {len(parts)} valid images are too few for a local train and "
                        f"validation part (partition.site_val_fraction={settings.partition.site_val_fraction:g})")
    data = SiteData(number, np.asarray(cache.images[train]), labels[train], np.asarray(cache.images[val]), labels[val])
    return data, cache.provenance


def _cached_provenance(cache_dir: Path) -> DataProvenance | None:
    from leukofed.data.cache import META_FILE
    from leukofed.io import read_json

    try:
        return DataProvenance.from_dict(read_json(cache_dir / META_FILE)["provenance"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _cache_matches(cache_dir: Path, data: DataParams) -> bool:
    from leukofed.data.cache import META_FILE
    from leukofed.io import read_json

    meta = read_json(cache_dir / META_FILE)
    return meta.get("image_size") == data.image_size and meta.get("classes") == data.classes


def _check_cache_fits(cache, data: DataParams, cache_dir: Path) -> None:
    if cache.classes != data.classes:
        raise DataError(f"{cache_dir}: holds classes {cache.classes}, but the federation trains on {data.classes}")
    if int(cache.meta["image_size"]) != data.image_size:
        raise DataError(f"{cache_dir}: cached at {cache.meta['image_size']} px, but the federation trains at "
                        f"{data.image_size} px (data.image_size); rebuild the cache at that size")


def _settings(message: Message) -> SiteSettings:
    config = message.content["config"] if "config" in message.content else message.content[LEGACY_FIT_CONFIG]
    return SiteSettings.from_json(str(config["params"]))


def _site(message: Message, context: Context, *, prepare: bool = False) -> tuple[Site, SiteSettings, DataProvenance]:
    """The site this SuperNode serves, with the state it kept from earlier messages of the run; torch configured."""
    from leukofed.training import configure_torch

    settings = _settings(message)
    configure_torch(settings.runtime.threads, seed=0)  # deterministic kernels; the weights come from the server
    data, provenance = load_site_data(context.node_config, settings, prepare=prepare)
    site = Site(data)
    if SITE_STATE in context.state:
        site.load_state_dict(torch.load(io.BytesIO(context.state[SITE_STATE]["state"]), weights_only=True))
    return site, settings, provenance


def _model(settings: SiteSettings):
    from leukofed.model import build_model

    return build_model(settings.model, len(settings.data.classes))


client_app = ClientApp()


@client_app.query()
def query(message: Message, context: Context) -> Message:
    """Prepare the site's data and tell the coordinator who it is: number, sizes, classes, data fingerprint."""
    site, settings, provenance = _site(message, context, prepare=True)
    info = ConfigRecord({
        "number": site.number, "n_train": site.data.n_train, "n_val": site.data.n_val,
        "classes": list(settings.data.classes), "image_size": int(site.data.train_images.shape[1]),
        "dataset": provenance.dataset, "source": provenance.source, "fingerprint": provenance.fingerprint,
    })
    return Message(RecordDict({"site": info}), reply_to=message)


@client_app.train()
def train(message: Message, context: Context) -> Message:
    """Local training from the received global entries: :meth:`.site.Site.fit` (SecAgg+: through Flower's secaggplus_mod)."""
    from leukofed.federation.secagg import is_secure

    if is_secure(message):
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(message, context, _secure_fit)
    site, settings, _ = _site(message, context)
    config = message.content["config"]
    instruction = FitInstruction(
        round=int(config["round"]), entries=message.content["arrays"].to_torch_state_dict(),
        train=TrainParams.model_validate_json(config["train"]), epochs=int(config["epochs"]),
        proximal_mu=float(config["proximal-mu"]), local_keys=frozenset(config["local-keys"]),
    )
    reply = site.fit(_model(settings), instruction)
    _keep_site_state(site, context)
    metrics = MetricRecord({**reply.metrics, NUM_EXAMPLES: reply.num_examples})
    if reply.failure is not None:
        return Message(RecordDict({"metrics": metrics, "failure": ConfigRecord({"reason": reply.failure})}), reply_to=message)
    return Message(RecordDict({"arrays": ArrayRecord(reply.entries), "metrics": metrics}), reply_to=message)


def _keep_site_state(site: Site, context: Context) -> None:
    buffer = io.BytesIO()
    torch.save(site.state_dict(), buffer)
    context.state[SITE_STATE] = ConfigRecord({"state": buffer.getvalue()})  # kept by the SuperNode for the run


def _secure_fit(message: Message, context: Context) -> Message:
    """The training step of SecAgg+ (called by secaggplus_mod, which masks the reply's arrays)."""
    from leukofed.federation.secagg import legacy_fit

    site, settings, _ = _site(message, context)
    content = legacy_fit(site, _model(settings), message)
    _keep_site_state(site, context)
    return Message(content, reply_to=message)


@client_app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """The global model on the local validation part: :meth:`.site.Site.evaluate`."""
    site, settings, _ = _site(message, context)
    result = site.evaluate(_model(settings), message.content["arrays"].to_torch_state_dict(),
                           batch_size=int(message.content["config"]["batch-size"]))
    return Message(RecordDict({"metrics": MetricRecord({"loss": result.loss, "accuracy": result.accuracy,
                                                         NUM_EXAMPLES: result.n})}), reply_to=message)


# --- The coordinator side ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RemoteSite:
    """What a SuperNode said of its site in reply to ``query``."""

    node_id: int
    info: SiteInfo
    classes: list[str]
    image_size: int
    dataset: str
    source: str
    fingerprint: str


class FlowerTransport:
    """The sites behind a Flower Grid: each round's instructions go out as messages, replies come back as records.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
    n_sites : int
        The run's site count: the transport waits for SuperNodes serving sites ``1..n_sites``.
    params : Params
        What the sites need (:class:`SiteSettings`) and ``federation.flower`` (timeouts).
    """

    def __init__(self, grid: Grid, n_sites: int, params: Params) -> None:
        self._grid = grid
        self._n_sites = n_sites
        self._flower = params.federation.flower
        self._expected = (list(params.data.classes), params.data.image_size)
        self._settings = SiteSettings.from_params(params).to_json()
        self._remote: dict[int, RemoteSite] = {}  # site number -> the SuperNode serving it
        self._params = params
        self._round = 0

    def connect(self) -> list[RemoteSite]:
        """Wait for the SuperNodes, ask each which site it serves, and check that sites ``1..n`` are there once each.

        Raises
        ------
        LeukofedError
            If too few SuperNodes connect within ``federation.flower.connect_timeout_s``, a site
            cannot load its data, a site number is missing or taken twice, or a site's classes or
            image size differ from the federation's.
        """
        deadline = time.monotonic() + self._flower.connect_timeout_s
        nodes = set(self._grid.get_node_ids())
        while len(nodes) < self._n_sites and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
            nodes = set(self._grid.get_node_ids())
        if len(nodes) < self._n_sites:
            raise LeukofedError(
                f"only {len(nodes)} of {self._n_sites} SuperNodes connected within federation.flower.connect_timeout_s="
                f"{self._flower.connect_timeout_s:g} s; start (and register) the missing hospitals' SuperNodes and rerun"
            )
        found = self._query(nodes)
        numbers = sorted(site.info.number for site in found)
        twice = sorted({number for number in numbers if numbers.count(number) > 1})
        missing = sorted(set(range(1, self._n_sites + 1)) - set(numbers))
        unknown = sorted(set(numbers) - set(range(1, self._n_sites + 1)))
        if twice or missing or unknown:
            raise LeukofedError(
                f"the SuperNodes serve sites {numbers}, but the run needs sites 1..{self._n_sites} once each"
                f"{f'; taken twice: {twice}' if twice else ''}{f'; missing: {missing}' if missing else ''}"
                f"{f'; unknown: {unknown}' if unknown else ''}: fix the site=<n> of their --node-config"
            )
        self._remote = {site.info.number: site for site in found}
        if self._flower.secure_aggregation.enabled:
            from leukofed.federation.secagg import check_secure_aggregation

            check_secure_aggregation(self._flower.secure_aggregation, {site.info.number: site.info.n_train for site in found},
                                     self._params.federation.min_sites)
        return [self._remote[number] for number in sorted(self._remote)]

    def _query(self, nodes: set[int]) -> list[RemoteSite]:
        messages = {node: Message(RecordDict({"config": ConfigRecord({"params": self._settings})}), dst_node_id=node,
                                  message_type=QUERY, ttl=self._flower.round_timeout_s) for node in sorted(nodes)}
        replies = self._exchange(messages)
        problems = [f"node {node}: {'no reply' if reply is None else reply.error.reason}"
                    for node, reply in replies.items() if reply is None or reply.has_error()]
        if problems:
            raise LeukofedError("SuperNodes could not describe their site:\n  " + "\n  ".join(problems))
        found = []
        for node, reply in replies.items():
            site = reply.content["site"]
            remote = RemoteSite(node, SiteInfo(int(site["number"]), int(site["n_train"]), int(site["n_val"])),
                                list(site["classes"]), int(site["image_size"]), str(site["dataset"]), str(site["source"]),
                                str(site["fingerprint"]))
            if (remote.classes, remote.image_size) != self._expected:
                raise LeukofedError(
                    f"site {remote.info.number} (node {node}) has classes {remote.classes} at {remote.image_size} px; the "
                    f"federation trains on {self._expected[0]} at {self._expected[1]} px (data.classes, data.image_size)"
                )
            found.append(remote)
        return found

    def _exchange(self, messages: dict) -> dict[object, Message | None]:
        """Send ``key -> message``; return ``key -> reply`` (None: no reply within the round timeout).

        Pushes, then pulls every :data:`PULL_SECONDS` (``Grid.send_and_receive`` waits 3 s between
        pulls, which adds seconds to every phase of every round).
        """
        keys = list(messages)
        pushed = list(self._grid.push_messages([messages[key] for key in keys]))  # None (or nothing): not pushed
        ids = {key: message_id for key, message_id in zip(keys, pushed) if message_id}
        waiting = set(ids.values())
        replies: dict[str, Message] = {}
        deadline = time.monotonic() + self._flower.round_timeout_s
        while waiting and time.monotonic() < deadline:
            for reply in self._grid.pull_messages(list(waiting)):
                replies[reply.metadata.reply_to_message_id] = reply
                waiting.discard(reply.metadata.reply_to_message_id)
            if waiting:
                time.sleep(PULL_SECONDS)
        return {key: replies.get(ids.get(key)) for key in keys}

    def _live(self, numbers) -> list[int]:
        """The sites among ``numbers`` whose SuperNode is online (a gone node cannot answer: skip it)."""
        online = set(self._grid.get_node_ids())
        gone = [number for number in numbers if self._remote[number].node_id not in online]
        if gone:
            log(WARNING, "sites %s: their SuperNodes are offline; recorded as 'no reply'", gone)
        return [number for number in numbers if number not in gone]

    def _message(self, number: int, kind: str, arrays: dict, config: dict) -> Message:
        content = RecordDict({"arrays": ArrayRecord(arrays),
                              "config": ConfigRecord({"params": self._settings, **config})})
        return Message(content, dst_node_id=self._remote[number].node_id, message_type=kind,
                       group_id=str(self._round), ttl=self._flower.round_timeout_s)

    def sites(self) -> list[SiteInfo]:
        return [self._remote[number].info for number in sorted(self._remote)]

    def fit(self, instructions: Mapping[int, FitInstruction]) -> dict[int, FitReply]:
        if not instructions:
            return {}
        self._round = next(iter(instructions.values())).round
        live = self._live(list(instructions))
        if self._flower.secure_aggregation.enabled:
            return self._secure_fit({number: item for number, item in instructions.items() if number in live})
        messages = {
            number: self._message(number, TRAIN, item.entries, {
                "round": item.round, "train": item.train.model_dump_json(), "epochs": item.epochs,
                "proximal-mu": float(item.proximal_mu), "local-keys": sorted(item.local_keys)})
            for number, item in instructions.items() if number in live
        }
        replies = {}
        for number, reply in self._exchange(messages).items():
            if reply is None or _node_gone(reply):
                continue  # the engine records "no reply"
            replies[number] = _fit_reply(number, reply)
        return replies

    def _secure_fit(self, instructions: Mapping[int, FitInstruction]) -> AggregatedFit:
        """SecAgg+ over the grid (:func:`.secagg.secure_fit`): the average of the updates, never one of them."""
        from leukofed.federation.aggregation import exchanged_keys
        from leukofed.federation.secagg import secure_fit
        from leukofed.model import build_model

        state = build_model(self._params.model, len(self._params.data.classes)).state_dict()
        reply_keys = {key: state[key].dtype for key in exchanged_keys(state)}  # what every site uploads, in order
        return secure_fit(self._grid, {number: self._remote[number].node_id for number in instructions}, instructions,
                          self._params, self._settings, reply_keys)

    def evaluate(self, global_state: dict[str, torch.Tensor], numbers: Sequence[int], batch_size: int) -> dict[int, SiteEvaluation]:
        messages = {number: self._message(number, EVALUATE, global_state, {"batch-size": batch_size})
                    for number in self._live(numbers)}
        results = {}
        for number, reply in self._exchange(messages).items():
            if reply is None or reply.has_error():
                log(WARNING, "site %s did not evaluate: %s", number, "no reply" if reply is None else reply.error.reason)
                continue
            metrics = reply.content["metrics"]
            results[number] = SiteEvaluation(float(metrics["loss"]), float(metrics["accuracy"]), int(metrics[NUM_EXAMPLES]))
        return results

    def state_dict(self) -> dict:
        """Empty: each site keeps its own state in its SuperNode (none of it reaches the coordinator)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore at the coordinator (see :meth:`state_dict`)."""


def _node_gone(reply: Message) -> bool:
    return reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE


def _fit_reply(number: int, reply: Message) -> FitReply:
    """A train reply as the engine reads it; a ClientApp that raised becomes a failure with Flower's reason."""
    if reply.has_error():
        error: Error = reply.error
        return FitReply(None, 0, failure=f"site error: {error.reason}")
    metrics = reply.content["metrics"]
    if "failure" in reply.content:
        return FitReply(None, int(metrics[NUM_EXAMPLES]), failure=str(reply.content["failure"]["reason"]))
    if "arrays" not in reply.content:
        return FitReply(None, 0, failure=f"site {number} replied without arrays")
    entries = reply.content["arrays"].to_torch_state_dict()
    return FitReply(entries, int(metrics[NUM_EXAMPLES]), {key: float(metrics[key]) for key in ("train_loss", "train_accuracy")})


def federation_provenance(dataset: str, sites: Sequence[RemoteSite]) -> DataProvenance:
    """One provenance for the federation: the sites' fingerprints hashed in site order; synthetic if any site is."""
    digest = hashlib.sha256("".join(f"{site.info.number}:{site.fingerprint}\n" for site in sites).encode())
    sources = sorted({site.source for site in sites})
    source = "synthetic" if "synthetic" in sources else "+".join(sources)
    return DataProvenance(dataset, source, f"flower federation of {len(sites)} sites", digest.hexdigest(),
                          sum(site.info.n_train + site.info.n_val for site in sites))


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``federation.runs.<run>`` over the SuperNodes and write its outputs and MLflow runs."""
    try:
        log(INFO, run_server(grid, dict(context.run_config)))
    except LeukofedError as error:
        log(ERROR, "leukofed: %s", error)
        raise


def run_server(grid: Grid, run_config: Mapping) -> str:
    """The ServerApp's work, given the run config (see the module docstring); returns the summary line."""
    from leukofed.config import load_params
    from leukofed.federation.runner import federate_and_record
    from leukofed.model import build_model
    from leukofed.training import configure_torch

    params = load_params(Path(str(run_config.get("params", "params.yaml"))))
    run_name = str(run_config.get("run", ""))
    if run_name not in params.federation.runs:
        raise ConfigError(f"run config: run='{run_name}' is not an entry of federation.runs ({sorted(params.federation.runs)})")
    dataset = str(run_config.get("dataset") or params.dataset)
    out_dir = Path(str(run_config.get("out-dir") or Path("results") / dataset / "flower" / run_name))
    if params.privacy.dp.enabled:  # never train without the noise the params promise
        raise ConfigError("privacy.dp.enabled: DP-SGD is not available in the Flower deployment; run the in-process "
                          "federate stage for DP, or set privacy.dp.enabled: false")
    run = params.federation.runs[run_name]
    transport = FlowerTransport(grid, run.sites, params)
    remote = transport.connect()
    log(INFO, "sites: %s", ", ".join(f"{site.info.number} (node {site.node_id}, {site.info.n_train} train / "
                                       f"{site.info.n_val} val images)" for site in remote))
    provenance = federation_provenance(dataset, remote)
    configure_torch(params.runtime.threads, params.train.seed)
    model = build_model(params.model, len(params.data.classes))
    site_data = [{"site": site.info.number, "n_train": site.info.n_train, "n_val": site.info.n_val, "dataset": site.dataset,
                  "source": site.source, "fingerprint": site.fingerprint} for site in remote]
    return federate_and_record(
        params, dataset, run_name, model, transport, provenance=provenance, classes=list(params.data.classes),
        image_size=params.data.image_size, data_key=provenance.fingerprint, out_dir=out_dir,
        extra={"transport": "flower", "site_data": site_data,
               "secure_aggregation": params.federation.flower.secure_aggregation.enabled},
    )
