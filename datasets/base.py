"""The one dataset class shared by every on-disk layout (SPEC §7), plus split lists, image labels and their cache.

A :class:`Layout` is a small description of where a dataset keeps its images, masks, lists and (optionally) XML
annotations; VOC and COCO differ only by theirs (``datasets/voc.py``, ``datasets/coco.py``). Everything else, from
checking the tree to building training crops, is this file.

Split ids come from ``<list_dir>/<split>.txt`` when a list folder is given, else from the layout's own list file,
else they are derived from disk by the layout (afresh on every construction: one folder scan, which finding the masks
costs anyway, so a finished download or an added mask is always seen). A list with an id twice is an error.

Image labels come from the layout's label file when it has one (COCO: the categories of the instances JSON, written
by ``tools/prepare_coco.py``), else from the masks (unique values minus 0 and 255) or, where a layout has annotations
and an image has no mask, from its XML. Mask / XML labels are cached as JSON in a run-side folder, never inside the
dataset, each next to the size, mtime and ctime of the file it was read from, so a rewritten, added or removed mask
is re-read and an unchanged tree costs one ``stat`` per image; a label file is read as it is, never cached.
"""

from __future__ import annotations

import json
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from datasets.transforms import TrainTransform, to_chw_tensor
from utils.dist import is_main_process
from utils.io import atomic_write_text, probe_image, read_image, read_label_png
from utils.text import preview

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255
# 2: one entry per image with the stat of its source file; derived ids are no longer cached.
CACHE_VERSION = 2
MODES = ("train", "eval")
CHECK_MODES = ("header", "full")
# Below this many masks a process pool costs more than it saves.
PARALLEL_MIN_FILES = 512

_In = TypeVar("_In")
_Out = TypeVar("_Out")


@dataclass(frozen=True)
class Layout:
    """Where a dataset keeps its files, relative to ``data.root``.

    Paths may contain ``{folder}``, replaced by ``split_folders[split]`` (COCO keeps train2014 / val2014 apart);
    list paths may contain ``{split}``.

    Attributes:
        name: ``data.name`` of this layout.
        description: the expected tree, quoted in error messages.
        image_dir: image folder.
        mask_dirs: mask folders, searched in order for ``<id>.png``.
        list_file: split list file.
        class_names: class names including background.
        annotation_dir: per-image XML annotations (labels for images without masks), or None.
        split_folders: split -> value of ``{folder}``; empty when paths have no ``{folder}``.
        image_ext: image file extension.
        derive_ids: ``(layout, root, split) -> ids`` for splits without a list file, or None when not derivable.
        expected_counts: split -> image count of the full official dataset (for reports).
        label_file: JSON file of image labels, ``{"labels": {id: [class ids 1..C-1]}}`` (see
            :func:`read_label_file`), used instead of masks and XML; None = labels come from masks / XML.
        label_hint: what to do when ``label_file`` is missing, quoted in the error (``{root}`` = the dataset root).
    """

    name: str
    description: str
    image_dir: str
    mask_dirs: tuple[str, ...]
    list_file: str
    class_names: tuple[str, ...]
    annotation_dir: str | None = None
    split_folders: Mapping[str, str] = field(default_factory=dict)
    image_ext: str = ".jpg"
    derive_ids: Callable[[Layout, Path, str], list[str] | None] | None = None
    expected_counts: Mapping[str, int] = field(default_factory=dict)
    label_file: str | None = None
    label_hint: str = ""

    def _fill(self, template: str, split: str) -> str:
        if "{folder}" not in template:
            return template
        if split not in self.split_folders:
            raise ValueError(
                f"unknown {self.name} split {split!r}: expected one of {sorted(self.split_folders)} "
                "(config keys data.train_split / data.val_split / eval.split)"
            )
        return template.format(folder=self.split_folders[split])

    def image_folder(self, root: Path, split: str) -> Path:
        return root / self._fill(self.image_dir, split)

    def mask_folders(self, root: Path, split: str) -> list[Path]:
        return [root / self._fill(d, split) for d in self.mask_dirs]

    def annotation_folder(self, root: Path) -> Path | None:
        return None if self.annotation_dir is None else root / self.annotation_dir

    def list_path(self, root: Path, split: str) -> Path:
        return root / self.list_file.format(split=split)

    def label_path(self, root: Path, split: str) -> Path | None:
        return None if self.label_file is None else root / self._fill(self.label_file, split)


