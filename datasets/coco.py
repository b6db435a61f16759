"""MS-COCO 2014 layout (SPEC §7): ``data.root`` = ``.../MSCOCO`` with VOC-style PNG masks 0..80 (255 = ignore).

Masks, split lists and image labels are generated from the official instances JSON by ``python -m tools.prepare_coco``.
Images are found in either of two layouts, detected per split folder (:func:`find_image_folder`): SPEC §7's
``MSCOCO/coco2014/{train2014,val2014}/`` or, as unpacked from cocodataset.org, ``MSCOCO/{train2014,val2014}/``.
Image labels are read from ``ImageSets/labels_{train2014,val2014}.json`` (``val_part`` reads val2014's), not from
the masks: a class present only as a crowd region (255 in the mask) or only as an instance too small to rasterise is
still in the label (SPEC §7).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets.base import Layout, scan_ids
from datasets.classes import COCO_CLASSES

# Where the images of a split folder ({folder} = train2014 / val2014) may be, relative to the root, in the order tried:
# SPEC §7's layout, then the folders directly under the root as the cocodataset.org zips unpack.
IMAGE_DIRS = ("coco2014/{folder}", "{folder}")
IMAGE_LAYOUTS = "MSCOCO/coco2014/{train2014,val2014}/<id>.jpg (SPEC §7) or MSCOCO/{train2014,val2014}/<id>.jpg"
# Image labels per COCO split folder ({folder} = train2014 / val2014), written by tools/prepare_coco.py.
LABEL_FILE = "ImageSets/labels_{folder}.json"
# The fixed in-training validation subset of val2014 (SPEC §7): VAL_PART_SIZE ids drawn with VAL_PART_SEED.
VAL_PART_SIZE = 5000
VAL_PART_SEED = 0


def val_part_ids(ids: Sequence[str], size: int = VAL_PART_SIZE, seed: int = VAL_PART_SEED) -> list[str]:
    """The fixed validation subset: ``size`` ids drawn with ``seed`` from the sorted ``ids``, returned sorted
    (all of them when there are no more than ``size``)."""
    ordered = sorted(ids)
    if len(ordered) <= size:
        return ordered
    picks = np.random.default_rng(seed).choice(len(ordered), size=size, replace=False)
    return sorted(ordered[int(i)] for i in picks)


def find_image_folder(root: Path, folder: str) -> Path:
    """The image folder of split folder ``folder`` (``train2014`` / ``val2014``): the first of :data:`IMAGE_DIRS`
    under ``root`` that exists (both layouts present: SPEC §7's ``coco2014/`` wins).

    Raises:
        FileNotFoundError: neither exists; the message names both paths and the two layouts.
    """
    candidates = [root / template.format(folder=folder) for template in IMAGE_DIRS]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"COCO image folder for {folder} not found: neither {candidates[0]} nor {candidates[1]} exists; expected the "
        f"images in {IMAGE_LAYOUTS}"
    )


@dataclass(frozen=True)
class COCOLayout(Layout):
    """The COCO layout, whose image folders are found in either of two layouts (:func:`find_image_folder`)."""

    def image_folder(self, root: Path, split: str) -> Path:
        """The split's image folder; raises FileNotFoundError naming both layouts when neither exists."""
        return find_image_folder(root, self._fill("{folder}", split))


def derive_coco_ids(layout: Layout, root: Path, split: str) -> list[str] | None:
    """train / val = the images of the split folder that have a mask; val_part = :func:`val_part_ids` of val.

    Only images with at least one annotation get a mask from tools/prepare_coco.py (82,081 of 82,783 train
    images); the others have no image label, so they cannot be trained on and are left out, as in its lists.
    """
    if split not in layout.split_folders:
        return None
    mask_dir = layout.mask_folders(root, split)[0]
    if not mask_dir.is_dir():
        raise FileNotFoundError(
            f"cannot derive split {split!r}: mask folder {mask_dir} not found; run `python -m tools.prepare_coco "
            f"{root}` to build the masks and lists (expected layout {layout.description})"
        )
    ids = sorted(scan_ids(layout.image_folder(root, split), layout.image_ext) & scan_ids(mask_dir, ".png"))
    return val_part_ids(ids) if split == "val_part" else ids


COCO_LAYOUT = COCOLayout(
    name="coco",
    description=(
        "MSCOCO/{coco2014/{train2014,val2014}/<id>.jpg (or {train2014,val2014}/<id>.jpg), "
        "SegmentationClass/{train2014,val2014}/<id>.png, ImageSets/{<split>.txt, labels_{train2014,val2014}.json}}"
    ),
    image_dir=IMAGE_DIRS[0],  # the default; COCOLayout.image_folder also tries IMAGE_DIRS[1]
    mask_dirs=("SegmentationClass/{folder}",),
    list_file="ImageSets/{split}.txt",
    class_names=COCO_CLASSES,
    split_folders={"train": "train2014", "val": "val2014", "val_part": "val2014"},
    derive_ids=derive_coco_ids,
    expected_counts={"train": 82081, "val": 40137, "val_part": 5000},
    label_file=LABEL_FILE,
    label_hint=(
        "re-run `python -m tools.prepare_coco {root}` to write it (a tree prepared by an older version has none; the "
        "masks already written are kept). COCO image labels come from the instances JSON (SPEC §7), not from the "
        "masks, which lose crowd-only and tiny classes, so they are not re-derived from the masks"
    ),
)
