"""Datasets: on-disk layouts (VOC, COCO), split lists, image labels and CPU-side crops (SPEC §3, §7).

``build_dataset`` is the only place that reads the config or switches on ``data.name``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from datasets.base import Layout, SegmentationDataset, collate_eval
from datasets.coco import COCO_LAYOUT
from datasets.pseudo import PseudoLabelDataset
from datasets.transforms import TrainTransform
from datasets.voc import VOC_LAYOUT
from utils.config import ConfigError
from utils.dist import barrier, is_main_process

LAYOUTS: dict[str, Layout] = {"voc": VOC_LAYOUT, "coco": COCO_LAYOUT}

__all__ = [
    "LAYOUTS",
    "Layout",
    "PseudoLabelDataset",
    "SegmentationDataset",
    "TrainTransform",
    "build_dataset",
    "build_label_dataset",
    "collate_eval",
]


@contextlib.contextmanager
def _main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (reading labels, writing the cache); the others then find the cache written.

    If rank 0 fails, torchrun tears the group down, so the waiting ranks do not hang.
    """
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def _cache_dir(cfg: DictConfig) -> Path:
    if cfg.data.cache_dir is not None:
        return Path(cfg.data.cache_dir)
    if OmegaConf.is_missing(cfg.run, "out_dir"):
        raise ValueError("set run.out_dir (the dataset cache goes to <run.out_dir>/cache) or data.cache_dir")
    return Path(cfg.run.out_dir) / "cache"


def build_dataset(cfg: DictConfig, split: str, mode: str) -> SegmentationDataset:
    """The dataset of ``split`` for ``mode`` ("train" crops or full-image "eval" items), from the config.

    Eval items keep the full resolution so metrics use the original masks; ``eval.resize`` (COCO) is applied by
    inference, which upsamples its prediction back (``engine.inference.predict_seg_logits``).

    Reads ``data.*``, ``views.g2.scale`` and ``run.out_dir`` (for the cache). Under torchrun every
    rank must call it (rank 0 builds the label cache first, behind a barrier); the other ranks then reuse its entries.
    """
    data = cfg.data
    if data.name not in LAYOUTS:
        raise ConfigError(f"data.name must be one of the dataset layouts {sorted(LAYOUTS)}, got {data.name!r}")
    if OmegaConf.is_missing(data, "root"):
        raise ValueError(f"config key data.root is not set; point it at the {data.name} dataset folder")
    transform = None
    if mode == "train":
        transform = TrainTransform(
            crop_size=int(data.crop_size),
            scale_range=tuple(float(v) for v in data.scale_range),
            g2_scale=tuple(float(v) for v in cfg.views.g2.scale),
        )
    with _main_process_first():
        return SegmentationDataset(
            layout=LAYOUTS[data.name],
            root=data.root,
            split=split,
            mode=mode,
            num_classes=int(data.num_classes),
            cache_dir=_cache_dir(cfg),
            transform=transform,
            list_dir=data.list_dir,
            max_images=data.max_images,
            workers=int(data.num_workers),
        )


def build_label_dataset(
    cfg: DictConfig, split: str, labels_dir: str | Path, target: str, **kwargs: Any
) -> PseudoLabelDataset:
    """The images of ``split`` with labels of their own from ``labels_dir`` (pseudo labels for stage 2, relation labels
    for IRN), as training crops of ``data.crop_size`` / ``data.scale_range``: ``datasets.pseudo.PseudoLabelDataset``
    over the split's ids and image files (its masks, when it has any, are never targets).

    ``kwargs`` go to ``PseudoLabelDataset`` (``read_soft``, ``key``, ``maker``, ...).
    """
    data = cfg.data
    images = build_dataset(cfg, split, "eval")
    return PseudoLabelDataset(
        images.ids, images.image_paths, labels_dir, target, int(data.num_classes), int(data.crop_size),
        [float(v) for v in data.scale_range], ignore_index=int(data.ignore_index), workers=int(data.num_workers),
        **kwargs,
    )  # fmt: skip
