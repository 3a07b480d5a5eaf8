"""The Flower apps without processes: ClientApp replies, the Flower transport over an in-memory grid, node config, certificates, CLI."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time

import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.error import Error
from flwr.common.constant import ErrorCode

from leukofed import cli
from leukofed.errors import ConfigError, DataError, LeukofedError
from leukofed.federation import flower_apps
from leukofed.federation.aggregation import exchanged_keys, state_nbytes
from leukofed.federation.certs import make_certificates
from leukofed.federation.deploy import (
    INSECURE_WARNING,
    pick_run,
    processes_with_env,
    stop_groups,
    stop_marked,
    trial_data,
)
from leukofed.federation.engine import NO_REPLY, run_federation, sites_from_partition
from leukofed.federation.flower_apps import FlowerTransport, SiteSettings, client_app, load_site_data
from leukofed.federation.site import FitInstruction, Site
from leukofed.data.cache import load_cache
from leukofed.data.partition import read_partition
from leukofed.model import build_model
from leukofed.training import configure_torch

from conftest import N_SITES, ROUNDS, REPO


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """The run and node ids Flower's runtime sets in a ServerApp or ClientApp process before messages are made."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 7)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _node_config(federation, site: int) -> dict:
    return {"site": site, "cache": str(federation.cache), "partition": str(federation.partition)}


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _sent(message: Message) -> Message:
    """Give a message the id a Grid gives it when it pushes the message."""
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


def _fresh_model(params):
    configure_torch(params.runtime.threads, params.train.seed)
    return build_model(params.model, len(params.data.classes))


def _settings(federation) -> str:
    return SiteSettings.from_params(federation.params).to_json()


def _train_message(federation, entries: dict, seed: int = 3) -> Message:
    train = federation.params.train.model_copy(update={"seed": seed, "lr_schedule": "constant"})
    config = ConfigRecord({"params": _settings(federation), "round": 1, "train": train.model_dump_json(), "epochs": 1,
                           "proximal-mu": 0.0, "local-keys": []})
    return _sent(Message(RecordDict({"arrays": ArrayRecord(entries), "config": config}), dst_node_id=7, message_type="train"))


def _scalar(value) -> bool:
    return isinstance(value, int | float | str) and not (isinstance(value, str) and len(value) > 200)


def test_client_replies_hold_only_model_arrays_and_scalar_metrics(tiny_federation):
    """What reaches the ServerApp: model entries (exactly the model's keys and shapes) and scalars, never images."""
    params = tiny_federation.params
    context = _context(_node_config(tiny_federation, 1))
    query = _sent(Message(RecordDict({"config": ConfigRecord({"params": _settings(tiny_federation)})}), dst_node_id=7,
                          message_type="query"))
    info = client_app(query, context).content
    assert list(info.keys()) == ["site"] and all(_scalar(value) or value == params.data.classes
                                                 for value in info["site"].values())

    model = _fresh_model(params)
    state = model.state_dict()
    sent = {key: state[key] for key in exchanged_keys(state)}
    reply = client_app(_train_message(tiny_federation, sent), context).content
    assert set(reply.keys()) == {"arrays", "metrics"}
    arrays = reply["arrays"].to_torch_state_dict()
    assert list(arrays) == exchanged_keys(state) and all(arrays[key].shape == state[key].shape for key in arrays)
    assert state_nbytes(arrays, arrays) == state_nbytes(state, exchanged_keys(state))  # nothing but the model
    assert set(reply["metrics"]) == {"train_loss", "train_accuracy", flower_apps.NUM_EXAMPLES}
    assert all(isinstance(value, int | float) for value in reply["metrics"].values())

    evaluation = _sent(Message(RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(
        {"params": _settings(tiny_federation), "batch-size": 16})}), dst_node_id=7, message_type="evaluate"))
    metrics = client_app(evaluation, context).content
    assert list(metrics.keys()) == ["metrics"] and set(metrics["metrics"]) == {"loss", "accuracy", flower_apps.NUM_EXAMPLES}


