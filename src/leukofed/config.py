"""Load and validate ``params.yaml``: the only module that reads it.

Every tunable of the pipeline lives in ``params.yaml``; this module turns it into typed, validated
objects. Unknown keys, wrong types and out-of-range values are refused with a message that names the
key (``train.epochs``) and says what is expected.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from leukofed.errors import ConfigError

DATASET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
JitterStrength = Annotated[float, Field(ge=0.0, lt=1.0)]


class _Section(BaseModel):
    """Base of every params section: unknown keys and silent type coercion are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SyntheticParams(_Section):
    """The procedural blood-smear generator (the offline default dataset)."""

    images_per_class: PositiveInt
    image_size: Annotated[int, Field(ge=32, le=1024)]
    n_sites: PositiveInt  # colour/illumination "hospitals" the images are drawn from
    seed: int


class DatasetSpec(_Section):
    """Where one dataset comes from."""

    source: Literal["synthetic", "folder", "zip", "url"]
    path: str | None = None  # folder or .zip (source folder/zip)
    url: str | None = None  # HTTP(S) archive (source url)
    sha256: str | None = None  # required with url
    synthetic: SyntheticParams | None = None  # required with synthetic

    @model_validator(mode="after")
    def _source_fields(self) -> DatasetSpec:
        needed = {"synthetic": ["synthetic"], "folder": ["path"], "zip": ["path"], "url": ["url", "sha256"]}
        missing = [key for key in needed[self.source] if getattr(self, key) is None]
        if missing:
            raise ValueError(f"source '{self.source}' needs {', '.join(missing)}")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return self


class NearDuplicateParams(_Section):
    """Perceptual-hash grouping of near-duplicate photos of one cell."""

    hash_size: Annotated[int, Field(ge=4, le=16)]  # pHash side: hash_size**2 bits
    max_distance: Annotated[int, Field(ge=0)]  # Hamming distance at or below which two images join


class DataParams(_Section):
    """Classes, folder layout, validation and preprocessing."""

    classes: Annotated[list[str], Field(min_length=2)]
    class_folders: dict[str, str]  # folder name under Original/ -> class
    image_extensions: Annotated[list[str], Field(min_length=1)]
    image_size: Annotated[int, Field(ge=16, le=1024)]
    on_invalid: Literal["fail", "skip"]
    max_image_pixels: PositiveInt  # larger images are refused (decompression bombs)
    near_duplicate: NearDuplicateParams

    @model_validator(mode="after")
    def _folders_map_to_classes(self) -> DataParams:
        unknown = sorted(set(self.class_folders.values()) - set(self.classes))
        if unknown:
            raise ValueError(f"class_folders maps to {unknown}, which are not in classes {self.classes}")
        unmapped = sorted(set(self.classes) - set(self.class_folders.values()))
        if unmapped:
            raise ValueError(f"classes {unmapped} have no folder in class_folders")
        return self


class DownloadParams(_Section):
    """Fetching a dataset archive from a URL."""

    chunk_bytes: PositiveInt
    timeout_s: Annotated[float, Field(gt=0)]
    retries: Annotated[int, Field(ge=0)]


class SplitParams(_Section):
    """Group-aware stratified train/validation/test split."""

    train: Fraction
    val: Fraction
    test: Fraction
    seed: int

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitParams:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1 (they sum to {total:g})")
        return self


class ModelParams(_Section):
    """The lightweight attention CNN."""

    width: Annotated[int, Field(ge=4, le=256)]  # channels of the first block; later blocks double it
    attention: Literal["cbam", "se", "none"]
    attention_reduction: Annotated[int, Field(ge=1)]
    spatial_kernel: Annotated[int, Field(ge=1, le=15)]
    norm: Literal["batch", "group"]  # group: no batch statistics (needed for DP-SGD)
    group_norm_groups: PositiveInt
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)]

    @field_validator("spatial_kernel")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("spatial_kernel must be odd so the attention map keeps the image size")
        return value


