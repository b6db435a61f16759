"""Check a PASCAL VOC 2012 (+ SBD aug) tree and report exactly what is missing (SPEC §7).

Usage: ``python -m tools.prepare_voc ROOT [--deep]`` with ROOT = ``.../VOCdevkit/VOC2012``; a ROOT a level or two
off (``VOCdevkit/``, ``VOC2012/JPEGImages``) is answered with "did you mean .../VOC2012?".

Checks the required folders and split lists, ids listed twice, ids listed without an image or mask, a derived
``train_aug`` (aug masks minus val) when no list exists, train_aug/val overlap, and the counts per split against the
official 10,582 / 1,464 / 1,449 (/ 1,456 test). ``--deep`` also decodes every image of every split found and every
mask of the splits with masks, in full (a truncated JPEG opens but fails to decode, at the same sample on every
resume), and checks mask values and sizes; each broken file is reported by name. Exits 1 when something is wrong,
0 with a summary when the tree is usable. Nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from datasets.base import mask_classes, read_id_list, scan_ids
from datasets.voc import AUG_MASK_DIR, VOC_LAYOUT, derive_voc_ids, voc_root_hint
from utils.io import probe_image
from utils.text import preview

# Folders every use needs (images, lists, official masks) and the aug masks that the default train_aug split needs.
REQUIRED_DIRS = (VOC_LAYOUT.image_dir, "ImageSets/Segmentation", *VOC_LAYOUT.mask_dirs)
REQUIRED_LISTS = ("train", "val")
OPTIONAL_LISTS = ("train_aug", "test")
SPLITS_WITH_MASKS = ("train_aug", "train", "val")


@dataclass
class Report:
    """Findings of a check: errors make the tree unusable, notes are informational."""

    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def _split_ids(root: Path, split: str, report: Report) -> list[str] | None:
    """Ids of ``split`` from its list file, or derived (train_aug only); None when unavailable."""
    path = VOC_LAYOUT.list_path(root, split)
    if path.is_file():
        try:
            ids = read_id_list(path)
        except ValueError as err:  # an id listed twice
            report.errors.append(str(err))
            return None
        if not ids:
            report.errors.append(f"split list {path} is empty")
        return ids
    if split in REQUIRED_LISTS:
        report.errors.append(f"missing split list {path}")
    elif split == "train_aug":
        try:
            ids = derive_voc_ids(VOC_LAYOUT, root, split)
        except (FileNotFoundError, ValueError) as err:
            report.errors.append(str(err))
            return None
        report.notes.append(f"no {path.name}: train_aug derived as {AUG_MASK_DIR} ids minus val ids ({len(ids)})")
        return ids
    else:
        report.notes.append(f"no {path.name} (optional)")
    return None


def _deep_check(
    split_ids: dict[str, list[str]], images: dict[str, Path], masks: dict[str, Path], report: Report
) -> None:
    """Decode each image of ``split_ids`` and each mask of the splits with masks once, in full; masks also have
    values in 0..20 or 255 and their image's size. Errors name the file and the split(s) that use it."""
    uses: dict[str, list[str]] = {}
    for split, ids in split_ids.items():
        for i in ids:
            uses.setdefault(i, []).append(split)
    num_classes = len(VOC_LAYOUT.class_names)
    for i, splits in tqdm(uses.items(), desc="decoding images and masks", unit="image", mininterval=1.0):
        where = "/".join(splits)
        image_size = None
        if i in images:  # a missing image is reported by the quick check already
            try:
                _, image_size = probe_image(images[i], decode=True)
            except OSError as err:
                report.errors.append(f"{where}: {err}")
        mask_path = masks.get(i)
        if mask_path is None or not any(split in SPLITS_WITH_MASKS for split in splits):
            continue
        try:
            _, mask_size = probe_image(mask_path, decode=True)
            mask_classes(mask_path, num_classes)
        except (OSError, ValueError) as err:
            report.errors.append(f"{where}: {err}")
            continue
        if image_size is not None and mask_size != image_size:
            report.errors.append(
                f"{where}: mask {mask_path} is {mask_size[0]}x{mask_size[1]} (WxH) but its image {images[i]} is "
                f"{image_size[0]}x{image_size[1]}"
            )


