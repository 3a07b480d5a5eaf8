"""Tests of leukofed.report on results trees made by the real evaluate, partition and federate writers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from leukofed.config import load_params
from leukofed.data.partition import HETEROGENEITY_FILE, HETEROGENEITY_PNG_FILE, partition_pool, write_partition
from leukofed.errors import LeukofedError
from leukofed.evaluation.audit import shortcut_audit
from leukofed.evaluation.calibration import federated_temperature, temperature_record, write_calibration
from leukofed.evaluation.explain import explain_model
from leukofed.evaluation.metrics import write_evaluation
from leukofed.evaluation.statistics import compare_models
from leukofed.federation.engine import (
    SiteData,
    round_table,
    run_federation,
    summarize,
)
from leukofed.io import read_json, write_json, write_text
from leukofed.model import build_model
from leukofed.provenance import DataProvenance
from leukofed.report import CURVES_PNG_FILE, build_report
from leukofed.training import configure_torch

CLASSES = ["Benign", "Early", "Pre", "Pro"]
MODELS = ["centralized", "fedavg-3"]
PAPER = {"fedavg-3": 0.9570, "fedavg-5": 0.9656}
COMMAND = "snakemake --cores 2 --config dataset=toy"
FINGERPRINT = "cd" * 32

PARAMS = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
# Tiny federated runs: 16 px images, a 4-channel model, 3 rounds of 1 local epoch.
IMAGE_SIZE = 16
TRAIN = PARAMS.train.model_copy(update={"batch_size": 8})
MODEL = PARAMS.model.model_copy(update={"width": 4})
FEDERATION = PARAMS.federation.model_copy(update={"local_epochs": 1})
ROUNDS = 3
FEDERATED_RUNS = {"fedavg-3": ("fedavg", 3), "fedprox-5": ("fedprox", 5)}  # name -> strategy, sites
# Site 2 of the 3-site partition receives no Pro images: the report must show a missing class.
PROPORTIONS_3 = {"Benign": [0.6, 0.2, 0.2], "Early": [0.2, 0.6, 0.2], "Pre": [0.2, 0.5, 0.3], "Pro": [0.5, 0.0, 0.5]}
IMAGES_PER_CLASS = 30
THREADS = 1  # tiny models: one thread is as fast, and immune to spin-waiting when the CPU is shared
CENTRALIZED_BEST_VAL = 0.875


Y_TRUE = np.array([0, 0, 1, 1, 2, 2, 3, 3])
Y_PRED = np.array([0, 1, 1, 1, 2, 2, 3, 0])
ANALYSIS_IMAGE_SIZE = 32  # the audit's corner patch (24 px) must fit
ANALYSIS_PARAMS = PARAMS.analysis.model_copy(update={
    "cam": PARAMS.analysis.cam.model_copy(update={"panels_per_class": 1, "max_error_panels": 2}),
    "bootstrap": PARAMS.analysis.bootstrap.model_copy(update={"n_resamples": 200}),
})


def _provenance(source: str) -> DataProvenance:
    return DataProvenance("toy", source, "/data/toy", FINGERPRINT, 400)


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory) -> dict[str, Path]:
    """One evaluate-stage output folder per data source, written once (plotting is the slow part).

    Next to each ``eval/`` lies ``analysis/``: the analysis stages' outputs of the same toy model.
    """
    proba = np.full((len(Y_TRUE), len(CLASSES)), 0.1)
    proba[np.arange(len(Y_TRUE)), Y_PRED] = 0.7
    relpaths = [f"img{i}.jpg" for i in range(len(Y_TRUE))]
    folders = {}
    for source in ("synthetic", "folder"):
        folders[source] = tmp_path_factory.mktemp(source) / "eval"
        model_info = {"name": "toy", "params": {"epochs": 3}}
        write_evaluation(folders[source], Y_TRUE, proba, CLASSES, relpaths, _provenance(source), model_info, "toy")
        _write_analysis(folders[source].parent / "analysis", _provenance(source))
    return folders


def _write_analysis(folder: Path, provenance: DataProvenance) -> None:
    """The calibrate (global and site-wise fit), explain and audit outputs of a toy model on 8 tiny test images.

    Written by the stages' own writers; :func:`_results` copies them for every model.
    """
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (len(Y_TRUE), ANALYSIS_IMAGE_SIZE, ANALYSIS_IMAGE_SIZE, 3), dtype=np.uint8)
    logits = rng.normal(size=(len(Y_TRUE), len(CLASSES))) + 2.0 * np.eye(len(CLASSES))[Y_PRED]
    bounds = ANALYSIS_PARAMS.temperature_bounds
    fits = {
        "global": {"scheme": "global validation split", **temperature_record(logits, Y_TRUE, bounds)},
        "site-wise": {"scheme": "site-wise: the server minimises the sum of the sites' NLLs on their local validation parts",
                      **federated_temperature({1: (logits[:4], Y_TRUE[:4]), 2: (logits[4:], Y_TRUE[4:])}, bounds)},
    }
    model_info = {"name": "toy", "path": "model.pt"}
    for scheme, fit in fits.items():
        write_calibration(folder / scheme, Y_TRUE, logits, fit, CLASSES, ANALYSIS_PARAMS.ece_bins, provenance, model_info)
    configure_torch(THREADS, seed=0)
    model = build_model(MODEL, len(CLASSES)).eval()
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    explain_model(model, images, Y_TRUE, proba, [f"img{i}.jpg" for i in range(len(Y_TRUE))], CLASSES,
                  ANALYSIS_PARAMS.cam, folder / "cam", provenance, model_info, len(Y_TRUE))
    audit = shortcut_audit(np.concatenate([images, images]), np.concatenate([Y_TRUE, Y_TRUE]),
                           np.arange(len(Y_TRUE)), np.arange(len(Y_TRUE), 2 * len(Y_TRUE)), ANALYSIS_PARAMS.audit)
    write_json(folder / "shortcut.json", {**audit, "data": provenance.to_dict()})


def _add_analysis(results: Path, analysis: Path, models: list[str]) -> None:
    """The analysis stages' outputs for ``models``, laid out as the pipeline does (statistics computed here)."""
    for name in models:
        shutil.copytree(analysis / ("global" if name == "centralized" else "site-wise"), results / name / "calibration")
        shutil.copytree(analysis / "cam", results / name / "cam")
    statistics = compare_models({name: Y_PRED for name in models}, Y_TRUE, "centralized", len(CLASSES),
                                ANALYSIS_PARAMS.bootstrap)
    write_json(results / "comparison" / "statistics.json", {**statistics, "data": read_json(analysis / "shortcut.json")["data"]})
    (results / "audit").mkdir()
    shutil.copy(analysis / "shortcut.json", results / "audit" / "shortcut.json")


