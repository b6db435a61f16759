"""utils/io.py: atomic writes (mode, replacement) and image probing (header vs full decode)."""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils.io import atomic_path, atomic_write_json, atomic_write_text, probe_image, save_label_png


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process umask after a test that sets it."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield
    os.umask(previous)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_mode_a_plain_open_gives(tmp_path: Path, umask: None, mask: int, expected: int) -> None:
    os.umask(mask)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert mode_of(plain) == expected  # the reference: what open() gives under this umask
    atomic_write_text(tmp_path / "a.txt", "hello")
    atomic_write_json(tmp_path / "b.json", {"k": 1})
    save_label_png(tmp_path / "c.png", np.zeros((3, 4), np.uint8))
    with atomic_path(tmp_path / "d.bin") as tmp:
        assert mode_of(tmp) == expected  # callers such as torch.save write to the temporary path itself
        tmp.write_bytes(b"\x00")
    for name in ("a.txt", "b.json", "c.png", "d.bin"):
        assert mode_of(tmp_path / name) == expected, name
    atomic_write_text(tmp_path / "a.txt", "again")  # replacing an existing file
    assert mode_of(tmp_path / "a.txt") == expected and (tmp_path / "a.txt").read_text() == "again"


def test_atomic_path_keeps_the_old_file_when_the_block_fails(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temporary file left behind


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_probe_image_header_and_full_decode(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    jpeg = encoded(Image.fromarray(pixels), "JPEG")
    png = encoded(Image.fromarray(pixels[..., 0], mode="L"), "PNG")
    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg)
    assert probe_image(good) == ("RGB", (40, 30)) and probe_image(good, decode=True) == ("RGB", (40, 30))
    half = tmp_path / "half.jpg"
    half.write_bytes(jpeg[: len(jpeg) // 2])
    assert probe_image(half) == ("RGB", (40, 30))  # the header is intact
    with pytest.raises(OSError, match=f"cannot decode image file {half}"):
        probe_image(half, decode=True)
    no_end = tmp_path / "no_end.png"
    no_end.write_bytes(png[:-12])  # the IEND chunk cut off: pixels decode, verify() finds the truncation
    assert probe_image(no_end) == ("L", (40, 30))
    with pytest.raises(OSError, match=str(no_end)):
        probe_image(no_end, decode=True)
    stub = tmp_path / "stub.jpg"
    stub.write_bytes(jpeg[:20])
    with pytest.raises(OSError, match=f"cannot read the header of image file {stub}"):
        probe_image(stub)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing.png")):
        probe_image(tmp_path / "missing.png")
