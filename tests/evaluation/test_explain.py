"""Tests of leukofed.evaluation.explain on a tiny attention CNN and random images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from leukofed.config import CamParams, ModelParams
from leukofed.evaluation.explain import (
    compute_cams,
    explain_model,
    randomisation_similarity,
    randomised_copy,
    select_panels,
)
from leukofed.model import build_model
from leukofed.provenance import DataProvenance
from leukofed.training import configure_torch, predict_proba

CLASSES = ["Benign", "Early", "Pre", "Pro"]
SIDE = 32
TINY = ModelParams(width=4, attention="cbam", attention_reduction=2, spatial_kernel=3, norm="batch",
                   group_norm_groups=2, dropout=0.0)


@pytest.fixture(scope="module")
def model():
    configure_torch(1, 0)
    return build_model(TINY, len(CLASSES)).eval()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, SIDE, SIDE, 3), dtype=np.uint8)
    images[:, 8:20, 8:20, 0] = 30  # a dark "cell" gives the maps some structure
    return images


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "eigencam"])
def test_maps_have_the_image_shape_and_lie_in_unit_range(model, images, method):
    cams = compute_cams(model, images, np.zeros(len(images), dtype=int), method, batch_size=5)
    assert cams.shape == (len(images), SIDE, SIDE)
    assert cams.min() >= 0.0 and cams.max() <= 1.0 + 1e-6


def test_randomised_model_maps_are_less_similar_than_the_model_to_itself(model, images):
    targets = predict_proba(model, images, 16).argmax(axis=1)
    trained = compute_cams(model, images, targets, "gradcam", batch_size=16)
    again = compute_cams(model, images, targets, "gradcam", batch_size=16)
    randomised = randomised_copy(model, seed=1)
    assert not torch.equal(randomised.classifier.weight, model.classifier.weight)
    shuffled = compute_cams(randomised, images, targets, "gradcam", batch_size=16)
    self_similarity = randomisation_similarity(trained, again)
    random_similarity = randomisation_similarity(trained, shuffled)
    assert self_similarity == pytest.approx(1.0)
    assert random_similarity is not None and -1.0 <= random_similarity < self_similarity


def test_constant_maps_are_left_out_when_trained_and_count_zero_when_randomised():
    flat, varied = np.zeros((2, 4, 4)), np.random.default_rng(0).uniform(size=(2, 4, 4))
    assert randomisation_similarity(flat, varied) is None
    assert randomisation_similarity(np.stack([flat[0], varied[0]]), np.stack([varied[1], varied[0]])) == pytest.approx(1.0)
    assert randomisation_similarity(varied, np.stack([flat[0], varied[1]])) == pytest.approx(0.5)  # 0 and 1


def test_panels_pick_the_most_confident_correct_images_and_the_errors():
    y_true = np.array([0, 0, 0, 1, 1])
    proba = np.array([[0.6, 0.4], [0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.55, 0.45]])
    selection = select_panels(y_true, proba, panels_per_class=1, max_errors=5)
    assert [rows.tolist() for rows in selection["correct"]] == [[1], [3]]
    assert selection["errors"].tolist() == [2, 4] and selection["n_errors"] == 2
    assert select_panels(y_true, proba, panels_per_class=1, max_errors=1)["errors"].tolist() == [2]


def test_explain_model_writes_panels_and_cam_json(model, images, tmp_path):
    y_true = np.arange(len(images)) % len(CLASSES)
    proba = predict_proba(model, images, 16)
    params = CamParams(methods=["gradcam", "eigencam"], panels_per_class=1, max_error_panels=2, randomisation_seed=0)
    provenance = DataProvenance("toy", "synthetic", "/data/toy", "cd" * 32, len(images))
    relpaths = [f"Original/x/{i}.jpg" for i in range(len(images))]
    record = explain_model(model, images, y_true, proba, relpaths, CLASSES, params, tmp_path, provenance,
                           {"name": "tiny"}, batch_size=16)

    assert json.loads((tmp_path / "cam.json").read_text()) == record
    assert record["methods"] == ["gradcam", "eigencam"] and record["target_layer"] == "attention"
    for value in record["randomisation_similarity"].values():
        assert value is None or -1.0 <= value <= 1.0
    files = [panel["file"] for panel in record["panels"]]
    assert files == [f"correct_{name}.png" for name in CLASSES] + ["errors.png"]
    for panel in record["panels"]:
        assert Image.open(tmp_path / panel["file"]).size[0] > 300
    errors = record["panels"][-1]["images"]
    assert len(errors) == min(2, record["n_errors"]) and all(entry["true"] != entry["predicted"] for entry in errors)
    assert record["data"]["fingerprint"] == "cd" * 32