def _results(tmp_path: Path, eval_dir: Path, models: list[str] = MODELS) -> Path:
    results = tmp_path / "results" / "toy"
    for name in models:
        shutil.copytree(eval_dir, results / name / "eval")
    _add_analysis(results, eval_dir.parent / "analysis", models)
    return results


def test_summary_has_the_documented_structure(tmp_path, evaluations):
    results, out = _results(tmp_path, evaluations["synthetic"]), tmp_path / "reports"

    summary = build_report(results, out, paper_accuracy=PAPER, command=COMMAND)

    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary.keys() == {"dataset", "data", "models", "paper", "audit"}
    assert summary["dataset"] == "toy"
    assert summary["data"] == {"source": "synthetic", "fingerprint": FINGERPRINT, "n_images": 400, "synthetic": True}
    assert summary["paper"] == PAPER
    assert list(summary["models"]) == MODELS
    model = summary["models"]["fedavg-3"]
    assert model.keys() == {"accuracy", "balanced_accuracy", "macro_f1", "per_class", "params", "data", "command",
                            "ci", "calibration", "cam_randomisation_similarity", "mcnemar_vs_centralized"}
    assert "mcnemar_vs_centralized" not in summary["models"]["centralized"]
    assert model["accuracy"] == pytest.approx(6 / 8)
    assert model["per_class"]["Benign"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert model["params"] == {"epochs": 3}
    assert model["data"] == {"source": "synthetic", "fingerprint": FINGERPRINT, "n_images": 400}
    assert model["command"] == COMMAND


def test_readme_compares_models_and_links_their_figures(tmp_path, evaluations):
    results, out = _results(tmp_path, evaluations["synthetic"]), tmp_path / "reports"

    build_report(results, out, paper_accuracy=PAPER, command=COMMAND)

    readme = (out / "README.md").read_text()
    assert readme.startswith("# SYNTHETIC DATA")
    assert "> **SYNTHETIC DATA.**" in readme
    comparison = readme[:readme.index("## Calibration")]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in comparison.splitlines() if line.startswith("| ")}
    assert rows["fedavg-3"].endswith("| 1 | 95.70% |")  # McNemar p of identical predictions, paper accuracy
    assert rows["centralized"].endswith("| — | — | — |")
    assert "| 75.00% (" in rows["centralized"]  # accuracy with 2 decimals, then its CI
    for name in MODELS:
        assert f"## {name}" in readme
        assert f"](confusion_matrix_{name}.png)" in readme
        copied = out / f"confusion_matrix_{name}.png"
        assert copied.read_bytes() == (results / name / "eval" / "confusion_matrix.png").read_bytes()
    assert FINGERPRINT in readme and COMMAND in readme
    assert "doi:10.34740/KAGGLE/DSV/2175623" in readme and "Sci Rep 16, 9768 (2026)" in readme


