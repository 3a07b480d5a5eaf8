"""A Flower deployment on this machine: one SuperLink and N SuperNodes on 127.0.0.1, a run, and a clean stop.

:class:`LocalFederation` is what ``leukofed federation local`` runs, and what the tests drive. It
works like the real multi-hospital setup, on loopback: fresh certificates (:mod:`.certs`) in a
work folder, TLS on every connection, SuperNode authentication (each site's public key registered
with ``flwr supernode register``), a SuperLink that never installs dependencies at run time and
keeps its state in memory, a temporary ``FLWR_HOME``, and ``flwr run --stream``. Every process is
started in its own session (process group); :meth:`LocalFederation.close` signals each group
(SIGTERM, then SIGKILL after ``federation.flower.shutdown_grace_s``), also on errors and Ctrl-C.

``insecure=True`` drops TLS and node authentication: only for debugging, and loudly warned about.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from leukofed.config import FlowerParams
from leukofed.errors import LeukofedError

LOOPBACK = "127.0.0.1"
CONNECTION = "leukofed-local"  # the SuperLink connection written to the temporary FLWR_HOME
RUN_STARTED = re.compile(r"Successfully started run (\d+)")
INSECURE_WARNING = (
    "WARNING: --insecure: TLS and SuperNode authentication are OFF. Model updates travel in plain text and any "
    "process that reaches the SuperLink can join the federation as a hospital. Use this only to debug on a "
    "machine you control; never with real patient data or across a network."
)
POLL_SECONDS = 0.2  # how often to look for a listening port or an exited process group


class FlowerRunError(LeukofedError):
    """A Flower run ended without success (the ServerApp raised, or the run was stopped)."""


def bin_path(name: str) -> str:
    """A console script of the interpreter's environment (flower-superlink, flwr, ...), whether or not it is on PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def default_app() -> Path:
    """``deploy/flower`` of the checkout this package runs from."""
    return Path(__file__).resolve().parents[3] / "deploy" / "flower"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class NodeData:
    """Where SuperNode ``site`` finds its data: the values of its ``--node-config``."""

    site: int
    config: Mapping[str, str]

    def node_config(self) -> str:
        values = [f"site={self.site}", *(f"{key}={json.dumps(str(value))}" for key, value in self.config.items())]
        return " ".join(values)


@dataclass
class RunResult:
    """How a ``flwr run`` ended."""

    run_id: str
    status: str
    details: str
    output: str


