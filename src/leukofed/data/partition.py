"""Non-IID partition of the pooled train+val images into simulated hospitals, and its heterogeneity.

The global test split is never partitioned: it stays with the evaluator. The pooled train+val
images are dealt out to ``N`` sites by a class x site share table, either given explicitly
(``partition.scheme: proportions``, the paper's style: one hospital mostly early-stage, another
mostly advanced) or drawn per class from a symmetric Dirichlet (``dirichlet``), optionally with
log-normal quantity skew on top. Whole duplicate groups go to one site and, within a site, to one
local part (``train`` or ``val``), so repeat photos of a cell never sit on both sides of any split.

Dealing is greedy, as in :mod:`leukofed.data.split`: groups shuffled with the seed, then largest
first, each to the eligible destination furthest below its target image count. A site whose share of
a class is 0 never receives that class, so label skew can be total.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial.distance import jensenshannon
from scipy.stats import wasserstein_distance

from leukofed.config import PartitionParams
from leukofed.errors import ConfigError, DataError
from leukofed.io import atomic_path, write_json
from leukofed.plotting import new_figure, save_png, wrap_title
from leukofed.provenance import DataProvenance

SITE_PARTS = ("train", "val")
POOLED_SPLITS = ("train", "val")  # the global splits that are partitioned; "test" stays global
PARTITION_COLUMNS = ("row", "relpath", "label", "group", "site", "part")
PARTITION_FILE = "partition.csv"
HETEROGENEITY_FILE = "heterogeneity.json"
HETEROGENEITY_PNG_FILE = "heterogeneity.png"


def share_table(params: PartitionParams, n_sites: int, classes: list[str], rng: np.random.Generator) -> np.ndarray:
    """The share of each class's images that each site receives.

    Parameters
    ----------
    params : PartitionParams
        ``scheme`` with its ``proportions`` table or ``dirichlet_alpha``, and ``quantity_skew``.
    n_sites : int
        Number of sites.
    classes : list of str
        Class names, in label order.
    rng : numpy.random.Generator
        Draws the Dirichlet shares and the quantity-skew factors.

    Returns
    -------
    ndarray of shape (n_classes, n_sites)
        Non-negative; every row sums to 1.

    Raises
    ------
    ConfigError
        If the ``proportions`` scheme has no table for ``n_sites`` or the table's classes differ from ``classes``.

    Notes
    -----
    Quantity skew multiplies each site's column by a factor ``exp(N(0, quantity_skew^2))`` and
    renormalises each class's row: sites grow or shrink as a whole while each keeps its mix roughly.
    """
    if params.scheme == "dirichlet":
        shares = rng.dirichlet(np.full(n_sites, params.dirichlet_alpha), size=len(classes))
    else:
        shares = _proportions_table(params, n_sites, classes)
    if params.quantity_skew > 0:
        shares = shares * rng.lognormal(0.0, params.quantity_skew, size=n_sites)
        shares = shares / shares.sum(axis=1, keepdims=True)
    return shares


def _proportions_table(params: PartitionParams, n_sites: int, classes: list[str]) -> np.ndarray:
    key = f'partition.proportions."{n_sites}"'
    table = params.proportions.get(str(n_sites))
    if table is None:
        raise ConfigError(f"{key}: no share table for {n_sites} sites; add one (a row per class) or use scheme dirichlet")
    if sorted(table) != sorted(classes):
        raise ConfigError(f"{key}: lists classes {sorted(table)} but the data have {classes}; give one row per class")
    return np.array([table[label] for label in classes], dtype=float)


def _deal(sizes: np.ndarray, wanted: np.ndarray, filled: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Destination of each group: shuffled, largest first, each to the eligible one most below target.

    ``filled`` is updated in place, so a caller may carry it over several calls (and targets with it).
    Destinations with ``wanted == 0`` are never chosen.
    """
    order = rng.permutation(len(sizes))
    order = order[np.argsort(-sizes[order], kind="stable")]  # stable: equal sizes keep the shuffle
    destination = np.empty(len(sizes), dtype=np.int64)
    for group in order:
        deficit = np.where(wanted > 0, wanted - filled, -np.inf)
        destination[group] = int(np.argmax(deficit))
        filled[destination[group]] += sizes[group]
    return destination