def test_the_client_app_trains_exactly_like_an_in_process_site(tiny_federation):
    params = tiny_federation.params
    model = _fresh_model(params)
    state = model.state_dict()
    sent = {key: state[key] for key in exchanged_keys(state)}
    reply = client_app(_train_message(tiny_federation, sent), _context(_node_config(tiny_federation, 2))).content
    remote = reply["arrays"].to_torch_state_dict()

    cache = load_cache(tiny_federation.cache)
    data = sites_from_partition(cache, read_partition(tiny_federation.partition), tiny_federation.partition, N_SITES)[1]
    train = params.train.model_copy(update={"seed": 3, "lr_schedule": "constant"})
    local = Site(data).fit(_fresh_model(params), FitInstruction(1, sent, train, 1, 0.0))
    assert remote.keys() == local.entries.keys() and all(torch.equal(remote[key], local.entries[key]) for key in remote)
    assert reply["metrics"][flower_apps.NUM_EXAMPLES] == data.n_train


class InMemoryGrid:
    """A Grid whose nodes are ClientApp calls in this process: the Flower transport without a SuperLink.

    A ClientApp that raises answers with an error reply, as a SuperNode does. ``broken`` maps a node
    to what goes wrong there: ``"gone"`` (offline), ``"raises"`` (its ClientApp fails in training).
    """

    def __init__(self, node_configs: dict[int, dict], broken: dict[int, str] | None = None):
        self.contexts = {node: _context(config) for node, config in node_configs.items()}
        self.broken = broken or {}
        self.sent = []
        self.replies = {}

    def get_node_ids(self):
        return [node for node in self.contexts if self.broken.get(node) != "gone"]

    def push_messages(self, messages):
        """Deliver at once; the replies wait for pull_messages."""
        for message in messages:
            self._deliver(_sent(message))
        return [message.metadata.message_id for message in messages]

    def pull_messages(self, message_ids):
        return [self.replies.pop(message_id) for message_id in message_ids if message_id in self.replies]

    def _deliver(self, message):
        self.sent.append(message)
        node = message.metadata.dst_node_id
        try:
            if self.broken.get(node) == "raises" and message.metadata.message_type == "train":
                raise RuntimeError("disk full")
            reply = client_app(message, self.contexts[node])
        except Exception as error:  # the SuperNode's format of a ClientApp exception
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(error)}:<'{error}'>"), reply_to=message)
        self.replies[message.metadata.message_id] = reply


def _run(tiny_federation, transport, tmp_path, **changes):
    params = tiny_federation.params
    federation = params.federation.model_copy(update=changes)
    return run_federation(_fresh_model(params), transport, params.federation.runs["fedavg-3"], federation, params.train,
                          checkpoint_dir=tmp_path, data_key="tiny")


def _flower(tiny_federation, broken=None, nodes=None):
    nodes = nodes or {100 + site: _node_config(tiny_federation, site) for site in range(1, N_SITES + 1)}
    grid = InMemoryGrid(nodes, broken)
    transport = FlowerTransport(grid, N_SITES, tiny_federation.params)
    transport.connect()
    return transport, grid


@pytest.mark.parametrize("batchnorm", ["global", "local"])
def test_the_flower_transport_gives_the_in_process_weights(tiny_federation, tmp_path, batchnorm):
    transport, grid = _flower(tiny_federation)
    flower = _run(tiny_federation, transport, tmp_path / "flower", batchnorm=batchnorm)
    cache = load_cache(tiny_federation.cache)
    sites = sites_from_partition(cache, read_partition(tiny_federation.partition), tiny_federation.partition, N_SITES)
    local = _run(tiny_federation, sites, tmp_path / "local", batchnorm=batchnorm)
    assert all(torch.equal(flower.final_state[key], local.final_state[key]) for key in local.final_state)
    for remote, here in zip(flower.records, local.records, strict=True):
        assert remote["sites"] == here["sites"] and remote["val_accuracy"] == here["val_accuracy"]
    assert {message.metadata.message_type for message in grid.sent} == {"query", "train", "evaluate"}
    assert len(flower.records) == ROUNDS


