# The report a reader opens: reports/<dataset>/README.md and its machine-readable summary.json.


# Partitions the federated runs train on: their heterogeneity table and figure go into the report.
REPORT_PARTITIONS = sorted({run["sites"] for run in config["federation"]["runs"].values()})


rule report:
    input:
        metrics=expand("results/{{dataset}}/{model}/eval/metrics.json", model=MODELS),
        federation=expand("results/{{dataset}}/{run}/{file}", run=config["federation"]["runs"], file=["federation.json", "rounds.csv"]),
        partitions=expand(
            "results/{{dataset}}/partitions/sites-{sites}/heterogeneity.{ext}", sites=REPORT_PARTITIONS, ext=["json", "png"]
        ),
        centralized="results/{dataset}/centralized/training.json",  # its best val accuracy: the curves' reference line
        calibration=expand(
            "results/{{dataset}}/{model}/calibration/{file}", model=MODELS, file=["calibration.json", "reliability.png"]
        ),
        cam=expand("results/{{dataset}}/{model}/cam/cam.json", model=MODELS),  # its panel grids come with it
        statistics="results/{dataset}/comparison/statistics.json",
        audit="results/{dataset}/audit/shortcut.json",
        privacy=expand("results/{{dataset}}/privacy/{file}", file=["privacy.json", "privacy_utility.png", "membership_roc.png"]),
    output:
        summary="reports/{dataset}/summary.json",
        readme="reports/{dataset}/README.md",
        curves=report(
            "reports/{dataset}/validation_accuracy_per_round.png", caption="../report/curves.rst", category="Federation"
        ),
    params:
        paper_accuracy=config["report"]["paper_accuracy"],
        made_by=lambda wildcards: f"snakemake --cores 8 --config dataset={wildcards.dataset}",
    benchmark:
        "results/{dataset}/benchmarks/report.tsv"
    shell:
        "{LEUKOFED} report --params {PARAMS_FILE} --results results/{wildcards.dataset} "
        "--out-dir reports/{wildcards.dataset} --command '{params.made_by}'"
