"""Synthetic stand-ins for PASCAL VOC 2012 (+ SBD aug) and COCO 2014 with exact masks, for tests and the CPU demo.

In the base family every image shows 1–3 objects of the 20 VOC classes on a cluttered, low-saturation background.
A class is one family of shape + colour pair + texture (``CLASS_STYLES``), so it can be told apart from local
appearance alone: a tiny ViT trained from scratch on a CPU must be able to learn it in minutes. Later objects
occlude earlier ones and the masks record the visible parts; a 255 void band lines every object border, as in VOC.
Distractor strokes are drawn under the objects and are background in the masks.

Each image is drawn by its own generator seeded with ``(seed, index)``, so a seed gives byte-identical files
whatever the number of worker processes, and the VOC and COCO layouts of one seed hold the same pictures
(``tests/test_prepare_coco.py`` relies on this to check ``tools/prepare_coco.py`` against the VOC masks).

A *family* (``FAMILIES``) is the data that sets the look of a dataset: class style table, palette, object scale and
count, image sizes, clutter and JPEG quality; one renderer draws every family. ``base`` is the generator the demo and
the ablations were tuned on (its files are byte-identical to those written before families existed). ``heldout``
(``docs/heldout_family.md``) shows the same 20 classes with other shapes, textures and colours, smaller objects, more
clutter and other image sizes; it was fixed before any result on it existed and serves for reporting only. The image
streams of the families are independent: ``heldout`` with seed s shares no draws with ``base`` with seed s.
"""

from __future__ import annotations

import colorsys
import io
import json
import multiprocessing
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from datasets.classes import COCO_CATEGORIES, VOC_CLASSES, VOC_TO_COCO_NAME
from utils.errors import InputError
from utils.io import atomic_write_text, label_to_png_bytes

IGNORE = 255
# Every recorded object keeps at least this many labelled pixels outside the void band, so its class is really in
# the mask (and in the image labels derived from it), and at least this fraction of its unoccluded area.
MIN_VISIBLE_PIXELS = 48
MIN_VISIBLE_FRACTION = 0.4
# RADIUS_RANGE, MAX_OBJECTS, JPEG_QUALITY_RANGE, COLORS and CLASS_STYLES are the base family's (``BASE`` below).
# Object radius as a fraction of the short image side: diameters of 30–60 % (the brief asks for roughly 20–60 %),
# large enough for 8-pixel patches to see the texture, small enough for three objects to fit.
RADIUS_RANGE = (0.15, 0.30)
MAX_OBJECTS = 3
PLACEMENT_TRIES = 12
# The first object of an image always fits eventually (nothing occludes it); this only guards against a bug.
FIRST_OBJECT_TRIES = 200
JPEG_QUALITY_RANGE = (75, 95)
# VOC train is 1,464 of the 10,582 train_aug images (13.8 %).
TRAIN_SUBSET_FRACTION = 0.14
CROWD_PROB = 0.05
MIN_IMAGE_SIDE = 48

RGB = tuple[int, int, int]

# Saturated object colours (plus white / black, always paired with a saturated one); backgrounds stay muted.
COLORS: dict[str, RGB] = {
    "red": (215, 35, 35), "green": (35, 165, 55), "blue": (35, 70, 215), "yellow": (240, 215, 30),
    "orange": (245, 130, 20), "purple": (125, 45, 190), "magenta": (215, 45, 190), "cyan": (40, 200, 215),
    "pink": (250, 150, 185), "lime": (165, 235, 45), "navy": (25, 25, 105), "maroon": (120, 20, 35),
    "white": (245, 245, 240), "black": (20, 20, 20),
}  # fmt: skip


@dataclass(frozen=True)
class ClassStyle:
    """How one class looks: a shape family, two colours mixed by a texture, the texture period range in pixels."""

    shape: str
    colors: tuple[str, str]
    texture: str
    period: tuple[float, float] = (6.0, 10.0)


# One row per VOC class (index i + 1 in VOC_CLASSES). No two rows share shape, colour pair and texture; most differ in
# two of the three, so colour alone or shape alone is never the only cue.
CLASS_STYLES: dict[str, ClassStyle] = {
    "aeroplane": ClassStyle("triangle", ("white", "blue"), "stripes"),
    "bicycle": ClassStyle("ring", ("red", "black"), "concentric"),
    "bird": ClassStyle("crescent", ("yellow", "orange"), "dots"),
    "boat": ClassStyle("halfdisc", ("cyan", "white"), "waves"),
    "bottle": ClassStyle("capsule", ("green", "lime"), "gradient"),
    "bus": ClassStyle("rectangle", ("yellow", "black"), "checker"),
    "car": ClassStyle("hexagon", ("red", "white"), "diagonal"),
    "cat": ClassStyle("ellipse", ("orange", "black"), "stripes"),
    "chair": ClassStyle("cross", ("purple", "purple"), "solid"),
    "cow": ClassStyle("blob", ("white", "black"), "dots", period=(10.0, 14.0)),
    "diningtable": ClassStyle("diamond", ("maroon", "orange"), "checker"),
    "dog": ClassStyle("ellipse", ("pink", "maroon"), "waves"),
    "horse": ClassStyle("triangle", ("magenta", "yellow"), "stripes"),
    "motorbike": ClassStyle("ring", ("blue", "orange"), "diagonal"),
    "person": ClassStyle("capsule", ("pink", "navy"), "stripes"),
    "pottedplant": ClassStyle("star", ("green", "maroon"), "dots"),
    "sheep": ClassStyle("hexagon", ("white", "pink"), "dots"),
    "sofa": ClassStyle("rectangle", ("purple", "lime"), "stripes"),
    "train": ClassStyle("diamond", ("navy", "yellow"), "stripes"),
    "tvmonitor": ClassStyle("crescent", ("cyan", "magenta"), "checker"),
}

# --------------------------------------------------------------------------------------------------------------------
# Shapes: (u, v, phases [2]) -> bool mask. u, v are the object's rotated coordinates scaled so the shape spans
# [-1, 1]; phases vary star / blob outlines between instances.