def test_real_data_has_no_synthetic_banner(tmp_path, evaluations):
    results, out = _results(tmp_path, evaluations["folder"]), tmp_path / "reports"

    summary = build_report(results, out, paper_accuracy=PAPER, command=COMMAND)

    assert summary["data"]["synthetic"] is False
    readme = (out / "README.md").read_text()
    assert "SYNTHETIC" not in readme
    assert readme.startswith("# leukofed results (toy, 400 images, data cdcdcdcdcdcd)")


def test_no_results_is_an_error_that_names_the_folder_and_fix(tmp_path):
    results = tmp_path / "results" / "toy"
    results.mkdir(parents=True)

    with pytest.raises(LeukofedError, match="evaluate stage") as error:
        build_report(results, tmp_path / "reports", paper_accuracy=PAPER, command=COMMAND)
    assert str(results) in str(error.value)
    assert not (tmp_path / "reports").exists()


def test_models_on_different_data_are_refused(tmp_path, evaluations):
    results = _results(tmp_path, evaluations["synthetic"])
    metrics_path = results / "fedavg-3" / "eval" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["data"]["fingerprint"] = "ef" * 32
    metrics_path.write_text(json.dumps(metrics))

    with pytest.raises(LeukofedError, match="different data") as error:
        build_report(results, tmp_path / "reports", paper_accuracy=PAPER, command=COMMAND)
    assert "centralized" in str(error.value) and "fedavg-3" in str(error.value)


def test_malformed_metrics_names_the_file(tmp_path, evaluations):
    results = _results(tmp_path, evaluations["synthetic"])
    metrics_path = results / "centralized" / "eval" / "metrics.json"
    metrics_path.write_text(json.dumps({"accuracy": 0.5}))

    with pytest.raises(LeukofedError, match="missing") as error:
        build_report(results, tmp_path / "reports", paper_accuracy=PAPER, command=COMMAND)
    assert str(metrics_path) in str(error.value)


