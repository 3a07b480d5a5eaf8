# leukofed pipeline: acquire -> preprocess -> split -> train (centralized) | partition -> federate -> evaluate -> report;
# partition -> privacy (DP sweep + membership audit) -> report.
# Rules are thin: inputs, outputs, params from config, and one `leukofed <stage>` call each.
# Run:  snakemake --cores 8                         (the dataset selected in params.yaml)
#       snakemake --cores 8 --config dataset=all-aria2021

configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/centralized.smk"
include: "workflow/rules/federated.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/privacy.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        final_targets(config["dataset"]),
    default_target: True
