"""Session-wide synthetic datasets shared by the test files.

``voc_root`` is a VOC 2012 + SBD-aug layout (use it as ``data.root`` with ``data.name=voc``); ``coco_root`` is an
MSCOCO layout already run through ``tools.prepare_coco`` (masks + lists; ``data.name=coco``). Both come from seed 0
with the same image counts and sizes, so image ``i`` is the same picture in both. Treat them as read-only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from datasets.synthetic import generate
from tools.prepare_coco import prepare

# One intra-op thread: the tests use tiny tensors, where OpenMP threads cost more than they give, and on a busy
# 2-core machine two threads waiting on each other made tiny ops ~100x slower (measured).
torch.set_num_threads(1)

# Small and fast (~1 s for both): 24 train + 8 val images with sides of 64..96 pixels.
SYNTHETIC_ARGS: dict[str, Any] = {"num_train": 24, "num_val": 8, "seed": 0, "min_size": 64, "max_size": 96}
# A high crowd rate makes crowd regions (iscrowd=1) certain to appear in so few images.
COCO_CROWD_PROB = 0.1


@pytest.fixture(scope="session")
def synthetic_voc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """(root, generator summary) of the session's VOC-layout dataset."""
    root = tmp_path_factory.mktemp("synthetic_voc") / "VOC2012"
    return root, generate(root, layout="voc", **SYNTHETIC_ARGS)


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(root, generator summary, prepare_coco summary of its first run) of the session's COCO-layout dataset."""
    root = tmp_path_factory.mktemp("synthetic_coco") / "MSCOCO"
    summary = generate(root, layout="coco", crowd_prob=COCO_CROWD_PROB, **SYNTHETIC_ARGS)
    return root, summary, prepare(root)


@pytest.fixture(scope="session")
def voc_root(synthetic_voc: tuple[Path, dict[str, Any]]) -> Path:
    """A synthetic VOCdevkit/VOC2012 folder (JPEGImages, SegmentationClass[Aug], Annotations, ImageSets)."""
    return synthetic_voc[0]


@pytest.fixture(scope="session")
def coco_root(synthetic_coco: tuple[Path, dict[str, Any], dict[str, Any]]) -> Path:
    """A synthetic, prepared MSCOCO folder (coco2014/, annotations/, SegmentationClass/, ImageSets/)."""
    return synthetic_coco[0]


@pytest.fixture(scope="session")
def all_background_miou(voc_root: Path) -> float:
    """val mIoU of predicting background everywhere: IoU(background) = its pixel share, every other class 0."""
    import numpy as np

    from utils.io import read_label_png

    ids = (voc_root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    pixels = np.concatenate(
        [m[m != 255] for m in (read_label_png(voc_root / "SegmentationClass" / f"{i}.png") for i in ids)]
    )
    return float((pixels == 0).mean() / len(np.unique(pixels)))