def test_recall_of_a_class_absent_from_the_evaluation_shows_a_dash(tmp_path, evaluations):
    results, out = _results(tmp_path, evaluations["folder"], ["centralized"]), tmp_path / "reports"
    metrics_path = results / "centralized" / "eval" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["per_class"]["Pro"].update(support=0, recall=0.0)  # what zero_division=0 stores
    metrics_path.write_text(json.dumps(metrics))

    build_report(results, out, paper_accuracy=PAPER, command=COMMAND)

    readme = (out / "README.md").read_text()
    comparison_row = next(line for line in readme.splitlines() if line.startswith("| centralized |"))
    pro_recall = comparison_row.strip("| ").split(" | ")[7]  # model, 3 scores, Benign..Pro recall
    assert pro_recall == "—"
    assert "| Pro | 100.00% | — | " in readme


# --- federated results ---------------------------------------------------------------------------


def _split_table() -> pd.DataFrame:
    """Singleton groups, every class split 2:1 into the global train and val parts (no test: not partitioned)."""
    labels = np.repeat(CLASSES, IMAGES_PER_CLASS)
    return pd.DataFrame({
        "row": np.arange(len(labels)),
        "relpath": [f"img{i}.jpg" for i in range(len(labels))],
        "label": labels,
        "group": np.arange(len(labels)),
        "split": np.where(np.arange(len(labels)) % 3 == 2, "val", "train"),
    })


def _sites(partition: pd.DataFrame, rng: np.random.Generator) -> list[SiteData]:
    """Each site's local parts as the federate stage builds them, with noisy images coloured by class."""
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])

    def part(site: int, name: str) -> tuple[np.ndarray, np.ndarray]:
        chosen = (partition["site"] == site) & (partition["part"] == name)
        labels = np.array([CLASSES.index(label) for label in partition.loc[chosen, "label"]])
        noise = rng.integers(-60, 61, (len(labels), IMAGE_SIZE, IMAGE_SIZE, 3))
        return np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8), labels

    return [SiteData(site, *part(site, "train"), *part(site, "val")) for site in sorted(set(partition["site"]))]


def _federate(out_dir: Path, name: str, partition: pd.DataFrame, provenance: DataProvenance, heterogeneity: dict) -> None:
    """Run the engine and write rounds.csv and federation.json as the federate stage does."""
    strategy, n_sites = FEDERATED_RUNS[name]
    run = PARAMS.federation.runs["fedavg-3"].model_copy(update={"strategy": strategy, "sites": n_sites, "rounds": ROUNDS})
    sites = _sites(partition, np.random.default_rng(n_sites))
    configure_torch(THREADS, seed=0)
    model = build_model(MODEL, len(CLASSES))
    result = run_federation(model, sites, run, FEDERATION, TRAIN, checkpoint_dir=out_dir / "checkpoint", data_key=name)
    summary = summarize(result, sites)
    settings = {"run": run.model_dump(), "federation": FEDERATION.model_dump(exclude={"runs"}),
                "model": MODEL.model_dump(), "train": TRAIN.model_dump()}
    record = {"model": name, "data": provenance.to_dict(), **summary, "heterogeneity": heterogeneity["summary"],
              "resumed_from_round": result.resumed_from, "params": settings}
    write_text(out_dir / "rounds.csv", round_table(result.records).to_csv(index=False))
    write_json(out_dir / "federation.json", record)


