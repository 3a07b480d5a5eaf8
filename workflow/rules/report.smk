# The report a reader opens: reports/<dataset>/README.md and its machine-readable summary.json.


rule report:
    input:
        expand("results/{{dataset}}/{model}/eval/metrics.json", model=MODELS),
    output:
        summary="reports/{dataset}/summary.json",
        readme="reports/{dataset}/README.md",
    params:
        paper_accuracy=config["report"]["paper_accuracy"],
        made_by=lambda wildcards: f"snakemake --cores 8 --config dataset={wildcards.dataset}",
    benchmark:
        "results/{dataset}/benchmarks/report.tsv"
    shell:
        "{LEUKOFED} report --params {PARAMS_FILE} --results results/{wildcards.dataset} "
        "--out-dir reports/{wildcards.dataset} --command '{params.made_by}'"