def _group_table(label_index: np.ndarray, groups: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group of each image, size of each group, majority label of each group; ties: the lower index)."""
    _, group_of_image = np.unique(groups, return_inverse=True)
    counts = np.zeros((group_of_image.max() + 1, n_classes), dtype=np.int64)
    np.add.at(counts, (group_of_image, label_index), 1)
    return group_of_image, counts.sum(axis=1), counts.argmax(axis=1)


def assign_sites(
    label_index: np.ndarray, groups: np.ndarray, shares: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Deal whole duplicate groups to sites so that each class is split by its row of ``shares``.

    Parameters
    ----------
    label_index : ndarray of shape (N,)
        Class index of each image.
    groups : ndarray of shape (N,)
        Duplicate-group id of each image; a group goes to one site, by its majority label.
    shares : ndarray of shape (n_classes, n_sites)
        From :func:`share_table`.
    rng : numpy.random.Generator

    Returns
    -------
    ndarray of shape (N,), dtype int
        Site index (from 0) of each image.
    """
    group_of_image, sizes, group_label = _group_table(label_index, groups, shares.shape[0])
    group_site = np.empty(len(sizes), dtype=np.int64)
    for label in range(shares.shape[0]):
        members = np.flatnonzero(group_label == label)
        wanted = shares[label] * sizes[members].sum()
        group_site[members] = _deal(sizes[members], wanted, np.zeros(shares.shape[1]), rng)
    return group_site[group_of_image]


def assign_parts(
    label_index: np.ndarray, groups: np.ndarray, val_fraction: float, n_classes: int, rng: np.random.Generator
) -> np.ndarray:
    """Split one site's images into local ``train`` and ``val`` parts, by whole groups, stratified.

    Targets accumulate over the classes (their rounding carries from one class to the next), so a
    small site still gets about ``val_fraction`` of its images as validation data.

    Returns
    -------
    ndarray of shape (N,), dtype str
        ``"train"`` or ``"val"`` per image.
    """
    group_of_image, sizes, group_label = _group_table(label_index, groups, n_classes)
    fractions = np.array([1.0 - val_fraction, val_fraction])
    wanted, filled = np.zeros(len(SITE_PARTS)), np.zeros(len(SITE_PARTS))
    group_part = np.empty(len(sizes), dtype=np.int64)
    for label in range(n_classes):
        members = np.flatnonzero(group_label == label)
        wanted += fractions * sizes[members].sum()
        group_part[members] = _deal(sizes[members], wanted, filled, rng)
    return np.asarray(SITE_PARTS)[group_part[group_of_image]]


def partition_pool(split_table: pd.DataFrame, classes: list[str], params: PartitionParams, n_sites: int) -> pd.DataFrame:
    """Partition the pooled global train+val images into ``n_sites`` sites with local train/val parts.

    Parameters
    ----------
    split_table : DataFrame
        The split stage's table (``row, relpath, label, group, split``).
    classes : list of str
        Class names, in label order.
    params : PartitionParams
        Scheme, shares, ``site_val_fraction`` and ``seed``.
    n_sites : int
        Number of sites.

    Returns
    -------
    DataFrame
        ``row, relpath, label, group, site, part`` for every pooled image; ``site`` counts from 1.

    Raises
    ------
    DataError
        If there are fewer duplicate groups than sites, or a site ends up with no images or with an
        empty local train or validation part.
    ConfigError
        If the share table for ``n_sites`` is missing or lists other classes.
    """
    pool = split_table.loc[split_table["split"].isin(POOLED_SPLITS)].reset_index(drop=True)
    n_groups = pool["group"].nunique()
    if n_sites > n_groups:
        raise DataError(
            f"partition: {n_sites} sites requested but the pooled train+val images form only {n_groups} duplicate "
            "groups (a group lives at one site); use fewer sites in partition.sites or more data"
        )
    # Seeded per site count: adding a site count to partition.sites leaves the others unchanged.
    rng = np.random.default_rng([params.seed, n_sites])
    unknown = sorted(set(pool["label"]) - set(classes))
    if unknown:
        raise DataError(f"partition: labels {unknown} are not among the classes {classes}; rerun the split stage")
    label_index = pool["label"].map({label: index for index, label in enumerate(classes)}).to_numpy()
    shares = share_table(params, n_sites, classes, rng)
    site = assign_sites(label_index, pool["group"].to_numpy(), shares, rng)
    _check_sites_filled(site, n_sites, shares, classes)
    part = np.empty(len(pool), dtype=object)
    for index in range(n_sites):
        members = np.flatnonzero(site == index)
        part[members] = assign_parts(
            label_index[members], pool["group"].to_numpy()[members], params.site_val_fraction, len(classes), rng
        )
        _check_parts_filled(part[members], index + 1)
    return pool[["row", "relpath", "label", "group"]].assign(site=site + 1, part=part.astype(str))


