"""Atomic writes: the target is either the old or the complete new content, never a partial file."""

from __future__ import annotations

import stat

import pytest

from leukofed.io import atomic_dir, atomic_path, read_json, write_json


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"accuracy": 0.5})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"accuracy": ')
        raise RuntimeError("crash mid-write")
    assert read_json(target) == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_failed_directory_keeps_the_old_one(tmp_path):
    target = tmp_path / "cache"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("new, half")
        raise RuntimeError("crash")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_written_files_are_readable_by_others(tmp_path):
    write_json(tmp_path / "r.json", {})
    with atomic_dir(tmp_path / "d"):
        pass
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_nan_is_refused_not_written(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "m.json", {"loss": float("nan")})
    assert not (tmp_path / "m.json").exists()