class AugmentParams(_Section):
    """Augmentation that suits smear images (no orientation, mild stain variation)."""

    hflip: bool
    vflip: bool
    rot90: bool
    brightness: JitterStrength
    contrast: JitterStrength
    saturation: JitterStrength


class TrainParams(_Section):
    """Local training: the same settings drive the centralized baseline and every site."""

    seed: int
    epochs: PositiveInt
    batch_size: PositiveInt
    eval_batch_size: PositiveInt
    lr: Annotated[float, Field(gt=0)]
    weight_decay: Annotated[float, Field(ge=0)]
    lr_schedule: Literal["cosine", "constant"]
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)]
    augment: AugmentParams


class RuntimeParams(_Section):
    """Execution settings that do not change results."""

    threads: PositiveInt  # torch intra-op threads per training job
    progress: bool  # tqdm progress bar per epoch


class TrackingParams(_Section):
    """MLflow tracking."""

    tracking_uri: str
    experiment: str
    registered_model_prefix: str  # models are registered as <prefix>-<dataset>-<run kind>
    model_alias: str


class ReportParams(_Section):
    """What the report shows next to the measured numbers."""

    paper_accuracy: dict[str, float]  # published reference numbers, by model name


SHARE_TOLERANCE = 1e-6  # how far a class's site shares may sum from 1 (YAML decimals are inexact)
# Folder names under results/<dataset>/ that a federation run may not take.
RESERVED_RUN_NAMES = frozenset({"centralized", "partitions", "benchmarks", "comparison", "audit", "privacy"})


class PartitionParams(_Section):
    """Non-IID partition of the pooled train+val images into simulated hospitals (sites)."""

    sites: Annotated[list[Annotated[int, Field(ge=2)]], Field(min_length=1)]  # site counts to partition
    scheme: Literal["proportions", "dirichlet"]
    # site count -> class -> the share of that class's images each site receives (sums to 1)
    proportions: dict[str, dict[str, list[Annotated[float, Field(ge=0.0, le=1.0)]]]]
    dirichlet_alpha: Annotated[float, Field(gt=0)]  # scheme dirichlet: smaller = more label skew
    quantity_skew: Annotated[float, Field(ge=0)]  # sigma of log-normal site-size factors; 0 = off
    site_val_fraction: Fraction  # share of each site's images held back as its local validation part
    seed: int

    @model_validator(mode="after")
    def _proportion_tables(self) -> PartitionParams:
        if len(set(self.sites)) != len(self.sites):
            raise ValueError(f"sites {self.sites} lists a site count twice")
        for key, table in self.proportions.items():
            if not key.isdigit():
                raise ValueError(f"proportions: key '{key}' must be a site count in quotes, e.g. \"3\"")
            for label, shares in table.items():
                where = f"proportions.\"{key}\".{label}"
                if len(shares) != int(key):
                    raise ValueError(f"{where} has {len(shares)} shares; give one per site ({key})")
                if abs(sum(shares) - 1.0) > SHARE_TOLERANCE:
                    raise ValueError(f"{where} sums to {sum(shares):g}; a class's shares over the sites must sum to 1")
        if self.scheme == "proportions":
            missing = [n for n in self.sites if str(n) not in self.proportions]
            if missing:
                raise ValueError(f"scheme 'proportions' needs a table proportions.\"{missing[0]}\" for every entry of sites")
        return self


class FedProxParams(_Section):
    """FedProx (Li et al., 2020): each site adds mu/2 * ||w - w_global||^2 to its loss."""

    mu: Annotated[float, Field(gt=0)]


class FedAvgMParams(_Section):
    """FedAvgM (Hsu et al., 2019): server SGD with momentum on the pseudo-gradient global - average."""

    server_lr: Annotated[float, Field(gt=0)]
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)]


class FedAdamParams(_Section):
    """FedAdam (Reddi et al., 2021): server Adam on the pseudo-gradient, without bias correction."""

    server_lr: Annotated[float, Field(gt=0)]
    beta1: Annotated[float, Field(ge=0.0, lt=1.0)]
    beta2: Annotated[float, Field(ge=0.0, lt=1.0)]
    tau: Annotated[float, Field(gt=0)]  # adaptivity: added to sqrt(v), bounds the step of rarely moved weights


