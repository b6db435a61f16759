"""Tests for utils/visualize.py: palette colours, overlays, heatmaps, strips (with caption bands), atomic image writes,
the sweep plot and grouped bars; the validation overlays' captions and TensorBoard tags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils.visualize import (
    TITLE_HEIGHT,
    cam_heatmap,
    colorize,
    grouped_bar_figure,
    overlay,
    plot_sweep,
    save_image,
    side_by_side,
    sweep_figure,
)


def test_colorize_known_palette_colours() -> None:
    label = np.array([[0, 1], [15, 255]], dtype=np.uint8)
    rgb = colorize(label)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    # VOC colour map: background black, aeroplane (1) dark red, person (15) pink, void (255) cream.
    np.testing.assert_array_equal(rgb[0, 0], [0, 0, 0])
    np.testing.assert_array_equal(rgb[0, 1], [128, 0, 0])
    np.testing.assert_array_equal(rgb[1, 0], [192, 128, 128])
    np.testing.assert_array_equal(rgb[1, 1], [224, 224, 192])
    with pytest.raises(ValueError, match=r"0\.\.255"):
        colorize(np.array([[256]]))
    with pytest.raises(TypeError, match="integer"):
        colorize(np.zeros((2, 2), np.float32))


def test_overlay_blends_including_ignore() -> None:
    image = np.full((1, 3, 3), 100, dtype=np.uint8)
    label = np.array([[0, 1, 255]])
    np.testing.assert_array_equal(overlay(image, label, alpha=0.0), image)
    np.testing.assert_array_equal(overlay(image, label, alpha=1.0), colorize(label))
    half = overlay(image, label, alpha=0.5)
    assert half.dtype == np.uint8
    # 0.5·100 + 0.5·colour: black -> 50, (128, 0, 0) -> (114, 50, 50), void (224, 224, 192) -> (162, 162, 146).
    np.testing.assert_array_equal(half[0], [[50, 50, 50], [114, 50, 50], [162, 162, 146]])
    with pytest.raises(ValueError, match="does not match"):
        overlay(image, np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, label, alpha=1.5)


def test_cam_heatmap_is_rgb_jet() -> None:
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    cam = np.array([[0.0, 0.0], [1.0, 1.0]], dtype=np.float32)
    heat = cam_heatmap(image, cam, alpha=1.0)
    assert heat.shape == (2, 2, 3) and heat.dtype == np.uint8
    # Jet runs from dark blue (0) to dark red (1); in RGB order the blue channel dominates at 0, red at 1.
    low, high = heat[0, 0].astype(int), heat[1, 0].astype(int)
    assert low[2] > 100 and low[0] == 0
    assert high[0] > 100 and high[2] == 0
    with pytest.raises(ValueError, match="NaN"):
        cam_heatmap(image, np.full((2, 2), np.nan))


def test_side_by_side_pads_and_gaps() -> None:
    a = np.full((5, 3, 3), 10, dtype=np.uint8)
    b = np.full((3, 4), 20, dtype=np.uint8)  # grey, repeated to RGB
    strip = side_by_side([a, b], gap=2)
    assert strip.shape == (5, 3 + 2 + 4, 3) and strip.dtype == np.uint8
    assert (strip[:, :3] == 10).all()
    assert (strip[:, 3:5] == 255).all()  # gap
    assert (strip[:3, 5:] == 20).all()
    assert (strip[3:, 5:] == 255).all()  # bottom padding of the shorter image
    with pytest.raises(ValueError, match="at least one"):
        side_by_side([])


def test_save_image_round_trip(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    path = tmp_path / "sub" / "x.png"
    save_image(path, array)
    with Image.open(path) as image:
        np.testing.assert_array_equal(np.asarray(image), array)
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no stray temporary file
    with pytest.raises(ValueError, match="suffix"):
        save_image(tmp_path / "x.unknown", array)


def _panels() -> list[np.ndarray]:
    return [np.full((5, 30, 3), 10, dtype=np.uint8), np.full((3, 40), 20, dtype=np.uint8)]


def test_side_by_side_titles_add_a_caption_band_above_unchanged_panels() -> None:
    plain = side_by_side(_panels(), gap=2)
    titled = side_by_side(_panels(), gap=2, titles=["image", "prediction"], title_height=12)
    assert titled.shape == (12 + 5, 30 + 2 + 40, 3) and titled.dtype == np.uint8
    np.testing.assert_array_equal(titled[12:], plain)  # panels, gaps, padding where they were, one band lower
    band = titled[:12]
    assert (band[:, 30:32] == 255).all()  # the gap stays blank in the band too
    for columns in (slice(0, 30), slice(32, 72)):
        assert (band[:, columns] < 128).any()  # each panel's caption is drawn (dark on the white band) ...
        assert (band[:, columns] == 255).mean() > 0.5  # ... as text, not a filled block
    # the default band height, and the plain strip when no titles are given
    assert side_by_side(_panels(), titles=["a", "b"]).shape[0] == TITLE_HEIGHT + 5
    np.testing.assert_array_equal(side_by_side(_panels(), gap=2, titles=None), plain)


def test_side_by_side_captions_stay_in_their_own_columns() -> None:
    # a caption far wider than its panel is shrunk and cut, never drawn over the gap or the neighbour's band
    titled = side_by_side(_panels(), gap=2, titles=["a caption far too long for thirty pixels", ""], title_height=12)
    assert (titled[:12, :30] < 128).any()
    assert (titled[:12, 30:] == 255).all()  # gap and the untitled neighbour's band untouched
    dark = side_by_side(_panels(), gap=2, fill=0, titles=["x", "y"], title_height=12)
    assert (dark[:12, :30] > 128).any() and (dark[:12, 30:32] == 0).all()  # light text on a dark band
    with pytest.raises(ValueError, match="one title per image: 2 images, got 1 titles"):
        side_by_side(_panels(), titles=["only one"])
    with pytest.raises(ValueError, match="got a string"):
        side_by_side(_panels(), titles="ab")
    with pytest.raises(ValueError, match="title_height"):
        side_by_side(_panels(), titles=["a", "b"], title_height=0)


def _legend(figure) -> list[str]:
    return [text.get_text() for text in figure.axes[0].get_legend().get_texts()]


def test_sweep_figure_names_the_sweep_and_marks_configured_and_best() -> None:
    figure = sweep_figure([0.2, 0.3, 0.4], [0.40, 0.55, None], best=0.3, configured=0.2, title="sweep on train, run r")
    axes = figure.axes[0]
    assert axes.get_title() == "sweep on train, run r"
    assert axes.get_xlabel() == "background threshold (normalised CAM score, 0-1)"
    assert axes.get_ylabel() == "mIoU (%)"
    assert _legend(figure) == [
        "CAM mIoU at each threshold",
        "configured cam.bkg_thre = 0.20: mIoU 40.0 %",
        "best = 0.30: mIoU 55.0 % (GT-tuned, oracle)",
    ]
    curve, configured, best = axes.get_lines()
    np.testing.assert_allclose(curve.get_xdata(), [0.2, 0.3, 0.4])
    np.testing.assert_allclose(curve.get_ydata(), [40.0, 55.0, np.nan])  # mIoU in %, None as a gap
    assert list(configured.get_xdata()) == [0.2, 0.2] and list(best.get_xdata()) == [0.3, 0.3]
    # without a configured threshold: no grey line, a generic title; a best off the grid gets no mIoU
    bare = sweep_figure([0.2, 0.3], [0.4, 0.5], best=0.25)
    assert bare.axes[0].get_title() == "CAM background-threshold sweep"
    assert _legend(bare) == ["CAM mIoU at each threshold", "best = 0.25 (GT-tuned, oracle)"]


def test_plot_sweep_writes_png(tmp_path: Path) -> None:
    path = tmp_path / "sweep.png"
    plot_sweep([0.2, 0.3, 0.4], [0.40, 0.55, None], best=0.3, path=path, configured=0.2, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.size == (640, 420)  # 6.4 x 4.2 inches at 100 dpi
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.png"]  # written atomically: no stray temporary file
    with pytest.raises(ValueError, match="equally many"):
        plot_sweep([0.2], [0.1, 0.2], best=0.2, path=path)


def test_grouped_bar_figure_draws_every_value_and_marks_zeros() -> None:
    series = {"CAM (train)": [0.5, 0.0, None], "seg (val)": [0.25, 0.75, 1.0]}
    figure = grouped_bar_figure(["background", "cow", "sofa"], series, "per-class IoU of run r")
    axes = figure.axes[0]
    assert figure.get_suptitle() == "per-class IoU of run r"
    assert axes.get_ylabel() == "IoU" and axes.get_ylim() == (0.0, 1.0)
    assert [t.get_text() for t in axes.get_xticklabels()] == ["background", "cow", "sofa"]
    assert all(t.get_rotation() == 45 for t in axes.get_xticklabels())
    assert _legend(figure) == ["CAM (train)", "seg (val)"]
    bars = [container.patches for container in axes.containers]
    np.testing.assert_allclose([b.get_height() for b in bars[0]], [0.5, 0.0, np.nan])  # None: no bar
    np.testing.assert_allclose([b.get_height() for b in bars[1]], [0.25, 0.75, 1.0])
    # bars of one class sit side by side around its tick, series in legend order
    assert bars[0][1].get_x() < bars[1][1].get_x() and abs(bars[0][1].get_x() + bars[0][1].get_width() - 1.0) < 1e-9
    # an exact zero gets a "0" label over its bar, so a class that nobody predicts is visible
    zeros = [t for t in axes.texts if t.get_text() == "0"]
    assert len(zeros) == 1 and abs(zeros[0].get_position()[0] - (bars[0][1].get_x() + 0.2)) < 1e-9
    with pytest.raises(ValueError, match="2 values for 3 categories"):
        grouped_bar_figure(["a", "b", "c"], {"s": [0.1, 0.2]}, "t")


def test_validation_overlays_are_captioned_and_tagged_with_their_panels(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from engine.task import MSFCTask
    from engine.validate import OVERLAY_PANELS
    from utils.logging import MetricsWriter

    assert OVERLAY_PANELS == ("image", "CAM", "CAM label", "prediction", "ground truth")
    assert MSFCTask.overlay_panels == OVERLAY_PANELS  # what the trainer passes to log_image
    strip = side_by_side([np.zeros((8, 8, 3), np.uint8)] * 5, titles=OVERLAY_PANELS)
    writer = MetricsWriter(tmp_path)
    writer.log_image(7, "val/0", strip, OVERLAY_PANELS)
    writer.log_image(7, "plain", strip)
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["plain", "val/0 (image | CAM | CAM label | prediction | ground truth)"]
    (image,) = events.Images("val/0 (image | CAM | CAM label | prediction | ground truth)")
    assert (image.step, image.width, image.height) == (7, 5 * 8 + 4 * 4, TITLE_HEIGHT + 8)
    assert MetricsWriter.image_tag("val/1", ["a", "b"]) == "val/1 (a | b)" and MetricsWriter.image_tag("t") == "t"


def test_import_leaves_matplotlib_backend_alone() -> None:
    # Importing the module must not pull in pyplot (which selects a global backend).
    code = "import sys, utils.visualize; assert 'matplotlib.pyplot' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