def test_offline_and_failing_sites_are_rejected_and_too_few_stop_the_run(tiny_federation, tmp_path):
    transport, grid = _flower(tiny_federation)
    grid.broken = {102: "raises", 103: "gone"}
    with pytest.raises(LeukofedError, match=r"round 1: 1 valid update\(s\) \(sites \[1\]; rejected: site 2: site error: "
                                            r".*disk full.*; site 3: no reply\), fewer than federation.min_sites=2"):
        _run(tiny_federation, transport, tmp_path)
    result = _run(tiny_federation, transport, tmp_path, min_sites=1)
    record = result.records[0]
    assert record["accepted"] == [1] and record["rejected"][3] == NO_REPLY and "disk full" in record["rejected"][2]
    assert record["sites"][3]["val_accuracy"] is None and record["sites"][2]["val_accuracy"] is not None


@pytest.mark.parametrize(("sites", "says"), [((1, 1, 3), "taken twice: [1]; missing: [2]"),
                                              ((1, 2, 4), "could not describe their site:\n  node 102: ")])
def test_the_sites_must_be_one_to_n_once_each(tiny_federation, sites, says):
    nodes = {100 + index: _node_config(tiny_federation, site) for index, site in enumerate(sites)}
    with pytest.raises(LeukofedError) as error:
        _flower(tiny_federation, nodes=nodes)
    assert says in str(error.value)


def test_too_few_supernodes_within_the_connect_timeout(tiny_federation):
    params = tiny_federation.params
    flower = params.federation.flower.model_copy(update={"connect_timeout_s": 0.1})
    params = params.model_copy(update={"federation": params.federation.model_copy(update={"flower": flower})})
    grid = InMemoryGrid({100: _node_config(tiny_federation, 1)})
    with pytest.raises(LeukofedError, match="only 1 of 3 SuperNodes connected"):
        FlowerTransport(grid, N_SITES, params).connect()


@pytest.mark.parametrize(
    ("change", "error", "says"),
    [
        ({"site": "x"}, ConfigError, "site='x' is not a site number"),
        ({"site": None}, ConfigError, "site=None"),
        ({"cache": "/no/such/cache"}, DataError, "cache=/no/such/cache: no such folder"),
        ({"partition": "/no/such.csv"}, DataError, "partition=/no/such.csv: no such file"),
        ({"cache": None, "partition": None}, ConfigError, "names no data"),
        ({"cache": None, "partition": None, "data-dir": "{root}"}, ConfigError, "work-dir=... is missing"),
        ({"cache": None, "partition": None, "data-dir": "/no/such/folder", "work-dir": "{root}"}, DataError,
         "data-dir=/no/such/folder: no such folder"),
    ],
)
def test_node_config_errors_name_the_key_and_path(tiny_federation, tmp_path, change, error, says):
    config = _node_config(tiny_federation, 1) | {key: value.format(root=tmp_path) if isinstance(value, str) else value
                                                 for key, value in change.items()}
    config = {key: value for key, value in config.items() if value is not None}
    with pytest.raises(error) as raised:
        load_site_data(config, SiteSettings.from_params(tiny_federation.params), prepare=True)
    assert says in str(raised.value)


def test_a_hospital_folder_is_validated_cached_and_split_by_groups(tiny_federation, tmp_path):
    folder = tiny_federation.cache.parent / "source" / "raw"  # the synthetic images in the official layout
    config = {"site": 2, "data-dir": str(folder), "work-dir": str(tmp_path / "work")}
    settings = SiteSettings.from_params(tiny_federation.params)
    data, provenance = load_site_data(config, settings, prepare=True)
    assert data.number == 2 and data.n_train > 0 and data.n_val > 0 and provenance.n_images == data.n_train + data.n_val
    assert data.train_images.shape[1:] == (32, 32, 3)
    images = tmp_path / "work" / "cache" / "images.npy"
    built = images.stat().st_mtime_ns
    again, _ = load_site_data(config, settings, prepare=True)  # unchanged data: the cache is reused
    assert images.stat().st_mtime_ns == built and np.array_equal(again.val_labels, data.val_labels)
    with pytest.raises(DataError, match="holds no validated cache"):
        load_site_data(config | {"work-dir": str(tmp_path / "empty")}, settings, prepare=False)


