"""Group-aware, stratified train/validation/test split.

Whole duplicate groups are assigned to one split, so repeat photos of one cell never sit on both
sides of an evaluation. Within each class the groups are dealt out greedily, largest first, each to
the split furthest below its target image count, which lands within about one group of the
requested fractions (``sklearn``'s group k-fold splitters only approximate them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from leukofed.config import SplitParams
from leukofed.errors import DataError
from leukofed.io import atomic_path, write_json
from leukofed.provenance import DataProvenance

SPLITS = ("train", "val", "test")
SPLIT_COLUMNS = ("row", "relpath", "label", "group", "split")


def stratified_group_split(labels: np.ndarray, groups: np.ndarray, params: SplitParams) -> np.ndarray:
    """Assign every image to train, val or test, keeping each group on one side.

    A group is stratified by its majority label (ties: the label that sorts first). Within each
    class, groups are shuffled with ``params.seed`` and then taken largest first; each goes to the
    split whose image count is furthest below its target (``params.train/val/test`` times the
    class's image count). The result depends only on the inputs and ``params.seed``.

    Parameters
    ----------
    labels : ndarray of shape (N,)
        Class label of each image.
    groups : ndarray of shape (N,)
        Duplicate-group id of each image (see :func:`leukofed.data.validate.duplicate_groups`).
    params : SplitParams
        Target fractions and seed.

    Returns
    -------
    ndarray of shape (N,), dtype str
        ``"train"``, ``"val"`` or ``"test"`` per image.

    Raises
    ------
    DataError
        If any split ends up empty overall (too few groups for the requested fractions).
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    if labels.shape != groups.shape or labels.ndim != 1:
        raise ValueError(f"labels and groups must be 1-D of equal length, got {labels.shape} and {groups.shape}")
    group_ids, group_of_image = np.unique(groups, return_inverse=True)
    group_sizes = np.bincount(group_of_image)
    group_labels = _majority_labels(labels, group_of_image, len(group_ids))
    targets = np.array([params.train, params.val, params.test])
    rng = np.random.default_rng(params.seed)
    group_split = np.empty(len(group_ids), dtype=np.int64)
    for label in np.unique(group_labels):
        members = np.flatnonzero(group_labels == label)
        group_split[members] = _deal(group_sizes[members], targets, rng)
    assignment = np.asarray(SPLITS)[group_split[group_of_image]]
    _check_not_empty(assignment, len(group_ids))
    return assignment


def _majority_labels(labels: np.ndarray, group_of_image: np.ndarray, n_groups: int) -> np.ndarray:
    """The most frequent label of each group (ties go to the label that sorts first)."""
    classes, label_code = np.unique(labels, return_inverse=True)
    counts = np.zeros((n_groups, len(classes)), dtype=np.int64)
    np.add.at(counts, (group_of_image, label_code), 1)
    return classes[counts.argmax(axis=1)]


def _deal(sizes: np.ndarray, targets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Split index per group: shuffled, then largest first, each to the split most below target."""
    order = rng.permutation(len(sizes))
    order = order[np.argsort(-sizes[order], kind="stable")]  # stable: equal sizes keep the shuffle
    wanted = targets * sizes.sum()
    filled = np.zeros(len(targets))
    split_of = np.empty(len(sizes), dtype=np.int64)
    for group in order:
        split = int(np.argmax(wanted - filled))
        split_of[group] = split
        filled[split] += sizes[group]
    return split_of


def _check_not_empty(assignment: np.ndarray, n_groups: int) -> None:
    empty = [name for name in SPLITS if not np.any(assignment == name)]
    if empty:
        raise DataError(
            f"split: the {', '.join(empty)} split(s) would be empty ({len(assignment)} images in {n_groups} "
            f"duplicate groups); use more data or raise split.{empty[0]}"
        )


def write_split(index: pd.DataFrame, assignment: np.ndarray, path: Path, provenance: DataProvenance) -> dict:
    """Write a split assignment as CSV plus a JSON summary beside it.

    Parameters
    ----------
    index : DataFrame
        The cache index (columns ``row, relpath, label, group``), one row per image.
    assignment : ndarray of shape (N,)
        Split name per image, from :func:`stratified_group_split`.
    path : Path
        The CSV (``row, relpath, label, group, split``); the summary goes to ``path.with_suffix('.json')``.
    provenance : DataProvenance
        Recorded in the summary.

    Returns
    -------
    dict
        The summary: ``provenance``, ``counts`` (split -> class -> images), ``fractions`` (split ->
        share of images) and ``n_groups`` (split -> groups).
    """
    path = Path(path)
    if len(assignment) != len(index):
        raise ValueError(f"assignment has {len(assignment)} entries for {len(index)} images")
    frame = index[list(SPLIT_COLUMNS[:-1])].assign(split=np.asarray(assignment))
    with atomic_path(path, suffix=path.suffix) as tmp:
        frame.to_csv(tmp, index=False)
    summary = _summary(frame, provenance)
    write_json(path.with_suffix(".json"), summary)
    return summary


def _summary(frame: pd.DataFrame, provenance: DataProvenance) -> dict:
    """Image counts per split and class, image fractions and group counts of a split table."""
    splits = list(SPLITS)
    table = pd.crosstab(frame["split"], frame["label"]).reindex(index=splits, fill_value=0)
    n_groups = frame.groupby("split")["group"].nunique().reindex(splits, fill_value=0)
    return {
        "provenance": provenance.to_dict(),
        "counts": {name: {str(label): int(n) for label, n in table.loc[name].items()} for name in splits},
        "fractions": {name: float(table.loc[name].sum() / len(frame)) for name in splits},
        "n_groups": {name: int(n_groups[name]) for name in splits},
    }


def read_split(path: Path) -> pd.DataFrame:
    """Read a split CSV written by :func:`write_split`.

    Parameters
    ----------
    path : Path

    Returns
    -------
    DataFrame
        Columns ``row, relpath, label, group, split``.

    Raises
    ------
    DataError
        If the file is missing or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file not found; run the split stage")
    try:
        frame = pd.read_csv(path, keep_default_na=False, dtype={"relpath": str, "label": str, "split": str})
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise DataError(f"{path}: unreadable split file ({error}); run the split stage again") from None
    missing = [column for column in SPLIT_COLUMNS if column not in frame.columns]
    unknown = sorted(set(frame["split"]) - set(SPLITS)) if "split" in frame.columns else []
    if missing or unknown:
        problem = f"missing columns {missing}" if missing else f"unknown split names {unknown}"
        raise DataError(f"{path}: malformed split file ({problem}); run the split stage again")
    return frame[list(SPLIT_COLUMNS)]
