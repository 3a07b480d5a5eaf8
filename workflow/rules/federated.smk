# Federated learning: non-IID partitions of the pooled train+val images into sites, and one in-process
# federated model per entry of federation.runs. Each run's model.pt feeds the generic evaluate rule.
import re

FEDERATION_RUNS = config["federation"]["runs"]
# Only the run names match {run}, so results/<dataset>/centralized/model.pt stays train_centralized's.
RUN_PATTERN = "|".join(re.escape(name) for name in FEDERATION_RUNS) or "(?!)"


def partition_settings(wildcards):
    """What shapes the {sites}-site partition: another site count's share table does not."""
    section = {key: value for key, value in config["partition"].items() if key not in ("sites", "proportions")}
    return {**section, "proportions": config["partition"]["proportions"].get(wildcards.sites)}


def federation_settings(wildcards):
    """What shapes run {run}: the shared settings, the run itself and its strategy's own section."""
    run = FEDERATION_RUNS[wildcards.run]
    strategies = ("fedprox", "fedavgm", "fedadam")
    shared = {key: value for key, value in config["federation"].items() if key not in ("runs", *strategies)}
    return {**shared, "run": run, run["strategy"]: config["federation"].get(run["strategy"])}


def run_partition(wildcards):
    return f"results/{wildcards.dataset}/partitions/sites-{FEDERATION_RUNS[wildcards.run]['sites']}/partition.csv"


rule partition:
    input:
        rules.preprocess.output,
        split=rules.split.output.split,
    output:
        partition="results/{dataset}/partitions/sites-{sites}/partition.csv",
        heterogeneity="results/{dataset}/partitions/sites-{sites}/heterogeneity.json",
        figure=report(
            "results/{dataset}/partitions/sites-{sites}/heterogeneity.png",
            caption="../report/heterogeneity.rst", category="Federation", subcategory="sites-{sites}",
        ),
    params:
        partition=partition_settings,
    wildcard_constraints:
        sites="[0-9]+",
    benchmark:
        "results/{dataset}/benchmarks/partition_sites-{sites}.tsv"
    shell:
        "{LEUKOFED} partition --params {PARAMS_FILE} --cache data/{wildcards.dataset}/cache --split {input.split} "
        "--sites {wildcards.sites} --out-dir results/{wildcards.dataset}/partitions/sites-{wildcards.sites}"


rule federate:
    input:
        rules.preprocess.output,
        partition=run_partition,
    output:
        model="results/{dataset}/{run}/model.pt",
        final="results/{dataset}/{run}/final_model.pt",
        rounds="results/{dataset}/{run}/rounds.csv",
        record="results/{dataset}/{run}/federation.json",
    params:
        federation=federation_settings,
        model=config["model"],
        train=config["train"],
        privacy=config["privacy"]["dp"],  # DP-SGD at the sites when enabled
    wildcard_constraints:
        run=RUN_PATTERN,
    threads: config["runtime"]["threads"]
    resources:
        mlflow=1,  # one MLflow writer at a time (SQLite locks under parallel writers)
    benchmark:
        "results/{dataset}/benchmarks/federate_{run}.tsv"
    shell:
        "{LEUKOFED} federate --params {PARAMS_FILE} --dataset {wildcards.dataset} --run {wildcards.run} "
        "--cache data/{wildcards.dataset}/cache --partition {input.partition} "
        "--out-dir results/{wildcards.dataset}/{wildcards.run}"