def scan_ids(folder: Path, ext: str) -> set[str]:
    """Ids (file stems) of the ``*<ext>`` files directly in ``folder``; empty when the folder does not exist.

    One directory scan instead of a stat per id keeps 82k-image COCO folders fast.
    """
    if not folder.is_dir():
        return set()
    with os.scandir(folder) as entries:
        return {e.name[: -len(ext)] for e in entries if e.name.endswith(ext) and e.is_file()}


def read_id_list(path: Path) -> list[str]:
    """Read a split list: one id per line, blank lines skipped.

    Only the first column counts, and a path-like first column (``/JPEGImages/x.jpg /SegmentationClassAug/x.png``,
    as DeepLab-style lists write it) is reduced to its stem, so common list formats all work.

    Raises:
        ValueError: an id is listed more than once (it would count twice in every metric); the message names the
            file, the first duplicated ids and their line numbers.
    """
    ids = []
    lines: dict[str, list[int]] = {}
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            token = fields[0]
            name = Path(token).stem if ("/" in token or "." in token) else token
            ids.append(name)
            lines.setdefault(name, []).append(number)
    repeated = [(name, numbers) for name, numbers in lines.items() if len(numbers) > 1]
    if repeated:
        shown = preview((f"{name} (lines {', '.join(map(str, numbers))})" for name, numbers in repeated), sep="; ")
        raise ValueError(
            f"split list {path} lists {len(repeated)} id(s) more than once: {shown}; each id must appear once "
            "(a repeated image counts twice in mIoU and is drawn twice as often in training)"
        )
    return ids


def mask_classes(path: str | os.PathLike, num_classes: int) -> list[int]:
    """Foreground classes present in a label PNG: unique values minus 0 and 255 (SPEC §7).

    Reads palette indices only (no colour conversion). Values outside ``0..num_classes-1`` other than 255 are an
    error naming the value and the file.
    """
    mask = read_label_png(path)
    counts = np.bincount(mask.ravel(), minlength=256)
    present = np.flatnonzero(counts)
    bad = [int(v) for v in present if v >= num_classes and v != IGNORE_INDEX]
    if bad:
        raise ValueError(
            f"mask {path} contains value(s) {bad}; expected 0..{num_classes - 1} or {IGNORE_INDEX} "
            f"(data.num_classes = {num_classes})"
        )
    return [int(v) for v in present if 0 < v < num_classes]


def read_label_file(path: Path, num_classes: int, hint: str = "") -> dict[str, list[int]]:
    """Image labels of a layout's label file: ``{"labels": {id: [class ids]}}`` JSON (other keys are provenance).

    Class ids are those of the masks (1..C-1; background 0 is never listed). A missing or malformed file is an error
    that quotes ``hint`` (how to make it): labels are never silently re-derived from masks, which lose classes
    (SPEC §7).
    """
    advice = f"; {hint}" if hint else ""
    if not path.is_file():
        raise FileNotFoundError(f"image label file {path} not found{advice}")
    try:
        with open(path) as f:
            labels = json.load(f)["labels"]
        labels = {str(name): sorted({int(c) for c in classes}) for name, classes in labels.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"cannot read image labels from {path} ({err!r}){advice}") from err
    bad = sorted({c for classes in labels.values() for c in classes if not 0 < c < num_classes})
    if bad:
        raise ValueError(
            f"{path} lists class id(s) {preview(bad)}; expected 1..{num_classes - 1} (data.num_classes = {num_classes})"
        )
    return labels


