"""A tiny synthetic project folder that the real Snakefile runs in (seconds, not minutes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def tiny_params() -> dict:
    """The repository's params.yaml, shrunk: few small images, two short epochs, two federated rounds."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"] = {
        "synthetic": {
            "source": "synthetic",
            "synthetic": {"images_per_class": 12, "image_size": 64, "n_sites": 2, "seed": 0},
        }
    }
    params["data"]["image_size"] = 32
    params["train"].update(epochs=2, batch_size=16)
    params["federation"]["local_epochs"] = 1
    for run in params["federation"]["runs"].values():
        run["rounds"] = 2
    params["privacy"]["sweep"].update(rounds=1, epsilons=[8.0, float("inf")])
    params["runtime"]["progress"] = False
    params["analysis"]["bootstrap"]["n_resamples"] = 200
    params["analysis"]["cam"].update(panels_per_class=1, max_error_panels=2)
    return params


def write_params(folder: Path, params: dict) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def tool_env() -> dict[str, str]:
    """The environment for subprocesses: this interpreter's tools on PATH, no DVC analytics."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1", MPLBACKEND="Agg")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a tool in ``cwd``; fail the test with its output if it fails."""
    result = subprocess.run(command, cwd=cwd, env=tool_env(), capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A copy of the workflow (Snakefile, rules, dvc.yaml) with tiny params, as its own git + DVC repo."""
    for name in ("Snakefile", "dvc.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    for folder in ("workflow", "profiles"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    shutil.copytree(REPO / "src" / "leukofed", tmp_path / "src" / "leukofed", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(tmp_path, tiny_params())
    return tmp_path
