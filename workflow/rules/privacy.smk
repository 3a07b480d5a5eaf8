# Privacy-utility sweep: the federation run privacy.sweep.run retrained at every privacy.sweep.epsilons
# (DP-SGD at each site; .inf: no DP), each model tested and attacked by membership inference.

SWEEP_RUN = config["federation"]["runs"][config["privacy"]["sweep"]["run"]]


rule privacy:
    input:
        rules.preprocess.output,
        split=rules.split.output.split,
        partition=lambda wildcards: f"results/{wildcards.dataset}/partitions/sites-{SWEEP_RUN['sites']}/partition.csv",
    output:
        record="results/{dataset}/privacy/privacy.json",
        table="results/{dataset}/privacy/privacy.csv",
        figure=report("results/{dataset}/privacy/privacy_utility.png", caption="../report/privacy.rst", category="Privacy"),
        roc=report("results/{dataset}/privacy/membership_roc.png", caption="../report/membership_roc.rst", category="Privacy"),
    params:
        privacy=config["privacy"],
        run=SWEEP_RUN,
        federation={key: value for key, value in config["federation"].items() if key != "runs"},
        model=config["model"],
        train=config["train"],
    threads: config["runtime"]["threads"]
    resources:
        mlflow=1,  # one MLflow writer at a time (SQLite locks under parallel writers)
    benchmark:
        "results/{dataset}/benchmarks/privacy.tsv"
    shell:
        "{LEUKOFED} privacy --params {PARAMS_FILE} --dataset {wildcards.dataset} --cache data/{wildcards.dataset}/cache "
        "--split {input.split} --partition {input.partition} --out-dir results/{wildcards.dataset}/privacy"
