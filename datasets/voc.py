"""PASCAL VOC 2012 + SBD augmentation layout (SPEC §7): ``data.root`` = ``.../VOCdevkit/VOC2012``.

A ``data.root`` one or two folder levels off (``VOCdevkit/`` or the download folder above it, or
``VOC2012/JPEGImages`` below) is the commonest set-up mistake; the reader then names the folder that was meant
(:func:`voc_root_hint`), and so does ``tools/prepare_voc.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from datasets.base import Layout, read_id_list, scan_ids
from datasets.classes import VOC_CLASSES

AUG_MASK_DIR = "SegmentationClassAug"
IMAGE_DIR = "JPEGImages"
# Folders looked into below a wrong root, per level: enough for VOCdevkit/ or a download folder, bounded for a root
# pointed at a large shared folder by mistake.
HINT_SCAN_LIMIT = 256


def _subfolders(folder: Path) -> list[Path]:
    """The sub-folders of ``folder``, sorted by name, at most HINT_SCAN_LIMIT; [] when it cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            found = sorted(Path(e.path) for e in entries if e.is_dir())
    except OSError:
        return []
    return found[:HINT_SCAN_LIMIT]


def voc_root_hint(root: str | os.PathLike) -> Path | None:
    """The VOC2012 folder that ``root`` was probably meant to be, or None (``root`` is right, or nothing is near).

    A VOC2012 folder is one holding ``JPEGImages/``. Looked for, in order: below ``root`` one then two levels
    (``VOCdevkit/`` -> ``VOCdevkit/VOC2012``; the download folder -> ``.../VOCdevkit/VOC2012``; a folder named
    ``VOC2012`` wins over ``VOC2007`` and others at the same depth), then above it one then two levels
    (``VOC2012/JPEGImages`` or ``VOC2012/ImageSets/Segmentation`` -> ``VOC2012``).
    """
    root = Path(root).expanduser()
    if not root.is_dir() or (root / IMAGE_DIR).is_dir():
        return None
    children = _subfolders(root)
    for level in (children, [g for c in children for g in _subfolders(c)]):
        found = [folder for folder in level if (folder / IMAGE_DIR).is_dir()]
        if found:
            return next((f for f in found if f.name == "VOC2012"), found[0])
    resolved = root.resolve()
    for above in (resolved.parent, resolved.parent.parent):
        if above != resolved and (above / IMAGE_DIR).is_dir():
            return above
    return None


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


@dataclass(frozen=True)
class VOCLayout(Layout):
    """The VOC layout; an image folder missing because ``data.root`` is a level off names the folder meant."""

    def image_folder(self, root: Path, split: str) -> Path:
        """``root/JPEGImages``.

        Raises:
            FileNotFoundError: it does not exist but :func:`voc_root_hint` finds the VOC2012 folder nearby; the
                message names ``data.root`` and the folder to use instead.
        """
        folder = super().image_folder(root, split)
        if not folder.is_dir():
            meant = voc_root_hint(root)
            if meant is not None:
                raise FileNotFoundError(
                    f"data.root = {root} has no {self.image_dir}/ folder: did you mean data.root={meant}? (data.root "
                    f"is the VOC2012 folder itself; expected the voc layout {self.description})"
                )
        return folder


VOC_LAYOUT = VOCLayout(
    name="voc",
    description=(
        "VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png, SegmentationClassAug/<id>.png, "
        "Annotations/<id>.xml, ImageSets/Segmentation/<split>.txt}"
    ),
    image_dir=IMAGE_DIR,
    # Official masks first: for ids in both folders they are the reference annotation.
    mask_dirs=("SegmentationClass", AUG_MASK_DIR),
    list_file="ImageSets/Segmentation/{split}.txt",
    class_names=VOC_CLASSES,
    annotation_dir="Annotations",
    derive_ids=derive_voc_ids,
    expected_counts={"train_aug": 10582, "train": 1464, "val": 1449, "test": 1456},
)
