"""Small file helpers shared by every tool: atomic writes, the VOC palette, label PNGs, image reads and checks."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from utils.errors import BadFileError

# Attempts at a fresh temporary name before giving up; with 64 random bits a second attempt is already unheard of.
TEMP_NAME_TRIES = 100


def _create_temp(folder: Path, name: str) -> Path:
    """Create a new, empty ``.<name>.<random>.tmp`` file in ``folder`` with the mode a plain ``open()`` gives it.

    ``tempfile.mkstemp`` creates its files 0600 whatever the umask, which would make every atomically written file
    (checkpoints, configs, metrics, labels) private to its owner. ``os.open`` with 0666 lets the kernel apply the
    umask (and a default ACL of the folder) exactly as it does for ``open(path, "w")``; O_EXCL keeps the name unique.
    """
    for _ in range(TEMP_NAME_TRIES):
        tmp = folder / f".{name}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file for {folder / name} in {TEMP_NAME_TRIES} tries")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder; it replaces ``path`` only if the block finishes.

    A crash (or SIGKILL) mid-write leaves the previous file intact and at most a stray ``.tmp`` file. The new file has
    the mode ``open()`` would give it (0666 minus the umask), not the 0600 of ``tempfile.mkstemp``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path.parent, path.name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def voc_palette(num_entries: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: ``[num_entries, 3]`` uint8, entry 255 is the void colour (224, 224, 192)."""
    return _voc_palette(num_entries).copy()


@functools.cache
def _voc_palette(num_entries: int) -> np.ndarray:
    palette = np.zeros((num_entries, 3), dtype=np.uint8)
    for index in range(num_entries):
        value, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (r, g, b)
    return palette


@functools.cache
def _palette_list() -> list[int]:
    return voc_palette().flatten().tolist()


def label_to_png_bytes(label: np.ndarray, palette: bool = True) -> bytes:
    """Encode an ``[H, W]`` label map (values 0..255) as a PNG, as a palette image when ``palette``."""
    if label.ndim != 2:
        raise ValueError(f"label map must be [H, W], got shape {label.shape}")
    if label.min(initial=0) < 0 or label.max(initial=0) > 255:
        raise ValueError(f"label values must lie in 0..255, got {label.min()}..{label.max()}")
    image = Image.fromarray(label.astype(np.uint8), mode="L" if not palette else "P")
    if palette:
        image.putpalette(_palette_list())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_label_png(path: str | os.PathLike, label: np.ndarray, palette: bool = True) -> None:
    """Atomically write an ``[H, W]`` label map as a (palette) PNG."""
    atomic_write_bytes(path, label_to_png_bytes(label, palette=palette))


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """Read a label PNG (palette or grey) as ``[H, W]`` uint8 class indices; errors name the file."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise ValueError(
                    f"label PNG {path} has mode {image.mode!r}; expected a palette ('P') or grey ('L') image"
                )
            return np.array(image, dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"label file not found: {path}") from None
    except OSError as err:
        raise OSError(f"cannot read label file {path}: {err}") from err


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as ``[H, W, 3]`` uint8 RGB; a missing or corrupt file raises an error naming it."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except OSError as err:
        raise OSError(f"cannot decode image {path} (corrupt or not an image): {err}") from err


def probe_image(path: str | os.PathLike, decode: bool = False) -> tuple[str, tuple[int, int]]:
    """``(mode, (width, height))`` of an image file, opened as the readers above open it.

    ``decode=False`` reads the header only (``Image.open`` without ``load``, about a millisecond): it catches a
    missing, empty, non-image or header-truncated file. ``decode=True`` also verifies the file (complete stream,
    PNG chunk checksums) and decodes every pixel, which catches truncated or corrupt image data that a header read
    passes and that would otherwise fail at the same sample on every resume.

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        OSError: any other failure, naming the file and what PIL reported.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            info = image.mode, image.size
            if decode:
                image.verify()
        if decode:
            # verify() leaves the image unusable, so the full decode needs a second open.
            with Image.open(path) as image:
                image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... for broken files
        action = "decode" if decode else "read the header of"
        raise OSError(f"cannot {action} image file {path} (corrupt, truncated or not an image): {err}") from err
    return info


def save_npz(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Atomically write a compressed ``.npz``."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read a ``.npz`` fully (so the file is closed); errors name the file."""
    try:
        with np.load(path) as data:
            return {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {path}") from None
    except (OSError, ValueError) as err:
        raise BadFileError(
            f"cannot read {path} (corrupt or not an .npz file): {err}; delete it and rerun the tool that wrote it"
        ) from err
