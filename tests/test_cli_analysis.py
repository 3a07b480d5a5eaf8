"""The analysis subcommands of the CLI: `predict` on good and bad inputs, and clear errors for missing inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukofed.cli import main
from leukofed.config import ModelParams
from leukofed.model import build_model
from leukofed.provenance import DataProvenance
from leukofed.training import configure_torch, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
PARAMS = ["--params", str(REPO / "params.yaml")]
CLASSES = ["Benign", "Early", "Pre", "Pro"]
TINY = ModelParams(width=4, attention="cbam", attention_reduction=2, spatial_kernel=3, norm="batch",
                   group_norm_groups=2, dropout=0.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    configure_torch(1, 0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(path, build_model(TINY, len(CLASSES)), model_params=TINY, classes=CLASSES, image_size=32,
                    provenance=DataProvenance("toy", "synthetic", "synthetic:seed=0", "ef" * 32, 8))
    return path


def _image(path: Path, size: tuple[int, int] = (48, 40)) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _error_of(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_predict_prints_every_class_probability_and_writes_overlays(checkpoint, tmp_path, capsys):
    images = [_image(tmp_path / "a.png"), _image(tmp_path / "b.jpg", size=(64, 64))]
    assert main(["predict", *PARAMS, *map(str, images), "--model", str(checkpoint), "--cam", str(tmp_path / "cams")]) == 0
    out = capsys.readouterr().out
    assert "uncalibrated" in out
    for path in images:
        line = next(line for line in out.splitlines() if line.startswith(f"{path}:"))
        predicted, *scores = line.removeprefix(f"{path}: ").split()
        probabilities = dict(score.split("=") for score in scores)
        assert list(probabilities) == CLASSES and predicted in CLASSES
        assert sum(map(float, probabilities.values())) == pytest.approx(1.0, abs=1e-3)
        assert Image.open(tmp_path / "cams" / f"{path.stem}_gradcam.png").size == (32, 32)


def test_predict_applies_the_temperature_of_a_calibration_file(checkpoint, tmp_path, capsys):
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"temperature": 2.5}))
    image = _image(tmp_path / "a.png")
    assert main(["predict", *PARAMS, str(image), "--model", str(checkpoint), "--temperature-from", str(calibration)]) == 0
    assert "calibrated with T = 2.500" in capsys.readouterr().out


def test_predict_names_every_unreadable_image(checkpoint, tmp_path, capsys):
    good = _image(tmp_path / "good.png")
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    err = _error_of(capsys, ["predict", *PARAMS, str(good), str(broken), str(empty), str(tmp_path / "absent.png"),
                             "--model", str(checkpoint)])
    for name in ("broken.jpg", "empty.png", "absent.png"):
        assert name in err
    assert "good.png" not in err


def test_predict_missing_model_names_it(tmp_path, capsys):
    err = _error_of(capsys, ["predict", *PARAMS, str(_image(tmp_path / "a.png")), "--model", str(tmp_path / "nope.pt")])
    assert "nope.pt" in err


def test_predict_bad_calibration_file_names_it(checkpoint, tmp_path, capsys):
    image = _image(tmp_path / "a.png")
    for name, content in (("no-temperature.json", "{}"), ("negative.json", '{"temperature": -1}'), ("junk.json", "{")):
        (tmp_path / name).write_text(content)
        err = _error_of(capsys, ["predict", *PARAMS, str(image), "--model", str(checkpoint), "--temperature-from", str(tmp_path / name)])
        assert name in err and "calibrat" in err


def test_predict_refuses_overlays_that_would_overwrite_each_other(checkpoint, tmp_path, capsys):
    (tmp_path / "x").mkdir()
    images = [_image(tmp_path / "a.png"), _image(tmp_path / "x" / "a.png")]
    err = _error_of(capsys, ["predict", *PARAMS, *map(str, images), "--model", str(checkpoint), "--cam", str(tmp_path / "c")])
    assert "'a'" in err and "share a file name" in err


def test_compare_without_evaluations_says_which_stage_to_run(tmp_path, capsys):
    err = _error_of(capsys, ["compare", *PARAMS, "--results", str(tmp_path), "--out", str(tmp_path / "s.json")])
    assert "predictions.csv" in err and "evaluate" in err
    assert not (tmp_path / "s.json").exists()


def test_calibrate_missing_cache_says_which_stage_to_run(checkpoint, tmp_path, capsys):
    err = _error_of(capsys, ["calibrate", *PARAMS, "--model", str(checkpoint), "--cache", str(tmp_path / "cache"),
                             "--split", str(tmp_path / "split.csv"), "--out-dir", str(tmp_path / "out")])
    assert str(tmp_path / "cache") in err and "preprocess" in err


def test_help_lists_the_analysis_stages(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for stage in ("calibrate", "explain", "audit", "compare", "predict"):
        assert stage in out
