"""The CAM file of one image (SPEC §5.1): the one writer and the one reader of ``RUN/cams/<split>/<id>.npz``.

Content (written by ``tools/make_cam.py``, read by ``tools/make_pseudo_labels.py`` and ``tools/evaluate.py``):

- ``classes`` int16 [K]: the image's present class ids (1..C_fg, from its image labels), K >= 0;
- ``cam`` / ``cam_aux`` float16 [K, H, W] in [0, 1]: the two branches' multi-scale CAMs of those classes only.
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


@dataclass(frozen=True)
class CamFile:
    """One image's saved CAMs, as read back.

    Attributes:
        classes: int64 [K], distinct class ids >= 1.
        cam: float32 [K, H, W] (the stored float16 values, exactly).
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


def cam_arrays(cam: torch.Tensor, cam_aux: torch.Tensor, label: torch.Tensor) -> dict[str, np.ndarray]:
    """The file content of one image: its present classes and their float16 maps.

    Args:
        cam: [C_fg, H, W] CAM in [0, 1].
        cam_aux: [C_fg, H, W] auxiliary CAM in [0, 1].
        label: [C_fg] multi-hot image label.

    Returns:
        ``{"classes": int16 [K], "cam": float16 [K, H, W], "cam_aux": float16 [K, H, W]}``.
    """
    present = torch.nonzero(label > 0.5).flatten().to(cam.device)
    return {
        "classes": (present + 1).cpu().numpy().astype(np.int16),
        "cam": cam[present].float().cpu().numpy().astype(np.float16),
        "cam_aux": cam_aux[present].float().cpu().numpy().astype(np.float16),
    }


def write_cams(path: str | Path, cam: torch.Tensor, cam_aux: torch.Tensor, label: torch.Tensor) -> None:
    """Atomically write the CAM file of one image (:func:`cam_arrays`: [C_fg, H, W] maps, [C_fg] label)."""
    save_npz(path, cam_arrays(cam, cam_aux, label))


def read_cams(path: str | Path, num_classes: int | None = None) -> CamFile:
    """Read one CAM file written by :func:`write_cams`.

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
        if maps.ndim != 3 or maps.shape[0] != k or not np.issubdtype(maps.dtype, np.floating):
            raise InputError(
                f"CAM file {path}: {name} must be a float [K={k}, H, W] array, got {maps.dtype} {maps.shape}"
            )
    if cam.shape != cam_aux.shape:
        raise InputError(f"CAM file {path}: cam {cam.shape} and cam_aux {cam_aux.shape} differ in shape")
    too_big = num_classes is not None and k and classes.max() >= num_classes
    if k and (classes.min() < 1 or too_big or len(np.unique(classes)) != k):
        ids = "ids >= 1" if num_classes is None else f"ids in 1..{num_classes - 1} (data.num_classes = {num_classes})"
        raise InputError(f"CAM file {path}: classes must be distinct foreground {ids}, got {classes.tolist()}")
    return CamFile(classes.astype(np.int64), cam.astype(np.float32), cam_aux.astype(np.float32))