class FederationRun(_Section):
    """One federated model: results/<dataset>/<run name>/."""

    sites: Annotated[int, Field(ge=2)]  # which partition (partition.sites) it trains on
    strategy: Literal["fedavg", "fedprox", "fedavgm", "fedadam"]
    rounds: PositiveInt


class SecureAggregationParams(_Section):
    """SecAgg+ in the Flower deployment (Flower's SecAggPlusWorkflow + secaggplus_mod): the coordinator sees only the sum."""

    enabled: bool  # true: the coordinator receives masked updates and only their weighted sum is revealed
    num_shares: Annotated[int, Field(ge=2)]  # each site's secret is split among this many sites (itself included)
    reconstruction_threshold: Annotated[int, Field(ge=2)]  # shares needed to unmask; also the fewest sites a round needs
    clipping_range: Annotated[float, Field(gt=0)]  # every exchanged entry is clipped to [-c, c] before quantization
    quantization_range: Annotated[int, Field(ge=2, le=2**24)]  # integer levels over [-c, c]: error per entry <= 2c/levels
    max_weight: Annotated[float, Field(gt=0)]  # the largest site training-set size the protocol expects (weights n/max)

    @model_validator(mode="after")
    def _threshold_fits(self) -> SecureAggregationParams:
        if self.reconstruction_threshold > self.num_shares:
            raise ValueError(f"reconstruction_threshold={self.reconstruction_threshold} exceeds num_shares={self.num_shares}: "
                             "no secret could be reconstructed; lower it")
        return self


class FlowerParams(_Section):
    """The Flower deployment (one SuperLink, one SuperNode per hospital): timeouts, certificates, secure aggregation."""

    round_timeout_s: Annotated[float, Field(gt=0)]  # a site without a reply by then counts as "no reply"
    connect_timeout_s: Annotated[float, Field(gt=0)]  # how long the ServerApp waits for every site's SuperNode
    startup_timeout_s: Annotated[float, Field(gt=0)]  # `federation local`: wait for the SuperLink to listen
    shutdown_grace_s: Annotated[float, Field(gt=0)]  # `federation local`: SIGTERM, then SIGKILL after this long
    cert_validity_days: PositiveInt  # lifetime of the certificates `leukofed federation certs` writes
    secure_aggregation: SecureAggregationParams


class FederationParams(_Section):
    """In-process federated training: rounds of local training at the sites and server aggregation."""

    runs: dict[str, FederationRun]
    local_epochs: PositiveInt  # epochs each selected site trains per round
    fraction_fit: Annotated[float, Field(gt=0.0, le=1.0)]  # share of sites picked per round (rounded up)
    min_sites: PositiveInt  # fewer valid updates than this in a round: the run stops (resumable from its checkpoint)
    batchnorm: Literal["global", "local"]  # local = FedBN: BatchNorm weights and statistics stay at the sites
    seed: int  # site selection and each site's per-round training seed
    fedprox: FedProxParams
    fedavgm: FedAvgMParams
    fedadam: FedAdamParams
    flower: FlowerParams

    @model_validator(mode="after")
    def _runs_are_possible(self) -> FederationParams:
        for name, run in self.runs.items():
            if not DATASET_NAME.match(name) or name in RESERVED_RUN_NAMES:
                raise ValueError(
                    f"runs.{name}: a run name must match {DATASET_NAME.pattern} and not be one of "
                    f"{sorted(RESERVED_RUN_NAMES)} (it names a results folder)"
                )
            selected = math.ceil(self.fraction_fit * run.sites)
            if self.min_sites > selected:
                raise ValueError(
                    f"min_sites={self.min_sites} exceeds the {selected} site(s) run '{name}' picks per round "
                    f"(ceil(fraction_fit * sites)); lower min_sites or raise fraction_fit"
                )
        return self


