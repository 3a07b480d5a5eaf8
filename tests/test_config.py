"""params.yaml validation: every bad value is refused with a message naming its key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from leukofed.config import load_params, parse_params
from leukofed.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_repository_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.dataset == "synthetic"
    assert params.dataset_spec().source == "synthetic"
    assert params.dataset_spec("all-aria2021").source == "folder"


@pytest.mark.parametrize(
    ("mutate", "key", "says"),
    [
        (lambda r: r["train"].update(epochs="ten"), "train.epochs", "valid integer"),
        (lambda r: r["train"].update(epochs=0), "train.epochs", "greater than 0"),
        (lambda r: r["train"].update(lr=-1.0), "train.lr", "greater than 0"),
        (lambda r: r["data"].update(image_size=4), "data.image_size", "greater than or equal to 16"),
        (lambda r: r["model"].update(attention="transformer"), "model.attention", "'cbam', 'se' or 'none'"),
        (lambda r: r["model"].update(spatial_kernel=4), "model.spatial_kernel", "must be odd"),
        (lambda r: r["train"].update(epoch=3), "train.epoch", "unknown key"),
        (lambda r: r.update(colour="red"), "colour", "unknown key"),
        (lambda r: r["train"].pop("batch_size"), "train.batch_size", "missing"),
        (lambda r: r["split"].update(test=0.3), "split", "sum to 1"),
        (lambda r: r["data"].update(on_invalid="ignore"), "data.on_invalid", "'fail' or 'skip'"),
        (lambda r: r.update(dataset="nope"), "dataset 'nope' is not defined", "under datasets"),
        (lambda r: r["datasets"].update(web={"source": "url", "url": "http://x/a.zip"}), "datasets.web", "needs sha256"),
        (lambda r: r["datasets"].update(bad={"source": "folder"}), "datasets.bad", "needs path"),
        (lambda r: r["data"]["class_folders"].update(Extra="Blast"), "data", "not in classes"),
    ],
)
def test_bad_values_name_their_key(raw, mutate, key, says):
    bad = copy.deepcopy(raw)
    mutate(bad)
    with pytest.raises(ConfigError) as error:
        parse_params(bad, source="params.yaml")
    message = str(error.value)
    assert key in message
    assert says in message


def test_bool_is_not_an_integer(raw):
    """Strict types: YAML `epochs: true` must not silently become 1."""
    raw["train"]["epochs"] = True
    with pytest.raises(ConfigError, match="train.epochs"):
        parse_params(raw)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "absent.yaml")
    broken = tmp_path / "params.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(broken)
    broken.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_params(broken)


@pytest.mark.parametrize(
    ("mutate", "key", "says"),
    [
        (lambda r: r["analysis"]["cam"].update(methods=["gradcam", "gradcam"]), "analysis.cam.methods", "twice"),
        (lambda r: r["analysis"]["cam"].update(methods=["saliency"]), "analysis.cam.methods", "eigencam"),
        (lambda r: r["analysis"]["audit"].update(corner_grid=7), "analysis.audit", "must divide corner_size"),
        (lambda r: r["analysis"]["audit"].update(corner="middle"), "analysis.audit.corner", "bottom-right"),
        (lambda r: r["analysis"].update(temperature_bounds=[2.0, 5.0]), "analysis.temperature_bounds", "low < 1 < high"),
        (lambda r: r["analysis"]["bootstrap"].update(confidence=95), "analysis.bootstrap.confidence", "less than 1"),
    ],
)
def test_bad_analysis_values_name_their_key(raw, mutate, key, says):
    mutate(raw)
    with pytest.raises(ConfigError) as error:
        parse_params(raw)
    assert key in str(error.value) and says in str(error.value)
