"""Local training: augmentation, learning, determinism, best-epoch selection, checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from leukofed.config import AugmentParams, ModelParams, TrainParams, load_params
from leukofed.errors import ConfigError, DataError
from leukofed.model import build_model
from leukofed.provenance import DataProvenance
from leukofed.training import (
    CheckpointError,
    NonFiniteLossError,
    augment_batch,
    configure_torch,
    images_to_tensor,
    load_checkpoint,
    predict_proba,
    save_checkpoint,
    train_model,
    training_batch,
)

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"
SIZE = 32
CLASSES = ["red", "blue"]
NO_AUGMENT = {"hflip": False, "vflip": False, "rot90": False, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0}


@pytest.fixture(scope="module")
def repo_params():
    return load_params(PARAMS_FILE)


@pytest.fixture(autouse=True)
def _deterministic_torch(repo_params):
    configure_torch(repo_params.runtime.threads, seed=0)


def _train_params(repo_params, **changes) -> TrainParams:
    return TrainParams.model_validate({**repo_params.train.model_dump(), "batch_size": 16, **changes})


def _model(repo_params, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(repo_params.model, len(CLASSES))


def _red_blue(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy reddish (label 0) or bluish (label 1) images: separable by colour alone."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    colours = np.where(labels[:, None] == 0, [200, 40, 40], [40, 40, 200])
    noise = rng.integers(-40, 41, (n, SIZE, SIZE, 3))
    return np.clip(colours[:, None, None, :] + noise, 0, 255).astype(np.uint8), labels


def _asymmetric_image() -> torch.Tensor:
    """One (3, S, S) image whose four quarter turns all differ."""
    return torch.arange(3 * SIZE * SIZE, dtype=torch.float32).view(3, SIZE, SIZE) / (3 * SIZE * SIZE)


def _states_equal(left: dict, right: dict) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[key], right[key]) for key in left)


# --- conversion and augmentation -------------------------------------------------------------------


def test_images_to_tensor_gives_nchw_floats_in_unit_range():
    images = np.zeros((2, 4, 5, 3), dtype=np.uint8)
    images[1, 2, 3] = [255, 0, 51]

    tensor = images_to_tensor(images)

    assert tensor.shape == (2, 3, 4, 5) and tensor.dtype == torch.float32
    assert tensor[1, :, 2, 3].tolist() == pytest.approx([1.0, 0.0, 0.2])


def test_images_to_tensor_refuses_non_uint8_rgb():
    with pytest.raises(DataError, match="uint8"):
        images_to_tensor(np.zeros((2, 4, 4, 3), dtype=np.float32))


def test_augment_preserves_shape_and_range_and_is_deterministic(repo_params):
    batch = torch.rand(8, 3, SIZE, SIZE)

    first = augment_batch(batch, repo_params.train.augment, torch.Generator().manual_seed(3))
    second = augment_batch(batch, repo_params.train.augment, torch.Generator().manual_seed(3))

    assert first.shape == batch.shape
    assert first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, second)
    assert not torch.equal(first, batch)


def test_augmenting_uint8_pixels_equals_augmenting_their_floats(repo_params):
    images = np.random.default_rng(0).integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
    before = pixels.clone()

    from_uint8 = augment_batch(pixels, repo_params.train.augment, torch.Generator().manual_seed(5))
    from_float = augment_batch(images_to_tensor(images), repo_params.train.augment, torch.Generator().manual_seed(5))

    assert from_uint8.dtype == torch.float32
    assert torch.equal(from_uint8, from_float)
    assert torch.equal(pixels, before)


def test_training_batch_is_the_augmented_selection_in_channels_last(repo_params):
    images = np.random.default_rng(1).integers(0, 256, (10, SIZE, SIZE, 3), dtype=np.uint8)
    index = torch.tensor([7, 2, 5])

    batch = training_batch(images, index, repo_params.train.augment, torch.Generator().manual_seed(2), torch.device("cpu"))
    expected = augment_batch(images_to_tensor(images[[7, 2, 5]]), repo_params.train.augment, torch.Generator().manual_seed(2))

    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, expected)


def test_colour_jitter_blends_towards_the_luma_as_torchvision_does():
    batch = torch.rand(6, 3, SIZE, SIZE)
    params = AugmentParams(**{**NO_AUGMENT, "contrast": 0.3, "saturation": 0.3})
    draws = torch.Generator().manual_seed(4)
    contrast = 1 + 0.3 * (2 * torch.rand(6, generator=draws) - 1)
    saturation = 1 + 0.3 * (2 * torch.rand(6, generator=draws) - 1)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)

    out = augment_batch(batch, params, torch.Generator().manual_seed(4))

    factor = contrast.view(6, 1, 1, 1)
    mean_grey = (batch * luma).sum(dim=1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    expected = (factor * batch + (1 - factor) * mean_grey).clamp(0, 1)
    factor = saturation.view(6, 1, 1, 1)
    expected = (factor * expected + (1 - factor) * (expected * luma).sum(dim=1, keepdim=True)).clamp(0, 1)
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)


def test_augment_with_everything_disabled_is_the_identity():
    batch = torch.rand(4, 3, SIZE, SIZE)

    out = augment_batch(batch, AugmentParams(**NO_AUGMENT), torch.Generator().manual_seed(0))

    assert torch.equal(out, batch)


def test_rot90_turns_each_sample_by_a_quarter_turn_count():
    image = _asymmetric_image()
    batch = image.expand(32, -1, -1, -1).contiguous()

    out = augment_batch(batch, AugmentParams(**{**NO_AUGMENT, "rot90": True}), torch.Generator().manual_seed(0))

    turns = []
    for sample in out:
        matches = [k for k in range(4) if torch.equal(sample, torch.rot90(image, k, dims=(1, 2)))]
        assert len(matches) == 1
        turns.extend(matches)
    assert set(turns) == {0, 1, 2, 3}


def test_flips_give_the_image_or_its_mirror():
    image = _asymmetric_image()
    batch = image.expand(16, -1, -1, -1).contiguous()

    out = augment_batch(batch, AugmentParams(**{**NO_AUGMENT, "hflip": True}), torch.Generator().manual_seed(0))

    flipped = [torch.equal(sample, image.flip(2)) for sample in out]
    assert all(flipped[i] or torch.equal(out[i], image) for i in range(16))
    assert 0 < sum(flipped) < 16


def test_brightness_scales_by_a_factor_within_the_strength():
    batch = torch.full((16, 3, SIZE, SIZE), 0.5)

    out = augment_batch(batch, AugmentParams(**{**NO_AUGMENT, "brightness": 0.2}), torch.Generator().manual_seed(0))

    factors = out[:, 0, 0, 0] / 0.5
    assert ((factors >= 0.8) & (factors <= 1.2)).all()
    assert torch.equal(out, out[:, :1, :1, :1].expand_as(out))  # one factor per sample
    assert factors.unique().numel() > 1


def test_rot90_refuses_non_square_images():
    with pytest.raises(ConfigError, match="train.augment.rot90"):
        augment_batch(torch.rand(2, 3, 32, 40), AugmentParams(**{**NO_AUGMENT, "rot90": True}), torch.Generator())


# Page faults of re-allocating a 64 MiB block (far above glibc's default mmap threshold) four times,
# in a fresh interpreter with or without reuse_freed_memory(). A fresh process keeps other tests'
# allocations out of the count; absolute counts vary with the kernel, so the test compares the two.
# With reuse, the heap grows by up to 4 blocks before freed ones fit the next aligned request (each
# growth faults 16k pages, measured), so 6 warm-up allocations come first: then reuse faults none.
_FAULTS_SCRIPT = """
import resource, sys, torch
from leukofed.training import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
block = 64 * 2**20 // 4
for _ in range(6):
    torch.empty(block).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    torch.empty(block).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_reusing_freed_memory_saves_most_page_faults_of_large_blocks():
    assert _page_faults("reuse") < _page_faults("default") / 2


