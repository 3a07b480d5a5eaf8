"""Where the model looks: class-activation maps (pytorch-grad-cam), panels of test images, and a sanity check.

**Target layer**: ``model.attention``, the output of the attention module: the last spatial feature map
(``4 * model.width`` channels at 1/8 of the input side) and the one the head global-average-pools, so a
map there weighs exactly what the linear classifier sees (for a pooled linear head Grad-CAM reduces to
the original CAM of Zhou et al., 2016). With ``model.attention: none`` it is the separable block's output.

**Methods** (``analysis.cam.methods``): gradient-based GradCAM and GradCAM++ (and XGradCAM, LayerCAM),
and gradient-free EigenCAM (first principal component of the activations) or ScoreCAM. Every map
explains the class the trained model predicts, so it matches the panel's title; pytorch-grad-cam
scales each map to [0, 1] and upsamples it to the image.

**Randomisation check** (Adebayo et al., 2018, "Sanity checks for saliency maps"), full
re-initialisation variant: a copy of the model has every layer re-drawn from its initialiser (seed
``analysis.cam.randomisation_seed``; BatchNorm statistics reset), and its maps for the same images and
target classes are compared with the trained model's by Spearman's rank correlation of the flattened
maps, averaged over images. A method whose maps barely change (similarity near 1) shows image structure,
not what the model learned; a useful one drops towards 0. Where the trained model's map is constant the
image says nothing and is left out (the similarity is None if every image is); where only the
re-initialised model's map is constant (e.g. all zero after Grad-CAM's ReLU), it shares no ranking with
the trained map and counts as 0.

**Panels**: per class, the ``panels_per_class`` most confident correct test images; and the
misclassified test images, most confident first, up to ``max_error_panels``. Each row shows the image
and one overlay per method, titled with the true and predicted class and the confidence.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from leukofed.config import CamParams
from leukofed.io import write_json
from leukofed.plotting import new_figure, save_png, wrap_title
from leukofed.provenance import DataProvenance
from leukofed.training import images_to_tensor

CAM_FILE = "cam.json"
ERRORS_PNG_FILE = "errors.png"
TARGET_LAYER = "attention"  # attribute of AttentionCNN whose output the maps are computed on
# analysis.cam.methods name -> pytorch_grad_cam class name
CAM_CLASS_NAMES = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "scorecam": "ScoreCAM",
}
_PANEL_INCHES = 2.2  # side of one image in a panel grid


def correct_png_file(class_name: str) -> str:
    """File name of the panel grid of correctly classified images of ``class_name``."""
    return f"correct_{class_name}.png"


def compute_cams(model: nn.Module, images: np.ndarray, targets: np.ndarray, method: str, batch_size: int) -> np.ndarray:
    """Class-activation maps of ``model`` for uint8 images, computed by pytorch-grad-cam.

    Parameters
    ----------
    model : AttentionCNN
        Put in eval mode (pytorch-grad-cam does so).
    images : ndarray of shape (n, H, W, 3), dtype uint8
    targets : ndarray of shape (n,)
        The class each map explains.
    method : str
        A key of :data:`CAM_CLASS_NAMES`.
    batch_size : int

    Returns
    -------
    ndarray of shape (n, H, W), float32 in [0, 1]
    """
    import pytorch_grad_cam  # slow to import (~3-10 s): only when maps are made
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam_class = getattr(pytorch_grad_cam, CAM_CLASS_NAMES[method])
    maps = []
    with cam_class(model=model, target_layers=[getattr(model, TARGET_LAYER)]) as cam:
        for start in range(0, len(images), batch_size):
            batch = images_to_tensor(np.asarray(images[start : start + batch_size]))
            wanted = [ClassifierOutputTarget(int(label)) for label in targets[start : start + batch_size]]
            maps.append(cam(input_tensor=batch, targets=wanted))
    height, width = images.shape[1:3]
    return np.concatenate(maps) if maps else np.zeros((0, height, width), dtype=np.float32)


def randomised_copy(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every layer re-initialised (seeded; the global generators are left alone)."""
    randomised = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in randomised.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()  # BatchNorm's also resets its running statistics
    return randomised.eval()


