"""Tests for utils/visualize.py: palette colours, overlays, heatmaps, strips, atomic image writes, sweep plot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils.visualize import cam_heatmap, colorize, overlay, plot_sweep, save_image, side_by_side


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


def test_plot_sweep_writes_png(tmp_path: Path) -> None:
    path = tmp_path / "sweep.png"
    plot_sweep([0.2, 0.3, 0.4], [0.40, 0.55, None], best=0.3, path=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.size == (500, 350)  # 5 x 3.5 inches at 100 dpi
    with pytest.raises(ValueError, match="equally many"):
        plot_sweep([0.2], [0.1, 0.2], best=0.2, path=path)


def test_import_leaves_matplotlib_backend_alone() -> None:
    # Importing the module must not pull in pyplot (which selects a global backend).
    code = "import sys, utils.visualize; assert 'matplotlib.pyplot' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
