"""Real Flower deployments on loopback: a SuperLink, three SuperNodes, two rounds of a tiny model.

Each test starts its processes through :class:`LocalFederation` and checks afterwards that none
of them is left (every Flower process carries the test's FLWR_HOME in its environment).
"""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import threading
import time

import pandas as pd
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from mlflow import MlflowClient

from leukofed.data.cache import load_cache
from leukofed.data.partition import read_partition
from leukofed.federation.deploy import (
    LOOPBACK,
    FlowerRunError,
    LocalFederation,
    NodeData,
    bin_path,
    default_app,
    free_port,
    processes_with_env,
    stop_groups,
)
from leukofed.federation.engine import CHECKPOINT_FILE, NO_REPLY, run_federation, sites_from_partition
from leukofed.federation.runner import CHECKPOINT_DIR
from leukofed.io import read_json
from leukofed.model import build_model
from leukofed.training import configure_torch

from conftest import N_SITES, ROUNDS

pytestmark = pytest.mark.slow
RUN = "fedavg-3"
KILL_WAIT_S = 300  # upper bound for a watched log line to appear (a round takes ~20-40 s on 2 busy cores)


def _nodes(federation) -> list[NodeData]:
    return [NodeData(site, {"cache": str(federation.cache), "partition": str(federation.partition)})
            for site in range(1, N_SITES + 1)]


def _run_config(federation, out) -> dict:
    return {"params": str(federation.params_path), "run": RUN, "dataset": "synthetic", "out-dir": str(out)}


def _mlflow(tmp_path) -> dict:
    """A throwaway MLflow store (the registry needs a database); the SuperLink runs in tmp_path, where its artifacts go."""
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}


def _in_process(federation, checkpoint_dir):
    params = federation.params
    cache = load_cache(federation.cache)
    sites = sites_from_partition(cache, read_partition(federation.partition), federation.partition, N_SITES)
    configure_torch(params.runtime.threads, params.train.seed)
    model = build_model(params.model, len(params.data.classes))
    return run_federation(model, sites, params.federation.runs[RUN], params.federation, params.train,
                          checkpoint_dir=checkpoint_dir, data_key="reference")