class LocalFederation:
    """A SuperLink and one SuperNode per site on 127.0.0.1 (a context manager: leaving it stops every process).

    Parameters
    ----------
    nodes : list of NodeData
        One per SuperNode.
    flower : FlowerParams
        Timeouts (startup, shutdown grace) and the certificates' lifetime.
    workdir : Path
        Empty or new folder for certificates, ``FLWR_HOME`` and logs (``logs/superlink.log``, ``logs/site-<n>.log``).
    insecure : bool
        No TLS and no node authentication (the caller warns: :data:`INSECURE_WARNING`).
    env : mapping, optional
        Extra environment of every process (e.g. ``MLFLOW_TRACKING_URI``).
    cwd : Path, optional
        Working directory of the SuperLink, hence of the ServerApp (relative run-config paths and
        the default MLflow store resolve against it); default: the current one.
    """

    def __init__(self, nodes: list[NodeData], flower: FlowerParams, workdir: Path, *, insecure: bool = False,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        self.nodes = {node.site: node for node in nodes}
        self.flower = flower
        self.workdir = Path(workdir).resolve()
        self.insecure = insecure
        self.cwd = Path(cwd or Path.cwd()).resolve()
        self.home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        # Flower's processes start further ones by name (flower-superexec, flwr-serverapp, flwr-clientapp): put this
        # environment's scripts first on PATH. The unique FLWR_HOME also marks every descendant for close().
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = {**os.environ, **(env or {}), "PATH": path, "FLWR_HOME": str(self.home),
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}
        self.port = 0
        self._processes: dict[str, subprocess.Popen] = {}
        self._certs = None

    # -- lifecycle --------------------------------------------------------------------------------------------------

    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def start(self) -> None:
        """Certificates, the SuperLink, the connection config, node registration, and every SuperNode."""
        from leukofed.federation.certs import make_certificates

        self.logs.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        if not self.insecure:
            self._certs = make_certificates(self.workdir / "certs", [LOOPBACK], max(self.nodes),
                                            self.flower.cert_validity_days)
        self.port = free_port()
        self._spawn("superlink", [bin_path("flower-superlink"), *self._link_security(),
                                  "--disable-runtime-dependency-installation", "--database", ":flwr-in-memory:",
                                  "--host", LOOPBACK, "--port", str(self.port)], cwd=self.cwd)
        self._wait_listening(self.port, "superlink")
        self._write_connection()
        for site in sorted(self.nodes):
            if not self.insecure:
                self._flwr(["supernode", "register", str(self._certs.node_keys[site][1]), CONNECTION])
            self.start_node(site)

    def _link_security(self) -> list[str]:
        if self.insecure:
            return ["--insecure"]
        certs = self._certs
        return ["--ssl-ca-certfile", str(certs.ca), "--ssl-certfile", str(certs.server_cert),
                "--ssl-keyfile", str(certs.server_key), "--enable-supernode-auth"]

    def _write_connection(self) -> None:
        security = "insecure = true" if self.insecure else f"root-certificates = {json.dumps(str(self._certs.ca))}"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{LOOPBACK}:{self.port}"\n{security}\n', encoding="utf-8")

    def start_node(self, site: int) -> None:
        """Start (or restart) the SuperNode of ``site``."""
        node = self.nodes[site]
        security = (["--insecure"] if self.insecure else
                    ["--root-certificates", str(self._certs.ca), "--auth-supernode-private-key", str(self._certs.node_keys[site][0])])
        self._spawn(f"site-{site}", [bin_path("flower-supernode"), "--superlink", f"{LOOPBACK}:{self.port}", *security,
                                     "--port", str(free_port()), "--node-config", node.node_config()], cwd=self.workdir)

    def stop_node(self, site: int, sig: int = signal.SIGTERM) -> None:
        """Stop the SuperNode of ``site`` (SIGTERM: it leaves the federation; SIGKILL: it vanishes without a word).

        Its detached helpers watch it and exit with it; :meth:`close` ends any that remain.
        """
        self._stop(f"site-{site}", sig)

    def close(self) -> None:
        """Stop every process started here: SuperNodes first, then the SuperLink, then any descendant left.

        Flower detaches some helpers into sessions of their own (``flower-superexec`` and the apps it
        starts); they carry this federation's ``FLWR_HOME`` in their environment, which finds them.
        """
        nodes = [self._processes.pop(name) for name in list(self._processes) if name != "superlink"]
        stop_groups(nodes, signal.SIGTERM, self.flower.shutdown_grace_s)  # together: each takes a few seconds to leave
        self._stop("superlink", signal.SIGTERM)
        stop_marked(str(self.home), self.flower.shutdown_grace_s)

    # -- processes --------------------------------------------------------------------------------------------------

    def _spawn(self, name: str, command: list[str], cwd: Path) -> None:
        self._stop(name, signal.SIGTERM)  # a restart replaces the old process
        with open(self.logs / f"{name}.log", "ab") as log:
            self._processes[name] = subprocess.Popen(command, cwd=cwd, env=self.env, stdin=subprocess.DEVNULL,
                                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _stop(self, name: str, sig: int) -> None:
        process = self._processes.pop(name, None)
        if process is not None:
            stop_groups([process], sig, self.flower.shutdown_grace_s)

    def alive(self, name: str) -> bool:
        process = self._processes.get(name)
        return process is not None and process.poll() is None

    def _wait_listening(self, port: int, name: str) -> None:
        deadline = time.monotonic() + self.flower.startup_timeout_s
        while time.monotonic() < deadline:
            if not self.alive(name):
                raise LeukofedError(f"{name} exited at start; see {self.logs / f'{name}.log'}")
            with socket.socket() as probe:
                if probe.connect_ex((LOOPBACK, port)) == 0:
                    return
            time.sleep(POLL_SECONDS)
        raise LeukofedError(f"{name} did not listen on {LOOPBACK}:{port} within federation.flower.startup_timeout_s="
                            f"{self.flower.startup_timeout_s:g} s; see {self.logs / f'{name}.log'}")

    def _flwr(self, arguments: list[str]) -> str:
        done = subprocess.run([bin_path("flwr"), *arguments], env=self.env, cwd=self.workdir, capture_output=True,
                              text=True, timeout=self.flower.startup_timeout_s)
        if done.returncode != 0:
            raise LeukofedError(f"flwr {shlex.join(arguments)} failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
        return done.stdout

    # -- runs -------------------------------------------------------------------------------------------------------

    def run(self, app: Path, run_config: Mapping[str, object], *, echo: bool = True) -> RunResult:
        """``flwr run <app> --stream`` with ``run_config``; returns its id, final status and output.

        Raises
        ------
        FlowerRunError
            If the run did not finish as completed (its status details carry the ServerApp's error).
        """
        overrides = " ".join(f"{key}={json.dumps(value)}" for key, value in run_config.items())
        command = [bin_path("flwr"), "run", str(Path(app).resolve()), CONNECTION, "--stream", "--run-config", overrides]
        lines = []
        with open(self.logs / "flwr-run.log", "ab") as log:
            process = subprocess.Popen(command, cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            self._processes["flwr-run"] = process
            for raw in process.stdout:
                log.write(raw)
                line = raw.decode(errors="replace")
                lines.append(line)
                if echo:
                    print(line, end="", flush=True)
            process.wait()
            self._processes.pop("flwr-run", None)
        output = "".join(lines)
        started = RUN_STARTED.search(output)
        if started is None:
            raise FlowerRunError(f"flwr run did not start a run (exit {process.returncode}):\n{output[-3000:]}")
        run_id = started.group(1)
        status, details = self.run_status(run_id)
        result = RunResult(run_id, status, details, output)
        if not status.endswith("completed"):
            raise FlowerRunError(f"Flower run {run_id} ended {status}: {details or 'see the log above'}")
        return result

    def run_status(self, run_id: str) -> tuple[str, str]:
        """(status, details) of a run, e.g. ``("finished:failed", "ServerApp failed with exception: ...")``."""
        listing = json.loads(self._flwr(["ls", CONNECTION, "--run-id", run_id, "--format", "json"]))
        (entry,) = listing["runs"]
        return entry["status"], entry.get("status-details", "")


def stop_groups(processes: list[subprocess.Popen], sig: int, grace_s: float) -> None:
    """Signal each process's group; SIGKILL what is left of them after ``grace_s``; reap the processes.

    Each process must have been started with ``start_new_session=True`` (its pid is its group's id).
    """
    for process in processes:
        _signal_group(process.pid, sig)
    deadline = time.monotonic() + grace_s
    while any(_group_alive(process.pid) for process in processes) and time.monotonic() < deadline:
        for process in processes:
            process.poll()  # reap a leader so that it does not linger as a zombie of its group
        time.sleep(POLL_SECONDS)
    for process in processes:
        if _group_alive(process.pid):
            _signal_group(process.pid, signal.SIGKILL)
        process.wait()


def _signal_group(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def stop_marked(marker: str, grace_s: float) -> None:
    """SIGTERM every process whose environment holds ``marker``; SIGKILL those still there after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_with_env(marker):
            _signal_process(pid, sig)
        deadline = time.monotonic() + grace_s
        while processes_with_env(marker) and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)


def _signal_process(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def processes_with_env(marker: str) -> list[int]:
    """Ids of the running processes whose environment holds ``marker`` (e.g. a temporary FLWR_HOME): leftovers."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in environ and state != "Z":
            found.append(int(entry.name))
    return found


def local_workdir(parent: Path | None) -> Path:
    """A fresh work folder (under ``parent`` if given, else the system's temporary folder)."""
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="leukofed-flower-", dir=parent))


def remove_workdir(workdir: Path) -> None:
    """Delete a finished trial's work folder (certificates and keys included)."""
    shutil.rmtree(workdir, ignore_errors=True)


def pick_run(params, sites: int | None, run_name: str | None) -> str:
    """The entry of ``federation.runs`` a trial trains: ``run_name``, or the first one over ``sites`` sites."""
    from leukofed.errors import ConfigError

    runs = params.federation.runs
    if run_name is not None:
        if run_name not in runs:
            raise ConfigError(f"--run {run_name}: not an entry of federation.runs ({sorted(runs)})")
        if sites is not None and runs[run_name].sites != sites:
            raise ConfigError(f"--sites {sites}: run '{run_name}' trains on {runs[run_name].sites} sites; drop --sites or fix it")
        return run_name
    matching = [name for name, run in runs.items() if sites is None or run.sites == sites]
    if not matching:
        raise ConfigError(f"--sites {sites}: no entry of federation.runs has {sites} sites "
                          f"({ {name: run.sites for name, run in runs.items()} }); add one or pass --run")
    return matching[0]


def trial_data(params, dataset: str, n_sites: int, cache: Path | None, partition: Path | None, workdir: Path) -> tuple[Path, Path]:
    """The cache and partition the trial's SuperNodes read: given, the pipeline's, or built (synthetic data) in ``workdir``."""
    from leukofed import stages
    from leukofed.errors import DataError

    explicit = cache is not None or partition is not None
    cache = cache or Path("data") / dataset / "cache"
    partition = partition or Path("results") / dataset / "partitions" / f"sites-{n_sites}" / "partition.csv"
    if cache.is_dir() and partition.is_file():
        return cache.resolve(), partition.resolve()
    if explicit or params.dataset_spec(dataset).source != "synthetic":
        missing, flag = (cache, "--cache") if not cache.is_dir() else (partition, "--partition")
        raise DataError(f"{flag} {missing}: not found; run the pipeline up to the partition stage for dataset "
                        f"'{dataset}' or pass {flag}")
    print(f"no pipeline outputs for '{dataset}' here: building the synthetic cache and partition in {workdir}", flush=True)
    built = workdir / "data"
    stages.acquire(params, dataset, built / "source")
    stages.preprocess(params, built / "source", built / "cache")
    stages.split(params, built / "cache", built / "split.csv")
    stages.partition(params, built / "cache", built / "split.csv", n_sites, built / f"sites-{n_sites}")
    return (built / "cache").resolve(), (built / f"sites-{n_sites}" / "partition.csv").resolve()


def local_trial(params, *, sites: int | None, run_name: str | None, dataset: str | None, cache: Path | None,
                partition: Path | None, rounds: int | None, out_dir: Path | None, workdir: Path | None, app: Path | None,
                insecure: bool, keep_workdir: bool) -> str:
    """``leukofed federation local``: a SuperLink and one SuperNode per site on 127.0.0.1, one run, every process stopped.

    The effective params (``--rounds`` applied) are written to the work folder and passed to the
    ServerApp; the outputs go to ``out_dir`` (default ``results/<dataset>/flower/<run>``) and MLflow
    as with the ``federate`` stage. The work folder (certificates, keys, logs) is deleted after a
    successful run unless ``keep_workdir``; after a failure it is kept and named.
    """
    import yaml

    if insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    dataset = dataset or params.dataset
    params.dataset_spec(dataset)
    run_name = pick_run(params, sites, run_name)
    run = params.federation.runs[run_name]
    if rounds is not None:
        if rounds < 1:
            from leukofed.errors import ConfigError

            raise ConfigError(f"--rounds must be at least 1, got {rounds}")
        run = run.model_copy(update={"rounds": rounds})
        params = params.model_copy(update={"federation": params.federation.model_copy(
            update={"runs": {**params.federation.runs, run_name: run}})})
    app = Path(app or default_app())
    if not (app / "pyproject.toml").is_file():
        raise LeukofedError(f"--app {app}: no pyproject.toml of a Flower app there; pass the repository's deploy/flower")
    out_dir = Path(out_dir or Path("results") / dataset / "flower" / run_name).resolve()
    work = local_workdir(workdir)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)  # a plain kill must still stop every process
    try:
        cache_dir, partition_path = trial_data(params, dataset, run.sites, cache, partition, work)
        effective = work / "params.yaml"
        effective.write_text(yaml.safe_dump(params.model_dump(), sort_keys=False), encoding="utf-8")
        nodes = [NodeData(site, {"cache": str(cache_dir), "partition": str(partition_path)}) for site in range(1, run.sites + 1)]
        with LocalFederation(nodes, params.federation.flower, work, insecure=insecure) as federation:
            result = federation.run(app, {"params": str(effective), "run": run_name, "dataset": dataset, "out-dir": str(out_dir)})
    except BaseException:
        print(f"leukofed federation local: work folder kept for inspection: {work} (logs/)", file=sys.stderr, flush=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not keep_workdir:
        remove_workdir(work)
    return (f"Flower run {result.run_id} ({run_name}: {run.sites} SuperNodes, {run.rounds} rounds, "
            f"{'INSECURE' if insecure else 'TLS + SuperNode authentication'}) finished; outputs in {out_dir}")


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)