CAM_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "eigencam", "scorecam")  # pytorch-grad-cam methods
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


class BootstrapParams(_Section):
    """Percentile bootstrap confidence intervals of the test metrics."""

    n_resamples: PositiveInt
    confidence: Fraction  # e.g. 0.95 for 95% intervals
    seed: int


class CamParams(_Section):
    """Class-activation maps (pytorch-grad-cam) of the test images, and their randomisation check."""

    methods: Annotated[list[Literal[CAM_METHODS]], Field(min_length=1)]
    panels_per_class: PositiveInt  # most confident correct test images shown per class
    max_error_panels: Annotated[int, Field(ge=0)]  # misclassified test images shown, most confident first
    randomisation_seed: int  # initialises the re-initialised model of the randomisation check

    @field_validator("methods")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"methods {value} lists a method twice")
        return value


class AuditParams(_Section):
    """Shortcut audit: what a linear model reaches from trivial image cues."""

    border_width: PositiveInt  # px of the cached image's border band whose colour statistics are features
    corner: Literal[CORNERS]  # where the scale bar is
    corner_size: PositiveInt  # px side of the corner patch (of the cached image)
    corner_grid: PositiveInt  # the patch is block-averaged to corner_grid x corner_grid pixels
    max_iter: PositiveInt  # iterations of the logistic regression solver

    @model_validator(mode="after")
    def _grid_divides_patch(self) -> AuditParams:
        if self.corner_size % self.corner_grid:
            raise ValueError(f"corner_grid={self.corner_grid} must divide corner_size={self.corner_size} (block averaging)")
        return self


class AnalysisParams(_Section):
    """Calibration, statistics, Grad-CAM and the shortcut audit of the trained models."""

    ece_bins: Annotated[int, Field(ge=2)]  # equal-width confidence bins (ECE, MCE, reliability, histograms)
    temperature_bounds: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=2, max_length=2)]
    bootstrap: BootstrapParams
    cam: CamParams
    audit: AuditParams

    @field_validator("temperature_bounds")
    @classmethod
    def _increasing(cls, value: list[float]) -> list[float]:
        if not value[0] < 1.0 < value[1]:
            raise ValueError(f"temperature_bounds {value} must be [low, high] with low < 1 < high (1 = no scaling)")
        return value


class DPParams(_Section):
    """DP-SGD at every site (Opacus): per-sample clipping, Gaussian noise, Poisson sampling, RDP accounting."""

    enabled: bool  # DP-SGD in the federate runs (needs model.norm: group)
    noise_multiplier: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None  # sigma: noise std / max_grad_norm; null: from target_epsilon
    target_epsilon: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None  # per-site epsilon after all planned rounds (noise_multiplier null)
    epsilon_budget: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None  # a site refuses a round that would pass it; null: no cap
    max_grad_norm: Annotated[float, Field(gt=0)]  # per-sample gradient clipping norm C
    delta: Annotated[float, Field(gt=0.0, lt=1.0)] | Literal["auto"]  # auto: auto_delta_fraction / images of all sites
    auto_delta_fraction: Fraction
    noise_seed: int | None  # null: noise seeded from OS entropy (secret); an int reproduces runs but reveals the noise

    @model_validator(mode="after")
    def _one_noise_source(self) -> DPParams:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("set exactly one of noise_multiplier and target_epsilon (the other null)")
        if None not in (self.target_epsilon, self.epsilon_budget) and self.target_epsilon > self.epsilon_budget:
            raise ValueError(
                f"target_epsilon={self.target_epsilon:g} exceeds epsilon_budget={self.epsilon_budget:g}: "
                "training would stop before its planned rounds; lower target_epsilon or raise the budget"
            )
        return self


