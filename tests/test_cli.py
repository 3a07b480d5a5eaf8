"""The CLI turns user errors into one clear line and exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from leukofed.cli import main

REPO = Path(__file__).resolve().parents[1]


def _params_with(tmp_path: Path, **datasets) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"].update(datasets)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _error_of(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_params_file_names_the_key(tmp_path, capsys):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["batch_size"] = -4
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    err = _error_of(capsys, ["split", "--params", str(path), "--cache", "c", "--out", "o.csv"])
    assert "train.batch_size" in err and "greater than 0" in err


def test_unknown_dataset_lists_the_defined_ones(tmp_path, capsys):
    err = _error_of(capsys, ["acquire", "--params", str(REPO / "params.yaml"), "--dataset", "nope", "--workdir", str(tmp_path)])
    assert "'nope' is not defined" in err and "all-aria2021" in err


def test_missing_real_data_folder_says_where_to_get_it(tmp_path, capsys):
    path = _params_with(tmp_path, mine={"source": "folder", "path": str(tmp_path / "not-here")})
    err = _error_of(capsys, ["acquire", "--params", str(path), "--dataset", "mine", "--workdir", str(tmp_path / "w")])
    assert "not-here" in err
    assert not (tmp_path / "w" / "manifest.csv").exists()


def test_missing_cache_says_which_stage_to_run(tmp_path, capsys):
    err = _error_of(capsys, ["split", "--params", str(REPO / "params.yaml"), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "s.csv")])
    assert str(tmp_path / "cache") in err and "preprocess" in err


def test_evaluate_cache_needs_split(tmp_path, capsys):
    err = _error_of(capsys, ["evaluate", "--model", "m.pt", "--cache", "c", "--out-dir", str(tmp_path)])
    assert "--split" in err


def test_evaluate_missing_model_names_it(tmp_path, capsys):
    err = _error_of(capsys, ["evaluate", "--model", str(tmp_path / "absent.pt"), "--data", str(tmp_path), "--out-dir", str(tmp_path / "o")])
    assert "absent.pt" in err


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for stage in ("acquire", "preprocess", "split", "train", "evaluate", "report"):
        assert stage in out
