"""Tests for core/camfile.py: the one writer and reader of the saved CAM files (SPEC §5.1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.camfile import CAM_KEYS, cam_arrays, read_cams, write_cams
from utils.errors import InputError
from utils.io import load_npz, save_npz


def test_round_trip_keeps_the_present_classes_in_float16(tmp_path: Path) -> None:
    cam = torch.rand(5, 3, 4, generator=torch.Generator().manual_seed(0))
    cam_aux = torch.rand(5, 3, 4, generator=torch.Generator().manual_seed(1))
    label = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0])
    write_cams(tmp_path / "x.npz", cam, cam_aux, label)
    raw = load_npz(tmp_path / "x.npz")
    assert sorted(raw) == ["cam", "cam_aux", "classes"]
    assert raw["classes"].dtype == np.int16 and raw["cam"].dtype == raw["cam_aux"].dtype == np.float16
    cams = read_cams(tmp_path / "x.npz", num_classes=6)
    assert cams.classes.tolist() == [2, 5] and cams.classes.dtype == np.int64 and cams.size == (3, 4)
    assert cams.cam.dtype == cams.cam_aux.dtype == np.float32
    np.testing.assert_array_equal(cams.cam, cam[[1, 4]].numpy().astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(cams.maps("cam_aux"), cam_aux[[1, 4]].numpy().astype(np.float16).astype(np.float32))
    assert [cams.maps(key) is getattr(cams, key) for key in CAM_KEYS] == [True, True]
    with pytest.raises(InputError, match="CAM branch must be one of"):
        cams.maps("seg")


def test_image_without_present_class_gets_empty_arrays(tmp_path: Path) -> None:
    cam = torch.rand(20, 5, 6)
    arrays = cam_arrays(cam, cam, torch.zeros(20))
    assert arrays["classes"].shape == (0,) and arrays["cam"].shape == arrays["cam_aux"].shape == (0, 5, 6)
    save_npz(tmp_path / "empty.npz", arrays)
    cams = read_cams(tmp_path / "empty.npz")
    assert cams.classes.size == 0 and cams.cam.shape == (0, 5, 6) and cams.size == (5, 6)


def test_errors_name_the_file_and_the_key(tmp_path: Path) -> None:
    save_npz(tmp_path / "a.npz", {"classes": np.array([1], np.int16), "cam": np.zeros((1, 2, 2), np.float16)})
    with pytest.raises(InputError, match=r"a\.npz lacks key\(s\) \['cam_aux'\].*it holds \['cam', 'classes'\]"):
        read_cams(tmp_path / "a.npz")
    maps = np.zeros((2, 2, 2), np.float16)
    save_npz(tmp_path / "b.npz", {"classes": np.array([1], np.int16), "cam": maps, "cam_aux": maps})
    with pytest.raises(ValueError, match=r"b\.npz: cam must be a float \[K=1, H, W\]"):  # InputError is a ValueError
        read_cams(tmp_path / "b.npz")
    one = np.zeros((1, 2, 2), np.float16)
    save_npz(tmp_path / "c.npz", {"classes": np.array([21], np.int16), "cam": one, "cam_aux": one})
    assert read_cams(tmp_path / "c.npz").classes.tolist() == [21]  # no class count given: any id >= 1
    with pytest.raises(InputError, match=r"c\.npz: classes must be distinct foreground ids in 1\.\.20"):
        read_cams(tmp_path / "c.npz", num_classes=21)
    save_npz(tmp_path / "d.npz", {"classes": np.array([0], np.int16), "cam": one, "cam_aux": one})
    with pytest.raises(InputError, match=r"d\.npz: classes must be distinct foreground ids >= 1, got \[0\]"):
        read_cams(tmp_path / "d.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        read_cams(tmp_path / "missing.npz")
