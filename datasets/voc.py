"""PASCAL VOC 2012 + SBD augmentation layout (SPEC §7): ``data.root`` = ``.../VOCdevkit/VOC2012``."""

from __future__ import annotations

from pathlib import Path

from datasets.base import Layout, read_id_list, scan_ids
from datasets.classes import VOC_CLASSES

AUG_MASK_DIR = "SegmentationClassAug"


def derive_voc_ids(layout: Layout, root: Path, split: str) -> list[str] | None:
    """``train_aug`` = the SegmentationClassAug ids minus the val ids (SPEC §7); other splits need a list file.

    The aug masks cover train_aug and val together (12,031 = 10,582 + 1,449), so removing val leaves train_aug.
    """
    if split != "train_aug":
        return None
    aug_dir = root / AUG_MASK_DIR
    if not aug_dir.is_dir():
        raise FileNotFoundError(
            f"cannot derive split 'train_aug': {aug_dir} not found; expected the voc layout {layout.description}"
        )
    val_list = layout.list_path(root, "val")
    if not val_list.is_file():
        raise FileNotFoundError(f"cannot derive split 'train_aug' (aug ids minus val ids): {val_list} not found")
    val_ids = set(read_id_list(val_list))
    return sorted(scan_ids(aug_dir, ".png") - val_ids)


VOC_LAYOUT = Layout(
    name="voc",
    description=(
        "VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png, SegmentationClassAug/<id>.png, "
        "Annotations/<id>.xml, ImageSets/Segmentation/<split>.txt}"
    ),
    image_dir="JPEGImages",
    # Official masks first: for ids in both folders they are the reference annotation.
    mask_dirs=("SegmentationClass", AUG_MASK_DIR),
    list_file="ImageSets/Segmentation/{split}.txt",
    class_names=VOC_CLASSES,
    annotation_dir="Annotations",
    derive_ids=derive_voc_ids,
    expected_counts={"train_aug": 10582, "train": 1464, "val": 1449, "test": 1456},
)
