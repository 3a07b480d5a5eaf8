"""Procedural blood-smear images: the offline default dataset.

Each image is a pink/beige smear densely covered with red blood cells and one (sometimes two)
stained white cells near the centre. The white cell's nucleus -- its size relative to the cell,
outline irregularity, chromatin texture and nucleoli -- depends on the class; every image also draws a
"site" whose stain colours and illumination differ, as different hospitals' microscopes would, so
federated experiments see site heterogeneity.

Colours are composed with the Beer-Lambert law: each stained layer adds optical density, and the
transmitted light is ``background * exp(-density)``, so overlapping cells darken as in a real smear.
Everything is drawn with vectorised numpy; each image has its own random stream derived from the
seed, its class and its index, so the output is byte-identical for a given seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from leukofed.config import SyntheticParams
from leukofed.errors import DataError
from leukofed.io import atomic_dir

JPEG_QUALITY = 90

# Stain absorption per unit density (R, G, B) and the unstained slide.
RED_CELL_ABSORPTION = np.array([0.16, 0.30, 0.20])
CYTOPLASM_ABSORPTION = np.array([0.45, 0.32, 0.08])
NUCLEUS_ABSORPTION = np.array([0.85, 1.45, 0.36])
BACKGROUND_RGB = np.array([0.96, 0.91, 0.89])
BACKGROUND_MOTTLE = 0.03  # amplitude of the slide's low-frequency unevenness
BACKGROUND_MOTTLE_PX = 0.25  # its feature size, as a fraction of the image side

# Red blood cells: radius as a fraction of the image side; coverage is summed disc area / image area.
RED_CELL_RADIUS = 0.055
RED_CELL_RADIUS_SPREAD = 0.08
RED_CELL_RADIUS_LIMITS = (0.7, 1.3)  # clip of the relative radius
RED_CELL_COVERAGE = (0.7, 1.3)
RED_CELL_STRETCH = 0.12  # maximal elongation of a disc into an ellipse
RED_CELL_PALLOR = 0.6  # how much less stain the centre holds than the rim
RED_CELL_PALLOR_RADIUS = 0.5  # extent of the pale centre, as a fraction of the cell radius

# White cells.
WHITE_CELL_CENTRE_SPREAD = 0.06  # offset from the image centre, fraction of the image side
SECOND_WHITE_CELL_PROBABILITY = 0.2
SECOND_WHITE_CELL_DISTANCE = 2.3  # centre distance, in cell radii
CELL_OUTLINE_IRREGULARITY = 0.04
FIRST_HARMONIC, HARMONIC_COUNT = 2, 4  # an outline is bent by harmonics 2..5 of its angle
NUCLEUS_ECCENTRICITY = 0.6  # how far the nucleus may sit off-centre, fraction of the free room
MAX_NC_RATIO = 0.95  # keeps a sliver of cytoplasm however a blast's nucleus varies
MIN_CHROMATIN = 0.2  # lowest stain left between chromatin clumps, relative to the mean
CYTOPLASM_TEXTURE = 0.15
CYTOPLASM_TEXTURE_PX = 0.04  # fraction of the image side
NUCLEOLUS_RADIUS = 0.13  # fraction of the nucleus radius
NUCLEOLUS_PALLOR = 0.6
NUCLEOLUS_SPREAD = 0.5  # nucleoli lie within this fraction of the nucleus radius
WITHIN_CLASS_SPREAD = 0.12  # relative spread of every morphology parameter within a class
WITHIN_CLASS_LIMITS = (0.6, 1.4)  # clip of that multiplier

# Site (stain protocol, microscope) and per-image variation.
SITE_STAIN_SPREAD = 0.15
SITE_STAIN_LIMITS = (0.5, 1.5)  # clip of the stain multipliers
SITE_TINT_SPREAD = 0.03
SITE_EXPOSURE_SPREAD = 0.05
SITE_GRADIENT_MAX = 0.2
SITE_VIGNETTE_MAX = 0.25
IMAGE_GAIN_SPREAD = 0.03
IMAGE_NOISE_SIGMA = 0.015

SITE_STREAM, IMAGE_STREAM = 0, 1  # independent random streams derived from the seed


@dataclass(frozen=True)
class Morphology:
    """How the white cell of one class looks; sizes are fractions of the image or nucleus size."""

    cell_radius: float  # white-cell radius, fraction of the image side
    nc_ratio: float  # nucleus radius / cell radius
    irregularity: float  # amplitude of the harmonics that bend the nucleus outline
    chromatin_px: float  # chromatin clump size, fraction of the nucleus radius (fine < coarse)
    chromatin_contrast: float
    nucleoli: tuple[int, int]  # inclusive range of the number of pale nucleoli
    nucleus_density: float  # stain density of the nucleus (condensed chromatin is darker)
    cytoplasm_density: float  # stain density of the cytoplasm (blasts' is more basophilic)


# In class order Benign, Early, Pre, Pro: a mature-looking small, dark, round nucleus with a rim of
# pale cytoplasm, then blasts with large nuclei and scant, bluer cytoplasm: Early round with fine
# chromatin, Pre indented with coarse chromatin, Pro the largest, folded, with open chromatin and
# prominent nucleoli.
MORPHOLOGIES = (
    Morphology(0.10, 0.62, 0.03, 0.30, 0.10, (0, 0), 1.30, 0.70),
    Morphology(0.15, 0.85, 0.04, 0.10, 0.25, (0, 1), 0.85, 1.20),
    Morphology(0.16, 0.80, 0.15, 0.35, 0.50, (0, 1), 0.95, 1.35),
    Morphology(0.18, 0.88, 0.25, 0.15, 0.25, (2, 4), 0.70, 1.10),
)


@dataclass(frozen=True)
class SiteStyle:
    """The stain and illumination of one site."""

    stains: np.ndarray  # (3 layers, 3 channels) multipliers of the absorptions
    background: np.ndarray  # slide colour
    gradient_angle: float
    gradient: float
    vignette: float


def generate(params: SyntheticParams, folders: list[str], out_root: Path) -> None:
    """Write a synthetic blood-smear dataset into ``out_root/Original/<folder>/``.

    Parameters
    ----------
    params : SyntheticParams
        Images per class, image side, number of sites and seed.
    folders : list of str
        Class folders in class order; folder ``i`` gets the cell morphology of class ``i``
        (Benign, Early, Pre, Pro).
    out_root : Path
        Destination; ``out_root/Original`` is written atomically, replacing an existing one.

    Notes
    -----
    Files are named ``<folder>-site<k>-<i:04d>.jpg``. The output is byte-identical for a given seed.
    """
    if len(folders) > len(MORPHOLOGIES):
        raise DataError(
            f"synthetic data: the generator draws {len(MORPHOLOGIES)} cell types (Benign, Early, Pre, Pro) "
            f"but data.class_folders lists {len(folders)} folders; use at most {len(MORPHOLOGIES)} classes "
            "with source: synthetic"
        )
    styles = _site_styles(params)
    with atomic_dir(Path(out_root) / "Original") as original:
        for class_index, folder in enumerate(folders):
            (original / folder).mkdir()
            for index in range(params.images_per_class):
                rng = np.random.default_rng([_entropy(params.seed), IMAGE_STREAM, class_index, index])
                site = int(rng.integers(params.n_sites))
                pixels = _draw_image(rng, MORPHOLOGIES[class_index], styles[site], params.image_size)
                path = original / folder / f"{folder}-site{site}-{index:04d}.jpg"
                Image.fromarray(pixels).save(path, format="JPEG", quality=JPEG_QUALITY)


def _draw_image(rng: np.random.Generator, morphology: Morphology, style: SiteStyle, size: int) -> np.ndarray:
    """Draw one smear image.

    Parameters
    ----------
    rng : numpy.random.Generator
        The image's random stream.
    morphology : Morphology
        The white cells' class appearance (varied within the class by ``rng``).
    style : SiteStyle
        Stain and illumination of the site.
    size : int
        Side length in pixels.

    Returns
    -------
    numpy.ndarray
        ``(size, size, 3)`` uint8 RGB image.
    """
    red = _red_cell_density(rng, size)
    cell, cytoplasm, nucleus = _white_cell_layers(rng, morphology, size)
    layers = np.stack([red * (1.0 - cell), cytoplasm, nucleus], axis=-1)  # white cells push red cells aside
    absorption = style.stains * np.stack([RED_CELL_ABSORPTION, CYTOPLASM_ABSORPTION, NUCLEUS_ABSORPTION])
    optical_density = layers @ absorption
    light = _illumination(rng, style, size)[..., None] * style.background
    gain = rng.normal(1.0, IMAGE_GAIN_SPREAD, 3)
    rgb = light * np.exp(-optical_density) * gain + rng.normal(0.0, IMAGE_NOISE_SIGMA, optical_density.shape)
    return np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)


def _entropy(seed: int) -> int:
    """A non-negative seed for numpy (negative seeds map to distinct values, two's complement)."""
    return seed & (2**64 - 1)


def _site_styles(params: SyntheticParams) -> list[SiteStyle]:
    rng = np.random.default_rng([_entropy(params.seed), SITE_STREAM])
    return [_site_style(rng) for _ in range(params.n_sites)]


def _site_style(rng: np.random.Generator) -> SiteStyle:
    tinted = BACKGROUND_RGB + rng.normal(0.0, SITE_TINT_SPREAD, 3)
    return SiteStyle(
        stains=rng.normal(1.0, SITE_STAIN_SPREAD, (3, 3)).clip(*SITE_STAIN_LIMITS),
        background=tinted * rng.normal(1.0, SITE_EXPOSURE_SPREAD),
        gradient_angle=rng.uniform(0.0, 2 * np.pi),
        gradient=rng.uniform(0.0, SITE_GRADIENT_MAX),
        vignette=rng.uniform(0.0, SITE_VIGNETTE_MAX),
    )


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates, broadcastable: rows ``(size, 1)`` and columns ``(1, size)``."""
    axis = np.arange(size, dtype=np.float64)
    return axis[:, None], axis[None, :]


def _disc(distance: np.ndarray, radius: np.ndarray | float) -> np.ndarray:
    """1 inside, 0 outside, with a one-pixel anti-aliased edge."""
    return np.clip(radius - distance + 0.5, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, size: int, feature_px: float) -> np.ndarray:
    """Zero-mean, unit-variance noise with features of about ``feature_px`` pixels."""
    cells = max(2, int(round(size / max(feature_px, 1.0)))) + 1
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    noise = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float64)
    return (noise - noise.mean()) / (noise.std() + 1e-9)


def _illumination(rng: np.random.Generator, style: SiteStyle, size: int) -> np.ndarray:
    """The site's linear gradient and vignetting times the slide's faint mottle."""
    rows, cols = _grid(size)
    centred_y, centred_x = (rows - size / 2) / size, (cols - size / 2) / size
    ramp = np.cos(style.gradient_angle) * centred_x + np.sin(style.gradient_angle) * centred_y
    vignette = style.vignette * 2 * (centred_x**2 + centred_y**2)
    mottle = BACKGROUND_MOTTLE * _smooth_noise(rng, size, BACKGROUND_MOTTLE_PX * size)
    return (1.0 + style.gradient * ramp) * (1.0 - vignette) * (1.0 + mottle)


def _red_cell_density(rng: np.random.Generator, size: int) -> np.ndarray:
    """Stain density of many overlapping red cells: discs with a pale centre, drawn as one patch stack."""
    mean_radius = RED_CELL_RADIUS * size
    count = int(rng.uniform(*RED_CELL_COVERAGE) * size * size / (np.pi * mean_radius**2))
    centres = rng.uniform(-mean_radius, size + mean_radius, (count, 2))
    radii = mean_radius * rng.normal(1.0, RED_CELL_RADIUS_SPREAD, count).clip(*RED_CELL_RADIUS_LIMITS)
    stretch = 1.0 + rng.uniform(-RED_CELL_STRETCH, RED_CELL_STRETCH, count)
    angle = rng.uniform(0.0, np.pi, count)

    half = int(np.ceil(radii.max() * (1.0 + RED_CELL_STRETCH))) + 1
    offsets = np.arange(-half, half + 1)
    rows = np.floor(centres[:, 0]).astype(int)[:, None, None] + offsets[None, :, None]
    cols = np.floor(centres[:, 1]).astype(int)[:, None, None] + offsets[None, None, :]
    dy, dx = rows - centres[:, 0, None, None], cols - centres[:, 1, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    elongation, radius = stretch[:, None, None], radii[:, None, None]
    distance = np.hypot((dx * cos + dy * sin) * elongation, (dy * cos - dx * sin) / elongation)
    pale_centre = np.exp(-((distance / (RED_CELL_PALLOR_RADIUS * radius)) ** 2))
    profile = _disc(distance, radius) * (1.0 - RED_CELL_PALLOR * pale_centre)

    # Scatter-add every patch into a padded canvas (bincount sums overlaps), then crop the padding.
    pad = 2 * half
    width = size + 2 * pad
    flat = (rows + pad) * width + (cols + pad)
    flat, profile = np.broadcast_arrays(flat, profile)
    canvas = np.bincount(flat.ravel(), weights=profile.ravel(), minlength=width * width)
    return canvas.reshape(width, width)[pad:-pad, pad:-pad]


def _white_cell_layers(
    rng: np.random.Generator, morphology: Morphology, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell mask, cytoplasm density and nucleus density of one or two white cells near the centre."""
    centre = size / 2 + rng.normal(0.0, WHITE_CELL_CENTRE_SPREAD * size, 2)
    radius = morphology.cell_radius * size * _vary(rng)
    cells = [_white_cell(rng, morphology, size, centre, radius)]
    if rng.random() < SECOND_WHITE_CELL_PROBABILITY:
        neighbour = centre + SECOND_WHITE_CELL_DISTANCE * radius * _unit(rng.uniform(0.0, 2 * np.pi))
        cells.append(_white_cell(rng, morphology, size, neighbour, radius * _vary(rng)))
    cell, cytoplasm, nucleus = (np.max(np.stack(layer), axis=0) for layer in zip(*cells))
    return cell, cytoplasm, nucleus


def _white_cell(
    rng: np.random.Generator, morphology: Morphology, size: int, centre: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One white cell: a cytoplasm disc around an off-centre nucleus of class-specific shape and texture."""
    nucleus_radius = radius * min(morphology.nc_ratio * _vary(rng), MAX_NC_RATIO)
    offset = NUCLEUS_ECCENTRICITY * (radius - nucleus_radius) * rng.random()
    nucleus_centre = centre + offset * _unit(rng.uniform(0.0, 2 * np.pi))

    cell = _disc(*_polar_outline(rng, size, centre, radius, CELL_OUTLINE_IRREGULARITY))
    irregularity = morphology.irregularity * _vary(rng)
    inside = np.minimum(_disc(*_polar_outline(rng, size, nucleus_centre, nucleus_radius, irregularity)), cell)

    clump_px = morphology.chromatin_px * _vary(rng) * nucleus_radius
    chromatin = 1.0 + morphology.chromatin_contrast * _vary(rng) * _smooth_noise(rng, size, clump_px)
    pallor = _nucleoli(rng, morphology, size, nucleus_centre, nucleus_radius)
    nucleus = morphology.nucleus_density * _vary(rng) * chromatin.clip(MIN_CHROMATIN, None) * (1.0 - pallor)

    cytoplasm_texture = CYTOPLASM_TEXTURE * _smooth_noise(rng, size, CYTOPLASM_TEXTURE_PX * size)
    cytoplasm = (morphology.cytoplasm_density * _vary(rng) + cytoplasm_texture) * cell * (1.0 - inside)
    return cell, cytoplasm, inside * nucleus


def _unit(angle: float) -> np.ndarray:
    """The (row, column) unit vector at ``angle``."""
    return np.array([np.sin(angle), np.cos(angle)])


def _polar_outline(
    rng: np.random.Generator, size: int, centre: np.ndarray, radius: float, irregularity: float
) -> tuple[np.ndarray, np.ndarray]:
    """Distance of every pixel to ``centre`` and the outline's radius in its direction, bent by random harmonics."""
    rows, cols = _grid(size)
    dy, dx = rows - centre[0], cols - centre[1]
    distance = np.hypot(dy, dx)
    # sum_k a_k cos(k theta + phi_k) = Re(sum_k a_k e^{i phi_k} z^k) with z = e^{i theta}: powers are
    # cheaper than trigonometry on every pixel.
    direction = (dx + 1j * dy) / np.maximum(distance, 1e-9)
    orders = np.arange(FIRST_HARMONIC, FIRST_HARMONIC + HARMONIC_COUNT)
    amplitudes = irregularity * rng.standard_normal(HARMONIC_COUNT) / np.sqrt(orders)
    coefficients = amplitudes * np.exp(1j * rng.uniform(0.0, 2 * np.pi, HARMONIC_COUNT))
    bend = np.zeros_like(distance)
    power = direction ** (FIRST_HARMONIC - 1)
    for coefficient in coefficients:  # one complex product per harmonic
        power = power * direction
        bend += (coefficient * power).real
    return distance, radius * (1.0 + bend)


def _nucleoli(
    rng: np.random.Generator, morphology: Morphology, size: int, centre: np.ndarray, nucleus_radius: float
) -> np.ndarray:
    """Pallor (0..NUCLEOLUS_PALLOR) of the pale nucleolus spots inside the nucleus."""
    low, high = morphology.nucleoli
    count = int(rng.integers(low, high + 1))
    if count == 0:
        return np.zeros((size, size))
    rows, cols = _grid(size)
    angle = rng.uniform(0.0, 2 * np.pi, count)
    distance = NUCLEOLUS_SPREAD * nucleus_radius * np.sqrt(rng.random(count))
    spot_y = (centre[0] + distance * np.sin(angle))[:, None, None]
    spot_x = (centre[1] + distance * np.cos(angle))[:, None, None]
    spot_radius = NUCLEOLUS_RADIUS * nucleus_radius * _vary(rng)
    spots = np.exp(-((rows - spot_y) ** 2 + (cols - spot_x) ** 2) / spot_radius**2).sum(axis=0)
    return NUCLEOLUS_PALLOR * spots.clip(0.0, 1.0)


def _vary(rng: np.random.Generator) -> float:
    """A multiplier that varies a morphology parameter within its class."""
    return float(np.clip(rng.normal(1.0, WITHIN_CLASS_SPREAD), *WITHIN_CLASS_LIMITS))
