"""Tests for core/camfile.py: the one writer and reader of the saved CAM files (SPEC §5.1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.camfile import CAM_KEYS, FILE_DTYPES, cam_arrays, dequantise, quantise, read_cams, write_cams
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
    with pytest.raises(ValueError, match=r"b\.npz: cam must be a float or uint8 \[K=1, H, W\]"):  # an InputError
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
    ints = np.zeros((1, 2, 2), np.int32)  # an integer type other than uint8 is no stored CAM
    save_npz(tmp_path / "e.npz", {"classes": np.array([1], np.int16), "cam": ints, "cam_aux": ints})
    with pytest.raises(InputError, match=r"e\.npz: cam must be a float or uint8 \[K=1, H, W\] array, got int32"):
        read_cams(tmp_path / "e.npz")


def test_uint8_files_store_round_to_nearest_and_read_back_within_half_a_step(tmp_path: Path) -> None:
    cam = torch.rand(4, 6, 7, generator=torch.Generator().manual_seed(0))
    cam[0, 0, :5] = torch.tensor([0.0, 1.0, 0.5 / 255, 1.5 / 255, 254.4 / 255])  # ends and ties of the rounding
    cam_aux = torch.rand(4, 6, 7, generator=torch.Generator().manual_seed(1))
    label = torch.tensor([1.0, 0.0, 1.0, 1.0])
    write_cams(tmp_path / "u8.npz", cam, cam_aux, label, dtype="uint8")
    raw = load_npz(tmp_path / "u8.npz")
    assert raw["cam"].dtype == raw["cam_aux"].dtype == np.uint8 and raw["classes"].tolist() == [1, 3, 4]
    # round to nearest (numpy's rint: half to even), 0 -> 0 and 1 -> 255
    assert raw["cam"][0, 0, :5].tolist() == [0, 255, 0, 2, 254]
    np.testing.assert_array_equal(raw["cam"], np.rint(cam[[0, 2, 3]].numpy() * 255).astype(np.uint8))
    cams = read_cams(tmp_path / "u8.npz", num_classes=5)
    assert cams.cam.dtype == cams.cam_aux.dtype == np.float32 and cams.size == (6, 7)
    np.testing.assert_array_equal(cams.cam, raw["cam"].astype(np.float32) / np.float32(255))
    assert cams.cam[0, 0, 1] == 1.0 and cams.cam[0, 0, 0] == 0.0  # the ends are exact
    for saved, original in ((cams.cam, cam), (cams.cam_aux, cam_aux)):
        assert np.abs(saved - original[[0, 2, 3]].numpy()).max() <= 0.5 / 255 + 1e-7


def test_float16_and_uint8_files_read_the_same_way(tmp_path: Path) -> None:
    """The reader decides by the stored dtype: a folder of old float16 files and one of uint8 files both work."""
    cam = torch.rand(3, 5, 5, generator=torch.Generator().manual_seed(2))
    label = torch.tensor([0.0, 1.0, 1.0])
    write_cams(tmp_path / "f16.npz", cam, cam, label)  # the default: float16, as before cam.file_dtype existed
    write_cams(tmp_path / "u8.npz", cam, cam, label, dtype="uint8")
    f16, u8 = read_cams(tmp_path / "f16.npz"), read_cams(tmp_path / "u8.npz")
    assert f16.classes.tolist() == u8.classes.tolist() == [2, 3]
    assert np.abs(f16.cam - u8.cam).max() <= 0.5 / 255 + 2.0**-11
    assert quantise(np.array([0.25, 0.75], np.float32), "float16").dtype == np.float16
    assert dequantise(np.array([0, 51, 255], np.uint8)).tolist() == pytest.approx([0.0, 0.2, 1.0])
    with pytest.raises(InputError, match=r"cam.file_dtype\) must be one of \('float16', 'uint8'\), got 'int8'"):
        cam_arrays(cam, cam, label, dtype="int8")
    assert FILE_DTYPES[0] == "float16"  # the default of cam.file_dtype and of the writer
