"""MSFC models: timm ViT backbone, heads, memory bank and the assembled network; the second-stage segmentation network
(`models/stage2.py`); IRN's boundary network (`models/boundary.py`). `build_model` reads the config (``task`` picks
MSFC, the stage-2 network or the boundary network)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig

from models.backbone import NORM_STATS, BackboneOutput, ViTBackbone
from models.boundary import BoundaryNet, build_boundary_model
from models.memory import MemoryBank, fuse_similarity
from models.msfc import MSFC, MSFCOutput
from models.stage2 import Stage2Output, Stage2Segmenter, build_stage2_model
from utils.checkpoint import load_model_state, read_checkpoint, resolve_checkpoint

logger = logging.getLogger(__name__)

__all__ = [
    "MSFC",
    "NORM_STATS",
    "BackboneOutput",
    "BoundaryNet",
    "MSFCOutput",
    "MemoryBank",
    "Stage2Output",
    "Stage2Segmenter",
    "ViTBackbone",
    "build_model",
    "fuse_similarity",
]


def _plain(value: Any) -> Any:
    """An OmegaConf container as plain Python (timm must not see DictConfig/ListConfig); anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # plain dicts only
        return value
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def build_model(cfg: Any) -> MSFC | Stage2Segmenter | BoundaryNet:
    """Build `MSFC` from the config: `cfg.model.*`, `cfg.memory.*` and `cfg.data.num_classes` (configs/base.yaml);
    with ``task: stage2`` the second-stage network of `cfg.stage2.*` instead (`models.stage2.build_stage2_model`),
    with ``task: irn`` IRN's boundary network of `cfg.irn.*` (`models.boundary.build_boundary_model`).

    This, `models.stage2.build_stage2_model` and `models.boundary` (its builder and `load_boundary_net`) are the only
    places in `models/` that read the config.
    """
    task = str(cfg.get("task", "msfc"))  # a config saved before the key existed is an MSFC run
    if task == "stage2":
        return build_stage2_model(cfg)
    if task == "irn":
        return build_boundary_model(cfg)
    m, mem = cfg.model, cfg.memory
    kwargs = _plain(m.backbone_kwargs) or {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"model.backbone_kwargs must be a mapping of timm overrides, got {type(kwargs).__name__}")
    backbone = ViTBackbone(
        str(m.backbone),
        aux_layer=int(m.aux_layer),
        pretrained=bool(m.pretrained),
        weights=m.weights,
        freeze_pos_embed=bool(m.freeze_pos_embed),
        pos_embed_resample=str(m.pos_embed_resample),
        # A config saved before the key existed normalised with ImageNet statistics, the default.
        norm_stats=str(m.get("norm_stats", "imagenet")),
        **dict(kwargs),
    )
    num_classes = int(cfg.data.num_classes)
    memory = MemoryBank(
        num_classes=num_classes - 1,
        dim=backbone.embed_dim,
        momentum=float(mem.momentum),
        min_count=int(mem.min_count),
        ignore_index=int(cfg.data.ignore_index),
    )
    return MSFC(
        backbone,
        num_classes=num_classes,
        decoder_channels=int(m.decoder_channels),
        decoder_dilation=int(m.decoder_dilation),
        proj_hidden_dim=int(m.proj_hidden_dim),
        proj_bottleneck_dim=int(m.proj_bottleneck_dim),
        proj_out_dim=int(m.proj_out_dim),
        teacher_momentum=float(m.teacher_momentum),
        memory=memory,
    )


def load_trained_model(cfg: DictConfig, device: torch.device) -> MSFC | Stage2Segmenter:
    """Build the run's model from its config and load ``eval.checkpoint`` into it (eval mode, no pretrained download):
    MSFC, or the stage-2 network of a ``task: stage2`` run (:func:`build_model`).

    A checkpoint from another model (backbone, number of classes, head sizes) is an error listing the mismatched keys.
    """
    path = resolve_checkpoint(cfg)
    # The checkpoint holds every weight, so skip timm's download / the local backbone file.
    model = build_model(_without_pretrained(cfg))
    load_model_state(model, read_checkpoint(path)["model"], str(path))
    logger.info("loaded %s", path)
    return model.to(device).eval()


def _without_pretrained(cfg: DictConfig) -> DictConfig:
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["model"]["pretrained"] = False
    plain["model"]["weights"] = None
    return OmegaConf.create(plain)