def _tls_certificate(federation: LocalFederation) -> str:
    """The certificate the SuperLink presents in a TLS handshake verified against the federation's CA (PEM)."""
    context = ssl.create_default_context(cafile=str(federation.workdir / "certs" / "ca.crt"))
    with socket.create_connection((LOOPBACK, federation.port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname=LOOPBACK) as tls:
            return ssl.DER_cert_to_PEM_cert(tls.getpeercert(binary_form=True))


def _unregistered_node_is_refused(federation: LocalFederation, tmp_path) -> str:
    """A SuperNode with a key the SuperLink does not know: its connection is refused and it exits."""
    key = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / "stranger.key"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    log = tmp_path / "stranger.log"
    with open(log, "wb") as output:  # a file, not a pipe: the SuperNode's helper processes inherit its output
        node = subprocess.Popen(
            [bin_path("flower-supernode"), "--superlink", f"{LOOPBACK}:{federation.port}",
             "--root-certificates", str(federation.workdir / "certs" / "ca.crt"), "--auth-supernode-private-key", str(path),
             "--port", str(free_port()), "--max-retries", "0", "--node-config", "site=1"],
            env=federation.env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        assert node.wait(timeout=120) != 0
    finally:
        stop_groups([node], signal.SIGKILL, federation.flower.shutdown_grace_s)  # its helpers: close() finds the rest
    return log.read_text(errors="replace")


def test_a_tls_and_node_auth_deployment_trains_the_in_process_weights(tiny_federation, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    with LocalFederation(_nodes(tiny_federation), tiny_federation.params.federation.flower, work,
                         env=_mlflow(tmp_path), cwd=tmp_path) as federation:
        served = _tls_certificate(federation)
        refused = _unregistered_node_is_refused(federation, tmp_path)
        federation.run(default_app(), _run_config(tiny_federation, out), echo=False)
    assert not processes_with_env(str(work / "flwr-home"))
    assert served == (work / "certs" / "superlink.crt").read_text()  # the SuperLink speaks TLS with the federation's certificate
    assert "Failed to initialize the connection" in refused

    reference = _in_process(tiny_federation, tmp_path / "reference")
    flower = torch.load(out / "final_model.pt", weights_only=True)["state_dict"]
    assert flower.keys() == reference.final_state.keys()
    for key, value in reference.final_state.items():
        torch.testing.assert_close(flower[key], value, rtol=1e-6, atol=1e-7)
    rounds = pd.read_csv(out / "rounds.csv")
    for row, record in zip(rounds.itertuples(), reference.records, strict=True):
        assert row.accepted == "1 2 3" and pd.isna(row.rejected)
        for site in range(1, N_SITES + 1):
            assert getattr(row, f"site{site}_val_accuracy") == pytest.approx(record["sites"][site]["val_accuracy"])

    record = read_json(out / "federation.json")
    assert record["transport"] == "flower" and [site["site"] for site in record["site_data"]] == [1, 2, 3]
    assert record["data"]["source"] == "synthetic" and record["rounds"] == ROUNDS
    assert not (out / CHECKPOINT_DIR).exists()
    client = MlflowClient(tracking_uri=_mlflow(tmp_path)["MLFLOW_TRACKING_URI"])
    parent = client.get_run(record["mlflow_run_id"])
    assert [metric.step for metric in client.get_metric_history(parent.info.run_id, "val_accuracy")] == [1, 2]
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(child.data.tags["site"] for child in children) == ["1", "2", "3"]


def _stop_when(federation: LocalFederation, site: int, trains: int, stopped: list) -> None:
    """Stop site's SuperNode as soon as it has received its ``trains``-th train message (mid-round)."""
    log = federation.logs / f"site-{site}.log"
    deadline = time.monotonic() + KILL_WAIT_S
    while time.monotonic() < deadline:
        if log.exists() and log.read_text(errors="replace").count("Receiving: train message") >= trains:
            federation.stop_node(site)
            stopped.append(site)
            return
        time.sleep(0.1)


def test_killed_supernodes_leave_a_round_or_stop_the_run_and_a_rerun_resumes(tiny_federation, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    assert tiny_federation.params.federation.min_sites == 2
    with LocalFederation(_nodes(tiny_federation), tiny_federation.params.federation.flower, work, insecure=True,
                         env=_mlflow(tmp_path), cwd=tmp_path) as federation:
        stopped = []
        watchers = [threading.Thread(target=_stop_when, args=(federation, 3, 1, stopped)),  # in round 1
                    threading.Thread(target=_stop_when, args=(federation, 2, 2, stopped))]  # in round 2
        for watcher in watchers:
            watcher.start()
        with pytest.raises(FlowerRunError) as error:
            federation.run(default_app(), _run_config(tiny_federation, out), echo=False)
        for watcher in watchers:
            watcher.join()
        assert sorted(stopped) == [2, 3]
        message = str(error.value)
        assert "finished:failed" in message and "round 2: 1 valid update(s) (sites [1]; rejected: site 2: no reply; " \
               "site 3: no reply), fewer than federation.min_sites=2" in message and "keeps round 1" in message
        checkpoint = torch.load(out / CHECKPOINT_DIR / CHECKPOINT_FILE, weights_only=True)
        (first,) = checkpoint["records"]
        assert first["accepted"] == [1, 2] and first["rejected"] == {3: NO_REPLY}  # round 1 finished without site 3

        for site in (2, 3):  # the hospitals are back: the same command resumes after round 1
            federation.start_node(site)
        federation.run(default_app(), _run_config(tiny_federation, out), echo=False)
    assert not processes_with_env(str(work / "flwr-home"))
    record = read_json(out / "federation.json")
    assert record["resumed_from_round"] == 1 and record["rounds"] == ROUNDS
    assert record["rejections"] == [{"round": 1, "site": 3, "reason": NO_REPLY}]
    assert list(pd.read_csv(out / "rounds.csv")["accepted"]) == ["1 2", "1 2 3"]
