"""Build ``VOC2012/SegmentationClassAug`` from the SBD release and VOC's official masks (SPEC §7).

Usage: python -m tools.convert_sbd SBD_DIR VOC_ROOT [--workers N]

SBD_DIR is the unpacked ``benchmark.tgz`` of the Semantic Boundaries Dataset (Hariharan et al., ICCV 2011):
``benchmark_RELEASE``, its ``dataset`` folder, or the folder holding ``benchmark_RELEASE``. Its ``dataset/`` holds
``train.txt`` and ``val.txt`` (8,498 + 2,857 = 11,355 ids) and ``cls/<id>.mat``, each with a struct ``GTcls`` whose
field ``Segmentation`` is the ``[H, W]`` map of class ids (0 background, 1..20 the VOC classes; SBD has no void
label). VOC_ROOT is ``VOCdevkit/VOC2012`` with the official ``SegmentationClass/`` masks.

Writes ``VOC_ROOT/SegmentationClassAug/<id>.png`` for every id of SBD train and val and every official mask: VOC
palette PNGs (mode ``P``, the VOC colour map, pixel value = class id). For an id in both, the official VOC mask is
written (the standard construction: VOC's masks are the reference annotation, with their 255 void band on object
borders), pixel for pixel. With the full datasets that gives 12,031 masks, and ``train_aug`` (derived by the dataset
reader as these ids minus the val ids) has the usual 10,582 images.

Resumable: a target that already is a palette PNG with exactly the pixels it should have is skipped, anything else
(missing, truncated, other content, not a palette PNG) is written, atomically. A rerun therefore re-reads every
source but writes nothing. Other files in ``SegmentationClassAug/`` are left alone (and counted in the summary, as
they would join the derived ``train_aug``). A folder that is not SBD, an id listed without its ``.mat``, a ``.mat``
without ``GTcls.Segmentation`` or a class id outside 0..20 is one ``error: ...`` line naming the file.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
from PIL import Image
from tqdm import tqdm

from datasets.base import IGNORE_INDEX, read_id_list, scan_ids
from datasets.voc import AUG_MASK_DIR, VOC_LAYOUT, voc_root_hint
from utils.errors import BadFileError, InputError, exit_on_user_error
from utils.io import atomic_write_bytes, label_to_png_bytes, read_label_png
from utils.text import preview

OFFICIAL_MASK_DIR = "SegmentationClass"
SBD_LISTS = ("train.txt", "val.txt")
SBD_LAYOUT = "benchmark_RELEASE/dataset/{cls/<id>.mat, train.txt, val.txt}"
SBD_SOURCE = "benchmark.tgz of the Semantic Boundaries Dataset (Hariharan et al., ICCV 2011; Berkeley BSDS/SBD page)"
NUM_CLASSES = len(VOC_LAYOUT.class_names)  # 21: background + the 20 VOC classes


@dataclass(frozen=True)
class Job:
    """One mask to make: ``source`` is an SBD ``.mat`` or an official VOC ``.png``."""

    name: str
    source: Path
    target: Path


def read_sbd_mat(path: Path) -> np.ndarray:
    """``GTcls.Segmentation`` of an SBD ``cls/<id>.mat`` as ``[H, W]`` uint8 class ids 0..20.

    Raises:
        BadFileError: the file cannot be read as a MATLAB file.
        InputError: it has no ``GTcls.Segmentation``, or that is not a 2-D integer map of ids 0..20.
    """
    try:
        content = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"SBD mask file not found: {path}") from None
    except Exception as err:  # scipy raises MatReadError, ValueError, TypeError, ... for broken files
        raise BadFileError(f"cannot read SBD mask {path} (corrupt or not a MATLAB file): {err}") from err
    segmentation = getattr(content.get("GTcls"), "Segmentation", None)
    if segmentation is None:
        raise InputError(
            f"{path} has no GTcls.Segmentation; expected an SBD cls/<id>.mat (struct GTcls with field Segmentation, "
            "the [H, W] class ids)"
        )
    label = np.asarray(segmentation)
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise InputError(
            f"{path}: GTcls.Segmentation is {label.dtype} of shape {label.shape}; expected [H, W] integer class ids"
        )
    bad = np.unique(label[(label < 0) | (label >= NUM_CLASSES)])
    if bad.size:
        raise InputError(f"{path}: GTcls.Segmentation holds value(s) {bad.tolist()}; expected class ids 0..20")
    return label.astype(np.uint8)


def read_official_mask(path: Path) -> np.ndarray:
    """An official VOC mask as ``[H, W]`` uint8 (0..20 and the 255 void band); other values are an error."""
    label = read_label_png(path)
    bad = np.unique(label[(label >= NUM_CLASSES) & (label != IGNORE_INDEX)])
    if bad.size:
        raise InputError(f"VOC mask {path} holds value(s) {bad.tolist()}; expected 0..20 or {IGNORE_INDEX}")
    return label


def is_complete(path: Path, label: np.ndarray) -> bool:
    """Whether ``path`` already is a palette PNG holding exactly ``label`` (a broken or other file is not)."""
    try:
        with Image.open(path) as image:
            if image.mode != "P":
                return False
            return bool(np.array_equal(np.asarray(image), label))
    except (OSError, ValueError, SyntaxError):  # missing, truncated, not an image
        return False


def convert(job: Job) -> bool:
    """Write one target unless it is complete; returns whether it was written."""
    label = read_sbd_mat(job.source) if job.source.suffix == ".mat" else read_official_mask(job.source)
    if is_complete(job.target, label):
        return False
    atomic_write_bytes(job.target, label_to_png_bytes(label))
    return True


def find_sbd_dataset(path: Path) -> Path:
    """The SBD ``dataset`` folder at or below ``path`` (``benchmark_RELEASE/dataset`` or its parents given).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        InputError: no SBD layout there; the message names what was expected and where to get it.
    """
    if not path.is_dir():
        raise FileNotFoundError(f"SBD folder {path} not found; expected the unpacked {SBD_SOURCE}")
    for candidate in (path, path / "dataset", path / "benchmark_RELEASE" / "dataset"):
        if (candidate / "cls").is_dir() and all((candidate / name).is_file() for name in SBD_LISTS):
            return candidate
    raise InputError(
        f"{path} is not the SBD release folder: expected {SBD_LAYOUT} (give benchmark_RELEASE or its dataset folder), "
        f"as unpacked from the {SBD_SOURCE}"
    )


def check_voc_root(root: Path) -> Path:
    """``root`` when it holds the official ``SegmentationClass/`` masks; else an error (with "did you mean")."""
    if not root.is_dir():
        raise FileNotFoundError(f"VOC root {root} not found; expected VOCdevkit/VOC2012 ({VOC_LAYOUT.description})")
    if (root / OFFICIAL_MASK_DIR).is_dir():
        return root
    meant = voc_root_hint(root)
    hint = f"did you mean {meant}? " if meant is not None else ""
    raise InputError(
        f"{root} has no {OFFICIAL_MASK_DIR}/ folder: {hint}VOC_ROOT is the VOC2012 folder (VOCdevkit/VOC2012) with "
        f"the official masks ({VOC_LAYOUT.description})"
    )


def plan_jobs(dataset: Path, voc_root: Path) -> tuple[list[Job], dict[str, Any]]:
    """Every mask to make, sorted by id (official VOC source where an id has one), and counts for the summary."""
    sbd_ids: set[str] = set()
    for name in SBD_LISTS:
        try:
            sbd_ids.update(read_id_list(dataset / name))
        except ValueError as err:  # an id listed twice
            raise InputError(str(err)) from None
    on_disk = scan_ids(dataset / "cls", ".mat")
    no_mat = sorted(sbd_ids - on_disk)
    if no_mat:
        raise InputError(
            f"{len(no_mat)} SBD id(s) of {' / '.join(SBD_LISTS)} have no {dataset / 'cls'}/<id>.mat: {preview(no_mat)} "
            "(an incompletely unpacked benchmark.tgz?)"
        )
    official = scan_ids(voc_root / OFFICIAL_MASK_DIR, ".png")
    out_dir = voc_root / AUG_MASK_DIR
    jobs = [
        Job(name, voc_root / OFFICIAL_MASK_DIR / f"{name}.png", out_dir / f"{name}.png")
        if name in official
        else Job(name, dataset / "cls" / f"{name}.mat", out_dir / f"{name}.png")
        for name in sorted(sbd_ids | official)
    ]
    names = {job.name for job in jobs}
    images = scan_ids(voc_root / VOC_LAYOUT.image_dir, VOC_LAYOUT.image_ext)
    counts = {
        "masks": len(jobs),
        "from_sbd": len(sbd_ids - official),
        "from_voc": len(official),
        "voc_over_sbd": len(sbd_ids & official),
        "other_files": len(scan_ids(out_dir, ".png") - names),
        "without_image": len(names - images),
        "out_dir": str(out_dir),
    }
    val_list = VOC_LAYOUT.list_path(voc_root, "val")
    if val_list.is_file():
        counts["train_aug"] = len(names - set(read_id_list(val_list)))
    return jobs, counts


def _run(jobs: list[Job], workers: int) -> list[bool]:
    """:func:`convert` over ``jobs`` (in this process, or a pool of ``workers``) with a progress bar."""
    written = []
    with contextlib.ExitStack() as stack:  # pool first, then the bar: an error message starts on a line of its own
        bar = stack.enter_context(tqdm(total=len(jobs), desc="SegmentationClassAug", unit="mask", mininterval=1.0))
        if workers <= 1:
            results: Iterable[bool] = map(convert, jobs)
        else:
            # fork where available: a spawned worker would re-import numpy / scipy / PIL (and the parent's torch)
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = stack.enter_context(multiprocessing.get_context(method).Pool(workers))
            results = pool.imap_unordered(convert, jobs, chunksize=max(1, min(64, len(jobs) // (workers * 8))))
        for result in results:
            written.append(result)
            bar.update(1)
    return written


def convert_sbd(sbd_dir: str | Path, voc_root: str | Path, workers: int = 0) -> dict[str, Any]:
    """Write ``voc_root/SegmentationClassAug`` (module docstring); returns the counts.

    Returns:
        ``masks`` (ids made), ``from_sbd`` / ``from_voc`` (by source), ``voc_over_sbd`` (ids in both, VOC's used),
        ``written`` / ``skipped`` (already complete), ``other_files`` (PNGs in the folder from neither source),
        ``without_image`` (ids without a JPEG in JPEGImages), ``out_dir`` and, when ``val.txt`` exists,
        ``train_aug`` (the size of the derived split).
    """
    if workers < 0:
        raise InputError(f"--workers must be >= 0, got {workers}")
    dataset = find_sbd_dataset(Path(sbd_dir).expanduser())
    root = check_voc_root(Path(voc_root).expanduser())
    jobs, counts = plan_jobs(dataset, root)
    written = sum(_run(jobs, workers))
    return {**counts, "written": written, "skipped": len(jobs) - written}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.convert_sbd", description=__doc__.split("\n\n")[0])
    parser.add_argument("sbd_dir", type=Path, help="the unpacked SBD release: benchmark_RELEASE (or its dataset/)")
    parser.add_argument("voc_root", type=Path, help="the VOC2012 folder (VOCdevkit/VOC2012) with SegmentationClass/")
    parser.add_argument("--workers", type=int, default=0, help="processes (0 = this process)")
    args = parser.parse_args(argv)

    def body() -> int:
        counts = convert_sbd(args.sbd_dir, args.voc_root, workers=args.workers)
        print(
            f"{counts['out_dir']}: {counts['masks']} masks ({counts['from_sbd']} from SBD, {counts['from_voc']} "
            f"official VOC masks, which replace SBD's for {counts['voc_over_sbd']} ids in both); written "
            f"{counts['written']}, "
            f"already complete {counts['skipped']}"
        )
        if "train_aug" in counts:
            print(f"train_aug (derived: these ids minus the val ids): {counts['train_aug']} images")
        if counts["other_files"]:
            print(f"note: {counts['other_files']} other PNG(s) in that folder are from neither source; left alone")
        if counts["without_image"]:
            print(f"note: {counts['without_image']} id(s) have no JPEG in {VOC_LAYOUT.image_dir}/")
        return 0

    return exit_on_user_error(body)


if __name__ == "__main__":
    sys.exit(main())
