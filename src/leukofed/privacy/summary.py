"""The privacy sweep in the report: reading ``privacy.json``, its summary entry and its README section.

Kept apart from :mod:`.sweep` so that the report stage reads the sweep's record without importing
torch or Opacus.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from leukofed.errors import LeukofedError
from leukofed.io import read_json

PRIVACY_DIR = "privacy"  # results/<dataset>/privacy
SWEEP_FILE = "privacy.json"
TABLE_FILE = "privacy.csv"
UTILITY_FIGURE = "privacy_utility.png"
ROC_FIGURE = "membership_roc.png"
FIGURES = (UTILITY_FIGURE, ROC_FIGURE)
ATTACK_NAMES = {"loss": "loss", "confidence": "confidence", "calibrated": "class-calibrated LiRA-offline"}
TPR_ATTACK = "calibrated"  # whose TPR at low FPR the README table shows
_RECORD_KEYS = ("data", "run", "strategy", "sites", "n_test", "rounds", "local_epochs", "delta", "levels")
_LEVEL_KEYS = ("level", "private", "target_epsilon", "epsilon_spent", "test", "attack", "best_round")
_ATTACK_KEYS = ("auc", "advantage", "tpr_at_fpr", "n_members", "n_nonmembers", "min_resolvable_fpr")
MISSING = "—"


def read_sweep(path: Path) -> dict:
    """``privacy.json`` of the privacy stage.

    Raises
    ------
    LeukofedError
        If it is not valid JSON or lacks what the report needs.
    """
    try:
        record = read_json(path)
    except ValueError as error:
        raise LeukofedError(f"{path}: not valid JSON ({error}); re-run the privacy stage") from None
    missing = [key for key in _RECORD_KEYS if key not in record]
    missing += [f"levels[{index}].{key}" for index, level in enumerate(record.get("levels", []))
                for key in _LEVEL_KEYS if key not in level]
    if missing or not record["levels"]:
        raise LeukofedError(f"{path}: lacks {missing or ['levels']}; re-run the privacy stage")
    return record


def sweep_summary(record: dict) -> dict:
    """The sweep's entry of ``summary.json``: per level, target and spent epsilon, test scores, attack scores."""
    return {
        "run": record["run"],
        "strategy": record["strategy"],
        "n_sites": len(record["sites"]),
        "rounds": record["rounds"],
        "local_epochs": record["local_epochs"],
        "delta": record["delta"],
        "n_test": record["n_test"],
        "levels": [
            {
                "level": level["level"],
                "private": level["private"],
                "target_epsilon": level["target_epsilon"],
                "epsilon_spent": level["epsilon_spent"],
                "epsilon_spent_max": max(level["epsilon_spent"].values()) if level["epsilon_spent"] else None,
                **level["test"],
                "attack": {name: {key: attack[key] for key in _ATTACK_KEYS}
                           for name, attack in level["attack"].items() if name in ATTACK_NAMES},
            }
            for level in record["levels"]
        ],
    }


def sweep_section(
    summary: dict, figures: dict[str, str], markdown_table: Callable[[list[str], list[list[str]]], list[str]]
) -> list[str]:
    """The README's "Privacy" section: the privacy-utility table, how to read it, and the figures.

    ``markdown_table(header, rows)`` renders a table as the rest of the report does.
    """
    levels = summary["levels"]
    attack = levels[0]["attack"]
    fprs = [point["fpr"] for point in attack[TPR_ATTACK]["tpr_at_fpr"]]
    header = ["Per-site ε", "ε spent (max)", "Test accuracy", "Macro-F1",
              *(f"AUC {name}" for name in ATTACK_NAMES), *(f"TPR @ {fpr:.1%} FPR" for fpr in fprs)]
    rows = []
    for level in levels:
        rows.append([
            f"{level['target_epsilon']:g}" if level["private"] else "∞ (no DP)",
            MISSING if level["epsilon_spent_max"] is None else f"{level['epsilon_spent_max']:.2f}",
            f"{level['accuracy']:.2%}",
            f"{level['macro_f1']:.3f}",
            *(f"{level['attack'][name]['auc']:.3f}" for name in ATTACK_NAMES),
            *(f"{point['tpr']:.1%}" for point in level["attack"][TPR_ATTACK]["tpr_at_fpr"]),
        ])
    scored = next(iter(attack.values()))
    delta = MISSING if summary["delta"] is None else f"{summary['delta']:.2g}"
    return [
        "## Privacy",
        "",
        f"`{summary['run']}` ({summary['strategy']}, {summary['n_sites']} sites) retrained from the same initial "
        f"weights of the GroupNorm model for {summary['rounds']} round(s) of {summary['local_epochs']} local epoch(s) "
        f"at each per-site ε, with DP-SGD at every site (Opacus: per-image clipping, Gaussian noise, Poisson "
        f"sampling; RDP accountant, δ = {delta} for every site); ∞ is the same model without DP. ε spent: the "
        "largest, over the sites, of the ε each site reported after its last round (image-level, per site: see "
        "the README's threat model for what this does and does not cover). Test scores: the best-round global "
        f"model on the {summary['n_test']} test images.",
        "",
        *markdown_table(header, rows),
        "",
        f"Membership inference against each global model: {scored['n_members']} training images of the sites "
        f"(members) against {scored['n_nonmembers']} test images (non-members; the other test images calibrate "
        "the class-calibrated attack). AUC 0.5 is guessing; TPR at a false-positive rate below "
        f"{scored['min_resolvable_fpr']:.2%} (one false positive) is the TPR at no false positive at all.",
        "",
        f"![Privacy vs utility]({figures[UTILITY_FIGURE]})",
        "",
        f"![Membership-inference ROC curves]({figures[ROC_FIGURE]})",
        "",
    ]
