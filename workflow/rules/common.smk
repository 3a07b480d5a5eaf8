# Shared definitions: validated params, the stage command and the final targets of a dataset.
import sys
from pathlib import Path

import yaml

from leukofed.config import parse_params

# Validate once at parse time: a bad params.yaml fails before any job starts, naming the key.
PARAMS_FILE = workflow.configfiles[-1]
PARAMS = parse_params(config, source=PARAMS_FILE)
with open(PARAMS_FILE, encoding="utf-8") as handle:
    _FILE_PARAMS = yaml.safe_load(handle)
# The stages read PARAMS_FILE themselves, so an override they would not see is refused.
if {k: v for k, v in config.items() if k != "dataset"} != {k: v for k, v in _FILE_PARAMS.items() if k != "dataset"}:
    raise ValueError(
        f"--config may only choose `dataset`; put other changes in {PARAMS_FILE} (or a copy passed with --configfile)"
    )
# The interpreter running Snakemake is the project's environment: no PATH set-up needed.
LEUKOFED = f"{sys.executable} -m leukofed"
MODELS = ["centralized", *config["federation"]["runs"]]  # every model the evaluate rule tests

wildcard_constraints:
    dataset="[a-z0-9][a-z0-9_-]*",
    model="[a-z0-9][a-z0-9_-]*",


def dataset_spec(wildcards):
    return PARAMS.dataset_spec(wildcards.dataset)


def final_targets(dataset):
    """What `rule all` builds for one dataset: the report, everything it summarises, every partition, the analyses."""
    partitions = [f"results/{dataset}/partitions/sites-{n}/heterogeneity.json" for n in config["partition"]["sites"]]
    return [f"reports/{dataset}/summary.json", f"reports/{dataset}/README.md", *partitions, *analysis_targets(dataset)]


def analysis_targets(dataset):
    """Calibration and Grad-CAM of every model, the statistics between models and the shortcut audit."""
    per_model = [f"results/{dataset}/{model}/{kind}" for model in MODELS for kind in ("calibration/calibration.json", "cam/cam.json")]
    return [*per_model, f"results/{dataset}/comparison/statistics.json", f"results/{dataset}/audit/shortcut.json"]
