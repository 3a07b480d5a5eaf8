# Centralized baseline and evaluation of any trained model on the held-out test split.


rule train_centralized:
    input:
        rules.preprocess.output,
        split=rules.split.output.split,
    output:
        model="results/{dataset}/centralized/model.pt",
        history="results/{dataset}/centralized/history.csv",
        record="results/{dataset}/centralized/training.json",
    params:
        model=config["model"],
        train=config["train"],
    threads: config["runtime"]["threads"]
    resources:
        mlflow=1,  # one MLflow writer at a time (SQLite locks under parallel writers)
    benchmark:
        "results/{dataset}/benchmarks/train_centralized.tsv"
    shell:
        "{LEUKOFED} train --params {PARAMS_FILE} --dataset {wildcards.dataset} --cache data/{wildcards.dataset}/cache "
        "--split {input.split} --out-dir results/{wildcards.dataset}/centralized"


rule evaluate:
    input:
        rules.preprocess.output,
        model="results/{dataset}/{model}/model.pt",
        split=rules.split.output.split,
    output:
        metrics="results/{dataset}/{model}/eval/metrics.json",
        confusion="results/{dataset}/{model}/eval/confusion_matrix.json",
        figure=report(
            "results/{dataset}/{model}/eval/confusion_matrix.png",
            caption="../report/confusion.rst", category="Comparison", subcategory="{model}",
        ),
        predictions="results/{dataset}/{model}/eval/predictions.csv",
    params:
        eval_batch_size=config["train"]["eval_batch_size"],
    threads: config["runtime"]["threads"]
    benchmark:
        "results/{dataset}/benchmarks/evaluate_{model}.tsv"
    shell:
        "{LEUKOFED} evaluate --params {PARAMS_FILE} --model {input.model} --cache data/{wildcards.dataset}/cache "
        "--split {input.split} --out-dir results/{wildcards.dataset}/{wildcards.model}/eval"
