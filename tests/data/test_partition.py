"""Non-IID partitioning into sites, its refusals, and the heterogeneity statistics."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from leukofed.config import load_params, parse_params
from leukofed.data.partition import (
    HETEROGENEITY_FILE,
    HETEROGENEITY_PNG_FILE,
    PARTITION_FILE,
    heterogeneity,
    partition_pool,
    read_partition,
    write_partition,
)
from leukofed.errors import ConfigError, DataError
from leukofed.io import read_json
from leukofed.provenance import DataProvenance

PARAMS_FILE = Path(__file__).resolve().parents[2] / "params.yaml"
CLASSES = ["Benign", "Early", "Pre", "Pro"]
PROVENANCE = DataProvenance("test", "synthetic", "memory", "0" * 64, 0)
SHARE_TOLERANCE = 0.06  # per-class share error allowed (groups of up to 4 images, ~85 per class)


def partition_params(**overrides):
    return load_params(PARAMS_FILE).partition.model_copy(update=overrides)


@pytest.fixture(scope="module")
def split_table() -> pd.DataFrame:
    """~480 images in groups of 1-4 (duplicates), split 70/15/15 by whole groups."""
    rng = np.random.default_rng(0)
    rows = []
    for label in CLASSES:
        for _ in range(60):
            group = len({row["group"] for row in rows})
            split = rng.choice(["train", "val", "test"], p=[0.7, 0.15, 0.15])
            for _ in range(int(rng.choice([1, 1, 2, 4]))):
                rows.append({"label": label, "group": group, "split": split})
    table = pd.DataFrame(rows)
    return table.assign(row=np.arange(len(table)), relpath=[f"img{i}.jpg" for i in range(len(table))])[
        ["row", "relpath", "label", "group", "split"]
    ]


def test_pooled_train_and_val_are_partitioned_and_test_is_untouched(split_table):
    partition = partition_pool(split_table, CLASSES, partition_params(), 3)
    pooled = split_table.loc[split_table["split"] != "test", "row"]
    assert sorted(partition["row"]) == sorted(pooled)
    assert set(partition["site"]) == {1, 2, 3}
    assert set(partition["part"]) == {"train", "val"}


@pytest.mark.parametrize("n_sites", [3, 5])
def test_duplicate_groups_stay_at_one_site_and_in_one_part(split_table, n_sites):
    partition = partition_pool(split_table, CLASSES, partition_params(), n_sites)
    assert (partition.groupby("group")["site"].nunique() == 1).all()
    assert (partition.groupby("group")["part"].nunique() == 1).all()


def test_each_class_is_shared_out_as_the_table_says(split_table):
    params = partition_params()
    partition = partition_pool(split_table, CLASSES, params, 3)
    shares = pd.crosstab(partition["label"], partition["site"], normalize="index")
    for label in CLASSES:
        assert np.allclose(shares.loc[label].to_numpy(), params.proportions["3"][label], atol=SHARE_TOLERANCE)


def test_every_site_holds_back_about_its_validation_fraction(split_table):
    params = partition_params()
    partition = partition_pool(split_table, CLASSES, params, 5)
    val_share = partition.groupby("site")["part"].apply(lambda parts: (parts == "val").mean())
    assert np.allclose(val_share, params.site_val_fraction, atol=SHARE_TOLERANCE)


def test_seeded_and_reproducible(split_table):
    first = partition_pool(split_table, CLASSES, partition_params(), 5)
    assert first.equals(partition_pool(split_table, CLASSES, partition_params(), 5))
    other = partition_pool(split_table, CLASSES, partition_params(seed=99), 5)
    assert not first.equals(other)


def test_a_site_without_a_class_gets_none_and_the_statistics_show_it(split_table):
    table = {"Benign": [0.0, 0.5, 0.5], "Early": [0.4, 0.3, 0.3], "Pre": [0.4, 0.3, 0.3], "Pro": [0.4, 0.3, 0.3]}
    params = partition_params(proportions={"3": table})
    partition = partition_pool(split_table, CLASSES, params, 3)
    assert not ((partition["site"] == 1) & (partition["label"] == "Benign")).any()
    site_1 = heterogeneity(partition, CLASSES)["sites"][0]
    assert site_1["counts"]["Benign"] == 0 and site_1["missing_classes"] == ["Benign"]


def test_dirichlet_skew_grows_as_alpha_shrinks_and_quantity_skew_spreads_sizes(split_table):
    def summary(**overrides):
        partition = partition_pool(split_table, CLASSES, partition_params(scheme="dirichlet", **overrides), 3)
        return heterogeneity(partition, CLASSES)["summary"]

    assert summary(dirichlet_alpha=0.3)["js_divergence_mean"] > summary(dirichlet_alpha=100.0)["js_divergence_mean"]
    assert summary(dirichlet_alpha=100.0, quantity_skew=1.0)["size_cv"] > summary(dirichlet_alpha=100.0)["size_cv"]


def test_more_sites_than_groups_is_refused(split_table):
    tiny = split_table[split_table["group"] < 4]
    with pytest.raises(DataError, match="only .* duplicate groups.*partition.sites"):
        partition_pool(tiny, CLASSES, partition_params(), 5)


def test_a_site_left_without_images_is_refused(split_table):
    table = {label: [0.5, 0.5, 0.0] for label in CLASSES}
    with pytest.raises(DataError, match=r"site 3 of 3 received no images.*partition.proportions"):
        partition_pool(split_table, CLASSES, partition_params(proportions={"3": table}), 3)


def test_a_site_too_small_for_a_validation_part_is_refused(split_table):
    table = {label: [0.5, 0.5, 0.0] for label in CLASSES} | {"Benign": [0.49, 0.5, 0.01]}  # site 3: one group
    with pytest.raises(DataError, match=r"site 3 has no local val images.*partition.site_val_fraction"):
        partition_pool(split_table, CLASSES, partition_params(proportions={"3": table}), 3)


def test_a_table_for_other_classes_is_refused(split_table):
    with pytest.raises(ConfigError, match=r'partition.proportions."3".*classes'):
        partition_pool(split_table, [*CLASSES, "Blast"], partition_params(), 3)


@pytest.mark.parametrize(
    ("mutate", "says"),
    [
        (lambda p: p["proportions"]["3"].update(Early=[0.5, 0.4, 0.05]), 'proportions."3".Early sums to 0.95'),
        (lambda p: p["proportions"]["5"].update(Pro=[0.5, 0.5]), 'proportions."5".Pro has 2 shares'),
        (lambda p: p["proportions"]["3"].update(Pre=[1.2, -0.1, -0.1]), "partition.proportions.3.Pre.0"),
        (lambda p: p["proportions"].pop("5"), 'needs a table proportions."5"'),
        (lambda p: p["proportions"]["3"].pop("Pro"), 'partition.proportions."3" lists classes'),
        (lambda p: p.update(sites=[3, 3]), "lists a site count twice"),
        (lambda p: p.update(sites=[1]), "partition.sites.0"),
        (lambda p: p.update(site_val_fraction=0.0), "partition.site_val_fraction"),
        (lambda p: p.update(dirichlet_alpha=0.0), "partition.dirichlet_alpha"),
        (lambda p: p.update(scheme="iid"), "partition.scheme"),
    ],
)
def test_impossible_partition_params_name_their_key(mutate, says):
    raw = yaml.safe_load(PARAMS_FILE.read_text())
    bad = copy.deepcopy(raw)
    mutate(bad["partition"])
    with pytest.raises(ConfigError, match="partition") as error:
        parse_params(bad, source="params.yaml")
    assert says in str(error.value)


def _hand_partition(site_labels: dict[int, list[str]]) -> pd.DataFrame:
    rows = [{"label": label, "site": site} for site, labels in site_labels.items() for label in labels]
    frame = pd.DataFrame(rows)
    return frame.assign(row=range(len(frame)), relpath="x", group=range(len(frame)), part="train")


def test_heterogeneity_statistics_match_their_definitions():
    stats = heterogeneity(_hand_partition({1: ["Benign", "Benign"], 2: ["Pro", "Pro"]}), CLASSES)
    site, pooled = np.array([1.0, 0, 0, 0]), np.array([0.5, 0, 0, 0.5])
    middle = (site + pooled) / 2
    kl = lambda p, q: sum(a * np.log2(a / b) for a, b in zip(p, q) if a > 0)  # noqa: E731
    first = stats["sites"][0]
    assert first["js_divergence"] == pytest.approx(0.5 * kl(site, middle) + 0.5 * kl(pooled, middle))
    assert first["hellinger"] == pytest.approx(np.sqrt(0.5 * np.sum((np.sqrt(site) - np.sqrt(pooled)) ** 2)))
    assert first["emd"] == pytest.approx(0.5 * 3)  # half the mass moves from class 0 to class 3
    assert first["missing_classes"] == ["Early", "Pre", "Pro"]
    assert stats["summary"]["sizes"] == [2, 2] and stats["summary"]["size_cv"] == 0.0


def test_an_iid_site_has_zero_divergence():
    stats = heterogeneity(_hand_partition({1: CLASSES, 2: CLASSES * 3}), CLASSES)
    for site in stats["sites"]:
        assert site["js_divergence"] == pytest.approx(0.0, abs=1e-12)
        assert site["hellinger"] == pytest.approx(0.0, abs=1e-12) and site["emd"] == pytest.approx(0.0, abs=1e-12)
    assert stats["summary"]["size_cv"] == pytest.approx(0.5)  # sizes 4 and 12: std 4, mean 8


def test_write_and_read_back(split_table, tmp_path):
    params = partition_params()
    partition = partition_pool(split_table, CLASSES, params, 3)
    stats = write_partition(partition, tmp_path, CLASSES, PROVENANCE, params)
    assert read_partition(tmp_path / PARTITION_FILE).equals(partition)
    assert read_json(tmp_path / HETEROGENEITY_FILE) == stats
    assert stats["n_sites"] == 3 and stats["data"]["fingerprint"] == PROVENANCE.fingerprint
    assert (tmp_path / HETEROGENEITY_PNG_FILE).read_bytes().startswith(b"\x89PNG")


def test_a_malformed_partition_file_is_refused(tmp_path):
    path = tmp_path / PARTITION_FILE
    pd.DataFrame({"row": [0], "site": [1]}).to_csv(path, index=False)
    with pytest.raises(DataError, match="missing columns"):
        read_partition(path)
    with pytest.raises(DataError, match="not found"):
        read_partition(tmp_path / "absent.csv")
