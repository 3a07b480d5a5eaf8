"""The machine a benchmark ran on, recorded next to its numbers (absolute times only mean something with it)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, or the platform's processor string elsewhere."""
    if CPUINFO.is_file():
        for line in CPUINFO.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    return platform.processor() or "unknown"


def describe(threads: int | None = None) -> dict:
    """CPU model, core counts, load, Python and torch versions, and the torch threads the benchmark used.

    Parameters
    ----------
    threads : int, optional
        The torch intra-op threads the benchmark set (``runtime.threads`` or an override); left out if None.
    """
    import torch

    description = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1_5_15min": [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    return description | ({"torch_threads": threads} if threads is not None else {})