@pytest.fixture(scope="module")
def federated_results(tmp_path_factory, evaluations) -> Path:
    """results/<dataset>/ as the pipeline leaves it: centralized, fedavg-3 and fedprox-5, with partitions.

    The evaluation of every model is the same toy one; partitions and federated runs come from the
    real partition writer and engine.
    """
    results = tmp_path_factory.mktemp("federated") / "results" / "toy"
    provenance = DataProvenance("toy", "folder", "/data/toy", FINGERPRINT, 400)
    for name in ["centralized", *FEDERATED_RUNS]:
        shutil.copytree(evaluations["folder"], results / name / "eval")
    _add_analysis(results, evaluations["folder"].parent / "analysis", ["centralized", *FEDERATED_RUNS])
    write_json(results / "centralized" / "training.json",
               {"model": "centralized", "data": provenance.to_dict(), "best_val_accuracy": CENTRALIZED_BEST_VAL})
    partition_params = PARAMS.partition.model_copy(
        update={"proportions": {**PARAMS.partition.proportions, "3": PROPORTIONS_3}}
    )
    for name, (_, n_sites) in FEDERATED_RUNS.items():
        partition = partition_pool(_split_table(), CLASSES, partition_params, n_sites)
        stats = write_partition(partition, results / "partitions" / f"sites-{n_sites}", CLASSES, provenance, partition_params)
        _federate(results / name, name, partition, provenance, stats)
    return results


def _copy(results: Path, tmp_path: Path) -> Path:
    copied = tmp_path / "results" / "toy"
    shutil.copytree(results, copied)
    return copied


def test_federated_models_gain_federation_heterogeneity_and_fairness(tmp_path, federated_results):
    summary = build_report(federated_results, tmp_path / "reports", paper_accuracy=PAPER, command=COMMAND)

    assert list(summary["models"]) == ["centralized", *FEDERATED_RUNS]
    assert "federation" not in summary["models"]["centralized"]
    for name, (strategy, n_sites) in FEDERATED_RUNS.items():
        model = summary["models"][name]
        record = read_json(federated_results / name / "federation.json")
        partition = read_json(federated_results / "partitions" / f"sites-{n_sites}" / HETEROGENEITY_FILE)
        federation = model["federation"]
        assert {key: federation[key] for key in ("sites", "strategy", "rounds", "local_epochs", "best_round")} == {
            "sites": n_sites, "strategy": strategy, "rounds": ROUNDS, "local_epochs": 1, "best_round": record["best_round"]}
        assert (federation["bytes_sent"], federation["bytes_received"]) == (record["bytes"]["sent"], record["bytes"]["received"])
        assert federation["wall_seconds"] == pytest.approx(pd.read_csv(federated_results / name / "rounds.csv")["seconds"].sum())
        heterogeneity = model["heterogeneity"]
        assert heterogeneity["partition"] == f"sites-{n_sites}"
        assert heterogeneity["quantity_cv"] == partition["summary"]["size_cv"]
        assert [site["counts"] for site in heterogeneity["sites"].values()] == [site["counts"] for site in partition["sites"]]
        for key in ("js_divergence", "hellinger", "emd"):
            assert [site[key] for site in heterogeneity["sites"].values()] == [site[key] for site in partition["sites"]]
        fairness = model["fairness"]
        assert fairness["per_site"] == {site: entry["val_accuracy_best"] for site, entry in record["sites"].items()}
        assert len(fairness["per_site"]) == n_sites
        best = record["fairness"]["best"]
        assert (fairness["mean"], fairness["std"], fairness["cv"], fairness["min_max_gap"], fairness["jain_index"]) == (
            best["mean"], best["std"], best["cv"], best["gap"], best["jain"])
    assert summary["models"]["fedavg-3"]["paper_accuracy"] == PAPER["fedavg-3"]
    assert "paper_accuracy" not in summary["models"]["fedprox-5"]  # the paper reports no FedProx
    assert summary["models"]["fedavg-3"]["heterogeneity"]["sites"]["2"]["missing_classes"] == ["Pro"]