# --- training --------------------------------------------------------------------------------------


def test_learns_a_separable_problem_and_records_history(repo_params):
    images, labels = _red_blue(64, seed=0)
    val_images, val_labels = _red_blue(32, seed=1)
    model = _model(repo_params)

    result = train_model(model, images, labels, _train_params(repo_params), val_images=val_images,
                         val_labels=val_labels, epochs=4)

    assert [record["epoch"] for record in result.history] == [1, 2, 3, 4]
    assert set(result.history[0]) == {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"}
    assert result.history[result.best_epoch - 1]["val_accuracy"] >= 0.95
    assert (predict_proba(model, val_images, batch_size=8).argmax(axis=1) == val_labels).mean() >= 0.95


def test_same_seed_gives_bitwise_identical_weights(repo_params):
    images, labels = _red_blue(40, seed=0)
    params = _train_params(repo_params, epochs=2)

    first = train_model(_model(repo_params), images, labels, params)
    torch.manual_seed(123)  # the caller's global generator must not matter
    second = train_model(_model(repo_params), images, labels, params)

    assert _states_equal(first.state_dict, second.state_dict)
    assert first.history[-1]["train_loss"] == second.history[-1]["train_loss"]


def test_different_seeds_give_different_weights(repo_params):
    images, labels = _red_blue(40, seed=0)

    first = train_model(_model(repo_params), images, labels, _train_params(repo_params, epochs=1, seed=0))
    second = train_model(_model(repo_params), images, labels, _train_params(repo_params, epochs=1, seed=1))

    assert not _states_equal(first.state_dict, second.state_dict)


def test_best_validation_epoch_is_kept(repo_params):
    images, labels = _red_blue(64, seed=0)
    val_images, val_labels = _red_blue(32, seed=1)
    snapshots = {}
    model = _model(repo_params)

    def snapshot(record: dict) -> None:
        snapshots[record["epoch"]] = {key: value.clone() for key, value in model.state_dict().items()}

    # Swapped validation labels: the better the model learns, the worse it validates.
    result = train_model(model, images, labels, _train_params(repo_params), val_images=val_images,
                         val_labels=1 - val_labels, epochs=4, on_epoch=snapshot)

    accuracies = [record["val_accuracy"] for record in result.history]
    assert result.best_epoch == 1 + accuracies.index(max(accuracies))
    assert result.best_epoch < 4
    assert _states_equal(result.state_dict, snapshots[result.best_epoch])
    assert _states_equal(model.state_dict(), snapshots[result.best_epoch])


def test_without_validation_the_last_epoch_is_kept(repo_params):
    images, labels = _red_blue(32, seed=0)

    result = train_model(_model(repo_params), images, labels, _train_params(repo_params, epochs=2))

    assert result.best_epoch == 2
    assert result.history[-1]["val_loss"] is None and result.history[-1]["val_accuracy"] is None


def test_learning_rate_schedules(repo_params):
    images, labels = _red_blue(32, seed=0)

    cosine = train_model(_model(repo_params), images, labels, _train_params(repo_params, epochs=3))
    constant = train_model(_model(repo_params), images, labels,
                           _train_params(repo_params, epochs=3, lr_schedule="constant"))

    cosine_lrs = [record["lr"] for record in cosine.history]
    assert cosine_lrs[0] == repo_params.train.lr and cosine_lrs == sorted(cosine_lrs, reverse=True)
    assert [record["lr"] for record in constant.history] == [repo_params.train.lr] * 3


def test_diverging_training_names_the_epoch(repo_params):
    images, labels = _red_blue(32, seed=0)

    with pytest.raises(NonFiniteLossError, match="epoch 1"):
        train_model(_model(repo_params), images, labels, _train_params(repo_params, lr=1e30))


def test_training_continues_from_the_current_weights(repo_params):
    images, labels = _red_blue(64, seed=0)
    model = _model(repo_params)
    train_model(model, images, labels, _train_params(repo_params), epochs=3)
    trained = {name: value.clone() for name, value in model.named_parameters()}

    result = train_model(model, images, labels, _train_params(repo_params, lr=1e-12), epochs=1)

    assert all(torch.allclose(value, trained[name], atol=1e-6) for name, value in model.named_parameters())
    assert result.history[0]["train_accuracy"] >= 0.95


def test_proximal_term_keeps_weights_near_the_start(repo_params):
    images, labels = _red_blue(32, seed=0)
    start = {name: value.clone() for name, value in _model(repo_params).named_parameters()}

    def drift(mu: float) -> float:
        model = _model(repo_params)
        train_model(model, images, labels, _train_params(repo_params, epochs=2), proximal_mu=mu)
        return sum((value - start[name]).square().sum().item() for name, value in model.named_parameters())

    assert drift(100.0) < drift(0.0) / 2


def test_predict_proba_rows_are_distributions_and_mode_is_restored(repo_params):
    images, _ = _red_blue(10, seed=0)
    model = _model(repo_params).train()

    probabilities = predict_proba(model, images, batch_size=4)

    assert probabilities.shape == (10, len(CLASSES))
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-6)
    assert model.training