def randomisation_similarity(trained: np.ndarray, randomised: np.ndarray) -> float | None:
    """Mean Spearman rank correlation between paired maps of the trained and the re-initialised model.

    Parameters
    ----------
    trained, randomised : ndarray of shape (n, H, W)

    Returns
    -------
    float in [-1, 1], or None if every trained map is constant. A pair whose trained map is constant
    is left out; a constant re-initialised map counts as 0 (it shares no ranking with the trained one).
    """
    if trained.shape != randomised.shape:
        raise ValueError(f"maps must pair up, got shapes {trained.shape} and {randomised.shape}")
    correlations = [
        spearmanr(a.ravel(), b.ravel()).statistic if np.ptp(b) > 0 else 0.0
        for a, b in zip(trained, randomised, strict=True)
        if np.ptp(a) > 0
    ]
    return float(np.mean(correlations)) if correlations else None


def select_panels(y_true: np.ndarray, proba: np.ndarray, panels_per_class: int, max_errors: int) -> dict:
    """Which test images the panels show.

    Returns
    -------
    dict
        ``correct``: per class index, up to ``panels_per_class`` rows of correctly classified images
        of that class, most confident first; ``errors``: up to ``max_errors`` misclassified rows, most
        confident first; ``n_errors``: how many images are misclassified in all.
    """
    y_true, proba = np.asarray(y_true), np.asarray(proba)
    predicted, confidence = proba.argmax(axis=1), proba.max(axis=1)
    by_confidence = np.argsort(-confidence, kind="stable")
    correct_sorted = by_confidence[predicted[by_confidence] == y_true[by_confidence]]
    errors = by_confidence[predicted[by_confidence] != y_true[by_confidence]]
    return {
        "correct": [correct_sorted[y_true[correct_sorted] == label][:panels_per_class] for label in range(proba.shape[1])],
        "errors": errors[:max_errors],
        "n_errors": len(errors),
    }


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """A map drawn over a uint8 RGB image as a jet heat map (pytorch-grad-cam's ``show_cam_on_image``)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(np.asarray(image, dtype=np.float32) / 255, cam, use_rgb=True)


def plot_panels(images: np.ndarray, cams: dict[str, np.ndarray], captions: list[str], path: Path, title: str,
                empty_message: str) -> None:
    """One row per image: the image, then its overlay for every method; written as PNG atomically.

    Parameters
    ----------
    images : ndarray of shape (n, H, W, 3), dtype uint8
    cams : dict
        Method name -> maps of shape (n, H, W).
    captions : list of str
        One per image (true / predicted class, confidence).
    path : Path
    title : str
    empty_message : str
        Shown instead of panels when ``images`` is empty, so the file always exists.
    """

    columns = 1 + len(cams)
    width = max(_PANEL_INCHES * columns, 6.0)
    figure = new_figure(width, _PANEL_INCHES * max(len(images), 1) + 0.8)
    figure.suptitle(wrap_title(title, width), fontsize="medium")
    if len(images) == 0:
        axes = figure.add_subplot()
        axes.axis("off")
        axes.text(0.5, 0.5, empty_message, ha="center", va="center")
    else:
        grid = figure.subplots(len(images), columns, squeeze=False)
        for row, (image, caption) in enumerate(zip(images, captions, strict=True)):
            pictures = [("image", image)] + [(name, overlay(image, maps[row])) for name, maps in cams.items()]
            for axes, (name, picture) in zip(grid[row], pictures, strict=True):
                axes.imshow(picture)
                axes.set_xticks([])
                axes.set_yticks([])
                if row == 0:
                    axes.set_title(name, fontsize="medium")
            grid[row][0].set_ylabel(caption, fontsize="small")
    save_png(figure, path)


def explain_model(
    model: nn.Module,
    images: np.ndarray,
    y_true: np.ndarray,
    proba: np.ndarray,
    relpaths: list[str],
    classes: list[str],
    params: CamParams,
    out_dir: Path,
    provenance: DataProvenance,
    model_info: dict,
    batch_size: int,
) -> dict:
    """Write the panel grids and ``cam.json`` of one model on its test images.

    Parameters
    ----------
    model : AttentionCNN
    images : ndarray of shape (n, H, W, 3), dtype uint8
        The test images.
    y_true : ndarray of shape (n,)
    proba : ndarray of shape (n, n_classes)
        The model's probabilities for ``images``.
    relpaths : list of str
        Each image's file, relative to the dataset root.
    classes : list of str
    params : CamParams
    out_dir : Path
        Receives ``correct_<class>.png`` per class, ``errors.png`` and ``cam.json``.
    provenance : DataProvenance
    model_info : dict
        What is explained (name, path).
    batch_size : int

    Returns
    -------
    dict
        The content of ``cam.json``: ``methods``, ``target_layer``, ``randomisation`` (``variant``,
        ``seed``, ``n_images``, ``measure``), ``randomisation_similarity`` (method -> float or None),
        ``panels`` (``file``, ``kind`` correct/errors, ``class``, ``images``: ``relpath``, ``true``,
        ``predicted``, ``confidence``), ``n_errors``, ``n_test``, ``model`` and ``data``.
    """
    out_dir = Path(out_dir)
    y_true, proba = np.asarray(y_true), np.asarray(proba)
    predicted = proba.argmax(axis=1)
    selection = select_panels(y_true, proba, params.panels_per_class, params.max_error_panels)
    shown = np.concatenate([*selection["correct"], selection["errors"]])
    shown_images = np.asarray(images[shown])
    cams = {method: compute_cams(model, shown_images, predicted[shown], method, batch_size) for method in params.methods}
    similarity = _randomisation(model, shown_images, predicted[shown], cams, params, batch_size)

    panels, offset = [], 0
    groups = [(correct_png_file(name), "correct", name, rows) for name, rows in zip(classes, selection["correct"], strict=True)]
    groups.append((ERRORS_PNG_FILE, "errors", None, selection["errors"]))
    for file_name, kind, class_name, rows in groups:
        part = slice(offset, offset + len(rows))
        offset += len(rows)
        entries = [_panel_entry(row, relpaths, y_true, proba, classes) for row in rows]
        what = f"correctly classified {class_name}" if kind == "correct" else "misclassified"
        title = provenance.title(f"{model_info['name']} — {what} test images, most confident first")
        plot_panels(shown_images[part], {method: maps[part] for method, maps in cams.items()},
                    [_caption(entry) for entry in entries], out_dir / file_name, title,
                    empty_message=f"no {what} test image")
        panels.append({"file": file_name, "kind": kind, "class": class_name, "images": entries})

    record = {
        "methods": list(params.methods),
        "target_layer": TARGET_LAYER,
        "randomisation": {"variant": "full re-initialisation", "seed": params.randomisation_seed,
                          "n_images": len(shown), "measure": "mean Spearman rank correlation of the maps"},
        "randomisation_similarity": similarity,
        "panels": panels,
        "n_errors": selection["n_errors"],
        "n_test": len(y_true),
        "model": model_info,
        "data": provenance.to_dict(),
    }
    write_json(out_dir / CAM_FILE, record)  # last: its presence implies the panels are complete
    return record


def _randomisation(model: nn.Module, images: np.ndarray, targets: np.ndarray, cams: dict[str, np.ndarray],
                   params: CamParams, batch_size: int) -> dict[str, float | None]:
    """Similarity of each method's maps between the trained model and its re-initialised copy."""
    randomised = randomised_copy(model, params.randomisation_seed)
    return {
        method: randomisation_similarity(maps, compute_cams(randomised, images, targets, method, batch_size))
        for method, maps in cams.items()
    }


def _panel_entry(row: int, relpaths: list[str], y_true: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict:
    return {
        "relpath": relpaths[row],
        "true": classes[int(y_true[row])],
        "predicted": classes[int(proba[row].argmax())],
        "confidence": float(proba[row].max()),
    }


def _caption(entry: dict) -> str:
    return f"{Path(entry['relpath']).name}\ntrue {entry['true']}, predicted {entry['predicted']}\nconfidence {entry['confidence']:.3f}"