def check_voc(root: str | Path, deep: bool = False) -> Report:
    """Check the VOC tree at ``root`` and return what is wrong (errors) and informational notes."""
    report = Report()
    root = Path(root).expanduser()
    if not root.is_dir():
        report.errors.append(f"root {root} does not exist; expected {VOC_LAYOUT.description}")
        return report
    meant = voc_root_hint(root)
    if meant is not None:  # one finding instead of every folder reported missing
        report.errors.append(
            f"{root} has no {VOC_LAYOUT.image_dir}/ folder: did you mean {meant}? (ROOT is the VOC2012 folder "
            f"itself; expected {VOC_LAYOUT.description})"
        )
        return report
    for sub in REQUIRED_DIRS:
        if not (root / sub).is_dir():
            report.errors.append(f"missing folder {root / sub} (expected layout {VOC_LAYOUT.description})")
    if VOC_LAYOUT.annotation_dir and not (root / VOC_LAYOUT.annotation_dir).is_dir():
        report.notes.append(f"no {VOC_LAYOUT.annotation_dir}/ (only needed for labels of images without masks)")

    image_dir = root / VOC_LAYOUT.image_dir
    images = {i: image_dir / f"{i}{VOC_LAYOUT.image_ext}" for i in scan_ids(image_dir, VOC_LAYOUT.image_ext)}
    masks: dict[str, Path] = {}
    for sub in VOC_LAYOUT.mask_dirs:  # official masks take precedence, as in the dataset reader
        for i in scan_ids(root / sub, ".png"):
            masks.setdefault(i, root / sub / f"{i}.png")

    split_ids: dict[str, list[str]] = {}
    for split in (*REQUIRED_LISTS, *OPTIONAL_LISTS):
        ids = _split_ids(root, split, report)
        if ids is None:
            continue
        split_ids[split] = ids
        report.counts[split] = len(ids)
        no_image = [i for i in ids if i not in images]
        if no_image:
            report.errors.append(
                f"{split}: {len(no_image)} id(s) without image {VOC_LAYOUT.image_dir}/<id>.jpg: {preview(no_image)}"
            )
        if split in SPLITS_WITH_MASKS:
            no_mask = [i for i in ids if i not in masks]
            if no_mask:
                report.errors.append(
                    f"{split}: {len(no_mask)} id(s) without mask in {' or '.join(VOC_LAYOUT.mask_dirs)}: "
                    f"{preview(no_mask)}"
                )
    if deep:
        _deep_check(split_ids, images, masks, report)
    if "train_aug" in split_ids and "val" in split_ids:
        leaked = sorted(set(split_ids["train_aug"]) & set(split_ids["val"]))
        if leaked:
            report.errors.append(f"train_aug contains {len(leaked)} val id(s): {preview(leaked)}")
    for split, count in report.counts.items():
        expected = VOC_LAYOUT.expected_counts.get(split)
        if expected is not None and count != expected:
            report.notes.append(
                f"{split}: {count} ids, the official dataset has {expected} (expected for synthetic or partial data)"
            )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="the VOC2012 folder (VOCdevkit/VOC2012)")
    parser.add_argument(
        "--deep",
        action="store_true",
        help="also decode every image and mask in full (truncated / corrupt files) and check mask values and sizes",
    )
    args = parser.parse_args(argv)
    report = check_voc(args.root, deep=args.deep)
    for note in report.notes:
        print(f"note: {note}")
    for error in report.errors:
        print(f"ERROR: {error}")
    summary = ", ".join(f"{split} {count}" for split, count in report.counts.items())
    if report.errors:
        print(f"{len(report.errors)} problem(s) in {args.root}; splits found: {summary or 'none'}")
        return 1
    print(f"OK: {args.root} is a usable VOC tree; images per split: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
