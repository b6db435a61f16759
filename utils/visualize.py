"""Visualisation helpers: palette colouring, overlays, CAM heatmaps, captioned image strips, the threshold-sweep plot
and grouped bar charts.

Images are uint8 RGB ``[H, W, 3]`` numpy arrays throughout. Matplotlib is used through ``Figure`` +
``FigureCanvasAgg`` only, so importing this module never changes the global backend (``matplotlib.use`` /
``pyplot`` would).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence

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


TITLE_HEIGHT = 20
"""Default height in pixels of the caption band that :func:`side_by_side` adds above the panels when given titles."""
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_MIN_FONT_SCALE = 0.3
_TITLE_MARGIN = 3  # pixels left of a caption and above / below its glyphs


def _caption(text: str, width: int, height: int, fill: int) -> np.ndarray:
    """A ``[height, width, 3]`` band of grey ``fill`` with ``text`` left-aligned and vertically centred in it.

    The font scale fills the band's height, shrinks (down to 0.3) until the text fits the width, and what still does
    not fit is cut and ends in "..". Hershey fonts are ASCII only; other characters become "?". Dark text on a light
    band, light text on a dark one.
    """
    band = np.full((height, width, 3), fill, dtype=np.uint8)
    text = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)
    if not text or width <= 2 * _TITLE_MARGIN:
        return band
    room = max(1, height - 2 * _TITLE_MARGIN)
    (_, cap), descent = cv2.getTextSize("Ag", _FONT, 1.0, 1)
    scale = room / (cap + descent)  # capitals and descenders both inside the band
    room_x = width - 2 * _TITLE_MARGIN
    while scale > _MIN_FONT_SCALE and cv2.getTextSize(text, _FONT, scale, 1)[0][0] > room_x:
        scale = max(_MIN_FONT_SCALE, 0.95 * scale)
    shown = text
    while len(shown) > 1 and cv2.getTextSize(shown, _FONT, scale, 1)[0][0] > room_x:
        shown = shown[:-3] + ".." if len(shown) > 3 else shown[:-1]
    (_, th), below = cv2.getTextSize(shown, _FONT, scale, 1)
    colour = (0, 0, 0) if fill >= 128 else (255, 255, 255)
    baseline_y = (height + th - below) // 2  # the glyph box [baseline - th, baseline + below] centred
    cv2.putText(band, shown, (_TITLE_MARGIN, baseline_y), _FONT, scale, colour, 1, cv2.LINE_AA)
    return band


def side_by_side(
    images: Sequence[np.ndarray],
    gap: int = 4,
    fill: int = 255,
    titles: Sequence[str] | None = None,
    title_height: int = TITLE_HEIGHT,
) -> np.ndarray:
    """Lay images out left to right, padding each at the bottom to the tallest height.

    With ``titles``, a caption band of ``title_height`` rows (grey ``fill``) goes on top and names each panel above
    its own columns (text never crosses into a neighbour's columns or the gaps); the panels sit below it exactly where
    they sit without titles. Without titles the output is the plain strip.

    Args:
        images: uint8 ``[H_i, W_i, 3]`` or ``[H_i, W_i]`` (grey, repeated to RGB).
        gap: columns of ``fill`` between neighbours.
        fill: grey level of the padding, gaps and caption band.
        titles: one caption per image (e.g. ``("image", "prediction", "ground truth")``), or None.
        title_height: height of the caption band in pixels (with titles only).

    Returns:
        uint8 ``[max H_i (+ title_height), ΣW_i + gap·(n−1), 3]``.
    """
    if len(images) == 0:
        raise ValueError("side_by_side needs at least one image")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    if titles is not None:
        if isinstance(titles, str) or len(titles) != len(images):
            count = "a string" if isinstance(titles, str) else f"{len(titles)} titles"
            raise ValueError(f"side_by_side needs one title per image: {len(images)} images, got {count}")
        if title_height < 1:
            raise ValueError(f"title_height must be >= 1, got {title_height}")
    rgb = [np.repeat(im[:, :, None], 3, axis=2) if im.ndim == 2 else im for im in images]
    for i, im in enumerate(rgb):
        _check_image(im, f"images[{i}]")
    top = 0 if titles is None else int(title_height)
    height = max(im.shape[0] for im in rgb) + top
    width = sum(im.shape[1] for im in rgb) + gap * (len(rgb) - 1)
    canvas = np.full((height, width, 3), fill, dtype=np.uint8)
    x = 0
    for i, im in enumerate(rgb):
        if titles is not None:
            canvas[:top, x : x + im.shape[1]] = _caption(str(titles[i]), im.shape[1], top, fill)
        canvas[top : top + im.shape[0], x : x + im.shape[1]] = im
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


def sweep_figure(
    thresholds: Sequence[float],
    mious: Sequence[float | None],
    best: float,
    configured: float | None = None,
    title: str | None = None,
) -> Figure:
    """The threshold-sweep figure of :func:`plot_sweep` (a ``Figure`` on an Agg canvas, for saving or inspection).

    Draws mIoU (%) against the background threshold, a dashed red line at ``best`` (the sweep's best, chosen on the
    ground truth it is scored against, so labelled as an oracle) and, when given, a dotted grey line at
    ``configured`` (the ``cam.bkg_thre`` the protocol reports), each with its mIoU in the legend.
    """
    if len(thresholds) != len(mious) or len(thresholds) == 0:
        raise ValueError(f"plot_sweep needs equally many thresholds and mIoUs, got {len(thresholds)} / {len(mious)}")
    xs = np.asarray(thresholds, dtype=np.float64)
    ys = np.array([np.nan if m is None else 100.0 * m for m in mious], dtype=np.float64)

    def at(threshold: float) -> str:
        nearest = int(np.argmin(np.abs(xs - threshold)))
        close = abs(xs[nearest] - threshold) <= 1e-6 and np.isfinite(ys[nearest])
        return f": mIoU {ys[nearest]:.1f} %" if close else ""

    figure = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(figure)  # attaches itself as figure.canvas; no global backend is touched
    axes = figure.add_subplot(1, 1, 1)
    axes.plot(xs, ys, marker="o", markersize=3, color="tab:blue", label="CAM mIoU at each threshold")
    if configured is not None:
        axes.axvline(configured, color="0.35", linestyle=":", linewidth=1.8,
                     label=f"configured cam.bkg_thre = {configured:.2f}{at(configured)}")  # fmt: skip
    axes.axvline(best, color="tab:red", linestyle="--",
                 label=f"best = {best:.2f}{at(best)} (GT-tuned, oracle)")  # fmt: skip
    axes.set_title(title or "CAM background-threshold sweep", fontsize=10)
    axes.set_xlabel("background threshold (normalised CAM score, 0-1)")
    axes.set_ylabel("mIoU (%)")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize=8, framealpha=0.9)
    figure.tight_layout()
    return figure


def plot_sweep(
    thresholds: Sequence[float],
    mious: Sequence[float | None],
    best: float,
    path: str | os.PathLike,
    configured: float | None = None,
    title: str | None = None,
) -> None:
    """Plot mIoU against the background threshold, mark the best and the configured one; writes a PNG atomically.

    Args:
        thresholds: T background thresholds.
        mious: T mIoU values as fractions in [0, 1] (None is drawn as a gap).
        best: the sweep's best threshold (dashed red line).
        path: output ``.png`` file.
        configured: the configured ``cam.bkg_thre`` (dotted grey line), or None.
        title: the plot's title (say what was swept, on which split, for which run); None = a generic one.
    """
    save_figure(sweep_figure(thresholds, mious, best, configured, title), path)


def grouped_bar_figure(
    categories: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    title: str,
    ylabel: str = "IoU",
    ylim: tuple[float, float] = (0.0, 1.0),
) -> Figure:
    """Grouped bars, one group per category and one bar per series (a ``Figure`` on an Agg canvas).

    A None value draws no bar; an exact 0 gets a small "0" above the axis so that a class nobody predicts stays
    visible. Category names run rotated under the groups; the legend sits above the axes, under the title.

    Args:
        categories: N group names (x axis).
        series: label -> N values (in legend order).
        title: the figure's title.
        ylabel: the y axis label.
        ylim: the y range.
    """
    if not series:
        raise ValueError("grouped_bar_figure needs at least one series")
    for label, values in series.items():
        if len(values) != len(categories):
            raise ValueError(f"series {label!r} has {len(values)} values for {len(categories)} categories")
    count = len(series)
    width = 0.8 / count
    centres = np.arange(len(categories), dtype=np.float64)
    inches = max(9.0, 0.55 * len(categories) + 1.5)
    figure = Figure(figsize=(inches, 5.0), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    colours = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    for index, (label, values) in enumerate(series.items()):
        xs = centres + (index - (count - 1) / 2) * width
        heights = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
        colour = colours[index % len(colours)]
        axes.bar(xs, heights, width=width, color=colour, label=label)
        for x, value in zip(xs, heights, strict=True):
            if value == 0.0:
                axes.text(x, ylim[0] + 0.01 * (ylim[1] - ylim[0]), "0", ha="center", va="bottom", fontsize=6,
                          color=colour, fontweight="bold")  # fmt: skip
    axes.set_xticks(centres)
    axes.set_xticklabels(list(categories), rotation=45, ha="right", rotation_mode="anchor")
    axes.set_xlim(-0.6, len(categories) - 0.4)
    axes.set_ylim(*ylim)
    axes.set_ylabel(ylabel)
    axes.grid(True, axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(count, 4), fontsize=8, frameon=False)
    # ~6.5 px per character at 10 pt: lines longer than the figure are wrapped rather than cut off
    per_line = max(20, int(inches * figure.dpi / 6.5))
    figure.suptitle("\n".join(textwrap.fill(line, per_line) for line in title.split("\n")), fontsize=10)
    return figure


def save_figure(figure: Figure, path: str | os.PathLike) -> None:
    """Atomically write a matplotlib ``Figure`` as PNG."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
