"""Group-aware stratified splitting and the split files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from leukofed.config import load_params
from leukofed.data.split import SPLITS, read_split, stratified_group_split, write_split
from leukofed.errors import DataError
from leukofed.io import read_json
from leukofed.provenance import DataProvenance

PARAMS_FILE = Path(__file__).resolve().parents[2] / "params.yaml"
TOLERANCE = 0.03  # per-class fraction error allowed (groups are at most 4 images in ~250)
PROVENANCE = DataProvenance("test", "synthetic", "memory", "0" * 64, 0)


def split_params(**overrides):
    return load_params(PARAMS_FILE).split.model_copy(update=overrides)


def planted_groups(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four unbalanced classes; many groups of 2-4 images (duplicates), the rest singletons."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for label, n_images in {"Benign": 150, "Early": 300, "Pre": 280, "Pro": 240}.items():
        remaining = n_images
        while remaining:
            size = min(remaining, int(rng.choice([1, 1, 1, 2, 3, 4])))
            labels += [label] * size
            groups += [len(set(groups))] * size
            remaining -= size
    order = rng.permutation(len(labels))  # duplicates need not be adjacent
    return np.array(labels)[order], np.array(groups)[order]


def test_no_group_spans_two_splits():
    labels, groups = planted_groups()
    assignment = stratified_group_split(labels, groups, split_params())
    assert set(assignment) == set(SPLITS)
    for group in np.unique(groups):
        assert len(set(assignment[groups == group])) == 1, f"group {group} spans splits"


def test_per_class_fractions_match_the_targets():
    labels, groups = planted_groups()
    params = split_params()
    assignment = stratified_group_split(labels, groups, params)
    for label in np.unique(labels):
        in_class = assignment[labels == label]
        for name in SPLITS:
            assert abs(np.mean(in_class == name) - getattr(params, name)) < TOLERANCE, (label, name)


def test_same_seed_same_split_and_other_seed_differs():
    labels, groups = planted_groups()
    first = stratified_group_split(labels, groups, split_params(seed=1))
    assert (stratified_group_split(labels, groups, split_params(seed=1)) == first).all()
    assert (stratified_group_split(labels, groups, split_params(seed=2)) != first).any()


def test_mixed_label_group_stays_together():
    labels = np.array(["A"] * 30 + ["B"] * 30 + ["A", "B", "B"])
    groups = np.concatenate([np.arange(60), [60, 60, 60]])
    assignment = stratified_group_split(labels, groups, split_params())
    assert len(set(assignment[-3:])) == 1


def test_too_few_groups_is_an_error():
    labels = np.array(["A"] * 10)
    groups = np.array([0] * 5 + [1] * 5)
    with pytest.raises(DataError, match="empty"):
        stratified_group_split(labels, groups, split_params())


def index_for(labels: np.ndarray, groups: np.ndarray) -> pd.DataFrame:
    relpaths = [f"img{i}.jpg" for i in range(len(labels))]
    return pd.DataFrame({"row": np.arange(len(labels)), "relpath": relpaths, "label": labels, "group": groups})


def test_write_and_read_split(tmp_path):
    labels, groups = planted_groups()
    assignment = stratified_group_split(labels, groups, split_params())
    path = tmp_path / "split.csv"

    summary = write_split(index_for(labels, groups), assignment, path, PROVENANCE)

    assert summary == read_json(path.with_suffix(".json"))
    assert summary["provenance"] == PROVENANCE.to_dict()
    assert sum(sum(per_class.values()) for per_class in summary["counts"].values()) == len(labels)
    assert summary["counts"]["val"]["Benign"] == int(np.sum((labels == "Benign") & (assignment == "val")))
    assert sum(summary["fractions"].values()) == pytest.approx(1.0)
    assert summary["n_groups"]["train"] == len(np.unique(groups[assignment == "train"]))
    frame = read_split(path)
    assert list(frame.columns) == ["row", "relpath", "label", "group", "split"]
    assert (frame["split"].to_numpy() == assignment).all()


def test_read_missing_split_is_an_error(tmp_path):
    with pytest.raises(DataError, match="split.csv: split file not found"):
        read_split(tmp_path / "split.csv")


@pytest.mark.parametrize(
    "content", ["", "row,relpath,label\n0,a.jpg,Pro\n", "row,relpath,label,group,split\n0,a.jpg,Pro,0,holdout\n"]
)
def test_read_malformed_split_is_an_error(tmp_path, content):
    path = tmp_path / "split.csv"
    path.write_text(content)
    with pytest.raises(DataError, match="run the split stage again"):
        read_split(path)