# --- checkpoints -----------------------------------------------------------------------------------


def _provenance(n_images: int) -> DataProvenance:
    return DataProvenance("tiny", "synthetic", "memory", "0" * 64, n_images)


def test_checkpoint_round_trip_gives_identical_predictions(repo_params, tmp_path):
    images, labels = _red_blue(32, seed=0)
    model = _model(repo_params)
    train_model(model, images, labels, _train_params(repo_params, epochs=1))
    path = tmp_path / "model.pt"

    save_checkpoint(path, model, model_params=repo_params.model, classes=CLASSES, image_size=SIZE,
                    provenance=_provenance(32), extra={"best_epoch": 1, "history": [{"val_loss": None}]})
    loaded, meta = load_checkpoint(path)

    assert np.array_equal(predict_proba(loaded, images, 16), predict_proba(model, images, 16))
    assert meta["classes"] == CLASSES and meta["image_size"] == SIZE
    assert meta["provenance"] == _provenance(32).to_dict()
    assert ModelParams.model_validate(meta["model_params"]) == repo_params.model
    assert meta["extra"]["best_epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left


def test_checkpoint_refuses_values_torch_cannot_load_safely(repo_params, tmp_path):
    with pytest.raises(TypeError, match="extra.when"):
        save_checkpoint(tmp_path / "model.pt", _model(repo_params), model_params=repo_params.model,
                        classes=CLASSES, image_size=SIZE, provenance=_provenance(1), extra={"when": object()})


def test_loading_a_missing_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "absent.pt"

    with pytest.raises(CheckpointError, match="absent.pt"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", ["random bytes", "foreign torch file"])
def test_loading_a_foreign_file_names_it(tmp_path, content):
    path = tmp_path / "foreign.pt"
    if content == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(256))
    else:
        torch.save({"weights": torch.zeros(2)}, path)

    with pytest.raises(CheckpointError, match="foreign.pt"):
        load_checkpoint(path)
