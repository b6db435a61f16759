"""Visualisation helpers: palette colouring, overlays, CAM heatmaps, image strips and the threshold-sweep plot.

Images are uint8 RGB ``[H, W, 3]`` numpy arrays throughout. Matplotlib is used through ``Figure`` +
``FigureCanvasAgg`` only, so importing this module never changes the global backend (``matplotlib.use`` /
``pyplot`` would).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from utils.io import atomic_path, voc_palette

_PALETTE = voc_palette()


def _check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must be a [H, W, 3] numpy array, got {getattr(image, 'shape', type(image))}")
    if image.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8 RGB, got dtype {image.dtype}")
    return image


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")


def _blend(image: np.ndarray, colour: np.ndarray, alpha: float) -> np.ndarray:
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colour.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def colorize(label: np.ndarray) -> np.ndarray:
    """Colour a label map with the VOC palette (255 = ignore gets the void colour (224, 224, 192)).

    Args:
        label: integer ``[H, W]`` with values 0..255.

    Returns:
        uint8 ``[H, W, 3]``.
    """
    if not isinstance(label, np.ndarray) or label.ndim != 2:
        raise ValueError(f"label must be a [H, W] numpy array, got {getattr(label, 'shape', type(label))}")
    if not np.issubdtype(label.dtype, np.integer):
        raise TypeError(f"label must hold integer class ids, got dtype {label.dtype}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"label values must lie in 0..255, got {label.min()}..{label.max()}")
    return _PALETTE[label.astype(np.intp)]


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the palette colours of ``label`` over ``image``.

    Ignored pixels (255) are blended with the void colour like any class, so the ignore band of a pseudo label
    (SPEC §2.4, §2.5) stays visible instead of looking like a correct unlabelled image region.

    Args:
        image: uint8 ``[H, W, 3]``.
        label: integer ``[H, W]``, 0..255.
        alpha: weight of the label colour, in [0, 1].

    Returns:
        uint8 ``[H, W, 3]``.
    """
    _check_image(image)
    _check_alpha(alpha)
    if label.shape != image.shape[:2]:
        raise ValueError(f"label shape {label.shape} does not match the image {image.shape[:2]}")
    return _blend(image, colorize(label), alpha)


def cam_heatmap(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Jet-coloured CAM blended over the image.

    Args:
        image: uint8 ``[H, W, 3]``.
        cam: float ``[H, W]`` in [0, 1] (values outside are clipped).
        alpha: weight of the heatmap, in [0, 1].

    Returns:
        uint8 ``[H, W, 3]`` RGB.
    """
    _check_image(image)
    _check_alpha(alpha)
    if not isinstance(cam, np.ndarray) or cam.shape != image.shape[:2]:
        raise ValueError(f"cam must be a [H, W] array matching the image {image.shape[:2]}, got {cam.shape}")
    if not np.isfinite(cam).all():
        raise ValueError("cam contains NaN or inf")
    levels = np.rint(np.clip(cam.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    # OpenCV colour maps come out BGR; everything here is RGB.
    heat = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return _blend(image, heat, alpha)


def side_by_side(images: Sequence[np.ndarray], gap: int = 4, fill: int = 255) -> np.ndarray:
    """Lay images out left to right, padding each at the bottom to the tallest height.

    Args:
        images: uint8 ``[H_i, W_i, 3]`` or ``[H_i, W_i]`` (grey, repeated to RGB).
        gap: columns of ``fill`` between neighbours.
        fill: grey level of the padding and gaps.

    Returns:
        uint8 ``[max H_i, ΣW_i + gap·(n−1), 3]``.
    """
    if len(images) == 0:
        raise ValueError("side_by_side needs at least one image")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    rgb = [np.repeat(im[:, :, None], 3, axis=2) if im.ndim == 2 else im for im in images]
    for i, im in enumerate(rgb):
        _check_image(im, f"images[{i}]")
    height = max(im.shape[0] for im in rgb)
    width = sum(im.shape[1] for im in rgb) + gap * (len(rgb) - 1)
    canvas = np.full((height, width, 3), fill, dtype=np.uint8)
    x = 0
    for im in rgb:
        canvas[: im.shape[0], x : x + im.shape[1]] = im
        x += im.shape[1] + gap
    return canvas


def save_image(path: str | os.PathLike, array: np.ndarray) -> None:
    """Atomically write a uint8 ``[H, W, 3]`` or ``[H, W]`` image; the format follows the file suffix."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    image_format = Image.registered_extensions().get(suffix)
    if image_format is None:
        raise ValueError(f"save_image: cannot tell the image format from the suffix of {os.fspath(path)!r}")
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(
            f"save_image: expected uint8 [H, W, 3] or [H, W] for {os.fspath(path)!r}, got {array.dtype} {array.shape}"
        )
    with atomic_path(path) as tmp:
        # The temporary name ends in .tmp, so the format is passed explicitly.
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format=image_format)


def plot_sweep(
    thresholds: Sequence[float], mious: Sequence[float | None], best: float, path: str | os.PathLike
) -> None:
    """Plot mIoU against the background threshold and mark the best one; writes a PNG atomically.

    Args:
        thresholds: T background thresholds.
        mious: T mIoU values as fractions in [0, 1] (None is drawn as a gap).
        best: the chosen threshold, marked with a vertical line.
        path: output ``.png`` file.
    """
    if len(thresholds) != len(mious) or len(thresholds) == 0:
        raise ValueError(f"plot_sweep needs equally many thresholds and mIoUs, got {len(thresholds)} / {len(mious)}")
    xs = np.asarray(thresholds, dtype=np.float64)
    ys = np.array([np.nan if m is None else 100.0 * m for m in mious], dtype=np.float64)
    figure = Figure(figsize=(5.0, 3.5), dpi=100)
    FigureCanvasAgg(figure)  # attaches itself as figure.canvas; no global backend is touched
    axes = figure.add_subplot(1, 1, 1)
    axes.plot(xs, ys, marker="o", markersize=3)
    axes.axvline(best, color="tab:red", linestyle="--")
    nearest = int(np.argmin(np.abs(xs - best)))
    if np.isfinite(ys[nearest]):
        label = f"{best:.2f}: {ys[nearest]:.2f}"
        axes.annotate(label, (xs[nearest], ys[nearest]), xytext=(5, -12), textcoords="offset points")
    axes.set_xlabel("background threshold")
    axes.set_ylabel("mIoU (%)")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
