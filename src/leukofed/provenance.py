"""Where an artifact's data came from: recorded in every artifact so synthetic numbers never pass for real."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataProvenance:
    """The data behind an artifact.

    ``fingerprint`` is the sha256 of the dataset manifest (every file's relative path, class and
    content hash), so two runs on byte-identical data share it and any change to the data alters it.
    """

    dataset: str  # the params name, e.g. "all-aria2021"
    source: str  # synthetic | folder | zip | url
    location: str  # folder, archive path or URL it was read from
    fingerprint: str
    n_images: int

    @property
    def is_synthetic(self) -> bool:
        return self.source == "synthetic"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DataProvenance:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__})

    def with_count(self, n_images: int) -> DataProvenance:
        """The same data, after n_images survived validation."""
        return DataProvenance(self.dataset, self.source, self.location, self.fingerprint, n_images)

    def title(self, what: str) -> str:
        """A report title that says loudly when the numbers come from synthetic data."""
        prefix = "SYNTHETIC DATA — " if self.is_synthetic else ""
        return f"{prefix}{what} ({self.dataset}, {self.n_images} images, data {self.fingerprint[:12]})"


def manifest_fingerprint(rows: Iterable[tuple[str, str, str]]) -> str:
    """sha256 over sorted ``(relpath, label, sha256)`` rows: independent of scan order and location."""
    digest = hashlib.sha256()
    for relpath, label, sha in sorted(rows):
        digest.update(f"{relpath}\t{label}\t{sha}\n".encode())
    return digest.hexdigest()


def run_tags(dataset: str, provenance: DataProvenance, kind: str) -> dict[str, str]:
    """The tags of every tracked run: dataset, kind, data source and fingerprint, synthetic flag, git commit."""
    return {
        "dataset": dataset,
        "kind": kind,
        "data_source": provenance.source,
        "data_fingerprint": provenance.fingerprint,
        "synthetic_data": str(provenance.is_synthetic).lower(),
        "git_commit": git_commit(),
    }


def git_commit(cwd: str | Path = ".") -> str:
    """The current git commit (with ``-dirty`` if the tree has changes), or ``unknown`` outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit
