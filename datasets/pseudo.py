"""Training items of the second stage (SPEC §10): the images of a split with their pseudo labels, cropped together.

Labels come from a folder (``stage2.labels``), one file per image id:

- hard: ``<id>.png``, palette or grey, values 0..C-1 or ``ignore_index`` (what ``tools/make_pseudo_labels.py`` writes
  to ``RUN/pseudo_labels/<split>/``, or any folder of label PNGs);
- soft: ``soft/<id>.npz`` under the folder (or ``<id>.npz`` in it when it has no ``soft/``): ``classes`` int [K] and
  ``prob`` uint8 | float16 [K, H, W], the compact format of ``core/pseudo_labels.py``. The dataset reads them through
  the ``read_soft`` function it is given (the format's owner, in ``core``, is above this layer).

Every label file is checked when the dataset is built, from its header only (the PNG header; the ``.npz`` member
headers and its small ``classes`` array): a missing file, a size other than its image's, a wrong mode or dtype, or
class ids out of range is one error naming the files. The pixels are checked again when a label is loaded.

The crop is the one of the image-only training crop (``datasets.transforms.scale_flip_crop``: random rescale,
horizontal flip, zero-padded random crop), with the same draws in the same order, applied to the label too: nearest
for hard labels, bilinear per class map for soft ones; the padding is ``ignore_index`` (hard) or zero mass (soft),
which the losses skip.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.base import _map_with_progress, pair_problems, scan_ids
from datasets.transforms import apply_geometry, draw_geometry, to_chw_tensor
from utils import dist
from utils.errors import InputError
from utils.io import probe_image, read_image, read_label_png
from utils.text import preview

logger = logging.getLogger(__name__)

TARGETS = ("hard", "soft")
SOFT_DTYPES = (np.dtype(np.uint8), np.dtype(np.float16))
# (classes int [K], prob float32 [K, H, W]) of one soft label file
SoftReader = Callable[[Path], tuple[np.ndarray, np.ndarray]]


# ----------------------------------------------------------------------------------------------------------------------
# The joint crop
# ----------------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------------
# Header checks
# ----------------------------------------------------------------------------------------------------------------------


def _npy_header(archive: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of an ``.npy`` member, from its header (a few hundred bytes decompressed)."""
    with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return tuple(shape), np.dtype(dtype)


