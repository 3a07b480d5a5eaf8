"""Membership-inference audit: how well can someone holding the model tell training images from others?

The attacker queries the trained (global) model with an image and its label and must decide whether
the image was in some site's training data (a *member*) or not. Members are the training images of
the sites; non-members are the held-out test images, drawn from the same distribution by the split.
Each attack turns a query into a score (higher = "member"); scikit-learn's ``roc_curve`` and
``roc_auc_score`` turn the scores into the attack's ROC AUC (0.5 = no better than guessing), its TPR
at low false-positive rates (the regime that matters: confidently exposing a few images, Carlini et
al., 2022) and the membership advantage ``max(TPR - FPR)`` (Yeom et al., 2018).

Attacks:

- ``loss``: minus the cross-entropy of the true label (Yeom et al., 2018): training pulls members'
  losses down.
- ``confidence``: the top softmax probability; needs no label.
- ``calibrated``: a shadow-model-free, class-calibrated variant of LiRA-offline (Carlini et al.,
  2022). The statistic is the logit-scaled confidence ``phi = log p_y - log(1 - p_y)``, averaged over
  the 8 flips and quarter turns of the image (label-preserving for smears, and the augmentations the
  model trained with); the score is its z-score against the non-member distribution of its class,
  fitted on a reference share of the non-members (``privacy.attack.reference_fraction``) that is left
  out of the scoring. LiRA estimates that distribution per image from shadow models; the class is
  the difficulty proxy that needs none. A class with fewer than two reference images uses the
  pooled reference.

All three attacks are scored on the same members (all, or a seeded sample of
``privacy.attack.max_members``) and the same non-reference non-members. A TPR at an FPR below
``1 / scored non-members`` is not resolvable: it is the TPR at zero false positives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from leukofed.config import AttackParams
from leukofed.errors import DataError
from leukofed.training import predict_logits

ATTACKS = ("loss", "confidence", "calibrated")
QUARTER_TURNS = 4  # with and without a flip: the 8 symmetries of a square image
MIN_REFERENCE = 2  # images of a class needed to estimate its spread; fewer: the pooled reference


def attack_metrics(member_scores: np.ndarray, nonmember_scores: np.ndarray, fprs: list[float]) -> dict:
    """ROC AUC, TPR at the given FPRs and membership advantage of one attack's scores.

    Parameters
    ----------
    member_scores, nonmember_scores : np.ndarray
        One score per queried image, higher meaning "member".
    fprs : list of float
        False-positive rates to read the TPR at: the largest TPR whose FPR does not exceed each.

    Returns
    -------
    dict
        ``auc``, ``advantage`` (max TPR - FPR), ``tpr_at_fpr`` (list of ``{"fpr", "tpr"}``),
        ``n_members``, ``n_nonmembers`` and ``min_resolvable_fpr`` (``1 / n_nonmembers``).

    Raises
    ------
    DataError
        If either side is empty.
    """
    members, nonmembers = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    if len(members) == 0 or len(nonmembers) == 0:
        raise DataError(f"membership audit: need members and non-members, got {len(members)} and {len(nonmembers)}")
    truth = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    scores = np.concatenate([members, nonmembers])
    fpr, tpr, _ = roc_curve(truth, scores)
    return {
        "auc": float(roc_auc_score(truth, scores)),
        "advantage": float(np.max(tpr - fpr)),
        "tpr_at_fpr": [{"fpr": float(rate), "tpr": float(tpr[fpr <= rate].max())} for rate in fprs],
        "n_members": len(members),
        "n_nonmembers": len(nonmembers),
        "min_resolvable_fpr": 1 / len(nonmembers),
    }


def loss_scores(logits: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """Minus the per-image cross-entropy of the true label."""
    targets = torch.as_tensor(labels, dtype=torch.long)
    return -torch.nn.functional.cross_entropy(logits.double(), targets, reduction="none").numpy()


def confidence_scores(logits: torch.Tensor) -> np.ndarray:
    """The top softmax probability of each image."""
    return torch.softmax(logits.double(), dim=1).amax(dim=1).numpy()


def logit_confidence(logits: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """``log p_y - log(1 - p_y)`` per image, computed from logits without rounding ``p_y`` to 1.

    It equals ``z_y - logsumexp(z_j, j != y)``.
    """
    logits = logits.double()
    targets = torch.as_tensor(labels, dtype=torch.long)
    true = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.scatter(1, targets[:, None], float("-inf")).logsumexp(dim=1)
    return (true - others).numpy()


def class_calibrated_scores(
    phi: np.ndarray, labels: np.ndarray, reference_phi: np.ndarray, reference_labels: np.ndarray
) -> np.ndarray:
    """z-score of each ``phi`` against the reference (non-member) ``phi`` of its class.

    Classes with fewer than two reference images, or whose reference ``phi`` do not vary, use the
    mean and standard deviation of the whole reference.

    Raises
    ------
    DataError
        If the reference has fewer than two images or does not vary at all.
    """
    reference_phi = np.asarray(reference_phi, float)
    pooled = (reference_phi.mean(), reference_phi.std(ddof=1)) if len(reference_phi) >= MIN_REFERENCE else (0.0, 0.0)
    if not pooled[1] > 0:
        raise DataError(
            f"membership audit: the calibration reference ({len(reference_phi)} non-members) is too small or "
            "constant; raise privacy.attack.reference_fraction or use a larger test split"
        )
    scores = np.empty(len(phi))
    for label in np.unique(labels):
        own = reference_phi[reference_labels == label]
        mean, std = (own.mean(), own.std(ddof=1)) if len(own) >= MIN_REFERENCE else pooled
        mean, std = (mean, std) if std > 0 else pooled
        at = labels == label
        scores[at] = (phi[at] - mean) / std
    return scores


def symmetry_views(images: np.ndarray) -> list[np.ndarray]:
    """The 8 flips and quarter turns of uint8 images ``(N, H, W, 3)``; the first is the images themselves."""
    flipped = images[:, :, ::-1]
    return [np.rot90(stack, turns, axes=(1, 2)) for stack in (images, flipped) for turns in range(QUARTER_TURNS)]


def _view_logits(model: nn.Module, images: np.ndarray, batch_size: int) -> list[torch.Tensor]:
    return [predict_logits(model, view, batch_size) for view in symmetry_views(images)]


@dataclass
class MembershipAudit:
    """What :func:`membership_audit` returns.

    Attributes
    ----------
    metrics : dict
        Attack name -> :func:`attack_metrics`, plus ``n_reference`` (non-members used for calibration).
    scores : dict
        Attack name -> (member scores, scored non-member scores), e.g. for ROC plots.
    """

    metrics: dict
    scores: dict[str, tuple[np.ndarray, np.ndarray]]


def membership_audit(
    model: nn.Module,
    member_images: np.ndarray,
    member_labels: np.ndarray,
    nonmember_images: np.ndarray,
    nonmember_labels: np.ndarray,
    params: AttackParams,
    batch_size: int,
) -> MembershipAudit:
    """Run the loss, confidence and class-calibrated attacks against ``model``.

    Parameters
    ----------
    model : nn.Module
        The attacked model (queried in eval mode).
    member_images, member_labels : np.ndarray
        Images it was trained on (uint8 ``(N, H, W, 3)``) and their labels.
    nonmember_images, nonmember_labels : np.ndarray
        Images from the same distribution it never saw.
    params : AttackParams
        ``fprs``, ``reference_fraction``, ``max_members`` and ``seed`` (which members are queried,
        which non-members calibrate).
    batch_size : int
        Inference batch size.

    Raises
    ------
    DataError
        If the reference or the scored share of the non-members would be empty.
    """
    member_labels, nonmember_labels = np.asarray(member_labels), np.asarray(nonmember_labels)
    rng = np.random.default_rng(params.seed)
    if params.max_members is not None and len(member_labels) > params.max_members:
        queried = np.sort(rng.choice(len(member_labels), size=params.max_members, replace=False))
        member_images, member_labels = member_images[queried], member_labels[queried]
    order = rng.permutation(len(nonmember_labels))
    n_reference = round(params.reference_fraction * len(order))
    if not 0 < n_reference < len(order):
        raise DataError(
            f"membership audit: privacy.attack.reference_fraction={params.reference_fraction:g} of "
            f"{len(order)} non-members leaves no reference or no scored non-member; use more test images"
        )
    reference, scored = np.sort(order[:n_reference]), np.sort(order[n_reference:])
    member_views = _view_logits(model, member_images, batch_size)
    nonmember_views = _view_logits(model, nonmember_images, batch_size)
    member_phi = np.mean([logit_confidence(logits, member_labels) for logits in member_views], axis=0)
    nonmember_phi = np.mean([logit_confidence(logits, nonmember_labels) for logits in nonmember_views], axis=0)
    plain_members, plain_nonmembers = member_views[0], nonmember_views[0][scored]
    scored_labels = nonmember_labels[scored]

    def calibrated(phi: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return class_calibrated_scores(phi, labels, nonmember_phi[reference], nonmember_labels[reference])

    scores = {
        "loss": (loss_scores(plain_members, member_labels), loss_scores(plain_nonmembers, scored_labels)),
        "confidence": (confidence_scores(plain_members), confidence_scores(plain_nonmembers)),
        "calibrated": (calibrated(member_phi, member_labels), calibrated(nonmember_phi[scored], scored_labels)),
    }
    metrics = {name: attack_metrics(*scores[name], params.fprs) for name in ATTACKS}
    return MembershipAudit(metrics={**metrics, "n_reference": int(n_reference)}, scores=scores)
