"""benchmarks/stage_times.py: per-stage wall times from Snakemake's benchmark files."""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import stage_times  # noqa: E402

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
END = 1_800_000_000  # a fixed epoch second for the files' modification times


def _write_stage(folder: Path, stage: str, seconds: float, ended: float) -> None:
    path = folder / f"{stage}.tsv"
    path.write_text(HEADER + f"{seconds}\t0:00:00\t100\t200\t90\t95\t0\t0\t99\t{seconds}\n")
    os.utime(path, (ended, ended))


@pytest.fixture
def results(tmp_path) -> Path:
    folder = tmp_path / "results" / "demo" / "benchmarks"
    folder.mkdir(parents=True)
    _write_stage(folder, "report", 5, END)
    _write_stage(folder, "explain_centralized", 20, END - 10)
    _write_stage(folder, "federate_fedavg-3", 300, END - 100)
    _write_stage(folder, "train_centralized", 100, END - 400)
    _write_stage(folder, "acquire", 2, END - 5000)  # left from an earlier run
    return tmp_path / "results"


def test_stages_come_in_pipeline_order_with_their_span(results, tmp_path):
    assert stage_times.main(["--dataset", "demo", "--results", str(results), "--out-dir", str(tmp_path)]) == 0

    record = json.loads((tmp_path / "stage_times_demo.json").read_text())
    assert [entry["stage"] for entry in record["stages"]] == [
        "acquire", "train_centralized", "federate_fedavg-3", "explain_centralized", "report"]
    assert record["total_wall_seconds"] == pytest.approx(427)
    assert record["span_seconds"] == pytest.approx(5002)
    assert "machine" in record and (tmp_path / "stage_times_demo.md").is_file()


def test_stages_that_ended_before_since_are_left_out(results, tmp_path):
    since = datetime.fromtimestamp(END - 1000, UTC).isoformat()

    assert stage_times.main(["--dataset", "demo", "--results", str(results), "--out-dir", str(tmp_path), "--since", since]) == 0

    record = json.loads((tmp_path / "stage_times_demo.json").read_text())
    assert [entry["stage"] for entry in record["stale_stages"]] == ["acquire"]
    assert record["total_wall_seconds"] == pytest.approx(425)
    assert record["span_seconds"] == pytest.approx(500)
    assert "Left out" in (tmp_path / "stage_times_demo.md").read_text()


def test_a_malformed_benchmark_file_is_named(results, tmp_path, capsys):
    (results / "demo" / "benchmarks" / "split.tsv").write_text("not\ta benchmark\n")

    assert stage_times.main(["--dataset", "demo", "--results", str(results), "--out-dir", str(tmp_path)]) == 2

    assert "split.tsv" in capsys.readouterr().err
