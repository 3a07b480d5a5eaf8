"""benchmarks/workload.py: the quiet-CPU check around timed repetitions, and finding a benchmark's data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from leukofed.config import load_params
from leukofed.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import workload  # noqa: E402


def _fake_cpu(monkeypatch, others_busy_per_attempt: list[float]) -> list[int]:
    """/proc/stat as if other processes used the given CPU shares during successive attempts (this one uses none)."""
    readings = []
    clock = {"busy": 0.0, "total": 0.0}
    attempts = iter(others_busy_per_attempt)

    def cpu_seconds():
        readings.append(len(readings))
        if len(readings) % 2 == 0:  # the reading after a run: advance by one attempt's worth
            clock["total"] += 10.0
            clock["busy"] += 10.0 * next(attempts)
        return clock["busy"], clock["total"]

    monkeypatch.setattr(workload, "_cpu_seconds", cpu_seconds)
    monkeypatch.setattr(workload, "wait_until_quiet", lambda max_busy, **kwargs: 0.0)
    monkeypatch.setattr(workload.time, "process_time", lambda: 0.0)
    return readings


def test_a_disturbed_repetition_is_run_again(monkeypatch):
    _fake_cpu(monkeypatch, [0.6, 0.1])
    calls = []

    result, seconds, others = workload.quiet_run(lambda: calls.append(1) or "done", max_busy=0.25, retries=3)

    assert result == "done" and len(calls) == 2
    assert others == pytest.approx(0.1) and seconds >= 0


def test_the_last_retry_is_kept_even_if_disturbed(monkeypatch):
    _fake_cpu(monkeypatch, [0.9, 0.8])
    calls = []

    _, _, others = workload.quiet_run(lambda: calls.append(1), max_busy=0.25, retries=1)

    assert len(calls) == 2 and others == pytest.approx(0.8)


def test_max_busy_one_turns_the_checks_off(monkeypatch):
    readings = _fake_cpu(monkeypatch, [])

    result, _, others = workload.quiet_run(lambda: 7, max_busy=1.0, retries=3)

    assert result == 7 and others is None and readings == []


def test_real_data_is_not_built_for_a_benchmark(tmp_path):
    params = load_params(ROOT / "params.yaml")
    args = argparse.Namespace(project=None, cache=None, split=None)

    with pytest.raises(ConfigError, match="not synthetic"):
        workload.cache_and_split(args, params, "all-aria2021", tmp_path)


def test_a_missing_project_output_is_named(tmp_path):
    params = load_params(ROOT / "params.yaml")
    args = argparse.Namespace(project=tmp_path, cache=None, split=None)

    with pytest.raises(DataError, match="cache"):
        workload.cache_and_split(args, params, "all-aria2021", tmp_path)