def _shape_ellipse(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    return u * u + v * v <= 1.0


def _shape_rectangle(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.7)


def _shape_triangle(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    # Apex at v = -1, base at v = 0.8; the half-width grows linearly to 0.95 at the base.
    return (v <= 0.8) & (np.abs(u) <= (v + 1.0) * (0.95 / 1.8))


def _shape_ring(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    # The hole shows the background and is background in the mask (exercises masks with holes / RLE).
    rho2 = u * u + v * v
    return (rho2 <= 1.0) & (rho2 >= 0.5**2)


def _shape_crescent(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    return (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v > 0.75**2)


def _shape_halfdisc(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    return (u * u + v * v <= 1.0) & (v >= -0.15)


def _shape_capsule(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    # Points within 0.45 of the segment u = 0, |v| <= 0.55.
    along = np.maximum(np.abs(v) - 0.55, 0.0)
    return u * u + along * along <= 0.45**2


def _shape_hexagon(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    # Regular hexagon with vertices at u = ±1.
    half_height = np.sqrt(3.0) / 2.0
    return (np.abs(v) <= half_height) & (np.abs(v) <= np.sqrt(3.0) * (1.0 - np.abs(u)))


def _shape_cross(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    inside = (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    return inside & ((np.abs(u) <= 0.34) | (np.abs(v) <= 0.34))


def _shape_diamond(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    return np.abs(u) + np.abs(v) <= 1.0


def _shape_star(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    return rho <= 0.62 + 0.38 * np.cos(5.0 * phi + phases[0])


def _shape_blob(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    return rho <= 0.78 + 0.14 * np.sin(3.0 * phi + phases[0]) + 0.08 * np.sin(5.0 * phi + phases[1])


# The shapes below are the heldout family's (docs/heldout_family.md); none of them is a base shape.


def _shape_pentagon(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    # Regular pentagon of circumradius 1 with a vertex at v = -1: inside where the distance along the direction of
    # the nearest edge's normal stays within the apothem cos(pi / 5).
    sector = 2.0 * np.pi / 5.0
    local = np.mod(np.arctan2(v, u) + np.pi / 2.0, sector) - sector / 2.0
    return np.hypot(u, v) * np.cos(local) <= np.cos(sector / 2.0)


def _shape_trapezoid(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    # Half-width 0.5 at the top (v = -0.75) growing to 1.0 at the bottom (v = 0.75).
    return (np.abs(v) <= 0.75) & (np.abs(u) <= 0.5 + 0.5 * (v + 0.75) / 1.5)


def _shape_lshape(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    # A square with its upper-right quadrant (u > -0.15, v < 0.15) cut away: two arms 0.85 thick.
    inside = (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    return inside & ((u <= -0.15) | (v >= 0.15))


def _shape_tshape(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    # A bar 0.7 thick along the top and a stem 0.7 wide down the middle.
    inside = (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    return inside & ((v <= -0.3) | (np.abs(u) <= 0.35))


def _shape_arrow(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    # A shaft 0.6 thick from u = -1 and a triangular head from u = 0 to the tip at u = 1.
    shaft = (u >= -1.0) & (u <= 0.05) & (np.abs(v) <= 0.3)
    head = (u >= 0.0) & (u <= 1.0) & (np.abs(v) <= 0.95 * (1.0 - u))
    return shaft | head


def _shape_heart(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    # The heart curve (x^2 + y^2 - 1)^3 <= x^2 y^3, which spans x in [-1.14, 1.14], y in [-1, 1.24]; lobes at v < 0.
    x, y = 1.14 * u, 0.118 - 1.12 * v
    return (x * x + y * y - 1.0) ** 3 <= x * x * y**3


def _shape_squircle(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    # Superellipse of exponent 4: a square with rounded corners.
    return u**4 + v**4 <= 1.0


def _shape_sparkle(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    # Superellipse of exponent 0.75: four points joined by concave sides.
    return np.abs(u) ** 0.75 + np.abs(v) ** 0.75 <= 1.0


def _shape_lumpy(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    # An irregular blob with another frequency profile than base's blob (2 and 7 lobes instead of 3 and 5).
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    return rho <= 0.74 + 0.16 * np.sin(2.0 * phi + phases[0]) + 0.08 * np.sin(7.0 * phi + phases[1])


def _shape_chevron(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    # A band 0.8 thick bent into a V: v from -0.75 at the apex to 0.95 at the ends.
    bend = 0.9 * np.abs(u)
    return (np.abs(u) <= 1.0) & (v >= bend - 0.75) & (v <= bend + 0.05)


def _shape_pacman(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    # A disc with a 63-degree wedge cut out towards +u.
    return (u * u + v * v <= 1.0) & (np.abs(np.arctan2(v, u)) > 0.55)


def _shape_hourglass(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    # Half-width 0.2 at the waist (v = 0) growing to 0.9 at v = +-1.
    return (np.abs(v) <= 1.0) & (np.abs(u) <= 0.2 + 0.7 * np.abs(v))


def _shape_teardrop(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    # A disc of radius 0.7 centred at v = 0.3 and the cone from the tip (0, -1) tangent to it: the tangents leave
    # the tip at atan(0.7 / sqrt(1.3^2 - 0.7^2)) and touch the disc at v = -0.077.
    slope = 0.7 / np.sqrt(1.3**2 - 0.7**2)
    disc = u * u + (v - 0.3) ** 2 <= 0.7**2
    cone = (v >= -1.0) & (v <= -0.077) & (np.abs(u) <= slope * (v + 1.0))
    return disc | cone


def _shape_frame(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    # A square ring; like base's ring, its hole shows the background and is background in the mask.
    chebyshev = np.maximum(np.abs(u), np.abs(v))
    return (chebyshev <= 1.0) & (chebyshev >= 0.5)


def _shape_cloud(u: np.ndarray, v: np.ndarray, phases: np.ndarray) -> np.ndarray:
    # Three overlapping discs on a flat base.
    left = (u + 0.5) ** 2 + (v - 0.15) ** 2 <= 0.5**2
    right = (u - 0.5) ** 2 + (v - 0.15) ** 2 <= 0.5**2
    top = u * u + (v + 0.25) ** 2 <= 0.6**2
    base = (np.abs(u) <= 0.5) & (v >= 0.15) & (v <= 0.65)
    return left | right | top | base


SHAPES: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    "ellipse": _shape_ellipse, "rectangle": _shape_rectangle, "triangle": _shape_triangle, "ring": _shape_ring,
    "crescent": _shape_crescent, "halfdisc": _shape_halfdisc, "capsule": _shape_capsule, "hexagon": _shape_hexagon,
    "cross": _shape_cross, "diamond": _shape_diamond, "star": _shape_star, "blob": _shape_blob,
    "pentagon": _shape_pentagon, "trapezoid": _shape_trapezoid, "lshape": _shape_lshape, "tshape": _shape_tshape,
    "arrow": _shape_arrow, "heart": _shape_heart, "squircle": _shape_squircle, "sparkle": _shape_sparkle,
    "lumpy": _shape_lumpy, "chevron": _shape_chevron, "pacman": _shape_pacman, "hourglass": _shape_hourglass,
    "teardrop": _shape_teardrop, "frame": _shape_frame, "cloud": _shape_cloud,
}  # fmt: skip

# --------------------------------------------------------------------------------------------------------------------
# Textures: (lu, lv, period, offset [2], radius) -> mixing weight t in [0, 1] between the style's two colours.
# lu, lv are rotated pixel offsets from the object centre, so the pattern turns with the object.


def _tex_solid(lu: np.ndarray, lv: np.ndarray, period: float, offset: np.ndarray, radius: float) -> np.ndarray:
    return np.zeros_like(lu)


def _tex_stripes(lu: np.ndarray, lv: np.ndarray, period: float, offset: np.ndarray, radius: float) -> np.ndarray:
    return (np.mod(lv + offset[0], period) < period / 2).astype(np.float32)


def _tex_diagonal(lu: np.ndarray, lv: np.ndarray, period: float, offset: np.ndarray, radius: float) -> np.ndarray:
    return (np.mod((lu + lv) / np.sqrt(2.0) + offset[0], period) < period / 2).astype(np.float32)


def _tex_checker(lu: np.ndarray, lv: np.ndarray, period: float, offset: np.ndarray, radius: float) -> np.ndarray:
    cells = np.floor((lu + offset[0]) / period) + np.floor((lv + offset[1]) / period)
    return np.mod(cells, 2).astype(np.float32)


def _tex_dots(lu: np.ndarray, lv: np.ndarray, period: float, offset: np.ndarray, radius: float) -> np.ndarray:
    du = np.mod(lu + offset[0], period) - period / 2
    dv = np.mod(lv + offset[1], period) - period / 2
    return (du * du + dv * dv < (0.3 * period) ** 2).astype(np.float32)


def _tex_concentric(lu: np.ndarray, lv: np.ndarray, period: float, offset: np.ndarray, radius: float) -> np.ndarray:
    return (np.mod(np.hypot(lu, lv) + offset[0], period) < period / 2).astype(np.float32)


def _tex_waves(lu: np.ndarray, lv: np.ndarray, period: float, offset: np.ndarray, radius: float) -> np.ndarray:
    bent = lv + 0.3 * period * np.sin(2.0 * np.pi * lu / (1.7 * period)) + offset[0]
    return (np.mod(bent, period) < period / 2).astype(np.float32)


def _tex_gradient(lu: np.ndarray, lv: np.ndarray, period: float, offset: np.ndarray, radius: float) -> np.ndarray:
    # A smooth two-tone ramp along the object's long axis.
    return np.clip(0.5 + lv / (1.6 * radius), 0.0, 1.0).astype(np.float32)


# The textures below are the heldout family's; none of them is a base texture.


def _lattice_hash(iu: np.ndarray, iv: np.ndarray, salt: int) -> np.ndarray:
    """A fixed pseudo-random value in [0, 1) per integer lattice point ``(iu, iv)`` (float arrays of whole numbers):
    an integer hash in wrapping uint32 arithmetic, so textures stay pure functions of their arguments."""
    h = iu.astype(np.int64).astype(np.uint32) * np.uint32(0x9E3779B1)
    h ^= iv.astype(np.int64).astype(np.uint32) * np.uint32(0x85EBCA77)
    h ^= np.uint32(salt & 0xFFFFFFFF)
    h ^= h >> 15
    h *= np.uint32(0x2C1B3C6D)
    h ^= h >> 12
    h *= np.uint32(0x297A2D39)
    h ^= h >> 15
    return (h >> 8).astype(np.float32) / np.float32(1 << 24)


def _texture_salt(offset: np.ndarray) -> int:
    # Each instance draws its own offset, hence its own noise pattern.
    return int(offset[1] * 100003.0)


def _value_noise(lu: np.ndarray, lv: np.ndarray, cell: float, offset: np.ndarray) -> np.ndarray:
    """Smooth value noise in [0, 1] with features about ``cell`` pixels across (smoothstep-blended lattice hashes)."""
    x, y = (lu + offset[0]) / cell, (lv + offset[1]) / cell
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    sx, sy = fx * fx * (3.0 - 2.0 * fx), fy * fy * (3.0 - 2.0 * fy)
    salt = _texture_salt(offset)
    top = _lattice_hash(x0, y0, salt) * (1.0 - sx) + _lattice_hash(x0 + 1, y0, salt) * sx
    bottom = _lattice_hash(x0, y0 + 1, salt) * (1.0 - sx) + _lattice_hash(x0 + 1, y0 + 1, salt) * sx
    return top * (1.0 - sy) + bottom * sy


def _tex_hatch(lu: np.ndarray, lv: np.ndarray, period: float, offset: np.ndarray, radius: float) -> np.ndarray:
    # Thin lines in both diagonals (cross-hatching); the lines take a quarter of the period.
    first = np.mod((lu + lv) / np.sqrt(2.0) + offset[0], period) < 0.25 * period
    second = np.mod((lu - lv) / np.sqrt(2.0) + offset[1], period) < 0.25 * period
    return (first | second).astype(np.float32)


def _tex_spots(lu: np.ndarray, lv: np.ndarray, period: float, offset: np.ndarray, radius: float) -> np.ndarray:
    # Irregular spots about a period across: smooth noise cut at a threshold (about a quarter of the area).
    return (_value_noise(lu, lv, 0.9 * period, offset) > 0.62).astype(np.float32)


def _tex_zigzag(lu: np.ndarray, lv: np.ndarray, period: float, offset: np.ndarray, radius: float) -> np.ndarray:
    # Stripes bent by a triangle wave of slope +-1.2.
    tooth = np.abs(np.mod((lu + offset[0]) / period, 1.0) - 0.5) * period
    return (np.mod(lv + 1.2 * tooth + offset[1], period) < period / 2).astype(np.float32)


def _tex_sectors(lu: np.ndarray, lv: np.ndarray, period: float, offset: np.ndarray, radius: float) -> np.ndarray:
    # Eight alternating radial sectors around the object centre (a pinwheel), turned by the offset.
    sector = 2.0 * np.pi / 8.0
    phi = np.arctan2(lv, lu) + 2.0 * np.pi * offset[0] / period
    return np.mod(np.floor(phi / sector), 2).astype(np.float32)


def _tex_plaid(lu: np.ndarray, lv: np.ndarray, period: float, offset: np.ndarray, radius: float) -> np.ndarray:
    # Two crossing sets of bands of different spacing; the crossings take the second colour, single bands the mix.
    across = np.mod(lu + offset[0], period) < 0.4 * period
    along = np.mod(lv + offset[1], 1.5 * period) < 0.5 * period
    return 0.5 * (across.astype(np.float32) + along.astype(np.float32))


def _tex_speckle(lu: np.ndarray, lv: np.ndarray, period: float, offset: np.ndarray, radius: float) -> np.ndarray:
    # Fine grain: 30 % of the cells of a lattice a quarter period wide (at least 1.5 pixels) take the second colour.
    cell = max(1.5, period / 4.0)
    salt = _texture_salt(offset)
    return (_lattice_hash(np.floor((lu + offset[0]) / cell), np.floor(lv / cell), salt) > 0.7).astype(np.float32)


def _tex_bricks(lu: np.ndarray, lv: np.ndarray, period: float, offset: np.ndarray, radius: float) -> np.ndarray:
    # Mortar lines (second colour) around bricks two periods long, each row shifted by half a brick.
    height, length = 0.9 * period, 2.0 * period
    row = np.floor((lv + offset[1]) / height)
    along = lu + offset[0] + 0.5 * length * np.mod(row, 2)
    mortar = (np.mod(lv + offset[1], height) < 0.28 * height) | (np.mod(along, length) < 0.28 * height)
    return mortar.astype(np.float32)


def _tex_spiral(lu: np.ndarray, lv: np.ndarray, period: float, offset: np.ndarray, radius: float) -> np.ndarray:
    # An Archimedean spiral of pitch ``period`` (one turn moves the band out by a period, so the bands join up).
    turns = np.arctan2(lv, lu) / (2.0 * np.pi)
    return (np.mod(np.hypot(lu, lv) + period * turns + offset[0], period) < period / 2).astype(np.float32)


TEXTURES: dict[str, Callable[[np.ndarray, np.ndarray, float, np.ndarray, float], np.ndarray]] = {
    "solid": _tex_solid, "stripes": _tex_stripes, "diagonal": _tex_diagonal, "checker": _tex_checker,
    "dots": _tex_dots, "concentric": _tex_concentric, "waves": _tex_waves, "gradient": _tex_gradient,
    "hatch": _tex_hatch, "spots": _tex_spots, "zigzag": _tex_zigzag, "sectors": _tex_sectors, "plaid": _tex_plaid,
    "speckle": _tex_speckle, "bricks": _tex_bricks, "spiral": _tex_spiral,
}  # fmt: skip

# --------------------------------------------------------------------------------------------------------------------
# Backgrounds: (rng, h, w) -> mixing field t [H, W] in [0, 1] between two muted colours.


def _bg_noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    grid = rng.random((int(rng.integers(3, 9)), int(rng.integers(3, 9)))).astype(np.float32)
    return np.clip(cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)


def _bg_grain(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(5.0, 14.0)
    warp = 2.5 * _bg_noise(rng, h, w)
    return 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + warp)


def _bg_tiles(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    size = int(rng.integers(10, 24))
    rows, cols = h // size + 1, w // size + 1
    shades = rng.uniform(0.2, 0.8, (rows, cols)).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    field = shades[yy // size, xx // size]
    grout = (yy % size == 0) | (xx % size == 0)
    return np.where(grout, 1.0, field).astype(np.float32)


def _bg_gradient(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = xx / w * np.cos(angle) + yy / h * np.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    return np.clip(0.7 * ramp + 0.3 * _bg_noise(rng, h, w), 0.0, 1.0)


def _bg_blotches(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    # Camouflage: finer noise than _bg_noise cut into three flat levels.
    grid = rng.random((int(rng.integers(6, 15)), int(rng.integers(6, 15)))).astype(np.float32)
    field = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    return (np.digitize(field, [0.38, 0.62]) / 2.0).astype(np.float32)


def _bg_weave(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    # Two crossing sinusoids of their own periods, like a woven fabric.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    first, second = rng.uniform(6.0, 16.0, 2)
    along, across = xx * np.cos(angle) + yy * np.sin(angle), -xx * np.sin(angle) + yy * np.cos(angle)
    field = 0.5 + 0.25 * np.sin(2 * np.pi * along / first) + 0.25 * np.sin(2 * np.pi * across / second)
    return field.astype(np.float32)


BACKGROUNDS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "noise": _bg_noise, "grain": _bg_grain, "tiles": _bg_tiles, "gradient": _bg_gradient,
    "blotches": _bg_blotches, "weave": _bg_weave,
}  # fmt: skip

# --------------------------------------------------------------------------------------------------------------------
# Families: every generator parameter that differs between families. The renderer below is shared; a family is data.


@dataclass(frozen=True)
class Family:
    """The look of one synthetic family. Ranges are (low, high); integer count ranges include both ends."""

    name: str
    # Second key of each image's generator, ``[seed, stream, index]``: families of one seed draw independently.
    stream: int
    styles: Mapping[str, ClassStyle]  # one row per VOC class, in VOC order
    colors: Mapping[str, RGB]  # the palette the styles name
    color_jitter: float  # std of the per-object, per-channel colour jitter (0..255 units)
    radius_range: tuple[float, float]  # object radius as a fraction of the short image side
    log_radius: bool  # draw the radius log-uniformly (each factor of scale equally likely) instead of uniformly
    aspect_range: tuple[float, float]  # v-axis stretch of an object's shape
    max_objects: int  # objects per image: uniform in 1..max_objects (fewer when they do not fit)
    size_range: tuple[int, int]  # default (min_size, max_size) of the image sides
    jpeg_quality_range: tuple[int, int]
    backgrounds: tuple[str, ...]  # BACKGROUNDS kinds drawn from
    background_saturation: tuple[float, float]  # HSV saturation of the two background colours
    background_value: tuple[float, float]  # HSV value of the two background colours
    background_noise: float  # std of the background's pixel noise
    strokes: tuple[int, int]  # distractor strokes per image
    stroke_thickness: tuple[int, int]
    stroke_saturation: tuple[float, float]
    stroke_value: tuple[float, float]
    distractors: tuple[int, int]  # flat, untextured non-class shapes per image, under the objects (background)
    distractor_radius: tuple[float, float]  # as a fraction of the short image side
    image_noise: float  # std of the pixel noise added to the whole image


BASE = Family(
    name="base",
    stream=0,
    styles=CLASS_STYLES,
    colors=COLORS,
    color_jitter=10.0,
    radius_range=RADIUS_RANGE,
    log_radius=False,
    aspect_range=(0.75, 1.35),
    max_objects=MAX_OBJECTS,
    size_range=(96, 160),
    jpeg_quality_range=JPEG_QUALITY_RANGE,
    backgrounds=("noise", "grain", "tiles", "gradient"),
    background_saturation=(0.0, 0.25),
    background_value=(0.3, 0.75),
    background_noise=4.0,
    strokes=(3, 8),
    stroke_thickness=(1, 2),
    stroke_saturation=(0.0, 0.25),
    stroke_value=(0.15, 0.9),
    distractors=(0, 0),
    distractor_radius=(0.0, 0.0),
    image_noise=3.0,
)

# The heldout family (docs/heldout_family.md gives the reasons): pastel and earth tones instead of saturated
# primaries, on backgrounds more saturated than base's, so colour separates objects from the background less.
HELDOUT_COLORS: dict[str, RGB] = {
    "peach": (248, 196, 160), "mint": (170, 228, 190), "lavender": (196, 180, 232), "babyblue": (165, 200, 238),
    "butter": (244, 232, 150), "rose": (238, 170, 186), "aqua": (160, 222, 220), "sand": (212, 186, 140),
    "umber": (105, 72, 45), "ochre": (196, 140, 48), "olive": (118, 122, 52), "terracotta": (186, 92, 62),
    "slate": (80, 96, 112), "moss": (76, 106, 58), "rust": (158, 68, 38), "plum": (102, 58, 84),
}  # fmt: skip

# Smaller objects than base's, so texture periods are a little shorter too.
HELDOUT_PERIOD = (5.0, 9.0)

# One row per VOC class, no shape or texture of base's. Every colour pair is unique, and the classes that share a
# shape (arrow, frame, cloud, squircle, lumpy: two each) differ in both colours and texture.
HELDOUT_STYLES: dict[str, ClassStyle] = {
    "aeroplane": ClassStyle("arrow", ("babyblue", "slate"), "hatch", HELDOUT_PERIOD),
    "bicycle": ClassStyle("frame", ("sand", "rust"), "sectors", HELDOUT_PERIOD),
    "bird": ClassStyle("teardrop", ("butter", "ochre"), "spots", HELDOUT_PERIOD),
    "boat": ClassStyle("trapezoid", ("aqua", "umber"), "zigzag", HELDOUT_PERIOD),
    "bottle": ClassStyle("hourglass", ("mint", "moss"), "plaid", HELDOUT_PERIOD),
    "bus": ClassStyle("squircle", ("butter", "plum"), "bricks", HELDOUT_PERIOD),
    "car": ClassStyle("pentagon", ("rose", "slate"), "speckle", HELDOUT_PERIOD),
    "cat": ClassStyle("lumpy", ("peach", "umber"), "spiral", HELDOUT_PERIOD),
    "chair": ClassStyle("lshape", ("lavender", "olive"), "plaid", HELDOUT_PERIOD),
    "cow": ClassStyle("cloud", ("sand", "plum"), "spots", HELDOUT_PERIOD),
    "diningtable": ClassStyle("tshape", ("ochre", "slate"), "bricks", HELDOUT_PERIOD),
    "dog": ClassStyle("heart", ("rose", "umber"), "hatch", HELDOUT_PERIOD),
    "horse": ClassStyle("chevron", ("peach", "rust"), "zigzag", HELDOUT_PERIOD),
    "motorbike": ClassStyle("pacman", ("aqua", "plum"), "sectors", HELDOUT_PERIOD),
    "person": ClassStyle("sparkle", ("lavender", "moss"), "speckle", HELDOUT_PERIOD),
    "pottedplant": ClassStyle("lumpy", ("mint", "terracotta"), "spots", HELDOUT_PERIOD),
    "sheep": ClassStyle("cloud", ("babyblue", "rust"), "spiral", HELDOUT_PERIOD),
    "sofa": ClassStyle("squircle", ("peach", "moss"), "hatch", HELDOUT_PERIOD),
    "train": ClassStyle("arrow", ("butter", "terracotta"), "plaid", HELDOUT_PERIOD),
    "tvmonitor": ClassStyle("frame", ("lavender", "umber"), "bricks", HELDOUT_PERIOD),
}

HELDOUT = Family(
    name="heldout",
    stream=2,
    styles=HELDOUT_STYLES,
    colors=HELDOUT_COLORS,
    color_jitter=8.0,
    radius_range=(0.10, 0.35),
    log_radius=True,
    aspect_range=(0.6, 1.6),
    max_objects=4,
    size_range=(112, 192),
    jpeg_quality_range=(60, 90),
    backgrounds=("noise", "grain", "blotches", "weave"),
    background_saturation=(0.25, 0.6),
    background_value=(0.3, 0.8),
    background_noise=6.0,
    strokes=(6, 14),
    stroke_thickness=(1, 3),
    stroke_saturation=(0.2, 0.7),
    stroke_value=(0.3, 1.0),
    distractors=(0, 2),
    distractor_radius=(0.06, 0.18),
    image_noise=4.0,
)

FAMILIES: dict[str, Family] = {family.name: family for family in (BASE, HELDOUT)}


def get_family(family: str | Family) -> Family:
    """The ``Family`` named ``family`` (a ``Family`` passes through); InputError naming the choices otherwise."""
    if isinstance(family, Family):
        return family
    if family not in FAMILIES:
        raise InputError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    return FAMILIES[family]


def _muted_color(
    rng: np.random.Generator, value: tuple[float, float] = (0.3, 0.75), saturation: tuple[float, float] = (0.0, 0.25)
) -> np.ndarray:
    """A background RGB colour ``[3]`` float32 in 0..255 (low saturation by default, base's backgrounds)."""
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*saturation), rng.uniform(*value))
    return np.array(rgb, dtype=np.float32) * 255.0


def _background(rng: np.random.Generator, h: int, w: int, family: Family = BASE) -> np.ndarray:
    """A cluttered background ``[H, W, 3]`` uint8: a textured field of two background colours plus distractor
    strokes and (heldout) flat distractor shapes, all background in the masks."""
    kind = family.backgrounds[int(rng.integers(len(family.backgrounds)))]
    field = BACKGROUNDS[kind](rng, h, w)[..., None]
    first = _muted_color(rng, family.background_value, family.background_saturation)
    second = _muted_color(rng, family.background_value, family.background_saturation)
    noise = family.background_noise * rng.standard_normal((h, w, 3), dtype=np.float32)
    image = first * (1.0 - field) + second * field + noise
    image = np.ascontiguousarray(np.clip(image, 0, 255).astype(np.uint8))
    _draw_strokes(rng, image, family)
    if family.distractors[1] > 0:  # base draws none and consumes no random numbers here
        _draw_distractors(rng, image, family)
    return image


def _draw_strokes(rng: np.random.Generator, image: np.ndarray, family: Family = BASE) -> None:
    """Draw thin lines, arcs and zig-zags (base: 3–8, muted) on ``image`` [H, W, 3] uint8 in place."""
    h, w = image.shape[:2]
    for _ in range(int(rng.integers(family.strokes[0], family.strokes[1] + 1))):
        color = tuple(int(c) for c in _muted_color(rng, family.stroke_value, family.stroke_saturation))
        thickness = int(rng.integers(family.stroke_thickness[0], family.stroke_thickness[1] + 1))
        kind = int(rng.integers(3))
        if kind == 0:
            p0 = (int(rng.integers(w)), int(rng.integers(h)))
            p1 = (int(rng.integers(w)), int(rng.integers(h)))
            cv2.line(image, p0, p1, color, thickness, cv2.LINE_AA)
        elif kind == 1:
            center = (int(rng.integers(w)), int(rng.integers(h)))
            axes = (int(rng.integers(5, w // 2)), int(rng.integers(5, h // 2)))
            start = float(rng.uniform(0, 360))
            cv2.ellipse(image, center, axes, float(rng.uniform(0, 180)), start, start + float(rng.uniform(60, 200)),
                        color, thickness, cv2.LINE_AA)  # fmt: skip
        else:
            points = np.stack([rng.integers(0, w, 4), rng.integers(0, h, 4)], axis=1).astype(np.int32)
            cv2.polylines(image, [points], False, color, thickness, cv2.LINE_AA)


def _draw_distractors(rng: np.random.Generator, image: np.ndarray, family: Family) -> None:
    """Draw flat, one-colour ellipses, rectangles and triangles on ``image`` [H, W, 3] uint8 in place.

    They are not any class: every heldout class is textured and none of its shapes is an ellipse, a rectangle or a
    triangle. Drawn under the objects, they are background in the masks.
    """
    h, w = image.shape[:2]
    for _ in range(int(rng.integers(family.distractors[0], family.distractors[1] + 1))):
        color = tuple(int(c) for c in _muted_color(rng, family.stroke_value, family.stroke_saturation))
        radius = float(rng.uniform(*family.distractor_radius)) * min(h, w)
        ratio = float(rng.uniform(0.4, 1.0))
        cx, cy = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        angle = float(rng.uniform(0, 180))
        kind = int(rng.integers(3))
        if kind == 0:
            axes = (max(1, round(radius)), max(1, round(radius * ratio)))
            cv2.ellipse(image, (round(cx), round(cy)), axes, angle, 0, 360, color, -1, cv2.LINE_AA)
        else:
            if kind == 1:
                corners = cv2.boxPoints(((cx, cy), (2.0 * radius, 2.0 * radius * ratio), angle))
            else:
                turns = np.deg2rad(angle) + np.array([0.0, 2.0 * np.pi / 3.0, 4.0 * np.pi / 3.0])
                corners = np.stack([cx + radius * np.cos(turns), cy + radius * np.sin(turns)], axis=1)
            cv2.fillPoly(image, [np.round(corners).astype(np.int32)], color, cv2.LINE_AA)


# --------------------------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class ObjectDraw:
    """Everything random about one object, drawn up front so the generator's stream does not depend on the layout."""

    class_id: int
    style: ClassStyle  # the class's row of its family's table
    center: tuple[float, float]  # (y, x) in pixels
    radius: float
    aspect: float
    angle: float
    phases: np.ndarray  # [2] outline phases (star, blob)
    colors: np.ndarray  # [2, 3] float32 jittered colours
    period: float
    offset: np.ndarray  # [2] texture offset in pixels
    light: float  # shading direction in radians
    crowd_draw: float  # U[0, 1); the object is a COCO crowd region when below crowd_prob


@dataclass
class Scene:
    """One rendered image and its ground truth.

    image: [H, W, 3] uint8 RGB; instances: [H, W] uint8, 0 background, k = k-th object (drawing order, visible part);
    label: [H, W] uint8, VOC class ids with 255 on the void band; band: [H, W] bool; objects: the drawn objects.
    """

    image: np.ndarray
    instances: np.ndarray
    label: np.ndarray
    band: np.ndarray
    objects: list[ObjectDraw]
    jpeg_quality: int


def image_size(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    """Draw ``(h, w)`` with each side in [min_size, max_size] and h != w (VOC images are never square)."""
    h, w = (int(s) for s in rng.integers(min_size, max_size + 1, 2))
    while h == w:
        w = int(rng.integers(min_size, max_size + 1))
    return h, w


def _draw_object(rng: np.random.Generator, h: int, w: int, family: Family = BASE) -> ObjectDraw:
    class_id = int(rng.integers(1, len(VOC_CLASSES)))
    style = family.styles[VOC_CLASSES[class_id]]
    if family.log_radius:
        fraction = float(np.exp(rng.uniform(*np.log(family.radius_range))))
    else:
        fraction = float(rng.uniform(*family.radius_range))
    radius = fraction * min(h, w)
    aspect = float(rng.uniform(*family.aspect_range))
    # Centres keep at least half of the object's extent inside the image; truncation stays moderate.
    margin = 0.5 * radius * max(1.0, aspect)
    center = (float(rng.uniform(margin, h - margin)), float(rng.uniform(margin, w - margin)))
    jitter = rng.normal(0.0, family.color_jitter, (2, 3))
    colors = np.array([family.colors[name] for name in style.colors], dtype=np.float32) + jitter.astype(np.float32)
    period = float(rng.uniform(*style.period))
    return ObjectDraw(
        class_id=class_id,
        style=style,
        center=center,
        radius=radius,
        aspect=aspect,
        angle=float(rng.uniform(0, 2 * np.pi)),
        phases=rng.uniform(0, 2 * np.pi, 2),
        colors=colors,
        period=period,
        offset=rng.uniform(0, period, 2),
        light=float(rng.uniform(0, 2 * np.pi)),
        crowd_draw=float(rng.random()),
    )


def _local_coords(obj: ObjectDraw, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotated pixel offsets ``(lu, lv)`` from the object centre at pixel rows ``ys`` and columns ``xs``."""
    dy, dx = ys - obj.center[0], xs - obj.center[1]
    cos, sin = np.cos(obj.angle), np.sin(obj.angle)
    return dx * cos + dy * sin, -dx * sin + dy * cos


def object_mask(obj: ObjectDraw, h: int, w: int) -> np.ndarray:
    """The object's full (unoccluded) shape inside an ``h`` x ``w`` image: [H, W] bool."""
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    lu, lv = _local_coords(obj, ys, xs)
    shape = SHAPES[obj.style.shape]
    return shape(lu / obj.radius, lv / (obj.radius * obj.aspect), obj.phases)


def object_appearance(obj: ObjectDraw, where: np.ndarray) -> np.ndarray:
    """The object's texture and shading at the pixels of ``where`` [H, W] bool: [N, 3] float32 in 0..255."""
    ys, xs = np.nonzero(where)
    lu, lv = _local_coords(obj, ys.astype(np.float32), xs.astype(np.float32))
    texture = TEXTURES[obj.style.texture]
    t = texture(lu, lv, obj.period, obj.offset, obj.radius)[:, None]
    rgb = obj.colors[0] * (1.0 - t) + obj.colors[1] * t
    # A gentle directional light so objects are not perfectly flat.
    shade = 1.0 + 0.12 * np.clip((lu * np.cos(obj.light) + lv * np.sin(obj.light)) / obj.radius, -1.0, 1.0)
    return rgb * shade[:, None]


def instance_map(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Paint ``masks`` (each [H, W] bool) in order, later ones on top: [H, W] uint8 with 0 = none, k = masks[k - 1]."""
    instances = np.zeros(masks[0].shape, dtype=np.uint8)
    for k, mask in enumerate(masks, start=1):
        instances[mask] = k
    return instances


def void_band(instances: np.ndarray) -> np.ndarray:
    """VOC-style void band [H, W] bool: pixels whose 3x3 neighbourhood holds more than one instance id.

    The band is two pixels wide, one on each side of every border between two objects or an object and the
    background (VOC's ~5-pixel band on 500-pixel images is ~1 % of the side; at 100–160 pixels two pixels is
    about the same). The image edge is not a border: cv2's default border value leaves edge pixels alone.
    """
    kernel = np.ones((3, 3), dtype=np.uint8)
    return cv2.dilate(instances, kernel) != cv2.erode(instances, kernel)


def _placement_ok(masks: list[np.ndarray]) -> bool:
    """Whether every object keeps enough visible area (fraction of its own and pixels outside the void band)."""
    instances = instance_map(masks)
    band = void_band(instances)
    for k, mask in enumerate(masks, start=1):
        visible = instances == k
        full = int(mask.sum())
        if full == 0 or visible.sum() < MIN_VISIBLE_FRACTION * full:
            return False
        if np.count_nonzero(visible & ~band) < MIN_VISIBLE_PIXELS:
            return False
    return True


def render_scene(
    seed: int, index: int, min_size: int | None = None, max_size: int | None = None, family: str | Family = "base"
) -> Scene:
    """Draw image ``index`` of the dataset with ``seed`` in ``family``; a pure function of its arguments.

    ``min_size`` / ``max_size`` default to the family's ``size_range`` (base: 96, 160).

    Returns:
        The ``Scene`` (image [H, W, 3] uint8, instance / label maps [H, W], void band, objects in drawing order).
    """
    look = get_family(family)
    min_size = look.size_range[0] if min_size is None else min_size
    max_size = look.size_range[1] if max_size is None else max_size
    # Each image has its own stream, keyed by (seed, family stream, index): workers and layouts cannot change what is
    # drawn. Base's stream is 0, the key images had before families existed.
    rng = np.random.default_rng([seed, look.stream, index])
    h, w = image_size(rng, min_size, max_size)
    jpeg_quality = int(rng.integers(look.jpeg_quality_range[0], look.jpeg_quality_range[1] + 1))
    image = _background(rng, h, w, look).astype(np.float32)
    num_objects = int(rng.integers(1, look.max_objects + 1))
    objects: list[ObjectDraw] = []
    masks: list[np.ndarray] = []
    for slot in range(num_objects):
        tries = FIRST_OBJECT_TRIES if slot == 0 else PLACEMENT_TRIES
        for _ in range(tries):
            obj = _draw_object(rng, h, w, look)
            mask = object_mask(obj, h, w)
            if _placement_ok([*masks, mask]):
                objects.append(obj)
                masks.append(mask)
                break
    if not objects:
        raise RuntimeError(f"image {index} (seed {seed}, {look.name}): no object fits a {h}x{w} image; raise min_size")
    instances = instance_map(masks)
    for k, obj in enumerate(objects, start=1):
        visible = instances == k
        image[visible] = object_appearance(obj, visible)
    image = np.clip(image + look.image_noise * rng.standard_normal(image.shape, dtype=np.float32), 0, 255)
    image = image.astype(np.uint8)
    band = void_band(instances)
    class_ids = np.array([0] + [obj.class_id for obj in objects], dtype=np.uint8)
    label = class_ids[instances]
    label[band] = IGNORE
    return Scene(image=image, instances=instances, label=label, band=band, objects=objects, jpeg_quality=jpeg_quality)


# --------------------------------------------------------------------------------------------------------------------
# Encoders (run in the worker processes)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of an [H, W, 3] uint8 RGB image (deterministic for a given libjpeg)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _object_records(scene: Scene, crowd_prob: float) -> list[dict[str, Any]]:
    """Per-object summary: class, visible pixels outside the band, visible area, bbox, truncation, crowd flag."""
    h, w = scene.instances.shape
    records = []
    for k, obj in enumerate(scene.objects, start=1):
        visible = scene.instances == k
        ys, xs = np.nonzero(visible)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
        records.append({
            "class_id": obj.class_id,
            "class_name": VOC_CLASSES[obj.class_id],
            "pixels": int(np.count_nonzero(visible & ~scene.band)),
            "area": int(visible.sum()),
            "bbox": [x0, y0, x1, y1],  # visible part, 0-based, inclusive
            "truncated": bool(x0 == 0 or y0 == 0 or x1 == w - 1 or y1 == h - 1),
            "crowd": obj.crowd_draw < crowd_prob,
        })  # fmt: skip
    return records


def voc_xml(name: str, height: int, width: int, objects: Sequence[dict[str, Any]]) -> str:
    """A VOC ``Annotations/<name>.xml`` document; bndbox corners are 1-based and inclusive as in VOC."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2012"
    ET.SubElement(root, "filename").text = f"{name}.jpg"
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "MSFC synthetic"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "1"
    for record in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = record["class_name"]
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = str(int(record["truncated"]))
        ET.SubElement(node, "difficult").text = "0"
        box = ET.SubElement(node, "bndbox")
        x0, y0, x1, y1 = record["bbox"]
        for tag, value in (("xmin", x0), ("ymin", y0), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(box, tag).text = str(value + 1)
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="unicode") + "\n"


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE (the official form of crowd regions) of an [H, W] bool mask: column-major run lengths
    starting with a run of zeros."""
    h, w = mask.shape
    flat = mask.ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    return {"size": [h, w], "counts": counts}


def mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer contours of an [H, W] bool mask as COCO polygons (x, y through pixel centres); holes are lost."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    # A polygon needs three vertices; slivers of one or two pixels lie inside the void band anyway.
    return [contour.reshape(-1).astype(float).tolist() for contour in contours if len(contour) >= 3]


def coco_segmentation(mask: np.ndarray, band: np.ndarray, crowd: bool) -> dict[str, Any]:
    """COCO ``segmentation``, ``area`` and ``bbox`` of one instance's visible [H, W] bool mask.

    Crowd regions are uncompressed RLE, as in the official files. Other instances are polygons when their
    rasterisation (pycocotools) differs from the mask only inside the void ``band`` [H, W] bool, which the VOC
    comparison ignores; otherwise (holes, thin parts) compressed RLE, which is exact.
    """
    h, w = mask.shape
    if crowd:
        segmentation: Any = uncompressed_rle(mask)
        rle = mask_utils.frPyObjects(segmentation, h, w)
    else:
        polygons = mask_polygons(mask)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w)) if polygons else None
        if rle is not None and not np.any((mask_utils.decode(rle).astype(bool) != mask) & ~band):
            segmentation = polygons
        else:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            segmentation = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
    return {
        "segmentation": segmentation,
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": int(crowd),
    }


@dataclass(frozen=True)
class _Task:
    seed: int
    index: int
    min_size: int
    max_size: int
    crowd_prob: float
    layout: str
    family: str


def _render_record(task: _Task) -> dict[str, Any]:
    """Render one image and encode everything its layout needs (runs in a worker process)."""
    scene = render_scene(task.seed, task.index, task.min_size, task.max_size, task.family)
    h, w = scene.label.shape
    objects = _object_records(scene, task.crowd_prob)
    record: dict[str, Any] = {
        "meta": {"index": task.index, "height": h, "width": w, "objects": objects},
        "jpeg": encode_jpeg(scene.image, scene.jpeg_quality),
    }
    if task.layout == "voc":
        record["png"] = label_to_png_bytes(scene.label)
    else:
        record["coco"] = [
            {"category_id": _coco_category_id(obj["class_id"]), **coco_segmentation(scene.instances == k, scene.band,
                                                                                     obj["crowd"])}
            for k, obj in enumerate(objects, start=1)
        ]  # fmt: skip
    return record


def _init_worker() -> None:
    # One thread per process: the pool already uses the cores, and cv2's own threads only add contention.
    cv2.setNumThreads(1)


# --------------------------------------------------------------------------------------------------------------------
# Layouts

VOC_NAME_FORMAT = "synth_{index:06d}"
COCO_STEM_FORMAT = "COCO_{split}2014_{image_id:012d}"


def _coco_category_id(voc_class_id: int) -> int:
    name = VOC_CLASSES[voc_class_id]
    coco_name = VOC_TO_COCO_NAME.get(name, name)
    return next(cat_id for cat_id, cat_name in COCO_CATEGORIES if cat_name == coco_name)


def coco_image_id(index: int) -> int:
    """COCO image id of image ``index`` (ids start at 1, shared by train2014 and val2014 as in COCO)."""
    return index + 1


def _split_of(index: int, num_train: int, num_val: int) -> str:
    """train (train_aug / train2014), val, then test (VOC only): the split of image ``index``."""
    if index < num_train:
        return "train"
    return "val" if index < num_train + num_val else "test"


def _image_name(index: int, num_train: int, layout: str) -> str:
    if layout == "voc":
        return VOC_NAME_FORMAT.format(index=index)
    # the COCO layout has train and val only (no test images: _check_arguments)
    return COCO_STEM_FORMAT.format(split="train" if index < num_train else "val", image_id=coco_image_id(index))


def train_subset(num_train: int, seed: int) -> list[int]:
    """Indices (sorted) of the VOC ``train`` list: a seeded ~14 % subset of train_aug, at least one image."""
    count = max(1, round(TRAIN_SUBSET_FRACTION * num_train))
    rng = np.random.default_rng([seed, 1])
    return sorted(int(i) for i in rng.choice(num_train, size=count, replace=False))


def _write_file(path: Path, data: bytes | str) -> None:
    """Plain write of one per-image file. Not atomic+fsync like utils.io: a fresh folder is required, the split
    lists and synthetic.json are written last (atomically), and thousands of fsyncs would dominate the run time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    atomic_write_text(path, "".join(f"{line}\n" for line in lines))


def _write_voc(
    out: Path, records: Sequence[dict[str, Any]], num_train: int, num_val: int, seed: int
) -> dict[str, list[str]]:
    """Write the VOC 2012 + SBD-aug layout; returns the split lists (``test`` only when there are test images)."""
    names = [VOC_NAME_FORMAT.format(index=i) for i in range(len(records))]
    splits = {
        "train_aug": names[:num_train],
        "train": [names[i] for i in train_subset(num_train, seed)],
        "val": names[num_train : num_train + num_val],
    }
    test = set(names[num_train + num_val :])
    if test:
        splits["test"] = names[num_train + num_val :]
    # As in VOC, SegmentationClass holds the train and val masks only; SegmentationClassAug holds them all but the
    # test images, which (as in VOC's test set) have an image and nothing else.
    with_class_mask = set(splits["train"]) | set(splits["val"])
    for name, record in zip(names, records, strict=True):
        meta = record["meta"]
        _write_file(out / "JPEGImages" / f"{name}.jpg", record["jpeg"])
        if name in test:
            continue
        _write_file(out / "SegmentationClassAug" / f"{name}.png", record["png"])
        if name in with_class_mask:
            _write_file(out / "SegmentationClass" / f"{name}.png", record["png"])
        _write_file(out / "Annotations" / f"{name}.xml", voc_xml(name, meta["height"], meta["width"], meta["objects"]))
    for split, ids in splits.items():
        _write_lines(out / "ImageSets" / "Segmentation" / f"{split}.txt", ids)
    return splits


def _write_coco(out: Path, records: Sequence[dict[str, Any]], num_train: int) -> dict[str, list[str]]:
    """Write the COCO 2014 layout (images + official-structure instances JSON); returns the image stems per split."""
    categories = [{"id": cat_id, "name": name} for cat_id, name in COCO_CATEGORIES]
    documents: dict[str, dict[str, Any]] = {
        split: {
            "info": {"description": f"MSFC synthetic COCO-2014 look-alike, {split}2014", "version": "1.0"},
            "licenses": [],
            "images": [],
            "annotations": [],
            "categories": categories,
        }
        for split in ("train", "val")
    }
    stems: dict[str, list[str]] = {"train": [], "val": []}
    annotation_id = 1
    for index, record in enumerate(records):
        split = "train" if index < num_train else "val"  # no test images in this layout
        stem = _image_name(index, num_train, "coco")
        meta = record["meta"]
        _write_file(out / "coco2014" / f"{split}2014" / f"{stem}.jpg", record["jpeg"])
        image_id = coco_image_id(index)
        documents[split]["images"].append(
            {"id": image_id, "file_name": f"{stem}.jpg", "height": meta["height"], "width": meta["width"]}
        )
        for annotation in record["coco"]:
            documents[split]["annotations"].append({"id": annotation_id, "image_id": image_id, **annotation})
            annotation_id += 1
        stems[split].append(stem)
    for split, document in documents.items():
        text = json.dumps(document, separators=(",", ":"))
        atomic_write_text(out / "annotations" / f"instances_{split}2014.json", text)
    return stems


def _check_arguments(num_train: int, num_val: int, num_test: int, layout: str, min_size: int, max_size: int,
                     workers: int, crowd_prob: float) -> None:  # fmt: skip
    """InputError (a ValueError) naming the bad argument: make_synthetic prints it as one line. (An unknown family
    is named by ``get_family``, before the sizes it supplies are checked.)"""
    if num_train < 1:
        raise InputError(f"num_train must be >= 1, got {num_train}")
    if num_val < 0:
        raise InputError(f"num_val must be >= 0, got {num_val}")
    if num_test < 0:
        raise InputError(f"num_test must be >= 0, got {num_test}")
    if layout not in ("voc", "coco"):
        raise InputError(f"layout must be 'voc' or 'coco', got {layout!r}")
    if num_test and layout != "voc":
        raise InputError(f"num_test: only the voc layout has a test split (images without masks), got {num_test}")
    if min_size < MIN_IMAGE_SIDE:
        raise InputError(f"min_size must be >= {MIN_IMAGE_SIDE} pixels (objects must fit), got {min_size}")
    if max_size <= min_size:
        raise InputError(f"max_size must be > min_size so images can be non-square, got {min_size}..{max_size}")
    if workers < 0:
        raise InputError(f"workers must be >= 0, got {workers}")
    if not 0.0 <= crowd_prob <= 1.0:
        raise InputError(f"crowd_prob must lie in [0, 1], got {crowd_prob}")


def _render_all(tasks: list[_Task], workers: int) -> list[dict[str, Any]]:
    """Render every task, in index order; the result does not depend on ``workers``."""
    progress = {"total": len(tasks), "desc": "synthetic images", "leave": False, "disable": None}
    if workers <= 1:
        return [_render_record(task) for task in tqdm(tasks, **progress)]
    # fork where available: a spawned worker would re-import the `datasets` package and with it torch (seconds per
    # worker). Workers use only numpy / cv2 / PIL on data they receive, and run cv2 single-threaded.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    chunksize = max(1, len(tasks) // (workers * 8))
    with context.Pool(workers, initializer=_init_worker) as pool:
        return list(tqdm(pool.imap(_render_record, tasks, chunksize=chunksize), **progress))


def generate(
    out_dir: str | Path,
    num_train: int = 400,
    num_val: int = 100,
    seed: int = 0,
    layout: str = "voc",
    min_size: int | None = None,
    max_size: int | None = None,
    workers: int = 0,
    crowd_prob: float = CROWD_PROB,
    num_test: int = 0,
    family: str = "base",
) -> dict[str, Any]:
    """Write a synthetic dataset in the PASCAL VOC 2012 (+ SBD aug) or the COCO 2014 layout.

    VOC (``out_dir`` plays VOCdevkit/VOC2012): ``JPEGImages/<id>.jpg``, ``SegmentationClassAug/<id>.png`` (all ids),
    ``SegmentationClass/<id>.png`` (train + val ids), ``Annotations/<id>.xml``,
    ``ImageSets/Segmentation/{train_aug,train,val}.txt``, and with ``num_test`` > 0 ``test.txt``, whose images have a
    JPEG only (no mask, no XML), as VOC's test set. COCO (``out_dir`` plays MSCOCO):
    ``coco2014/{train2014,val2014}/COCO_<split>2014_<id:012d>.jpg`` and ``annotations/instances_<split>2014.json``
    (masks come from ``tools/prepare_coco.py``). Both write ``synthetic.json``, the returned summary.

    Args:
        out_dir: output folder; must be empty or absent.
        num_train: images in train_aug / train2014 (indices 0..num_train-1).
        num_val: images in val / val2014 (the following indices).
        seed: dataset seed; image ``i`` is drawn from ``(seed, i)`` only.
        layout: ``"voc"`` or ``"coco"``; the same seed shows the same pictures in both.
        min_size, max_size: range of each image side in pixels (images are never square); by default the
            family's ``size_range`` (base 96..160, heldout 112..192).
        workers: processes for rendering (0 or 1 = in this process); the output does not depend on it.
        crowd_prob: chance that an object is a crowd region (``iscrowd=1``) in the COCO layout; the pictures do not
            depend on it (the draw is made either way); ignored by the VOC layout, which has no crowd regions.
        num_test: VOC only: images of the ``test`` split (the indices after val); 0 (default) writes no test split
            and leaves every image, mask and list as without it.
        family: ``"base"`` (the default; the files are those written before families existed) or ``"heldout"``
            (``docs/heldout_family.md``: for reporting only, never for tuning).

    Returns:
        Summary: layout, family, seed, counts, per-class object counts, split lists and, per image, its index, name,
        split, size and objects (class id / name, ``pixels`` outside the void band, visible ``area``, ``bbox``
        [x0, y0, x1, y1] 0-based inclusive, ``truncated``, ``crowd``).
    """
    look = get_family(family)
    min_size = look.size_range[0] if min_size is None else min_size
    max_size = look.size_range[1] if max_size is None else max_size
    _check_arguments(num_train, num_val, num_test, layout, min_size, max_size, workers, crowd_prob)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output folder {out} is not empty; synthetic data is only written to a fresh folder")
    out.mkdir(parents=True, exist_ok=True)
    total = num_train + num_val + num_test
    # VOC has no crowd regions: there every object is labelled normally.
    crowd_prob = crowd_prob if layout == "coco" else 0.0
    tasks = [_Task(seed, index, min_size, max_size, crowd_prob, layout, look.name) for index in range(total)]
    records = _render_all(tasks, workers)
    if layout == "voc":
        splits = _write_voc(out, records, num_train, num_val, seed)
    else:
        splits = _write_coco(out, records, num_train)
    images = []
    class_counts = dict.fromkeys(VOC_CLASSES[1:], 0)
    for index, record in enumerate(records):
        for obj in record["meta"]["objects"]:
            class_counts[obj["class_name"]] += 1
        name = _image_name(index, num_train, layout)
        images.append({"name": name, "split": _split_of(index, num_train, num_val), **record["meta"]})
    summary = {
        "layout": layout,
        "family": look.name,
        "seed": seed,
        "num_train": num_train,
        "num_val": num_val,
        "num_test": num_test,
        "min_size": min_size,
        "max_size": max_size,
        "crowd_prob": crowd_prob,
        "num_images": total,
        "num_objects": sum(class_counts.values()),
        "class_counts": class_counts,
        "splits": splits,
        "images": images,
    }
    atomic_write_text(out / "synthetic.json", json.dumps(summary, indent=1) + "\n")
    return summary