def xml_classes(path: str | os.PathLike, class_names: Sequence[str]) -> list[int]:
    """Foreground classes named by the ``<object><name>`` entries of a VOC annotation XML (all objects count)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as err:
        raise ValueError(f"cannot parse annotation {path}: {err}") from err
    index = {name: i for i, name in enumerate(class_names)}
    found = set()
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in index or index[name] == 0:
            raise ValueError(f"annotation {path} names unknown class {name!r}; expected one of {list(class_names[1:])}")
        found.add(index[name])
    return sorted(found)


def _map_with_progress(fn: Callable[[_In], _Out], items: list[_In], workers: int, desc: str) -> list[_Out]:
    """``[fn(x) for x in items]`` with a tqdm bar, over a process pool when the list is long."""
    bar = partial(tqdm, total=len(items), desc=desc, unit="file", disable=not is_main_process(), mininterval=1.0)
    if workers <= 1 or len(items) < PARALLEL_MIN_FILES:
        return [fn(x) for x in bar(items)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        # Chunks amortise the pickling of tiny tasks; results come back in order.
        return list(bar(pool.map(fn, items, chunksize=64)))


def file_stamp(path: Path) -> list[int]:
    """``[size, mtime_ns, ctime_ns]`` of a file: what a label cache entry must match to be reused.

    The ctime changes on every rewrite even when a copy tool restores the old mtime (``rsync -t``, ``tar``), so a
    replaced mask with the same size and mtime is still re-read.
    """
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def pair_problems(pair: tuple[Path, Path | None], decode: bool) -> list[str]:
    """Problems of one (image, mask or None) pair, read as :meth:`SegmentationDataset.check_files` describes."""
    image_path, mask_path = pair
    problems = []
    try:
        _, image_size = probe_image(image_path, decode=decode)
    except OSError as err:
        problems.append(str(err))
        image_size = None
    if mask_path is None:
        return problems
    try:
        mask_mode, mask_size = probe_image(mask_path, decode=decode)
    except OSError as err:
        return [*problems, str(err)]
    if mask_mode not in ("P", "L"):
        problems.append(f"mask {mask_path} has mode {mask_mode!r}; expected a palette ('P') or grey ('L') PNG")
    if image_size is not None and mask_size != image_size:
        problems.append(
            f"mask {mask_path} is {mask_size[0]}x{mask_size[1]} (WxH) but its image {image_path} is "
            f"{image_size[0]}x{image_size[1]}"
        )
    return problems


class LabelCache:
    """Per-image labels of one (dataset, split), stored as JSON next to the run, keyed on the files they came from.

    The file records the absolute root, split and class count; any difference means it belongs to another dataset
    (or an older format) and is discarded. Each entry holds the label's source file (relative to the root) and its
    :func:`file_stamp`; :meth:`lookup` returns it only while both still match, so a mask that was rewritten, or that
    appeared for an image labelled from XML, is read again. Entries of ids outside the current split are kept
    (another ``max_images`` or list reuses them) and cost nothing, as they are only looked up by id.
    """

    def __init__(self, path: Path, key: dict[str, Any]) -> None:
        self.path = path
        self.key = key
        self.entries: dict[str, dict[str, Any]] = {}
        self.dirty = False
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (OSError, ValueError) as err:
            logger.warning("ignoring unreadable dataset cache %s (%s); rebuilding it", self.path, err)
            return
        if data.get("key") != self.key:
            logger.info("dataset cache %s belongs to %s; rebuilding it for %s", self.path, data.get("key"), self.key)
            return
        entries = data.get("labels")
        if isinstance(entries, dict):
            self.entries = entries

    def lookup(self, name: str, source: str, stamp: list[int]) -> list[int] | None:
        """The cached classes of ``name`` if they were read from ``source`` while it had ``stamp``, else None."""
        entry = self.entries.get(name)
        if not isinstance(entry, dict) or entry.get("source") != source or entry.get("stamp") != stamp:
            return None
        classes = entry.get("classes")
        return list(classes) if isinstance(classes, list) else None

    def store(self, name: str, source: str, stamp: list[int], classes: list[int]) -> None:
        self.entries[name] = {"classes": list(classes), "source": source, "stamp": list(stamp)}
        self.dirty = True

    def save(self) -> None:
        if self.dirty:
            # Compact JSON: the VOC train_aug cache holds 10k entries.
            payload = {"key": self.key, "labels": self.entries}
            atomic_write_text(self.path, json.dumps(payload, separators=(",", ":")))
            self.dirty = False


class SegmentationDataset(Dataset):
    """Images, image-level labels and (where present) masks of one split of one layout.

    Items (design.md "Dataset items"):
        ``mode="train"``: ``img`` uint8 ``[3, S, S]``, ``g2`` uint8 ``[3, S, S]``, ``img_box`` int64 ``[4]``,
        ``label`` float32 ``[C_fg]``, ``name`` str.
        ``mode="eval"``: ``img`` uint8 ``[3, H, W]``, ``mask`` int64 ``[H, W]`` (when the split has masks),
        ``label`` float32 ``[C_fg]``, ``name`` str.

    Args:
        layout: the on-disk layout.
        root: dataset root (``data.root``).
        split: split name, e.g. ``train_aug`` / ``val``.
        mode: ``train`` or ``eval``.
        num_classes: classes including background (C).
        cache_dir: folder for the label cache (used only by layouts without a label file).
        transform: training transform (required for ``mode="train"``).
        list_dir: folder with ``<split>.txt`` lists overriding the layout's; None = the layout's own / derived.
        max_images: keep only the first N ids; None = all.
        workers: processes used to derive labels from masks.
    """

    def __init__(
        self,
        layout: Layout,
        root: str | os.PathLike,
        split: str,
        mode: str,
        num_classes: int,
        cache_dir: str | os.PathLike,
        transform: TrainTransform | None = None,
        list_dir: str | os.PathLike | None = None,
        max_images: int | None = None,
        workers: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"dataset mode must be one of {MODES}, got {mode!r}")
        if mode == "train" and transform is None:
            raise ValueError("mode='train' needs a TrainTransform")
        if not 1 < num_classes <= len(layout.class_names):
            raise ValueError(
                f"data.num_classes = {num_classes} does not fit the {layout.name} layout "
                f"({len(layout.class_names)} classes including background)"
            )
        if max_images is not None and max_images <= 0:
            raise ValueError(f"data.max_images must be a positive integer or null, got {max_images}")
        self.layout = layout
        self.root = self._check_root(root, layout)
        self.split = split
        self.mode = mode
        self.num_classes = num_classes
        self.transform = transform

        self.image_dir = layout.image_folder(self.root, split)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(
                f"image folder {self.image_dir} not found (split {split!r}); expected the {layout.name} layout "
                f"{layout.description} under data.root = {self.root}"
            )
        list_source, listed = self._listed_ids(list_dir)
        self.label_path = layout.label_path(self.root, split)
        ids = listed if listed is not None else self._derived_ids()
        if not ids:
            raise ValueError(f"split {split!r} of {self.root} is empty (list: {list_source})")
        if max_images is not None:
            ids = ids[:max_images]
        self.ids = ids
        self.image_paths = self._check_images(ids)
        self.mask_paths = self._find_masks(ids)
        self.labels = self._labels(ids, Path(cache_dir), workers)
        self.has_masks = self._check_mask_coverage()

    # ------------------------------------------------------------------ construction helpers

    @staticmethod
    def _check_root(root: str | os.PathLike | None, layout: Layout) -> Path:
        if root is None or str(root) in ("", "???"):
            raise ValueError(f"config key data.root is not set; point it at the {layout.name} folder")
        path = Path(root).expanduser().resolve()
        if not path.is_dir():
            raise FileNotFoundError(
                f"data.root = {root} does not exist or is not a folder; expected the {layout.name} layout "
                f"{layout.description}"
            )
        return path

    def _listed_ids(self, list_dir: str | os.PathLike | None) -> tuple[str, list[str] | None]:
        """(source description, ids) from a list file, or ('derived', None) when the split has none."""
        if list_dir is not None:
            path = Path(list_dir).expanduser() / f"{self.split}.txt"
            if not path.is_file():
                raise FileNotFoundError(f"data.list_dir is set but the split list {path} does not exist")
            return str(path.resolve()), read_id_list(path)
        path = self.layout.list_path(self.root, self.split)
        if path.is_file():
            return str(path), read_id_list(path)
        return "derived", None

    def _derived_ids(self) -> list[str]:
        derived = None if self.layout.derive_ids is None else self.layout.derive_ids(self.layout, self.root, self.split)
        if derived is None:
            raise FileNotFoundError(
                f"no list for split {self.split!r}: {self.layout.list_path(self.root, self.split)} does not exist "
                "and this split cannot be derived from disk; set data.list_dir to a folder with "
                f"{self.split}.txt"
            )
        logger.info("derived %d ids for %s split %s from disk", len(derived), self.layout.name, self.split)
        return derived

    def _check_images(self, ids: list[str]) -> list[Path]:
        on_disk = scan_ids(self.image_dir, self.layout.image_ext)
        missing = [i for i in ids if i not in on_disk]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} id(s) of split {self.split!r} have no image {self.image_dir}/<id>"
                f"{self.layout.image_ext}: {preview(missing)}"
            )
        return [self.image_dir / f"{i}{self.layout.image_ext}" for i in ids]

    def _find_masks(self, ids: list[str]) -> list[Path | None]:
        """Per id, the first mask folder (in layout order) holding ``<id>.png``, else None."""
        found: dict[str, Path] = {}
        for folder in self.layout.mask_folders(self.root, self.split):
            for i in scan_ids(folder, ".png"):
                found.setdefault(i, folder / f"{i}.png")
        return [found.get(i) for i in ids]

    def _labels(self, ids: list[str], cache_dir: Path, workers: int) -> np.ndarray:
        """``[N, C_fg]`` float32 multi-hot labels: from the layout's label file, else from masks / XML (cached)."""
        if self.label_path is not None:
            # Labels come from the file, never from a cache (a cache of mask labels would lose crowd-only classes).
            hint = self.layout.label_hint.format(root=self.root)
            known = read_label_file(self.label_path, self.num_classes, hint)
            missing_from = f"no entry in the label file {self.label_path}"
        else:
            known = self._derived_labels(ids, cache_dir, workers)
            xml_dir = self.layout.annotation_folder(self.root)
            annotations = "" if xml_dir is None else f" or annotation {xml_dir}/<id>.xml"
            folders = [str(d) for d in self.layout.mask_folders(self.root, self.split)]
            missing_from = f"neither a mask in {folders}{annotations}"
        unlabelled = [i for i in ids if i not in known]
        if unlabelled and self.mode == "train":
            raise FileNotFoundError(
                f"{len(unlabelled)} training id(s) of split {self.split!r} have {missing_from}, so they have no "
                f"image label: {preview(unlabelled)}"
            )
        if unlabelled:
            logger.warning("%d image(s) of split %s have no label (all-zero label vector)", len(unlabelled), self.split)
        labels = np.zeros((len(ids), self.num_classes - 1), dtype=np.float32)
        for row, i in enumerate(ids):
            for c in known.get(i, ()):
                labels[row, c - 1] = 1.0
        return labels

    def _label_sources(self, ids: list[str]) -> list[Path | None]:
        """Per id, the file its label is derived from: its mask, else its annotation XML, else None."""
        xml_dir = self.layout.annotation_folder(self.root)
        if xml_dir is None:
            return list(self.mask_paths)
        with_xml = scan_ids(xml_dir, ".xml")
        return [
            mask if mask is not None else (xml_dir / f"{i}.xml" if i in with_xml else None)
            for i, mask in zip(ids, self.mask_paths, strict=True)
        ]

    def _derived_labels(self, ids: list[str], cache_dir: Path, workers: int) -> dict[str, list[int]]:
        """Labels from masks (else XML) for every id that has one, reusing cache entries whose source is unchanged."""
        key = {"version": CACHE_VERSION, "dataset": self.layout.name, "root": str(self.root), "split": self.split,
               "num_classes": self.num_classes}  # fmt: skip
        cache = LabelCache(cache_dir / f"{self.layout.name}_{self.split}.json", key)
        known: dict[str, list[int]] = {}
        masks: list[tuple[str, Path, str, list[int]]] = []
        xmls: list[tuple[str, Path, str, list[int]]] = []
        from_xml = 0
        for i, source in zip(ids, self._label_sources(ids), strict=True):
            if source is None:
                continue
            from_xml += source.suffix == ".xml"
            # Stat before reading: a file rewritten in between is stored under its old stamp, so it is read again.
            stamp, relative = file_stamp(source), source.relative_to(self.root).as_posix()
            classes = cache.lookup(i, relative, stamp)
            if classes is not None:
                known[i] = classes
            else:
                (masks if source.suffix == ".png" else xmls).append((i, source, relative, stamp))
        if masks:
            fn = partial(mask_classes, num_classes=self.num_classes)
            desc = f"labels from {self.layout.name} {self.split} masks"
            for (i, _, relative, stamp), classes in zip(
                masks, _map_with_progress(fn, [m for _, m, _, _ in masks], workers, desc), strict=True
            ):
                cache.store(i, relative, stamp, classes)
                known[i] = classes
        names = self.layout.class_names[: self.num_classes]
        for i, source, relative, stamp in xmls:
            known[i] = xml_classes(source, names)
            cache.store(i, relative, stamp, known[i])
        cache.save()
        if from_xml and self.mode == "train":
            # XML names every annotated object, a mask only the segmented ones, so the sources can disagree; a missing
            # SegmentationClassAug silently switches most of train_aug to XML, which must not go unnoticed.
            logger.warning(
                "%d of %d training images of split %s have no mask in %s, so their image labels come from their "
                "annotation XML in %s",
                from_xml, len(ids), self.split, [str(d) for d in self.layout.mask_folders(self.root, self.split)],
                self.layout.annotation_folder(self.root),
            )  # fmt: skip
        return known

    def _check_mask_coverage(self) -> bool:
        """Whether eval items carry masks; a split where only some images have one is a broken download."""
        missing = [i for i, m in zip(self.ids, self.mask_paths, strict=True) if m is None]
        if self.mode == "eval" and 0 < len(missing) < len(self.ids):
            raise FileNotFoundError(
                f"{len(missing)} of {len(self.ids)} images of split {self.split!r} have no mask in "
                f"{[str(d) for d in self.layout.mask_folders(self.root, self.split)]}: {preview(missing)}"
            )
        return not missing

    def check_files(self, mode: str = "header", workers: int = 0) -> list[str]:
        """Check every image and mask of the split and describe each problem found; ``[]`` means all are readable.

        ``mode="header"`` opens each file with PIL without decoding pixels (about a millisecond a file, cheap enough
        for start-up): it finds files that are missing, empty, not images or truncated inside the header, masks that
        are not palette / grey PNGs, and masks whose size differs from their image's. ``mode="full"`` also verifies
        and decodes every pixel, which finds truncated or corrupt image data too, at the cost of reading each file
        fully. Mask values are not checked here: an item checks them when it reads its mask, and labels taken from
        masks check them at construction.

        Args:
            mode: ``header`` or ``full``.
            workers: processes to check with (used from PARALLEL_MIN_FILES files up).

        Returns:
            One readable string per problem, naming the file(s): ``cannot read the header of image file <path> (...):
            <PIL error>``, ``mask <path> has mode 'RGB'; expected ...``, ``mask <path> is WxH (WxH) but its image
            <path> is WxH``. Ordered by split id; an id may contribute several.
        """
        if mode not in CHECK_MODES:
            raise ValueError(f"check_files mode must be one of {CHECK_MODES}, got {mode!r}")
        pairs = list(zip(self.image_paths, self.mask_paths, strict=True))
        fn = partial(pair_problems, decode=mode == "full")
        desc = f"checking {self.layout.name} {self.split} files ({mode})"
        return [problem for found in _map_with_progress(fn, pairs, workers, desc) for problem in found]

    # ------------------------------------------------------------------ items

    def __len__(self) -> int:
        return len(self.ids)

    def _read_mask(self, index: int, image_hw: tuple[int, int]) -> np.ndarray:
        path = self.mask_paths[index]
        mask = read_label_png(path)
        if mask.shape != image_hw:
            raise ValueError(
                f"mask {path} is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image {self.image_paths[index]} "
                f"is {image_hw[0]}x{image_hw[1]}"
            )
        bad = np.unique(mask[(mask >= self.num_classes) & (mask != IGNORE_INDEX)])
        if bad.size:
            raise ValueError(
                f"mask {path} contains value(s) {bad.tolist()}; expected 0..{self.num_classes - 1} or {IGNORE_INDEX}"
            )
        return mask

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """``key`` is an index, or ``(index, seed)`` from ``utils.sampler.InfiniteSampler`` in train mode."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        name = self.ids[index]
        image = read_image(self.image_paths[index])
        label = torch.from_numpy(self.labels[index].copy())
        if self.mode == "train":
            # One generator per item. With a sampler seed the crop depends only on (index, seed), so a resumed run
            # (or any number of workers) reproduces it; without one it is drawn from torch's RNG, which DataLoader
            # worker seeding (and torch.manual_seed in the main process) fixes.
            if seed is None:
                seed = int(torch.randint(0, 2**63 - 1, ()).item())
            rng = np.random.default_rng(seed)
            item: dict[str, Any] = dict(self.transform(image, rng))
            item.update(label=label, name=name)
            return item
        mask = self._read_mask(index, image.shape[:2]) if self.has_masks else None
        item = {"img": to_chw_tensor(image), "label": label, "name": name}
        if mask is not None:
            item["mask"] = torch.from_numpy(mask.astype(np.int64))
        return item


def collate_eval(items: Iterable[dict[str, Any]]) -> dict[str, list[Any]]:
    """Collate variable-size eval items into a dict of lists (one entry per item, same keys as the items)."""
    items = list(items)
    if not items:
        raise ValueError("collate_eval got an empty batch")
    keys = items[0].keys()
    for item in items[1:]:
        if item.keys() != keys:
            raise ValueError(f"eval items differ in keys: {sorted(keys)} vs {sorted(item.keys())}")
    return {k: [item[k] for item in items] for k in keys}