def _check_sites_filled(site: np.ndarray, n_sites: int, shares: np.ndarray, classes: list[str]) -> None:
    empty = [index for index in range(n_sites) if not np.any(site == index)]
    if empty:
        shown = ", ".join(f"{label} {share:.3g}" for label, share in zip(classes, shares[:, empty[0]], strict=True))
        raise DataError(
            f"partition: site {empty[0] + 1} of {n_sites} received no images (its shares: {shown}); raise its "
            f'shares in partition.proportions."{n_sites}", raise partition.dirichlet_alpha, or use fewer sites'
        )


def _check_parts_filled(parts: np.ndarray, site_number: int) -> None:
    for name in SITE_PARTS:
        if not np.any(parts == name):
            raise DataError(
                f"partition: site {site_number} has no local {name} images ({len(parts)} images in all); adjust "
                "partition.site_val_fraction, give the site larger shares, or use fewer sites"
            )


def heterogeneity(partition: pd.DataFrame, classes: list[str]) -> dict:
    """How far each site's label distribution and size are from the pooled ones.

    Parameters
    ----------
    partition : DataFrame
        From :func:`partition_pool`.
    classes : list of str
        Class names, in label order (also the order of the earth mover's axis).

    Returns
    -------
    dict
        ``pooled`` (class counts), ``sites`` (one entry per site: ``site``, ``n``, ``n_train``,
        ``n_val``, ``counts``, ``missing_classes``, ``js_divergence``, ``hellinger``, ``emd``) and
        ``summary`` (``sizes``, ``size_cv``, mean and max of each divergence).

    Notes
    -----
    ``js_divergence`` is the Jensen–Shannon divergence in bits (0 = same distribution, 1 = disjoint
    support); ``hellinger`` is the Hellinger distance (in [0, 1]); ``emd`` is the earth mover's
    (1-Wasserstein) distance over the class indices, which suits the ordered stages
    Benign < Early < Pre < Pro: moving mass from Early to Pro costs twice as much as to Pre.
    ``size_cv`` is the population standard deviation of the site sizes over their mean.
    """
    counts = pd.crosstab(partition["site"], pd.Categorical(partition["label"], categories=classes), dropna=False)
    counts = counts.reindex(columns=classes, fill_value=0)
    parts = pd.crosstab(partition["site"], partition["part"]).reindex(columns=list(SITE_PARTS), fill_value=0)
    pooled = counts.sum(axis=0).to_numpy()
    pooled_share = pooled / pooled.sum()
    positions = np.arange(len(classes))
    sites = []
    for site, row in counts.iterrows():
        share = row.to_numpy() / row.sum()
        sites.append({
            "site": int(site),
            "n": int(row.sum()),
            "n_train": int(parts.loc[site, "train"]),
            "n_val": int(parts.loc[site, "val"]),
            "counts": {label: int(n) for label, n in row.items()},
            "missing_classes": [label for label, n in row.items() if n == 0],
            "js_divergence": float(jensenshannon(share, pooled_share, base=2) ** 2),
            "hellinger": float(np.sqrt(0.5 * np.sum((np.sqrt(share) - np.sqrt(pooled_share)) ** 2))),
            "emd": float(wasserstein_distance(positions, positions, share, pooled_share)),
        })
    sizes = np.array([entry["n"] for entry in sites], dtype=float)
    summary = {"sizes": sizes.astype(int).tolist(), "size_cv": float(sizes.std() / sizes.mean())}
    for key in ("js_divergence", "hellinger", "emd"):
        values = [entry[key] for entry in sites]
        summary |= {f"{key}_mean": float(np.mean(values)), f"{key}_max": float(np.max(values))}
    return {"pooled": {label: int(n) for label, n in zip(classes, pooled, strict=True)}, "sites": sites, "summary": summary}


