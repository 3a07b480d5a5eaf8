"""Privacy-utility sweep: one federated run retrained at several per-site epsilons, each model tested and attacked.

For every entry of ``privacy.sweep.epsilons`` the federation run ``privacy.sweep.run`` (its sites and
strategy; ``rounds`` and ``local_epochs`` from the sweep) is trained from the same initial weights of
the GroupNorm model (``model.norm: group`` whatever ``model.norm`` says, so that every level differs
only in DP). A finite epsilon trains every site with DP-SGD, the noise calibrated so that a site
selected in every round ends at that epsilon (``privacy.dp`` for clipping, delta and the noise seed;
the epsilon is also the site's budget); ``.inf`` trains the same model without DP. Each level is a
tracked federated run (:func:`leukofed.federation.runner.federate_and_record`: MLflow run
``<dataset>/privacy-eps-<epsilon>`` with each site's epsilon per round, ``federation.json``,
``model.pt``), then its best-round global model is scored on the test split and attacked
(:func:`.attacks.membership_audit`: members = every site's training images, non-members = test images).

Outputs in the sweep's folder: ``privacy.json`` (per level: target and spent epsilon per site,
delta, noise multipliers, test accuracy, balanced accuracy, macro-F1, attack AUC / TPR at low FPR /
advantage), ``privacy.csv`` (the same as a table), ``privacy_utility.png`` (utility and attack AUC
against epsilon) and ``membership_roc.png`` (ROC curves of the calibrated attack). A level whose
``level.json`` matches the current settings and data is not retrained, so an interrupted sweep
resumes at the level it stopped in (and that level at its last finished round).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve

from leukofed.config import Params
from leukofed.evaluation.metrics import classification_metrics
from leukofed.federation.runner import federate_and_record
from leukofed.federation.site import SiteData
from leukofed.io import atomic_path, read_json, write_json, write_text
from leukofed.model import build_model
from leukofed.plotting import new_figure, save_png, wrap_title
from leukofed.privacy.attacks import ATTACKS, membership_audit
from leukofed.privacy.dp import site_privacy
from leukofed.privacy.summary import ROC_FIGURE, SWEEP_FILE, TABLE_FILE, UTILITY_FIGURE
from leukofed.provenance import DataProvenance
from leukofed.training import configure_torch, predict_proba

LEVEL_FILE = "level.json"
SCORES_FILE = "attack_scores.npz"
ROC_ATTACK = "calibrated"  # the strongest attack here; its ROC curves are drawn
TEST_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
FIGURE_SIZE = (11.0, 4.0)
ROC_SIZE = (5.5, 5.0)


@dataclass(frozen=True)
class SweepData:
    """What every level trains on and is tested against."""

    sites: list[SiteData]
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    image_size: int
    provenance: DataProvenance
    data_key: str  # identifies partition + cache: part of every level's key


def level_name(epsilon: float) -> str:
    """Folder and run name of a level: ``eps-1``, ``eps-0.5``, ``eps-inf``."""
    return f"eps-{epsilon:g}"


def run_sweep(params: Params, dataset: str, data: SweepData, out_dir: Path) -> dict:
    """Train, test and attack one model per epsilon; write the table, the record and the figures.

    Parameters
    ----------
    params : Params
        ``privacy`` (sweep, dp, attack), ``federation``, ``model``, ``train``, ``runtime``, ``tracking``.
    dataset : str
        Names the MLflow runs and registered models.
    data : SweepData
        Sites, test split and what is known of the data.
    out_dir : Path
        The sweep's folder (``results/<dataset>/privacy``); each level gets ``eps-<epsilon>/``.

    Returns
    -------
    dict
        The content of ``privacy.json``.
    """
    out_dir = Path(out_dir)
    levels, scores = [], {}
    for epsilon in params.privacy.sweep.epsilons:
        folder = out_dir / level_name(epsilon)
        levels.append(_level(params, dataset, data, epsilon, folder))
        with np.load(folder / SCORES_FILE) as stored:
            scores[level_name(epsilon)] = (stored["members"], stored["nonmembers"])
    sweep = params.privacy.sweep
    record = {
        "data": data.provenance.to_dict(),
        "run": sweep.run,
        "strategy": params.federation.runs[sweep.run].strategy,
        "sites": {str(site.number): {"n_train": site.n_train, "n_val": site.n_val} for site in data.sites},
        "n_test": len(data.test_labels),
        "rounds": sweep.rounds,
        "local_epochs": sweep.local_epochs,
        "delta": next((level["delta"] for level in levels if level["private"]), None),
        "levels": levels,
        "params": {"sweep": {**sweep.model_dump(), "epsilons": [e if math.isfinite(e) else "inf" for e in sweep.epsilons]},
                   "dp": params.privacy.dp.model_dump(exclude={"enabled"}),
                   "attack": params.privacy.attack.model_dump()},
    }
    write_json(out_dir / SWEEP_FILE, record)
    write_text(out_dir / TABLE_FILE, _table(levels))
    plot_privacy_utility(levels, out_dir / UTILITY_FIGURE, title=f"{sweep.run} on {data.provenance.dataset}")
    plot_membership_roc(scores, out_dir / ROC_FIGURE)
    return record


def _level_params(params: Params, epsilon: float) -> tuple[Params, str]:
    """Params of one level (group norm, the sweep's run, DP at this epsilon) and its run name."""
    sweep = params.privacy.sweep
    run_name = f"privacy-{level_name(epsilon)}"
    run = params.federation.runs[sweep.run].model_copy(update={"rounds": sweep.rounds})
    private = math.isfinite(epsilon)
    dp = params.privacy.dp.model_copy(update={
        "enabled": private, "noise_multiplier": None,
        "target_epsilon": epsilon if private else None, "epsilon_budget": epsilon if private else None,
    })
    return params.model_copy(update={
        "model": params.model.model_copy(update={"norm": "group"}),
        "federation": params.federation.model_copy(update={"local_epochs": sweep.local_epochs, "runs": {run_name: run}}),
        "privacy": params.privacy.model_copy(update={"dp": dp}),
    }), run_name


def _level_key(level_params: Params, data: SweepData) -> str:
    """Everything a level's result depends on, hashed: a stored level with another key is retrained."""
    settings = {key: getattr(level_params, key).model_dump() for key in ("model", "train", "federation")}
    settings |= {"dp": level_params.privacy.dp.model_dump(), "attack": level_params.privacy.attack.model_dump(),
                 "data": data.data_key}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _level(params: Params, dataset: str, data: SweepData, epsilon: float, folder: Path) -> dict:
    """Train, test and attack the model of one epsilon, or reuse the stored result of the same settings."""
    level_params, run_name = _level_params(params, epsilon)
    key = _level_key(level_params, data)
    if (folder / LEVEL_FILE).is_file() and (folder / SCORES_FILE).is_file():
        stored = read_json(folder / LEVEL_FILE)
        if stored.get("key") == key:
            return stored
    dp, sweep = level_params.privacy.dp, params.privacy.sweep
    private = dp.enabled
    setups = None
    if private:
        setups = site_privacy(dp, {site.number: site.n_train for site in data.sites},
                              batch_size=params.train.batch_size, planned_epochs=sweep.rounds * sweep.local_epochs)
    configure_torch(params.runtime.threads, params.train.seed)  # every level starts from the same weights
    model = build_model(level_params.model, len(data.classes))
    federate_and_record(
        level_params, dataset, run_name, model, data.sites, provenance=data.provenance, classes=data.classes,
        image_size=data.image_size, data_key=key, out_dir=folder,
        extra={"privacy_level": {"target_epsilon": epsilon if private else None}}, privacy=setups,
    )
    # federate_and_record leaves the best round's global model in `model`
    batch_size = params.train.eval_batch_size
    test = classification_metrics(data.test_labels, predict_proba(model, data.test_images, batch_size), data.classes)
    members = np.concatenate([site.train_images for site in data.sites])
    member_labels = np.concatenate([site.train_labels for site in data.sites])
    audit = membership_audit(model, members, member_labels, data.test_images, data.test_labels,
                             params.privacy.attack, batch_size)
    federation = read_json(folder / "federation.json")
    level = {
        "level": level_name(epsilon),
        "private": private,
        "target_epsilon": epsilon if private else None,
        "delta": next(iter(setups.values())).accountant.delta if private else None,
        "noise_multiplier": {str(n): setup.noise_multiplier for n, setup in setups.items()} if private else None,
        "epsilon_spent": {site: spent["epsilon"] for site, spent in federation.get("privacy", {}).items()} or None,
        "best_round": federation["best_round"],
        "best_val_accuracy": federation["best"]["val_accuracy"],
        "test": {name: test[name] for name in TEST_METRICS},
        "attack": audit.metrics,
        "mlflow_run_id": federation["mlflow_run_id"],
        "key": key,
    }
    members_scores, nonmember_scores = audit.scores[ROC_ATTACK]
    with atomic_path(folder / SCORES_FILE, suffix=".npz") as tmp:
        np.savez(tmp, members=members_scores, nonmembers=nonmember_scores)
    write_json(folder / LEVEL_FILE, level)
    return level


def _table(levels: list[dict]) -> str:
    """``privacy.csv``: one row per level."""
    header = ["level", "target_epsilon", "epsilon_spent_max", "delta", *TEST_METRICS]
    for name in ATTACKS:
        header += [f"{name}_auc", f"{name}_advantage"]
        header += [f"{name}_tpr_at_fpr_{point['fpr']:g}" for point in levels[0]["attack"][name]["tpr_at_fpr"]]
    rows = [",".join(header)]
    for level in levels:
        spent = max(level["epsilon_spent"].values()) if level["epsilon_spent"] else None
        values = [level["level"], level["target_epsilon"], spent, level["delta"], *(level["test"][m] for m in TEST_METRICS)]
        for name in ATTACKS:
            attack = level["attack"][name]
            values += [attack["auc"], attack["advantage"], *(point["tpr"] for point in attack["tpr_at_fpr"])]
        rows.append(",".join("" if value is None else str(value) for value in values))
    return "\n".join(rows) + "\n"


def _positions(levels: list[dict]) -> tuple[list[float], list[str]]:
    """x positions (log10 epsilon) and labels; the non-private level sits one decade right of the largest epsilon."""
    finite = [level["target_epsilon"] for level in levels if level["private"]]
    no_dp = math.log10(max(finite)) + 1 if finite else 0.0
    positions = [math.log10(level["target_epsilon"]) if level["private"] else no_dp for level in levels]
    labels = [f"{level['target_epsilon']:g}" if level["private"] else "∞\n(no DP)" for level in levels]
    return positions, labels


def plot_privacy_utility(levels: list[dict], path: Path, *, title: str) -> None:
    """Test accuracy and macro-F1 (left) and membership-attack AUC (right) against the per-site epsilon."""
    positions, labels = _positions(levels)
    figure = new_figure(*FIGURE_SIZE)
    utility, attack = figure.subplots(1, 2)
    for metric, label in (("accuracy", "test accuracy"), ("macro_f1", "test macro-F1")):
        utility.plot(positions, [level["test"][metric] for level in levels], marker="o", label=label)
    utility.set_ylabel("score")
    utility.set_ylim(0, 1)
    for name in ATTACKS:
        attack.plot(positions, [level["attack"][name]["auc"] for level in levels], marker="o", label=f"{name} attack")
    attack.axhline(0.5, color="grey", linestyle=":", label="chance")
    attack.set_ylabel("membership-inference ROC AUC")
    attack.set_ylim(0, 1)
    for axes in (utility, attack):
        axes.set_xticks(positions, labels)
        axes.set_xlabel("per-site ε (δ fixed)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.suptitle(wrap_title(f"Privacy vs utility: {title}", FIGURE_SIZE[0]))
    save_png(figure, path)


def plot_membership_roc(scores: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """ROC curves of the calibrated attack per level, on log-log axes (the low-FPR regime is what matters)."""
    figure = new_figure(*ROC_SIZE)
    axes = figure.subplots()
    smallest = 1.0
    for name, (members, nonmembers) in scores.items():
        truth = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
        fpr, tpr, _ = roc_curve(truth, np.concatenate([members, nonmembers]))
        axes.plot(fpr[1:], tpr[1:], label=name)  # the first point is (0, 0): off a log axis
        smallest = min(smallest, 1 / len(nonmembers))
    axes.plot([smallest, 1], [smallest, 1], color="grey", linestyle=":", label="chance")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("false-positive rate")
    axes.set_ylabel("true-positive rate")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    axes.set_title(wrap_title(f"Membership inference ({ROC_ATTACK} attack)", ROC_SIZE[0]))
    save_png(figure, path)
