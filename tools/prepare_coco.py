"""Build VOC-style segmentation masks, split lists and image labels for COCO 2014 from the instances JSON (SPEC §7).

Usage: python -m tools.prepare_coco ROOT [--splits train val] [--workers N] [--progress-every SECONDS]

ROOT is the MSCOCO folder: ``ROOT/annotations/instances_{train,val}2014.json`` and
``ROOT/coco2014/{train2014,val2014}/*.jpg`` (or ``ROOT/{train2014,val2014}/*.jpg``: both image layouts are found, as
the reader finds them, ``datasets.coco.find_image_folder``). Writes
``ROOT/SegmentationClass/{train2014,val2014}/<stem>.png``
(palette PNG: 0 background, 1..80 the COCO categories in ``datasets.classes.COCO_ID_TO_LABEL`` order, 255 on crowd
regions that no ordinary instance covers), ``ROOT/ImageSets/{train,val,val_part}.txt`` and the image labels
``ROOT/ImageSets/labels_{train2014,val2014}.json``: ``{"labels": {<stem>: [class labels 1..80, sorted]}, ...}``
(plus provenance keys), every category with at least one annotation in the image, crowd regions included. The
dataset reader takes its labels from these files, not from the masks, so a class present only as a crowd region or
only as an instance too small to rasterise stays in the label (``val_part`` reads val2014's).

Only images with at least one annotation are listed and get a mask: that is what gives the 82,081 train and 40,137
val images of SPEC §7 (of 82,783 / 40,504 in the JSON). Where ordinary instances overlap, larger instances (by mask
area) are painted first so smaller ones stay visible on top of them; crowd regions are painted last and only where
no instance is. Masks already on disk are skipped (resumable); lists and label files, cheap to make from the JSON,
are rewritten on every run (so re-running on a tree prepared by an older version adds them); every file is written
atomically.

``--val-part-list FILE`` takes ``val_part`` from a list file instead of the built-in fixed subset (e.g. the 5,000-id
``datasets/coco/val_part.txt`` that ToCo publishes): every id must be an annotated val2014 image (checked before any
mask is written; the error names the unknown ids). The choice is recorded in ``ImageSets/val_part_source.json``, and
a later run without the option keeps that list (delete the record to go back to the built-in subset).

Progress: a bar on a terminal; elsewhere (nohup, SLURM, a pipe) a log line every ``--progress-every`` seconds
(default 30) with the images done, images/s and the ETA.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from datasets.base import IGNORE_INDEX, read_id_list
from datasets.classes import COCO_ID_TO_LABEL
from datasets.coco import COCO_LAYOUT, IMAGE_LAYOUTS, find_image_folder, val_part_ids  # shared with the reader
from utils.errors import InputError, exit_on_user_error
from utils.io import atomic_write_json, atomic_write_text, save_label_png
from utils.logging import progress_bar
from utils.text import preview

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
PROGRESS_EVERY_S = 30.0  # seconds between progress lines where there is no terminal
# Fixed in-training validation subset of val2014 (SPEC §7).
LAYOUT_HINT = (
    "expected the MSCOCO layout ROOT/annotations/instances_{train,val}2014.json and the images in "
    + IMAGE_LAYOUTS.replace("MSCOCO/", "ROOT/")
)
# Records where ImageSets/val_part.txt came from when --val-part-list gave it (a later run keeps that list).
VAL_PART_SOURCE = "ImageSets/val_part_source.json"


@dataclass(frozen=True)
class Instance:
    """One annotation as needed to paint it: COCO category id, segmentation (polygons or RLE), crowd flag."""

    ann_id: int
    category_id: int
    segmentation: Any
    iscrowd: bool


@dataclass(frozen=True)
class MaskTask:
    """Everything a worker needs to write one mask (no COCO object crosses the process boundary)."""

    stem: str
    height: int
    width: int
    instances: tuple[Instance, ...]
    out_path: Path
    image_path: Path


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO segmentation (polygon list, uncompressed or compressed RLE) to an [H, W] bool mask."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width)) if segmentation else None
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        rle = segmentation
    else:
        raise ValueError(f"unknown COCO segmentation format: {type(segmentation).__name__}; expected polygons or RLE")
    if rle is None:
        return np.zeros((height, width), dtype=bool)
    mask = mask_utils.decode(rle).astype(bool)
    if mask.shape != (height, width):
        raise ValueError(f"segmentation of size {mask.shape} does not match the image size {(height, width)}")
    return mask


def coco_label_map(instances: Sequence[Instance], height: int, width: int) -> np.ndarray:
    """Paint one image's instances into a VOC-style label map [H, W] uint8.

    0 background, ``COCO_ID_TO_LABEL[category_id]`` (1..80) for instances, 255 for crowd regions not covered by an
    ordinary instance. Ordinary instances are painted largest first (ties by annotation id, so the result does not
    depend on JSON order): where two overlap, the smaller one stays visible, as it would be in front.
    """
    label = np.zeros((height, width), dtype=np.uint8)
    painted = []
    crowd = np.zeros((height, width), dtype=bool)
    for instance in instances:
        mask = segmentation_to_mask(instance.segmentation, height, width)
        if instance.iscrowd:
            crowd |= mask
        else:
            painted.append((-int(mask.sum()), instance.ann_id, COCO_ID_TO_LABEL[instance.category_id], mask))
    covered = np.zeros((height, width), dtype=bool)
    for _, _, class_label, mask in sorted(painted, key=lambda item: item[:2]):
        label[mask] = class_label
        covered |= mask
    label[crowd & ~covered] = IGNORE_INDEX
    return label


def _write_mask(task: MaskTask) -> tuple[str, bool, bool]:
    """Write one mask unless it exists; returns (stem, written, image file present)."""
    image_present = task.image_path.is_file()
    if task.out_path.exists():
        return task.stem, False, image_present
    save_label_png(task.out_path, coco_label_map(task.instances, task.height, task.width))
    return task.stem, True, image_present


def image_labels(instances: Sequence[Instance]) -> list[int]:
    """Sorted class labels (1..80) of every category annotated in an image, crowd regions included (SPEC §7)."""
    return sorted({COCO_ID_TO_LABEL[instance.category_id] for instance in instances})


def write_label_file(root: Path, split: str, tasks: Sequence[MaskTask]) -> Path:
    """Write the image labels of ``split`` (one entry per listed image) where the reader looks for them."""
    path = COCO_LAYOUT.label_path(root, split)
    payload = {
        "source": f"annotations/instances_{split}2014.json",
        "classes": "datasets.classes.COCO_ID_TO_LABEL (1..80, the mask values); crowd annotations included",
        "labels": {task.stem: image_labels(task.instances) for task in tasks},
    }
    # Compact: the train file holds 82k entries.
    atomic_write_text(path, json.dumps(payload, separators=(",", ":")) + "\n")
    return path


def _split_paths(root: Path, split: str) -> tuple[Path, Path]:
    """(instances JSON, image folder in either layout); raises FileNotFoundError naming both image layouts."""
    return root / "annotations" / f"instances_{split}2014.json", find_image_folder(root, f"{split}2014")


def check_layout(root: Path, splits: Iterable[str]) -> None:
    """Fail fast, before any work, when an annotation file or image folder is missing."""
    if not root.is_dir():
        raise FileNotFoundError(f"COCO root folder not found: {root}; {LAYOUT_HINT}")
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} in --splits: expected some of {list(SPLITS)}")
        json_path = root / "annotations" / f"instances_{split}2014.json"
        if not json_path.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {json_path}; {LAYOUT_HINT}")
        _split_paths(root, split)  # the image folder, in either layout


def _split_tasks(root: Path, split: str) -> list[MaskTask]:
    """One task per image with at least one annotation, sorted by file stem."""
    json_path, image_dir = _split_paths(root, split)
    coco = COCO(str(json_path))
    tasks = []
    for image_id, image_anns in coco.imgToAnns.items():
        if not image_anns:
            continue
        info = coco.imgs[image_id]
        instances = []
        for ann in image_anns:
            if ann["category_id"] not in COCO_ID_TO_LABEL:
                raise ValueError(
                    f"{json_path}: annotation {ann['id']} has category_id {ann['category_id']}, "
                    "which is not one of the 80 COCO categories (datasets.classes.COCO_CATEGORIES)"
                )
            instances.append(Instance(ann["id"], ann["category_id"], ann["segmentation"], bool(ann.get("iscrowd", 0))))
        stem = Path(info["file_name"]).stem
        tasks.append(
            MaskTask(
                stem=stem,
                height=int(info["height"]),
                width=int(info["width"]),
                instances=tuple(instances),
                out_path=root / "SegmentationClass" / f"{split}2014" / f"{stem}.png",
                image_path=image_dir / info["file_name"],
            )
        )
    return sorted(tasks, key=lambda task: task.stem)


def val_part_from_list(path: Path, tasks: Sequence[MaskTask]) -> list[str]:
    """The ids of a ``--val-part-list`` file (one id per line, ``COCO_val2014_<12 digits>``; DeepLab-style path
    columns are read too), sorted, after checking that each is an annotated val2014 image (one of ``tasks``)."""
    try:
        ids = read_id_list(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--val-part-list: file {path} not found") from None
    except ValueError as err:  # an id listed twice
        raise InputError(f"--val-part-list: {err}") from None
    if not ids:
        raise InputError(f"--val-part-list {path} is empty; expected one val2014 image id per line")
    known = {task.stem for task in tasks}
    unknown = [name for name in ids if name not in known]
    if unknown:
        raise InputError(
            f"--val-part-list {path}: {len(unknown)} of {len(ids)} id(s) are not among the {len(known)} annotated "
            f"val2014 images of annotations/instances_val2014.json: {preview(unknown)}; expected one id per line "
            "like COCO_val2014_000000000042 (an image without annotations has no mask and is never listed)"
        )
    return sorted(ids)


def write_val_part(root: Path, stems: Sequence[str], listed: list[str] | None, list_file: Path | None) -> str:
    """Write ``ImageSets/val_part.txt``: ``listed`` (from ``list_file``, recorded in VAL_PART_SOURCE), else the list a
    recorded ``--val-part-list`` gave before (kept), else the built-in fixed subset. Returns where it came from."""
    path, record = root / "ImageSets" / "val_part.txt", root / VAL_PART_SOURCE
    if listed is not None:
        atomic_write_text(path, "".join(f"{stem}\n" for stem in listed))
        atomic_write_json(record, {"list": str(Path(list_file).resolve()), "ids": len(listed)})
        return f"--val-part-list {list_file}"
    if record.is_file() and path.is_file():
        source = f"{path} kept: --val-part-list gave it ({record}; delete that file for the built-in subset)"
        logger.info("val_part: %s", source)
        return source
    record.unlink(missing_ok=True)
    atomic_write_text(path, "".join(f"{stem}\n" for stem in val_part_ids(stems)))
    return "built-in fixed subset"


def _run_tasks(tasks: list[MaskTask], workers: int, desc: str, progress_every: float) -> list[tuple[str, bool, bool]]:
    """Write every mask (in this process, or a pool of ``workers``); a bar, or a log line every ``progress_every``
    seconds without a terminal. Returns :func:`_write_mask`'s answer per task (pool: in completion order)."""
    progress = {"total": len(tasks), "desc": desc, "unit": "img", "log_every_s": progress_every, "logger": logger}
    if workers <= 1:
        return [_write_mask(task) for task in progress_bar(tasks, **progress)]
    # fork where available: a spawned worker would re-import the `datasets` package and with it torch (seconds per
    # worker). Workers only decode masks with pycocotools and write PNGs.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    chunksize = max(1, min(256, len(tasks) // (workers * 8)))
    with context.Pool(workers) as pool:
        return list(progress_bar(pool.imap_unordered(_write_mask, tasks, chunksize=chunksize), **progress))


