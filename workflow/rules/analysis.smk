# Analysis of every trained model: calibration, Grad-CAM panels, statistics between models, shortcut audit.
# Figures carry report() flags, so `snakemake --report report.html` includes them.

CLASSES = config["data"]["classes"]


def calibration_partition(wildcards):
    """A federated model fits its temperature site by site, on its partition's local validation parts."""
    run = config["federation"]["runs"].get(wildcards.model)
    return {"partition": f"results/{wildcards.dataset}/partitions/sites-{run['sites']}/partition.csv"} if run else {}


def partition_flag(wildcards, input):
    return f"--partition {input.partition}" if "partition" in input.keys() else ""


rule calibrate:
    input:
        rules.preprocess.output,
        unpack(calibration_partition),
        model="results/{dataset}/{model}/model.pt",
        split=rules.split.output.split,
    output:
        record="results/{dataset}/{model}/calibration/calibration.json",
        reliability=report(
            "results/{dataset}/{model}/calibration/reliability.png",
            caption="../report/calibration.rst", category="Calibration", subcategory="{model}",
        ),
        confidence=report(
            "results/{dataset}/{model}/calibration/confidence.png",
            caption="../report/calibration.rst", category="Calibration", subcategory="{model}",
        ),
    params:
        ece_bins=config["analysis"]["ece_bins"],
        temperature_bounds=config["analysis"]["temperature_bounds"],
        partition=partition_flag,
    threads: config["runtime"]["threads"]
    benchmark:
        "results/{dataset}/benchmarks/calibrate_{model}.tsv"
    shell:
        "{LEUKOFED} calibrate --params {PARAMS_FILE} --model {input.model} --cache data/{wildcards.dataset}/cache "
        "--split {input.split} {params.partition} --out-dir results/{wildcards.dataset}/{wildcards.model}/calibration"


rule explain:
    input:
        rules.preprocess.output,
        model="results/{dataset}/{model}/model.pt",
        split=rules.split.output.split,
    output:
        record="results/{dataset}/{model}/cam/cam.json",
        correct=[
            report(f"results/{{dataset}}/{{model}}/cam/correct_{name}.png", caption="../report/cam.rst",
                   category="Grad-CAM", subcategory="{model}")
            for name in CLASSES
        ],
        errors=report(
            "results/{dataset}/{model}/cam/errors.png", caption="../report/cam.rst", category="Grad-CAM", subcategory="{model}"
        ),
    params:
        cam=config["analysis"]["cam"],
    threads: config["runtime"]["threads"]
    benchmark:
        "results/{dataset}/benchmarks/explain_{model}.tsv"
    shell:
        "{LEUKOFED} explain --params {PARAMS_FILE} --model {input.model} --cache data/{wildcards.dataset}/cache "
        "--split {input.split} --out-dir results/{wildcards.dataset}/{wildcards.model}/cam"


rule compare:
    input:
        expand("results/{{dataset}}/{model}/eval/{name}", model=MODELS, name=["predictions.csv", "metrics.json"]),
    output:
        statistics="results/{dataset}/comparison/statistics.json",
    params:
        bootstrap=config["analysis"]["bootstrap"],
        models=MODELS,
    benchmark:
        "results/{dataset}/benchmarks/compare.tsv"
    shell:
        "{LEUKOFED} compare --params {PARAMS_FILE} --results results/{wildcards.dataset} --out {output.statistics}"


rule audit:
    input:
        rules.preprocess.output,
        split=rules.split.output.split,
    output:
        shortcut="results/{dataset}/audit/shortcut.json",
    params:
        audit=config["analysis"]["audit"],
    benchmark:
        "results/{dataset}/benchmarks/audit.tsv"
    shell:
        "{LEUKOFED} audit --params {PARAMS_FILE} --cache data/{wildcards.dataset}/cache --split {input.split} "
        "--out {output.shortcut}"