def plot_heterogeneity(stats: dict, classes: list[str], path: Path, title: str) -> None:
    """Save stacked bars of each site's class counts and class shares (beside the pooled mix), atomically.

    Parameters
    ----------
    stats : dict
        From :func:`heterogeneity`.
    classes : list of str
        Class names (the stacking order).
    path : Path
        Where the PNG goes.
    title : str
        Figure title (say there if the data is synthetic).
    """
    # An explicit Agg canvas: no display needed, and pyplot's global backend is left alone.

    names = [f"site {entry['site']}" for entry in stats["sites"]]
    counts = np.array([[entry["counts"][label] for label in classes] for entry in stats["sites"]], dtype=float)
    pooled = np.array([stats["pooled"][label] for label in classes], dtype=float)
    shares = np.vstack([counts / counts.sum(axis=1, keepdims=True), pooled / pooled.sum()])
    width = 4.0 + 1.2 * len(names)  # inches: room for one bar per site in each panel
    figure = new_figure(width, 4.5)
    count_axes, share_axes = figure.subplots(1, 2)
    _stacked_bars(count_axes, names, counts, classes)
    count_axes.set(title="Images per site", xlabel="Site", ylabel="Images (local train + val)")
    _stacked_bars(share_axes, [*names, "pooled"], shares, classes)
    share_axes.set(title="Class mix per site", xlabel="Site", ylabel="Share of the site's images", ylim=(0, 1))
    share_axes.legend(title="Class", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.suptitle(wrap_title(title, width), fontsize="medium")
    save_png(figure, path)


def _stacked_bars(axes, names: list[str], values: np.ndarray, classes: list[str]) -> None:
    bottom = np.zeros(len(names))
    for column, label in enumerate(classes):
        axes.bar(names, values[:, column], bottom=bottom, label=label)
        bottom += values[:, column]


def write_partition(
    partition: pd.DataFrame, out_dir: Path, classes: list[str], provenance: DataProvenance, params: PartitionParams
) -> dict:
    """Write ``partition.csv``, ``heterogeneity.json`` and ``heterogeneity.png`` into ``out_dir``.

    Returns
    -------
    dict
        The content of ``heterogeneity.json``: :func:`heterogeneity` plus ``n_sites``, ``scheme``,
        ``classes``, ``params`` and ``data`` (the provenance).
    """
    out_dir = Path(out_dir)
    n_sites = int(partition["site"].max())
    stats = {
        "n_sites": n_sites,
        "scheme": params.scheme,
        "classes": list(classes),
        **heterogeneity(partition, classes),
        "params": params.model_dump(),
        "data": provenance.to_dict(),
    }
    with atomic_path(out_dir / PARTITION_FILE, suffix=".csv") as tmp:
        partition.to_csv(tmp, index=False)
    write_json(out_dir / HETEROGENEITY_FILE, stats)
    title = provenance.title(f"{n_sites}-site partition ({params.scheme}): class counts and mix per site")
    plot_heterogeneity(stats, classes, out_dir / HETEROGENEITY_PNG_FILE, title)
    return stats


def read_partition(path: Path) -> pd.DataFrame:
    """Read a ``partition.csv`` written by :func:`write_partition`.

    Raises
    ------
    DataError
        If the file is missing or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: partition file not found; run the partition stage")
    try:
        frame = pd.read_csv(path, keep_default_na=False, dtype={"relpath": str, "label": str, "part": str})
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise DataError(f"{path}: unreadable partition file ({error}); run the partition stage again") from None
    missing = [column for column in PARTITION_COLUMNS if column not in frame.columns]
    unknown = sorted(set(frame["part"]) - set(SITE_PARTS)) if "part" in frame.columns else []
    if missing or unknown:
        problem = f"missing columns {missing}" if missing else f"unknown part names {unknown}"
        raise DataError(f"{path}: malformed partition file ({problem}); run the partition stage again")
    return frame[list(PARTITION_COLUMNS)]