def soft_header(path: Path) -> tuple[np.ndarray, tuple[int, ...], np.dtype]:
    """``(classes, prob shape, prob dtype)`` of a soft label file without reading its maps.

    Raises:
        InputError: the file is not an ``.npz`` holding ``classes`` and ``prob`` (naming the file).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if not {"classes.npy", "prob.npy"} <= names:
                found = sorted(n.removesuffix(".npy") for n in names)
                raise InputError(f"soft label {path} must hold 'classes' [K] and 'prob' [K, H, W], it holds {found}")
            shape, dtype = _npy_header(archive, "prob.npy")
            with archive.open("classes.npy") as f:
                classes = np.lib.format.read_array(f, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"cannot read soft label {path} (corrupt or not an .npz file): {err}") from err
    return classes, shape, dtype


def soft_problems(classes: np.ndarray, shape: Sequence[int], path: Path, image_hw: tuple[int, int], num_classes: int,
                  dtype: np.dtype | None = None) -> list[str]:  # fmt: skip
    """What is wrong with a soft label's ``classes`` and ``prob`` (its shape; its stored dtype when given) for an
    image of ``image_hw``."""
    problems = []
    if classes.ndim != 1 or not np.issubdtype(classes.dtype, np.integer):
        return [f"soft label {path}: classes must be an integer [K] array, got {classes.dtype} {classes.shape}"]
    if len(shape) != 3 or shape[0] != len(classes):
        problems.append(f"soft label {path}: prob must be [K={len(classes)}, H, W], got shape {tuple(shape)}")
    elif tuple(shape[1:]) != tuple(image_hw):
        problems.append(f"soft label {path} is {shape[1]}x{shape[2]} (HxW) but its image is "
                        f"{image_hw[0]}x{image_hw[1]}")  # fmt: skip
    if dtype is not None and dtype not in SOFT_DTYPES:
        problems.append(f"soft label {path}: prob must be uint8 or float16, got {dtype}")
    if classes.size and (classes.min() < 0 or classes.max() >= num_classes or len(np.unique(classes)) != classes.size):
        problems.append(f"soft label {path}: class ids {classes.tolist()} must be distinct and in "
                        f"0..{num_classes - 1} (data.num_classes = {num_classes})")  # fmt: skip
    return problems


def _check_soft(pair: tuple[Path, Path], num_classes: int) -> tuple[list[str], int]:
    """(problems, K) of one (image, soft label) pair, from headers."""
    image_path, label_path = pair
    try:
        _, (width, height) = probe_image(image_path)
        classes, shape, dtype = soft_header(label_path)
    except (OSError, InputError) as err:
        return [str(err)], 0
    return soft_problems(classes, shape, label_path, (height, width), num_classes, dtype), len(classes)


def _check_hard(pair: tuple[Path, Path]) -> tuple[list[str], int]:
    return pair_problems(pair, decode=False), 1


# ----------------------------------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------------------------------


class PseudoLabelDataset(Dataset):
    """Images with pseudo labels, as training crops (module docstring). Indexed by ``(index, seed)`` pairs.

    Items: ``img`` uint8 ``[3, S, S]``, ``img_box`` int64 ``[4]``, ``name`` str, and
    hard: ``target`` int64 ``[S, S]`` (``ignore_index`` on padding); soft: ``soft`` float32 ``[M, S, S]`` and
    ``soft_classes`` int64 ``[M]``, the image's classes padded to the split's largest K with (0, zero mass) slots.

    Args:
        ids: the split's image ids.
        image_paths: their images.
        labels_dir: the pseudo-label folder (``stage2.labels``).
        target: ``hard`` | ``soft``.
        num_classes: C, background included.
        crop_size: side S of the crops.
        scale_range: random rescale range.
        flip_p: horizontal flip probability.
        ignore_index: the hard labels' ignore value, also their padding.
        read_soft: reads a soft label file (required for ``soft``).
        workers: processes for the start-up check of many files.
        key: the config key of ``labels_dir``, named in the errors (``irn.relations`` for IRN's relation labels).
        maker: how to make missing label files, for the error that lists them.

    Raises:
        FileNotFoundError: the folder or some label files are missing (named, with their count).
        InputError: label files of the wrong size, mode, dtype or class ids (named, with their count). Collective
            under torchrun: the files are checked in shards, every rank raises the same error.
    """

    def __init__(
        self,
        ids: Sequence[str],
        image_paths: Sequence[Path],
        labels_dir: str | Path,
        target: str,
        num_classes: int,
        crop_size: int,
        scale_range: Sequence[float],
        *,
        flip_p: float = 0.5,
        ignore_index: int = 255,
        read_soft: SoftReader | None = None,
        workers: int = 0,
        key: str = "stage2.labels",
        maker: str = "tools.make_pseudo_labels on that split, pseudo.soft=true for soft labels",
    ) -> None:
        if target not in TARGETS:
            raise InputError(f"stage2.target must be one of {TARGETS}, got {target!r}")
        if target == "soft" and read_soft is None:
            raise ValueError("PseudoLabelDataset: soft targets need a read_soft function")
        self.ids, self.image_paths = list(ids), [Path(p) for p in image_paths]
        self.target, self.num_classes, self.ignore_index = target, int(num_classes), int(ignore_index)
        self.crop_size, self.scale_range, self.flip_p = int(crop_size), tuple(scale_range), float(flip_p)
        self.read_soft, self.key = read_soft, key
        self.folder = self._label_folder(Path(labels_dir).expanduser())
        suffix = ".png" if target == "hard" else ".npz"
        present = scan_ids(self.folder, suffix)
        missing = [name for name in self.ids if name not in present]
        if missing:
            raise FileNotFoundError(
                f"{self.key}: {len(missing)} of the {len(self.ids)} training image(s) have no {target} pseudo label "
                f"{self.folder}/<id>{suffix}: {preview(missing)} (make them with {maker})"
            )
        self.label_paths = [self.folder / f"{name}{suffix}" for name in self.ids]
        self.max_classes = self._check_files(int(workers))

    def _label_folder(self, folder: Path) -> Path:
        if not folder.is_dir():
            raise FileNotFoundError(f"{self.key}: label folder {folder} not found")
        if self.target == "soft" and (folder / "soft").is_dir():
            return folder / "soft"
        return folder

    def _check_files(self, workers: int) -> int:
        """Check every label file's header against its image (sharded over ranks); returns the largest K."""
        pairs = list(zip(self.image_paths, self.label_paths, strict=True))
        check = _check_hard if self.target == "hard" else partial(_check_soft, num_classes=self.num_classes)
        mine = [pairs[i] for i in dist.shard(range(len(pairs)))]
        found = _map_with_progress(check, mine, workers, f"checking {self.target} pseudo labels")
        gathered = dist.all_gather_object(([p for problems, _ in found for p in problems],
                                           max((k for _, k in found), default=0)))  # fmt: skip
        problems = [p for rank_problems, _ in gathered for p in rank_problems]
        if problems:
            raise InputError(f"{self.key}: {len(problems)} problem(s) with the pseudo labels in {self.folder}: "
                             f"{preview(problems, sep='; ')}")  # fmt: skip
        return max(1, max(k for _, k in gathered))

    def __len__(self) -> int:
        return len(self.ids)

    def _load_hard(self, index: int, image_hw: tuple[int, int]) -> np.ndarray:
        path = self.label_paths[index]
        label = read_label_png(path)
        if label.shape != image_hw:
            raise InputError(f"pseudo label {path} is {label.shape[0]}x{label.shape[1]} (HxW) but its image "
                             f"{self.image_paths[index]} is {image_hw[0]}x{image_hw[1]}")  # fmt: skip
        bad = np.unique(label[(label >= self.num_classes) & (label != self.ignore_index)])
        if bad.size:
            raise InputError(f"pseudo label {path} holds value(s) {bad.tolist()}; expected 0..{self.num_classes - 1} "
                             f"or {self.ignore_index}")  # fmt: skip
        return label

    def _load_soft(self, index: int, image_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        path = self.label_paths[index]
        classes, prob = self.read_soft(path)
        problems = soft_problems(np.asarray(classes), prob.shape, path, image_hw, self.num_classes)
        if len(classes) > self.max_classes:
            problems.append(f"soft label {path} now has {len(classes)} classes, more than the {self.max_classes} "
                            "checked at start-up (was it rewritten during training?)")  # fmt: skip
        if problems:
            raise InputError("; ".join(problems))
        return np.asarray(classes, dtype=np.int64), prob.astype(np.float32, copy=False)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is None:  # no sampler seed: drawn from torch's generator (seeded by DataLoader workers)
            seed = int(torch.randint(0, 2**63 - 1, ()).item())
        image = read_image(self.image_paths[index])
        hw = image.shape[:2]
        geometry = draw_geometry(hw, np.random.default_rng(seed), self.crop_size, self.scale_range, self.flip_p)
        crop = apply_geometry(image, geometry, self.crop_size, cv2.INTER_LINEAR, 0)
        item: dict[str, Any] = {"img": to_chw_tensor(crop), "img_box": torch.from_numpy(geometry.img_box),
                                "name": self.ids[index]}  # fmt: skip
        if self.target == "hard":
            label = apply_geometry(self._load_hard(index, hw), geometry, self.crop_size, cv2.INTER_NEAREST_EXACT,
                                   self.ignore_index)  # fmt: skip
            item["target"] = torch.from_numpy(label.astype(np.int64))
            return item
        classes, prob = self._load_soft(index, hw)
        maps = apply_geometry(np.ascontiguousarray(prob.transpose(1, 2, 0)), geometry, self.crop_size,
                              cv2.INTER_LINEAR, 0.0)  # fmt: skip
        padded = np.zeros((self.max_classes, self.crop_size, self.crop_size), dtype=np.float32)
        padded[: len(classes)] = maps.transpose(2, 0, 1)
        slots = np.zeros(self.max_classes, dtype=np.int64)
        slots[: len(classes)] = classes
        item.update(soft=torch.from_numpy(padded), soft_classes=torch.from_numpy(slots))
        return item
