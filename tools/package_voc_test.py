"""Package a run's PASCAL VOC 2012 test predictions for the VOC evaluation server.

Usage: python -m tools.package_voc_test --run-dir RUN [--crf] [--competition comp6|comp5] [key=value ...]

Takes the predictions of ``python -m tools.infer_seg --run-dir RUN eval.split=test [eval.crf=true]``:
``RUN/seg/test/<id>.png``, or with ``--crf`` ``RUN/seg_crf/test/<id>.png``. First checks, for every id of the
run's ``test`` split (``ImageSets/Segmentation/test.txt`` under ``data.root``, 1,456 ids in VOC 2012), that its
prediction exists, has the size of its JPEG and holds class ids 0..20 only; the first failure of each kind is one
``error: ...`` line naming the first few ids and how many. Then writes

    RUN/test_server/results/VOC2012/Segmentation/<comp>_test_cls/<id>.png   one per test id
    RUN/test_server/results.tgz      the archive to upload: results/VOC2012/Segmentation/<comp>_test_cls/<id>.png
    RUN/test_server/package.json     what was packaged: source folder and its settings.json, competition, ids

Each PNG is a VOC palette image (mode ``P``, the VOC colour map) whose pixel values are the class ids, the format
of VOC's own SegmentationClass masks that the server reads. ``<comp>`` is the competition: ``comp6`` (default) is
"trained on any data", the one a model with an ImageNet-pretrained backbone, SBD masks or another dataset belongs
to; ``comp5`` is "trained on the VOC 2012 trainval data only" (README, "VOC test server").

Everything is rebuilt on each run (about 1,456 small files): the folder is assembled beside the old one and swapped
in, and the archive is written atomically, so a killed run leaves the previous package whole.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import secrets
import shutil
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from datasets import build_dataset
from utils import dist
from utils.config import add_config_arguments, config_from_args
from utils.errors import InputError, exit_on_user_error
from utils.io import atomic_path, atomic_write_bytes, atomic_write_json, label_to_png_bytes, probe_image, read_label_png
from utils.text import preview

SPLIT = "test"
COMPETITIONS = ("comp6", "comp5")
NUM_CLASSES = 21  # the server scores the 20 VOC classes and background
OUT_DIR = "test_server"
ARCHIVE = "results.tgz"
RECORD = "package.json"
# Folders a killed run may leave in RUN/test_server (".build-<hex>", ".old-<hex>"); only these are ever removed.
TEMP_PREFIXES = (".build-", ".old-")


def results_dir(competition: str) -> Path:
    """The path the server expects inside the archive: ``results/VOC2012/Segmentation/<comp>_test_cls``."""
    return Path("results") / "VOC2012" / "Segmentation" / f"{competition}_test_cls"


def check_predictions(folder: Path, ids: Sequence[str], images: Sequence[Path], command: str) -> None:
    """Every id has ``folder/<id>.png`` with the size of its image; raises naming the first few ids otherwise."""
    present = {entry.name for entry in os.scandir(folder)} if folder.is_dir() else set()
    missing = [name for name in ids if f"{name}.png" not in present]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(ids)} test image(s) have no prediction {folder}/<id>.png: {preview(missing)}; "
            f"make them with: {command}"
        )
    wrong = []
    for name, image in zip(ids, images, strict=True):
        _, predicted = probe_image(folder / f"{name}.png")
        _, expected = probe_image(image)
        if predicted != expected:
            wrong.append(f"{name} ({predicted[0]}x{predicted[1]}, image {expected[0]}x{expected[1]})")
    if wrong:
        raise InputError(
            f"{len(wrong)} of {len(ids)} prediction(s) in {folder} differ in size (WxH) from their JPEG: "
            f"{preview(wrong, sep='; ')}; the server needs each at its image's size (rerun tools.infer_seg)"
        )


def _archive(build: Path, target: Path) -> None:
    """Write ``build/results`` as a gzipped tar at ``target`` (atomically), owner-neutral, in sorted order."""

    def neutral(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    with atomic_path(target) as tmp:
        with tarfile.open(tmp, "w:gz") as tar:
            for folder, subfolders, files in os.walk(build / "results"):
                subfolders.sort()
                base = Path(folder)
                tar.add(base, arcname=base.relative_to(build).as_posix(), recursive=False, filter=neutral)
                for name in sorted(files):
                    path = base / name
                    tar.add(path, arcname=path.relative_to(build).as_posix(), recursive=False, filter=neutral)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())


def _sweep(out: Path) -> None:
    """Remove the build folders a killed run left behind."""
    if out.is_dir():
        for entry in out.iterdir():
            if entry.is_dir() and entry.name.startswith(TEMP_PREFIXES):
                shutil.rmtree(entry, ignore_errors=True)


def package(cfg: DictConfig, crf: bool = False, competition: str = "comp6") -> dict[str, Any]:
    """Check and package the run's test predictions (module docstring); returns the ``package.json`` record."""
    if competition not in COMPETITIONS:
        raise InputError(f"--competition must be one of {COMPETITIONS}, got {competition!r}")
    if dist.launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        raise InputError("package_voc_test runs as one process; start it with python -m, not torchrun")
    if str(cfg.data.name) != "voc" or int(cfg.data.num_classes) != NUM_CLASSES:
        raise InputError(
            f"the VOC evaluation server takes PASCAL VOC 2012 test results (data.name=voc, data.num_classes=21); "
            f"this run has data.name={cfg.data.name}, data.num_classes={cfg.data.num_classes}"
        )
    if cfg.data.max_images is not None:
        raise InputError(
            f"data.max_images={cfg.data.max_images} caps the test split; the server needs every test image (set "
            "data.max_images=null)"
        )
    run = Path(cfg.run.out_dir)
    dataset = build_dataset(cfg, SPLIT, "eval")
    source = run / ("seg_crf" if crf else "seg") / SPLIT
    command = f"python -m tools.infer_seg --run-dir {run} eval.split={SPLIT}" + (" eval.crf=true" if crf else "")
    check_predictions(source, dataset.ids, dataset.image_paths, command)

    out = run / OUT_DIR
    _sweep(out)
    token = secrets.token_hex(8)
    build = out / f"{TEMP_PREFIXES[0]}{token}"
    inner = results_dir(competition)
    try:
        for name in tqdm(dataset.ids, desc="VOC test PNGs", unit="png", mininterval=1.0):
            label = read_label_png(source / f"{name}.png")
            bad = np.unique(label[label >= NUM_CLASSES])
            if bad.size:
                raise InputError(
                    f"prediction {source / name}.png holds value(s) {bad.tolist()}; expected class ids 0..20 (the "
                    "server has no ignore label)"
                )
            atomic_write_bytes(build / inner / f"{name}.png", label_to_png_bytes(label))
        _archive(build, out / ARCHIVE)
        # swap the new folder in; the previous one goes only once the new one is in place
        old = out / f"{TEMP_PREFIXES[1]}{token}"
        if (out / "results").exists():
            os.replace(out / "results", old)
        os.replace(build / "results", out / "results")
    finally:
        shutil.rmtree(build, ignore_errors=True)
        shutil.rmtree(out / f"{TEMP_PREFIXES[1]}{token}", ignore_errors=True)
    settings_path = source / "settings.json"
    record = {
        "source": str(source),
        "settings": json.loads(settings_path.read_text()) if settings_path.is_file() else None,
        "competition": competition,
        "split": SPLIT,
        "num_images": len(dataset.ids),
        "archive": str(out / ARCHIVE),
        "folder": str(out / inner),
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    atomic_write_json(out / RECORD, record)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.package_voc_test",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--crf", action="store_true", help="package RUN/seg_crf/test (DenseCRF) instead of RUN/seg/test"
    )
    parser.add_argument(
        "--competition",
        choices=COMPETITIONS,
        default="comp6",
        help="comp6: any training data (default); comp5: VOC only",
    )
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.run is None and args.config is None:
        parser.error("--run-dir RUN is required (the run whose RUN/seg/test predictions to package)")

    def body() -> int:
        started = time.perf_counter()
        record = package(config_from_args(args), crf=args.crf, competition=args.competition)
        print(
            f"packaged {record['num_images']} test prediction(s) from {record['source']} as "
            f"{record['competition']} in {time.perf_counter() - started:.1f} s:\n  {record['archive']}  (upload this "
            f"file)\n  {record['folder']}"
        )
        return 0

    return exit_on_user_error(body)


if __name__ == "__main__":
    sys.exit(main())