class PrivacySweepParams(_Section):
    """Privacy-utility stage: one federation run retrained at several target epsilons."""

    run: str  # a name in federation.runs: its sites and strategy
    epsilons: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1)]  # .inf: GroupNorm model without noise
    rounds: PositiveInt  # replace the run's rounds (the sweep trains len(epsilons) models)
    local_epochs: PositiveInt  # replace federation.local_epochs

    @field_validator("epsilons")
    @classmethod
    def _distinct_levels(cls, value: list[float]) -> list[float]:
        if len(set(value)) != len(value):
            raise ValueError(f"epsilons {value} lists a level twice")
        return value


class AttackParams(_Section):
    """Membership-inference audit: training images (members) against test images (non-members)."""

    fprs: Annotated[list[Fraction], Field(min_length=1)]  # report the attack's TPR at these false-positive rates
    reference_fraction: Fraction  # share of the non-members that calibrates the per-class attack (not scored)
    max_members: PositiveInt | None  # members queried: a seeded sample of the training images; null: all
    seed: int  # the member sample and the reference / scored split of the non-members


class PrivacyParams(_Section):
    """Differential privacy and the membership-inference audit."""

    dp: DPParams
    sweep: PrivacySweepParams
    attack: AttackParams


class Params(_Section):
    """All of ``params.yaml``."""

    dataset: str
    datasets: dict[str, DatasetSpec]
    data: DataParams
    download: DownloadParams
    split: SplitParams
    model: ModelParams
    train: TrainParams
    runtime: RuntimeParams
    tracking: TrackingParams
    report: ReportParams
    partition: PartitionParams
    federation: FederationParams
    analysis: AnalysisParams
    privacy: PrivacyParams

    @model_validator(mode="after")
    def _dataset_is_defined(self) -> Params:
        for name in self.datasets:
            if not DATASET_NAME.match(name):
                raise ValueError(f"dataset name '{name}' must match {DATASET_NAME.pattern} (it names folders)")
        if self.dataset not in self.datasets:
            raise ValueError(f"dataset '{self.dataset}' is not defined under datasets ({sorted(self.datasets)})")
        return self

    @model_validator(mode="after")
    def _federation_matches_partition(self) -> Params:
        for key, table in self.partition.proportions.items():
            if sorted(table) != sorted(self.data.classes):
                raise ValueError(
                    f"partition.proportions.\"{key}\" lists classes {sorted(table)}; give one row per class "
                    f"of data.classes {self.data.classes}"
                )
        for name, run in self.federation.runs.items():
            if run.sites not in self.partition.sites:
                raise ValueError(
                    f"federation.runs.{name}.sites={run.sites} is not partitioned; add it to partition.sites "
                    f"{self.partition.sites}"
                )
        return self

    @model_validator(mode="after")
    def _privacy_is_possible(self) -> Params:
        if self.privacy.dp.enabled and self.model.norm == "batch":
            raise ValueError(
                "privacy.dp.enabled needs model.norm: group (BatchNorm mixes the samples of a batch, "
                "so per-sample gradients and DP-SGD are undefined); set model.norm: group"
            )
        if self.privacy.sweep.run not in self.federation.runs:
            raise ValueError(
                f"privacy.sweep.run '{self.privacy.sweep.run}' is not in federation.runs ({sorted(self.federation.runs)})"
            )
        return self

    def dataset_spec(self, name: str | None = None) -> DatasetSpec:
        """The spec of dataset ``name`` (default: the selected ``dataset``)."""
        name = name or self.dataset
        if name not in self.datasets:
            raise ConfigError(
                f"params: dataset '{name}' is not defined under 'datasets' (defined: {sorted(self.datasets)}); "
                "add an entry or pick one of those"
            )
        return self.datasets[name]


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid parameters:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  - {key}: unknown key; remove it or check its spelling")
        elif item["type"] == "missing":
            lines.append(f"  - {key}: missing; add it (see the repository's params.yaml for the default)")
        else:
            got = item.get("input")
            shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
            lines.append(f"  - {key}: {item['msg']}{shown}")
    return "\n".join(lines)


def parse_params(raw: dict, source: str = "params") -> Params:
    """Validate an already-loaded params mapping; raise ConfigError naming each bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found; run from the repository root or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_params(raw, source=str(path))
