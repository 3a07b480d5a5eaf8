# Data: acquisition, validation + preprocessing (uint8 cache, duplicate groups), split.


def acquire_inputs(wildcards):
    """A local folder or archive is an input, so replacing it reruns acquisition.

    A missing one is left to the acquire stage, whose error says where to get the data.
    """
    spec = dataset_spec(wildcards)
    return [spec.path] if spec.source in ("folder", "zip") and Path(spec.path).exists() else []


rule acquire:
    input:
        acquire_inputs,
    output:
        manifest="data/{dataset}/manifest.csv",
        source="data/{dataset}/source.json",
    params:
        spec=lambda wildcards: dataset_spec(wildcards).model_dump(),
        class_folders=config["data"]["class_folders"],
        image_extensions=config["data"]["image_extensions"],
    benchmark:
        "results/{dataset}/benchmarks/acquire.tsv"
    shell:
        "{LEUKOFED} acquire --params {PARAMS_FILE} --dataset {wildcards.dataset} --workdir data/{wildcards.dataset}"


rule preprocess:
    input:
        rules.acquire.output,
    output:
        images="data/{dataset}/cache/images.npy",
        index="data/{dataset}/cache/index.csv",
        meta="data/{dataset}/cache/meta.json",
        # validation.json is written beside them but not declared: Snakemake deletes a failed
        # job's outputs, and that report is what a user reads when validation fails.
    params:
        data={key: config["data"][key] for key in ("classes", "image_size", "on_invalid", "max_image_pixels", "near_duplicate")},
    benchmark:
        "results/{dataset}/benchmarks/preprocess.tsv"
    shell:
        "{LEUKOFED} preprocess --params {PARAMS_FILE} --workdir data/{wildcards.dataset} --out-dir data/{wildcards.dataset}/cache"


rule split:
    input:
        rules.preprocess.output,
    output:
        split="results/{dataset}/split.csv",
        summary="results/{dataset}/split.json",
    params:
        split=config["split"],
    benchmark:
        "results/{dataset}/benchmarks/split.tsv"
    shell:
        "{LEUKOFED} split --params {PARAMS_FILE} --cache data/{wildcards.dataset}/cache --out {output.split}"