def prepare(
    root: str | Path,
    splits: Sequence[str] = SPLITS,
    workers: int = 0,
    progress_every: float = PROGRESS_EVERY_S,
    val_part_list: str | Path | None = None,
) -> dict[str, Any]:
    """Write the COCO masks and split lists under ``root``; see the module docstring for the layout.

    Args:
        root: the MSCOCO folder.
        splits: any of ``"train"``, ``"val"``; ``val`` also writes ``val_part``.
        workers: processes for mask writing (0 or 1 = in this process).
        progress_every: seconds between progress log lines when stderr is not a terminal (0: every image).
        val_part_list: a list file to take ``val_part`` from (needs ``val`` in ``splits``); None = the built-in
            subset, or the list an earlier run was given (see the module docstring).

    Returns:
        Per split: ``images`` (listed), ``written`` / ``skipped`` masks, ``instances`` (ordinary annotations),
        ``crowd`` (crowd regions), ``missing_images`` (listed images without a JPEG file), ``label_file`` (path);
        val also ``val_part`` (ids) and ``val_part_source``.
    """
    root = Path(root)
    check_layout(root, splits)
    if val_part_list is not None and "val" not in splits:
        raise InputError(f"--val-part-list needs the val split prepared too (--splits ... val), got {list(splits)}")
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    if progress_every < 0:
        raise ValueError(f"--progress-every must be >= 0 seconds, got {progress_every:g}")
    summary: dict[str, Any] = {}
    # with a val_part list, val goes first: the list is checked against val2014 before any mask is written
    for split in sorted(splits, key=lambda name: name != "val") if val_part_list is not None else splits:
        tasks = _split_tasks(root, split)
        # checked before the (long) mask writing
        listed = val_part_from_list(Path(val_part_list), tasks) if split == "val" and val_part_list else None
        results = _run_tasks(tasks, workers, desc=f"COCO {split}2014 masks", progress_every=progress_every)
        written = sum(1 for _, was_written, _ in results if was_written)
        missing = sum(1 for _, _, present in results if not present)
        crowd = sum(instance.iscrowd for task in tasks for instance in task.instances)
        stems = [task.stem for task in tasks]
        list_dir = root / "ImageSets"
        atomic_write_text(list_dir / f"{split}.txt", "".join(f"{stem}\n" for stem in stems))
        if split == "val":
            source = write_val_part(root, stems, listed, val_part_list)
        label_file = write_label_file(root, split, tasks)
        if missing:
            logger.warning("%s2014: %d listed images have no JPEG in %s", split, missing, _split_paths(root, split)[1])
        summary[split] = {
            "images": len(tasks),
            "written": written,
            "skipped": len(tasks) - written,
            "instances": sum(len(task.instances) for task in tasks) - crowd,
            "crowd": crowd,
            "missing_images": missing,
            "label_file": str(label_file),
        }
        if split == "val":
            part = (list_dir / "val_part.txt").read_text().split()
            summary[split].update(val_part=len(part), val_part_source=source)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.prepare_coco", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="the MSCOCO folder (annotations/, coco2014/ or train2014/ + val2014/)")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS, help="splits to prepare")
    parser.add_argument("--workers", type=int, default=0, help="processes for writing masks (0 = this process)")
    parser.add_argument(
        "--progress-every",
        type=float,
        default=PROGRESS_EVERY_S,
        metavar="SECONDS",
        help="without a terminal (nohup, SLURM), log progress every SECONDS (default %(default)g)",
    )
    parser.add_argument(
        "--val-part-list",
        type=Path,
        metavar="FILE",
        help="take ImageSets/val_part.txt from this list of val2014 ids (e.g. ToCo's published val_part.txt) instead "
        "of the built-in fixed subset; kept by later runs",
    )
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if args.progress_every < 0:
        parser.error(f"--progress-every must be >= 0 seconds, got {args.progress_every:g}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def body() -> int:
        summary = prepare(args.root, splits=args.splits, workers=args.workers, progress_every=args.progress_every,
                          val_part_list=args.val_part_list)  # fmt: skip
        for split, counts in summary.items():
            print(
                f"{split}2014: {counts['images']} images, masks written {counts['written']} / skipped "
                f"{counts['skipped']}, {counts['instances']} instances, {counts['crowd']} crowd regions"
                + (f", {counts['missing_images']} JPEGs missing" if counts["missing_images"] else "")
            )
            if "val_part" in counts:
                print(f"val_part: {counts['val_part']} images ({counts['val_part_source']})")
        return 0

    return exit_on_user_error(body)


if __name__ == "__main__":
    raise SystemExit(main())