def test_readme_shows_the_federated_sections_in_order(tmp_path, federated_results):
    out = tmp_path / "reports"
    build_report(federated_results, out, paper_accuracy=PAPER, command=COMMAND)

    readme = (out / "README.md").read_text()
    headings = ["## Comparison", "## Heterogeneity of the site partitions", "## Validation accuracy per round",
                "## Fairness across sites", "## Communication and cost", "## Calibration", "## Grad-CAM",
                "## Shortcut audit", "## centralized", "## fedavg-3", "## fedprox-5", "## Reproducibility"]
    positions = [readme.index(heading) for heading in headings]
    assert positions == sorted(positions)
    comparison = readme[:readme.index("## Heterogeneity")]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in comparison.splitlines() if line.startswith("| ")}
    assert rows["fedavg-3"].endswith("| +0.00 | 1 | 95.70% |")  # same toy evaluation as centralized: no gap
    assert rows["centralized"].endswith("| — | — | — |")
    for n_sites in (3, 5):
        copied = out / f"heterogeneity_sites-{n_sites}.png"
        assert f"]({copied.name})" in readme
        assert copied.read_bytes() == (federated_results / "partitions" / f"sites-{n_sites}" / HETEROGENEITY_PNG_FILE).read_bytes()
    assert "**Site 2 has no Pro images.**" in readme
    assert f"]({CURVES_PNG_FILE})" in readme and (out / CURVES_PNG_FILE).read_bytes().startswith(b"\x89PNG")
    assert "centralized: best validation accuracy" not in readme  # the reference line lives in the figure
    fairness = readme[readme.index("## Fairness"):readme.index("## Communication")]
    assert "| Site 5 |" in fairness and "| Jain index |" in fairness
    communication = readme[readme.index("## Communication"):readme.index("## Calibration")]
    for name in FEDERATED_RUNS:
        assert f"| {name} |" in fairness and f"| {name} |" in communication
    assert " B |" in communication and "| Total (MB) |" in communication


def test_report_is_deterministic(tmp_path, federated_results):
    first, second = tmp_path / "first", tmp_path / "second"
    build_report(federated_results, first, paper_accuracy=PAPER, command=COMMAND)
    build_report(federated_results, second, paper_accuracy=PAPER, command=COMMAND)

    names = sorted(path.name for path in first.iterdir())
    assert names == sorted(path.name for path in second.iterdir())
    assert not [name for name in names if name.startswith(".")], "a temporary file was left behind"
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_missing_partition_names_the_file_and_the_stage(tmp_path, federated_results):
    results = _copy(federated_results, tmp_path)
    missing = results / "partitions" / "sites-5" / HETEROGENEITY_FILE
    missing.unlink()

    with pytest.raises(LeukofedError, match="partition stage") as error:
        build_report(results, tmp_path / "reports", paper_accuracy=PAPER, command=COMMAND)
    assert str(missing) in str(error.value)


def test_federated_run_on_other_data_is_refused(tmp_path, federated_results):
    results = _copy(federated_results, tmp_path)
    record_path = results / "fedavg-3" / "federation.json"
    record = read_json(record_path)
    record["data"]["fingerprint"] = "ef" * 32
    write_json(record_path, record)

    with pytest.raises(LeukofedError, match="federate") as error:
        build_report(results, tmp_path / "reports", paper_accuracy=PAPER, command=COMMAND)
    assert str(record_path) in str(error.value)


# --- analysis: statistics, calibration, Grad-CAM, shortcut audit ------------------------------------


def _section(readme: str, heading: str) -> str:
    """The text of one ``## `` section of the README."""
    start = readme.index(f"## {heading}\n")
    end = readme.find("\n## ", start + 1)
    return readme[start:end if end >= 0 else None]


