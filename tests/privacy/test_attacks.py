"""Membership-inference attacks on constructed cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from leukofed.config import AttackParams
from leukofed.errors import DataError
from leukofed.privacy.attacks import (
    ATTACKS,
    attack_metrics,
    class_calibrated_scores,
    confidence_scores,
    logit_confidence,
    loss_scores,
    membership_audit,
    symmetry_views,
)

FPRS = [0.01, 0.001]
PARAMS = AttackParams(fprs=FPRS, reference_fraction=0.5, max_members=None, seed=0)


def test_perfectly_separable_scores_give_auc_one_and_full_tpr_at_every_fpr():
    rng = np.random.default_rng(0)
    metrics = attack_metrics(rng.uniform(2, 3, 50), rng.uniform(0, 1, 200), FPRS)
    assert metrics["auc"] == 1.0 and metrics["advantage"] == 1.0
    assert [point["tpr"] for point in metrics["tpr_at_fpr"]] == [1.0, 1.0]
    assert metrics["n_members"] == 50 and metrics["min_resolvable_fpr"] == 1 / 200


def test_identical_distributions_give_auc_near_one_half():
    rng = np.random.default_rng(1)
    n = 4000  # the AUC's standard error is sqrt((2n + 1) / (12 n^2)) ~ 0.0065
    metrics = attack_metrics(rng.normal(size=n), rng.normal(size=n), FPRS)
    assert abs(metrics["auc"] - 0.5) < 0.03
    assert metrics["tpr_at_fpr"][0]["tpr"] < 0.03  # ~ the FPR itself


def test_reversed_scores_give_auc_zero():
    assert attack_metrics(np.zeros(5), np.ones(5), FPRS)["auc"] == 0.0


def test_hand_computed_roc_points():
    members, nonmembers = np.array([0.9, 0.8, 0.3]), np.array([0.85, 0.1, 0.2, 0.0])
    metrics = attack_metrics(members, nonmembers, [0.0, 0.25])
    assert metrics["auc"] == pytest.approx(10 / 12)  # member-over-non-member pairs: 4 + 3 + 3 of 12
    # no false positive: only 0.9 is above 0.85; one (0.85): every member is above the other three
    assert [point["tpr"] for point in metrics["tpr_at_fpr"]] == pytest.approx([1 / 3, 1.0])
    assert metrics["advantage"] == pytest.approx(1 - 0.25)


def test_an_empty_side_is_refused():
    with pytest.raises(DataError, match="need members and non-members"):
        attack_metrics(np.ones(3), np.array([]), FPRS)


def test_scores_from_logits():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [100.0, 0.0, -100.0]])
    labels = np.array([0, 1, 0])
    probability = np.exp(2) / (np.exp(2) + 2)
    assert loss_scores(logits, labels) == pytest.approx([np.log(probability), np.log(1 / 3), 0.0])
    assert confidence_scores(logits) == pytest.approx([probability, 1 / 3, 1.0])
    phi = logit_confidence(logits, labels)
    assert phi[:2] == pytest.approx([np.log(probability / (1 - probability)), np.log(0.5)])
    assert phi[2] == pytest.approx(100.0, abs=1e-6)  # finite although p_y rounds to 1


def test_class_calibration_recovers_membership_hidden_by_class_difficulty():
    """Class 0 is easy (phi ~ 5 + membership), class 1 hard (phi ~ 0 + membership): one global threshold mixes them up."""
    rng = np.random.default_rng(2)
    n, shift, offsets = 3000, 1.0, np.array([5.0, 0.0])
    member_labels, nonmember_labels, reference_labels = (rng.integers(0, 2, n) for _ in range(3))
    members = offsets[member_labels] + shift + rng.normal(size=n)
    nonmembers = offsets[nonmember_labels] + rng.normal(size=n)
    reference = offsets[reference_labels] + rng.normal(size=n)

    plain = attack_metrics(members, nonmembers, FPRS)["auc"]
    calibrated = attack_metrics(class_calibrated_scores(members, member_labels, reference, reference_labels),
                                class_calibrated_scores(nonmembers, nonmember_labels, reference, reference_labels),
                                FPRS)["auc"]
    assert calibrated == pytest.approx(norm.cdf(shift / np.sqrt(2)), abs=0.03)  # two unit Gaussians `shift` apart
    assert calibrated > plain + 0.05


def test_calibration_falls_back_to_the_pooled_reference_and_refuses_a_degenerate_one():
    reference, reference_labels = np.array([0.0, 2.0, 4.0]), np.array([0, 0, 1])  # class 1: one image
    scores = class_calibrated_scores(np.array([4.0, 4.0]), np.array([0, 1]), reference, reference_labels)
    assert scores == pytest.approx([(4 - 1) / np.std([0, 2], ddof=1), (4 - 2) / np.std([0, 2, 4], ddof=1)])
    with pytest.raises(DataError, match="reference_fraction"):
        class_calibrated_scores(np.array([1.0]), np.array([0]), np.array([1.0, 1.0]), np.array([0, 0]))


def test_symmetry_views_are_the_eight_flips_and_turns():
    image = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(1, 2, 2, 3)
    views = symmetry_views(image)
    assert len(views) == 8 and np.array_equal(views[0], image)
    assert len({view.tobytes() for view in (np.ascontiguousarray(v) for v in views)}) == 8


class _BrightnessModel(nn.Module):
    """Confident in class 0 in proportion to an image's mean brightness: "memorised" bright images."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        brightness = x.mean(dim=(1, 2, 3))
        return torch.stack([self.scale * brightness, torch.zeros_like(brightness)], dim=1)


def _images(n: int, level: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(level + rng.integers(-20, 21, (n, 8, 8, 3)), 0, 255).astype(np.uint8)


def test_audit_of_a_model_that_remembers_its_members():
    members, nonmembers = _images(30, 220, 0), _images(40, 60, 1)
    audit = membership_audit(_BrightnessModel(), members, np.zeros(30, int), nonmembers, np.zeros(40, int), PARAMS,
                             batch_size=16)
    assert audit.metrics["n_reference"] == 20
    for name in ATTACKS:
        assert audit.metrics[name]["auc"] == 1.0
        assert audit.metrics[name]["n_members"] == 30 and audit.metrics[name]["n_nonmembers"] == 20
        assert len(audit.scores[name][1]) == 20


def test_audit_queries_a_sample_of_at_most_max_members():
    members, nonmembers = _images(30, 220, 0), _images(40, 60, 1)
    params = PARAMS.model_copy(update={"max_members": 12})
    audit = membership_audit(_BrightnessModel(), members, np.zeros(30, int), nonmembers, np.zeros(40, int), params,
                             batch_size=16)
    assert all(audit.metrics[name]["n_members"] == 12 and audit.metrics[name]["auc"] == 1.0 for name in ATTACKS)


def test_audit_of_a_model_that_ignores_membership_is_near_chance():
    members, nonmembers = _images(300, 128, 2), _images(300, 128, 3)
    audit = membership_audit(_BrightnessModel(), members, np.zeros(300, int), nonmembers, np.zeros(300, int), PARAMS,
                             batch_size=128)
    for name in ATTACKS:
        assert abs(audit.metrics[name]["auc"] - 0.5) < 0.1  # standard error ~0.027 at 300 vs 150


def test_audit_needs_a_reference_and_scored_non_members():
    with pytest.raises(DataError, match="reference_fraction"):
        membership_audit(_BrightnessModel(), _images(4, 200, 0), np.zeros(4, int), _images(1, 50, 1), np.zeros(1, int),
                         PARAMS, batch_size=4)
