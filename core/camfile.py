"""The CAM file of one image (SPEC §5.1): the one writer and the one reader of ``RUN/cams/<split>/<id>.npz``.

Content (written by ``tools/make_cam.py``, read by ``tools/make_pseudo_labels.py`` and ``tools/evaluate.py``):

- ``classes`` int16 [K]: the image's present class ids (1..C_fg, from its image labels), K >= 0;
- ``cam`` / ``cam_aux`` [K, H, W] in [0, 1]: the two branches' multi-scale CAMs of those classes only, stored as
  ``cam.file_dtype`` says: ``float16`` (the default; 11 significant bits) or ``uint8`` (``round(v·255)``, read back
  as ``q / 255``: an error of at most 1/510 ≈ 0.002; 30 % of the float16 file's bytes at COCO size, 55 % at the
  demo's; it moves CAM and pseudo-label mIoU by < 0.1 point on the demo: docs/coco_eval.md).

The reader tells the two apart by the stored dtype, so folders of either kind (and the float16 files written before
``cam.file_dtype`` existed) read the same way; one folder holds one kind (``settings.json`` records a non-default one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.errors import InputError
from utils.io import load_npz, save_npz

# The saved CAM branches (``pseudo.cam_key``, ``tools.evaluate --cam-key``).
CAM_KEYS = ("cam", "cam_aux")
FILE_KEYS = ("classes", *CAM_KEYS)
# How the maps are stored (``cam.file_dtype``); the first is the default.
FILE_DTYPES = ("float16", "uint8")
# uint8 maps store round(v · 255); reading divides by the same number.
UINT8_SCALE = 255.0


@dataclass(frozen=True)
class CamFile:
    """One image's saved CAMs, as read back.

    Attributes:
        classes: int64 [K], distinct class ids >= 1.
        cam: float32 [K, H, W] (the stored float16 values exactly, or uint8 ``q / 255``).
        cam_aux: float32 [K, H, W].
    """

    classes: np.ndarray
    cam: np.ndarray
    cam_aux: np.ndarray

    def maps(self, key: str) -> np.ndarray:
        """The branch ``key`` (one of :data:`CAM_KEYS`): float32 [K, H, W]."""
        if key not in CAM_KEYS:
            raise InputError(f"CAM branch must be one of {CAM_KEYS}, got {key!r}")
        return self.cam if key == "cam" else self.cam_aux

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the maps."""
        return int(self.cam.shape[1]), int(self.cam.shape[2])


def quantise(maps: np.ndarray, dtype: str) -> np.ndarray:
    """Maps in [0, 1] as stored with ``dtype`` (:data:`FILE_DTYPES`): float16, or uint8 ``round(clip(v, 0, 1)·255)``."""
    if dtype not in FILE_DTYPES:
        raise InputError(f"CAM file dtype (cam.file_dtype) must be one of {FILE_DTYPES}, got {dtype!r}")
    if dtype == "float16":
        return maps.astype(np.float16)
    return np.rint(np.clip(maps, 0.0, 1.0) * UINT8_SCALE).astype(np.uint8)


def dequantise(maps: np.ndarray) -> np.ndarray:
    """Stored maps (any float dtype, or uint8 ``q``) as float32 values in [0, 1] (``q / 255`` for uint8)."""
    if maps.dtype == np.uint8:
        return maps.astype(np.float32) / np.float32(UINT8_SCALE)
    return maps.astype(np.float32)


def cam_arrays(
    cam: torch.Tensor, cam_aux: torch.Tensor, label: torch.Tensor, dtype: str = "float16"
) -> dict[str, np.ndarray]:
    """The file content of one image: its present classes and their maps.

    Args:
        cam: [C_fg, H, W] CAM in [0, 1].
        cam_aux: [C_fg, H, W] auxiliary CAM in [0, 1].
        label: [C_fg] multi-hot image label.
        dtype: how the maps are stored (:data:`FILE_DTYPES`, ``cam.file_dtype``).

    Returns:
        ``{"classes": int16 [K], "cam": [K, H, W], "cam_aux": [K, H, W]}``, the maps float16 or uint8.
    """
    present = torch.nonzero(label > 0.5).flatten().to(cam.device)
    return {
        "classes": (present + 1).cpu().numpy().astype(np.int16),
        "cam": quantise(cam[present].float().cpu().numpy(), dtype),
        "cam_aux": quantise(cam_aux[present].float().cpu().numpy(), dtype),
    }


def write_cams(
    path: str | Path, cam: torch.Tensor, cam_aux: torch.Tensor, label: torch.Tensor, dtype: str = "float16"
) -> None:
    """Atomically write the CAM file of one image (:func:`cam_arrays`: [C_fg, H, W] maps, [C_fg] label)."""
    save_npz(path, cam_arrays(cam, cam_aux, label, dtype))


def read_cams(path: str | Path, num_classes: int | None = None) -> CamFile:
    """Read one CAM file written by :func:`write_cams` (float16 or uint8 maps: both come back as float32 in [0, 1]).

    Args:
        path: ``RUN/cams/<split>/<id>.npz``.
        num_classes: C (``data.num_classes``, background included); when given, class ids must be below it.

    Returns:
        A :class:`CamFile`; K may be 0.

    Raises:
        FileNotFoundError / BadFileError: the file is missing or not a readable ``.npz`` (the message names it).
        InputError (a ValueError): a key is missing, or the arrays disagree in shape or hold invalid class ids; the
            message names the file and the key.
    """
    data = load_npz(path)
    missing = [key for key in FILE_KEYS if key not in data]
    if missing:
        raise InputError(
            f"CAM file {path} lacks key(s) {missing}; expected classes [K], cam [K, H, W], cam_aux [K, H, W] "
            f"(written by tools.make_cam), it holds {sorted(data)}"
        )
    classes, cam, cam_aux = data["classes"], data["cam"], data["cam_aux"]
    if classes.ndim != 1 or not np.issubdtype(classes.dtype, np.integer):
        raise InputError(f"CAM file {path}: classes must be an integer [K] array, got {classes.dtype} {classes.shape}")
    k = classes.shape[0]
    for name, maps in (("cam", cam), ("cam_aux", cam_aux)):
        stored = np.issubdtype(maps.dtype, np.floating) or maps.dtype == np.uint8
        if maps.ndim != 3 or maps.shape[0] != k or not stored:
            raise InputError(
                f"CAM file {path}: {name} must be a float or uint8 [K={k}, H, W] array, got {maps.dtype} {maps.shape}"
            )
    if cam.shape != cam_aux.shape:
        raise InputError(f"CAM file {path}: cam {cam.shape} and cam_aux {cam_aux.shape} differ in shape")
    too_big = num_classes is not None and k and classes.max() >= num_classes
    if k and (classes.min() < 1 or too_big or len(np.unique(classes)) != k):
        ids = "ids >= 1" if num_classes is None else f"ids in 1..{num_classes - 1} (data.num_classes = {num_classes})"
        raise InputError(f"CAM file {path}: classes must be distinct foreground {ids}, got {classes.tolist()}")
    return CamFile(classes.astype(np.int64), dequantise(cam), dequantise(cam_aux))