def _table_rows(text: str) -> dict[str, list[str]]:
    """First cell -> all cells of each markdown table row in ``text``."""
    rows = [line.strip("| ").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    return {row[0]: row for row in rows}


def test_summary_carries_the_analysis_of_every_model(tmp_path, federated_results):
    summary = build_report(federated_results, tmp_path / "reports", paper_accuracy=PAPER, command=COMMAND)

    statistics = read_json(federated_results / "comparison" / "statistics.json")
    for name, model in summary["models"].items():
        calibration = read_json(federated_results / name / "calibration" / "calibration.json")
        assert model["ci"] == {key: statistics["models"][name][key] for key in ("accuracy", "balanced_accuracy", "macro_f1")}
        assert model["ci"]["accuracy"].keys() == {"estimate", "low", "high"}
        assert model["calibration"]["temperature"] == calibration["temperature"]
        assert {key: model["calibration"][key] for key in ("ece", "mce", "brier", "nll")} == calibration["overall"]
        assert model["calibration"]["after_scaling"] == {key: calibration["after_scaling"][key]
                                                         for key in ("ece", "mce", "brier", "nll")}
        cam = read_json(federated_results / name / "cam" / "cam.json")
        assert model["cam_randomisation_similarity"] == cam["randomisation_similarity"]
        if name != "centralized":
            assert model["mcnemar_vs_centralized"] == statistics["mcnemar"][name]
    audit = read_json(federated_results / "audit" / "shortcut.json")
    assert summary["audit"]["border_colour"] == audit["border_colour"]
    assert summary["audit"]["corner_patch"] == audit["corner_patch"]
    assert summary["audit"]["majority_class"] == audit["majority_class"]


def test_comparison_table_shows_confidence_intervals_and_mcnemar(tmp_path, federated_results):
    out = tmp_path / "reports"
    summary = build_report(federated_results, out, paper_accuracy=PAPER, command=COMMAND)

    rows = _table_rows(_section((out / "README.md").read_text(), "Comparison"))
    assert rows["Model"][1:4] == ["Accuracy (95% CI)", "Balanced accuracy (95% CI)", "Macro-F1 (95% CI)"]
    assert "McNemar p vs centralized" in rows["Model"]
    ci = summary["models"]["fedavg-3"]["ci"]["accuracy"]
    expected = f"75.00% ({100 * ci['low']:.1f}–{100 * ci['high']:.1f})"
    assert rows["fedavg-3"][1] == expected
    assert rows["centralized"][rows["Model"].index("McNemar p vs centralized")] == "—"


def test_calibration_section_shows_before_and_after_and_the_fit(tmp_path, federated_results):
    out = tmp_path / "reports"
    summary = build_report(federated_results, out, paper_accuracy=PAPER, command=COMMAND)

    section = _section((out / "README.md").read_text(), "Calibration")
    rows = _table_rows(section)
    calibration = summary["models"]["centralized"]["calibration"]
    assert rows["centralized"][1] == f"{calibration['ece']:.4f} → {calibration['after_scaling']['ece']:.4f}"
    assert rows["centralized"][-1].startswith("global validation split")
    assert rows["fedprox-5"][-1].startswith("2 sites' local validation parts")
    assert "- site-wise: the server minimises the sum of the sites' NLLs on their local validation parts: `fedavg-3`, " \
        "`fedprox-5`" in section
    for name in ("centralized", "fedavg-3"):  # the centralized and the first federated model
        copied = out / f"reliability_{name}.png"
        assert f"]({copied.name})" in section
        assert copied.read_bytes() == (federated_results / name / "calibration" / "reliability.png").read_bytes()
    assert not (out / "reliability_fedprox-5.png").exists()


def test_grad_cam_section_shows_similarities_and_only_two_panel_grids(tmp_path, federated_results):
    out = tmp_path / "reports"
    summary = build_report(federated_results, out, paper_accuracy=PAPER, command=COMMAND)

    section = _section((out / "README.md").read_text(), "Grad-CAM")
    rows = _table_rows(section)
    assert rows["Model"] == ["Model", *ANALYSIS_PARAMS.cam.methods]
    similarity = summary["models"]["fedavg-3"]["cam_randomisation_similarity"]
    assert rows["fedavg-3"][1:] == [f"{similarity[method]:.2f}" for method in ANALYSIS_PARAMS.cam.methods]
    panels = sorted(path.name for path in out.glob("cam_*.png"))
    assert len(panels) == 2 and "cam_errors_centralized.png" in panels
    for name in panels:
        assert f"]({name})" in section
    assert section.rstrip().endswith(f"doi:10.34740/KAGGLE/DSV/2175623](https://doi.org/10.34740/KAGGLE/DSV/2175623)."), \
        "the dataset citation goes right under its images"


def test_shortcut_audit_sits_next_to_the_cnn_and_majority_baseline(tmp_path, federated_results):
    out = tmp_path / "reports"
    summary = build_report(federated_results, out, paper_accuracy=PAPER, command=COMMAND)

    section = _section((out / "README.md").read_text(), "Shortcut audit")
    rows = _table_rows(section)
    audit = summary["audit"]
    assert rows["Border colour"][2] == f"{100 * audit['border_colour']['accuracy']:.2f}%"
    assert rows["Corner patch (scale bar)"][2] == f"{100 * audit['corner_patch']['accuracy']:.2f}%"
    assert rows["Majority class"][2] == f"{100 * audit['majority_class']['accuracy']:.2f}%"
    assert rows["CNN (`centralized`)"][2] == "75.00%"
    assert "The best trivial cue" in section


@pytest.mark.parametrize(("relpath", "stage"), [
    ("fedavg-3/calibration/calibration.json", "calibrate stage for 'fedavg-3'"),
    ("centralized/cam/cam.json", "explain stage for 'centralized'"),
    ("centralized/cam/errors.png", "explain stage for 'centralized'"),
    ("comparison/statistics.json", "compare stage"),
    ("audit/shortcut.json", "audit stage"),
])
def test_missing_analysis_output_names_the_file_and_the_stage(tmp_path, federated_results, relpath, stage):
    results = _copy(federated_results, tmp_path)
    (results / relpath).unlink()

    with pytest.raises(LeukofedError, match=stage) as error:
        build_report(results, tmp_path / "reports", paper_accuracy=PAPER, command=COMMAND)
    assert str(results / relpath) in str(error.value)


def test_statistics_without_a_model_are_refused(tmp_path, federated_results):
    results = _copy(federated_results, tmp_path)
    path = results / "comparison" / "statistics.json"
    statistics = read_json(path)
    del statistics["models"]["fedprox-5"], statistics["mcnemar"]["fedprox-5"]
    write_json(path, statistics)

    with pytest.raises(LeukofedError, match="compare stage") as error:
        build_report(results, tmp_path / "reports", paper_accuracy=PAPER, command=COMMAND)
    assert str(path) in str(error.value) and "fedprox-5" in str(error.value)


def test_analysis_of_other_data_is_refused(tmp_path, federated_results):
    results = _copy(federated_results, tmp_path)
    path = results / "audit" / "shortcut.json"
    audit = read_json(path)
    audit["data"]["fingerprint"] = "ef" * 32
    write_json(path, audit)

    with pytest.raises(LeukofedError, match="audit stage") as error:
        build_report(results, tmp_path / "reports", paper_accuracy=PAPER, command=COMMAND)
    assert str(path) in str(error.value)


def test_a_temperature_fit_at_the_search_bound_is_reported_as_not_scaled(tmp_path, federated_results):
    results, out = _copy(federated_results, tmp_path), tmp_path / "reports"
    path = results / "centralized" / "calibration" / "calibration.json"
    calibration = read_json(path)
    calibration["temperature_fit"].update(at_bound=True, fitted_temperature=0.05, temperature=1.0)
    write_json(path, calibration)

    build_report(results, out, paper_accuracy=PAPER, command=COMMAND)

    rows = _table_rows(_section((out / "README.md").read_text(), "Calibration"))
    assert rows["centralized"][-1] == "global validation split, 8 images; fit at the search bound (T 0.05), so not scaled"