def test_certificates_chain_up_and_private_keys_stay_private(tmp_path):
    made = make_certificates(tmp_path / "certs", ["coordinator.example.org", "10.0.0.5"], 2, 30)
    for path in (made.ca_key, made.server_key, *(private for private, _ in made.node_keys.values())):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(made.ca.read_bytes())
    server = x509.load_pem_x509_certificate(made.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"coordinator.example.org", "localhost"} <= set(names.get_values_for_type(x509.DNSName))
    assert {"10.0.0.5", "127.0.0.1"} <= {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    private_path, public_path = made.node_keys[2]
    key = serialization.load_ssh_private_key(private_path.read_bytes(), None)
    public = serialization.load_ssh_public_key(public_path.read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert public.public_numbers() == key.public_key().public_numbers()
    with pytest.raises(LeukofedError, match="already holds a federation CA"):
        make_certificates(tmp_path / "certs", ["x"], 1, 30)


def test_federation_cli_errors_and_the_insecure_warning(tiny_federation, tmp_path, capsys):
    params = ["--params", str(tiny_federation.params_path)]
    assert cli.main(["federation", "certs", *params, "--out", str(tmp_path / "c"), "--host", "h", "--nodes", "2"]) == 0
    assert cli.main(["federation", "certs", *params, "--out", str(tmp_path / "c"), "--host", "h", "--nodes", "2"]) == 2
    assert "already holds a federation CA" in capsys.readouterr().err
    assert cli.main(["federation", "local", *params, "--sites", "4"]) == 2
    assert "no entry of federation.runs has 4 sites" in capsys.readouterr().err
    missing = tmp_path / "nowhere"
    code = cli.main(["federation", "local", *params, "--insecure", "--cache", str(missing), "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2 and INSECURE_WARNING in err and f"--cache {missing}: not found" in err


def test_the_flower_app_bundle_points_at_the_installed_package():
    import tomllib

    app = REPO / "deploy" / "flower"
    config = tomllib.loads((app / "pyproject.toml").read_text())
    components = config["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "leukofed.federation.flower_apps:server_app",
                          "clientapp": "leukofed.federation.flower_apps:client_app"}
    assert (app / "LICENSE").read_bytes() == (REPO / "LICENSE").read_bytes()  # fab-format-version 1 ships it


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_stopping_a_process_group_ends_its_detached_helpers_too(tmp_path):
    marker = f"LEUKOFED_TEST_MARKER={tmp_path}"
    env = {**os.environ, "LEUKOFED_TEST_MARKER": str(tmp_path)}
    # a leader with a child in its group, and a helper that detaches into a session of its own (as Flower's do)
    script = "sleep 600 & setsid sleep 600 & wait"
    leader = subprocess.Popen(["bash", "-c", script], env=env, start_new_session=True)
    def detached() -> list[int]:
        return [pid for pid in processes_with_env(marker) if _group_of(pid) not in (None, leader.pid)]

    deadline = time.monotonic() + 30
    while not (len(processes_with_env(marker)) == 3 and detached()) and time.monotonic() < deadline:
        time.sleep(0.05)  # until the helper has left the group (setsid ran)
    assert len(processes_with_env(marker)) == 3 and len(detached()) == 1
    stop_groups([leader], signal.SIGTERM, grace_s=5)
    assert len(processes_with_env(marker)) == 1  # the detached helper is outside the group...
    stop_marked(marker, grace_s=5)
    assert processes_with_env(marker) == []  # ...and found by its environment


def test_a_trial_uses_given_data_or_builds_synthetic_data(tiny_federation, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no pipeline outputs here
    params = tiny_federation.params
    assert trial_data(params, "synthetic", N_SITES, tiny_federation.cache, tiny_federation.partition, tmp_path) == (
        tiny_federation.cache.resolve(), tiny_federation.partition.resolve())
    with pytest.raises(DataError, match="--partition .*nowhere.csv: not found"):
        trial_data(params, "synthetic", N_SITES, tiny_federation.cache, tmp_path / "nowhere.csv", tmp_path)
    cache, partition = trial_data(params, "synthetic", N_SITES, None, None, tmp_path / "work")
    assert (cache / "images.npy").is_file() and sorted(set(read_partition(partition)["site"])) == [1, 2, 3]
    assert pick_run(params, 3, None) == "fedavg-3" and pick_run(params, None, "fedavg-5") == "fedavg-5"
    with pytest.raises(ConfigError, match="run 'fedavg-5' trains on 5 sites"):
        pick_run(params, 3, "fedavg-5")
